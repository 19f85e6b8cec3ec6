"""Plumbing shared by the scripts of this folder, in the spirit of transformers' `utils_qa.py`.

Only what is identical across scripts and rarely changed lives here: `--config` YAML parsing, logging set-up, resuming,
the settings guard of an `output_dir`, sentence pooling, retrieval metrics and results writing. Everything a user is
expected to adapt (preprocessing, losses, metrics, Trainer subclasses) stays in the scripts.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent

# One row per (model, subset, seed, task, language, metric): the schema never changes, so tables from many runs can
# be concatenated and aggregated (collect_results.py).
RESULTS_COLUMNS = ["timestamp", "model", "subset", "seed", "task", "source", "language", "metric", "value", "run_dir"]


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(dataclass_types: tuple, defaults: dict[str, Any] | None = None, argv: list[str] | None = None) -> tuple:
    """Parse `dataclass_types` from `--config run.yaml` (defaults) and command-line flags (overrides).

    `defaults` are the script's own defaults for fields it does not own (e.g. the paper's learning rate for
    `TrainingArguments`); the YAML file overrides them and the command line overrides both. Unknown YAML keys fail.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", argv[0]]  # `python script.py run.yaml`, the transformers examples' shorthand
    parser = HfArgumentParser(dataclass_types)
    known = {action.dest for action in parser._actions}
    if defaults:
        parser.set_defaults(**defaults)
    config_path = _pop_config_flag(argv)
    if config_path is not None:
        config = _read_yaml_config(config_path)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"{config_path}: unknown key(s) {unknown}. Every key must be a command-line flag of this script "
                "(run it with --help for the list)."
            )
        parser.set_defaults(**config)
        # Required fields given in the YAML must not be demanded again on the command line.
        for action in parser._actions:
            if action.dest in config:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv)


def _pop_config_flag(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a path to a YAML file.")
            path = argv[i + 1]
            del argv[i : i + 2]
            return path
        if arg.startswith("--config="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _read_yaml_config(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            config = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of flag names to values, got {type(config).__name__}.")
    return config


def setup_logging(training_args: TrainingArguments) -> None:
    """Configure the root, transformers and datasets loggers the way transformers' examples do."""
    import datasets

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        force=True,
    )
    log_level = training_args.get_process_log_level()
    logging.getLogger().setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.info(
        "Process rank %s, device %s, world size %s, distributed %s",
        training_args.process_index,
        training_args.device,
        training_args.world_size,
        training_args.parallel_mode.value,
    )


def detect_checkpoint(training_args: TrainingArguments) -> str | None:
    """Return the checkpoint to resume from: `--resume_from_checkpoint`, else the last one in `output_dir`."""
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last = get_last_checkpoint(training_args.output_dir)
        if last is not None:
            logger.info("Resuming from %s (found in --output_dir; use a new --output_dir to start over).", last)
            return last
    return None


def check_settings(output_dir: str, settings: dict[str, Any], filename: str, is_main_process: bool = True) -> None:
    """Refuse an `output_dir` that holds a run made with other settings; record the settings otherwise.

    The settings file is written before training starts, so an interrupted run is recognised as well as a finished
    one. Only settings that change the result belong in `settings` (not logging or output options).
    """
    path = Path(output_dir) / filename
    settings = json.loads(json.dumps(settings, default=str))
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
        differing = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if differing:
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in differing[:10])
            raise ValueError(
                f"{output_dir} holds a run made with other settings ({details}). Use a new --output_dir, or delete "
                f"{output_dir} to start over."
            )
        return
    if is_main_process:
        write_json_atomic(path, {"settings": settings})


def code_version() -> str:
    """The git commit of this folder (with `-dirty` if modified), or `unknown` outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def asdict_public(obj: Any) -> dict[str, Any]:
    """`dataclasses.asdict` without private fields (those starting with `_`)."""
    return {k: v for k, v in dataclasses.asdict(obj).items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------------------------------
# Sentence representations and retrieval
# ----------------------------------------------------------------------------------------------------------------------


def masked_mean_pool(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average `hidden_states` (B, L, d) over the positions where `mask` (B, L) is non-zero → (B, d).

    A row whose mask is empty gets a zero vector instead of NaN.
    """
    mask = mask.to(hidden_states.dtype).unsqueeze(-1)  # (B, L, 1)
    summed = (hidden_states * mask).sum(dim=1)  # (B, d)
    counts = mask.sum(dim=1).clamp(min=1.0)  # (B, 1)
    return summed / counts


def content_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor) -> torch.Tensor:
    """Positions that are real text: attended to and not a special token ([CLS], [SEP], <s>, </s>, padding)."""
    return attention_mask.bool() & ~torch.isin(input_ids, special_ids)


@torch.no_grad()
def retrieval_precision_at_1(queries: torch.Tensor, candidates: torch.Tensor) -> float:
    """Share of queries whose nearest candidate (cosine) is their own translation, row i ↔ row i."""
    if len(queries) == 0:
        return float("nan")
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    c = torch.nn.functional.normalize(candidates.float(), dim=-1)
    predicted = (q @ c.T).argmax(dim=1)  # (n,)
    return (predicted == torch.arange(len(q), device=q.device)).float().mean().item()


def center(embeddings: torch.Tensor) -> torch.Tensor:
    """Subtract the mean embedding: the per-language mean-centering control (no training involved)."""
    return embeddings - embeddings.mean(dim=0, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------------


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars (seqeval returns numpy floats)
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def macro_average(metrics: dict[str, float], metric: str, prefix: str = "eval") -> float:
    """Unweighted mean of `{prefix}_{lang}_{metric}` over languages (the `{prefix}_avg_{metric}` key excluded)."""
    suffix = f"_{metric}"
    values = [
        float(v)
        for k, v in metrics.items()
        if k.startswith(f"{prefix}_") and k.endswith(suffix) and k != f"{prefix}_avg{suffix}"
        and _is_language_key(k, prefix, suffix)
    ]
    return sum(values) / len(values) if values else float("nan")


def _is_language_key(key: str, prefix: str, suffix: str) -> bool:
    middle = key[len(prefix) + 1 : -len(suffix)]
    return bool(middle) and middle not in {"loss", "runtime", "samples_per_second", "steps_per_second"}


def append_results(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Append tidy rows to the results table (CSV with the fixed `RESULTS_COLUMNS` header); returns rows written.

    The table is rewritten through a temporary file, so a crash leaves either the old or the new table.
    """
    path = Path(path)
    rows = [dict(row) for row in rows]
    timestamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    for row in rows:
        row.setdefault("timestamp", timestamp)
        unknown = set(row) - set(RESULTS_COLUMNS)
        if unknown:
            raise ValueError(f"Result row has columns outside the results schema: {sorted(unknown)}")
        if hasattr(row.get("value"), "item"):
            row["value"] = row["value"].item()
    existing: list[dict[str, str]] = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != RESULTS_COLUMNS:
                raise ValueError(
                    f"{path} has columns {reader.fieldnames}, expected {RESULTS_COLUMNS}. Write to a new --results_file."
                )
            existing = list(reader)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=RESULTS_COLUMNS)
            writer.writeheader()
            writer.writerows(existing)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(rows)
