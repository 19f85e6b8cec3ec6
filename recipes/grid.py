#!/usr/bin/env python
"""Run the paper's grid of experiments: (model, subset, seed) × realignment → POS, NER and NLI, skipping finished
cells.

`recipes/reproduce_paper.sh` calls this file; the commands are the same:

    bash recipes/reproduce_paper.sh --models xlm-roberta-base,bert-base-multilingual-cased --subsets main \
        --seeds 17,23,42,66 --dry-run --seconds_per_step realign=0.05,pos=0.08,ner=0.08,nli=0.06
    bash recipes/reproduce_paper.sh --models xlm-roberta-base --subsets uriel_5,none --seeds 17
    bash recipes/reproduce_paper.sh ... --cell-index "$SLURM_ARRAY_TASK_ID"   # one (model, subset, seed) per task

Layout (OUT_ROOT, default `out/grid`; RESULTS_DIR, default `results/grid`):

    OUT_ROOT/<model>/<subset>/seed<seed>/realign/   the realigned checkpoint (reused by the three tasks)
    OUT_ROOT/<model>/<subset>/seed<seed>/{pos,ner,nli}/
    OUT_ROOT/<model>/<subset>/seed<seed>/<step>.log the step's output
    RESULTS_DIR/<model>/<subset>/seed<seed>/<task>.csv   the task's rows of the results table

A step is finished when the grid's marker `grid_step.json` (written after the step's process exits with 0) is there
and its outputs are complete: `realign_config.json` for a realignment (written after the checkpoint), and for a task
the `eval_avg_<metric>` key in `all_results.json` plus its results CSV (`all_results.json` alone is no proof: the
Trainer writes it after training, before the evaluation). Anything else is run again in its folder, so that the script
resumes from its last complete checkpoint (or, when training had finished, only evaluates); a task evaluated again
replaces its rows in the results CSV, so rows are never counted twice. Every task writes its own results CSV, so
concurrent array tasks never write the same file; `collect_results.py RESULTS_DIR` reads them all. A step finished
with other arguments is an error, not a silent reuse. A task finished before its realignment was (re)done is stale:
its folder and results CSV are removed and it is run again from the new checkpoint.

Each step runs in its own process group, with the step's log file as its output and locked: stopping the grid
(SIGTERM, SIGINT, SIGHUP) stops the running steps too, and a step that outlives a killed grid (SIGKILL) keeps its log
locked, so that a new grid leaves that group alone until the step has ended.

Every step is one `accelerate launch --config_file ACCELERATE_CONFIG script.py ...` (`--accelerate_config none`: one
plain `python script.py ...`). `--jobs N` runs N groups at once, slot i with CUDA_VISIBLE_DEVICES=i (`--devices`).

Environment variables (command-line flags override them): ACCELERATE (the accelerate executable), ACCELERATE_CONFIG,
OUT_ROOT, RESULTS_DIR, PYTHON (for `--accelerate_config none`), EXTRA_ARGS (every step), REALIGN_ARGS,
DOWNSTREAM_ARGS (the three tasks), POS_ARGS, NER_ARGS, NLI_ARGS.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import fcntl
import json
import math
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SUBSETS_DIR = ROOT / "subsets"
BASELINE = "none"  # fine-tuning only: the tasks start from the base model
TASKS = ("pos", "ner", "nli")
TASK_SCRIPTS = {"pos": "run_token_classification.py", "ner": "run_token_classification.py", "nli": "run_xnli.py"}
# The metric behind each task's macro average (`eval_avg_<metric>`, English excluded), as in the paper's tables.
TASK_METRICS = {"pos": "accuracy", "ner": "f1", "nli": "accuracy"}
MARKER = "grid_step.json"
REALIGN_CONFIG = "realign_config.json"
# Sections of Table 6 (subset files' `source.section`) that make up each named group of rows.
MAIN_SECTIONS = ("Baseline", "Featural Diversity", "Phylogenetic Diversity", "Script Diversity", "Random Selection")
ABLATION_SECTIONS = ("Ablation Languages",)
# Tables 9/11 "Random Seeded" ablation rows (Table 1): `ABLATION_DRAW` languages drawn with the run seed from the pool
# printed in Table 6. The drawn subset is named `<pool>_<n>` (e.g. joshi3_random_10).
ABLATION_DRAW = 10
# Paper-scale step counts, for --dry-run estimates when the arguments do not set --max_steps: realignment 24,544 steps;
# English training sets of UDPOS (21,253 sentences), WikiANN (20,000) and XNLI (392,702) at the paper's batch 32 for
# 5, 5 and 2 epochs.
REALIGN_STEPS = 24_544
TRAIN_SIZES = {"pos": 21_253, "ner": 20_000, "nli": 392_702}
EPOCHS = {"pos": 5, "ner": 5, "nli": 2}
BATCH_SIZE = 32


# ---------------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One process of the grid: a realignment or a task, its command and where it leaves its outputs."""

    kind: str  # realign, pos, ner, nli
    output_dir: Path
    script_args: list[str]  # the script and its arguments (compared with the marker's on a re-run)
    results_file: Path | None = None
    log_file: Path | None = None
    depends_on: Step | None = None  # a task's realignment

    @property
    def marker(self) -> Path:
        return self.output_dir / MARKER

    def finished_at(self) -> datetime.datetime | None:
        """When the step last finished (its marker's time), or None."""
        try:
            return datetime.datetime.fromisoformat(json.loads(self.marker.read_text(encoding="utf-8"))["finished"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def status(self) -> str:
        """`done`, `todo`, `conflict` (finished with other arguments) or `stale` (finished before its realignment)."""
        if not self.marker.is_file():
            return "todo"
        try:
            recorded = json.loads(self.marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return "todo"
        if not self.outputs_complete():
            return "todo"
        if recorded.get("script_args") != self.script_args:
            return "conflict"
        encoder_time, finished = (self.depends_on.finished_at() if self.depends_on else None), self.finished_at()
        if encoder_time is not None and (finished is None or finished < encoder_time):
            return "stale"
        return "done"

    def outputs_complete(self) -> bool:
        if self.kind == "realign":
            return (self.output_dir / REALIGN_CONFIG).is_file()
        results = self.output_dir / "all_results.json"
        try:
            metrics = json.loads(results.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        has_rows = self.results_file is not None and self.results_file.is_file() and self.results_file.stat().st_size
        return f"eval_avg_{TASK_METRICS[self.kind]}" in metrics and bool(has_rows)

    def conflict_message(self) -> str:
        recorded = json.loads(self.marker.read_text(encoding="utf-8")).get("script_args", [])
        return (
            f"{self.output_dir} was finished with other arguments:\n  before: {shlex.join(recorded)}\n"
            f"  now:    {shlex.join(self.script_args)}\nUse another --out_root, or delete {self.output_dir} to run it "
            "again with the new arguments."
        )


@dataclass
class Group:
    """A (model, subset, seed): one realignment (none for the baseline) and the tasks fine-tuned from it."""

    index: int
    model: str
    subset: str
    seed: int
    steps: list[Step] = field(default_factory=list)
    directory: Path | None = None


@dataclass
class Settings:
    models: list[str]
    subsets: list[str]
    seeds: list[int]
    tasks: list[str]
    out_root: Path
    results_dir: Path
    accelerate: list[str]
    accelerate_config: str | None  # None: run the scripts with plain `python` (one process each)
    python: str
    extra_args: list[str]
    realign_args: list[str]
    downstream_args: list[str]
    task_args: dict[str, list[str]]


def model_slug(model: str) -> str:
    """A folder name for a model: a local folder's name, or the Hub id with '/' written '--'."""
    if Path(model).is_dir():
        return Path(model).resolve().name
    return model.strip("/").replace("/", "--")


def subset_source(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return data.get("source") or {}


def subsets_in_sections(sections: tuple[str, ...]) -> list[str]:
    """Subset names whose `source.section` is one of `sections`, in section order, then row, then n."""
    found = []
    for path in sorted(SUBSETS_DIR.glob("*.yaml")):
        source = subset_source(path)
        if source.get("section") in sections:
            found.append(
                (
                    sections.index(source["section"]),
                    str(source.get("row", "")),
                    int(source.get("n_printed") or 0),
                    path.stem,
                )
            )
    return [name for *_, name in sorted(found)]


def is_ablation_pool(name: str) -> bool:
    """An ablation 'Random' row of Table 6: the pool the paper drew 10 languages from (see subsets/README.md)."""
    path = SUBSETS_DIR / f"{name}.yaml"
    if not path.is_file():
        return False
    source = subset_source(path)
    return source.get("section") in ABLATION_SECTIONS and str(source.get("row", "")).endswith("(Random)")


def expand_subsets(spec: str) -> list[str]:
    """`main`, `ablation`, `all`, or a comma list of those, subset names, YAML paths and `none`.

    `main` = the rows of Tables 8/10 (the fine-tuning-only baseline `none`, the Baseline, Featural, Phylogenetic and
    Script Diversity rows and the seeded random rows); `ablation` = the rows of Tables 9/11 (the 'Random' rows as
    draws of 10 languages from their pool, named `<pool>_10`) plus the two baselines Table 1 compares with.
    """
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "main":
            names += [BASELINE, *subsets_in_sections(MAIN_SECTIONS)]
        elif item == "ablation":
            rows = subsets_in_sections(ABLATION_SECTIONS)
            names += [BASELINE, "all_65", *(f"{r}_{ABLATION_DRAW}" if is_ablation_pool(r) else r for r in rows)]
        elif item == "all":
            names += expand_subsets("main,ablation")
        else:
            names.append(item)
    return list(dict.fromkeys(names))


def resolve_subset(name: str, out_root: Path) -> tuple[str, str]:
    """(folder name, value for --subset) of a subset: a shipped name, a YAML path, or a drawn ablation subset."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"Subset file {name} does not exist.")
        return path.stem, str(path.resolve())
    if (SUBSETS_DIR / f"{name}.yaml").is_file():
        return name, str(SUBSETS_DIR / f"{name}.yaml")
    match = re.fullmatch(r"(.+)_(\d+)", name)
    if match and is_ablation_pool(match.group(1)):
        return name, str(write_drawn_subset(match.group(1), int(match.group(2)), out_root))
    shipped = ", ".join(p.stem for p in sorted(SUBSETS_DIR.glob("*.yaml")))
    raise ValueError(
        f"Unknown subset {name!r}: expected main, ablation, all, none, a YAML path, <ablation pool>_<n> or one of "
        f"{shipped}."
    )


def write_drawn_subset(pool: str, n: int, out_root: Path) -> Path:
    """Write (once) the subset file that draws `n` languages from the ablation pool `pool` with the run seed."""
    source = subset_source(SUBSETS_DIR / f"{pool}.yaml")
    data = {
        "name": f"{pool}_{n}",
        "description": f"{n} languages drawn with the run seed from the pool of Table 6's '{source.get('row')}' row.",
        "source": {**source, "n_printed": source.get("n_printed")},
        "strategy": "random",
        "n": n,
        "languages": None,
        "pool": pool,
        "notes": [
            "Tables 9/11 'Random Seeded' and Table 1 report these pools under a 10-language constraint: 10 languages "
            "drawn per seed (the '#Languages' column repeats the pool size).",
        ],
    }
    path = out_root / "subsets" / f"{pool}_{n}.yaml"
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    return path


def build_plan(settings: Settings) -> list[Group]:
    """Every (model, subset, seed) group in a fixed order (models, then subsets, then seeds) with its steps."""
    groups = []
    for model in settings.models:
        for subset in settings.subsets:
            folder, subset_arg = (BASELINE, None) if subset == BASELINE else resolve_subset(subset, settings.out_root)
            for seed in settings.seeds:
                directory = settings.out_root / model_slug(model) / folder / f"seed{seed}"
                results = settings.results_dir / model_slug(model) / folder / f"seed{seed}"
                group = Group(len(groups), model, folder, seed, directory=directory)
                encoder, realignment = model, None
                if subset_arg is not None:
                    realign_dir = directory / "realign"
                    group.steps.append(
                        Step(
                            "realign",
                            realign_dir,
                            [
                                str(ROOT / "run_realign.py"),
                                "--subset",
                                subset_arg,
                                "--model_name_or_path",
                                model,
                                "--seed",
                                str(seed),
                                "--output_dir",
                                str(realign_dir),
                                *settings.extra_args,
                                *settings.realign_args,
                            ],
                            log_file=directory / "realign.log",
                        )
                    )
                    realignment = group.steps[-1]
                    encoder = str(realign_dir)
                for task in settings.tasks:
                    task_dir = directory / task
                    results_file = results / f"{task}.csv"
                    task_flag = [] if task == "nli" else ["--task", task]
                    group.steps.append(
                        Step(
                            task,
                            task_dir,
                            [
                                str(ROOT / TASK_SCRIPTS[task]),
                                *task_flag,
                                "--model_name_or_path",
                                encoder,
                                "--seed",
                                str(seed),
                                "--output_dir",
                                str(task_dir),
                                "--results_file",
                                str(results_file),
                                *settings.extra_args,
                                *settings.downstream_args,
                                *settings.task_args[task],
                            ],
                            results_file=results_file,
                            log_file=directory / f"{task}.log",
                            depends_on=realignment,
                        )
                    )
                groups.append(group)
    return groups


# ---------------------------------------------------------------------------------------------------------------------
# Estimates (--dry-run)
# ---------------------------------------------------------------------------------------------------------------------


def flag_value(args: list[str], flag: str) -> str | None:
    """The last value given to `flag` in `args` (`--flag value` or `--flag=value`), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def num_processes(accelerate_config: str) -> int:
    try:
        config = yaml.safe_load(Path(accelerate_config).read_text(encoding="utf-8")) or {}
        return max(1, int(config.get("num_processes", 1)))
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        return 1


def optimizer_steps(step: Step, processes: int) -> int:
    """The number of training steps a step will run: --max_steps if given, else the paper-scale count."""
    max_steps = flag_value(step.script_args, "--max_steps")
    if max_steps is not None and int(max_steps) > 0:
        return int(max_steps)
    if step.kind == "realign":
        return REALIGN_STEPS
    epochs = float(flag_value(step.script_args, "--num_train_epochs") or EPOCHS[step.kind])
    batch = int(flag_value(step.script_args, "--per_device_train_batch_size") or BATCH_SIZE)
    accumulation = int(flag_value(step.script_args, "--gradient_accumulation_steps") or 1)
    samples = int(flag_value(step.script_args, "--max_train_samples") or TRAIN_SIZES[step.kind])
    return math.ceil(epochs * math.ceil(samples / (batch * processes * accumulation)))


def parse_seconds(spec: str | None) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in ("realign", *TASKS):
            raise ValueError(f"--seconds_per_step: expected realign=S,pos=S,ner=S,nli=S, got {item!r}.")
        seconds[key.strip()] = float(value)
    return seconds


def print_plan(groups: list[Group], seconds: dict[str, float], processes: int, out=sys.stdout) -> dict[str, int]:
    """Print every step as RUN / SKIP / CONFLICT with its training steps and estimated time; return the counts."""
    counts = {"run": 0, "skip": 0, "conflict": 0}
    hours = 0.0
    unknown = set()
    for group in groups:
        print(f"[{group.index}] {group.model} {group.subset} seed {group.seed}", file=out)
        for step in group.steps:
            status = step.status()
            if status == "done" and step.depends_on is not None and step.depends_on.status() == "todo":
                status = "stale"  # its realignment runs again first
            label = {"done": "SKIP", "todo": "RUN", "conflict": "CONFLICT", "stale": "REDO"}[status]
            counts[{"done": "skip", "todo": "run", "conflict": "conflict", "stale": "run"}[status]] += 1
            n_steps = optimizer_steps(step, processes)
            estimate = ""
            if status in ("todo", "stale"):
                if step.kind in seconds:
                    step_hours = n_steps * seconds[step.kind] / 3600
                    hours += step_hours
                    estimate = f"  ~{step_hours:.2f} h"
                else:
                    unknown.add(step.kind)
            print(f"    {label:8s} {step.kind:7s} {n_steps:>7d} steps  {step.output_dir}{estimate}", file=out)
    print(
        f"{len(groups)} groups; steps to run: {counts['run']}, finished (skipped): {counts['skip']}, "
        f"finished with other arguments: {counts['conflict']}",
        file=out,
    )
    if seconds:
        note = f" (no time given for {', '.join(sorted(unknown))})" if unknown else ""
        print(
            f"Estimated training time of the steps to run: {hours:.1f} h wall-clock on {processes} device(s) per "
            f"step = {hours * processes:.1f} device-hours{note}; evaluation and start-up not included.",
            file=out,
        )
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------


def atomic_write(path: Path, text: str) -> None:
    # realign_utils.atomic_writer does the same, but importing it would load torch into the scheduler.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def group_lock(directory: Path):
    """An exclusive lock on a group's folder (released when the process ends, even by a crash); yields False if
    busy."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".grid.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def launch_command(step: Step, settings: Settings) -> list[str]:
    """`accelerate launch --config_file CONFIG script ...`, or `python script ...` without an accelerate config."""
    if settings.accelerate_config is None:
        return [settings.python, *step.script_args]
    return [*settings.accelerate, "launch", "--config_file", settings.accelerate_config, *step.script_args]


# The steps running now (their process groups), so that a grid that is stopped stops them too.
_RUNNING: dict[int, subprocess.Popen] = {}
_RUNNING_LOCK = threading.Lock()
_STOPPING = threading.Event()
STOP_GRACE_SECONDS = 30  # how long a stopped step may take to exit before it is killed


class GridStopped(Exception):
    """The grid received a stop signal; the running steps have been asked to stop."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signal(signum, frame) -> None:
    """Signal handler: ask every running step's process group to stop, start no new step, end the grid."""
    _STOPPING.set()
    with _RUNNING_LOCK:
        groups = list(_RUNNING)
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
    raise GridStopped(signum)


def end_steps(processes: list[subprocess.Popen], grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop the process groups of `processes` (SIGTERM, then SIGKILL after `grace` seconds) and wait for them."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_step(step: Step, settings: Settings, label: str, devices: str | None = None) -> bool | None:
    """Run one step to completion; write its marker only if the process succeeded and its outputs are complete.

    Returns None, running nothing, when the step is still running from an earlier grid (its log is locked).
    """
    command = launch_command(step, settings)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=devices) if devices is not None else None
    start = time.time()
    with open(step.log_file, "a", encoding="utf-8") as log:
        # The step's processes inherit the log as their output, and with it this lock: it is held until the last of
        # them ends, even if this grid is killed, so that no second grid starts the same step beside them.
        try:
            fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None
        step.marker.unlink(missing_ok=True)
        log.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')}  {shlex.join(command)}\n")
        log.flush()
        process = None
        try:
            # A process group of its own, so that stopping the grid stops the launcher and every worker it started.
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
            )
            with _RUNNING_LOCK:
                _RUNNING[process.pid] = process
            if _STOPPING.is_set():  # stopped while it was starting, after the handler looked at _RUNNING
                raise GridStopped(signal.SIGTERM)
            returncode = process.wait()
        except BaseException:
            if process is not None:
                end_steps([process])
            raise
        finally:
            if process is not None:
                with _RUNNING_LOCK:
                    _RUNNING.pop(process.pid, None)
    seconds = time.time() - start
    if returncode != 0 or not step.outputs_complete():
        reason = f"exit status {returncode}" if returncode != 0 else "incomplete outputs"
        lines = step.log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        print(
            f"{label}: FAILED ({reason}) after {seconds:.1f} s; last lines of {step.log_file}:\n"
            + "\n".join(f"      {line}" for line in lines),
            flush=True,
        )
        return False
    marker = {
        "script_args": step.script_args,
        "accelerate_config": settings.accelerate_config,
        "seconds": round(seconds, 1),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"),
    }
    atomic_write(step.marker, json.dumps(marker, indent=2) + "\n")
    print(f"{label}: done in {seconds:.1f} s", flush=True)
    return True


def run_group(group: Group, settings: Settings, devices: str | None = None) -> list[Step]:
    """Run a group's unfinished steps in order; a failed realignment skips the tasks. Returns the failed steps."""
    name = f"[{group.index}] {group.model} {group.subset} seed {group.seed}"
    if all(s.status() == "done" for s in group.steps):
        print(f"{name}: finished, skipped", flush=True)
        return []
    failures = []
    with group_lock(group.directory) as acquired:
        if not acquired:
            print(f"{name}: being run by another process, skipped", flush=True)
            return []
        for step in group.steps:
            if _STOPPING.is_set():
                break
            status = step.status()
            if status == "done":
                continue
            if status == "conflict":
                print(step.conflict_message(), file=sys.stderr, flush=True)
                failures.append(step)
            else:
                if status == "stale":
                    print(
                        f"{name} {step.kind}: finished before its realignment was redone; its folder and results "
                        "CSV are removed and it runs again from the new checkpoint",
                        flush=True,
                    )
                    shutil.rmtree(step.output_dir, ignore_errors=True)
                    if step.results_file is not None:
                        step.results_file.unlink(missing_ok=True)
                print(f"{name} {step.kind}: running (log: {step.log_file})", flush=True)
                outcome = run_step(step, settings, f"{name} {step.kind}", devices)
                if outcome is None:
                    print(
                        f"{name} {step.kind}: still running, started by an earlier grid that was killed (its log "
                        f"{step.log_file} is locked); the group is skipped until it ends",
                        flush=True,
                    )
                    break
                if not outcome:
                    failures.append(step)
            if failures and failures[-1] is step and step.kind == "realign":
                print(f"{name}: the tasks need the realigned checkpoint, skipped", flush=True)
                break
    return failures


def run_groups(groups: list[Group], settings: Settings, jobs: int = 1, devices: list[str | None] | None = None) -> int:
    """Run every unfinished step, `jobs` groups at a time (slot i sees the devices `devices[i]`).

    Returns the number of failed steps.
    """
    failures: list[Step] = []
    if jobs <= 1:
        for group in groups:
            failures += run_group(group, settings, (devices or [None])[0])
    else:
        slots: queue.Queue = queue.Queue()
        for slot in range(jobs):
            slots.put(devices[slot] if devices else None)

        def work(group: Group) -> list[Step]:
            slot = slots.get()
            try:
                return run_group(group, settings, slot)
            finally:
                slots.put(slot)

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
        try:
            for result in pool.map(work, groups):
                failures += result
        except BaseException:
            # Stopped: the signal handler has asked the running steps to stop; make sure they do before leaving.
            with _RUNNING_LOCK:
                running = list(_RUNNING.values())
            end_steps(running)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        print(
            f"{len(failures)} step(s) failed or conflict: " + ", ".join(str(s.output_dir) for s in failures),
            file=sys.stderr,
        )
    return len(failures)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(
        description="Realign once per (model, subset, seed), fine-tune POS / NER / NLI from it, skip finished cells.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--models",
        default="xlm-roberta-base,bert-base-multilingual-cased",
        help="Comma-separated models (Hub ids or local folders).",
    )
    parser.add_argument(
        "--subsets",
        default="main",
        help="main (Tables 8/10 rows + the fine-tuning-only baseline 'none'), ablation (Tables 9/11 "
        "and Table 1), all, or a comma list of these, subset names, YAML paths and 'none'.",
    )
    parser.add_argument("--seeds", default="17,23,42,66", help="Comma-separated seeds (realignment and fine-tuning).")
    parser.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated tasks among pos, ner, nli.")
    parser.add_argument("--out_root", default=env.get("OUT_ROOT", "out/grid"), help="Where checkpoints go (OUT_ROOT).")
    parser.add_argument(
        "--results_dir",
        default=env.get("RESULTS_DIR", "results/grid"),
        help="Where the per-task results CSVs go (RESULTS_DIR); read it with collect_results.py.",
    )
    parser.add_argument(
        "--accelerate_config",
        default=env.get("ACCELERATE_CONFIG", str(ROOT / "accelerate_configs" / "single_gpu.yaml")),
        help="The accelerate config of every step (ACCELERATE_CONFIG); 'none' runs each step as "
        "plain `python script.py ...` (one process, no accelerate).",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="How many (model, subset, seed) groups to run at once on this machine."
    )
    parser.add_argument(
        "--devices",
        default=None,
        help="With --jobs N: the CUDA_VISIBLE_DEVICES of each of the N slots, separated by ';' (e.g. "
        "'0;1;2;3', or '0,1;2,3' for two GPUs per group). Default: one GPU per slot, 0 … N−1; 'none' "
        "leaves CUDA_VISIBLE_DEVICES alone.",
    )
    parser.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="Print the plan (steps to run or skip, estimated time) and run nothing.",
    )
    parser.add_argument(
        "--seconds_per_step",
        default=None,
        help="Seconds per training step for the --dry-run estimate, e.g. "
        "realign=0.05,pos=0.08,ner=0.08,nli=0.06 (measure them on your hardware).",
    )
    parser.add_argument(
        "--cell-index",
        "--cell_index",
        dest="cell_index",
        type=int,
        default=None,
        help="Run only the (model, subset, seed) group with this index (0-based, as --dry-run numbers "
        "them): its realignment and its tasks. One SLURM array task each: $SLURM_ARRAY_TASK_ID.",
    )
    parser.add_argument("--count", action="store_true", help="Print the number of groups (for --array=0-(N-1)).")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    env = os.environ
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; choose among {', '.join(TASKS)}.")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}.") from None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or not seeds:
        raise ValueError("Give at least one model (--models) and one seed (--seeds).")
    config = None if args.accelerate_config.lower() == "none" else Path(args.accelerate_config)
    if config is not None and not config.is_file():
        raise FileNotFoundError(f"Accelerate config {config} does not exist (see accelerate_configs/).")
    return Settings(
        models=models,
        subsets=expand_subsets(args.subsets),
        seeds=seeds,
        tasks=tasks,
        out_root=Path(args.out_root).resolve(),
        results_dir=Path(args.results_dir).resolve(),
        accelerate=shlex.split(env.get("ACCELERATE", "accelerate")),
        accelerate_config=str(config.resolve()) if config is not None else None,
        python=env.get("PYTHON", sys.executable),
        extra_args=shlex.split(env.get("EXTRA_ARGS", "")),
        realign_args=shlex.split(env.get("REALIGN_ARGS", "")),
        downstream_args=shlex.split(env.get("DOWNSTREAM_ARGS", "")),
        task_args={t: shlex.split(env.get(f"{t.upper()}_ARGS", "")) for t in TASKS},
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from_args(args)
        groups = build_plan(settings)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.count:
        print(len(groups))
        return 0
    if args.cell_index is not None:
        if not 0 <= args.cell_index < len(groups):
            print(
                f"error: --cell-index {args.cell_index} is out of range: the plan has {len(groups)} groups "
                f"(0 … {len(groups) - 1}).",
                file=sys.stderr,
            )
            return 2
        groups = [groups[args.cell_index]]
    if args.dry_run:
        try:
            seconds = parse_seconds(args.seconds_per_step)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        processes = num_processes(settings.accelerate_config) if settings.accelerate_config else 1
        counts = print_plan(groups, seconds, processes)
        return 1 if counts["conflict"] else 0
    if args.jobs < 1:
        print("error: --jobs must be at least 1.", file=sys.stderr)
        return 2
    if args.devices is None:
        devices = [str(i) for i in range(args.jobs)] if args.jobs > 1 else None
    elif args.devices.lower() == "none":
        devices = None
    else:
        devices = [d.strip() for d in args.devices.split(";") if d.strip()]
        if len(devices) != args.jobs:
            print(f"error: --devices lists {len(devices)} slot(s) for --jobs {args.jobs}.", file=sys.stderr)
            return 2
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop_on_signal)
    try:
        return 1 if run_groups(groups, settings, args.jobs, devices) else 0
    except GridStopped as stop:
        print(
            f"grid: stopped by {stop}; the running steps were stopped too. Run the same command again to resume.",
            file=sys.stderr,
            flush=True,
        )
        return 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main())
