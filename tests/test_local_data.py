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
    nli_rows,
    write_jsonl,
    write_masakhaner,
    write_nli_parquet,
    write_udpos,
    write_wikiann,
)

import downstream_utils
import run_token_classification as rtc
import run_xnli

pytestmark = pytest.mark.usefixtures("single_thread")


def conllu_word(index: int, form: str, upos: str) -> str:
    return f"{index}\t{form}\t{form.lower()}\t{upos}\t_\t_\t{max(0, index - 1)}\tdep\t_\t_"


def load_tagging(task: str, source: str, language: str, config: str, data_dir: Path):
    data_args = rtc.DataArguments(task=task, data_dir=str(data_dir), eval_languages=language)
    model_args = rtc.ModelArguments(model_name_or_path="unused")
    labels = list(UDPOS_TAGS) if task == "pos" else list(WIKIANN_TAGS)
    return rtc.load_eval_data([downstream_utils.EvalTarget(source, language, config)], labels, data_args, model_args)


# -- where the files are ----------------------------------------------------------------------------------------------


def test_ud_and_dev_file_names_are_found(tmp_path):
    """UD treebanks name their files <treebank>-ud-<split>.conllu, and UD, MasakhaPOS / MasakhaNER and SIB-200 call
    the validation split `dev`: a folder copied from those repositories is read as it is."""
    folder = tmp_path / "udpos" / "fr"
    folder.mkdir(parents=True)
    (folder / "fr_xyz-ud-test.conllu").write_text(conllu_word(1, "Bonjour", "INTJ") + "\n\n", encoding="utf-8")
    (folder / "fr_xyz-ud-dev.conllu").write_text(conllu_word(1, "Salut", "INTJ") + "\n\n", encoding="utf-8")
    exts = (".parquet", ".conllu")
    assert (
        downstream_utils.find_local_split(str(tmp_path), "udpos", "fr", "test", exts)
        == folder / "fr_xyz-ud-test.conllu"
    )
    assert (
        downstream_utils.find_local_split(str(tmp_path), "udpos", "fr", "validation", exts)
        == folder / "fr_xyz-ud-dev.conllu"
    )
    (tmp_path / "sib200" / "yor_Latn").mkdir(parents=True)
    (tmp_path / "sib200" / "yor_Latn" / "dev.tsv").write_text("index_id\tcategory\ttext\n", encoding="utf-8")
    assert (
        downstream_utils.find_local_split(str(tmp_path), "sib200", "yor_Latn", "validation", (".tsv",)).name
        == "dev.tsv"
    )
    # Two treebanks of one language: say how to combine them rather than pick one.
    (folder / "fr_abc-ud-test.conllu").write_text(conllu_word(1, "Oui", "INTJ") + "\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"several files for split 'test'.*fr_abc-ud-test.conllu.*cat "):
        downstream_utils.find_local_split(str(tmp_path), "udpos", "fr", "test", exts)
    # A file that is absent is a MissingLocalSplit (a FileNotFoundError), naming what was looked for.
    with pytest.raises(downstream_utils.MissingLocalSplit, match=r"No local udpos file for config 'de'") as err:
        downstream_utils.find_local_split(str(tmp_path), "udpos", "de", "test", exts)
    assert isinstance(err.value, FileNotFoundError) and err.value.expected.endswith("udpos/de/test{.parquet,.conllu}")


# -- CoNLL-U ----------------------------------------------------------------------------------------------------------


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


# -- MasakhaPOS / MasakhaNER "token TAG" text -------------------------------------------------------------------------


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
    dataset = downstream_utils.read_local_table(path)
    assert dataset.column_names == ["premise", "hypothesis", "label"] and dataset[0]["label"] == "neutral"
    path.write_bytes(b"premise\thypothesis\tlabel\na\tb\t0\ncaf\xe9\tb\t1\n")
    with pytest.raises(ValueError, match=r"test.tsv:3: not valid UTF-8"):
        downstream_utils.read_local_table(path)


# -- labels -----------------------------------------------------------------------------------------------------------


def test_indonli_raw_labels_are_read(tmp_path):
    """IndoNLI's own JSON lines (GitHub ir-nlp-csui/indonli) write the labels as e / n / c."""
    rows = [{"pair_id": i, "premise": f"p{i}", "hypothesis": f"h{i}", "label": label} for i, label in enumerate("enc")]
    write_jsonl(tmp_path / "indonli" / "indonli" / "test_expert.jsonl", rows)
    data_args = run_xnli.DataArguments(data_dir=str(tmp_path), eval_languages="ind")
    model_args = run_xnli.ModelArguments(model_name_or_path="unused")
    (eval_set,) = run_xnli.load_eval_data(
        [downstream_utils.EvalTarget("indonli", "ind", "indonli")], list(NLI_LABELS), data_args, model_args
    )
    assert eval_set.dataset["label"] == [0, 1, 2]


def test_masakhaner_date_mapping_is_counted_per_language(tmp_path, caplog):
    write_masakhaner(tmp_path, "yor", 3)  # sentence 0 holds one B-DATE and one I-DATE
    write_masakhaner(tmp_path, "hau", 3)  # no DATE
    with caplog.at_level(logging.INFO, logger="downstream_utils"):
        load_tagging("ner", "masakhaner", "yor", "yor", tmp_path)
        load_tagging("ner", "masakhaner", "hau", "hau", tmp_path)
    messages = [r.getMessage() for r in caplog.records if "mapped" in r.getMessage()]
    assert len(messages) == 2
    assert "yor" in messages[0] and "2 label(s) mapped" in messages[0] and "B-DATE -> O: 1" in messages[0]
    assert "I-DATE -> O: 1" in messages[0]
    assert "hau" in messages[1] and "0 label(s) mapped" in messages[1]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_tokens_and_tags_of_different_length(tmp_path, fmt):
    """A file whose tag list is shorter (or longer) than its token list: before, an IndexError deep in tokenisation
    (or silently ignored tags); now an error naming the file and the example."""
    tokens, tags = [["Kofi", "lives", "here"], ["Ama", "sings"]], [[1, 0, 0], [1]]
    if fmt == "jsonl":
        write_jsonl(
            tmp_path / "wikiann" / "yo" / "test.jsonl", [{"tokens": t, "ner_tags": g} for t, g in zip(tokens, tags)]
        )
    else:
        from datasets import Dataset

        path = tmp_path / "wikiann" / "yo" / "test.parquet"
        path.parent.mkdir(parents=True)
        Dataset.from_dict({"id": ["s0", "s1"], "tokens": tokens, "ner_tags": tags}).to_parquet(str(path))
    expected = r"example 2 \(id 's1'\)" if fmt == "parquet" else r"example 2"
    with pytest.raises(ValueError, match=rf"yo/test.{fmt}: {expected} has 2 tokens but 1 ner_tags"):
        load_tagging("ner", "wikiann", "yor", "yo", tmp_path)


# -- absent files are skipped, malformed ones are not (--data_dir) --------------------------------------------------


def tagging_dir(root: Path) -> Path:
    write_udpos(root, "udpos", "en", "train", 8, "eng")
    write_udpos(root, "udpos", "en", "test", 2, "eng")
    write_udpos(root, "udpos", "fr", "test", 2, "fra")
    return root


def tc_argv(task: str, model: str, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--task",
        task,
        "--model_name_or_path",
        model,
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--use_cpu",
        "--cache_dir",
        str(out.parent / "cache"),
        "--results_file",
        "none",
        *extra,
    ]


@pytest.fixture
def utils_log():
    """The records of the downstream_utils logger (the scripts' setup_logging replaces the root handlers caplog
    uses)."""

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    handler = Collect()
    logging.getLogger("downstream_utils").addHandler(handler)
    yield handler
    logging.getLogger("downstream_utils").removeHandler(handler)


def skipped_warnings(log) -> list[str]:
    return [
        r.getMessage()
        for r in log.records
        if r.levelno == logging.WARNING and "skipped" in r.getMessage() and "--data_dir" in r.getMessage()
    ]


def test_absent_local_files_are_skipped_with_one_warning(tiny_bert, tmp_path, utils_log):
    """Issue 12: `wol` with no UDPOS wo file (and no MasakhaPOS files at all) used to abort the run."""
    data = tagging_dir(tmp_path / "data")
    metrics = rtc.main(tc_argv("pos", tiny_bert, data, tmp_path / "pos", "--eval_languages", "wol,fra,deu"))
    assert {k for k in metrics if k.endswith("_samples") and k.startswith("eval_")} == {
        "eval_udpos_eng_samples",
        "eval_udpos_fra_samples",
    }
    (warning,) = skipped_warnings(utils_log)
    for pair in ("udpos/wol", "udpos/deu", "masakhapos/wol"):
        assert pair in warning
    assert "udpos/fra" not in warning and str(data / "udpos" / "wo" / "test") in warning


def test_absent_training_file_or_no_evaluation_file_at_all_is_an_error(tiny_bert, tmp_path):
    data = tagging_dir(tmp_path / "data")
    (data / "udpos" / "en" / "train.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"No local udpos file for config 'en', split 'train'"):
        rtc.main(tc_argv("pos", tiny_bert, data, tmp_path / "a", "--eval_languages", "fra"))
    data = tagging_dir(tmp_path / "data2")
    for path in (data / "udpos" / "en" / "test.parquet", data / "udpos" / "fr" / "test.parquet"):
        path.unlink()
    with pytest.raises(ValueError, match=r"No evaluation file under --data_dir.*udpos/eng.*udpos/fra"):
        rtc.main(tc_argv("pos", tiny_bert, data, tmp_path / "b", "--eval_languages", "fra"))
    assert not (tmp_path / "b").exists()


def test_malformed_local_file_is_still_an_error(tiny_bert, tmp_path):
    data = tagging_dir(tmp_path / "data")
    (data / "udpos" / "wo").mkdir(parents=True)
    (data / "udpos" / "wo" / "test.conllu").write_text("1\tonly three\tfields\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"wo/test.conllu:1: 3 tab-separated fields"):
        rtc.main(tc_argv("pos", tiny_bert, data, tmp_path / "pos", "--eval_languages", "wol,fra"))


def test_absent_nli_files_are_skipped_with_one_warning(tiny_bert, tmp_path, utils_log):
    """Issue 12: `fra` pulls afrixnli/fra and `swa` pulls afrixnli/swa; with only XNLI files both used to abort."""
    data = tmp_path / "data"
    write_nli_parquet(data / "xnli" / "en" / "train.parquet", nli_rows("eng", 8))
    write_nli_parquet(data / "xnli" / "en" / "test.parquet", nli_rows("eng", 2))
    write_nli_parquet(data / "xnli" / "fr" / "test.parquet", nli_rows("fra", 2))
    argv = [
        "--model_name_or_path",
        tiny_bert,
        "--data_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "nli"),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--use_cpu",
        "--results_file",
        "none",
        "--cache_dir",
        str(tmp_path / "cache"),
        "--eval_languages",
        "fra,swa",
    ]
    metrics = run_xnli.main(argv)
    assert {k for k in metrics if k.endswith("_samples") and k.startswith("eval_")} == {
        "eval_xnli_eng_samples",
        "eval_xnli_fra_samples",
    }
    (warning,) = skipped_warnings(utils_log)
    assert "afrixnli/fra" in warning and "afrixnli/swa" in warning and "xnli/swa" in warning


def test_ner_absent_masakhaner_language_is_skipped(tiny_bert, tmp_path, utils_log):
    data = tmp_path / "data"
    write_wikiann(data, "en", "train", 8)
    write_wikiann(data, "en", "test", 2)
    write_wikiann(data, "sw", "test", 2)
    metrics = rtc.main(tc_argv("ner", tiny_bert, data, tmp_path / "ner", "--eval_languages", "swa"))
    assert "eval_wikiann_swa_f1" in metrics and "eval_masakhaner_swa_f1" not in metrics
    (warning,) = skipped_warnings(utils_log)
    assert "masakhaner/swa" in warning


def test_hub_loading_does_not_skip(tiny_bert, tmp_path, monkeypatch):
    """Without --data_dir nothing is skipped: a Hub config that cannot be read is an error."""

    def missing(hub_id, config, split, **kwargs):
        raise FileNotFoundError(f"{hub_id} has no config {config}")

    monkeypatch.setattr(rtc, "load_hub_split", missing)
    with pytest.raises(FileNotFoundError, match="has no config en"):
        rtc.main(
            [
                "--task",
                "ner",
                "--model_name_or_path",
                tiny_bert,
                "--output_dir",
                str(tmp_path / "o"),
                "--use_cpu",
                "--eval_languages",
                "swa",
                "--results_file",
                "none",
            ]
        )
