"""End-to-end runs of run_realign.main() on tiny models and fixture parallel files, and its bad-input errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForTokenClassification

import run_realign

ROOT = Path(__file__).resolve().parents[1]


def realign_argv(model: str, parallel_dirs: dict, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        model,
        "--languages",
        "fra,yor,swa",
        "--parallel_data_dir",
        str(parallel_dirs["train"]),
        "--eval_parallel_data_dir",
        str(parallel_dirs["eval"]),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "30",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "5",
        "--save_steps",
        "15",
        "--use_cpu",
        "--seed",
        "7",
        "--cache_dir",
        str(output_dir.parent / "cache"),
        *extra,
    ]


def logged_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.parametrize("model_fixture", ["tiny_bert", "tiny_xlmr"])
def test_realign_end_to_end(model_fixture, request, parallel_dirs, tmp_path):
    model = request.getfixturevalue(model_fixture)
    out = tmp_path / "out"
    metrics = run_realign.main(realign_argv(model, parallel_dirs, out))

    losses = logged_losses(out)
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0], losses

    state = json.loads((out / "trainer_state.json").read_text())
    train_logs = [e for e in state["log_history"] if "train_retrieval_acc" in e]
    assert train_logs and all(0 <= e["train_retrieval_acc"] <= 1 for e in train_logs)
    assert train_logs[-1]["train_positive_cosine"] > train_logs[-1]["train_negative_cosine"]

    # Held-out retrieval: keys for every language and their average.
    for code in ("fra", "yor", "swa"):
        for key in ("retrieval_en2xx", "retrieval_xx2en", "retrieval_acc"):
            assert 0 <= metrics[f"eval_{code}_{key}"] <= 1
    assert "eval_loss" in metrics and metrics["eval_avg_retrieval_acc"] == pytest.approx(
        sum(metrics[f"eval_{c}_retrieval_acc"] for c in ("fra", "yor", "swa")) / 3
    )
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_fra_retrieval_acc" in results and "train_loss" in results

    # The checkpoint is a plain encoder that the Auto classes load, with trained weights.
    reloaded = AutoModel.from_pretrained(out)
    base = AutoModel.from_pretrained(model)
    name = "embeddings.word_embeddings.weight"
    assert not torch.allclose(reloaded.state_dict()[name], base.state_dict()[name])
    AutoModelForTokenClassification.from_pretrained(out, num_labels=3)

    config = json.loads((out / run_realign.CONFIG_FILE).read_text())
    assert config["languages"] == ["fra", "yor", "swa"]
    assert config["steps"] == 30 and config["seed"] == 7 and config["base_model"] == model
    assert set(config["pair_counts"]) == {"fra", "yor", "swa"}
    assert config["pair_counts"]["fra"]["kept"] == 18 and config["pair_counts"]["fra"]["held_out"] == 6
    assert config["loss"]["temperature"] == 0.1 and config["loss"]["pooling"] == "mean"
    assert config["code_version"]
    card = (out / "README.md").read_text()
    assert "## Realignment" in card and "fra, yor, swa" in card


def test_reference_compat_drops_projection_head(tiny_xlmr, parallel_dirs, tmp_path):
    out = tmp_path / "out"
    run_realign.main(realign_argv(tiny_xlmr, parallel_dirs, out, "--reference_compat", "--max_steps", "10"))
    config = json.loads((out / run_realign.CONFIG_FILE).read_text())
    assert config["loss"]["projection_head"] is True and config["loss"]["strip_sentencepiece_space"] is True
    saved = load_file(out / "model.safetensors")
    assert not any(k.startswith(run_realign.PROJECTION_PREFIX) for k in saved)
    # Intermediate checkpoints keep the head, so a resumed run continues with it.
    checkpoint = load_file(out / "checkpoint-10" / "model.safetensors")
    assert any(k.startswith(run_realign.PROJECTION_PREFIX) for k in checkpoint)


def test_interrupted_run_resumes_to_the_same_result(tiny_bert, parallel_dirs, tmp_path, crash_after):
    full = tmp_path / "full"
    run_realign.main(realign_argv(tiny_bert, parallel_dirs, full))

    interrupted = tmp_path / "interrupted"
    with crash_after(run_realign.RealignTrainer, 20):
        run_realign.main(realign_argv(tiny_bert, parallel_dirs, interrupted))
    assert (interrupted / "checkpoint-15").is_dir() and not (interrupted / "model.safetensors").exists()

    run_realign.main(realign_argv(tiny_bert, parallel_dirs, interrupted))  # finds checkpoint-15 by itself
    state = json.loads((interrupted / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    a, b = load_file(full / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


@pytest.mark.parametrize("killed_in", ["_save", "_save_rng_state"])
def test_kill_while_saving_a_checkpoint_resumes_from_the_last_complete_one(
    killed_in, tiny_bert, parallel_dirs, tmp_path, monkeypatch, capsys
):
    """A kill while checkpoint-8 is written (its folder just created, or holding weights and optimizer but no RNG or
    trainer state) must not wedge the run: the rerun resumes from checkpoint-4 and ends where an unbroken run ends."""
    from transformers import Trainer

    argv = ["--max_steps", "12", "--save_steps", "4", "--logging_steps", "4"]
    full = tmp_path / "full"
    run_realign.main(realign_argv(tiny_bert, parallel_dirs, full, *argv))

    original = getattr(Trainer, killed_in)

    def killed(self, output_dir=None, *args, **kwargs):
        if self.state.global_step == 8:
            if killed_in == "_save":
                Path(output_dir).mkdir(parents=True)  # the folder appears, then the process dies
            raise KeyboardInterrupt("killed while saving")
        return original(self, output_dir, *args, **kwargs)

    out = tmp_path / "killed"
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt, match="killed while saving"):
        patch.setattr(Trainer, killed_in, killed)
        run_realign.main(realign_argv(tiny_bert, parallel_dirs, out, *argv))
    assert (out / "checkpoint-8").is_dir() and not (out / "checkpoint-8" / "trainer_state.json").exists()

    capsys.readouterr()
    run_realign.main(realign_argv(tiny_bert, parallel_dirs, out, *argv))
    log = capsys.readouterr().out  # setup_logging logs to stdout
    assert "Skipping 1 incomplete checkpoint(s)" in log and "checkpoint-8 (" in log
    assert f"Resuming from {out / 'checkpoint-4'}" in log
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 12
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert logged_losses(out)[-2:] == pytest.approx(logged_losses(full)[-2:], abs=1e-5)


def test_output_dir_with_other_settings_is_refused(tiny_bert, parallel_dirs, tmp_path):
    out = tmp_path / "out"
    run_realign.main(realign_argv(tiny_bert, parallel_dirs, out, "--max_steps", "5"))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match="other settings.*temperature"):
        run_realign.main(realign_argv(tiny_bert, parallel_dirs, out, "--max_steps", "5", "--temperature", "0.05"))
    assert sorted(p.name for p in out.iterdir()) == before


def test_settings_guard_compares_resolved_settings_and_knows_its_checkpoints(tiny_bert, parallel_dirs, tmp_path):
    out = tmp_path / "out"
    argv = realign_argv(tiny_bert, parallel_dirs, out, "--max_steps", "3", "--save_steps", "3")
    at = argv.index("--languages") + 1
    argv[at] = "fra,yor"
    first = run_realign.main(argv)
    weights = load_file(out / "model.safetensors")
    argv[at] = "FRA,Yo"  # the same languages, spelt otherwise: the same finished run, which trains nothing more
    again = run_realign.main(argv)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    assert again["train_loss"] == first["train_loss"] > 0  # the run's loss, not that of zero steps
    assert all(torch.equal(value, weights[key]) for key, value in load_file(out / "model.safetensors").items())

    # Checkpoints whose settings file is gone cannot be told apart from another run's: refused, not resumed.
    (out / run_realign.SETTINGS_FILE).unlink()
    with pytest.raises(ValueError, match=r"holds checkpoints \(checkpoint-3\) but no realign_settings.json"):
        run_realign.main([*argv, "--temperature", "0.05"])
    assert not (out / run_realign.SETTINGS_FILE).exists()


def test_following_the_overlong_advice_in_the_same_output_dir(tiny_bert, parallel_dirs, tmp_path):
    out = tmp_path / "out"
    argv = realign_argv(tiny_bert, parallel_dirs, out, "--max_steps", "2", "--max_seq_length", "6")
    with pytest.raises(ValueError, match="filtered out.*use --overlong truncate"):
        run_realign.main(argv)
    assert not out.exists() or not any(out.iterdir())  # refused for its input: nothing recorded
    run_realign.main([*argv, "--overlong", "truncate"])
    settings = json.loads((out / run_realign.SETTINGS_FILE).read_text())["settings"]
    assert settings["data"]["overlong"] == "truncate"


def test_config_yaml_with_cli_override(tiny_bert, parallel_dirs, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("temperature: 0.2\nmax_steps: 4\nlanguages: fra,yor\n")
    out = tmp_path / "out"
    argv = ["--config", str(config), *realign_argv(tiny_bert, parallel_dirs, out)]
    argv[argv.index("--max_steps") + 1] = "3"
    argv[argv.index("--languages") : argv.index("--languages") + 2] = []
    run_realign.main(argv)
    saved = json.loads((out / run_realign.CONFIG_FILE).read_text())
    assert saved["loss"]["temperature"] == 0.2  # from the YAML
    assert saved["steps"] == 3  # the command line wins
    assert saved["languages"] == ["fra", "yor"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("temprature: 0.2\n")
    with pytest.raises(ValueError, match="unknown key.*temprature"):
        run_realign.main(["--config", str(bad), *realign_argv(tiny_bert, parallel_dirs, tmp_path / "o2")])


def test_group_by_length_pads_less(tiny_bert, parallel_dirs, tmp_path, monkeypatch):
    original = run_realign.PairCollator.__call__
    padding = {}
    for strategy in ("random", "group_by_length"):
        masks = []

        def recording(self, features, masks=masks):
            batch = original(self, features)
            masks.append(batch["attention_mask"])
            return batch

        monkeypatch.setattr(run_realign.PairCollator, "__call__", recording)
        out = tmp_path / strategy
        argv = realign_argv(tiny_bert, parallel_dirs, out, "--max_steps", "12", "--train_sampling_strategy", strategy)
        held_out = argv.index("--eval_parallel_data_dir")
        run_realign.main(argv[:held_out] + argv[held_out + 2 :])
        assert len(masks) == 12
        training = masks
        padding[strategy] = 1 - sum(int(m.sum()) for m in training) / sum(m.numel() for m in training)
        settings = json.loads((out / run_realign.SETTINGS_FILE).read_text())["settings"]
        assert settings["training"]["train_sampling_strategy"] == strategy
    # Not to zero: the two sides of a pair still differ in length (0.23 → 0.14 with this fixture).
    assert padding["group_by_length"] < 0.75 * padding["random"], padding


def test_unsupported_sampling_strategy_is_refused(tiny_bert, parallel_dirs, tmp_path, capsys):
    with pytest.raises(ValueError, match="train_sampling_strategy sequential is not available"):
        run_realign.main(
            realign_argv(tiny_bert, parallel_dirs, tmp_path / "out", "--train_sampling_strategy", "sequential")
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        run_realign.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "'group_by_length': the same draws, reordered" in help_text and "The other values are refused." in help_text


# -- bad input: a clear error and no output --------------------------------------------------------------------------


def write_files(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    "files, match",
    [
        ({"fra.tsv": ""}, "fra.tsv holds no parallel pair"),
        ({"fra.tsv": "Hello\tBonjour\nno separator here\n"}, r"fra.tsv:2: no tab separator"),
        ({"en-fra.en": "a\nb\nc\n", "en-fra.fra": "x\ny\n"}, "has 3 lines but .* has 2"),
        ({"fra.jsonl": '{"translation": {"fr": "x"}}\n'}, r"fra.jsonl:1: expected a JSON object"),
        ({"fra.tsv": "same\tsame\n\tempty\n"}, "Every fra training pair was filtered out"),
    ],
)
def test_bad_parallel_files(files, match, tiny_bert, tmp_path):
    data = write_files(tmp_path / "data", files)
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path",
        tiny_bert,
        "--languages",
        "fra",
        "--parallel_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--use_cpu",
    ]
    with pytest.raises(ValueError, match=match):
        run_realign.main(argv)
    assert not out.exists() or not any(
        p.suffix in (".safetensors", ".json") and p.name != run_realign.SETTINGS_FILE for p in out.iterdir()
    )


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--temperature", "nan"], "--temperature must be a finite positive number"),
        (["--per_device_train_batch_size", "1"], "--per_device_train_batch_size 1 leaves the contrastive loss no neg"),
        (["--per_device_train_batch_size", "1", "--gather_negatives"], "or --gather_negatives with several processes"),
        (["--max_steps", "0"], "--max_steps must be positive for realignment, got 0"),
        (["--max_steps", "-1", "--num_train_epochs", "1"], "--max_steps must be positive for realignment, got -1"),
        (["--max_pairs_per_language", "0"], "--max_pairs_per_language must be at least 1"),
    ],
)
def test_runs_that_would_train_nothing_or_garbage_are_refused(flags, match, tiny_bert, parallel_dirs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        run_realign.main(realign_argv(tiny_bert, parallel_dirs, out, *flags))
    assert not out.exists()


def test_output_dir_that_is_a_file(tiny_bert, parallel_dirs, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(ValueError, match=r"--output_dir .*notes.txt is a file; give a folder"):
        run_realign.main(realign_argv(tiny_bert, parallel_dirs, target))
    assert target.read_text() == "keep me"


def test_a_non_finite_loss_stops_the_run_without_a_model(tiny_bert, parallel_dirs, tmp_path, monkeypatch):
    """From step 5 the loss is NaN (as a bad learning rate or fp16 overflow would make it): the run must fail loudly,
    keep the clean checkpoint of step 3 and write neither a final model nor realign_config.json."""
    calls = {"n": 0}
    loss_function = run_realign.contrastive_alignment_loss

    def nan_from_step_5(*args, **kwargs):
        calls["n"] += 1
        loss, stats = loss_function(*args, **kwargs)
        return (loss * float("nan") if calls["n"] >= 5 else loss), stats

    monkeypatch.setattr(run_realign, "contrastive_alignment_loss", nan_from_step_5)
    out = tmp_path / "out"
    argv = realign_argv(tiny_bert, parallel_dirs, out, "--max_steps", "8", "--save_steps", "3")
    held_out = argv.index("--eval_parallel_data_dir")
    with pytest.raises(FloatingPointError, match="The realignment loss is nan at step 5: training stopped"):
        run_realign.main(argv[:held_out] + argv[held_out + 2 :])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-3" / "model.safetensors").values())
    assert not (out / "model.safetensors").exists() and not (out / run_realign.CONFIG_FILE).exists()


def test_overlong_pairs_all_dropped(tiny_bert, parallel_dirs, tmp_path):
    argv = [
        "--model_name_or_path",
        tiny_bert,
        "--languages",
        "fra",
        "--parallel_data_dir",
        str(parallel_dirs["train"]),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--use_cpu",
        "--max_seq_length",
        "4",
    ]
    with pytest.raises(ValueError, match="Every fra training pair was filtered out.*overlong"):
        run_realign.main(argv)


def test_missing_language_file(tiny_bert, parallel_dirs, tmp_path):
    argv = [
        "--model_name_or_path",
        tiny_bert,
        "--languages",
        "fra,deu",
        "--parallel_data_dir",
        str(parallel_dirs["train"]),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--use_cpu",
    ]
    with pytest.raises(FileNotFoundError, match="No parallel file for deu"):
        run_realign.main(argv)


@pytest.mark.parametrize(
    "spec, error, match",
    [
        (["--languages", "fra,xyz"], ValueError, "xyz"),
        (["--subset", "no_such_subset"], FileNotFoundError, "no_such_subset"),
        ([], ValueError, "Give the languages"),
    ],
)
def test_bad_language_selection(spec, error, match, tiny_bert, parallel_dirs, tmp_path):
    argv = [
        "--model_name_or_path",
        tiny_bert,
        *spec,
        "--parallel_data_dir",
        str(parallel_dirs["train"]),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--use_cpu",
    ]
    with pytest.raises(error, match=match):
        run_realign.main(argv)
    assert not (tmp_path / "out").exists()


def test_malformed_subset_yaml(tiny_bert, parallel_dirs, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nlanguages: [fra, yor\n")
    argv = [
        "--model_name_or_path",
        tiny_bert,
        "--subset",
        str(bad),
        "--parallel_data_dir",
        str(parallel_dirs["train"]),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--use_cpu",
    ]
    with pytest.raises(ValueError, match="bad.yaml"):
        run_realign.main(argv)
    assert not (tmp_path / "out").exists()


# -- two processes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gather", [False, True])
def test_two_process_cpu_run(gather, tiny_bert, parallel_dirs, tmp_path):
    out = tmp_path / "out"
    argv = realign_argv(
        tiny_bert,
        parallel_dirs,
        out,
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "2",
        "--save_steps",
        "100",
    )
    if gather:
        argv.append("--gather_negatives")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + gather),
        str(ROOT / "run_realign.py"),
        *argv,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert json.loads((out / run_realign.CONFIG_FILE).read_text())["settings"]["training"]["world_size"] == 2
    AutoModel.from_pretrained(out)
    retrieval = [e["train_retrieval_acc"] for e in state["log_history"] if "train_retrieval_acc" in e]
    assert retrieval
    # Each query's negatives: the other 2·4 − 2 sentences of its process, or 2·(4·2) − 2 with gathering.
    negatives = {e["train_negatives_per_query"] for e in state["log_history"] if "train_negatives_per_query" in e}
    assert negatives == ({14} if gather else {6})


def test_canonical_command_parses_as_printed(caplog):
    """`accelerate launch run_realign.py --subset subsets/uriel_20.yaml` needs nothing else: the paper's XLM-R base
    and an output folder named after the model, subset and seed (printed)."""
    with caplog.at_level(logging.WARNING, logger="run_realign"):
        model_args, data_args, realign_args, extension_args, training_args = run_realign.parse_realign_args(
            ["--subset", "subsets/uriel_20.yaml"]
        )
    assert model_args.model_name_or_path == "xlm-roberta-base"
    expected = str(Path("out") / "realign" / "xlm-roberta-base" / "uriel_20" / "seed42")
    assert training_args.output_dir == expected
    assert any(expected in record.getMessage() for record in caplog.records)
    assert (training_args.max_steps, training_args.learning_rate, realign_args.temperature) == (24_544, 2e-5, 0.1)
    assert extension_args.weights == {"align": 1.0, "bow": 0.0, "mlm": 0.0}
    _, _, _, _, other = run_realign.parse_realign_args(
        ["--languages", "Yor,swa", "--model_name_or_path", "models/e5/", "--seed", "17"]
    )
    assert other.output_dir == str(Path("out") / "realign" / "e5" / "languages-swa-yor" / "seed17")
    _, _, _, _, given = run_realign.parse_realign_args(["--subset", "uriel_20", "--output_dir", "mine"])
    assert given.output_dir == "mine"
