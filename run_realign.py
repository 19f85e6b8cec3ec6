#!/usr/bin/env python
"""Realign a multilingual encoder: pull the sentence-averaged representations of translation pairs together.

The realignment phase of "Rethinking what Matters: Effective and Robust Multilingual Realignment for Low-Resource
Languages": English ↔ L translation pairs, languages mixed within a batch, a symmetric in-batch contrastive loss over
masked-mean pooled sentences. The output is a plain encoder checkpoint that any `AutoModelFor*.from_pretrained` loads.

    python run_realign.py --subset subsets/uriel_20.yaml --model_name_or_path xlm-roberta-base --output_dir out/xlmr-uriel20
    accelerate launch run_realign.py --subset subsets/uriel_20.yaml --model_name_or_path xlm-roberta-base \
        --output_dir out/xlmr-uriel20 --gather_negatives
    python run_realign.py --subset uriel_20 --parallel_data_dir data/parallel --model_name_or_path xlm-roberta-base \
        --output_dir out/xlmr-uriel20 --reference_compat   # offline files, the reference code's behaviour
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModel, AutoTokenizer, Trainer, TrainingArguments, set_seed

import languages as lang_registry
from realign_utils import (
    asdict_public,
    check_settings,
    code_version,
    content_token_mask,
    detect_checkpoint,
    masked_mean_pool,
    parse_args,
    retrieval_precision_at_1,
    setup_logging,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

# The paper's realignment settings (A.6): 24,544 steps = 2 XNLI epochs at batch 32, 16 pairs, lr 2e-5. The reference
# code trains with Adam at a constant rate and no warm-up; AdamW without weight decay is Adam.
PAPER_TRAINING_DEFAULTS = {
    "max_steps": 24_544,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 2e-5,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "do_train": True,
    "save_steps": 2000,
    "save_total_limit": 2,
    "logging_steps": 50,
    "report_to": "none",
}
SETTINGS_FILE = "realign_settings.json"
CONFIG_FILE = "realign_config.json"
PROJECTION_PREFIX = "realign_projection."
ENGLISH_KEYS = ("en", "eng")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "The encoder to realign: a Hub model id (xlm-roberta-base) or a local checkpoint folder."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "The tokenizer to use, if it differs from --model_name_or_path."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store models, datasets and tokenised caches downloaded or built."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "The model version to use: a branch name, tag name or commit id."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Whether to run code from the model's Hub repository. Only enable it for repositories you trust."},
    )
    freeze_word_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Whether to keep the word-embedding matrix fixed. It saves memory and time (XLM-R's matrix has 250k "
            "rows) and keeps the vocabulary of unseen languages where pre-training left it."
        },
    )


@dataclass
class DataArguments:
    subset: str | None = field(
        default=None,
        metadata={
            "help": "The languages to realign with: a subset YAML (subsets/uriel_20.yaml) or its bare name (uriel_20). "
            "Random subsets are drawn with --seed, as in the paper."
        },
    )
    languages: str | None = field(
        default=None,
        metadata={"help": "A comma-separated list of language codes, instead of --subset (e.g. yor,swa,fra)."},
    )
    parallel_data_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder of local parallel files to read instead of the Hub, one per language: {code}.tsv "
            "(English<TAB>translation per line), {code}.jsonl (a 'translation' dict with an 'en' or 'eng' key and "
            "one other), or en-{code}.en plus en-{code}.{code} (one sentence per line, aligned by line). The code "
            "may be the registry code, an alias or the ISO 639-1 code."
        },
    )
    eval_parallel_data_dir: str | None = field(
        default=None,
        metadata={"help": "A folder of held-out parallel files (same formats) for evaluation: loss and retrieval."},
    )
    validation_pairs_per_language: int = field(
        default=0,
        metadata={
            "help": "How many pairs per language to hold out of the training data for evaluation, when no "
            "--eval_parallel_data_dir is given (0: none)."
        },
    )
    max_seq_length: int = field(
        default=96, metadata={"help": "The maximum number of tokens per sentence, special tokens included (paper: 96)."}
    )
    overlong: str = field(
        default="drop",
        metadata={
            "help": "What to do with a pair whose either side is longer than --max_seq_length: 'drop' it (the pair "
            "would no longer be a translation once cut) or 'truncate' it."
        },
    )
    language_sampling: str = field(
        default="uniform",
        metadata={
            "help": "How to pick the language of each training pair: 'uniform' over languages whatever their corpus "
            "size (the paper), 'proportional' to corpus size, or 'temperature' (size ** (1 / --sampling_temperature))."
        },
    )
    sampling_temperature: float = field(
        default=5.0, metadata={"help": "The temperature of --language_sampling temperature (1 = proportional)."}
    )
    max_pairs_per_language: int | None = field(
        default=None,
        metadata={
            "help": "Keep at most this many pairs per language, drawn at random from the whole corpus with --seed "
            "(not the head of the file)."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "For debugging: keep at most this many training pairs in all, spread evenly over languages."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "For debugging: keep at most this many held-out pairs per language."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "The number of processes used to tokenise."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Whether to tokenise again instead of reusing the cache."})

    def __post_init__(self):
        if self.subset is None and self.languages is None:
            raise ValueError("Give the languages to realign with: --subset subsets/uriel_20.yaml or --languages yor,swa.")
        if self.subset is not None and self.languages is not None:
            raise ValueError("Give either --subset or --languages, not both.")
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"--overlong must be 'drop' or 'truncate', got {self.overlong!r}.")
        if self.language_sampling not in ("uniform", "proportional", "temperature"):
            raise ValueError(
                f"--language_sampling must be uniform, proportional or temperature, got {self.language_sampling!r}."
            )
        if self.sampling_temperature <= 0:
            raise ValueError("--sampling_temperature must be positive.")
        if self.max_seq_length < 3:
            raise ValueError("--max_seq_length must leave room for special tokens and text (at least 3).")
        for name in ("parallel_data_dir", "eval_parallel_data_dir"):
            path = getattr(self, name)
            if path is not None and not os.path.isdir(path):
                raise ValueError(f"--{name} {path} is not a folder.")


@dataclass
class RealignArguments:
    temperature: float = field(
        default=0.1, metadata={"help": "The softmax temperature T of the contrastive loss (scale = 1 / T; paper: 0.1)."}
    )
    reference_compat: bool = field(
        default=False,
        metadata={
            "help": "Reproduce the reference code's behaviour instead of the paper's intent: prefix pooling, "
            "penultimate layer, a projection head, and XLM-R's stand-alone '▁' tokens removed. Each of the four "
            "can also be set on its own with the flags below, which take precedence."
        },
    )
    pooling: str | None = field(
        default=None,
        metadata={
            "help": "'mean': average over the sentence's non-special tokens (paper, default); 'reference_prefix': "
            "average over the first L positions, [CLS]/<s> included, with L the number of words (reference code)."
        },
    )
    realign_layer: int | None = field(
        default=None,
        metadata={
            "help": "The hidden_states index to align (0 = embeddings, -1 = last layer, the default; -2 = the "
            "penultimate, which is the reference code's hidden_states[11] for 12-layer models)."
        },
    )
    projection_head: bool | None = field(
        default=None,
        metadata={
            "help": "Whether to train a Linear(d, d) → ReLU → Linear(d, 128) head on the pooled vectors and align its "
            "output (reference code). The head is discarded when the encoder is saved."
        },
    )
    strip_sentencepiece_space: bool | None = field(
        default=None,
        metadata={"help": "Whether to drop stand-alone '▁' tokens produced by SentencePiece tokenizers (reference code)."},
    )
    gather_negatives: bool = field(
        default=False,
        metadata={
            "help": "Under multi-process training, gather the pooled vectors of every process (with gradients) so each "
            "pair has per_device_train_batch_size × world_size − 1 other pairs as negatives instead of "
            "per_device_train_batch_size − 1."
        },
    )

    def __post_init__(self):
        reference = {"pooling": "reference_prefix", "realign_layer": -2, "projection_head": True}
        paper = {"pooling": "mean", "realign_layer": -1, "projection_head": False}
        for name, value in (reference if self.reference_compat else paper).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.strip_sentencepiece_space is None:
            self.strip_sentencepiece_space = self.reference_compat
        if self.pooling not in ("mean", "reference_prefix"):
            raise ValueError(f"--pooling must be 'mean' or 'reference_prefix', got {self.pooling!r}.")
        if self.temperature <= 0:
            raise ValueError("--temperature must be positive (the paper uses 0.1).")


# ----------------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------------


def contrastive_alignment_loss(
    src_embeddings: torch.Tensor,
    tgt_embeddings: torch.Tensor,
    temperature: float = 0.1,
    all_src_embeddings: torch.Tensor | None = None,
    all_tgt_embeddings: torch.Tensor | None = None,
    rank: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric in-batch contrastive loss between the two sides of N translation pairs.

    Every sentence of the batch, in either language, is a query; its translation is the positive and the other
    2N − 2 sentences (both languages) are the negatives. Similarities are cosines divided by the temperature, the
    query's similarity with itself is masked out, and the loss is the cross-entropy of picking the positive, averaged
    over the 2N queries. This is the loss the paper (Eq. 1) describes and the reference code minimises: Eq. 1 as
    printed lacks the minus sign and leaves the positive out of the denominator.

    Also known as: InfoNCE or NT-Xent with in-batch negatives (SimCLR's loss applied to translation pairs); "strong
    alignment" in Gaschi et al. (2023). sentence-transformers' MultipleNegativesRankingLoss is the one-directional
    variant whose negatives are the other targets only; the companion paper's "cross-lingual negatives only" variant
    would drop the same-language negatives.

    Args:
        src_embeddings: (N, d) pooled English sentences.
        tgt_embeddings: (N, d) pooled translations, row i translating row i of `src_embeddings`.
        temperature: T in exp(cos / T); scale = 1 / T. The paper uses 0.1. Lower is sharper.
        all_src_embeddings: (W·N, d) the English sides of every process, to use other processes' pairs as extra
            negatives (gathered with gradients); `None` for the local batch only.
        all_tgt_embeddings: (W·N, d) likewise for the translations.
        rank: this process's index in the gathered tensors (its pairs are rows rank·N … rank·N + N − 1).

    Returns:
        The scalar loss and detached statistics: `retrieval_acc` (share of queries whose most similar candidate is
        their translation), `positive_cosine` and `negative_cosine` (mean cosines).

    References:
        Chen et al. (2020), A Simple Framework for Contrastive Learning of Visual Representations (NT-Xent);
        Gaschi et al. (2023), Exploring the Relationship between Alignment and Cross-lingual Transfer;
        the paper, §2 and Appendix A.6.

    Example:
        >>> src, tgt = torch.randn(4, 8), torch.randn(4, 8)
        >>> loss, stats = contrastive_alignment_loss(src, tgt, temperature=0.1)
        >>> loss.shape, sorted(stats)
        (torch.Size([]), ['negative_cosine', 'positive_cosine', 'retrieval_acc'])
    """
    n = src_embeddings.shape[0]
    queries = F.normalize(torch.cat([src_embeddings, tgt_embeddings]), dim=-1)  # (2N, d)
    if all_src_embeddings is None:
        candidates, total, offset = queries, n, 0
    else:
        candidates = F.normalize(torch.cat([all_src_embeddings, all_tgt_embeddings]), dim=-1)  # (2WN, d)
        total, offset = all_src_embeddings.shape[0], rank * n
    cosines = queries @ candidates.T  # (2N, 2WN)
    local = torch.arange(n, device=queries.device)
    self_index = torch.cat([offset + local, total + offset + local])  # (2N,)
    positive_index = torch.cat([total + offset + local, offset + local])  # (2N,)
    rows = torch.arange(2 * n, device=queries.device)
    self_mask = torch.zeros_like(cosines, dtype=torch.bool)
    self_mask[rows, self_index] = True
    # finfo.min rather than -inf or -1e6: finite in fp16/bf16, and exp() of it is exactly 0.
    logits = (cosines / temperature).masked_fill(self_mask, torch.finfo(cosines.dtype).min)
    loss = F.cross_entropy(logits, positive_index)
    with torch.no_grad():
        negative_mask = ~self_mask
        negative_mask[rows, positive_index] = False
        stats = {
            "retrieval_acc": (logits.argmax(dim=1) == positive_index).float().mean(),
            "positive_cosine": cosines[rows, positive_index].float().mean(),
            "negative_cosine": cosines[negative_mask].float().mean(),
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def resolve_languages(data_args: DataArguments, seed: int) -> tuple[list[str], dict[str, Any]]:
    """The canonical codes to realign with, and a description of where they came from."""
    registry = lang_registry.load_registry()
    if data_args.subset is not None:
        subset = lang_registry.load_subset(data_args.subset, registry=registry, seed=seed)
        codes, info = subset.languages, {"name": subset.name, "path": str(subset.path), "strategy": subset.strategy}
    else:
        codes = lang_registry.parse_language_list(data_args.languages, registry=registry, seed=seed)
        info = {"name": "custom", "path": None, "strategy": "list"}
    codes = [c for c in codes if c != registry.english.code]
    if not codes:
        raise ValueError("No language other than English to realign with.")
    logger.info("Realigning with %d languages: %s", len(codes), ", ".join(codes))
    return codes, info


def find_local_parallel_file(folder: str, language: lang_registry.Language) -> list[Path]:
    """The file(s) holding `language` in `folder`: {code}.tsv, {code}.jsonl or the pair en-{code}.en / en-{code}.{code}."""
    names = [language.code, *language.aliases] + ([language.iso639_1] if language.iso639_1 else [])
    folder_path = Path(folder)
    for name in names:
        for suffix in (".tsv", ".jsonl", ".json"):
            if (folder_path / f"{name}{suffix}").is_file():
                return [folder_path / f"{name}{suffix}"]
        en_side, xx_side = folder_path / f"en-{name}.en", folder_path / f"en-{name}.{name}"
        if en_side.is_file() and xx_side.is_file():
            return [en_side, xx_side]
    raise FileNotFoundError(
        f"No parallel file for {language.code} ({language.name}) in {folder}: expected {language.code}.tsv, "
        f"{language.code}.jsonl or en-{language.code}.en + en-{language.code}.{language.code} (aliases "
        f"{', '.join(names[1:]) or 'none'} are accepted as well)."
    )


def read_local_parallel(files: list[Path]) -> dict[str, list[str]]:
    """Read English/translation pairs from local files, failing with the file and line of any malformed input."""
    src, tgt = [], []
    if len(files) == 2:
        with open(files[0], encoding="utf-8") as f_en, open(files[1], encoding="utf-8") as f_xx:
            src, tgt = f_en.read().splitlines(), f_xx.read().splitlines()
        if len(src) != len(tgt):
            raise ValueError(
                f"{files[0]} has {len(src)} lines but {files[1]} has {len(tgt)}: the two sides must be aligned line "
                "by line."
            )
    elif files[0].suffix == ".tsv":
        with open(files[0], encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\n").rstrip("\r")
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise ValueError(
                        f"{files[0]}:{lineno}: no tab separator. Each line must be English<TAB>translation."
                    )
                english, translation = line.split("\t", 2)[:2]
                src.append(english)
                tgt.append(translation)
    else:
        with open(files[0], encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    translation = json.loads(line)["translation"]
                    english_key = next(k for k in ENGLISH_KEYS if k in translation)
                    (other_key,) = [k for k in translation if k != english_key]
                except (json.JSONDecodeError, KeyError, TypeError, StopIteration, ValueError) as err:
                    raise ValueError(
                        f"{files[0]}:{lineno}: expected a JSON object with a 'translation' dict holding an 'en' (or "
                        f"'eng') key and one other language key ({type(err).__name__}: {err})."
                    ) from err
                src.append(translation[english_key])
                tgt.append(translation[other_key])
    if not src:
        raise ValueError(f"{files[0]} holds no parallel pair: the file is empty.")
    return {"src": src, "tgt": tgt}


def load_hub_parallel(language: lang_registry.Language, cache_dir: str | None) -> dict[str, datasets.Dataset]:
    """Load a language's pairs from the Hub: OPUS-100 where it has the pair, NLLB otherwise (per the registry)."""
    source = language.parallel
    if source is None:
        raise ValueError(f"The registry gives no parallel data for {language.code} ({language.name}).")
    if source["source"] == "opus100":
        raw = datasets.load_dataset("Helsinki-NLP/opus-100", source["config"], cache_dir=cache_dir)
        xx = next(code for code in source["config"].split("-") if code != "en")

        def to_columns(batch):
            return {"src": [t["en"] for t in batch["translation"]], "tgt": [t[xx] for t in batch["translation"]]}

        return {
            split: ds.map(to_columns, batched=True, remove_columns=ds.column_names, desc=f"Reading {language.code}")
            for split, ds in raw.items()
        }
    # allenai/nllb is a loading-script repository, which datasets >= 4 no longer runs: read the raw gzipped TSV the
    # script points at (columns: source, target, LASER score, source LID, target LID, ...; sides in config order).
    first, second = source["config"].split("-")
    url = f"https://storage.googleapis.com/allennlp-data-bucket/nllb/{first}-{second}.gz"
    raw = datasets.load_dataset(
        "csv", data_files=url, delimiter="\t", header=None, quoting=3, usecols=[0, 1], names=[first, second],
        cache_dir=cache_dir, split="train",
    )
    english = first if first.startswith("eng_") else second
    other = second if english == first else first
    raw = raw.rename_columns({english: "src", other: "tgt"})
    return {"train": raw}


def load_parallel(language: lang_registry.Language, data_args: DataArguments, cache_dir: str | None) -> dict[str, Any]:
    """Train and held-out pairs of one language (datasets with `src` and `tgt` columns) and the local files read.

    Returns a dict with `train`, `eval` (or None), `train_files` and `eval_files` (lists, empty for Hub data).
    """
    eval_ds, train_files, eval_files = None, [], []
    if data_args.parallel_data_dir is not None:
        train_files = find_local_parallel_file(data_args.parallel_data_dir, language)
        train_ds = datasets.Dataset.from_dict(read_local_parallel(train_files))
    else:
        splits = load_hub_parallel(language, cache_dir)
        train_ds = splits["train"]
        eval_ds = splits.get("validation")
    if data_args.eval_parallel_data_dir is not None:
        eval_files = find_local_parallel_file(data_args.eval_parallel_data_dir, language)
        eval_ds = datasets.Dataset.from_dict(read_local_parallel(eval_files))
    elif data_args.validation_pairs_per_language > 0:
        if len(train_ds) <= data_args.validation_pairs_per_language:
            raise ValueError(
                f"{language.code} has {len(train_ds)} pairs, not enough to hold out "
                f"--validation_pairs_per_language {data_args.validation_pairs_per_language}."
            )
        split = train_ds.train_test_split(test_size=data_args.validation_pairs_per_language, seed=0)
        train_ds, eval_ds = split["train"], split["test"]
        # The split is drawn afresh from the same files: key its cache by them and the split's role.
        eval_files = train_files
    return {"train": train_ds, "eval": eval_ds, "train_files": train_files, "eval_files": eval_files}


def tokenize_pairs(
    dataset: datasets.Dataset,
    language: str,
    tokenizer,
    data_args: DataArguments,
    realign_args: RealignArguments,
    cache_dir: str | None,
    desc: str,
    source_files: list[Path] | None = None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Filter and tokenise one language's pairs once (cached); returns the dataset and per-reason drop counts."""
    n_raw = len(dataset)
    space_id = _standalone_space_id(tokenizer) if realign_args.strip_sentencepiece_space else None
    max_len = data_args.max_seq_length

    def is_usable(batch):
        return [bool(s.strip()) and bool(t.strip()) and s.strip() != t.strip() for s, t in zip(batch["src"], batch["tgt"])]

    def tokenize(batch):
        out = {}
        for side in ("src", "tgt"):
            ids = tokenizer(batch[side], add_special_tokens=True, truncation=False)["input_ids"]
            if space_id is not None:
                ids = [[t for t in seq if t != space_id] for seq in ids]
            out[f"{side}_length"] = [len(seq) for seq in ids]
            if data_args.overlong == "truncate":
                ids = [seq if len(seq) <= max_len else seq[: max_len - 1] + seq[-1:] for seq in ids]
            out[f"{side}_input_ids"] = ids
            # The reference code's prefix pooling averages over as many positions as the sentence has words.
            out[f"{side}_n_words"] = [len(text.split()) for text in batch[side]]
        return out

    cache_kwargs = _tokenized_cache_kwargs(source_files, language, tokenizer, data_args, realign_args, cache_dir, desc)
    usable = dataset.filter(is_usable, batched=True, desc=f"Filtering {desc}", **cache_kwargs.get("filter", {}))
    n_unusable = n_raw - len(usable)
    if len(usable) == 0:
        return usable, {"raw": n_raw, "empty_or_identical": n_unusable, "overlong": 0, "kept": 0}
    tokenized = usable.map(
        tokenize,
        batched=True,
        num_proc=data_args.preprocessing_num_workers,
        remove_columns=usable.column_names,
        load_from_cache_file=not data_args.overwrite_cache,
        desc=f"Tokenizing {desc}",
        **cache_kwargs.get("map", {}),
    )
    n_overlong = 0
    if data_args.overlong == "drop":
        before = len(tokenized)
        tokenized = tokenized.filter(
            lambda batch: [max(a, b) <= max_len for a, b in zip(batch["src_length"], batch["tgt_length"])],
            batched=True,
            desc=f"Dropping over-long {desc}",
            **cache_kwargs.get("overlong", {}),
        )
        n_overlong = before - len(tokenized)
    tokenized = tokenized.remove_columns(["src_length", "tgt_length"])
    counts = {"raw": n_raw, "empty_or_identical": n_unusable, "overlong": n_overlong, "kept": len(tokenized)}
    logger.info(
        "%s: %d pairs kept of %d (dropped %d empty or identical, %d %s)",
        desc, counts["kept"], n_raw, n_unusable, n_overlong,
        f"longer than {max_len} tokens" if data_args.overlong == "drop" else "over-long (truncated, not dropped)",
    )
    return tokenized, counts


def _standalone_space_id(tokenizer) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids("▁")
    if token_id is None or token_id == tokenizer.unk_token_id:
        logger.warning("--strip_sentencepiece_space: the tokenizer has no stand-alone '▁' token; nothing to strip.")
        return None
    return token_id


def _tokenized_cache_kwargs(files, language, tokenizer, data_args, realign_args, cache_dir, desc) -> dict:
    """Cache files for in-memory datasets built from local files, keyed by the files' content and the settings.

    Datasets loaded from the Hub are already file-backed and cached by `datasets` itself.
    """
    if not files:
        return {}
    digest = hashlib.sha256()
    for path in files:
        digest.update(Path(path).read_bytes())
    key = json.dumps(
        [
            language, desc, tokenizer.name_or_path, len(tokenizer), data_args.max_seq_length, data_args.overlong,
            realign_args.strip_sentencepiece_space, data_args.validation_pairs_per_language, transformers.__version__,
        ]
    )
    digest.update(key.encode())
    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "realign_tokenized" / digest.hexdigest()[:24]
    root.mkdir(parents=True, exist_ok=True)
    return {
        "filter": {"cache_file_name": str(root / "usable.arrow")},
        "map": {"cache_file_name": str(root / "tokenized.arrow")},
        "overlong": {"cache_file_name": str(root / "not_overlong.arrow")},
    }


def build_datasets(
    codes: list[str],
    tokenizer,
    data_args: DataArguments,
    realign_args: RealignArguments,
    model_args: ModelArguments,
    seed: int,
    with_eval: bool,
) -> tuple[datasets.Dataset, datasets.Dataset | None, dict[str, dict[str, int]]]:
    """Tokenised training pairs of every language (with a `lang_id` column), held-out pairs, and per-language counts."""
    registry = lang_registry.load_registry()
    train_parts, eval_parts, stats = [], [], {}
    per_language_cap = data_args.max_pairs_per_language
    if data_args.max_train_samples is not None:
        even_share = max(1, data_args.max_train_samples // len(codes))
        per_language_cap = min(per_language_cap or even_share, even_share)
    for lang_id, code in enumerate(codes):
        language = registry.get(code)
        raw = load_parallel(language, data_args, model_args.cache_dir)
        train_ds, counts = tokenize_pairs(
            raw["train"], code, tokenizer, data_args, realign_args, model_args.cache_dir, f"{code} train",
            raw["train_files"],
        )
        if len(train_ds) == 0:
            raise ValueError(
                f"Every {code} training pair was filtered out ({counts}). Check the file, or use --overlong truncate "
                "or a larger --max_seq_length."
            )
        if per_language_cap is not None and len(train_ds) > per_language_cap:
            # A random sample of the whole corpus, not its head: corpora are often sorted by source or score.
            train_ds = train_ds.shuffle(seed=seed).select(range(per_language_cap))
            counts["capped"] = per_language_cap
        counts["used"] = len(train_ds)
        train_parts.append(train_ds.add_column("lang_id", [lang_id] * len(train_ds)))
        if raw["eval"] is not None and with_eval:
            eval_ds, _ = tokenize_pairs(
                raw["eval"], code, tokenizer, data_args, realign_args, model_args.cache_dir, f"{code} held-out",
                raw["eval_files"],
            )
            if data_args.max_eval_samples is not None:
                eval_ds = eval_ds.select(range(min(len(eval_ds), data_args.max_eval_samples)))
            counts["held_out"] = len(eval_ds)
            if len(eval_ds):
                eval_parts.append(eval_ds.add_column("lang_id", [lang_id] * len(eval_ds)))
        stats[code] = counts
    train_dataset = datasets.concatenate_datasets(train_parts)
    eval_dataset = datasets.concatenate_datasets(eval_parts) if eval_parts else None
    return train_dataset, eval_dataset, stats


class LanguageMixingSampler(torch.utils.data.Sampler):
    """Yield training indices whose language is drawn per pair (uniform by default), each corpus shuffled whole.

    Within a language, pairs come in the order of a fresh permutation of the whole corpus, reshuffled when used up,
    so small corpora are repeated and large ones are read beyond their head. The stream depends only on the seed
    and the epoch, which is what lets the Trainer resume mid-epoch by skipping batches.
    """

    def __init__(self, lang_ids: np.ndarray, probabilities: np.ndarray, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.probabilities = probabilities
        self.seed = seed
        self.epoch = 0
        order = np.argsort(lang_ids, kind="stable")
        boundaries = np.searchsorted(lang_ids[order], np.arange(len(probabilities) + 1))
        self.indices_by_language = [order[boundaries[k] : boundaries[k + 1]] for k in range(len(probabilities))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        languages = rng.choice(len(self.probabilities), size=self.num_samples, p=self.probabilities)
        stream = np.empty(self.num_samples, dtype=np.int64)
        for k, indices in enumerate(self.indices_by_language):
            positions = np.flatnonzero(languages == k)
            if len(positions) == 0:
                continue
            repeats = math.ceil(len(positions) / len(indices))
            stream[positions] = np.concatenate([rng.permutation(indices) for _ in range(repeats)])[: len(positions)]
        return iter(stream.tolist())


def language_probabilities(sizes: np.ndarray, strategy: str, temperature: float) -> np.ndarray:
    """Probability of drawing each language: uniform (the paper), proportional to size, or size ** (1 / T)."""
    if strategy == "uniform":
        weights = np.ones(len(sizes))
    elif strategy == "proportional":
        weights = sizes.astype(float)
    else:
        weights = sizes.astype(float) ** (1.0 / temperature)
    return weights / weights.sum()


@dataclass
class PairCollator:
    """Stack both sides of N pairs into one (2N, L) batch, English rows first, padded to the longest sentence.

    One forward pass over 2N rows is cheaper than two over N, and padding both sides to a common length costs little
    since translations have similar lengths.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [f["src_input_ids"] for f in features] + [f["tgt_input_ids"] for f in features]
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        width = int(lengths.max())
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = np.full((len(sequences), width), self.pad_token_id, dtype=np.int64)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = seq
        attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        n_words = [f["src_n_words"] for f in features] + [f["tgt_n_words"] for f in features]
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "n_words": torch.tensor(n_words, dtype=torch.long),
            "lang_id": torch.tensor([f["lang_id"] for f in features], dtype=torch.long),
        }


# ----------------------------------------------------------------------------------------------------------------------
# Model and Trainer
# ----------------------------------------------------------------------------------------------------------------------


def load_encoder(model_args: ModelArguments, realign_args: RealignArguments) -> transformers.PreTrainedModel:
    """The encoder to realign, with the parameters that receive no gradient frozen and the optional head attached."""
    model = AutoModel.from_pretrained(
        model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    num_layers = model.config.num_hidden_layers
    if not -(num_layers + 1) <= realign_args.realign_layer <= num_layers:
        raise ValueError(
            f"--realign_layer {realign_args.realign_layer} is out of range: the model has {num_layers} layers "
            f"(hidden_states indices -{num_layers + 1} … {num_layers})."
        )
    # Parameters that never receive a gradient (pooler, layers above the aligned one) are frozen so that DDP does
    # not fail on unused parameters; their pre-trained values are saved unchanged for the downstream heads.
    frozen = [getattr(model, "pooler", None)]
    layer_index = realign_args.realign_layer % (num_layers + 1)
    encoder_layers = getattr(getattr(model, "encoder", None), "layer", None)
    if encoder_layers is not None:
        frozen.extend(encoder_layers[layer_index:])
    if model_args.freeze_word_embeddings:
        frozen.append(model.get_input_embeddings())
    for module in frozen:
        if module is not None:
            module.requires_grad_(False)
    if realign_args.projection_head:
        hidden = model.config.hidden_size
        # Registered on the model so checkpoints carry it for resuming; stripped from the final save.
        model.realign_projection = nn.Sequential(
            nn.Linear(hidden, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, 128, bias=False)
        )
    return model


class RealignTrainer(Trainer):
    """A Trainer whose loss is `contrastive_alignment_loss` over pooled sentences of translation pairs.

    Batches come from `PairCollator`: `input_ids` (2N, L) with the English sides first, `n_words` (2N,), `lang_id`
    (N,). Besides the loss, training logs the in-batch retrieval accuracy and the mean positive / negative cosines;
    `evaluate()` adds per-language retrieval precision@1 on held-out pairs.
    """

    # compute_loss returns a per-batch mean, not a sum normalised by num_items_in_batch: the Trainer must divide it
    # by the gradient-accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, realign_args: RealignArguments, language_codes: list[str], sampling_probs, **kwargs):
        super().__init__(*args, **kwargs)
        self.realign_args = realign_args
        self.language_codes = language_codes
        self.sampling_probs = sampling_probs
        tokenizer = self.processing_class
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self._train_stats: dict[str, list[float]] = defaultdict(list)
        self._final_save = False

    # -- representations --------------------------------------------------------------------------------------------

    def pool(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_words: torch.Tensor) -> torch.Tensor:
        """Sentence vectors (B, d) from the configured layer and pooling."""
        layer = self.realign_args.realign_layer
        last = layer in (-1, model.config.num_hidden_layers) if hasattr(model, "config") else layer == -1
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=not last)
        hidden = outputs.last_hidden_state if last else outputs.hidden_states[layer]  # (B, L, d)
        if self.realign_args.pooling == "mean":
            mask = content_token_mask(input_ids, attention_mask, self.special_ids.to(input_ids.device))
        else:
            # Reference code: the first n_words positions, [CLS]/<s> included, whatever tokens they hold.
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]  # (1, L)
            mask = (positions < n_words[:, None]) & attention_mask.bool()
        return masked_mean_pool(hidden, mask)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pooled = self.pool(model, inputs["input_ids"], inputs["attention_mask"], inputs["n_words"])  # (2N, d)
        projection = getattr(self.accelerator.unwrap_model(model), "realign_projection", None)
        if projection is not None:
            pooled = projection(pooled)  # (2N, 128)
        src, tgt = pooled.chunk(2)  # (N, d) each
        gathered = {}
        if self.realign_args.gather_negatives and self.args.world_size > 1:
            # all_gather from torch.distributed.nn keeps the graph: other processes' vectors get gradients too.
            from torch.distributed.nn.functional import all_gather

            gathered = {
                "all_src_embeddings": torch.cat(all_gather(src.contiguous())),
                "all_tgt_embeddings": torch.cat(all_gather(tgt.contiguous())),
                "rank": self.args.process_index,
            }
        loss, stats = contrastive_alignment_loss(src, tgt, self.realign_args.temperature, **gathered)
        if model.training:
            for name, value in stats.items():
                self._train_stats[name].append(value.item())
            pairs = len(gathered["all_src_embeddings"]) if gathered else len(src)
            self._train_stats["negatives_per_query"].append(2 * pairs - 2)
        return (loss, {"pooled": pooled}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._train_stats:
            for name, values in self._train_stats.items():
                logs[f"train_{name}"] = round(float(np.mean(values)), 4)
            self._train_stats.clear()
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lang_ids = np.asarray(dataset["lang_id"])
        if self.args.max_steps > 0:
            # One "epoch" covers the whole run, so the language stream is never cut and restarted.
            num_samples = (
                self.args.max_steps
                * self.args.per_device_train_batch_size
                * self.args.gradient_accumulation_steps
                * self.args.world_size
            )
        else:
            num_samples = len(dataset)
        return LanguageMixingSampler(lang_ids, self.sampling_probs, num_samples, self.args.seed)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        retrieval = self.retrieval_metrics(dataset, metric_key_prefix)
        metrics.update(retrieval)
        self.log(retrieval)
        return metrics

    @torch.no_grad()
    def retrieval_metrics(self, dataset: datasets.Dataset, prefix: str = "eval") -> dict[str, float]:
        """Per-language precision@1 of finding each held-out sentence's translation among that language's pairs."""
        model = self.model
        was_training = model.training
        model.eval()
        lang_ids = np.asarray(dataset["lang_id"])
        metrics, averages = {}, []
        for lang_id in np.unique(lang_ids):
            subset = dataset.select(np.flatnonzero(lang_ids == lang_id))
            src, tgt = [], []
            for start in range(0, len(subset), self.args.per_device_eval_batch_size):
                batch = self.data_collator(list(subset.select(range(start, min(len(subset), start + self.args.per_device_eval_batch_size)))))
                batch = {k: v.to(self.args.device) for k, v in batch.items()}
                pooled = self.pool(model, batch["input_ids"], batch["attention_mask"], batch["n_words"]).float()
                s, t = pooled.chunk(2)
                src.append(s)
                tgt.append(t)
            src, tgt = torch.cat(src), torch.cat(tgt)
            code = self.language_codes[int(lang_id)]
            en_to_xx = retrieval_precision_at_1(src, tgt)
            xx_to_en = retrieval_precision_at_1(tgt, src)
            metrics[f"{prefix}_{code}_retrieval_en2xx"] = en_to_xx
            metrics[f"{prefix}_{code}_retrieval_xx2en"] = xx_to_en
            metrics[f"{prefix}_{code}_retrieval_acc"] = (en_to_xx + xx_to_en) / 2
            averages.append((en_to_xx + xx_to_en) / 2)
        if averages:
            metrics[f"{prefix}_avg_retrieval_acc"] = float(np.mean(averages))
        model.train(was_training)
        return metrics

    def save_encoder(self, output_dir: str | None = None) -> None:
        """Save the encoder alone (projection head dropped), loadable with `AutoModelFor*.from_pretrained`."""
        self._final_save = True
        try:
            self.save_model(output_dir)
        finally:
            self._final_save = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self._final_save:
            state_dict = state_dict if state_dict is not None else self.accelerator.unwrap_model(self.model).state_dict()
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(PROJECTION_PREFIX)}
        super()._save(output_dir, state_dict=state_dict)


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def parse_realign_args(argv: list[str] | None = None):
    model_args, data_args, realign_args, training_args = parse_args(
        (ModelArguments, DataArguments, RealignArguments, TrainingArguments), PAPER_TRAINING_DEFAULTS, argv
    )
    # The src_*/tgt_* columns are not arguments of the model's forward, and the Trainer would otherwise drop them.
    training_args.remove_unused_columns = False
    if training_args.world_size > 1:
        # Every process must hold full batches of the same size, or the gathered negatives would not line up.
        training_args.dataloader_drop_last = True
    return model_args, data_args, realign_args, training_args


def wants_eval(data_args: DataArguments, training_args: TrainingArguments) -> bool:
    """Held-out pairs are evaluated when they are given, unless evaluation is explicitly switched off."""
    has_data = data_args.eval_parallel_data_dir is not None or data_args.validation_pairs_per_language > 0
    return has_data or training_args.do_eval


def run_settings(model_args, data_args, realign_args, training_args, codes, subset_info) -> dict[str, Any]:
    """What determines the realigned checkpoint: a run in the same output_dir must match it exactly."""
    training_keys = (
        "seed", "max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size", "world_size",
        "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "bf16", "fp16",
    )
    return {
        "model_name_or_path": model_args.model_name_or_path,
        "freeze_word_embeddings": model_args.freeze_word_embeddings,
        "subset": subset_info["name"],
        "languages": codes,
        **{f"data.{k}": v for k, v in asdict_public(data_args).items() if k not in ("preprocessing_num_workers", "overwrite_cache")},
        **{f"loss.{k}": v for k, v in asdict_public(realign_args).items()},
        **{f"training.{k}": getattr(training_args, k) for k in training_keys},
    }


def write_realign_config(trainer, settings, subset_info, pair_stats, train_metrics, eval_metrics) -> None:
    config = {
        "base_model": settings["model_name_or_path"],
        "subset": subset_info,
        "languages": settings["languages"],
        "pair_counts": pair_stats,
        "loss": {k.removeprefix("loss."): v for k, v in settings.items() if k.startswith("loss.")},
        "steps": trainer.state.global_step,
        "seed": settings["training.seed"],
        "settings": settings,
        "code_version": code_version(),
        "train_metrics": train_metrics,
        "eval_metrics": eval_metrics,
    }
    write_json_atomic(Path(trainer.args.output_dir) / CONFIG_FILE, config)


def write_model_card(trainer, settings, subset_info, eval_metrics) -> None:
    registry = lang_registry.load_registry()
    iso = [registry.get(c).iso639_1 or c for c in ["eng", *settings["languages"]]]
    kwargs = {
        "language": iso,
        "tags": ["multilingual-realignment", "contrastive", f"subset-{subset_info['name']}"],
        "finetuned_from": settings["model_name_or_path"],
        "model_name": Path(trainer.args.output_dir).name,
    }
    if trainer.args.push_to_hub:
        trainer.push_to_hub(**kwargs)
        return
    trainer.create_model_card(**kwargs)
    lines = [
        "",
        "## Realignment",
        "",
        f"- Base model: `{settings['model_name_or_path']}`",
        f"- Subset: `{subset_info['name']}` ({len(settings['languages'])} languages): {', '.join(settings['languages'])}",
        f"- Steps: {trainer.state.global_step}, seed {settings['training.seed']}",
        "- Loss: " + ", ".join(f"{k.removeprefix('loss.')}={v}" for k, v in settings.items() if k.startswith("loss.")),
    ]
    if eval_metrics.get("eval_avg_retrieval_acc") is not None:
        lines.append(f"- Held-out retrieval accuracy (mean of both directions): {eval_metrics['eval_avg_retrieval_acc']:.4f}")
    with open(Path(trainer.args.output_dir) / "README.md", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, realign_args, training_args = parse_realign_args(argv)
    setup_logging(training_args)
    logger.info("Realignment %s, data %s", realign_args, data_args)
    set_seed(training_args.seed)

    codes, subset_info = resolve_languages(data_args, training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    settings = run_settings(model_args, data_args, realign_args, training_args, codes, subset_info)
    check_settings(training_args.output_dir, settings, SETTINGS_FILE, training_args.should_save)
    last_checkpoint = detect_checkpoint(training_args)

    with training_args.main_process_first(desc="tokenising the parallel data"):
        train_dataset, eval_dataset, pair_stats = build_datasets(
            codes, tokenizer, data_args, realign_args, model_args, training_args.seed, wants_eval(data_args, training_args)
        )
    sizes = np.array([pair_stats[c]["used"] for c in codes])
    sampling_probs = language_probabilities(sizes, data_args.language_sampling, data_args.sampling_temperature)
    model = load_encoder(model_args, realign_args)
    pad_multiple = 8 if torch.cuda.is_available() and not training_args.use_cpu else None

    trainer = RealignTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=PairCollator(tokenizer.pad_token_id, pad_multiple),
        realign_args=realign_args,
        language_codes=codes,
        sampling_probs=sampling_probs,
    )
    train_metrics, eval_metrics = {}, {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
        trainer.save_encoder()
        train_metrics = dict(train_result.metrics, train_pairs=len(train_dataset))
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if training_args.should_save:
        write_realign_config(trainer, settings, subset_info, pair_stats, train_metrics, eval_metrics)
        write_model_card(trainer, settings, subset_info, eval_metrics)
    return {**train_metrics, **eval_metrics}


if __name__ == "__main__":
    main()
