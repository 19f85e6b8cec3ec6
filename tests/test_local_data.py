"""The --data_dir loaders on the quirks of the real files, reproduced on synthetic text.

Each quirk below was found by reading the public copies of the datasets (UD treebanks, MasakhaPOS, MasakhaNER 2.0,
AmericasNLI, IndoNLI, Myanmar-XNLI, SIB-200) through the scripts' own local path (docs/real_data.md); the fixtures
copy the shape of the quirk, never the real text.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fixtures_downstream import (
    NLI_LABELS,
    UDPOS_TAGS,
    WIKIANN_TAGS,
    write_jsonl,
)

import realign_utils
import run_token_classification as rtc
import run_xnli

pytestmark = pytest.mark.usefixtures("single_thread")


def conllu_word(index: int, form: str, upos: str) -> str:
    return f"{index}\t{form}\t{form.lower()}\t{upos}\t_\t_\t{max(0, index - 1)}\tdep\t_\t_"


def load_tagging(task: str, source: str, language: str, config: str, data_dir: Path):
    data_args = rtc.DataArguments(task=task, data_dir=str(data_dir), eval_languages=language)
    model_args = rtc.ModelArguments(model_name_or_path="unused")
    labels = list(UDPOS_TAGS) if task == "pos" else list(WIKIANN_TAGS)
    return rtc.load_eval_data([realign_utils.EvalTarget(source, language, config)], labels, data_args, model_args)


# -- where the files are ------------------------------------------------------------------------------------------------


def test_ud_and_dev_file_names_are_found(tmp_path):
    """UD treebanks name their files <treebank>-ud-<split>.conllu, and UD, MasakhaPOS / MasakhaNER and SIB-200 call
    the validation split `dev`: a folder copied from those repositories is read as it is."""
    folder = tmp_path / "udpos" / "fr"
    folder.mkdir(parents=True)
    (folder / "fr_xyz-ud-test.conllu").write_text(conllu_word(1, "Bonjour", "INTJ") + "\n\n", encoding="utf-8")
    (folder / "fr_xyz-ud-dev.conllu").write_text(conllu_word(1, "Salut", "INTJ") + "\n\n", encoding="utf-8")
    exts = (".parquet", ".conllu")
    assert (
        realign_utils.find_local_split(str(tmp_path), "udpos", "fr", "test", exts) == folder / "fr_xyz-ud-test.conllu"
    )
    assert (
        realign_utils.find_local_split(str(tmp_path), "udpos", "fr", "validation", exts)
        == folder / "fr_xyz-ud-dev.conllu"
    )
    (tmp_path / "sib200" / "yor_Latn").mkdir(parents=True)
    (tmp_path / "sib200" / "yor_Latn" / "dev.tsv").write_text("index_id\tcategory\ttext\n", encoding="utf-8")
    assert (
        realign_utils.find_local_split(str(tmp_path), "sib200", "yor_Latn", "validation", (".tsv",)).name == "dev.tsv"
    )
    # Two treebanks of one language: say how to combine them rather than pick one.
    (folder / "fr_abc-ud-test.conllu").write_text(conllu_word(1, "Oui", "INTJ") + "\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"several files for split 'test'.*fr_abc-ud-test.conllu.*cat "):
        realign_utils.find_local_split(str(tmp_path), "udpos", "fr", "test", exts)
    # A file that is absent is a MissingLocalSplit (a FileNotFoundError), naming what was looked for.
    with pytest.raises(realign_utils.MissingLocalSplit, match=r"No local udpos file for config 'de'") as err:
        realign_utils.find_local_split(str(tmp_path), "udpos", "de", "test", exts)
    assert isinstance(err.value, FileNotFoundError) and err.value.expected.endswith("udpos/de/test{.parquet,.conllu}")


# -- CoNLL-U -------------------------------------------------------------------------------------------------------------


def test_conllu_quirks(tmp_path):
    """Byte-order mark, CRLF, whitespace-only and repeated blank lines, multi-word tokens (1-2), empty nodes (2.1),
    a FORM holding a space (UD Vietnamese and French write 'Hà Nội' / '2 001' as one word), a sentence of comments
    only, and no final blank line."""
    lines = [
        "# sent_id = a",
        "# text = Dulac et la ville",
        "1-2\tDulac\t_\t_\t_\t_\t_\t_\t_\t_",
        conllu_word(1, "Du", "ADP"),
        conllu_word(2, "lac", "NOUN"),
        "2.1\tvu\tvoir\tVERB\t_\t_\t_\t_\t1:dep\t_",
        conllu_word(3, "Thanh Hoa", "PROPN"),
        "   ",
        "",
        "# sent_id = only-comments",
        "",
        "",
        "# sent_id = b",
        conllu_word(1, "Kiri", "NOUN"),
        conllu_word(2, "12 500", "NUM"),
    ]
    path = tmp_path / "test.conllu"
    path.write_bytes(("\ufeff" + "\r\n".join(lines)).encode("utf-8"))
    dataset = rtc.read_conllu(path, "pos_tags")
    assert dataset["tokens"] == [["Du", "lac", "Thanh Hoa"], ["Kiri", "12 500"]]
    assert dataset["pos_tags"] == [["ADP", "NOUN", "PROPN"], ["NOUN", "NUM"]]


def test_conllu_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "test.conllu"
    path.write_bytes(
        conllu_word(1, "ok", "NOUN").encode() + b"\n" + conllu_word(2, "caf\xe9", "NOUN").encode("latin-1") + b"\n"
    )
    with pytest.raises(ValueError, match=r"test.conllu:2: not valid UTF-8"):
        rtc.read_conllu(path, "pos_tags")
    path.write_text(conllu_word(1, "ok", "NOUN") + "\n1 two spaces NOUN\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"test.conllu:2: 1 tab-separated fields"):
        rtc.read_conllu(path, "pos_tags")


def test_a_word_holding_a_space_is_labelled_once(tiny_xlmr):
    """'Thanh Hoa' is one UD word: its pieces share one word id, and only the first carries the label."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_xlmr)
    batch = {"tokens": [["The", "Thanh Hoa", "river"]], "pos_tags": [[5, 11, 7]]}
    out = rtc.tokenize_and_align_labels(batch, tokenizer, "pos_tags", max_length=64)
    assert [label for label in out["labels"][0] if label != -100] == [5, 11, 7]
    assert out["unscored_words"] == [0]


# -- MasakhaPOS / MasakhaNER "token TAG" text ---------------------------------------------------------------------------


def test_token_tag_text_quirks(tmp_path, caplog):
    """Tab or space separators, trailing whitespace, CRLF, a byte-order mark, repeated and whitespace-only blank
    lines, a token holding a space, and a line with a tag but no token (MasakhaNER 2.0 xho train has two: ' O'),
    which is left out with one warning naming its lines."""
    text = "\ufeffAda B-PER\r\nLovelace\tI-PER  \r\nwent O\r\n \r\n\r\n\r\nNew York B-LOC\r\n O\r\nsleeps O\r\n"
    path = tmp_path / "test.txt"
    path.write_bytes(text.encode("utf-8"))
    with caplog.at_level(logging.WARNING):
        dataset = rtc.read_token_tag_lines(path, "ner_tags")
    assert dataset["tokens"] == [["Ada", "Lovelace", "went"], ["New York", "sleeps"]]
    assert dataset["ner_tags"] == [["B-PER", "I-PER", "O"], ["B-LOC", "O"]]
    assert dataset["id"] == ["0", "1"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "test.txt" in warnings[0] and "line 8" in warnings[0]


def test_token_tag_text_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "test.txt"
    path.write_bytes(b"ok NOUN\ncaf\xe9 NOUN\n")
    with pytest.raises(ValueError, match=r"test.txt:2: not valid UTF-8"):
        rtc.read_token_tag_lines(path, "upos")
    path.write_text("ok NOUN\nlonely\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"test.txt:2: expected 'token TAG'"):
        rtc.read_token_tag_lines(path, "upos")


# -- TSV (AfriXNLI, AmericasNLI, Myanmar-XNLI, SIB-200) -------------------------------------------------------------


def test_tsv_byte_order_mark_and_invalid_utf8(tmp_path):
    path = tmp_path / "test.tsv"
    path.write_bytes("\ufeffpremise\thypothesis\tlabel\r\na\tb\tneutral\r\n".encode("utf-8"))
    dataset = realign_utils.read_local_table(path)
    assert dataset.column_names == ["premise", "hypothesis", "label"] and dataset[0]["label"] == "neutral"
    path.write_bytes(b"premise\thypothesis\tlabel\na\tb\t0\ncaf\xe9\tb\t1\n")
    with pytest.raises(ValueError, match=r"test.tsv:3: not valid UTF-8"):
        realign_utils.read_local_table(path)


# -- labels ---------------------------------------------------------------------------------------------------------------


def test_indonli_raw_labels_are_read(tmp_path):
    """IndoNLI's own JSON lines (GitHub ir-nlp-csui/indonli) write the labels as e / n / c."""
    rows = [{"pair_id": i, "premise": f"p{i}", "hypothesis": f"h{i}", "label": label} for i, label in enumerate("enc")]
    write_jsonl(tmp_path / "indonli" / "indonli" / "test_expert.jsonl", rows)
    data_args = run_xnli.DataArguments(data_dir=str(tmp_path), eval_languages="ind")
    model_args = run_xnli.ModelArguments(model_name_or_path="unused")
    (eval_set,) = run_xnli.load_eval_data(
        [realign_utils.EvalTarget("indonli", "ind", "indonli")], list(NLI_LABELS), data_args, model_args
    )
    assert eval_set.dataset["label"] == [0, 1, 2]
