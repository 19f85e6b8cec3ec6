"""--alignment word (word_alignment.py, realign_extensions.py): word splitting, word → sub-word spans on crafted input,
span pooling, eflomal extraction and its cache, and an end-to-end run; the default sentence path keeps its columns."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import run_realign
import word_alignment
from realign_extensions import ExtensionArguments, RealignExtensions
from realign_losses import word_pair_vectors
from run_realign import PairCollator
from word_alignment import extract_word_links, is_word, split_words, word_token_spans


def word_extensions(**kwargs) -> RealignExtensions:
    return RealignExtensions(ExtensionArguments(alignment="word", **kwargs), -1, 0.1, "positive")


EN = "The child reads a book."
FR = "L'enfant lit un livre."


def words_of(text: str) -> list[str]:
    return [text[a:b] for a, b in split_words(text)]


def test_split_words_keeps_combining_marks_and_splits_punctuation():
    assert words_of(EN) == ["The", "child", "reads", "a", "book", "."]
    assert words_of(FR) == ["L", "'", "enfant", "lit", "un", "livre", "."]
    # Yoruba with combining tone marks and Hindi with vowel signs stay whole words (plain \w would cut them).
    assert words_of("Olùkọ́ kọ̀wé sí pátákó.") == ["Olùkọ́", "kọ̀wé", "sí", "pátákó", "."]
    assert words_of("हिन्दी भाषा है।") == ["हिन्दी", "भाषा", "है", "।"]
    # The documented limitation: scripts without spaces give one "word" per run of text.
    assert words_of("我爱我的家人。") == ["我爱我的家人", "。"]
    assert is_word("enfant") and not is_word("'") and not is_word("।")


def tokens_of_words(tokenizer, text: str) -> list[list[str]]:
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    skip = set(tokenizer.all_special_ids) | ({run_realign._standalone_space_id(tokenizer, quiet=True)} - {None})
    spans = word_token_spans(text, ids, encoded["offset_mapping"], skip, len(ids))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return [pieces[a:b] if a >= 0 else [] for a, b in spans]


def test_word_token_spans_bert(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    by_word = tokens_of_words(tokenizer, EN)
    assert by_word == [["The"], ["ch", "##il", "##d"], ["re", "##ad", "##s"], ["a"], ["boo", "##k"], ["."]]
    assert tokens_of_words(tokenizer, FR)[2] == ["en", "##fan", "##t"]


def test_word_token_spans_xlmr_skip_standalone_space(tiny_xlmr):
    tokenizer = AutoTokenizer.from_pretrained(tiny_xlmr)
    encoded = tokenizer(EN)
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert "▁" in pieces  # this tokenizer writes "reads" as "▁", "read", "s": the lone "▁" is nobody's first sub-word
    by_word = tokens_of_words(tokenizer, EN)
    assert by_word[2] == ["read", "s"] and by_word[1] == ["▁chi", "ld"]
    # "L'enfant" is one token "▁L'e" then "n", "fan", "t": a token belongs to the word its first character is in.
    fr = tokens_of_words(tokenizer, FR)
    assert fr[0] == ["▁L'e"] and fr[1] == [] and fr[2] == ["n", "fan", "t"]


def test_truncated_words_lose_their_span(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    encoded = tokenizer(EN, return_offsets_mapping=True)
    spans = word_token_spans(EN, encoded["input_ids"], encoded["offset_mapping"], set(), 6)
    # [CLS] The ch ##il ##d re | ##ad ##s ...: "reads" crosses the limit.
    assert spans[:3] == [(1, 2), (2, 5), (-1, -1)]


def test_tokenize_pairs_maps_links_to_subword_spans(tiny_bert, tmp_path):
    """Crafted links child↔enfant (1, 2) and book↔livre (4, 5) become the right token spans; punctuation-free."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    data = datasets.Dataset.from_dict({"src": [EN], "tgt": [FR], "word_links": [[[1, 2], [4, 5], [9, 9]]]})
    extensions = word_extensions()
    tokenized, counts = run_realign.tokenize_pairs(
        data,
        "fra",
        tokenizer,
        run_realign.DataArguments(languages="fra"),
        run_realign.RealignArguments(),
        str(tmp_path),
        "x",
        extensions=extensions,
        alignment_digest="crafted",
    )
    row = tokenized[0]
    src, tgt = (
        tokenizer.convert_ids_to_tokens(row["src_input_ids"]),
        tokenizer.convert_ids_to_tokens(row["tgt_input_ids"]),
    )
    spans = row["word_spans"]
    assert len(spans) == 2  # the out-of-range link (9, 9) is dropped
    (s0, s1, t0, t1), (u0, u1, v0, v1) = spans
    assert (src[s0:s1], tgt[t0:t1]) == (["ch", "##il", "##d"], ["en", "##fan", "##t"])
    assert (src[u0:u1], tgt[v0:v1]) == (["boo", "##k"], ["li", "##vre"])
    assert counts["kept"] == 1

    collator = PairCollator(tokenizer.pad_token_id, extra_columns=extensions.collate)
    batch = collator([dict(row, lang_id=0), dict(row, lang_id=0)])
    assert batch["word_spans"].tolist() == [[0, *spans[0]], [0, *spans[1]], [1, *spans[0]], [1, *spans[1]]]


def test_default_path_has_no_word_columns(tiny_bert, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    data = datasets.Dataset.from_dict({"src": [EN], "tgt": [FR]})
    args = run_realign.RealignArguments()
    tokenized, _ = run_realign.tokenize_pairs(
        data, "fra", tokenizer, run_realign.DataArguments(languages="fra"), args, str(tmp_path), "x"
    )
    assert sorted(tokenized.column_names) == [
        "meaning_key",
        "src_input_ids",
        "src_n_words",
        "tgt_input_ids",
        "tgt_n_words",
    ]
    default = RealignExtensions(ExtensionArguments(), -1, 0.1, "positive")
    assert default.cache_key(None) == [] and default.loss_terms(tokenizer, None, None) == {}
    batch = PairCollator(tokenizer.pad_token_id, extra_columns=default.collate)([dict(tokenized[0], lang_id=0)] * 2)
    assert sorted(batch) == ["attention_mask", "input_ids", "lang_id", "meaning_key", "n_words"]


def test_word_pair_vectors_first_and_mean():
    hidden = torch.arange(2 * 2 * 5 * 1, dtype=torch.float).reshape(4, 5, 1)  # 2 pairs: rows 0-1 English, 2-3 French
    spans = torch.tensor([[0, 1, 3, 2, 5], [1, 2, 3, 1, 2]])  # pair, en start, en end, fr start, fr end
    src, tgt = word_pair_vectors(hidden, spans, n_pairs=2, pooling="first")
    assert src[:, 0].tolist() == [hidden[0, 1, 0].item(), hidden[1, 2, 0].item()]
    assert tgt[:, 0].tolist() == [hidden[2, 2, 0].item(), hidden[3, 1, 0].item()]
    src, tgt = word_pair_vectors(hidden, spans, n_pairs=2, pooling="mean")
    assert src[:, 0].tolist() == pytest.approx([hidden[0, 1:3, 0].mean().item(), hidden[1, 2, 0].item()])
    assert tgt[:, 0].tolist() == pytest.approx([hidden[2, 2:5, 0].mean().item(), hidden[3, 1, 0].item()])


def test_eflomal_links_are_one_to_one_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("eflomal")
    from conftest import PARALLEL

    src, tgt = [r[0] for r in PARALLEL] * 4, [r[1] for r in PARALLEL] * 4
    links, key = extract_word_links(src, tgt, "eflomal", tmp_path, "fra")
    assert len(links) == len(src) and sum(map(len, links)) > len(src)  # more than one link per pair on average
    for row, en, fr in zip(links, src, tgt):
        en_words, fr_words = words_of(en), words_of(fr)
        assert len({i for i, _ in row}) == len(row) == len({j for _, j in row})  # one-to-one
        assert all(is_word(en_words[i]) and is_word(fr_words[j]) for i, j in row)

    def no_aligner(*args, **kwargs):
        raise AssertionError("the aligner ran again instead of reading the cache")

    monkeypatch.setattr(word_alignment, "run_eflomal", no_aligner)
    assert extract_word_links(src, tgt, "eflomal", tmp_path, "fra") == (links, key)
    with pytest.raises(AssertionError, match="ran again"):  # other text, other key
        extract_word_links(src[:-1], tgt[:-1], "eflomal", tmp_path, "fra")


def test_word_alignment_end_to_end(tiny_xlmr, parallel_dirs, tmp_path):
    pytest.importorskip("eflomal")
    from test_run_realign import logged_losses, realign_argv

    out = tmp_path / "out"
    metrics = run_realign.main(
        realign_argv(
            tiny_xlmr,
            parallel_dirs,
            out,
            "--alignment",
            "word",
            "--subword_pooling",
            "mean",
            "--max_steps",
            "16",
            "--logging_steps",
            "4",
            "--save_steps",
            "100",
        )
    )
    losses = logged_losses(out)
    assert losses[-1] < losses[0], losses
    state = json.loads((out / "trainer_state.json").read_text())
    aligned = [e["train_aligned_words"] for e in state["log_history"] if "train_aligned_words" in e]
    assert aligned and min(aligned) > 8  # several aligned words per batch of 8 pairs
    assert "eval_loss" in metrics and "eval_avg_retrieval_acc" in metrics
    config = json.loads((out / run_realign.CONFIG_FILE).read_text())
    assert config["loss"]["alignment"] == "word" and config["loss"]["subword_pooling"] == "mean"
    AutoModel.from_pretrained(out)
    cache = Path(out.parent / "cache" / "realign_word_alignments")
    assert len(list(cache.glob("eflomal-*.txt"))) == 3  # once per language


def test_bad_alignment_options(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="--alignment must be"):
        ExtensionArguments(alignment="phrase")
    with pytest.raises(ValueError, match="--subword_pooling"):
        ExtensionArguments(alignment="word", subword_pooling="last")
    argv = [
        "--model_name_or_path",
        tiny_bert,
        "--languages",
        "fra",
        "--output_dir",
        str(tmp_path / "out"),
        "--alignment",
        "word",
    ]
    with pytest.raises(ValueError, match="--gather_negatives and --length_buckets work with --alignment sentence"):
        run_realign.parse_realign_args([*argv, "--gather_negatives"])


def test_only_the_capped_pairs_are_aligned(tiny_bert, parallel_dirs, tmp_path, monkeypatch):
    seen = []

    def fake_links(src, tgt, aligner, cache_root, desc=""):
        seen.append(len(src))
        return [[[0, 0]] for _ in src], f"fake-{len(src)}"

    monkeypatch.setattr(word_alignment, "extract_word_links", fake_links)
    argv = [
        "--model_name_or_path",
        tiny_bert,
        "--languages",
        "fra,yor",
        "--parallel_data_dir",
        str(parallel_dirs["train"]),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "1",
        "--use_cpu",
        "--alignment",
        "word",
        "--max_pairs_per_language",
        "5",
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    run_realign.main(argv)
    assert seen == [5, 5]  # not the 18 pairs of each file
    config = json.loads((tmp_path / "out" / run_realign.CONFIG_FILE).read_text())
    assert config["pair_counts"]["fra"]["used"] == 5
