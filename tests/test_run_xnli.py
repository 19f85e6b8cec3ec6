"""run_xnli.main() end to end on tiny models and schema-faithful local files (XNLI, AfriXNLI TSV, AmericasNLI,
IndoNLI's parquet-branch layout, Myanmar-XNLI's string labels), resuming, linear probing, and bad-input errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_downstream import (
    MYXNLI_STRINGS,
    NLI_LABELS,
    nli_rows,
    registry_configs,
    write_afrixnli,
    write_jsonl,
    write_nli_parquet,
)
from safetensors.torch import load_file
from transformers import Trainer

import downstream_utils
import realign_utils
import run_realign
import run_token_classification
import run_xnli

ROOT = Path(__file__).resolve().parents[1]

# The paper's NLI set, from the registry file itself: XNLI without English, AfriXNLI's African languages (not eng,
# fra), AmericasNLI, IndoNLI and Myanmar-XNLI.
PAPER = {
    "xnli": [c for c in registry_configs("xnli") if c != "eng"],
    "afrixnli": [c for c in registry_configs("afrixnli") if c not in ("eng", "fra")],
    "americasnli": list(registry_configs("americasnli")),
    "indonli": ["ind"],
    "myxnli": ["mya"],
}


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-cache-nli")


def nli_argv(model: str, data_dir: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
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
        str(cache),
        "--results_file",
        str(out / "results.csv"),
        *extra,
    ]


def test_nli_paper_set_end_to_end(tiny_xlmr, downstream_dir, cache_dir, tmp_path):
    out = tmp_path / "xnli"
    metrics = run_xnli.main(nli_argv(tiny_xlmr, downstream_dir, out, cache_dir))  # --eval_languages paper by default
    assert [len(codes) for codes in PAPER.values()] == [14, 16, 10, 1, 1]
    values = {(s, c): metrics[f"eval_{s}_{c}_accuracy"] for s, codes in PAPER.items() for c in codes}
    assert len(values) == 42
    assert metrics["eval_avg_accuracy"] == pytest.approx(sum(values.values()) / 42)
    for source, codes in PAPER.items():
        mean = sum(values[(source, c)] for c in codes) / len(codes)
        assert metrics[f"eval_avg_{source}_accuracy"] == pytest.approx(mean)
    # swa is in XNLI and AfriXNLI: one key each. English is in-language only, and AfriXNLI's French is not evaluated.
    assert "eval_xnli_swa_accuracy" in metrics and "eval_afrixnli_swa_accuracy" in metrics
    assert "eval_xnli_eng_accuracy" in metrics and "eval_afrixnli_eng_accuracy" not in metrics
    assert "eval_afrixnli_fra_accuracy" not in metrics
    assert sum(k.endswith("_samples") and k.startswith("eval_") for k in metrics) == 43

    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_avg_accuracy"] == pytest.approx(metrics["eval_avg_accuracy"]) and "train_loss" in results
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 43
    assert {(r["task"], r["metric"], r["subset"], r["seed"]) for r in rows} == {("nli", "accuracy", "none", "7")}
    assert {r["source"] for r in rows} == {"xnli", "afrixnli", "americasnli", "indonli", "myxnli"}
    row = next(r for r in rows if r["source"] == "americasnli" and r["language"] == "grn")
    assert float(row["value"]) == pytest.approx(metrics["eval_americasnli_grn_accuracy"])


def load_one(source: str, language: str, config: str, data_dir: Path):
    data_args = run_xnli.DataArguments(data_dir=str(data_dir), eval_languages=language)
    model_args = run_xnli.ModelArguments(model_name_or_path="unused")
    target = downstream_utils.EvalTarget(source, language, config)
    (eval_set,) = run_xnli.load_eval_data([target], list(NLI_LABELS), data_args, model_args)
    return eval_set


def test_label_and_column_mapping_per_source(downstream_dir):
    # Myanmar-XNLI: string labels and its own column names.
    myxnli = load_one("myxnli", "mya", "default", downstream_dir)
    assert myxnli.dataset.column_names == ["premise", "hypothesis", "label"]
    assert myxnli.dataset["label"] == [NLI_LABELS.index(MYXNLI_STRINGS[i % 3]) for i in range(len(myxnli.dataset))]
    # AfriXNLI: TSV with integer labels 0/1/2 in XNLI's order.
    afrixnli = load_one("afrixnli", "yor", "yor", downstream_dir)
    assert afrixnli.dataset["label"] == [r["label"] for r in nli_rows("yor", len(afrixnli.dataset), 1)]
    # IndoNLI: the test_expert split, in the parquet-branch folder layout.
    indonli = load_one("indonli", "ind", "indonli", downstream_dir)
    assert indonli.origin.endswith("indonli/indonli/test_expert") and len(indonli.dataset) == 2


def test_string_labels_are_matched_case_insensitively(tmp_path):
    rows = [
        {
            "genre": "x",
            "label": label,
            "sentence1_en": "a",
            "sentence2_en": "b",
            "sentence1_my": "က",
            "sentence2_my": "ခ",
        }
        for label in ("Entailment ", "NEUTRAL", "contradiction")
    ]
    rows[1]["sentence1_my"] = None  # a null text is read as an empty string (with a warning), not a crash
    write_jsonl(tmp_path / "myxnli" / "default" / "test.jsonl", rows)
    dataset = load_one("myxnli", "mya", "default", tmp_path).dataset
    assert dataset["label"] == [0, 1, 2] and dataset["premise"] == ["က", "", "က"]


def test_resume_after_interruption_and_linear_probe(tiny_bert, downstream_dir, cache_dir, tmp_path, crash_after):
    out = tmp_path / "out"
    argv = nli_argv(
        tiny_bert,
        downstream_dir,
        out,
        cache_dir,
        "--eval_languages",
        "eng",
        "--save_steps",
        "4",
        "--finetune_mode",
        "linear",
    )
    with crash_after(Trainer, 6):
        run_xnli.main(argv)
    assert (out / "checkpoint-4").is_dir() and not (out / "model.safetensors").exists()

    metrics = run_xnli.main(argv)  # finds checkpoint-4 by itself
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    # "eng" is XNLI's English (in-language) and AfriXNLI's English; neither enters the zero-shot average.
    assert "eval_xnli_eng_accuracy" in metrics and "eval_afrixnli_eng_accuracy" in metrics
    assert "eval_avg_accuracy" not in metrics
    # Linear probe: encoder weights as in the base model, the head trained.
    base, tuned = load_file(Path(tiny_bert) / "model.safetensors"), load_file(out / "model.safetensors")
    name = "encoder.layer.1.output.dense.weight"
    assert torch.equal(base[name], tuned[f"bert.{name}"])
    with pytest.raises(ValueError, match="other settings.*finetune_mode"):
        run_xnli.main([*argv[:-2], "--finetune_mode", "full"])


def test_rerun_of_a_finished_run_trains_nothing_and_adds_no_rows(tiny_bert, downstream_dir, cache_dir, tmp_path):
    """24 English pairs at batch 8 are 3 steps an epoch: resumed from its last checkpoint (step 2 of 2), the Trainer
    would train step 3. A re-run must train nothing, keep the weights and the results table as they are, and neither a
    half-written all_results.json nor a stop before the final save may wedge the run."""
    out = tmp_path / "out"
    results = tmp_path / "results.csv"
    argv = nli_argv(
        tiny_bert,
        downstream_dir,
        out,
        cache_dir,
        "--eval_languages",
        "yor",
        "--max_steps",
        "2",
        "--results_file",
        str(results),
    )

    def state():
        saved = json.loads((out / "trainer_state.json").read_text())
        return saved["global_step"], saved["max_steps"]

    first = run_xnli.main(argv)
    weights = load_file(out / "model.safetensors")
    with open(results, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert state() == (2, 2) and len(rows) == 2  # xnli eng, afrixnli yor

    def unchanged(metrics):
        assert state() == (2, 2)
        for key, value in load_file(out / "model.safetensors").items():
            assert torch.equal(value, weights[key]), key
        with open(results, newline="", encoding="utf-8") as f:
            again = list(csv.DictReader(f))
        assert [(r["source"], r["language"], r["value"]) for r in again] == [
            (r["source"], r["language"], r["value"]) for r in rows
        ]
        assert metrics["eval_avg_accuracy"] == pytest.approx(first["eval_avg_accuracy"])
        assert metrics["train_loss"] == pytest.approx(first["train_loss"])

    unchanged(run_xnli.main(argv))

    # The Trainer rewrites all_results.json in place: a run stopped meanwhile leaves half a file.
    (out / "all_results.json").write_text('{"epoch": 1.0, "eval_xnli_en')
    unchanged(run_xnli.main(argv))
    combined = json.loads((out / "all_results.json").read_text())
    assert "train_loss" in combined and "eval_avg_accuracy" in combined

    # Stopped after the last checkpoint, before the final model: the checkpoint's weights are the final ones.
    (out / "model.safetensors").unlink()
    (out / "trainer_state.json").unlink()
    unchanged(run_xnli.main(argv))


def test_push_to_hub_uploads_the_model_and_card_only(tiny_bert, downstream_dir, cache_dir, tmp_path, fake_hub):
    out = tmp_path / "out"
    token = "hf_" + "y" * 34
    run_xnli.main(
        nli_argv(
            tiny_bert,
            downstream_dir,
            out,
            cache_dir,
            "--eval_languages",
            "yor",
            "--max_steps",
            "2",
            "--push_to_hub",
            "--hub_model_id",
            "user/nli",
            "--hub_token",
            token,
        )
    )
    (commit,) = fake_hub  # one upload, at the end (saving the model does not push by itself)
    assert commit["repo_id"] == "user/nli" and commit["token"] == token
    for path in out.rglob("*"):
        assert not path.is_file() or token.encode() not in path.read_bytes(), path
    uploaded = set(commit["files"])
    assert {"README.md", "config.json", "model.safetensors", "tokenizer_config.json"} <= uploaded
    assert not uploaded & {
        "training_args.bin",
        "finetune_settings.json",
        "trainer_state.json",
        "all_results.json",
        "results.csv",
    } and not any("/" in name for name in uploaded)
    assert "## Zero-shot evaluation" in commit["files"]["README.md"].decode()


def test_hub_loading_routes_each_source_to_its_loader(tiny_bert, downstream_dir, cache_dir, tmp_path, monkeypatch):
    """Without --data_dir every source goes to the Hub: IndoNLI through its parquet branch (test_expert split),
    Myanmar-XNLI at its pinned revision; the fixture data stands in for the downloads."""
    calls = []

    def fake_load_hub_split(hub_id, config, split, *, parquet_branch=False, revision=None, cache_dir=None):
        calls.append((hub_id, config, split, parquet_branch, revision))
        source = {s.hub_id: name for name, s in run_xnli.SOURCES.items()}[hub_id]
        path = downstream_utils.find_local_split(
            str(downstream_dir), source, config, split, (".parquet", ".jsonl", ".tsv")
        )
        return downstream_utils.read_local_table(path, str(cache_dir))

    monkeypatch.setattr(run_xnli, "load_hub_split", fake_load_hub_split)
    metrics = run_xnli.main(
        [
            "--model_name_or_path",
            tiny_bert,
            "--output_dir",
            str(tmp_path / "o"),
            "--use_cpu",
            "--max_steps",
            "2",
            "--cache_dir",
            str(cache_dir),
            "--results_file",
            "none",
            "--eval_languages",
            "ind,mya,yor,gn",
            "--dataset_revisions",
            "afrixnli=abc",
        ]
    )
    assert calls == [
        ("facebook/xnli", "en", "train", False, None),
        ("facebook/xnli", "en", "test", False, None),
        ("masakhane/afrixnli", "yor", "test", False, "abc"),
        ("nala-cub/americas_nli", "gn", "test", False, None),
        ("afaji/indonli", "indonli", "test_expert", True, None),
        ("akhtet/myanmar-xnli", "default", "test", False, run_xnli.MYXNLI_REVISION),
    ]
    assert {"eval_indonli_ind_accuracy", "eval_myxnli_mya_accuracy", "eval_americasnli_grn_accuracy"} <= set(metrics)


def test_two_process_run_writes_one_set_of_results(tiny_bert, downstream_dir, tmp_path):
    """Under torchrun both processes train and evaluate together; rank 0 alone writes all_results.json and the rows."""
    out = tmp_path / "out"
    argv = nli_argv(
        tiny_bert,
        downstream_dir,
        out,
        tmp_path / "cache",
        "--eval_languages",
        "yor,swa,quy",
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29611",
        str(ROOT / "run_xnli.py"),
        *argv,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_afrixnli_yor_samples"] == 2 and 0 <= results["eval_avg_accuracy"] <= 1
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["source"], r["language"]) for r in rows) == [
        ("afrixnli", "swa"),
        ("afrixnli", "yor"),
        ("americasnli", "quy"),
        ("xnli", "eng"),
        ("xnli", "swa"),
    ]


def bad_dir(root: Path) -> Path:
    write_nli_parquet(root / "xnli" / "en" / "train.parquet", nli_rows("eng", 8))
    write_nli_parquet(root / "xnli" / "en" / "test.parquet", nli_rows("eng", 2))
    return root


def myxnli_with_premise_columns(root: Path) -> None:
    write_jsonl(root / "myxnli" / "default" / "test.jsonl", [{"premise": "a", "hypothesis": "b", "label": "neutral"}])


def afrixnli_with_unknown_label(root: Path) -> None:
    write_afrixnli(root, "yor", 2)
    path = root / "afrixnli" / "yor" / "test.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].rsplit("\t", 1)[0] + "\tmaybe"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def afrixnli_with_out_of_range_id(root: Path) -> None:
    write_afrixnli(root, "yor", 2)
    path = root / "afrixnli" / "yor" / "test.tsv"
    path.write_text(path.read_text(encoding="utf-8").replace("\t1\n", "\t3\n"), encoding="utf-8")


def afrixnli_with_broken_row(root: Path) -> None:
    path = root / "afrixnli" / "yor" / "test.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("premise\thypothesis\tlabel\na\tb\t0\nonly two\tfields\n", encoding="utf-8")


def xnli_not_json(root: Path) -> None:
    path = root / "xnli" / "sw" / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"premise": "a", "hypothesis": "b", "label": 0}\n{not json\n', encoding="utf-8")


@pytest.mark.parametrize(
    "languages, breaker, error, match",
    [
        ("mya", myxnli_with_premise_columns, ValueError, r"missing column\(s\) \['sentence1_my', 'sentence2_my'\]"),
        ("yor", afrixnli_with_unknown_label, ValueError, r"label name\(s\) \[.*'maybe'\] of column 'label'"),
        ("yor", afrixnli_with_out_of_range_id, ValueError, r"label ids \[3\] outside 0..2"),
        ("yor", afrixnli_with_broken_row, ValueError, r"yor/test.tsv:3: 2 fields, but the header has 3"),
        ("swa", xnli_not_json, ValueError, r"sw/test.jsonl: cannot be read as .jsonl"),
        ("klingon", None, ValueError, "neither a language code nor a subset"),
        # An absent local evaluation file is skipped with a warning, not an error: tests/test_local_data.py.
    ],
)
def test_bad_input_fails_before_training(languages, breaker, error, match, tiny_bert, cache_dir, tmp_path):
    data = bad_dir(tmp_path / "data")
    if breaker:
        breaker(data)
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        run_xnli.main(nli_argv(tiny_bert, data, out, cache_dir, "--eval_languages", languages))
    assert not out.exists()  # nothing written: the input is checked before anything is recorded


def test_unknown_eval_source(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="unknown source.*wikiann.*xnli, afrixnli"):
        run_xnli.main(["--model_name_or_path", tiny_bert, "--output_dir", str(tmp_path), "--eval_sources", "wikiann"])


# -- copies that must not drift ---------------------------------------------------------------------------------------


def test_shared_copies_agree():
    # The realigned-checkpoint config file name is written by run_realign.py and read by realign_utils.
    assert downstream_utils.REALIGN_CONFIG_FILE == run_realign.CONFIG_FILE
    # Its settings file name too: the guard of every script refuses a folder holding another script's run.
    assert realign_utils.REALIGN_SETTINGS_FILE == run_realign.SETTINGS_FILE

    # Both downstream scripts declare the same model arguments and the paper's settings, epochs and save interval
    # aside.
    def fields(cls):
        return [(f.name, f.default, f.metadata["help"]) for f in dataclasses.fields(cls)]

    assert fields(run_xnli.ModelArguments) == fields(run_token_classification.ModelArguments)
    differing = {"num_train_epochs", "save_steps"}
    tc, nli = run_token_classification.PAPER_TRAINING_DEFAULTS, run_xnli.PAPER_TRAINING_DEFAULTS
    assert {k: v for k, v in tc.items() if k not in differing} == {k: v for k, v in nli.items() if k not in differing}
    assert (tc["num_train_epochs"], nli["num_train_epochs"]) == (5, 2)
    shared = {
        "eval_languages",
        "eval_sources",
        "data_dir",
        "dataset_revisions",
        "max_seq_length",
        "eval_max_seq_length",
        "max_train_samples",
        "max_eval_samples",
        "preprocessing_num_workers",
        "overwrite_cache",
        "results_file",
    }
    assert shared <= {f.name for f in dataclasses.fields(run_xnli.DataArguments)}
    assert shared <= {f.name for f in dataclasses.fields(run_token_classification.DataArguments)}
    assert run_xnli.run_settings.__doc__ == run_token_classification.run_settings.__doc__
