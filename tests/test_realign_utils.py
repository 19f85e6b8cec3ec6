"""The plumbing every script shares (realign_utils): which checkpoint a run resumes from, how results and settings
are written and guarded. End-to-end runs of the scripts are in their own test modules."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

import realign_utils


def write_checkpoint(folder: Path, step: int, *, ranks: int = 1) -> Path:
    """A checkpoint folder with every file the Trainer writes (tiny tensors, real formats)."""
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, folder / "model.safetensors")
    torch.save({"state": {}}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    for name in ["rng_state.pth"] if ranks == 1 else [f"rng_state_{r}.pth" for r in range(ranks)]:
        torch.save({"cpu": torch.random.get_rng_state()}, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 30}))
    return folder


def args_for(output_dir: Path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none", **kwargs)


def cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda f: (f / "trainer_state.json").unlink(), "trainer_state.json is missing"),
        (lambda f: (f / "trainer_state.json").write_text('{"global_st'), "trainer_state.json is unreadable"),
        (lambda f: cut(f / "model.safetensors", 40), "model.safetensors is cut short"),
        (lambda f: (f / "model.safetensors").unlink(), "no model weights"),
        (lambda f: cut(f / "optimizer.pt", 100), "optimizer.pt is cut short"),
        (lambda f: (f / "optimizer.pt").unlink(), "no optimizer state"),
        (lambda f: (f / "scheduler.pt").unlink(), "no scheduler state"),
        (lambda f: (f / "rng_state.pth").unlink(), "no rng_state.pth"),
    ],
)
def test_incomplete_checkpoints_are_recognised(damage, problem, tmp_path):
    folder = write_checkpoint(tmp_path / "checkpoint-10", 10)
    assert realign_utils.checkpoint_problems(folder) == []
    damage(folder)
    assert problem in realign_utils.checkpoint_problems(folder)


def test_multi_process_and_deepspeed_checkpoints(tmp_path):
    two = write_checkpoint(tmp_path / "checkpoint-2", 2, ranks=2)
    assert realign_utils.checkpoint_problems(two, world_size=2) == []
    (two / "rng_state_1.pth").unlink()  # rank 1 was stopped before saving its RNG state
    assert realign_utils.checkpoint_problems(two, world_size=2) == ["no rng_state_1.pth"]
    # DeepSpeed keeps the optimizer (and its scheduler) in global_step*/.
    deepspeed = write_checkpoint(tmp_path / "checkpoint-4", 4)
    (deepspeed / "optimizer.pt").unlink()
    (deepspeed / "scheduler.pt").unlink()
    (deepspeed / "global_step4").mkdir()
    assert realign_utils.checkpoint_problems(deepspeed) == []


def test_resume_skips_incomplete_checkpoints_and_keeps_them(tmp_path, caplog):
    out = tmp_path / "out"
    write_checkpoint(out / "checkpoint-10", 10)
    write_checkpoint(out / "checkpoint-20", 20)
    (out / "checkpoint-30").mkdir()  # killed just after creating the folder
    weights_only = out / "checkpoint-40"
    weights_only.mkdir()
    save_file({"w": torch.zeros(4)}, weights_only / "model.safetensors")  # killed after the weights
    with caplog.at_level(logging.WARNING):
        chosen = realign_utils.detect_checkpoint(args_for(out, do_train=True))
    assert chosen == str(out / "checkpoint-20")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "checkpoint-40 (" in warning and "checkpoint-30 (" in warning and "checkpoint-10" not in warning
    assert (out / "checkpoint-30").is_dir() and (weights_only / "model.safetensors").is_file()  # nothing deleted

    # Nothing complete at all: start from the beginning (with a warning), not a crash.
    (out / "checkpoint-20" / "trainer_state.json").unlink()
    (out / "checkpoint-10" / "rng_state.pth").unlink()
    assert realign_utils.detect_checkpoint(args_for(out, do_train=True)) is None

    # An explicitly given incomplete checkpoint is an error naming what is missing and the complete alternative.
    write_checkpoint(out / "checkpoint-5", 5)
    with pytest.raises(
        ValueError,
        match=r"checkpoint-40 cannot be resumed: .*no optimizer state.*beside it is "
        r".*checkpoint-5\.",
    ):
        realign_utils.detect_checkpoint(args_for(out, do_train=True, resume_from_checkpoint=str(weights_only)))


# -- results ----------------------------------------------------------------------------------------------------------


def result_row(language: str, value: float, **kwargs) -> dict:
    row = {
        "model": "m",
        "subset": "none",
        "seed": 17,
        "task": "pos",
        "source": "udpos",
        "language": language,
        "metric": "accuracy",
        "value": value,
        "run_dir": "out/pos",
    }
    return {**row, **kwargs}


def test_results_of_a_run_evaluated_again_replace_its_rows(tmp_path):
    import csv

    table = tmp_path / "results.csv"
    realign_utils.append_results(table, [result_row("yor", 0.1), result_row("wol", 0.2)])
    # The same run evaluated again (one language more), and another seed of the same cell.
    realign_utils.append_results(
        table,
        [result_row("yor", 0.3), result_row("wol", 0.4), result_row("fra", 0.5), result_row("yor", 0.6, seed=23)],
    )
    with open(table, newline="", encoding="utf-8") as f:
        rows = [(r["language"], r["seed"], r["value"]) for r in csv.DictReader(f)]
    assert rows == [("yor", "17", "0.3"), ("wol", "17", "0.4"), ("fra", "17", "0.5"), ("yor", "23", "0.6")]


def test_save_metrics_rebuilds_a_half_written_all_results(tmp_path, caplog):
    class FakeTrainer:  # the two members save_metrics uses
        args = args_for(tmp_path)

        def is_world_process_zero(self):
            return True

    trainer = FakeTrainer()
    realign_utils.save_metrics(trainer, "train", {"train_loss": 1.5})
    (tmp_path / "all_results.json").write_text('{"train_loss": 1.5, "eval_')  # stopped while writing
    with caplog.at_level(logging.WARNING):
        realign_utils.save_metrics(trainer, "eval", {"eval_avg_accuracy": 0.5})
    assert json.loads((tmp_path / "all_results.json").read_text()) == {"train_loss": 1.5, "eval_avg_accuracy": 0.5}
    assert json.loads((tmp_path / "eval_results.json").read_text()) == {"eval_avg_accuracy": 0.5}
    assert any("all_results.json is unreadable" in r.getMessage() for r in caplog.records)
