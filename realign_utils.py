"""Plumbing shared by the scripts of this folder, in the spirit of transformers' `utils_qa.py`.

Only what is identical across scripts and rarely changed lives here: `--config` YAML parsing, logging set-up, resuming
(from the newest complete checkpoint, or not at all for a finished run), the settings guard of an `output_dir`,
sentence pooling and padding, retrieval metrics, local parallel files, results writing and Hub uploads. The downstream
scripts' own plumbing is in `downstream_utils.py`. Everything a user is expected to adapt (preprocessing, label
alignment, losses, metrics, Trainer subclasses) stays in the scripts.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent

# One row per (model, subset, seed, task, language, metric): the schema never changes, so tables from many runs can
# be concatenated and aggregated (collect_results.py).
RESULTS_COLUMNS = ["timestamp", "model", "subset", "seed", "task", "source", "language", "metric", "value", "run_dir"]


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(
    dataclass_types: tuple,
    defaults: dict[str, Any] | None = None,
    argv: list[str] | None = None,
    help_overrides: dict[str, str] | None = None,
) -> tuple:
    """Parse `dataclass_types` from `--config run.yaml` (defaults) and command-line flags (overrides).

    `defaults` are the script's own defaults for fields it does not own (e.g. the paper's learning rate for
    `TrainingArguments`); the YAML file overrides them and the command line overrides both. Unknown YAML keys fail.
    `help_overrides` replaces the --help text of such fields where the script uses them differently.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", argv[0]]  # `python script.py run.yaml`, the transformers examples' shorthand
    parser = HfArgumentParser(dataclass_types)
    for action in parser._actions:
        if help_overrides and action.dest in help_overrides:
            action.help = help_overrides[action.dest]
    known = {action.dest for action in parser._actions}
    if "hub_strategy" in known:
        # Uploads happen once, at the end, with what a model card reader needs (check_output_arguments).
        parser.set_defaults(hub_strategy="end")
        for action in parser._actions:
            if action.dest == "hub_strategy" and not (help_overrides and "hub_strategy" in help_overrides):
                action.help = "With --push_to_hub, the model, its tokenizer and card are uploaded once, at the end "
                action.help += "('end', the only value accepted: the others upload checkpoints as they are saved)."
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
    parsed = parser.parse_args_into_dataclasses(args=argv)
    for arguments in parsed:
        if isinstance(arguments, TrainingArguments):
            check_output_arguments(arguments)
    return parsed


def check_output_arguments(training_args: TrainingArguments) -> None:
    """Checks of the output and Hub options that every script needs; moves `--hub_token` out of the arguments.

    The Trainer pickles its arguments into `training_args.bin` in the output folder and in every checkpoint, and an
    upload would carry that file: a `--hub_token` is therefore handed to `huggingface_hub` through the process
    environment (HF_TOKEN, where `huggingface_hub` finds it) and erased from the arguments, so that no file holds it.
    """
    output_dir = training_args.output_dir
    if output_dir and os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir} is a file; give a folder (it is created if missing).")
    strategy = getattr(training_args.hub_strategy, "value", training_args.hub_strategy)
    if training_args.push_to_hub and strategy != "end":
        raise ValueError(
            f"--hub_strategy {strategy} would upload checkpoints as they are saved (optimizer state, "
            "training_args.bin and local paths included). These scripts upload the final model, its tokenizer and "
            "its model card once, at the end: leave --hub_strategy at 'end'."
        )
    if training_args.hub_token:
        logger.warning(
            "--hub_token: the token is used for this run's uploads and saved nowhere. A token on the command line is "
            "visible to other users of the machine and kept in the shell history: prefer `hf auth login` "
            "(`huggingface-cli login`) or the HF_TOKEN environment variable."
        )
        os.environ["HF_TOKEN"] = training_args.hub_token
        training_args.hub_token = None


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
    if training_args.should_log:
        # The main process logs at INFO (as transformers' examples do); the others follow --log_level_replica.
        transformers.utils.logging.set_verbosity_info()
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
    """Return the checkpoint to resume from: `--resume_from_checkpoint`, else the newest complete one in `output_dir`.

    A run killed while saving leaves a checkpoint folder without its trainer state (or with files cut short), which
    the Trainer cannot resume; such folders are skipped with a warning and left as they are (training overwrites them
    when it reaches their step again). An incomplete `--resume_from_checkpoint` is an error.
    """
    world_size = training_args.world_size
    if training_args.resume_from_checkpoint:
        path = Path(training_args.resume_from_checkpoint)
        problems = checkpoint_problems(path, world_size)
        if problems:
            newest = _newest_complete_checkpoint(path.parent, world_size)[0] if path.parent.is_dir() else None
            hint = "Give a complete checkpoint (model, optimizer, scheduler, RNG and trainer state), or leave the "
            hint += "flag out to start from the beginning."
            if newest:
                hint = f"The newest complete checkpoint beside it is {newest}."
            raise ValueError(f"--resume_from_checkpoint {path} cannot be resumed: {'; '.join(problems)}. {hint}")
        return str(path)
    if not (training_args.do_train and os.path.isdir(training_args.output_dir)):
        return None
    checkpoint, skipped = _newest_complete_checkpoint(Path(training_args.output_dir), world_size)
    if skipped:
        logger.warning(
            "Skipping %d incomplete checkpoint(s) in %s, left as they are (a run was stopped while saving them; "
            "training overwrites them when it reaches their step again): %s",
            len(skipped),
            training_args.output_dir,
            "; ".join(skipped),
        )
    if checkpoint is not None:
        logger.info("Resuming from %s (found in --output_dir; use a new --output_dir to start over).", checkpoint)
    elif skipped:
        logger.warning("No complete checkpoint in %s: training starts from the beginning.", training_args.output_dir)
    return checkpoint


# What the Trainer writes into a checkpoint, in the order it writes them: the weights (one of these, or a DeepSpeed
# `global_step*` / FSDP folder), the optimizer, scheduler and RNG states, and last the trainer state.
CHECKPOINT_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
TRAINER_STATE_FILE = "trainer_state.json"


def checkpoint_problems(folder: str | Path, world_size: int = 1) -> list[str]:
    """Why `folder` cannot be resumed by the Trainer (missing or cut-short files); empty for a complete checkpoint.

    Only headers and archive directories are read (no tensor is loaded): a safetensors file must be as long as its
    header says, and `torch.save` files (optimizer, scheduler, RNG) must be whole zip archives, whose directory is
    written last.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    state = _read_json(folder / TRAINER_STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        exists = (folder / TRAINER_STATE_FILE).is_file()
        problems.append(f"{TRAINER_STATE_FILE} is {'unreadable' if exists else 'missing'}")
    entries = list(folder.iterdir())
    deepspeed = any(p.is_dir() and p.name.startswith("global_step") for p in entries)
    fsdp = any("pytorch_model_fsdp" in p.name for p in entries)
    weights = [folder / name for name in CHECKPOINT_WEIGHT_FILES if (folder / name).is_file()]
    for index in [p for p in weights if p.name.endswith(".index.json")]:
        shards = sorted(set((_read_json(index) or {}).get("weight_map", {}).values()))
        weights += [folder / name for name in shards]
        problems += [f"no {name} (listed in {index.name})" for name in shards if not (folder / name).is_file()]
    weights = [p for p in weights if p.is_file()]
    if not (weights or deepspeed or fsdp):
        problems.append("no model weights")
    if not (deepspeed or any(p.name.startswith("optimizer") for p in entries)):
        problems.append("no optimizer state")
    if not (deepspeed or (folder / "scheduler.pt").is_file()):
        problems.append("no scheduler state")
    # One process saves rng_state.pth; under several, each saves rng_state_<rank>.pth.
    per_rank = [folder / f"rng_state_{rank}.pth" for rank in range(max(1, world_size))]
    single = folder / "rng_state.pth"
    rng = [single] if single.is_file() or (world_size <= 1 and not per_rank[0].is_file()) else per_rank
    problems += [f"no {p.name}" for p in rng if not p.is_file()]
    torch_files = [p for p in (folder / "optimizer.pt", folder / "scheduler.pt", *rng) if p.is_file()]
    for path in [*weights, *torch_files]:
        if not _file_is_whole(path):
            problems.append(f"{path.name} is cut short")
    return problems


def _newest_complete_checkpoint(folder: Path, world_size: int) -> tuple[str | None, list[str]]:
    """The newest complete `checkpoint-N` of `folder` (by N), and a description of each newer incomplete one."""
    steps = {}
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if path.is_dir() and suffix.isdigit():
            steps[int(suffix)] = path
    skipped = []
    for step in sorted(steps, reverse=True):
        problems = checkpoint_problems(steps[step], world_size)
        if not problems:
            return str(steps[step]), skipped
        skipped.append(f"{steps[step].name} ({', '.join(problems)})")
    return None, skipped


def _file_is_whole(path: Path) -> bool:
    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(length))
        except (OSError, ValueError):
            return False
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size >= 8 + length + end
    if path.suffix in (".pt", ".pth", ".bin"):
        return zipfile.is_zipfile(path)
    if path.suffix == ".json":
        return _read_json(path) is not None
    return True


def _read_json(path: str | Path) -> Any:
    """The parsed content of a JSON file, or None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def train_unless_finished(trainer, checkpoint: str | None, save=None) -> dict[str, float]:
    """Train (resuming from `checkpoint` if given) and save the model, or reuse the run if it already finished.

    Resumed from a checkpoint that holds its last step, the Trainer trains one step more than max_steps (step 5 of 4)
    and moves the weights, or (when max_steps fills whole epochs) trains nothing but reports a loss of 0. When the run
    in `output_dir` already finished (`finished_training`), its final weights are loaded instead and nothing is
    trained. `save` saves the final model (default: `trainer.save_model()` without its upload; uploads happen once, at
    the end, in the scripts' model-card functions). Returns the training metrics: for a finished run, those it
    recorded in `train_results.json`.
    """
    output_dir = Path(trainer.args.output_dir)
    save = save or (lambda: trainer.save_model(_internal_call=True))
    finished = finished_training(output_dir, checkpoint)
    if finished is None:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        save()
        return dict(result.metrics)
    trainer.state = transformers.TrainerState.load_from_json(str(finished / TRAINER_STATE_FILE))
    logger.info(
        "Training finished earlier (step %d of %d, in %s): nothing more is trained, the model is evaluated as it is. "
        "Use a new --output_dir to train again.",
        trainer.state.global_step,
        trainer.state.max_steps,
        finished,
    )
    trainer._load_from_checkpoint(str(finished))
    if finished_training(output_dir, None) is None:
        save()  # stopped after the last checkpoint, before the final model was saved
    recorded = _read_json(output_dir / "train_results.json")
    return recorded if isinstance(recorded, dict) else {}


def finished_training(output_dir: str | Path, checkpoint: str | None) -> Path | None:
    """Where the final weights of a training run that already finished in `output_dir` are, or None.

    A run is finished when the trainer state of `checkpoint` (preferred: it also holds the heads trained alongside,
    such as realignment's projection head) or `output_dir`'s own (saved after the final model) has reached its
    max_steps with whole weights beside it. The settings guard has made sure that the run was made with the same
    settings.
    """
    for folder in ([Path(checkpoint)] if checkpoint else []) + [Path(output_dir)]:
        state = _read_json(folder / TRAINER_STATE_FILE)
        if not (isinstance(state, dict) and 0 < (state.get("max_steps") or 0) <= (state.get("global_step") or 0)):
            continue
        weights = [folder / name for name in CHECKPOINT_WEIGHT_FILES if (folder / name).is_file()]
        if weights and all(_file_is_whole(path) for path in weights):
            return folder
    return None


def check_settings(output_dir: str, settings: dict[str, Any], filename: str, is_main_process: bool = True) -> None:
    """Refuse an `output_dir` that holds a run made with other settings; record the settings otherwise.

    Scripts call it once their input is known to be good and before training starts, so an interrupted run is
    recognised as well as a finished one, and a run refused for its input leaves nothing behind. Only settings that
    change the result belong in `settings` (not logging or output options), resolved (canonical language codes, not
    the flag as typed). A setting recorded by an earlier version and no longer recorded is not compared. Also refused:
    a folder holding another script's run (`SETTINGS_FILES`), and checkpoints without a settings file, whose settings
    are unknown.
    """
    folder = Path(output_dir)
    path = folder / filename
    settings = json.loads(json.dumps(settings, default=str))
    others = [name for name in SETTINGS_FILES if name != filename and (folder / name).is_file()]
    if others:
        raise ValueError(
            f"{output_dir} holds a run of {SETTINGS_FILES[others[0]]} ({others[0]}), not of this script: the two "
            "would resume each other's checkpoints and overwrite each other's outputs. Use another --output_dir."
        )
    if path.is_file():
        recorded = _read_json(path)
        if not isinstance(recorded, dict) or not isinstance(recorded.get("settings"), dict):
            raise ValueError(f"{path} is not a settings file written by this script. Use another --output_dir.")
        # Nested groups ({"loss": {"temperature": ...}}) compare setting by setting, as "loss.temperature".
        previous, settings = _flatten(recorded["settings"]), _flatten(settings)
        differing = sorted(k for k in settings if previous.get(k) != settings[k])
        if differing:
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in differing[:10])
            raise ValueError(
                f"{output_dir} holds a run made with other settings ({details}). Use a new --output_dir, or delete "
                f"{output_dir} to start over."
            )
        return
    checkpoints = sorted(p.name for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir())
    if checkpoints:
        raise ValueError(
            f"{output_dir} holds checkpoints ({', '.join(checkpoints[:3])}) but no {filename}: the settings that made "
            f"them are unknown, and resuming them could mix two runs. Use a new --output_dir, or delete {output_dir} "
            "to start over."
        )
    if is_main_process:
        write_json_atomic(path, {"settings": settings})


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss": {"temperature": 0.1}} → {"loss.temperature": 0.1}; flat settings come back unchanged."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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


# ---------------------------------------------------------------------------------------------------------------------
# Sentence representations and retrieval
# ---------------------------------------------------------------------------------------------------------------------


def masked_mean_pool(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average `hidden_states` (B, L, d) over the positions where `mask` (B, L) is non-zero → (B, d).

    A row whose mask is empty gets a zero vector instead of NaN.
    """
    mask = mask.to(hidden_states.dtype).unsqueeze(-1)  # (B, L, 1)
    summed = (hidden_states * mask).sum(dim=1)  # (B, d)
    counts = mask.sum(dim=1).clamp(min=1.0)  # (B, 1)
    return summed / counts


def pad_sequences(
    sequences: list[list[int]], pad_id: int, multiple: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (B, L) `input_ids` and `attention_mask`, L the longest length (rounded up to a
    multiple of `multiple`, which suits tensor cores on GPU), in one vectorised assignment."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    width = int(lengths.max())
    if multiple:
        width = -(-width // multiple) * multiple
    mask = np.arange(width)[None, :] < lengths[:, None]  # (B, L)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    ids[mask] = np.concatenate(sequences)  # row-major: each row's tokens land left-aligned
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def content_token_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor
) -> torch.Tensor:
    """Positions that are real text: attended to and not one of `special_ids` (see `pooling_special_ids`)."""
    return attention_mask.bool() & ~torch.isin(input_ids, special_ids)


def pooling_special_ids(tokenizer) -> torch.Tensor:
    """The token ids that sentence pooling leaves out: the structural special tokens ([CLS], [SEP], <s>, </s>,
    padding).

    Unknown-word tokens ([UNK], <unk>) and a literal [MASK] stay in: they stand for text of the sentence (in a
    low-resource language, often a whole word the vocabulary lacks), and leaving them out would pool a sentence of
    unknown words to the zero vector. sentence-transformers' mean pooling differs the other way: it averages every
    attended position, [CLS] and [SEP] included.
    """
    content = {tokenizer.unk_token_id, tokenizer.mask_token_id} - {None}
    return torch.tensor(sorted(set(tokenizer.all_special_ids) - content), dtype=torch.long)


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


@torch.no_grad()
def retrieval_recall_at_k(
    queries: torch.Tensor, candidates: torch.Tensor, ks: Iterable[int] = (1, 5, 10)
) -> dict[int, float]:
    """Share of queries whose translation (row i ↔ row i) is among their k nearest candidates (cosine), for each k.

    A candidate ties with the translation only when it is exactly as similar; ties do not push the translation down.
    """
    ks = list(ks)
    if len(queries) == 0:
        return {k: float("nan") for k in ks}
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    c = torch.nn.functional.normalize(candidates.float(), dim=-1)
    similarities = q @ c.T  # (n, m)
    correct = similarities.diagonal().unsqueeze(1)  # (n, 1)
    rank = (similarities > correct).sum(dim=1)  # (n,) candidates strictly closer than the translation
    return {k: (rank < k).float().mean().item() for k in ks}


@torch.no_grad()
def encode_layers(
    model,
    tokenizer,
    texts: list[str],
    layers: Iterable[int],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    device: torch.device | str | None = None,
) -> dict[int, torch.Tensor]:
    """Masked-mean sentence vectors of several hidden layers in one pass: {layer: (len(texts), d)} on the CPU.

    `layers` are `hidden_states` indices (0 = embeddings, `num_hidden_layers` = last). Special tokens and padding are
    left out of the mean (`pooling_special_ids`), as in realignment. Texts are embedded longest first (less padding),
    returned in input order.
    """
    layers = list(layers)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    special_ids = pooling_special_ids(tokenizer).to(device)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = {layer: [None] * len(texts) for layer in layers}
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        hidden_states = model(**batch, output_hidden_states=True).hidden_states  # (layers + 1) × (B, L, d)
        mask = content_token_mask(batch["input_ids"], batch["attention_mask"], special_ids)
        for layer in layers:
            pooled = masked_mean_pool(hidden_states[layer].float(), mask).cpu()  # (B, d)
            for row, index in enumerate(chunk):
                out[layer][index] = pooled[row]
    model.train(was_training)
    return {layer: torch.stack(vectors) if vectors else torch.empty(0) for layer, vectors in out.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Local parallel files (run_realign.py's --parallel_data_dir, analyze_alignment.py's --parallel_data)
# ---------------------------------------------------------------------------------------------------------------------

# Keys of the English side in a JSON-lines 'translation' dict or a TSV header.
ENGLISH_KEYS = ("en", "eng")
# The optional column that says which pairs share a meaning (translations of one sentence in several languages).
ID_KEY = "id"
TABLE_SUFFIXES = (".tsv", ".jsonl", ".json", ".parquet")
# A TSV header names its columns with language codes (en, yor, swh_Latn) and optionally `id`.
_HEADER_FIELD = re.compile(r"^(id|[a-z]{2,3}([-_][A-Za-z]{4})?)$")


def find_local_parallel_file(folder: str, language, split: str = "train") -> list[Path]:
    """The file(s) holding `language` (a registry `Language`) in `folder`.

    Accepted, for any of the language's names (registry code, aliases, ISO 639-1 code): `{name}.tsv`, `.jsonl`,
    `.json` or `.parquet`; the pair `en-{name}.en` + `en-{name}.{name}`; or OPUS-100's own layout as
    `snapshot_download("Helsinki-NLP/opus-100")` leaves it, `en-{name}/` or `{name}-en/` holding `{split}*.parquet` or
    `{split}*.jsonl` shards (`split` is `train`, or `validation` for held-out pairs).
    """
    names = [language.code, *language.aliases] + ([language.iso639_1] if language.iso639_1 else [])
    folder_path = Path(folder)
    for name in names:
        for suffix in TABLE_SUFFIXES:
            if (folder_path / f"{name}{suffix}").is_file():
                return [folder_path / f"{name}{suffix}"]
        en_side, xx_side = folder_path / f"en-{name}.en", folder_path / f"en-{name}.{name}"
        if en_side.is_file() and xx_side.is_file():
            return [en_side, xx_side]
        for pair in (f"en-{name}", f"{name}-en"):
            shards = sorted(p for p in (folder_path / pair).glob(f"{split}*") if p.suffix in (".parquet", ".jsonl"))
            if shards:
                return shards
    raise FileNotFoundError(
        f"No parallel file for {language.code} ({language.name}) in {folder}: expected {language.code}.tsv, "
        f"{language.code}.jsonl, {language.code}.parquet, en-{language.code}.en + en-{language.code}.{language.code}, "
        f"or OPUS-100's en-xx/{split}-*.parquet (aliases {', '.join(names[1:]) or 'none'} are accepted as well)."
    )


def read_local_parallel(files: list[Path]) -> dict[str, list[str]]:
    """Read English/translation pairs (`src` = English, `tgt` = translation, and `id` when the files give one) from
    the files `find_local_parallel_file` returns, failing with the file and line of any malformed input.

    Lines are read by `read_text_lines`: split at "\\n" alone, a leading byte-order mark dropped.
    """
    if len(files) == 2 and files[0].suffix == ".en":
        src, tgt = _read_lines(files[0]), _read_lines(files[1])
        if len(src) != len(tgt):
            raise ValueError(
                f"{files[0]} has {len(src)} lines but {files[1]} has {len(tgt)}: the two sides must be aligned line "
                "by line."
            )
        columns = {"src": src, "tgt": tgt}
    else:
        parts = [_READERS[path.suffix](path) for path in files]
        if len({ID_KEY in part for part in parts}) > 1:
            raise ValueError(
                f"{files[0].parent}: some of {', '.join(p.name for p in files)} have an id column and "
                "some do not; give it in all or none."
            )
        columns = {key: [value for part in parts for value in part[key]] for key in parts[0]}
    if not columns["src"]:
        raise ValueError(f"{files[0]} holds no parallel pair: the file is empty.")
    return columns


def read_text_lines(path: str | Path):
    """Yield (line number, line) of a UTF-8 text file, split at "\\n" only, without the line end ("\\r\\n" too).

    Only "\\n" ends a line, never the other characters `str.splitlines` breaks at (U+0085, U+2028, form feeds...):
    they occur inside real sentences, and breaking there would shift one side of a line-aligned pair against the
    other. A byte-order mark at the start is dropped; bytes that are not UTF-8 raise `ValueError` naming the file
    and line.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}). "
                    "Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)."
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            yield lineno, line.removesuffix("\n").removesuffix("\r")


def _read_lines(path: Path) -> list[str]:
    return [line for _, line in read_text_lines(path)]


def _read_tsv_pairs(path: Path) -> dict[str, list[str]]:
    """English<TAB>translation per line, or columns named by a header line such as `id<TAB>en<TAB>yor`."""
    lines = _read_lines(path)
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    header = None
    if first is not None:
        fields = [f.strip() for f in lines[first].split("\t")]
        english = [f for f in fields if f.lower() in ENGLISH_KEYS]
        others = [f for f in fields if f.lower() not in (*ENGLISH_KEYS, ID_KEY)]
        if len(english) == 1 and len(others) == 1 and len(set(fields)) == len(fields) and 2 <= len(fields) <= 3:
            if all(_HEADER_FIELD.match(f.lower()) for f in fields):
                header = {"src": fields.index(english[0]), "tgt": fields.index(others[0])}
                if ID_KEY in fields:
                    header[ID_KEY] = fields.index(ID_KEY)
    positions = header or {"src": 0, "tgt": 1}
    width = len(lines[first].split("\t")) if header else 2
    columns = {key: [] for key in positions}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or (header is not None and lineno == first + 1):
            continue
        fields = line.split("\t")
        if len(fields) == width:
            for key, index in positions.items():
                columns[key].append(fields[index])
            continue
        if len(fields) == 1:
            problem = "no tab separator"
        else:
            problem = f"{len(fields)} tab-separated fields where {width} are expected"
        raise ValueError(
            f"{path}:{lineno}: {problem}. Each line must be English<TAB>translation, or the file must start with a "
            "header naming its columns (e.g. id<TAB>en<TAB>yor) that every line then follows."
        )
    return columns


def _read_jsonl_pairs(path: Path) -> dict[str, list[str]]:
    """One JSON object per line: {"translation": {"en": ..., "<code>": ...}} and optionally "id"."""
    columns, with_id = {"src": [], "tgt": [], ID_KEY: []}, None
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            english, other, identifier = _pair_fields(record)
        except (json.JSONDecodeError, ValueError) as err:
            raise ValueError(
                f"{path}:{lineno}: expected a JSON object with a 'translation' dict holding an 'en' (or 'eng') key "
                f"and one other language key, both strings, and optionally a string or integer 'id' ({err})."
            ) from None
        if with_id is None:
            with_id = identifier is not None
        elif with_id != (identifier is not None):
            raise ValueError(f"{path}:{lineno}: 'id' must be given on every line or on none.")
        columns["src"].append(english)
        columns["tgt"].append(other)
        columns[ID_KEY].append(identifier)
    if not with_id:
        del columns[ID_KEY]
    return columns


def _read_parquet_pairs(path: Path) -> dict[str, list[str]]:
    """A parquet table with a 'translation' struct column (OPUS-100's schema) and optionally 'id'."""
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for unreadable files
        raise ValueError(f"{path}: not a readable parquet file ({type(err).__name__}: {err}).") from None
    columns = {"src": [], "tgt": [], ID_KEY: []}
    for row, record in enumerate(records):
        try:
            english, other, identifier = _pair_fields(record)
        except ValueError as err:
            raise ValueError(
                f"{path}: row {row}: expected a 'translation' column holding an 'en' key and one other "
                f"language key, both strings ({err})."
            ) from None
        columns["src"].append(english)
        columns["tgt"].append(other)
        columns[ID_KEY].append(identifier)
    if not any(value is not None for value in columns[ID_KEY]):
        del columns[ID_KEY]
    elif any(value is None for value in columns[ID_KEY]):
        raise ValueError(f"{path}: 'id' is empty in some rows; give it in every row or in none.")
    return columns


def _pair_fields(record: Any) -> tuple[str, str, str | None]:
    """(English, translation, id or None) of one JSON / parquet record; ValueError says what is wrong."""
    if not isinstance(record, dict) or not isinstance(record.get("translation"), dict):
        raise ValueError("no 'translation' object")
    translation = record["translation"]
    english_key = next((k for k in ENGLISH_KEYS if k in translation), None)
    others = [k for k in translation if k != english_key]
    if english_key is None or len(others) != 1:
        raise ValueError(f"keys {sorted(translation)}")
    english, other = translation[english_key], translation[others[0]]
    if not isinstance(english, str) or not isinstance(other, str):
        raise ValueError(f"values of type {type(english).__name__} and {type(other).__name__}")
    identifier = record.get(ID_KEY)
    if identifier is not None and (isinstance(identifier, bool) or not isinstance(identifier, str | int)):
        raise ValueError(f"an 'id' of type {type(identifier).__name__}")
    return english, other, None if identifier is None else str(identifier)


_READERS = {
    ".tsv": _read_tsv_pairs,
    ".jsonl": _read_jsonl_pairs,
    ".json": _read_jsonl_pairs,
    ".parquet": _read_parquet_pairs,
}


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_writer(path: str | Path, newline: str | None = None):
    """Open `path` for writing through a temporary file renamed over it on success, so that a crash leaves either
    the old file or the new one, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline=newline, encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON through `atomic_writer`."""
    with atomic_writer(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")


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
        if k.startswith(f"{prefix}_")
        and k.endswith(suffix)
        and k != f"{prefix}_avg{suffix}"
        and _is_language_key(k, prefix, suffix)
    ]
    return sum(values) / len(values) if values else float("nan")


def _is_language_key(key: str, prefix: str, suffix: str) -> bool:
    middle = key[len(prefix) + 1 : -len(suffix)]
    return bool(middle) and middle not in {"loss", "runtime", "samples_per_second", "steps_per_second"}


# A results row is identified by every column but these two: a run evaluated again replaces its rows.
RESULTS_KEY = [c for c in RESULTS_COLUMNS if c not in ("timestamp", "value")]


def append_results(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Append tidy rows to the results table (CSV with the fixed `RESULTS_COLUMNS` header); returns rows written.

    A row whose `RESULTS_KEY` (model, subset, seed, task, source, language, metric and run_dir) is already in the
    table replaces that row in place, so a run evaluated again (a re-run command, a grid cell done again) never
    counts twice. The table is rewritten through a temporary file, so a crash leaves either the old or the new table.
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
    existing: list[dict[str, Any]] = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != RESULTS_COLUMNS:
                raise ValueError(
                    f"{path} has columns {reader.fieldnames}, expected {RESULTS_COLUMNS}. "
                    "Write to a new --results_file."
                )
            existing = list(reader)

    def key(row):
        return tuple(str(row.get(column)) for column in RESULTS_KEY)

    position = {key(row): index for index, row in enumerate(existing)}
    replaced = 0
    for row in rows:
        index = position.get(key(row))
        if index is None:
            position[key(row)] = len(existing)
            existing.append(row)
        else:
            existing[index] = row
            replaced += 1
    if replaced:
        logger.info("%s: %d row(s) of an earlier evaluation of the same run replaced by this one's.", path, replaced)
    with atomic_writer(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULTS_COLUMNS)
        writer.writeheader()
        writer.writerows(existing)
    return len(rows)


def save_metrics(trainer, split: str, metrics: dict[str, float]) -> None:
    """`Trainer.save_metrics(split, metrics)` through `write_json_atomic`, on the main process.

    The Trainer rewrites `all_results.json` in place and reads it back first: a run stopped while it was writing left
    half a file, and every later run failed in `json.load`. Here both files are replaced whole, and an unreadable
    `all_results.json` is rebuilt (with a warning) from the `<split>_results.json` files beside it.
    """
    if not trainer.is_world_process_zero():
        return
    output_dir = Path(trainer.args.output_dir)
    write_json_atomic(output_dir / f"{split}_results.json", metrics)
    combined_path = output_dir / "all_results.json"
    combined = _read_json(combined_path)
    if not isinstance(combined, dict):
        parts = sorted(p for p in output_dir.glob("*_results.json") if p != combined_path)
        if combined_path.exists():
            logger.warning(
                "%s is unreadable (a run was probably stopped while writing it); rebuilt from %s.",
                combined_path,
                ", ".join(p.name for p in parts),
            )
        combined = {}
        for part in parts:
            content = _read_json(part)
            combined.update(content if isinstance(content, dict) else {})
    combined.update(metrics)
    write_json_atomic(combined_path, combined)


# The TrainingArguments that change what a run trains: every script's settings guard records them.
TRAINING_SETTING_KEYS = (
    "seed",
    "max_steps",
    "num_train_epochs",
    "learning_rate",
    "per_device_train_batch_size",
    "world_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "optim",
    "bf16",
    "fp16",
)
ENGLISH = "eng"  # the registry code of English, the source language of every pair and of downstream training
# The settings file each script keeps in its output_dir (check_settings): a folder holding one is that script's run.
REALIGN_SETTINGS_FILE = "realign_settings.json"  # run_realign.py's SETTINGS_FILE
FINETUNE_SETTINGS_FILE = "finetune_settings.json"
SETTINGS_FILES = {
    REALIGN_SETTINGS_FILE: "run_realign.py",
    FINETUNE_SETTINGS_FILE: "run_token_classification.py or run_xnli.py",
}


# ---------------------------------------------------------------------------------------------------------------------
# Hub uploads
# ---------------------------------------------------------------------------------------------------------------------

# What an upload carries: what a reader of the model card needs (the model, its tokenizer, the card). The run's own
# records (training_args.bin, *_settings.json, trainer_state.json, results files) hold local paths and stay local,
# and so do checkpoints and every other sub-folder.
HUB_UPLOAD_PATTERNS = (
    "README.md",
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.jinja",
)


def push_model_folder(trainer, commit_message: str, extra_files: dict[str, bytes] | None = None) -> str:
    """Upload the model, tokenizer and card of `trainer.args.output_dir` (`HUB_UPLOAD_PATTERNS`, top level only) and
    `extra_files` ({name: content}) to the Hub in one commit; returns the repository id.

    The repository is `--hub_model_id` (or the output folder's name). The token is the one `huggingface_hub` finds:
    HF_TOKEN, or the one saved by `hf auth login`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    output_dir = Path(trainer.args.output_dir)
    api = HfApi()
    repo_id = getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id or output_dir.name
    repo_id = api.create_repo(repo_id, private=trainer.args.hub_private_repo, exist_ok=True).repo_id
    files = sorted({path for pattern in HUB_UPLOAD_PATTERNS for path in output_dir.glob(pattern) if path.is_file()})
    operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in files]
    operations += [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in (extra_files or {}).items()
    ]
    api.create_commit(repo_id, operations, commit_message=commit_message, revision=trainer.args.hub_revision)
    logger.info("Uploaded to the Hub as %s: %s", repo_id, ", ".join(op.path_in_repo for op in operations))
    return repo_id
