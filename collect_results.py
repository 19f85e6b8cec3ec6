#!/usr/bin/env python
"""Summarise results tables into the layout of the paper's Tables 8–11 and Table 1, and draw Figures 3–5.

Reads every results CSV (the fixed `realign_utils.RESULTS_COLUMNS` schema written by run_token_classification.py and
run_xnli.py) under the given folders or files, drops duplicated rows, and writes to `--out`:

    report.md                    every table below, and the figures
    cells.csv                    one score per (model, subset, seed, task): the macro average of that run
    table_main_<model>.md/.csv   Tables 8/10 layout: mean ± std over seeds per task and subset, grouped like the paper
    table_ablation_<model>.*     Tables 9/11 layout (only for models with ablation runs)
    table_1_summary.md/.csv      Table 1 layout (10-language random draws from each pool, the two baselines)
    resource_levels.md/.csv      Figure 3's numbers: HRL / MRL / LRL seen / LRL unseen in the model's pre-training
    americasnli.md/.csv          Figure 4's numbers: out-of-distribution AmericasNLI accuracy
    scaling.csv                  Figure 5's numbers: average over the three tasks against the number of languages
    figure_3_resource_levels.png, figure_4_americasnli.png, figure_5_scaling.png

    python collect_results.py results/ --out report/
    python collect_results.py results/grid results/results.csv --out report/ --pretraining my-model=xlmr

A run's task score is the unweighted mean over its zero-shot (source, language) rows, English excluded, of the task's
metric (POS and NLI accuracy, NER F1), in %: the same entries as the scripts' `eval_avg_<metric>`. Seeds are
aggregated as mean ± sample standard deviation (n − 1; `--ddof 0` for the population one). The paper's own numbers
(`paper_results.yaml`; Tables 8 and 10 have swapped captions there: Table 8 holds mBERT's numbers, Table 10
XLM-R's) are shown beside ours for xlm-roberta-base and bert-base-multilingual-cased.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import lang_registry
from realign_utils import ENGLISH, RESULTS_COLUMNS

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PAPER_RESULTS = HERE / "paper_results.yaml"
TASKS = ("nli", "pos", "ner")  # the paper's column order
TASK_METRICS = {"pos": "accuracy", "ner": "f1", "nli": "accuracy"}
TASK_LABELS = {"nli": "NLI", "pos": "PoS-Tagging", "ner": "NER"}
BASELINE = "none"
OOD_SOURCE = "americasnli"

MAIN_SECTIONS = ("Baseline", "Featural Diversity", "Phylogenetic Diversity", "Script Diversity", "Random Selection")
# Table 6's row names in the order of Tables 8/10, and the names those tables print where they differ.
MAIN_ROWS = (
    "All 65 languages",
    "Present in XTREME-R",
    "Present in Africa",
    "Fine-tuning only",
    "Most diverse from English",
    "Least diverse from English",
    "Most diverse families",
    "Most diverse families within Indo-European",
    "Most diverse using distinct scripts",
    "Most diverse using Latin scripts",
    "Least diverse using Latin scripts",
    "Random Seeded",
)
ROW_LABELS = {
    "Most diverse using distinct scripts": "Most diverse scripts",
    "Most diverse using Latin scripts": "Most diverse using Latin script",
    "Least diverse using Latin scripts": "Least diverse using Latin script",
}
ABLATION_SECTION = "Ablation Languages"
# Table 6's "(strategy)" suffix of an ablation row → the group it is printed under in Tables 9/11.
ABLATION_GROUPS = {
    "Most URIEL": "Most featural diversity from English",
    "Most Family": "Most Phylogenetic Diversity",
    "Most Script": "Most Script Diversity",
    "Random": "Random Seeded",
}
ABLATION_POOLS = (
    "Joshi Class = 2",
    "Joshi Class = 3",
    "Joshi Class = 3,4,5",
    "Joshi Class = 4,5",
    "Seen by mBERT",
    "Seen by XLM-R",
    "Unseen by mBERT",
    "Unseen by XLM-R",
)
# Table 1 rows: label → subset name ({family} = xlmr or mbert: the pre-training of the model in question).
TABLE_1_ROWS = (
    ("Joshi 4 and 5", "joshi45_random_10"),
    ("Joshi 3, 4, and 5", "joshi35_random_10"),
    ("Joshi 3", "joshi3_random_10"),
    ("Joshi 2", "joshi2_random_10"),
    ("Unseen Languages", "unseen_{family}_random_10"),
    ("Seen Languages", "seen_{family}_random_10"),
    ("Fine-tuning only", BASELINE),
    ("65 langs baseline", "all_65"),
)
RESOURCE_GROUPS = ("HRL", "MRL", "LRL (seen)", "LRL (unseen)")


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def find_tables(paths: list[str]) -> list[Path]:
    """Every CSV file among `paths` (files, or folders searched recursively), in a stable order."""
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            files += sorted(path.rglob("*.csv"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{item} is neither a results CSV nor a folder holding some.")
    return files


def read_results(paths: list[str]) -> list[dict[str, Any]]:
    """The rows of every results table found; CSV files with another header are skipped with a warning."""
    rows: list[dict[str, Any]] = []
    for path in find_tables(paths):
        try:
            rows += _read_table(path, first_order=len(rows))
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); a results table is the UTF-8 CSV the "
                "scripts write. Move the file out of the folder, or give collect_results.py the other tables."
            ) from err
    return rows


def _read_table(path: Path, first_order: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != RESULTS_COLUMNS:
            logger.warning("Skipping %s: its columns %s are not the results schema.", path, reader.fieldnames)
            return []
        for row in reader:
            if None in row or None in row.values():  # DictReader's marks for extra and missing fields
                extra = row.pop(None, None) or []
                fields = sum(value is not None for value in row.values()) + len(extra)
                raise ValueError(
                    f"{path}:{reader.line_num}: {fields} fields where the header has {len(RESULTS_COLUMNS)}: the "
                    "line is cut short or malformed (a copy or a disk that filled up?). Remove the line, or run the "
                    "task that wrote the table again."
                )
            try:
                row["seed"] = int(row["seed"])
                row["value"] = float(row["value"])
            except ValueError as err:
                raise ValueError(f"{path}:{reader.line_num}: bad seed or value ({err}).") from err
            row["_order"] = first_order + len(rows)
            rows.append(row)
    return rows


def deduplicate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep one row per (model, subset, seed, task, source, language, metric): the latest run's.

    A row appended twice by the same run (a crashed run done again) collapses onto its latest copy; when the same
    cell was run into several `run_dir`s, the run with the latest timestamp wins and the others are reported.
    """
    latest: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (
            row["model"],
            row["subset"],
            row["seed"],
            row["task"],
            row["run_dir"],
            row["source"],
            row["language"],
            row["metric"],
        )
        previous = latest.get(key)
        if previous is None or (row["timestamp"], row["_order"]) >= (previous["timestamp"], previous["_order"]):
            latest[key] = row
    newest_run: dict[tuple, tuple[str, int, str]] = {}
    for row in latest.values():
        cell = (row["model"], row["subset"], row["seed"], row["task"])
        candidate = (row["timestamp"], row["_order"], row["run_dir"])
        if cell not in newest_run or candidate > newest_run[cell]:
            newest_run[cell] = candidate
    kept, dropped = [], defaultdict(set)
    for row in latest.values():
        cell = (row["model"], row["subset"], row["seed"], row["task"])
        if row["run_dir"] == newest_run[cell][2]:
            kept.append(row)
        else:
            dropped[cell].add(row["run_dir"])
    for cell, run_dirs in dropped.items():
        logger.warning(
            "%s was run more than once: keeping %s, ignoring %s.",
            cell,
            newest_run[cell][2],
            ", ".join(sorted(run_dirs)),
        )
    if len(rows) != len(kept):
        logger.info("Kept %d of %d rows after removing duplicates.", len(kept), len(rows))
    return sorted(kept, key=lambda r: r["_order"])


# ---------------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------------


def pretraining_family(model: str, overrides: dict[str, str]) -> str | None:
    """`xlmr` or `mbert`: whose pre-training languages (registry flags seen_xlmr / seen_mbert) apply to `model`."""
    if model in overrides:
        return overrides[model]
    name = model.lower()
    if "xlm-roberta" in name or "xlmr" in name or "xlm-r" in name:
        return "xlmr"
    if "bert-base-multilingual" in name or "mbert" in name:
        return "mbert"
    return None


def resource_group(code: str, family: str | None, registry) -> str | None:
    """HRL (Joshi 5), MRL (3–4), or LRL (0–2) split by whether the model's pre-training saw the language."""
    try:
        language = registry.get(code)
    except ValueError:
        return None
    level = language.resource_level
    if level != "LRL":
        return level
    if family is None:
        return "LRL"
    seen = language.seen_xlmr if family == "xlmr" else language.seen_mbert
    return "LRL (seen)" if seen else "LRL (unseen)"


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def mean_std(values: list[float], ddof: int = 1) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    m = mean(values)
    if len(values) - ddof <= 0:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - ddof))


@dataclass
class Cell:
    """One run: the macro average of its task, and the averages within resource groups and AmericasNLI."""

    model: str
    subset: str
    seed: int
    task: str
    score: float
    entries: int
    run_dir: str
    groups: dict[str, float]
    ood: float | None


def cell_scores(rows: list[dict[str, Any]], families: dict[str, str | None], registry) -> list[Cell]:
    """Per (model, subset, seed, task): mean × 100 of the task metric over the non-English rows."""
    by_cell: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["task"] in TASK_METRICS and row["metric"] == TASK_METRICS[row["task"]] and row["language"] != ENGLISH:
            by_cell[(row["model"], row["subset"], row["seed"], row["task"])].append(row)
    cells = []
    for (model, subset, seed, task), entries in by_cell.items():
        grouped: dict[str, list[float]] = defaultdict(list)
        for row in entries:
            group = resource_group(row["language"], families.get(model), registry)
            if group is not None:
                grouped[group].append(100 * row["value"])
        ood = [100 * r["value"] for r in entries if r["source"] == OOD_SOURCE]
        cells.append(
            Cell(
                model,
                subset,
                seed,
                task,
                mean([100 * r["value"] for r in entries]),
                len(entries),
                entries[0]["run_dir"],
                {group: mean(values) for group, values in grouped.items()},
                mean(ood) if ood else None,
            )
        )
    return sorted(cells, key=lambda c: (c.model, c.subset, c.task, c.seed))


@dataclass
class Aggregate:
    mean: float
    std: float
    seeds: int


def aggregate(values_by_seed: dict[int, float], ddof: int) -> Aggregate:
    values = [v for v in values_by_seed.values() if v is not None]
    m, s = mean_std(values, ddof)
    return Aggregate(m, s, len(values))


# ---------------------------------------------------------------------------------------------------------------------
# Subsets: where each one goes in the paper's tables
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class SubsetInfo:
    name: str
    section: str
    row: str  # Table 6's row name (ablation rows: the pool, e.g. "Joshi Class = 3 (Random)")
    n: int | None  # languages realigned (declared n)
    pool_size: int | None = None  # ablation: the size of the row's pool


def subset_info(name: str, search_dirs: list[Path]) -> SubsetInfo:
    """Table placement of a subset: from its YAML's `source` (in `search_dirs`, then subsets/), or `<pool>_<n>`."""
    if name == BASELINE:
        return SubsetInfo(name, "Baseline", "Fine-tuning only", 0)
    for folder in [*search_dirs, lang_registry.SUBSETS_DIR]:
        path = Path(folder) / f"{name}.yaml"
        if path.is_file():
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            source = data.get("source") or {}
            n = data.get("n") if isinstance(data.get("n"), int) else source.get("n_printed")
            info = SubsetInfo(name, str(source.get("section") or "Other"), str(source.get("row") or name), n)
            if info.section == ABLATION_SECTION:
                info.pool_size = ablation_pool_sizes().get(ablation_parts(info.row)[0])
            return info
    match = re.fullmatch(r"(.+)_(\d+)", name)
    if match and (lang_registry.SUBSETS_DIR / f"{match.group(1)}.yaml").is_file():
        pool = subset_info(match.group(1), search_dirs)
        if pool.section == ABLATION_SECTION:  # a draw of n languages from an ablation pool (recipes/grid.py)
            return SubsetInfo(name, pool.section, pool.row, int(match.group(2)), pool.pool_size)
    return SubsetInfo(name, "Other", name, None)


_POOL_SIZES: dict[str, int] = {}


def ablation_pool_sizes() -> dict[str, int]:
    """{pool label: size} from the ablation '(Random)' rows of subsets/, whose printed lists are the pools."""
    if not _POOL_SIZES:
        for path in sorted(lang_registry.SUBSETS_DIR.glob("*.yaml")):
            source = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("source") or {}
            row = str(source.get("row", ""))
            if source.get("section") == ABLATION_SECTION and row.endswith("(Random)"):
                _POOL_SIZES[ablation_parts(row)[0]] = source.get("n_printed")
    return _POOL_SIZES


def ablation_parts(row: str) -> tuple[str, str]:
    """'Joshi Class = 3,5 (Most URIEL)' → ('Joshi Class = 3,4,5', 'Most featural diversity from English')."""
    match = re.fullmatch(r"(.*?)\s*\((.*)\)", row)
    pool, strategy = (match.group(1), match.group(2)) if match else (row, "")
    pool = {"Joshi Class = 3,5": "Joshi Class = 3,4,5"}.get(pool, pool)
    return pool, ABLATION_GROUPS.get(strategy, strategy or "Other")


def main_sort_key(info: SubsetInfo) -> tuple:
    section = MAIN_SECTIONS.index(info.section) if info.section in MAIN_SECTIONS else len(MAIN_SECTIONS)
    row = MAIN_ROWS.index(info.row) if info.row in MAIN_ROWS else len(MAIN_ROWS)
    return section, row, info.row, info.n or 0, info.name


def ablation_sort_key(info: SubsetInfo) -> tuple:
    pool, group = ablation_parts(info.row)
    groups = list(ABLATION_GROUPS.values())
    return (
        groups.index(group) if group in groups else len(groups),
        ABLATION_POOLS.index(pool) if pool in ABLATION_POOLS else len(ABLATION_POOLS),
        pool,
        info.name,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Paper numbers
# ---------------------------------------------------------------------------------------------------------------------


def load_paper(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def paper_model(model: str, paper: dict[str, Any]) -> str | None:
    """The paper's key for `model` (its Hub id or a listed alias), or None for other models."""
    for key, entry in (paper.get("models") or {}).items():
        if model == key or model in (entry.get("aliases") or []):
            return key
    return None


def model_label(model: str, paper: dict[str, Any]) -> str:
    key = paper_model(model, paper)
    if key is not None:
        return str(paper["models"][key].get("label", key))
    return Path(model).name if Path(model).is_absolute() else model


def model_slug(model: str) -> str:
    name = Path(model).name if Path(model).is_absolute() else model.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------


def fmt(value: float | None, std: float | None = None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "—"
    if std is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])


class Report:
    """Aggregates of every (model, subset, task) and the writers of each table and figure."""

    def __init__(
        self,
        cells: list[Cell],
        infos: dict[str, SubsetInfo],
        paper: dict[str, Any],
        families: dict[str, str | None],
        ddof: int,
    ) -> None:
        self.cells = cells
        self.infos = infos
        self.paper = paper
        self.families = families
        self.ddof = ddof
        self.models = list(dict.fromkeys(c.model for c in cells))
        self.by_key: dict[tuple, dict[int, Cell]] = defaultdict(dict)
        for cell in cells:
            self.by_key[(cell.model, cell.subset, cell.task)][cell.seed] = cell

    # -- aggregates ---------------------------------------------------------------------------------------------------

    def task(self, model: str, subset: str, task: str) -> Aggregate | None:
        seeds = self.by_key.get((model, subset, task))
        return aggregate({s: c.score for s, c in seeds.items()}, self.ddof) if seeds else None

    def average(self, model: str, subset: str) -> float:
        """Mean over the three tasks of the seed means (NaN unless all three tasks have results)."""
        values = [self.task(model, subset, t) for t in TASKS]
        return mean([v.mean for v in values]) if all(v is not None for v in values) else math.nan

    def seeds(self, model: str, subset: str) -> str:
        counts = sorted({len(self.by_key[(model, subset, t)]) for t in TASKS if (model, subset, t) in self.by_key})
        return "/".join(str(c) for c in counts)

    def group_value(self, model: str, subset: str, group: str) -> tuple[float, dict[str, Aggregate]]:
        """Figure 3: per task, the seed mean of the group's average; and their mean over the tasks that have it."""
        per_task = {}
        for task in TASKS:
            seeds = self.by_key.get((model, subset, task), {})
            values = {s: c.groups[group] for s, c in seeds.items() if group in c.groups}
            if values:
                per_task[task] = aggregate(values, self.ddof)
        return mean([a.mean for a in per_task.values()]), per_task

    def ood(self, model: str, subset: str) -> Aggregate | None:
        seeds = self.by_key.get((model, subset, "nli"), {})
        values = {s: c.ood for s, c in seeds.items() if c.ood is not None}
        return aggregate(values, self.ddof) if values else None

    def paper_cell(self, model: str, subset: str, task: str) -> tuple[float, float] | None:
        key = paper_model(model, self.paper)
        value = (((self.paper.get("results") or {}).get(key) or {}).get(subset) or {}).get(task) if key else None
        return tuple(value) if value else None

    def subsets_of(self, model: str) -> list[str]:
        return list(dict.fromkeys(c.subset for c in self.cells if c.model == model))

    def main_subsets(self, model: str) -> list[SubsetInfo]:
        infos = [self.infos[s] for s in self.subsets_of(model) if self.infos[s].section != ABLATION_SECTION]
        return sorted(infos, key=main_sort_key)

    def ablation_subsets(self, model: str) -> list[SubsetInfo]:
        infos = [self.infos[s] for s in self.subsets_of(model) if self.infos[s].section == ABLATION_SECTION]
        return sorted(infos, key=ablation_sort_key)

    def ordered_subsets(self, model: str) -> list[SubsetInfo]:
        return self.main_subsets(model) + self.ablation_subsets(model)

    # -- Tables 8–11 -------------------------------------------------------------------------------------------------

    def task_columns(self, model: str, subset: str) -> tuple[list[str], list[Any]]:
        """Markdown cells and CSV values of the three tasks (ours, then the paper's where it has the cell)."""
        with_paper = paper_model(model, self.paper) is not None
        md, values = [], []
        for task in TASKS:
            agg = self.task(model, subset, task)
            md.append(fmt(agg.mean, agg.std) if agg else "—")
            values += [agg.mean, agg.std] if agg else [math.nan, math.nan]
            if with_paper:
                ref = self.paper_cell(model, subset, task)
                md.append(fmt(ref[0], ref[1]) if ref else "—")
                values += list(ref) if ref else [math.nan, math.nan]
        return md, values

    def task_header(self, model: str) -> tuple[list[str], list[str]]:
        with_paper = paper_model(model, self.paper) is not None
        md, csv_header = [], []
        for task in TASKS:
            md.append(TASK_LABELS[task])
            csv_header += [f"{task}_mean", f"{task}_std"]
            if with_paper:
                md.append(f"{TASK_LABELS[task]} (paper)")
                csv_header += [f"paper_{task}_mean", f"paper_{task}_std"]
        return md, csv_header

    def write_main_table(self, model: str, out: Path) -> str:
        md_tasks, csv_tasks = self.task_header(model)
        header = ["Method", "#Languages", *md_tasks, "Avg.", "Seeds"]
        csv_header = ["section", "row", "subset", "n_languages", *csv_tasks, "avg", "seeds"]
        md_rows, csv_rows = [], []
        section = row_label = None
        for info in self.main_subsets(model):
            if info.section != section:
                section, row_label = info.section, None
                md_rows.append([f"**{section}**"] + [""] * (len(header) - 1))
            label = ROW_LABELS.get(info.row, info.row)
            shown = (
                f"*{label}*"
                if info.section != "Baseline" and label != row_label
                else (label if info.section == "Baseline" else "")
            )
            if info.section == "Other":
                shown = info.name
            row_label = label
            md_cells, values = self.task_columns(model, info.name)
            avg = self.average(model, info.name)
            md_rows.append(
                [shown, str(info.n if info.n is not None else ""), *md_cells, fmt(avg), self.seeds(model, info.name)]
            )
            csv_rows.append([info.section, label, info.name, info.n, *values, avg, self.seeds(model, info.name)])
        slug = model_slug(model)
        write_csv(out / f"table_main_{slug}.csv", csv_header, csv_rows)
        title = f"## {model_label(model, self.paper)}: Tables 8/10 layout\n\n{self.table_note(model, 'main')}\n\n"
        text = title + markdown_table(header, md_rows)
        (out / f"table_main_{slug}.md").write_text(text, encoding="utf-8")
        return text

    def write_ablation_table(self, model: str, out: Path) -> str | None:
        infos = self.ablation_subsets(model)
        if not infos:
            return None
        md_tasks, csv_tasks = self.task_header(model)
        header = ["Method", "#Languages", "Pool", *md_tasks, "Avg.", "Seeds"]
        csv_header = ["group", "pool", "subset", "n_languages", "pool_size", *csv_tasks, "avg", "seeds"]
        md_rows, csv_rows = [], []
        group_seen = None
        for info in infos:
            pool, group = ablation_parts(info.row)
            if group != group_seen:
                group_seen = group
                md_rows.append([f"**{group}**"] + [""] * (len(header) - 1))
            md_cells, values = self.task_columns(model, info.name)
            avg = self.average(model, info.name)
            n, size = info.n, info.pool_size
            md_rows.append([pool, str(n or ""), str(size or ""), *md_cells, fmt(avg), self.seeds(model, info.name)])
            csv_rows.append([group, pool, info.name, n, size, *values, avg, self.seeds(model, info.name)])
        slug = model_slug(model)
        write_csv(out / f"table_ablation_{slug}.csv", csv_header, csv_rows)
        title = (
            f"## {model_label(model, self.paper)}: Tables 9/11 layout (ablation)\n\n"
            f"{self.table_note(model, 'ablation')}\n\n"
        )
        text = title + markdown_table(header, md_rows)
        (out / f"table_ablation_{slug}.md").write_text(text, encoding="utf-8")
        return text

    def table_note(self, model: str, kind: str) -> str:
        note = (
            "Mean ± std over seeds of each run's macro average (English excluded; POS and NLI accuracy, NER F1, "
            "in %). Avg. = mean of the three task means."
        )
        key = paper_model(model, self.paper)
        if key is not None:
            number = self.paper["models"][key].get(f"{kind}_table")
            note += f" Paper columns: the paper's Table {number}"
            if kind == "main":
                note += " (Tables 8 and 10 have swapped captions: Table 8 holds mBERT's numbers, Table 10 XLM-R's)"
            note += "."
        if kind == "ablation":
            note += (
                " Random Seeded rows realign on languages drawn with the run seed from the pool; #Languages is "
                "the number realigned, Pool the pool's size (the number Tables 9/11 print)."
            )
        return note

    # -- Table 1 ------------------------------------------------------------------------------------------------------

    def write_table_1(self, out: Path) -> str:
        header = [
            "Language Pool",
            "POS",
            "NLI",
            "NER",
            "Avg.",
            "POS (paper)",
            "NLI (paper)",
            "NER (paper)",
            "Avg. (paper)",
        ]
        csv_header = [
            "model",
            "pool",
            "subset",
            "pos",
            "nli",
            "ner",
            "avg",
            "paper_pos",
            "paper_nli",
            "paper_ner",
            "paper_avg",
        ]
        md_rows, csv_rows = [], []
        for model in self.models:
            family = self.families.get(model)
            key = paper_model(model, self.paper)
            subsets = [
                (label, template.format(family=family))
                for label, template in TABLE_1_ROWS
                if family is not None or "{family}" not in template
            ]
            if not any((model, subset, task) in self.by_key for _, subset in subsets for task in TASKS):
                continue  # none of Table 1's pools or baselines was run for this model
            md_rows.append([f"**{model_label(model, self.paper)}**"] + [""] * (len(header) - 1))
            for label, subset in subsets:
                ours = [self.task(model, subset, t) for t in ("pos", "nli", "ner")]
                values = [a.mean if a else math.nan for a in ours]
                avg = self.average(model, subset)
                ref = (((self.paper.get("table_1") or {}).get(key) or {}).get(subset) or {}) if key else {}
                refs = [ref.get(t, math.nan) for t in ("pos", "nli", "ner", "avg")]
                md_rows.append([label, *(fmt(v, digits=1) for v in [*values, avg]), *(fmt(v, digits=1) for v in refs)])
                csv_rows.append([model, label, subset, *values, avg, *refs])
        write_csv(out / "table_1_summary.csv", csv_header, csv_rows)
        text = (
            "## Table 1 layout: 10 languages drawn at random from each pool\n\nMeans over seeds, in %. Pools "
            "come from the ablation rows (subsets `<pool>_random_10`); rows without runs show —.\n\n"
        )
        text += markdown_table(header, md_rows) if md_rows else "No run of Table 1's pools or baselines yet.\n"
        (out / "table_1_summary.md").write_text(text, encoding="utf-8")
        return text

    # -- Figure 3: resource levels ------------------------------------------------------------------------------------

    def resource_columns(self, model: str) -> tuple[str, ...]:
        return RESOURCE_GROUPS if self.families.get(model) else ("HRL", "MRL", "LRL")

    def write_resource_levels(self, out: Path) -> str:
        csv_rows, text = [], "## Resource levels (Figure 3)\n\n"
        text += (
            "HRL = Joshi class 5, MRL = 3–4, LRL = 0–2, split by whether the model's pre-training saw the "
            "language (registry flags seen_xlmr / seen_mbert). Each cell: mean over the tasks of the seed mean "
            "of the run's average over the group's zero-shot entries, in %.\n\n"
        )
        for model in self.models:
            columns = self.resource_columns(model)
            if not self.families.get(model):
                text += (
                    f"{model_label(model, self.paper)}: pre-training coverage unknown (pass --pretraining "
                    f"{model}=xlmr|mbert to split LRLs).\n\n"
                )
            md_rows = []
            for info in self.ordered_subsets(model):
                row = [info.name]
                for group in columns:
                    value, per_task = self.group_value(model, info.name, group)
                    row.append(fmt(value))
                    for task, agg in per_task.items():
                        csv_rows.append([model, info.name, group, task, agg.mean, agg.std, agg.seeds])
                    csv_rows.append([model, info.name, group, "mean", value, math.nan, ""])
                md_rows.append(row)
            text += f"### {model_label(model, self.paper)}\n\n" + markdown_table(["Subset", *columns], md_rows) + "\n"
        write_csv(out / "resource_levels.csv", ["model", "subset", "group", "task", "mean", "std", "seeds"], csv_rows)
        (out / "resource_levels.md").write_text(text, encoding="utf-8")
        return text

    def plot_resource_levels(self, out: Path, plt) -> None:
        fig, axes = plt.subplots(
            1, len(self.models), figsize=(4.5 * len(self.models), 0.45 * self.max_rows() + 2), squeeze=False
        )
        for ax, model in zip(axes[0], self.models):
            columns = self.resource_columns(model)
            infos = self.ordered_subsets(model)
            grid = [[self.group_value(model, i.name, g)[0] for g in columns] for i in infos]
            image = ax.imshow(
                [[v if not math.isnan(v) else float("nan") for v in row] for row in grid],
                cmap="viridis",
                aspect="auto",
            )
            ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
            ax.set_yticks(range(len(infos)), [i.name for i in infos])
            finite = [v for row in grid for v in row if not math.isnan(v)]
            middle = (min(finite) + max(finite)) / 2 if finite else 0.0
            for r, row in enumerate(grid):
                for c, value in enumerate(row):
                    if not math.isnan(value):
                        ax.text(
                            c,
                            r,
                            f"{value:.1f}",
                            ha="center",
                            va="center",
                            fontsize=8,
                            color="black" if value > middle else "white",
                        )
            ax.set_title(model_label(model, self.paper))
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.suptitle("Average over tasks by resource level (%)")
        fig.tight_layout()
        fig.savefig(out / "figure_3_resource_levels.png", dpi=120)
        plt.close(fig)

    def max_rows(self) -> int:
        return max((len(self.ordered_subsets(m)) for m in self.models), default=1)

    # -- Figure 4: AmericasNLI ----------------------------------------------------------------------------------------

    def write_americasnli(self, out: Path) -> str:
        csv_rows, md_rows = [], []
        for model in self.models:
            for info in self.ordered_subsets(model):
                agg = self.ood(model, info.name)
                if agg is None:
                    continue
                csv_rows.append([model, info.name, agg.mean, agg.std, agg.seeds])
                md_rows.append([model_label(model, self.paper), info.name, fmt(agg.mean, agg.std), str(agg.seeds)])
        write_csv(out / "americasnli.csv", ["model", "subset", "mean", "std", "seeds"], csv_rows)
        text = (
            "## AmericasNLI, out of distribution (Figure 4)\n\nAccuracy averaged over AmericasNLI's languages, "
            "mean ± std over seeds, in %.\n\n" + markdown_table(["Model", "Subset", "Accuracy", "Seeds"], md_rows)
        )
        (out / "americasnli.md").write_text(text, encoding="utf-8")
        return text

    def plot_americasnli(self, out: Path, plt) -> None:
        fig, axes = plt.subplots(
            1, len(self.models), figsize=(max(5.0, 0.4 * self.max_rows() + 2) * len(self.models), 4.5), squeeze=False
        )
        for ax, model in zip(axes[0], self.models):
            bars = [(i.name, self.ood(model, i.name)) for i in self.ordered_subsets(model)]
            bars = [(name, agg) for name, agg in bars if agg is not None]
            colors = ["tab:gray" if name == BASELINE else "tab:blue" for name, _ in bars]
            ax.bar(
                range(len(bars)),
                [a.mean for _, a in bars],
                yerr=[0 if math.isnan(a.std) else a.std for _, a in bars],
                color=colors,
                capsize=3,
            )
            ax.set_xticks(range(len(bars)), [name for name, _ in bars], rotation=60, ha="right")
            ax.set_ylabel("AmericasNLI accuracy (%)")
            ax.set_title(model_label(model, self.paper))
        fig.tight_layout()
        fig.savefig(out / "figure_4_americasnli.png", dpi=120)
        plt.close(fig)

    # -- Figure 5: scaling --------------------------------------------------------------------------------------------

    def scaling_series(self, model: str) -> dict[str, list[tuple[int, float]]]:
        """Per strategy (a row of Tables 8/10 outside the baselines): (n, average over tasks) points, n ascending."""
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for info in self.main_subsets(model):
            if info.section in ("Baseline", "Other") or info.n is None:
                continue
            avg = self.average(model, info.name)
            if not math.isnan(avg):
                series[ROW_LABELS.get(info.row, info.row)].append((info.n, avg))
        return {label: sorted(points) for label, points in series.items()}

    def write_scaling(self, out: Path) -> None:
        rows = []
        for model in self.models:
            for label, points in self.scaling_series(model).items():
                rows += [[model, label, n, value] for n, value in points]
            for name in (BASELINE, "all_65"):
                rows.append(
                    [model, self.infos[name].row if name in self.infos else name, "", self.average(model, name)]
                )
        write_csv(out / "scaling.csv", ["model", "strategy", "n", "avg"], rows)

    def plot_scaling(self, out: Path, plt) -> None:
        fig, axes = plt.subplots(1, len(self.models), figsize=(6 * len(self.models), 4.5), squeeze=False)
        for ax, model in zip(axes[0], self.models):
            for label, points in self.scaling_series(model).items():
                ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=label)
            for name, style in ((BASELINE, ":"), ("all_65", "--")):
                value = self.average(model, name)
                if not math.isnan(value):
                    ax.axhline(
                        value,
                        linestyle=style,
                        color="black",
                        label="Fine-tuning only" if name == BASELINE else "All 65 languages",
                    )
            ax.set_xlabel("languages used for realignment (n)")
            ax.set_ylabel("average over POS, NER, NLI (%)")
            ax.set_title(model_label(model, self.paper))
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "figure_5_scaling.png", dpi=120)
        plt.close(fig)


def write_cells(cells: list[Cell], out: Path) -> None:
    write_csv(
        out / "cells.csv",
        ["model", "subset", "seed", "task", "metric", "score", "entries", "run_dir"],
        [[c.model, c.subset, c.seed, c.task, TASK_METRICS[c.task], c.score, c.entries, c.run_dir] for c in cells],
    )


def build_report(
    paths: list[str],
    out: Path,
    *,
    subsets_dirs: list[Path] | None = None,
    pretraining: dict[str, str] | None = None,
    paper_path: Path | None = PAPER_RESULTS,
    ddof: int = 1,
) -> Path:
    """Read the results under `paths` and write every table and figure to `out`; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = deduplicate(read_results(paths))
    if not rows:
        raise ValueError(
            f"No results rows found in {', '.join(paths)} (CSV files with the columns {RESULTS_COLUMNS})."
        )
    registry = lang_registry.load_registry()
    models = list(dict.fromkeys(r["model"] for r in rows))
    families = {m: pretraining_family(m, pretraining or {}) for m in models}
    cells = cell_scores(rows, families, registry)
    infos = {name: subset_info(name, list(subsets_dirs or [])) for name in {c.subset for c in cells}}
    report = Report(cells, infos, load_paper(paper_path), families, ddof)
    out.mkdir(parents=True, exist_ok=True)
    write_cells(cells, out)
    parts = ["# Results\n", f"{len(rows)} result rows from {', '.join(paths)}; {len(cells)} runs.\n"]
    for model in report.models:
        parts.append(report.write_main_table(model, out))
        ablation = report.write_ablation_table(model, out)
        if ablation:
            parts.append(ablation)
    parts.append(report.write_table_1(out))
    parts.append(report.write_resource_levels(out))
    parts.append("![Figure 3](figure_3_resource_levels.png)\n")
    parts.append(report.write_americasnli(out))
    parts.append("![Figure 4](figure_4_americasnli.png)\n")
    report.write_scaling(out)
    parts.append("## Scaling with the number of languages (Figure 5)\n\n![Figure 5](figure_5_scaling.png)\n")
    report.plot_resource_levels(out, plt)
    report.plot_americasnli(out, plt)
    report.plot_scaling(out, plt)
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def parse_pretraining(items: list[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        model, sep, family = item.rpartition("=")
        if not sep or family not in ("xlmr", "mbert"):
            raise ValueError(f"--pretraining expects MODEL=xlmr or MODEL=mbert, got {item!r}.")
        mapping[model] = family
    return mapping


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="Results CSV files, or folders searched recursively for them.")
    parser.add_argument("--out", default="report", help="The folder to write the tables and figures to.")
    parser.add_argument(
        "--subsets_dir",
        action="append",
        default=[],
        help="Another folder of subset YAMLs (looked up before subsets/) to place custom subsets.",
    )
    parser.add_argument(
        "--pretraining",
        action="append",
        default=[],
        help="MODEL=xlmr|mbert: whose pre-training languages split the LRLs of MODEL (default: from "
        "the name: xlm-roberta → xlmr, bert-base-multilingual → mbert).",
    )
    parser.add_argument("--paper", default=str(PAPER_RESULTS), help="The paper's numbers, shown beside ours.")
    parser.add_argument("--no_paper", action="store_true", help="Leave out the paper's numbers.")
    parser.add_argument("--ddof", type=int, default=1, help="Delta degrees of freedom of the std over seeds.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s - %(message)s", level=logging.INFO)
    try:
        path = build_report(
            args.paths,
            Path(args.out),
            subsets_dirs=[Path(d) for d in args.subsets_dir],
            pretraining=parse_pretraining(args.pretraining),
            paper_path=None if args.no_paper else Path(args.paper),
            ddof=args.ddof,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Wrote {path} and its tables and figures in {path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
