"""run_xnli.py --task sib200 on schema-faithful SIB-200 files: English training, zero-shot evaluation over the
registry's SIB-200 configs, labels matched by name in the fixed order, full and linear fine-tuning, Hub routing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from fixtures_downstream import SIB200_CATEGORIES, build_sib200_dir, registry_configs, sib200_rows, write_sib200
from safetensors.torch import load_file

import downstream_utils
import realign_utils
import run_xnli

PAPER_SIB200 = ["deu", "spa", "fas", "fra", "hin", "jpn", "kaz", "kor", "rus"]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def sib_dir(tmp_path_factory) -> Path:
    return build_sib200_dir(tmp_path_factory.mktemp("sib200"))


def sib_argv(model: str, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--task",
        "sib200",
        "--model_name_or_path",
        model,
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(out),
        "--max_steps",
        "12",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--use_cpu",
        "--seed",
        "7",
        "--save_steps",
        "100",
        "--logging_steps",
        "4",
        "--cache_dir",
        str(out.parent / "cache"),
        "--results_file",
        str(out / "results.csv"),
        *extra,
    ]


def test_sib200_paper_languages_end_to_end(tiny_xlmr, sib_dir, tmp_path):
    out = tmp_path / "sib"
    metrics = run_xnli.main(sib_argv(tiny_xlmr, sib_dir, out))  # --eval_languages paper: the companion paper's 9
    values = {code: metrics[f"eval_sib200_{code}_accuracy"] for code in PAPER_SIB200}
    assert all(0 <= v <= 1 for v in values.values())
    assert metrics["eval_avg_accuracy"] == pytest.approx(sum(values.values()) / 9)
    assert "eval_sib200_eng_accuracy" in metrics and metrics["eval_sib200_eng_samples"] == 7
    assert not any(k.startswith(("eval_xnli", "eval_afrixnli")) for k in metrics)
    config = json.loads((out / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(7)] == SIB200_CATEGORIES  # the fixed, documented order
    assert config["finetuning_task"] == "sib200"
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["task"], r["source"]) for r in rows} == {("sib200", "sib200")} and len(rows) == 10
    settings = json.loads((out / realign_utils.FINETUNE_SETTINGS_FILE).read_text())["settings"]
    assert settings["data.task"] == "sib200"


def test_sib200_listed_languages_linear_probe(tiny_bert, sib_dir, tmp_path):
    out = tmp_path / "linear"
    metrics = run_xnli.main(
        sib_argv(
            tiny_bert,
            sib_dir,
            out,
            "--eval_languages",
            "yor,swh,zho,quy,bbj",
            "--finetune_mode",
            "linear",
            "--max_steps",
            "4",
        )
    )
    # Aliases resolve (swh → swa), languages SIB-200 lacks (bbj) are skipped with a warning.
    assert set(registry_configs("sib200")) >= {"yor", "swa", "zho", "quy"} and "bbj" not in registry_configs("sib200")
    evaluated = {k.split("_")[2] for k in metrics if k.startswith("eval_sib200_") and k.endswith("_accuracy")}
    assert evaluated == {"eng", "yor", "swa", "zho", "quy"}
    base, tuned = load_file(Path(tiny_bert) / "model.safetensors"), load_file(out / "model.safetensors")
    name = "encoder.layer.1.output.dense.weight"
    assert torch.equal(base[name], tuned[f"bert.{name}"])  # encoder frozen, head trained


def test_categories_are_matched_by_name(tmp_path):
    rows = sib200_rows("yor", 3)
    rows[0]["category"], rows[1]["category"], rows[2]["category"] = "Geography ", "SPORTS", "science/technology"
    write_sib200(tmp_path, "yor_Latn", "test", rows)
    data_args = run_xnli.DataArguments(task="sib200", data_dir=str(tmp_path), eval_languages="yor")
    model_args = run_xnli.ModelArguments(model_name_or_path="unused")
    target = downstream_utils.EvalTarget("sib200", "yor", "yor_Latn")
    (eval_set,) = run_xnli.load_eval_data([target], list(run_xnli.SIB200_LABELS), data_args, model_args)
    assert eval_set.dataset.column_names == ["text", "label"]
    assert eval_set.dataset["label"] == [6, 3, 0]

    rows[0]["category"] = "weather"
    write_sib200(tmp_path, "yor_Latn", "test", rows)
    with pytest.raises(ValueError, match=r"label name\(s\) \['weather'\] of column 'label'"):
        run_xnli.load_eval_data([target], list(run_xnli.SIB200_LABELS), data_args, model_args)


def test_missing_category_column(tiny_bert, tmp_path):
    data = tmp_path / "data"
    write_sib200(data, "eng_Latn", "train", sib200_rows("eng", 8))
    path = data / "sib200" / "eng_Latn" / "train.tsv"
    path.write_text(path.read_text(encoding="utf-8").replace("category", "topic", 1), encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['category'\]"):
        run_xnli.main(sib_argv(tiny_bert, data, tmp_path / "out", "--eval_languages", "eng"))
    assert not (tmp_path / "out").exists()


def test_hub_loading_reads_davlan_sib200(tiny_bert, sib_dir, tmp_path, monkeypatch):
    calls = []

    def fake_load_hub_split(hub_id, config, split, *, parquet_branch=False, revision=None, cache_dir=None):
        calls.append((hub_id, config, split))
        path = downstream_utils.find_local_split(str(sib_dir), "sib200", config, split, (".tsv",))
        return downstream_utils.read_local_table(path)

    monkeypatch.setattr(run_xnli, "load_hub_split", fake_load_hub_split)
    run_xnli.main(
        [
            "--task",
            "sib200",
            "--model_name_or_path",
            tiny_bert,
            "--output_dir",
            str(tmp_path / "o"),
            "--use_cpu",
            "--max_steps",
            "2",
            "--results_file",
            "none",
            "--eval_languages",
            "yor,swa,quy",
        ]
    )
    assert calls == [
        ("Davlan/sib200", "eng_Latn", "train"),
        ("Davlan/sib200", "eng_Latn", "test"),
        ("Davlan/sib200", "yor_Latn", "test"),
        ("Davlan/sib200", "swh_Latn", "test"),
        ("Davlan/sib200", "quy_Latn", "test"),
    ]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--task", "topics"], "--task must be one of nli, sib200"),
        (
            ["--task", "sib200", "--eval_sources", "xnli"],
            r"unknown source\(s\) \['xnli'\]; the SIB200 sources are sib200",
        ),
    ],
)
def test_bad_task_arguments(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run_xnli.main(["--model_name_or_path", "unused", "--output_dir", str(tmp_path), *argv])
