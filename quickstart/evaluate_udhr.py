#!/usr/bin/env python
"""Held-out UDHR retrieval before and after realignment, with the per-language mean-centering control.

For every language, each held-out English unit (preamble, articles 21–30) must find its translation among that
language's units (en→xx), and the other way round (xx→en); precision@1 is reported at article and paragraph level for
four conditions: the base model, the base model with each language's mean embedding subtracted (centering, no
training), the realigned model, and the realigned model with centering. Centering is the control: on an encoder that
is already aligned it recovers much of the raw gain, so only the gain beyond it is credited to realignment.

    python quickstart/evaluate_udhr.py --base_model models/multilingual-e5-small \
        --realigned out/quickstart/seed17 out/quickstart/seed23 --output_dir out/quickstart/report
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lang_registry  # noqa: E402
from realign_utils import (  # noqa: E402
    center,
    content_token_mask,
    masked_mean_pool,
    pooling_special_ids,
    retrieval_precision_at_1,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

CONDITIONS = ("before", "before_centered", "after", "after_centered")
LEVELS = {"article": "test", "paragraph": "test_paragraphs"}
# A language "starts low" when the base model retrieves fewer than this share of its units (article level, mean of
# both directions): the languages realignment is meant to help.
LOW_START = 0.8


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", required=True, help="The encoder before realignment (folder or Hub id).")
    parser.add_argument(
        "--realigned",
        nargs="+",
        required=True,
        help="One or more realigned checkpoints of that encoder (one per seed); their scores are averaged.",
    )
    parser.add_argument("--data_dir", default="data/udhr", help="The folder written by quickstart/prepare_udhr.py.")
    parser.add_argument(
        "--trained",
        default=None,
        help="The languages realignment was trained on (subset name/path or comma list). Default: read from the "
        "first realigned checkpoint's realign_config.json.",
    )
    parser.add_argument(
        "--languages",
        default="all",
        help="The languages to evaluate: 'all' (every language in --data_dir) or a comma list.",
    )
    parser.add_argument("--output_dir", required=True, help="Where to write report.md, all_results.json and a PNG.")
    parser.add_argument(
        "--max_length",
        type=int,
        default=512,
        help="Token limit when embedding held-out units: long enough that articles are not cut (the model's limit).",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Sentences embedded per forward pass.")
    return parser.parse_args(argv)


def read_units(path: Path) -> tuple[list[str], list[str]]:
    english, other = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            translation = record["translation"]
            (code,) = [k for k in translation if k != "en"]
            english.append(translation["en"])
            other.append(translation[code])
    return english, other


class Embedder:
    """Masked-mean sentence vectors of the last layer (the pooling realignment trains), cached by text."""

    def __init__(self, model_path: str, max_length: int, batch_size: int):
        self.name = Path(model_path).name
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path).eval()
        self.special_ids = pooling_special_ids(self.tokenizer)
        self.max_length = max_length
        self.batch_size = batch_size
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if not missing:
            return torch.stack([self.cache[t] for t in texts])
        # Sorted by token count, so that each batch pads to a length close to its own: give all texts in one call.
        lengths = [
            len(ids) for ids in self.tokenizer(missing, truncation=True, max_length=self.max_length)["input_ids"]
        ]
        missing = [missing[i] for i in sorted(range(len(missing)), key=lengths.__getitem__)]
        batches = range(0, len(missing), self.batch_size)
        for start in tqdm(batches, desc=f"Embedding with {self.name}", disable=len(batches) < 2):
            chunk = missing[start : start + self.batch_size]
            batch = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            hidden = self.model(**batch).last_hidden_state  # (B, L, d)
            mask = content_token_mask(batch["input_ids"], batch["attention_mask"], self.special_ids)
            for text, vector in zip(chunk, masked_mean_pool(hidden, mask)):
                self.cache[text] = vector
        return torch.stack([self.cache[t] for t in texts])


def score_language(embed: Embedder, english: list[str], other: list[str]) -> dict[str, float]:
    """P@1 in both directions, raw and with each side mean-centered."""
    en, xx = embed(english), embed(other)
    scores = {}
    for suffix, (a, b) in {"": (en, xx), "_centered": (center(en), center(xx))}.items():
        scores[f"en2xx{suffix}"] = retrieval_precision_at_1(a, b)
        scores[f"xx2en{suffix}"] = retrieval_precision_at_1(b, a)
    return scores


def evaluate_model(model_path: str, units: dict, args) -> dict[str, dict[str, dict[str, float]]]:
    """scores[level][lang] = {en2xx, xx2en, en2xx_centered, xx2en_centered} for one model."""
    embed = Embedder(model_path, args.max_length, args.batch_size)
    texts = [text for level in LEVELS for english, other in units[level].values() for text in (*english, *other)]
    logger.info("Embedding %d held-out texts with %s", len(set(texts)), model_path)
    embed(texts)  # every level and language in one length-sorted pass; the scores below read the cache
    scores: dict[str, dict] = {level: {} for level in LEVELS}
    for level in LEVELS:
        for code in sorted(units[level]):
            english, other = units[level][code]
            scores[level][code] = score_language(embed, english, other)
    return scores


def combine(before: dict, afters: list[dict]) -> dict:
    """Per level and language: the four conditions × two directions, 'after' averaged over seeds."""
    table: dict = {}
    for level, per_lang in before.items():
        table[level] = {}
        for code, b in per_lang.items():
            row = {}
            for direction in ("en2xx", "xx2en"):
                row[f"before_{direction}"] = b[direction]
                row[f"before_centered_{direction}"] = b[f"{direction}_centered"]
                row[f"after_{direction}"] = float(np.mean([a[level][code][direction] for a in afters]))
                row[f"after_centered_{direction}"] = float(
                    np.mean([a[level][code][f"{direction}_centered"] for a in afters])
                )
                row[f"after_{direction}_per_seed"] = [a[level][code][direction] for a in afters]
            table[level][code] = row
    return table


def mean_both(row: dict, condition: str) -> float:
    return (row[f"{condition}_en2xx"] + row[f"{condition}_xx2en"]) / 2


def group_averages(table: dict, trained: set[str]) -> dict:
    """Mean P@1 (both directions) per condition for trained / untrained and low / high-starting languages."""
    groups = {}
    for level, rows in table.items():
        starts = {code: mean_both(table["article"][code], "before") for code in rows if code in table["article"]}
        members = {
            "trained": [c for c in rows if c in trained],
            "untrained": [c for c in rows if c not in trained],
            "trained_low_start": [c for c in rows if c in trained and starts.get(c, 1) < LOW_START],
            "trained_high_start": [c for c in rows if c in trained and starts.get(c, 0) >= LOW_START],
            "untrained_low_start": [c for c in rows if c not in trained and starts.get(c, 1) < LOW_START],
        }
        for group, codes in members.items():
            if codes:
                groups[f"{level}_{group}"] = {
                    "n_languages": len(codes),
                    **{cond: float(np.mean([mean_both(rows[c], cond) for c in codes])) for cond in CONDITIONS},
                }
    return groups


def write_report(table, groups, units, trained, registry, args, seeds) -> str:
    lines = [
        "# UDHR held-out retrieval (precision@1)",
        "",
        f"Base model `{args.base_model}`; realigned: {', '.join(f'`{s}`' for s in seeds)} (after = mean over "
        f"{len(seeds)} run(s)). Each cell is en→xx / xx→en. Chance = 1 / candidates.",
        "",
    ]
    for level in LEVELS:
        lines += [
            f"## {level.capitalize()} level",
            "",
            "| lang | Joshi | seen XLM-R | trained | candidates | before | before + centering | after | "
            "after + centering |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        order = sorted(table[level], key=lambda c: (c not in trained, mean_both(table[level][c], "before")))
        for code in order:
            row, language = table[level][code], registry.get(code)
            cells = " | ".join(f"{row[f'{c}_en2xx']:.2f} / {row[f'{c}_xx2en']:.2f}" for c in CONDITIONS)
            lines.append(
                f"| {code} | {language.joshi} | {'yes' if language.seen_xlmr else 'no'} | "
                f"{'yes' if code in trained else 'no'} | {len(units[level][code][0])} | {cells} |"
            )
        lines += ["", "| group | languages | " + " | ".join(CONDITIONS) + " |", "|---|---|" + "---|" * 4]
        for name, values in groups.items():
            if name.startswith(level):
                cells = " | ".join(f"{values[c]:.3f}" for c in CONDITIONS)
                lines.append(f"| {name.removeprefix(level + '_')} | {values['n_languages']} | {cells} |")
        lines.append("")
    for level in LEVELS:
        key = f"{level}_trained"
        if key in groups:
            g = groups[key]
            lines.append(
                f"- {level}, trained languages: realignment {g['before']:.3f} → {g['after']:.3f} "
                f"({g['after'] - g['before']:+.3f}); centering alone {g['before_centered']:.3f} "
                f"({g['before_centered'] - g['before']:+.3f}); realignment beyond centering "
                f"{g['after_centered'] - g['before_centered']:+.3f}."
            )
        key = f"{level}_untrained"
        if key in groups:
            g = groups[key]
            lines.append(
                f"- {level}, untrained languages: {g['before']:.3f} → {g['after']:.3f}; beyond centering "
                f"{g['after_centered'] - g['before_centered']:+.3f}."
            )
    lines.append("")
    return "\n".join(lines)


def plot(table: dict, trained: set[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["article"]
    order = sorted(rows, key=lambda c: (c not in trained, mean_both(rows[c], "before")))
    x = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(order)), 4))
    for i, condition in enumerate(CONDITIONS):
        ax.bar(x + (i - 1.5) * 0.2, [mean_both(rows[c], condition) for c in order], 0.2, label=condition)
    ax.set_xticks(x, [f"{c}{'*' if c in trained else ''}" for c in order], rotation=90)
    ax.set_ylabel("P@1 (mean of en→xx, xx→en)")
    ax.set_title("UDHR held-out article retrieval (* = realigned on)")
    ax.set_ylim(0, 1.05)
    ax.legend(ncol=4, fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def flatten(table: dict, groups: dict) -> dict[str, float]:
    results = {}
    for level, rows in table.items():
        for code, row in rows.items():
            for key, value in row.items():
                if not key.endswith("_per_seed"):
                    results[f"eval_{code}_{level}_{key}"] = value
    for name, values in groups.items():
        for condition in CONDITIONS:
            results[f"eval_avg_{name}_{condition}"] = values[condition]
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s - %(name)s - %(message)s")
    registry = lang_registry.load_registry()
    data_dir = Path(args.data_dir)
    if args.trained is None:
        config = json.loads((Path(args.realigned[0]) / "realign_config.json").read_text(encoding="utf-8"))
        trained = set(config["languages"])
    else:
        trained = set(lang_registry.parse_language_list(args.trained, registry=registry))
    available = sorted(p.stem for p in (data_dir / LEVELS["article"]).glob("*.jsonl"))
    if not available:
        raise FileNotFoundError(f"No held-out units in {data_dir / 'test'}: run quickstart/prepare_udhr.py first.")
    codes = available if args.languages == "all" else [registry.resolve(c) for c in args.languages.split(",")]
    units = {
        level: {
            c: read_units(data_dir / folder / f"{c}.jsonl")
            for c in codes
            if (data_dir / folder / f"{c}.jsonl").exists()
        }
        for level, folder in LEVELS.items()
    }
    before = evaluate_model(args.base_model, units, args)
    afters = [evaluate_model(path, units, args) for path in args.realigned]
    table = combine(before, afters)
    groups = group_averages(table, trained)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = write_report(table, groups, units, trained, registry, args, args.realigned)
    (output_dir / "report.md").write_text(report, encoding="utf-8")
    results = flatten(table, groups)
    write_json_atomic(output_dir / "all_results.json", results)
    write_json_atomic(output_dir / "per_seed.json", {"realigned": args.realigned, "table": table, "groups": groups})
    plot(table, trained, output_dir / "retrieval_article.png")
    print(report)
    return results


if __name__ == "__main__":
    main()
