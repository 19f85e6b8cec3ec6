#!/usr/bin/env python
"""One table of zero-shot POS accuracy from the runs of `recipes/downstream_real_data.sh`.

Reads OUT_ROOT/<model label>/seed<seed>/all_results.json (run_token_classification.py's metrics) and writes, per
(source, language): the accuracy of every model as the mean over its seeds (± the sample standard deviation when
there are several), then the means over the `--trained` languages (those the models were realigned on) and over the
other zero-shot languages, computed per seed and then averaged over seeds. English, the fine-tuning language, is
shown but left out of both means.

    python recipes/downstream_table.py --out_root out/downstream --models base realigned \
        --trained subsets/quickstart_udhr.yaml --output out/downstream/table
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lang_registry  # noqa: E402
from realign_utils import atomic_writer  # noqa: E402

ENGLISH = "eng"
METRIC = "accuracy"


def run_scores(path: Path) -> dict[tuple[str, str], float]:
    """{(source, language): accuracy} of one run's all_results.json (averages and other keys left out)."""
    metrics = json.loads(path.read_text(encoding="utf-8"))
    if f"eval_avg_{METRIC}" not in metrics and not any(k.endswith(f"_{METRIC}") for k in metrics):
        raise ValueError(f"{path}: no evaluation metrics; the run did not finish its evaluation.")
    scores = {}
    for key, value in metrics.items():
        if not (key.startswith("eval_") and key.endswith(f"_{METRIC}")) or key.startswith("eval_avg_"):
            continue
        source, _, language = key.removeprefix("eval_").removesuffix(f"_{METRIC}").rpartition("_")
        scores[(source, language)] = float(value)
    return scores


def collect(out_root: Path, models: list[str]) -> dict[str, dict[int, dict[tuple[str, str], float]]]:
    """{model label: {seed: scores}} for every finished run under out_root/<label>/seed<seed>/."""
    runs: dict[str, dict[int, dict[tuple[str, str], float]]] = {}
    for label in models:
        seeds = {}
        for path in sorted((out_root / label).glob("seed*/all_results.json")):
            seed = int(path.parent.name.removeprefix("seed"))
            seeds[seed] = run_scores(path)
        if not seeds:
            raise ValueError(f"{out_root / label}: no finished run (expected seed<seed>/all_results.json).")
        runs[label] = seeds
    return runs


def mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def group_means(scores: dict[tuple[str, str], float], trained: set[str]) -> dict[str, float]:
    """One run's unweighted means over trained and other zero-shot (source, language) entries."""
    groups: dict[str, list[float]] = {"trained": [], "other": [], "all": []}
    for (_, language), value in scores.items():
        if language == ENGLISH:
            continue
        groups["trained" if language in trained else "other"].append(value)
        groups["all"].append(value)
    return {name: sum(v) / len(v) for name, v in groups.items() if v}


def fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def build_table(runs, trained: set[str]) -> tuple[list[str], list[list[str]], list[dict]]:
    """Markdown header and rows, and long-form CSV records."""
    models = list(runs)
    entries = sorted(
        {key for seeds in runs.values() for scores in seeds.values() for key in scores},
        key=lambda k: (k[1] != ENGLISH, k[0], k[1] not in trained, k[1]),
    )
    seeds_of = {m: sorted(runs[m]) for m in models}
    header = ["source", "language", "trained", *[f"{m} (seeds {','.join(map(str, seeds_of[m]))})" for m in models]]
    if len(models) > 1:
        header += [f"{m} − {models[0]}" for m in models[1:]]
    rows, records = [], []

    def add_row(cells: list[str], values_by_model: dict[str, list[float]], source: str, language: str, trained_: bool):
        """One table row (mean ± std per model, then each model minus the first) and its CSV records."""
        means = {}
        for m in models:
            values = values_by_model[m]
            mean, std = mean_std(values) if values else (None, None)
            means[m] = mean
            cells.append(fmt(mean, std))
            records.append(
                {
                    "model": m,
                    "source": source,
                    "language": language,
                    "trained": trained_,
                    "mean": mean,
                    "std": std,
                    "seeds": len(values),
                }
            )
        cells += [
            fmt(None if means[m] is None or means[models[0]] is None else means[m] - means[models[0]])
            for m in models[1:]
        ]
        rows.append(cells)

    for source, language in entries:
        flag = "en (fine-tuning)" if language == ENGLISH else ("yes" if language in trained else "")
        values = {m: [s[(source, language)] for s in runs[m].values() if (source, language) in s] for m in models}
        add_row([source, language, flag], values, source, language, language in trained)
    for group, title in (
        ("trained", "mean, trained languages"),
        ("other", "mean, other languages"),
        ("all", "mean, all zero-shot"),
    ):
        values = {
            m: [g[group] for g in (group_means(s, trained) for s in runs[m].values()) if group in g] for m in models
        }
        add_row(["", f"**{title}**", ""], values, "", group, group == "trained")
    return header, rows, records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_root", required=True, type=Path, help="The recipe's OUT_ROOT.")
    parser.add_argument("--models", nargs="+", required=True, help="The model labels (folders under --out_root).")
    parser.add_argument(
        "--trained",
        default="",
        help="The languages the models were realigned on: a subset YAML or "
        "name, or a comma list of codes (default: none; every language counts as other).",
    )
    parser.add_argument("--output", type=Path, required=True, help="Write OUTPUT.md and OUTPUT.csv.")
    args = parser.parse_args(argv)
    trained = set(lang_registry.parse_language_list(args.trained)) if args.trained.strip() else set()
    header, rows, records = build_table(collect(args.out_root, args.models), trained)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = (
        f"\nZero-shot POS accuracy (%), English UD fine-tuning; mean over seeds (± sample std). Trained: "
        f"{', '.join(sorted(trained)) or 'none'}. Group means are computed per seed, then averaged.\n"
    )
    with atomic_writer(args.output.with_suffix(".md")) as f:
        f.write("\n".join(lines) + "\n" + note)
    with atomic_writer(args.output.with_suffix(".csv"), newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "source", "language", "trained", "mean", "std", "seeds"])
        writer.writeheader()
        writer.writerows(records)
    print("\n".join(lines) + "\n" + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
