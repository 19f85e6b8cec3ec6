"""The recipes on tiny models: the paper's grid (finished cells skipped, a broken one redone), realign_and_evaluate.sh,
the launch configs (DeepSpeed ZeRO-2 with two CPU processes) and the model card uploaded with --push_to_hub (offline).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PARALLEL
from fixtures_downstream import downstream_dir_for_session
from safetensors.torch import load as safetensors_load
from transformers import AutoModel

import collect_results
import lang_registry
import run_realign

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GRID_SUBSETS = ("uriel_5", "random_5")
GRID_SEEDS = (17, 23)
TASKS = ("pos", "ner", "nli")
EVAL_LANGUAGES = "yor,swa,fra,quy"


@pytest.fixture(scope="module")
def pool_parallel_dir(tmp_path_factory) -> Path:
    """English ↔ L files for all 65 pool languages (fixture sentences), so that any shipped subset can be realigned."""
    folder = tmp_path_factory.mktemp("parallel-pool")
    for i, code in enumerate(lang_registry.load_registry().pool()):
        rows = [f"{row[0]}\t{row[1 + i % 3]}" for row in PARALLEL[:18]]
        (folder / f"{code}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def downstream_dir(tmp_path_factory) -> Path:
    return downstream_dir_for_session(tmp_path_factory)


def recipe_env(cache: Path, **variables: str) -> dict[str, str]:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        PYTHON=sys.executable,
        ACCELERATE=str(BIN / "accelerate"),
        HF_DATASETS_CACHE=str(cache),
        **variables,
    )


def run(command: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- the grid ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grid_runs_once_skips_finished_cells_and_redoes_broken_ones(
    tiny_xlmr, pool_parallel_dir, downstream_dir, tmp_path
):
    out, results = tmp_path / "out", tmp_path / "results"
    env = recipe_env(
        tmp_path / "cache",
        EXTRA_ARGS=f"--use_cpu --cache_dir {tmp_path / 'cache'} --logging_steps 1",
        REALIGN_ARGS=f"--parallel_data_dir {pool_parallel_dir} --max_steps 2 --per_device_train_batch_size 4",
        DOWNSTREAM_ARGS=f"--data_dir {downstream_dir} --eval_languages {EVAL_LANGUAGES} --max_steps 2 "
        "--per_device_train_batch_size 8",
    )
    grid = [
        "bash",
        "recipes/reproduce_paper.sh",
        "--models",
        tiny_xlmr,
        "--subsets",
        ",".join(GRID_SUBSETS),
        "--seeds",
        ",".join(map(str, GRID_SEEDS)),
        "--out_root",
        str(out),
        "--results_dir",
        str(results),
        "--accelerate_config",
        "none",
        "--jobs",
        "2",
        "--devices",
        "none",
    ]
    model = Path(tiny_xlmr).name

    first = run(grid, env)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert first.stdout.count(": running") == len(GRID_SUBSETS) * len(GRID_SEEDS) * 4

    registry = lang_registry.load_registry()
    counts = {}
    for subset in GRID_SUBSETS:
        for seed in GRID_SEEDS:
            group = out / model / subset / f"seed{seed}"
            config = json.loads((group / "realign" / "realign_config.json").read_text())
            assert config["subset"]["name"] == subset and config["seed"] == seed and config["steps"] == 2
            if subset == "random_5":  # drawn with the run seed, as the paper's seeded random rows
                assert config["languages"] == lang_registry.draw_random(registry.pool(), 5, seed)
            # One realignment per (model, subset, seed), reused by the three tasks.
            assert (group / "realign.log").read_text().count("\n# ") == 1
            for task in TASKS:
                assert f"--model_name_or_path {group / 'realign'}" in (group / f"{task}.log").read_text()
                rows = read_rows(results / model / subset / f"seed{seed}" / f"{task}.csv")
                assert {(r["model"], r["subset"], r["seed"], r["task"]) for r in rows} == {
                    (tiny_xlmr, subset, str(seed), task)
                }
                counts[(subset, seed, task)] = len(rows)
    random_draws = [
        json.loads((out / model / "random_5" / f"seed{s}" / "realign" / "realign_config.json").read_text())[
            "languages"
        ]
        for s in GRID_SEEDS
    ]
    assert random_draws[0] != random_draws[1]

    # Second run: nothing to do.
    logs = {p: p.stat().st_mtime_ns for p in out.rglob("*.log")}
    second = run(grid, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert ": running" not in second.stdout and second.stdout.count("finished, skipped") == 4
    assert logs == {p: p.stat().st_mtime_ns for p in out.rglob("*.log")}
    plan = run([*grid, "--dry-run", "--seconds_per_step", "realign=0.05,pos=0.1,ner=0.1,nli=0.1"], env)
    assert plan.returncode == 0 and "steps to run: 0, finished (skipped): 16" in plan.stdout

    # Break two cells: a results file deleted, and a run that stopped between training and evaluation (the Trainer
    # has written all_results.json, without the evaluation). Only those two run again, and no row is doubled.
    (results / model / "uriel_5" / "seed23" / "ner.csv").unlink()
    half = out / model / "random_5" / "seed17" / "nli" / "all_results.json"
    half.write_text(json.dumps({k: v for k, v in json.loads(half.read_text()).items() if k.startswith("train")}))
    untouched = results / model / "uriel_5" / "seed17" / "pos.csv"
    before = untouched.stat().st_mtime_ns
    plan = run([*grid, "--dry-run"], env)
    assert "steps to run: 2, finished (skipped): 14" in plan.stdout
    third = run(grid, env)
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-4000:]
    ran = re.findall(r"\] \S+ (\S+) seed (\d+) (\w+): running", third.stdout)
    assert sorted(ran) == [("random_5", "17", "nli"), ("uriel_5", "23", "ner")]
    assert untouched.stat().st_mtime_ns == before
    for subset, seed, task in (("uriel_5", 23, "ner"), ("random_5", 17, "nli")):
        assert len(read_rows(results / model / subset / f"seed{seed}" / f"{task}.csv")) == counts[(subset, seed, task)]

    # Finished cells are never silently reused with other arguments.
    changed = dict(env, DOWNSTREAM_ARGS=env["DOWNSTREAM_ARGS"].replace("--max_steps 2", "--max_steps 3"))
    conflict = run([*grid, "--dry-run"], changed)
    assert conflict.returncode == 1 and "finished with other arguments: 12" in conflict.stdout
    refused = run([*grid, "--cell-index", "0"], changed)
    assert refused.returncode == 1 and "was finished with other arguments" in refused.stderr

    # The report reads the per-task results files.
    report = tmp_path / "report"
    assert collect_results.main([str(results), "--out", str(report)]) == 0
    cells = read_rows(report / "cells.csv")
    assert len(cells) == len(GRID_SUBSETS) * len(GRID_SEEDS) * len(TASKS)
    main_table = read_rows(report / f"table_main_{model}.csv")
    assert [r["subset"] for r in main_table] == ["uriel_5", "random_5"]
    assert all(r["seeds"] == "2" and r["avg"] for r in main_table)


# A stand-in for `python` that the grid runs its steps with (--accelerate_config none): it writes the outputs the grid
# checks, as the real scripts would, and logs each step it runs; with FAKE_STEP_HANGS=1 it starts a worker (as a
# launcher does) and both wait until they are killed.
FAKE_PYTHON = """#!{python}
import json, os, subprocess, sys, time
from pathlib import Path

script, args = Path(sys.argv[1]).name, sys.argv[2:]
value = {{flag: args[i + 1] for i, flag in enumerate(args[:-1]) if flag.startswith("--")}}
out = Path(value["--output_dir"])
with open(os.environ["FAKE_STEP_RUNS"], "a") as runs:
    runs.write(f"{{os.getpid()}} {{out.name}}\\n")
if os.environ.get("FAKE_STEP_HANGS"):
    worker = subprocess.Popen(["sleep", "600"])
    with open(os.environ["FAKE_STEP_RUNS"], "a") as runs:
        runs.write(f"{{worker.pid}} worker\\n")
    worker.wait()
out.mkdir(parents=True, exist_ok=True)
if script == "run_realign.py":
    (out / "realign_config.json").write_text("{{}}")
else:
    metric = "f1" if value.get("--task") == "ner" else "accuracy"
    (out / "all_results.json").write_text(json.dumps({{f"eval_avg_{{metric}}": 0.5}}))
    results = Path(value["--results_file"])
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("header\\nrow\\n")
"""


@pytest.fixture
def fake_grid(tmp_path):
    """Yields (command, env, runs file) of a grid of one realignment + POS whose steps run FAKE_PYTHON."""
    python = tmp_path / "fake-python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    runs = tmp_path / "runs.txt"
    runs.touch()
    command = [
        sys.executable,
        "recipes/grid.py",
        "--models",
        "m",
        "--subsets",
        "uriel_5",
        "--seeds",
        "17",
        "--tasks",
        "pos",
        "--out_root",
        str(tmp_path / "out"),
        "--results_dir",
        str(tmp_path / "results"),
        "--accelerate_config",
        "none",
    ]
    yield command, dict(os.environ, PYTHON=str(python), FAKE_STEP_RUNS=str(runs)), runs
    for pid, _ in started(runs):  # whatever a failing test left running
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def started(runs: Path) -> list[tuple[int, str]]:
    return [(int(pid), name) for pid, name in (line.split() for line in runs.read_text().splitlines())]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_grid_stops_its_step_and_the_step_s_workers(stop, fake_grid):
    command, env, runs = fake_grid
    grid = subprocess.Popen(
        command,
        env=dict(env, FAKE_STEP_HANGS="1"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: len(started(runs)) == 2)  # the realignment's launcher and its worker
    grid.send_signal(stop)
    _, stderr = grid.communicate(timeout=60)
    assert grid.returncode == 128 + stop and f"stopped by {signal.Signals(stop).name}" in stderr
    wait_until(lambda: not any(alive(pid) for pid, _ in started(runs)), timeout=10)


def test_a_step_that_outlives_a_killed_grid_is_not_started_twice(fake_grid):
    command, env, runs = fake_grid
    grid = subprocess.Popen(command, env=dict(env, FAKE_STEP_HANGS="1"), cwd=ROOT, stdout=subprocess.DEVNULL)
    wait_until(lambda: len(started(runs)) == 2)
    grid.kill()  # SIGKILL: nothing can stop the step, which goes on without the grid
    grid.wait()
    orphans = started(runs)
    assert all(alive(pid) for pid, _ in orphans)
    again = run(command, env)
    assert again.returncode == 0 and "realign: still running, started by an earlier grid" in again.stdout
    assert started(runs) == orphans  # no second realignment beside the first
    for pid, _ in orphans:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid, _ in orphans), timeout=10)
    after = run(command, env)
    assert after.returncode == 0 and after.stdout.count(": done in") == 2, after.stdout


def test_tasks_are_redone_when_their_realignment_is(fake_grid, tmp_path):
    command, env, runs = fake_grid
    assert run(command, env).returncode == 0
    group = tmp_path / "out" / "m" / "uriel_5" / "seed17"
    (group / "pos" / "made-from-the-old-checkpoint").touch()
    assert "finished, skipped" in run(command, env).stdout

    # The realignment is done again (its outputs removed): POS, fine-tuned from the old checkpoint, is stale.
    (group / "realign" / "realign_config.json").unlink()
    plan = run([*command, "--dry-run"], env).stdout
    assert re.search(r"RUN +realign", plan) and re.search(r"REDO +pos", plan)
    again = run(command, env)
    assert again.returncode == 0 and "pos: finished before its realignment was redone" in again.stdout
    assert [name for _, name in started(runs)] == ["realign", "pos", "realign", "pos"]
    assert not (group / "pos" / "made-from-the-old-checkpoint").exists()
    assert "finished, skipped" in run(command, env).stdout


def test_grid_plan_groups_and_cell_index(tmp_path):
    base = [
        sys.executable,
        "recipes/grid.py",
        "--out_root",
        str(tmp_path / "out"),
        "--models",
        "xlm-roberta-base,bert-base-multilingual-cased",
        "--seeds",
        "17,23,42,66",
    ]
    env = dict(os.environ)
    count = run([*base, "--subsets", "main", "--count"], env)
    assert count.returncode == 0 and count.stdout.strip() == str(2 * 33 * 4)  # 32 Table 6/8 rows + `none`
    count = run([*base, "--subsets", "ablation", "--count"], env)
    assert count.stdout.strip() == str(2 * (29 + 2) * 4)
    assert run([*base, "--subsets", "all", "--count"], env).stdout.strip() == str(2 * (33 + 29) * 4)
    # Groups are numbered model by model, subset by subset, seed by seed: none, all_65, joshi2_family, joshi2_script,
    # joshi2_uriel, joshi2_random_10, ... (the ablation 'Random' rows as draws of 10 from their pool).
    plan = run(
        [
            *base,
            "--subsets",
            "ablation",
            "--cell-index",
            str(5 * 4 + 1),
            "--dry-run",
            "--seconds_per_step",
            "realign=0.05,pos=0.1,ner=0.1,nli=0.1",
        ],
        env,
    )
    assert plan.returncode == 0, plan.stderr
    assert "[21] xlm-roberta-base joshi2_random_10 seed 23" in plan.stdout
    assert "24544 steps" in plan.stdout and "3325 steps" in plan.stdout  # paper-scale realignment and POS
    hours = 24544 * 0.05 / 3600 + (3325 + 3125 + 24544) * 0.1 / 3600
    assert f"Estimated training time of the steps to run: {hours:.1f} h" in plan.stdout
    drawn = yaml.safe_load((tmp_path / "out" / "subsets" / "joshi2_random_10.yaml").read_text())
    assert drawn["strategy"] == "random" and drawn["n"] == 10 and drawn["pool"] == "joshi2_random"
    assert lang_registry.load_subset(tmp_path / "out" / "subsets" / "joshi2_random_10.yaml", seed=23).languages == (
        lang_registry.draw_random(lang_registry.load_subset("joshi2_random").languages, 10, 23)
    )
    bad = run([*base, "--subsets", "main", "--cell-index", "999"], env)
    assert bad.returncode == 2 and "out of range" in bad.stderr
    bad = run([*base, "--subsets", "uriel_5,nonsense"], env)
    assert bad.returncode == 2 and "Unknown subset 'nonsense'" in bad.stderr


def test_slurm_array_script_runs_one_group_per_task(tmp_path):
    for script in (ROOT / "recipes").glob("*.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="3", PYTHON=sys.executable)
    args = [
        "--models",
        "xlm-roberta-base",
        "--subsets",
        "none",
        "--seeds",
        "17,23,42,66",
        "--out_root",
        str(tmp_path / "out"),
        "--dry-run",
    ]
    result = run(["bash", "recipes/slurm_array.sh", *args], env)
    assert result.returncode == 0, result.stderr
    assert "[3] xlm-roberta-base none seed 66" in result.stdout and "1 groups" in result.stdout
    assert "realign" not in result.stdout  # the fine-tuning-only baseline has no realignment step
    unset = run(["bash", "recipes/slurm_array.sh", *args], dict(os.environ))
    assert unset.returncode != 0 and "sbatch --array" in unset.stderr


# -- realign_and_evaluate.sh ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_realign_and_evaluate_recipe(tiny_bert, parallel_dirs, downstream_dir, tmp_path):
    subset = tmp_path / "tiny3.yaml"
    subset.write_text(
        yaml.safe_dump({"name": "tiny3", "strategy": "custom", "n": 3, "languages": ["fra", "yor", "swa"]})
    )
    results_file = tmp_path / "results" / "results.csv"
    env = recipe_env(
        tmp_path / "cache",
        ACCELERATE_CONFIG=str(ROOT / "accelerate_configs" / "single_gpu.yaml"),
        OUT_ROOT=str(tmp_path / "out"),
        RESULTS_FILE=str(results_file),
        TASKS="pos nli",
        EXTRA_ARGS=f"--use_cpu --cache_dir {tmp_path / 'cache'} --max_steps 2",
        REALIGN_ARGS=f"--parallel_data_dir {parallel_dirs['train']} --per_device_train_batch_size 4",
        DOWNSTREAM_ARGS=(
            f"--data_dir {downstream_dir} --eval_languages {EVAL_LANGUAGES} --per_device_train_batch_size 8"
        ),
    )
    command = ["bash", "recipes/realign_and_evaluate.sh", str(subset), tiny_bert, "17"]
    first = run(command, env)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert first.stdout.count("accelerate launch --config_file") == 3  # one per step
    run_dir = tmp_path / "out" / Path(tiny_bert).name / "tiny3" / "seed17"
    assert json.loads((run_dir / "realign" / "realign_config.json").read_text())["languages"] == ["fra", "yor", "swa"]
    rows = read_rows(results_file)
    assert {(r["model"], r["subset"], r["seed"], r["task"]) for r in rows} == {
        (tiny_bert, "tiny3", "17", "pos"),
        (tiny_bert, "tiny3", "17", "nli"),
    }
    assert {r["run_dir"] for r in rows} == {str(run_dir / "pos"), str(run_dir / "nli")}

    second = run(command, env)
    assert second.returncode == 0 and "accelerate launch" not in second.stdout
    assert second.stdout.count("finished earlier") == 3 and len(read_rows(results_file)) == len(rows)

    # Other realignment settings: the finished realignment (and POS, NLI from it) is not reused as if it matched.
    changed = dict(env, REALIGN_ARGS=env["REALIGN_ARGS"] + " --temperature 0.05")
    refused = run(command, changed)
    assert refused.returncode == 1 and "accelerate launch" not in refused.stdout
    assert f"{run_dir / 'realign'} was finished with other arguments" in refused.stderr
    assert "--temperature 0.05" in refused.stderr and "delete" in refused.stderr

    # Following the advice: the realignment is done again, and so are the tasks fine-tuned from the old one.
    shutil.rmtree(run_dir / "realign")
    third = run(command, changed)
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-4000:]
    assert third.stdout.count("accelerate launch --config_file") == 3
    assert third.stdout.count("fine-tuned from an earlier realignment") == 2
    assert json.loads((run_dir / "realign" / "realign_config.json").read_text())["loss"]["temperature"] == 0.05
    assert len(read_rows(results_file)) == len(rows)  # the tasks' rows replaced, not added
    assert "finished earlier" in run(command, changed).stdout


# -- launch configs ---------------------------------------------------------------------------------------------------


def test_launch_configs_are_consistent():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: p for p in (ROOT / "accelerate_configs").glob("*.yaml")}
    assert {
        "single_gpu",
        "multi_gpu",
        "deepspeed_zero2",
        "deepspeed_zero3",
        "cpu_2proc",
        "deepspeed_zero2_cpu",
    } <= set(configs)
    for name, path in configs.items():
        config = load_config_from_file(str(path))
        raw = yaml.safe_load(path.read_text())
        if raw["distributed_type"] == "DEEPSPEED":
            # With a DeepSpeed config file, precision comes from it ("auto" = the script's --bf16 / --fp16).
            assert "mixed_precision" not in raw, name
            assert (ROOT / raw["deepspeed_config"]["deepspeed_config_file"]).is_file(), name
        else:
            assert raw["mixed_precision"] == "no", name  # precision is a script flag, recorded with the settings
        assert config.use_cpu == (name in {"cpu_2proc", "deepspeed_zero2_cpu"}), name
    assert yaml.safe_load(configs["deepspeed_zero2_cpu"].read_text())["num_processes"] == 2


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_leave_trainer_settings_auto(stage):
    """Everything TrainingArguments owns is "auto"; optimizer and scheduler are the Trainer's own (no section)."""
    config = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    for key in (
        "train_micro_batch_size_per_gpu",
        "train_batch_size",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert config[key] == "auto", key
    assert config["fp16"]["enabled"] == "auto" and config["bf16"]["enabled"] == "auto"
    assert config["zero_optimization"]["stage"] == stage
    assert "optimizer" not in config and "scheduler" not in config
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    from transformers import BertConfig, BertModel, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args = TrainingArguments(
        output_dir="unused",
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        use_cpu=True,
        report_to="none",
    )
    hf_config = HfTrainerDeepSpeedConfig(dict(config))
    hf_config.trainer_config_process(args)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    hf_config.trainer_config_finalize(args, model, num_training_steps=10)
    filled = json.dumps(hf_config.config)
    assert '"auto"' not in filled
    assert hf_config.config["train_micro_batch_size_per_gpu"] == 16
    assert hf_config.config["gradient_accumulation_steps"] == 2


@pytest.mark.slow
def test_deepspeed_zero2_two_cpu_processes(tiny_bert, parallel_dirs, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")
    out = tmp_path / "out"
    command = [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / "deepspeed_zero2_cpu.yaml"),
        str(ROOT / "run_realign.py"),
        "--model_name_or_path",
        tiny_bert,
        "--languages",
        "fra,yor,swa",
        "--parallel_data_dir",
        str(parallel_dirs["train"]),
        "--output_dir",
        str(out),
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--use_cpu",
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    result = run(command, env, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    config = json.loads((out / run_realign.CONFIG_FILE).read_text())
    assert config["settings"]["training"]["world_size"] == 2  # two processes really ran, each on its share
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    negatives = {e["train_negatives_per_query"] for e in state["log_history"] if "train_negatives_per_query" in e}
    assert negatives == {2 * 4 - 2}  # each process contrasts its own batch of 4 pairs
    assert list((out / "checkpoint-4").glob("global_step4"))  # a DeepSpeed (ZeRO) checkpoint
    AutoModel.from_pretrained(out)


# -- model card and Hub upload ----------------------------------------------------------------------------------------


def test_push_to_hub_uploads_the_card_with_the_realignment_section(tiny_xlmr, parallel_dirs, tmp_path, fake_hub):
    out = tmp_path / "xlmr-realigned"
    token = "hf_" + "x" * 34
    metrics = run_realign.main(
        [
            "--model_name_or_path",
            tiny_xlmr,
            "--languages",
            "fra,yor,swa",
            "--parallel_data_dir",
            str(parallel_dirs["train"]),
            "--eval_parallel_data_dir",
            str(parallel_dirs["eval"]),
            "--output_dir",
            str(out),
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--save_steps",
            "2",
            "--use_cpu",
            "--seed",
            "7",
            "--reference_compat",
            "--cache_dir",
            str(tmp_path / "cache"),
            "--push_to_hub",
            "--hub_model_id",
            "user/xlmr-base-realigned-uriel20",
            "--hub_token",
            token,
        ]
    )
    (final,) = fake_hub
    assert final["repo_id"] == "user/xlmr-base-realigned-uriel20" and final["message"] == "End of realignment"
    assert final["token"] == token  # the upload is authenticated with it, ...
    for path in out.rglob("*"):  # ... and no file of the run holds it (training_args.bin pickled it before)
        assert not path.is_file() or token.encode() not in path.read_bytes(), path
    assert torch.load(out / "checkpoint-2" / "training_args.bin", weights_only=False).hub_token is None
    # What a reader of the card needs, and nothing of the run's own records (local paths) or its checkpoints.
    assert set(final["files"]) == {
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "realign_config.json",
    }
    public = json.loads(final["files"]["realign_config.json"])
    assert "settings" not in public and str(tmp_path) not in final["files"]["realign_config.json"].decode()
    assert public["languages"] == ["fra", "yor", "swa"] and public["subset"]["name"] == "custom"
    # The uploaded weights are the plain encoder: the reference-compat projection head is not in them.
    weights = safetensors_load(final["files"]["model.safetensors"])
    assert weights and not any(k.startswith(run_realign.PROJECTION_PREFIX) for k in weights)
    readme = final["files"]["README.md"].decode()
    assert readme == (out / "README.md").read_text()
    meta = yaml.safe_load(readme.split("---")[1])
    assert meta["language"] == ["en", "fr", "yo", "sw"] and meta["base_model"] == tiny_xlmr
    assert meta["realignment"]["languages"] == ["fra", "yor", "swa"] and meta["realignment"]["subset"] == "custom"
    assert meta["realignment"]["steps"] == 4 and meta["realignment"]["seed"] == 7
    assert meta["realignment"]["loss"]["projection_head"] is True and meta["realignment"]["loss"]["temperature"] == 0.1
    assert "multilingual-realignment" in meta["tags"] and "subset-custom" in meta["tags"]
    assert "## Realignment" in readme and "- Steps: 4, seed 7" in readme and "fra, yor, swa" in readme
    assert f"{metrics['eval_avg_retrieval_acc']:.4f}" in readme and "| yor |" in readme


def test_uploads_only_at_the_end(tiny_bert, parallel_dirs, tmp_path):
    argv = [
        "--model_name_or_path",
        tiny_bert,
        "--languages",
        "fra",
        "--parallel_data_dir",
        str(parallel_dirs["train"]),
        "--output_dir",
        str(tmp_path / "out"),
        "--use_cpu",
        "--push_to_hub",
        "--hub_strategy",
        "every_save",
    ]
    with pytest.raises(ValueError, match="--hub_strategy every_save would upload checkpoints as they are saved"):
        run_realign.main(argv)
