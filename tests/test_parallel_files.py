"""Local parallel files (--parallel_data_dir): line splitting, TSV headers, BOMs, bad bytes and values, parquet and
OPUS-100's own layout; and pooling of unknown tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lang_registry
import run_realign
from realign_utils import find_local_parallel_file, pooling_special_ids, read_local_parallel

REGISTRY = lang_registry.load_registry()
YORUBA = REGISTRY.get("yor")


def write(folder: Path, name: str, data: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def read(folder: Path, language=YORUBA, split: str = "train") -> dict[str, list[str]]:
    return read_local_parallel(find_local_parallel_file(str(folder), language, split))


@pytest.mark.parametrize("separator", ["\u0085", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
def test_line_pairs_break_at_newline_only(separator, tmp_path):
    english = [f"Sentence {i}." for i in range(18)]
    yoruba = [f"Gbolohun {i}." for i in range(18)]
    english[2] = f"Line three{separator}continues."  # inside a sentence, as in real text
    yoruba[10] = f"Ila kokanla{separator}n tesiwaju."
    write(tmp_path, "en-yor.en", "\n".join(english) + "\n")
    write(tmp_path, "en-yor.yor", "\r\n".join(yoruba) + "\r\n")  # Windows line ends on one side
    pairs = read(tmp_path)
    assert pairs["src"] == english and pairs["tgt"] == yoruba


def test_line_pairs_count_lines_as_wc_does(tmp_path):
    write(tmp_path, "en-yor.en", "a\nb\u2028c\n")
    write(tmp_path, "en-yor.yor", "x\ny\nz\n")
    with pytest.raises(ValueError, match="has 2 lines but .* has 3"):
        read(tmp_path)


def test_tsv_with_extra_tabs_is_refused(tmp_path):
    write(tmp_path, "yor.tsv", "1\tHello\tBawo\n2\tThanks\tO se\n")
    with pytest.raises(ValueError, match=r"yor.tsv:1: 3 tab-separated fields where 2 are expected.*header"):
        read(tmp_path)


def test_tsv_header_names_the_columns(tmp_path):
    write(tmp_path, "yor.tsv", "id\tyor\ten\nu1\tBawo\tHello\nu2\tO se\tThanks\n")
    assert read(tmp_path) == {"src": ["Hello", "Thanks"], "tgt": ["Bawo", "O se"], "id": ["u1", "u2"]}
    write(tmp_path, "yor.tsv", "en\tyo\nHello\tBawo\n")
    assert read(tmp_path) == {"src": ["Hello"], "tgt": ["Bawo"]}
    write(tmp_path, "yor.tsv", "id\ten\tyor\nu1\tHello\n")
    with pytest.raises(ValueError, match=r"yor.tsv:2: 2 tab-separated fields where 3 are expected"):
        read(tmp_path)


@pytest.mark.parametrize(
    "name, line", [("yor.tsv", "Hello\tBawo\n"), ("yor.jsonl", '{"translation": {"en": "Hello", "yo": "Bawo"}}\n')]
)
def test_byte_order_mark_is_dropped(name, line, tmp_path):
    write(tmp_path, name, "\ufeff" + line + line)
    assert read(tmp_path) == {"src": ["Hello", "Hello"], "tgt": ["Bawo", "Bawo"]}


@pytest.mark.parametrize("name", ["yor.tsv", "yor.jsonl", "en-yor.en"])
def test_invalid_utf8_names_file_and_line(name, tmp_path):
    good = {
        "yor.tsv": b"Hello\tBawo\n",
        "yor.jsonl": b'{"translation": {"en": "Hello", "yo": "Bawo"}}\n',
        "en-yor.en": b"Hello\n",
    }[name]
    write(tmp_path, name, good * 3 + good.replace(b"Hello", b"Caf\xe9") + good)
    if name == "en-yor.en":
        write(tmp_path, "en-yor.yor", "Bawo\n" * 5)
    with pytest.raises(ValueError, match=rf"{name}:4: not valid UTF-8 \(byte 0xe9 at column \d+\)"):
        read(tmp_path)


@pytest.mark.parametrize(
    "record, match",
    [
        ({"translation": {"en": None, "yo": "Bawo"}}, "NoneType"),
        ({"translation": {"en": "Hello", "yo": 3}}, "int"),
        ({"translation": {"en": "Hello", "yo": "Bawo"}, "id": [1]}, "an 'id' of type list"),
        (None, "no 'translation' object"),
        ({"translation": {"en": "Hello", "yo": "Bawo", "fr": "Salut"}}, "keys"),
    ],
)
def test_bad_json_values_name_file_and_line(record, match, tmp_path):
    good = json.dumps({"translation": {"en": "Hi", "yo": "Bawo"}})
    write(tmp_path, "yor.jsonl", f"{good}\n{json.dumps(record)}\n")
    with pytest.raises(ValueError, match=rf"yor.jsonl:2: .*{match}"):
        read(tmp_path)


def test_json_ids_on_every_line_or_none(tmp_path):
    write(
        tmp_path,
        "yor.jsonl",
        '{"id": 7, "translation": {"en": "Hi", "yo": "Bawo"}}\n'
        '{"id": "b", "translation": {"en": "Hey", "yo": "Pele"}}\n',
    )
    assert read(tmp_path)["id"] == ["7", "b"]
    write(
        tmp_path,
        "yor.jsonl",
        '{"id": 7, "translation": {"en": "Hi", "yo": "Bawo"}}\n{"translation": {"en": "Hey", "yo": "Pele"}}\n',
    )
    with pytest.raises(ValueError, match="yor.jsonl:2: 'id' must be given on every line or on none"):
        read(tmp_path)


def opus_shard(path: Path, rows: list[tuple[str, str]], other: str = "yo") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # OPUS-100's schema: one struct column `translation` with the two ISO 639-1 codes as fields.
    table = pa.table({"translation": [{"en": en, other: xx} for en, xx in rows]})
    pq.write_table(table, path)


def test_opus100_snapshot_layout(tmp_path):
    opus_shard(tmp_path / "en-yo" / "train-00000-of-00002.parquet", [("Hello", "Bawo")])
    opus_shard(tmp_path / "en-yo" / "train-00001-of-00002.parquet", [("Thanks", "O se")])
    opus_shard(tmp_path / "en-yo" / "validation-00000-of-00001.parquet", [("Welcome", "E kaabo")])
    assert read(tmp_path) == {"src": ["Hello", "Thanks"], "tgt": ["Bawo", "O se"]}
    assert read(tmp_path, split="validation") == {"src": ["Welcome"], "tgt": ["E kaabo"]}
    afrikaans = REGISTRY.get("afr")  # configs sort the two codes: af-en, not en-af
    opus_shard(tmp_path / "af-en" / "train.parquet", [("Hello", "Hallo")], other="af")
    assert read(tmp_path, afrikaans)["tgt"] == ["Hallo"]
    (tmp_path / "jsonl" / "en-yo").mkdir(parents=True)
    write(tmp_path / "jsonl" / "en-yo", "train.jsonl", '{"translation": {"en": "Hi", "yo": "Bawo"}}\n')
    assert read(tmp_path / "jsonl")["src"] == ["Hi"]


def test_flat_parquet_and_bad_rows(tmp_path):
    pq.write_table(
        pa.table({"id": ["a", "b"], "translation": [{"en": "Hi", "yo": "Bawo"}, {"en": "Hey", "yo": None}]}),
        tmp_path / "yor.parquet",
    )
    with pytest.raises(ValueError, match=r"yor.parquet: row 1: .*NoneType"):
        read(tmp_path)


def test_opus_layout_trains_and_holds_out_its_validation_split(tiny_bert, tmp_path):
    from conftest import PARALLEL

    opus_shard(tmp_path / "data" / "en-yo" / "train-00000-of-00001.parquet", [(r[0], r[2]) for r in PARALLEL[:16]])
    opus_shard(
        tmp_path / "data" / "en-yo" / "validation-00000-of-00001.parquet", [(r[0], r[2]) for r in PARALLEL[16:]]
    )
    out = tmp_path / "out"
    metrics = run_realign.main(
        [
            "--model_name_or_path",
            tiny_bert,
            "--languages",
            "yor",
            "--parallel_data_dir",
            str(tmp_path / "data"),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--use_cpu",
            "--do_eval",
            "--per_device_train_batch_size",
            "4",
        ]
    )
    assert "eval_yor_retrieval_acc" in metrics
    pairs = json.loads((out / run_realign.CONFIG_FILE).read_text())["pair_counts"]["yor"]
    assert pairs["used"] == 16 and pairs["held_out"] == len(PARALLEL) - 16


def test_unknown_tokens_are_pooled_and_token_less_pairs_dropped(tiny_bert):
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    ids = pooling_special_ids(tokenizer)
    assert tokenizer.unk_token_id not in ids.tolist() and tokenizer.cls_token_id in ids.tolist()
    unknown = "\U0001f980\U0001f981"  # characters the tiny vocabulary lacks
    assert tokenizer(unknown)["input_ids"][1:-1] == [tokenizer.unk_token_id]
    # A zero-width space alone tokenises to nothing but [CLS] [SEP]: a zero vector if it reached the loss.
    data = datasets.Dataset.from_dict(
        {"src": ["The child reads.", "The book.", "\u200b"], "tgt": [unknown, "\u200b", "Le livre."]}
    )
    tokenized, counts = run_realign.tokenize_pairs(
        data, "fra", tokenizer, run_realign.DataArguments(languages="fra"), run_realign.RealignArguments(), None, "x"
    )
    assert counts["no_text_tokens"] == 2 and counts["kept"] == 1
    assert tokenized[0]["tgt_input_ids"][1:-1] == [tokenizer.unk_token_id]
    hidden = torch.randn(1, 3, 4)
    mask = torch.isin(torch.tensor([tokenized[0]["tgt_input_ids"]]), ids, invert=True)
    assert mask.tolist() == [[False, True, False]] and hidden[mask].abs().sum() > 0
