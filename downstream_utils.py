"""Plumbing shared by the downstream scripts (run_token_classification.py, run_xnli.py), beside `realign_utils.py`.

What is identical in both and rarely changed: which languages and datasets an evaluation covers (`EvalTarget`,
`resolve_eval_languages`), loading one split from the Hub or from a local `--data_dir` (`find_local_split`,
`read_local_table`, `load_hub_split`), mapping labels by name (`labels_to_training_ids`), the per-language zero-shot
evaluation loop and its macro averages (`evaluate_languages`, `language_averages`), the results rows and the model
card. What a user adapts to a new task (preprocessing, label alignment, metrics) stays in the scripts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import transformers

from realign_utils import (
    ENGLISH,
    TRAINING_SETTING_KEYS,
    append_results,
    push_model_folder,
    read_text_lines,
)

logger = logging.getLogger(__name__)

# Written by run_realign.py next to a realigned checkpoint (its CONFIG_FILE); read here to fill the results table.
REALIGN_CONFIG_FILE = "realign_config.json"
# Local file formats every downstream source accepts; scripts add their own raw formats (CoNLL-U, "token TAG" text).
LOCAL_TABLE_EXTENSIONS = (".parquet", ".jsonl", ".json")
FINETUNE_TRAINING_KEYS = TRAINING_SETTING_KEYS


@dataclasses.dataclass(frozen=True)
class EvalTarget:
    """One evaluation entry: a source dataset (e.g. `masakhaner`), a canonical language code and its config name."""

    source: str
    language: str
    config: str


@dataclasses.dataclass
class EvalSet:
    """A tokenised evaluation dataset of one (source, language), and where it was read from."""

    source: str
    language: str
    dataset: Any
    origin: str


def eval_configs(resource: str) -> dict[str, str]:
    """{canonical code: config name} of every registered language that evaluation `resource` covers (e.g. `xnli`)."""
    import lang_registry

    registry = lang_registry.load_registry()
    return {code: registry.languages[code].eval[resource] for code in registry.languages_with(resource)}


def resolve_eval_languages(
    spec: str, available: dict[str, dict[str, str]], paper: dict[str, list[str]], seed: int | None = None
) -> list[EvalTarget]:
    """Resolve an `--eval_languages` value into (source, language, config) targets, in source order.

    `available` maps each evaluation source of a task to {canonical code: config}; `paper` maps sources to the codes
    the paper evaluates. `spec` is `paper`, a subset YAML or name, `all` (the 65 realignment languages) or a comma
    list of codes or aliases; a language covered by several sources is evaluated on each of them. Languages that no
    source covers are skipped with one warning listing them. Unknown codes raise `ValueError`.
    """
    import lang_registry

    if spec.strip().lower() == "paper":
        return [EvalTarget(s, code, available[s][code]) for s in available for code in paper.get(s, [])]
    codes = lang_registry.parse_language_list(spec, seed=seed)
    skipped = [code for code in codes if not any(code in configs for configs in available.values())]
    if skipped:
        logger.warning(
            "No evaluation data in %s for %d language(s), skipped: %s",
            ", ".join(available),
            len(skipped),
            ", ".join(skipped),
        )
    return [
        EvalTarget(s, code, configs[code]) for s, configs in available.items() for code in codes if code in configs
    ]


def parse_revisions(spec: str | None, sources: Iterable[str]) -> dict[str, str]:
    """Parse `--dataset_revisions source=revision,...` into a dict, rejecting unknown sources."""
    revisions: dict[str, str] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        source, sep, revision = item.partition("=")
        if not sep or not revision.strip():
            raise ValueError(f"--dataset_revisions: expected source=revision, got {item!r}.")
        if source.strip() not in sources:
            raise ValueError(f"--dataset_revisions: unknown source {source!r}; expected one of {', '.join(sources)}.")
        revisions[source.strip()] = revision.strip()
    return revisions


class MissingLocalSplit(FileNotFoundError):
    """No local file under `--data_dir` for one (source, config, split); `expected` says what was looked for."""

    def __init__(self, message: str, expected: str) -> None:
        super().__init__(message)
        self.expected = expected


# The repositories the datasets come from call the validation split `dev` (UD, MasakhaPOS / MasakhaNER, SIB-200).
SPLIT_FILE_ALIASES = {"validation": ("dev",)}


def find_local_split(data_dir: str, source: str, config: str, split: str, extensions: Iterable[str]) -> Path:
    """The local file of one split: `data_dir/<source>/<config>/<split>.<ext>`, or a folder `<split>/` of parquet
    shards.

    The folder form is the layout of a Hub `refs/convert/parquet` branch, so a downloaded snapshot can be used as is.
    With `.conllu` among `extensions`, a UD treebank's own file name `<treebank>-ud-<split>.conllu` (e.g.
    `fr_gsd-ud-test.conllu`) is found too, and `validation` is also looked for as `dev` (the repositories' name).
    Raises `MissingLocalSplit` when there is none, `ValueError` when there are several.
    """
    folder = Path(data_dir) / source / config
    extensions = tuple(extensions)
    names = (split, *SPLIT_FILE_ALIASES.get(split, ()))
    found = [folder / f"{name}{ext}" for name in names for ext in extensions if (folder / f"{name}{ext}").is_file()]
    found += [folder / name for name in names if (folder / name).is_dir() and any((folder / name).glob("*.parquet"))]
    if ".conllu" in extensions:
        found += sorted(p for name in names for p in folder.glob(f"*-ud-{name}.conllu") if p.is_file())
    if not found:
        expected = f"{folder}/{split}{{{','.join(extensions)}}}"
        raise MissingLocalSplit(
            f"No local {source} file for config {config!r}, split {split!r}: expected {expected} or a folder "
            f"{folder / split}/ of parquet files (layout: --data_dir/<source>/<config>/<split>.<ext>). Add the file, "
            "or, for an evaluation language, leave it out with --eval_languages / --eval_sources.",
            expected,
        )
    if len(found) > 1:
        hint = ""
        if all(p.suffix == ".conllu" for p in found):
            names = " ".join(p.name for p in found)
            hint = f" To evaluate several treebanks together, concatenate them: cat {names} > {split}.conllu."
        raise ValueError(
            f"{folder} holds several files for split {split!r} ({', '.join(p.name for p in found)}); keep one.{hint}"
        )
    return found[0]


def log_skipped_local_splits(skipped: list[tuple[EvalTarget, MissingLocalSplit]], data_dir: str) -> None:
    """One warning listing every (source, language) that `--data_dir` has no file for, and the file looked for."""
    if skipped:
        logger.warning(
            "--data_dir %s has no file for %d (source, language) pair(s), skipped: %s",
            data_dir,
            len(skipped),
            "; ".join(f"{t.source}/{t.language} ({err.expected})" for t, err in skipped),
        )


def require_eval_sets(eval_sets: list, skipped: list[tuple[EvalTarget, MissingLocalSplit]], data_dir: str) -> None:
    """Refuse a run left with nothing to evaluate because every requested file is absent."""
    if skipped and not eval_sets:
        raise ValueError(
            f"No evaluation file under --data_dir {data_dir} for any requested (source, language): "
            + "; ".join(f"{t.source}/{t.language} ({err.expected})" for t, err in skipped)
            + ". Add the files, or choose other --eval_languages / --eval_sources."
        )


def read_local_table(path: Path, cache_dir: str | None = None):
    """Read a parquet file (or folder of shards), JSON lines or a TSV file with a header line into a `Dataset`.

    Parquet files written by `datasets` keep their features (ClassLabel names included); JSON lines and TSV files
    hold plain values (strings or integers).
    """
    import datasets

    path = Path(path)
    try:
        if path.is_dir():
            files = sorted(str(p) for p in path.glob("*.parquet"))
            return datasets.Dataset.from_parquet(files, cache_dir=cache_dir)
        if path.suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(path), cache_dir=cache_dir)
        if path.suffix in (".jsonl", ".json"):
            return datasets.Dataset.from_json(str(path), cache_dir=cache_dir)
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:
        cause = err.__cause__ or err
        raise ValueError(
            f"{path}: cannot be read as {path.suffix or 'parquet'} ({type(cause).__name__}: {cause})."
        ) from err
    if path.suffix == ".tsv":
        return _read_tsv(path)
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}.")


def _read_tsv(path: Path):
    """A TSV file with a header line, read field by field (no quoting, every value a string except integer labels).

    A UTF-8 byte-order mark before the header is dropped; undecodable bytes are an error naming the line.
    """
    import datasets

    columns: dict[str, list[Any]] = {}
    header: list[str] | None = None
    for lineno, line in read_text_lines(path):
        if header is None:
            header = line.split("\t")
            if not line.strip():
                raise ValueError(f"{path}: empty file; a TSV file needs a header line with the column names.")
            columns = {name: [] for name in header}
            continue
        if not line:
            continue
        row = line.split("\t")
        if len(row) != len(header):
            raise ValueError(f"{path}:{lineno}: {len(row)} fields, but the header has {len(header)} ({header}).")
        for name, value in zip(header, row):
            columns[name].append(value)
    if header is None:
        raise ValueError(f"{path}: empty file; a TSV file needs a header line with the column names.")
    if "label" in columns and all(value.lstrip("-").isdigit() for value in columns["label"]):
        columns["label"] = [int(value) for value in columns["label"]]
    return datasets.Dataset.from_dict(columns)


def load_hub_split(
    hub_id: str,
    config: str,
    split: str,
    *,
    parquet_branch: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
):
    """One split of a Hub dataset; with `parquet_branch`, read from its `refs/convert/parquet` branch.

    `datasets` >= 4 no longer runs loading scripts and does not fall back to the parquet branch by itself, so
    script-only repositories (MasakhaNER 2.0, IndoNLI) are read from the parquet files the Hub converted.
    """
    import datasets

    if not parquet_branch:
        return datasets.load_dataset(hub_id, config, split=split, revision=revision, cache_dir=cache_dir)
    from huggingface_hub import snapshot_download

    patterns = [f"{config}/{split}/*.parquet", f"{config}/*-{split}.parquet", f"{config}/*-{split}-*.parquet"]
    folder = Path(
        snapshot_download(
            hub_id,
            repo_type="dataset",
            revision=revision or "refs/convert/parquet",
            allow_patterns=patterns,
            cache_dir=cache_dir,
        )
    )
    files = sorted(str(p) for pattern in patterns for p in folder.glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"{hub_id}: no parquet files for config {config!r}, split {split!r} on revision "
            f"{revision or 'refs/convert/parquet'} (looked for {', '.join(patterns)})."
        )
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)


def require_columns(dataset, columns: Iterable[str], origin: str, hint: str = "") -> None:
    """Fail with the file (or Hub id) and the expected columns when `dataset` lacks one of `columns`."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{origin}: missing column(s) {missing}; found {dataset.column_names}. {hint}".rstrip())


def require_equal_lengths(dataset, columns: tuple[str, str], origin: str) -> None:
    """Fail with the file (or Hub id) and the first example whose list columns (tokens and tags) differ in length."""
    import numpy as np
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    lengths = [pc.list_value_length(table[c]).to_numpy(zero_copy_only=False) for c in columns]
    differing = np.flatnonzero(lengths[0] != lengths[1])
    if len(differing):
        row = int(differing[0])
        named = f" (id {dataset[row]['id']!r})" if "id" in dataset.column_names else ""
        raise ValueError(
            f"{origin}: example {row + 1}{named} has {lengths[0][row]} {columns[0]} but {lengths[1][row]} "
            f"{columns[1]} ({len(differing)} example(s) differ). Every token needs exactly one tag."
        )


def class_label_names(feature) -> list[str] | None:
    """The ClassLabel names of a label feature (a ClassLabel or a list of them), or None for plain values."""
    import datasets

    inner = getattr(feature, "feature", feature)
    return list(inner.names) if isinstance(inner, datasets.ClassLabel) else None


def labels_to_training_ids(
    dataset,
    column: str,
    label_list: list[str],
    *,
    origin: str,
    declared_names: Iterable[str] | None = None,
    renames: dict[str, str] | None = None,
    normalize=None,
):
    """Rewrite `column` (labels, or lists of labels) as ids of `label_list`, matching labels by NAME.

    Label names come from the column's ClassLabel feature; integers without one are read in `declared_names` order
    (the source's documented Hub order); strings are names themselves, passed through `normalize` (e.g. `str.lower`)
    first. `renames` maps source names to training names before the lookup (MasakhaNER's `B-DATE` → `O`); how many
    labels each rename changed is logged. A name that is not a training label raises `ValueError`: positions are
    never matched by index across datasets.
    """
    import datasets
    import numpy as np
    import pyarrow.compute as pc

    feature = dataset.features[column]
    is_list = isinstance(feature, (datasets.List, getattr(datasets, "LargeList", datasets.List)))
    inner = feature.feature if is_list else feature
    renames = renames or {}
    label_to_id = {name: i for i, name in enumerate(label_list)}
    values = dataset.with_format("arrow")[column]
    distinct = pc.unique(pc.list_flatten(values) if is_list else values).to_pylist()
    names = class_label_names(feature)
    if names is None and isinstance(inner, datasets.Value) and inner.dtype.startswith(("int", "uint")):
        if declared_names is None:
            raise ValueError(f"{origin}: {column} holds integers and the source documents no label names for them.")
        names = list(declared_names)
        logger.info(
            "%s: %s holds integers without label names; reading them in the documented order %s.",
            origin,
            column,
            names,
        )
    if names is not None:
        out_of_range = sorted(v for v in distinct if v is None or not 0 <= v < len(names))
        if out_of_range:
            raise ValueError(f"{origin}: {column} holds label ids {out_of_range[:10]} outside 0..{len(names) - 1}.")
        source_names = {v: names[v] for v in distinct}
    else:
        if not (isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")):
            raise ValueError(f"{origin}: {column} must hold label names or integer ids, got {inner}.")
        if None in distinct:
            raise ValueError(f"{origin}: {column} has missing (null) labels.")
        source_names = {v: normalize(v) if normalize else v for v in distinct}
        names = sorted(set(source_names.values()))
    targets = {name: label_to_id.get(renames.get(name, name)) for name in names}
    unknown = [name for name, target in targets.items() if target is None]
    if unknown:
        mapped = f" (after mapping {renames})" if renames else ""
        raise ValueError(
            f"{origin}: label name(s) {unknown} of column {column!r} are not among the training labels "
            f"{label_list}{mapped}. Evaluation files must use the label names of the training dataset; a source "
            "with other labels cannot be evaluated with this model."
        )
    if renames:
        log_renamed_labels(values, is_list, source_names, renames, origin)
    mapping = {value: targets[name] for value, name in source_names.items()}
    lookup = np.vectorize(mapping.__getitem__, otypes=[np.int64]) if mapping else None

    def convert(batch):
        if is_list:
            batch[column] = [lookup(np.asarray(row)).tolist() if len(row) else [] for row in batch[column]]
        else:
            batch[column] = lookup(np.asarray(batch[column])).tolist()
        return batch

    features = dataset.features.copy()
    features[column] = datasets.List(datasets.Value("int64")) if is_list else datasets.Value("int64")
    return dataset.map(convert, batched=True, features=features, desc=f"Mapping labels of {origin}")


def log_renamed_labels(values, is_list: bool, source_names: dict, renames: dict[str, str], origin: str) -> None:
    """Log how many labels of one file `renames` changed (MasakhaNER's DATE tags becoming O), per renamed name."""
    import pyarrow.compute as pc

    counts: dict[str, int] = dict.fromkeys(renames, 0)
    for item in pc.value_counts(pc.list_flatten(values) if is_list else values).to_pylist():
        name = source_names.get(item["values"])
        if name in counts:
            counts[name] += item["counts"]
    logger.info(
        "%s: %d label(s) mapped: %s",
        origin,
        sum(counts.values()),
        ", ".join(f"{name} -> {renames[name]}: {n}" for name, n in counts.items()),
    )


def check_checkpoint_labels(config, label_list: list[str], model_name_or_path: str) -> None:
    """Refuse a checkpoint already fine-tuned with other labels (a plain or realigned encoder has none)."""
    names = [config.id2label[i] for i in sorted(config.id2label)] if getattr(config, "id2label", None) else []
    if names and not all(str(name).startswith("LABEL_") for name in names) and names != list(label_list):
        raise ValueError(
            f"{model_name_or_path} was fine-tuned with the labels {names}, not {label_list}. Start from the encoder "
            "(the base or realigned checkpoint) instead."
        )


def freeze_encoder(model) -> None:
    """Linear probing: freeze the encoder (`model.base_model`) so that only the task head is trained."""
    model.base_model.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("Encoder frozen: training %d of %d parameters (the task head).", trainable, total)


def sort_by_length(dataset, column: str = "input_ids"):
    """`dataset` ordered longest first by the length of `column`, so that batches pad little and OOM shows early."""
    import numpy as np
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.with_format("arrow")[column]).to_numpy(zero_copy_only=False)
    return dataset.select(np.argsort(-lengths, kind="stable"))


class _PredictionBarLabel(transformers.TrainerCallback):
    """Names the Trainer's prediction progress bar after the language being evaluated."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.label = ""

    def on_prediction_step(self, args, state, control, **kwargs):
        bar = getattr(self.progress, "prediction_bar", None)
        if bar is not None and bar.desc != self.label:
            bar.set_description(self.label)


def evaluate_languages(
    trainer, eval_sets: list[EvalSet], metric_names: Iterable[str], prefix: str = "eval"
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Predict every evaluation set with `trainer` (each sorted by length) and collect its metrics.

    Returns the flat metrics (`{prefix}_{source}_{language}_{metric}`, `{prefix}_{source}_{language}_samples` and
    the averages of `language_averages`) and one entry per set: source, language, samples and the metric values.
    """
    metric_names = list(metric_names)
    progress = next(
        (cb for cb in trainer.callback_handler.callbacks if isinstance(cb, transformers.ProgressCallback)), None
    )
    label = _PredictionBarLabel(progress)
    if progress is not None:
        trainer.add_callback(label)
    metrics: dict[str, float] = {}
    entries: list[dict[str, Any]] = []
    try:
        for index, eval_set in enumerate(eval_sets, start=1):
            key = f"{prefix}_{eval_set.source}_{eval_set.language}"
            dataset = sort_by_length(eval_set.dataset)
            logger.info(
                "[%d/%d] %s %s: %d examples (%s)",
                index,
                len(eval_sets),
                eval_set.source,
                eval_set.language,
                len(dataset),
                eval_set.origin,
            )
            label.label = f"{eval_set.source}/{eval_set.language}"
            output = trainer.predict(dataset, metric_key_prefix=key)
            values = {name: float(output.metrics[f"{key}_{name}"]) for name in metric_names}
            metrics.update({f"{key}_{name}": value for name, value in values.items()})
            metrics[f"{key}_samples"] = len(dataset)
            entries.append(
                {"source": eval_set.source, "language": eval_set.language, "samples": len(dataset), **values}
            )
    finally:
        if progress is not None:
            trainer.remove_callback(label)
    metrics.update(language_averages(entries, metric_names, prefix))
    return metrics, entries


def language_averages(
    entries: list[dict[str, Any]], metric_names: Iterable[str], prefix: str = "eval"
) -> dict[str, float]:
    """Unweighted macro averages over the zero-shot (non-English) entries: overall and per source.

    `{prefix}_avg_{metric}` averages every evaluated (source, language) entry except English, the training language;
    `{prefix}_avg_{source}_{metric}` averages the entries of one source.
    """
    zero_shot = [entry for entry in entries if entry["language"] != ENGLISH]
    averages: dict[str, float] = {}
    for name in metric_names:
        if zero_shot:
            averages[f"{prefix}_avg_{name}"] = sum(e[name] for e in zero_shot) / len(zero_shot)
        for source in dict.fromkeys(e["source"] for e in zero_shot):
            values = [e[name] for e in zero_shot if e["source"] == source]
            averages[f"{prefix}_avg_{source}_{name}"] = sum(values) / len(values)
    return averages


def model_provenance(model_name_or_path: str) -> dict[str, str]:
    """The base model and realignment subset of a checkpoint, from its `realign_config.json` if it has one.

    A realigned checkpoint reports the model it was realigned from and its subset name, so that its rows group with
    the fine-tuning-only baseline (subset `none`) of the same base model.
    """
    path = Path(model_name_or_path) / REALIGN_CONFIG_FILE
    if not path.is_file():
        return {"model": model_name_or_path, "subset": "none"}
    config = json.loads(path.read_text(encoding="utf-8"))
    subset = config.get("subset")
    name = subset.get("name") if isinstance(subset, dict) else subset
    return {"model": str(config.get("base_model") or model_name_or_path), "subset": str(name or "none")}


def append_downstream_results(
    path: str | Path,
    entries: list[dict[str, Any]],
    metric_names: Iterable[str],
    *,
    model_name_or_path: str,
    seed: int,
    task: str,
    run_dir: str,
) -> int:
    """Append one results-table row per (source, language, metric) of a downstream run; returns the rows written."""
    provenance = model_provenance(model_name_or_path)
    rows = [
        {
            **provenance,
            "seed": seed,
            "task": task,
            "source": entry["source"],
            "language": entry["language"],
            "metric": name,
            "value": entry[name],
            "run_dir": run_dir,
        }
        for entry in entries
        for name in metric_names
    ]
    written = append_results(path, rows)
    logger.info("Appended %d rows to %s", written, path)
    return written


def write_downstream_model_card(
    trainer,
    *,
    finetuned_from: str,
    task_tag: str,
    dataset_ids: list[str],
    languages: list[str],
    tags: list[str],
    metrics: dict[str, float],
) -> None:
    """Write the model card the way transformers' examples do, listing the languages evaluated and the zero-shot
    averages, and with `--push_to_hub` upload it with the model (`push_model_folder`)."""
    import lang_registry

    registry = lang_registry.load_registry()
    iso = list(dict.fromkeys(registry.get(code).iso639_1 or code for code in [ENGLISH, *languages]))
    kwargs = {
        "finetuned_from": finetuned_from,
        "tasks": task_tag,
        "language": iso,
        "dataset": dataset_ids,
        "tags": ["multilingual-realignment", "zero-shot-cross-lingual", *tags],
        "model_name": Path(trainer.args.output_dir).name,
    }
    if not trainer.is_world_process_zero():
        return
    trainer.create_model_card(**kwargs)
    averages = {k: v for k, v in metrics.items() if k.startswith("eval_avg_")}
    if averages:
        lines = [
            "",
            "## Zero-shot evaluation",
            "",
            "Unweighted averages over the evaluated (source, language) entries:",
            "",
        ]
        lines += [f"- `{key}`: {value:.4f}" for key, value in sorted(averages.items())]
        with open(Path(trainer.args.output_dir) / "README.md", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    if trainer.args.push_to_hub:
        push_model_folder(trainer, "End of training")
