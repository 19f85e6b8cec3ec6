"""run_token_classification.main() end to end on tiny models and schema-faithful local files, its units, and its
bad-input errors. The fixture folder (tests/fixtures_downstream.py) holds every registered UDPOS / MasakhaPOS /
WikiANN / MasakhaNER 2.0 config, so `--eval_languages paper` resolves offline exactly as it does on the Hub."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures_downstream import (
    MASAKHANER_CRAFTED,
    MASAKHAPOS_CRAFTED,
    MASAKHAPOS_TAGS,
    UDPOS_TAGS,
    WIKIANN_TAGS,
    registry_configs,
    texts,
    words,
    write_masakhapos,
    write_udpos,
    write_wikiann,
)
from safetensors.torch import load_file
from transformers import AutoTokenizer

import downstream_utils
import realign_utils
import run_realign
import run_token_classification as rtc

# Expected evaluation sets, from the registry file itself (not from the script under test): the paper's POS set is
# every XTREME-R UDPOS language plus MasakhaPOS; its NER set is WikiANN without six configs REF does not evaluate.
WIKIANN_NOT_IN_PAPER = {"amh", "ibo", "kin", "lin", "aym", "grn"}


def paper_codes(task: str) -> dict[str, list[str]]:
    if task == "pos":
        return {
            "udpos": [c for c in registry_configs("udpos") if c != "eng"],
            "masakhapos": list(registry_configs("masakhapos")),
        }
    return {
        "wikiann": [c for c in registry_configs("wikiann") if c != "eng" and c not in WIKIANN_NOT_IN_PAPER],
        "masakhaner": list(registry_configs("masakhaner")),
    }


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-cache")


def tc_argv(task: str, model: str, data_dir: Path, out: Path, cache: Path, *extra: str) -> list[str]:
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
        "30",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "5e-3",
        "--use_cpu",
        "--seed",
        "7",
        "--save_steps",
        "100",
        "--logging_steps",
        "10",
        "--cache_dir",
        str(cache),
        "--results_file",
        str(out / "results.csv"),
        *extra,
    ]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def check_keys_and_averages(metrics: dict, expected: dict[str, list[str]], metric_names: tuple[str, ...]) -> None:
    for name in metric_names:
        per_language = {}
        for source, codes in expected.items():
            for code in codes:
                per_language[(source, code)] = metrics[f"eval_{source}_{code}_{name}"]
        assert len(per_language) == sum(len(c) for c in expected.values())
        values = list(per_language.values())
        assert metrics[f"eval_avg_{name}"] == pytest.approx(sum(values) / len(values))
        for source, codes in expected.items():
            mean = sum(per_language[(source, c)] for c in codes) / len(codes)
            assert metrics[f"eval_avg_{source}_{name}"] == pytest.approx(mean)
    # Nothing else is evaluated: one samples key per (source, language) plus English.
    evaluated = {
        k.removeprefix("eval_").removesuffix("_samples")
        for k in metrics
        if k.startswith("eval_") and k.endswith("_samples")
    }
    assert evaluated == {f"{s}_{c}" for s, codes in expected.items() for c in codes} | {f"{next(iter(expected))}_eng"}


# -- end to end -------------------------------------------------------------------------------------------------------


def test_pos_paper_set_end_to_end(tiny_xlmr, downstream_dir, cache_dir, tmp_path):
    out = tmp_path / "pos"
    metrics = rtc.main(tc_argv("pos", tiny_xlmr, downstream_dir, out, cache_dir, "--eval_languages", "paper"))
    expected = paper_codes("pos")
    assert len(expected["udpos"]) == 37 and len(expected["masakhapos"]) == 20
    check_keys_and_averages(metrics, expected, ("accuracy",))
    # English is scored in-language, kept out of the zero-shot averages, and learnt from the English training data.
    assert metrics["eval_udpos_eng_accuracy"] > 0.5
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses[-1] < losses[0]

    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_masakhapos_yor_accuracy"] == metrics["eval_masakhapos_yor_accuracy"]
    assert "eval_udpos_yor_accuracy" in results and "train_loss" in results
    rows = read_rows(out / "results.csv")
    assert len(rows) == 57 + 1  # one row per (source, language, metric)
    assert list(rows[0]) == realign_utils.RESULTS_COLUMNS
    assert {(r["model"], r["subset"], r["seed"], r["task"], r["metric"], r["run_dir"]) for r in rows} == {
        (tiny_xlmr, "none", "7", "pos", "accuracy", str(out))
    }
    row = next(r for r in rows if r["source"] == "masakhapos" and r["language"] == "wol")
    assert float(row["value"]) == pytest.approx(metrics["eval_masakhapos_wol_accuracy"])
    assert "## Zero-shot evaluation" in (out / "README.md").read_text()


def test_ner_paper_set_end_to_end(tiny_bert, downstream_dir, cache_dir, tmp_path):
    out = tmp_path / "ner"
    metrics = rtc.main(
        tc_argv("ner", tiny_bert, downstream_dir, out, cache_dir, "--max_steps", "60")
    )  # default: paper
    expected = paper_codes("ner")
    assert len(expected["wikiann"]) == 47 and len(expected["masakhaner"]) == 20
    check_keys_and_averages(metrics, expected, ("f1", "precision", "recall"))
    # yor and swa are in both WikiANN and MasakhaNER: keyed per source, no collision.
    assert {"eval_wikiann_yor_f1", "eval_masakhaner_yor_f1", "eval_wikiann_swa_f1", "eval_masakhaner_swa_f1"} <= set(
        metrics
    )
    assert metrics["eval_wikiann_eng_f1"] > 0.5
    rows = read_rows(out / "results.csv")
    assert len(rows) == (67 + 1) * 3
    assert {r["metric"] for r in rows} == {"f1", "precision", "recall"}
    assert sum(r["language"] == "yor" for r in rows) == 6


def test_realigned_checkpoint_fine_tunes_as_linear_probe(
    tiny_bert, parallel_dirs, downstream_dir, cache_dir, tmp_path
):
    realigned = tmp_path / "realigned"
    run_realign.main(
        [
            "--model_name_or_path",
            tiny_bert,
            "--languages",
            "fra,yor,swa",
            "--parallel_data_dir",
            str(parallel_dirs["train"]),
            "--output_dir",
            str(realigned),
            "--max_steps",
            "4",
            "--use_cpu",
            "--per_device_train_batch_size",
            "8",
            "--cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    out = tmp_path / "pos"
    metrics = rtc.main(
        tc_argv(
            "pos",
            str(realigned),
            downstream_dir,
            out,
            cache_dir,
            "--eval_languages",
            "yor",
            "--finetune_mode",
            "linear",
            "--max_steps",
            "5",
        )
    )
    assert {k for k in metrics if k.endswith("_accuracy") and "avg" not in k} == {
        "eval_udpos_eng_accuracy",
        "eval_udpos_yor_accuracy",
        "eval_masakhapos_yor_accuracy",
    }
    rows = read_rows(out / "results.csv")
    assert len(rows) == 3
    assert {(r["model"], r["subset"]) for r in rows} == {(tiny_bert, "custom")}  # base model + realignment subset
    # Linear probe: the encoder is the realigned one, unchanged; only the head was trained.
    before, after = load_file(realigned / "model.safetensors"), load_file(out / "model.safetensors")
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(before[name], after[f"bert.{name}"])
    assert "classifier.weight" in after


def test_google_xtreme_udpos_naming(tiny_bert, downstream_dir, cache_dir, tmp_path):
    configs = rtc.source_configs(rtc.SOURCES["xtreme_udpos"])
    assert len(configs) == 33 and configs["eng"] == "udpos.English" and configs["ell"] == "udpos.Greek"
    assert "wol" not in configs and "lit" not in configs
    metrics = rtc.main(
        tc_argv(
            "pos",
            tiny_bert,
            downstream_dir,
            tmp_path / "out",
            cache_dir,
            "--udpos_dataset",
            "xtreme",
            "--eval_languages",
            "fra,yor",
            "--max_steps",
            "3",
            "--max_train_samples",
            "5",
            "--max_eval_samples",
            "1",
        )
    )
    samples = {k: v for k, v in metrics.items() if k.endswith("_samples") and k.startswith("eval_")}
    assert samples == {
        "eval_xtreme_udpos_eng_samples": 1,
        "eval_xtreme_udpos_fra_samples": 1,
        "eval_xtreme_udpos_yor_samples": 1,
        "eval_masakhapos_yor_samples": 1,
    }
    assert metrics["train_samples"] == 5


# -- language resolution --------------------------------------------------------------------------------------------


def test_eval_language_resolution(caplog):
    def targets(**kwargs):
        return [(t.source, t.language, t.config) for t in rtc.resolve_targets(rtc.DataArguments(**kwargs), seed=17)]

    assert len(targets(task="pos")) == 1 + 57 and len(targets(task="ner")) == 1 + 67
    assert targets(task="ner", eval_languages="yo,swa,wol") == [
        ("wikiann", "eng", "en"),
        ("wikiann", "yor", "yo"),
        ("wikiann", "swa", "sw"),
        ("masakhaner", "yor", "yor"),
        ("masakhaner", "swa", "swa"),
        ("masakhaner", "wol", "wol"),
    ]
    assert targets(task="ner", eval_languages="yor", eval_sources="masakhaner") == [
        ("wikiann", "eng", "en"),
        ("masakhaner", "yor", "yor"),
    ]
    with caplog.at_level("WARNING"):
        chosen = targets(task="pos", eval_languages="uriel_20")
    assert any("skipped" in r.message for r in caplog.records)
    assert {s for s, _, _ in chosen} == {"udpos", "masakhapos"}


# -- data and labels ------------------------------------------------------------------------------------------------


def load_one(task: str, source: str, language: str, config: str, data_dir: Path, label_list: list[str]):
    data_args = rtc.DataArguments(task=task, data_dir=str(data_dir), eval_languages=language)
    model_args = rtc.ModelArguments(model_name_or_path="unused")
    (eval_set,) = rtc.load_eval_data(
        [downstream_utils.EvalTarget(source, language, config)], label_list, data_args, model_args
    )
    return eval_set.dataset


def test_masakhapos_tags_are_mapped_by_name(downstream_dir):
    dataset = load_one("pos", "masakhapos", "yor", "yor", downstream_dir, UDPOS_TAGS)
    assert dataset[0]["tokens"] == MASAKHAPOS_CRAFTED["tokens"]
    by_name = [UDPOS_TAGS.index(n) for n in MASAKHAPOS_CRAFTED["names"]]
    by_position = [MASAKHAPOS_TAGS.index(n) for n in MASAKHAPOS_CRAFTED["names"]]
    assert dataset[0]["upos"] == by_name
    assert sum(a != b for a, b in zip(by_name, by_position)) == 5


def test_masakhaner_date_tags_become_o(downstream_dir):
    dataset = load_one("ner", "masakhaner", "yor", "yor", downstream_dir, WIKIANN_TAGS)
    expected = [n if "DATE" not in n else "O" for n in MASAKHANER_CRAFTED["names"]]
    assert [WIKIANN_TAGS[i] for i in dataset[0]["ner_tags"]] == expected
    assert expected.count("O") == 6


def test_local_formats_read_like_the_hub(downstream_dir):
    # CoNLL-U: multi-word token lines and empty nodes are not words.
    conllu = rtc.read_conllu(downstream_dir / "udpos" / "yo" / "test.conllu", "pos_tags")
    first = conllu[0]["tokens"]
    assert first == words(texts("yor", 1, offset=len("yo"))[0]) and len(first) == len(conllu[0]["pos_tags"])
    # MasakhaPOS raw text: token TAG lines, blank-line separated; tag names.
    text = rtc.read_token_tag_lines(downstream_dir / "masakhapos" / "hau" / "test.txt", "upos")
    assert text.column_names == ["id", "tokens", "upos"] and set(text[0]["upos"]) <= set(MASAKHAPOS_TAGS)
    # JSON lines with tag names (udpos de) and integer ids (wikiann fr) map to the same ids as parquet ClassLabels.
    names = load_one("pos", "udpos", "deu", "de", downstream_dir, UDPOS_TAGS)
    ids = load_one("ner", "wikiann", "fra", "fr", downstream_dir, WIKIANN_TAGS)
    assert names.features["pos_tags"].feature.dtype == "int64" and ids[0]["ner_tags"][0] == WIKIANN_TAGS.index("B-PER")


def test_first_sub_word_labelling(tiny_xlmr):
    tokenizer = AutoTokenizer.from_pretrained(tiny_xlmr)
    batch = {"tokens": [["Olùkọ́", "kọ̀wé", "sí", "pátákó", "."]], "pos_tags": [[7, 15, 1, 7, 12]]}
    out = rtc.tokenize_and_align_labels(batch, tokenizer, "pos_tags", max_length=64)
    labels, word_ids = out["labels"][0], out.word_ids(0)
    assert len(labels) > len(batch["tokens"][0]) + 2  # some words have several pieces
    assert [label for label in labels if label != -100] == batch["pos_tags"][0]
    assert labels[0] == -100 and labels[-1] == -100  # <s>, </s>
    for i, word in enumerate(word_ids):
        if word is not None and i > 0 and word_ids[i - 1] == word:
            assert labels[i] == -100
    cut = rtc.tokenize_and_align_labels(batch, tokenizer, "pos_tags", max_length=4)
    assert cut["unscored_words"] == [len(batch["tokens"][0]) - sum(label != -100 for label in cut["labels"][0])]


def test_evaluation_batches_are_sorted_by_length():
    import datasets

    dataset = datasets.Dataset.from_dict({"input_ids": [[1], [1, 2, 3], [1, 2], [4, 5, 6]], "row": [0, 1, 2, 3]})
    assert downstream_utils.sort_by_length(dataset.select([3, 0, 1, 2]))["row"] == [3, 1, 2, 0]


# -- metrics --------------------------------------------------------------------------------------------------------


def test_bio_repair():
    assert rtc.repair_bio(["O", "I-PER", "I-PER", "O"]) == ["O", "B-PER", "I-PER", "O"]
    assert rtc.repair_bio(["B-LOC", "I-PER", "I-LOC"]) == ["B-LOC", "B-PER", "B-LOC"]
    assert rtc.repair_bio(["I-ORG"]) == ["B-ORG"]
    assert rtc.repair_bio(["B-PER", "I-PER", "O", "B-LOC"]) == ["B-PER", "I-PER", "O", "B-LOC"]


def test_ner_scores_strict_after_repair():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    # The predicted PER span starts with I-: strict IOB2 would not count it; the repair makes it a PER entity.
    assert rtc.ner_scores(gold, [["I-PER", "I-PER", "O", "B-LOC"]]) == {"f1": 1.0, "precision": 1.0, "recall": 1.0}
    # Strict mode: a span with the right type but the wrong extent is wrong.
    scores = rtc.ner_scores(gold, [["B-PER", "O", "O", "B-LOC"]])
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5
    assert rtc.ner_scores([["O"]], [["O"]]) == {"f1": 0.0, "precision": 0.0, "recall": 0.0}


def test_pos_accuracy_ignores_unlabelled_positions():
    compute = rtc.build_compute_metrics("pos", list(UDPOS_TAGS))

    class Prediction:
        predictions = torch.tensor([[3, 7, 7, 1], [5, 2, -100, -100]]).numpy()
        label_ids = torch.tensor([[-100, 7, 8, -100], [-100, 2, -100, -100]]).numpy()

    assert compute(Prediction()) == {"accuracy": pytest.approx(2 / 3)}


# -- bad input ------------------------------------------------------------------------------------------------------


def minimal_dir(root: Path) -> Path:
    """English train/test of both tasks plus fra (udpos, wikiann) and hau (masakhapos) test files."""
    write_udpos(root, "udpos", "en", "train", 8, "eng")
    write_udpos(root, "udpos", "en", "test", 2, "eng")
    write_udpos(root, "udpos", "fr", "test", 2, "fra")
    write_masakhapos(root, "hau", 2, "txt")
    write_wikiann(root, "en", "train", 8)
    write_wikiann(root, "en", "test", 2)
    write_wikiann(root, "fr", "test", 2)
    return root


def break_wikiann_columns(root: Path) -> None:
    path = root / "wikiann" / "fr" / "test.parquet"
    import datasets

    datasets.Dataset.from_parquet(str(path)).rename_column("ner_tags", "tags").to_parquet(str(path))


def break_masakhapos_labels(root: Path) -> None:
    path = root / "masakhapos" / "hau" / "test.txt"
    path.write_text(path.read_text(encoding="utf-8").replace(" NOUN\n", " FOO\n", 1), encoding="utf-8")


def add_date_to_wikiann(root: Path) -> None:
    write_wikiann(root, "fr", "test", 2)
    path = root / "wikiann" / "fr" / "test.parquet"
    import datasets
    from datasets import ClassLabel, List

    dataset = datasets.Dataset.from_parquet(str(path))
    features = dataset.features.copy()
    features["ner_tags"] = List(ClassLabel(names=[*WIKIANN_TAGS, "B-DATE", "I-DATE"]))
    dataset.cast(features).to_parquet(str(path))


@pytest.mark.parametrize(
    "task, languages, breaker, error, match",
    [
        ("srl", "fra", None, ValueError, "--task must be one of pos, ner"),
        ("pos", "fra,xyz", None, ValueError, "Unknown language code 'xyz'"),
        # An absent local evaluation file is skipped with a warning, not an error: tests/test_local_data.py.
        ("ner", "fra", break_wikiann_columns, ValueError, r"fr/test.parquet: missing column\(s\) \['ner_tags'\]"),
        ("pos", "hau", break_masakhapos_labels, ValueError, r"hau/test.txt: label name\(s\) \['FOO'\]"),
        # DATE is only mapped to O for MasakhaNER: elsewhere it is a label the model does not have.
        ("ner", "fra", add_date_to_wikiann, ValueError, r"label name\(s\) \['B-DATE', 'I-DATE'\]"),
    ],
)
def test_bad_input_fails_before_training(task, languages, breaker, error, match, tiny_bert, cache_dir, tmp_path):
    data = minimal_dir(tmp_path / "data")
    if breaker:
        breaker(data)
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        rtc.main(tc_argv(task, tiny_bert, data, out, cache_dir, "--eval_languages", languages))
    assert not out.exists()  # nothing written: the input is checked before anything is recorded


def test_bad_flags(tiny_bert, tmp_path):
    base = ["--task", "ner", "--model_name_or_path", tiny_bert, "--output_dir", str(tmp_path / "o"), "--use_cpu"]
    with pytest.raises(ValueError, match="unknown source.*masakhapos.*wikiann, masakhaner"):
        rtc.main([*base, "--eval_sources", "masakhapos"])
    with pytest.raises(ValueError, match="--eval_strategy must stay 'no'"):
        rtc.main([*base, "--eval_strategy", "epoch"])
    with pytest.raises(ValueError, match="--finetune_mode must be"):
        rtc.main([*base, "--finetune_mode", "lora"])
    with pytest.raises(ValueError, match="--dataset_revisions: unknown source"):
        rtc.main([*base, "--dataset_revisions", "conll=abc"])


def test_output_dirs_of_two_scripts_cannot_be_swapped(tiny_bert, parallel_dirs, downstream_dir, cache_dir, tmp_path):
    realigned, pos = tmp_path / "realigned", tmp_path / "pos"

    def realign(out):
        options = f"--languages fra,yor --max_steps 2 --save_steps 2 --use_cpu --cache_dir {tmp_path / 'cache'}"
        data = ["--parallel_data_dir", str(parallel_dirs["train"])]
        run_realign.main(["--model_name_or_path", tiny_bert, "--output_dir", str(out), *data, *options.split()])

    realign(realigned)
    rtc.main(tc_argv("pos", tiny_bert, downstream_dir, pos, cache_dir, "--eval_languages", "yor", "--max_steps", "2"))
    before = {folder: sorted(p.name for p in folder.iterdir()) for folder in (realigned, pos)}
    with pytest.raises(ValueError, match=r"realigned holds a run of run_realign.py \(realign_settings.json\)"):
        rtc.main(tc_argv("pos", tiny_bert, downstream_dir, realigned, cache_dir, "--eval_languages", "yor"))
    with pytest.raises(ValueError, match=r"pos holds a run of run_token_classification.py or run_xnli.py"):
        realign(pos)
    assert {folder: sorted(p.name for p in folder.iterdir()) for folder in (realigned, pos)} == before


def test_checkpoint_with_other_labels_is_refused(tiny_bert, downstream_dir, cache_dir, tmp_path):
    pos = tmp_path / "pos"
    rtc.main(tc_argv("pos", tiny_bert, downstream_dir, pos, cache_dir, "--eval_languages", "eng", "--max_steps", "2"))
    shutil.rmtree(pos / "checkpoint-2", ignore_errors=True)
    with pytest.raises(ValueError, match="was fine-tuned with the labels"):
        rtc.main(tc_argv("ner", str(pos), downstream_dir, tmp_path / "ner", cache_dir, "--eval_languages", "eng"))


# -- Hub code paths, with the downloads stubbed ---------------------------------------------------------------------


def test_hub_loading_routes_each_source_to_its_loader(tiny_bert, downstream_dir, cache_dir, tmp_path, monkeypatch):
    """Without --data_dir: load_dataset for UDPOS / WikiANN, the parquet branch for MasakhaNER 2.0, the GitHub raw
    files for MasakhaPOS; the data returned here is the fixture data, so the rest of the run is the real one."""
    calls = []

    def fake_load_hub_split(hub_id, config, split, *, parquet_branch=False, revision=None, cache_dir=None):
        calls.append((hub_id, config, split, parquet_branch, revision))
        source = {
            "izhx/xtreme-r-udpos": "udpos",
            "unimelb-nlp/wikiann": "wikiann",
            "masakhane/masakhaner2": "masakhaner",
        }[hub_id]
        path = downstream_utils.find_local_split(str(downstream_dir), source, config, split, (".parquet", ".jsonl"))
        return downstream_utils.read_local_table(path, str(cache_dir))

    def fake_cached_path(url, download_config=None):
        calls.append(url)
        return str(downstream_dir / "masakhapos" / "hau" / "test.txt")

    monkeypatch.setattr(rtc, "load_hub_split", fake_load_hub_split)
    monkeypatch.setattr("datasets.utils.file_utils.cached_path", fake_cached_path)
    argv = [
        "--model_name_or_path",
        tiny_bert,
        "--use_cpu",
        "--max_steps",
        "2",
        "--cache_dir",
        str(cache_dir),
        "--results_file",
        "none",
    ]
    rtc.main(
        [
            "--task",
            "ner",
            "--eval_languages",
            "yor",
            "--dataset_revisions",
            "wikiann=abc123",
            "--output_dir",
            str(tmp_path / "ner"),
            *argv,
        ]
    )
    assert calls == [
        ("unimelb-nlp/wikiann", "en", "train", False, "abc123"),
        ("unimelb-nlp/wikiann", "en", "test", False, "abc123"),
        ("unimelb-nlp/wikiann", "yo", "test", False, "abc123"),
        ("masakhane/masakhaner2", "yor", "test", True, None),
    ]
    calls.clear()
    rtc.main(["--task", "pos", "--eval_languages", "hau", "--output_dir", str(tmp_path / "pos"), *argv])
    assert calls == [
        ("izhx/xtreme-r-udpos", "en", "train", False, None),
        ("izhx/xtreme-r-udpos", "en", "test", False, None),
        "https://raw.githubusercontent.com/masakhane-io/masakhane-pos/main/data/hau/test.txt",
    ]


def test_parquet_branch_layouts(downstream_dir, cache_dir, tmp_path, monkeypatch):
    """refs/convert/parquet holds <config>/<split>/NNNN.parquet (or, in older conversions,
    <config>/<name>-<split>.parquet)."""
    snapshot = tmp_path / "snapshot"
    shutil.copytree(downstream_dir / "masakhaner" / "yor", snapshot / "yor")
    shutil.copy(downstream_dir / "wikiann" / "yo" / "test.parquet", snapshot / "yor" / "masakhaner2-train.parquet")
    requests = []

    def fake_snapshot_download(repo_id, **kwargs):
        requests.append((repo_id, kwargs["repo_type"], kwargs["revision"], kwargs["allow_patterns"]))
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    test = downstream_utils.load_hub_split(
        "masakhane/masakhaner2", "yor", "test", parquet_branch=True, cache_dir=str(cache_dir)
    )
    assert (
        test.features["ner_tags"].feature.names[-1] == "I-DATE" and test[0]["tokens"] == MASAKHANER_CRAFTED["tokens"]
    )
    assert requests[0][:3] == ("masakhane/masakhaner2", "dataset", "refs/convert/parquet")
    assert "yor/test/*.parquet" in requests[0][3]
    train = downstream_utils.load_hub_split(
        "masakhane/masakhaner2", "yor", "train", parquet_branch=True, revision="abc"
    )
    assert len(train) == 2 and requests[1][2] == "abc"
    with pytest.raises(FileNotFoundError, match="no parquet files for config 'yor', split 'validation'"):
        downstream_utils.load_hub_split("masakhane/masakhaner2", "yor", "validation", parquet_branch=True)


def test_evaluation_only_run_of_a_fine_tuned_model(tiny_bert, downstream_dir, cache_dir, tmp_path):
    tuned = tmp_path / "tuned"
    rtc.main(
        tc_argv("pos", tiny_bert, downstream_dir, tuned, cache_dir, "--eval_languages", "eng", "--max_steps", "2")
    )
    out = tmp_path / "eval-only"
    metrics = rtc.main(
        tc_argv("pos", str(tuned), downstream_dir, out, cache_dir, "--eval_languages", "wol", "--do_train", "False")
    )
    first = json.loads((tuned / "all_results.json").read_text())
    assert metrics["eval_udpos_eng_accuracy"] == pytest.approx(first["eval_udpos_eng_accuracy"])
    assert {"eval_udpos_wol_accuracy", "eval_masakhapos_wol_accuracy"} <= set(metrics)
    assert not (out / "model.safetensors").exists() and len(read_rows(out / "results.csv")) == 3
