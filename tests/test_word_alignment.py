"""--alignment word of run_realign.py: word splitting, word → sub-word spans on crafted input, span pooling, eflomal
extraction and its cache, and an end-to-end run; the default sentence path keeps its columns and collator."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import run_realign
from run_realign import PairCollator, RealignCollator, word_pair_vectors

EN = "The child reads a book."
FR = "L'enfant lit un livre."


def words_of(text: str) -> list[str]:
    return [text[a:b] for a, b in run_realign.split_words(text)]


def test_split_words_keeps_combining_marks_and_splits_punctuation():
    assert words_of(EN) == ["The", "child", "reads", "a", "book", "."]
    assert words_of(FR) == ["L", "'", "enfant", "lit", "un", "livre", "."]
    # Yoruba with combining tone marks and Hindi with vowel signs stay whole words (plain \w would cut them).
    assert words_of("Olùkọ́ kọ̀wé sí pátákó.") == ["Olùkọ́", "kọ̀wé", "sí", "pátákó", "."]
    assert words_of("हिन्दी भाषा है।") == ["हिन्दी", "भाषा", "है", "।"]
    # The documented limitation: scripts without spaces give one "word" per run of text.
    assert words_of("我爱我的家人。") == ["我爱我的家人", "。"]
    assert run_realign.is_word("enfant") and not run_realign.is_word("'") and not run_realign.is_word("।")


def tokens_of_words(tokenizer, text: str) -> list[list[str]]:
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    skip = set(tokenizer.all_special_ids) | ({run_realign._standalone_space_id(tokenizer, quiet=True)} - {None})
    spans = run_realign.word_token_spans(text, ids, encoded["offset_mapping"], skip, len(ids))
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
    spans = run_realign.word_token_spans(EN, encoded["input_ids"], encoded["offset_mapping"], set(), 6)
    # [CLS] The ch ##il ##d re | ##ad ##s ...: "reads" crosses the limit.
    assert spans[:3] == [(1, 2), (2, 5), (-1, -1)]


def test_tokenize_pairs_maps_links_to_subword_spans(tiny_bert, tmp_path):
    """Crafted links child↔enfant (1, 2) and book↔livre (4, 5) become the right token spans; punctuation-free."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    data = datasets.Dataset.from_dict({"src": [EN], "tgt": [FR], "word_links": [[[1, 2], [4, 5], [9, 9]]]})
    args = run_realign.RealignArguments(alignment="word")
    tokenized, counts = run_realign.tokenize_pairs(
        data, "fra", tokenizer, run_realign.DataArguments(languages="fra"), args, str(tmp_path), "x"
    )
    row = tokenized[0]
    src, tgt = tokenizer.convert_ids_to_tokens(row["src_input_ids"]), tokenizer.convert_ids_to_tokens(row["tgt_input_ids"])
    spans = row["word_spans"]
    assert len(spans) == 2  # the out-of-range link (9, 9) is dropped
    (s0, s1, t0, t1), (u0, u1, v0, v1) = spans
    assert (src[s0:s1], tgt[t0:t1]) == (["ch", "##il", "##d"], ["en", "##fan", "##t"])
    assert (src[u0:u1], tgt[v0:v1]) == (["boo", "##k"], ["li", "##vre"])
    assert counts["kept"] == 1

    collator = RealignCollator(tokenizer.pad_token_id, word_spans=True)
    batch = collator([dict(row, lang_id=0), dict(row, lang_id=0)])
    assert batch["word_spans"].tolist() == [[0, *spans[0]], [0, *spans[1]], [1, *spans[0]], [1, *spans[1]]]


def test_default_path_has_no_word_columns(tiny_bert, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    data = datasets.Dataset.from_dict({"src": [EN], "tgt": [FR]})
    args = run_realign.RealignArguments()
    tokenized, _ = run_realign.tokenize_pairs(
        data, "fra", tokenizer, run_realign.DataArguments(languages="fra"), args, str(tmp_path), "x"
    )
    assert sorted(tokenized.column_names) == ["meaning_key", "src_input_ids", "src_n_words", "tgt_input_ids", "tgt_n_words"]
    assert type(run_realign.make_collator(tokenizer, args, None)) is PairCollator
    word = run_realign.RealignArguments(alignment="word")
    assert isinstance(run_realign.make_collator(tokenizer, word, None), RealignCollator)


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
    links, key = run_realign.extract_word_links(src, tgt, "eflomal", tmp_path, "fra")
    assert len(links) == len(src) and sum(map(len, links)) > len(src)  # more than one link per pair on average
    for row, en, fr in zip(links, src, tgt):
        en_words, fr_words = words_of(en), words_of(fr)
        assert len({i for i, _ in row}) == len(row) == len({j for _, j in row})  # one-to-one
        assert all(run_realign.is_word(en_words[i]) and run_realign.is_word(fr_words[j]) for i, j in row)

    def no_aligner(*args, **kwargs):
        raise AssertionError("the aligner ran again instead of reading the cache")

    monkeypatch.setattr(run_realign, "_run_eflomal", no_aligner)
    assert run_realign.extract_word_links(src, tgt, "eflomal", tmp_path, "fra") == (links, key)
    with pytest.raises(AssertionError, match="ran again"):  # other text, other key
        run_realign.extract_word_links(src[:-1], tgt[:-1], "eflomal", tmp_path, "fra")


def test_word_alignment_end_to_end(tiny_xlmr, parallel_dirs, tmp_path):
    pytest.importorskip("eflomal")
    from test_run_realign import logged_losses, realign_argv

    out = tmp_path / "out"
    metrics = run_realign.main(realign_argv(tiny_xlmr, parallel_dirs, out, "--alignment", "word", "--word_pooling",
                                            "mean", "--max_steps", "16", "--logging_steps", "4", "--save_steps", "100"))
    losses = logged_losses(out)
    assert losses[-1] < losses[0], losses
    state = json.loads((out / "trainer_state.json").read_text())
    aligned = [e["train_aligned_words"] for e in state["log_history"] if "train_aligned_words" in e]
    assert aligned and min(aligned) > 8  # several aligned words per batch of 8 pairs
    assert "eval_loss" in metrics and "eval_avg_retrieval_acc" in metrics
    config = json.loads((out / run_realign.CONFIG_FILE).read_text())
    assert config["loss"]["alignment"] == "word" and config["loss"]["word_pooling"] == "mean"
    AutoModel.from_pretrained(out)
    cache = Path(out.parent / "cache" / "realign_word_alignments")
    assert len(list(cache.glob("eflomal-*.txt"))) == 3  # once per language


def test_bad_alignment_options():
    with pytest.raises(ValueError, match="--alignment must be"):
        run_realign.RealignArguments(alignment="phrase")
    with pytest.raises(ValueError, match="--word_pooling"):
        run_realign.RealignArguments(alignment="word", word_pooling="last")
    with pytest.raises(ValueError, match="--gather_negatives works with --alignment sentence"):
        run_realign.RealignArguments(alignment="word", gather_negatives=True)


def test_only_the_capped_pairs_are_aligned(tiny_bert, parallel_dirs, tmp_path, monkeypatch):
    seen = []

    def fake_links(src, tgt, aligner, cache_root, desc=""):
        seen.append(len(src))
        return [[[0, 0]] for _ in src], f"fake-{len(src)}"

    monkeypatch.setattr(run_realign, "extract_word_links", fake_links)
    argv = ["--model_name_or_path", tiny_bert, "--languages", "fra,yor", "--parallel_data_dir",
            str(parallel_dirs["train"]), "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--use_cpu",
            "--alignment", "word", "--max_pairs_per_language", "5", "--cache_dir", str(tmp_path / "cache")]
    run_realign.main(argv)
    assert seen == [5, 5]  # not the 18 pairs of each file
    config = json.loads((tmp_path / "out" / run_realign.CONFIG_FILE).read_text())
    assert config["pair_counts"]["fra"]["used"] == 5
