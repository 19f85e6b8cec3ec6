#!/usr/bin/env python
"""Alignment diagnostics of an encoder per layer and language pair, optionally against another encoder.

Per language pair and chosen layer (mean-pooled hidden states): sentence retrieval recall@1/5/10 in both directions,
each with the per-language mean-centering control (subtract each language's mean embedding, no training), the mean
cosine of translation pairs against random pairs, and the token-level cosine distance of dictionary word pairs; per
language pair and layer group: the cosine between the gradients of a task loss and of the alignment loss (the
companion paper's §4.5 and Table 3). With --compare_to every metric also gets its change against that model. Writes
alignment_report.json, alignment_report.md and one PNG per metric (layers on x, language pairs on rows).

    python analyze_alignment.py --model_name_or_path out/xlmr-uriel20 --compare_to xlm-roberta-base \
        --parallel_data tatoeba --languages deu,kaz,kor,jpn,hin --layers 4,8,12 --output_dir out/analysis-uriel20
    python analyze_alignment.py --model_name_or_path out/xlmr-uriel20 --parallel_data sib200 \
        --languages deu,kaz-rus,jpn-kaz --task_data sib200 --output_dir out/analysis-flores   # FLORES-200 sentences
    python analyze_alignment.py --model_name_or_path out/quickstart/seed17 --compare_to models/multilingual-e5-small \
        --parallel_data data/udhr/test --languages fra,yor,hau --dictionaries fra=dicts/en-fr.txt \
        --output_dir out/analysis-udhr   # local files, offline
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

import lang_registry
from downstream_utils import (
    find_local_split,
    load_hub_split,
    read_local_table,
)
from realign_losses import contrastive_alignment_loss
from realign_utils import (
    ENGLISH,
    center,
    content_token_mask,
    encode_layers,
    find_local_parallel_file,
    masked_mean_pool,
    parse_args,
    pooling_special_ids,
    read_local_parallel,
    retrieval_recall_at_k,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

TATOEBA_HUB_ID = (
    "mteb/tatoeba-bitext-mining"  # configs deu-eng …; test split; sentence1 = non-English, sentence2 = English
)
SIB200_HUB_ID = "Davlan/sib200"  # FLORES-200 sentences (with topics), one config per language, aligned by index_id
HUB_SOURCES = ("tatoeba", "sib200")
DEFAULT_SPLITS = {"tatoeba": "test", "sib200": "train+validation+test"}
# The companion paper's evaluation languages (§4.4), the default pairs (each with English).
PAPER_LANGUAGES = ("deu", "spa", "fas", "fra", "hin", "jpn", "kaz", "kor", "rus")
KS = (1, 5, 10)
REPORT_JSON, REPORT_MD = "alignment_report.json", "alignment_report.md"
# Metrics drawn and tabulated per (pair, layer); the JSON also has the per-direction recalls.
LAYER_METRICS = (
    *(f"recall@{k}" for k in KS),
    *(f"recall@{k}_centered" for k in KS),
    "cos_translation",
    "cos_random",
    "cos_gap",
    "token_cos_distance",
    "token_cos_distance_random",
)
TEXT_COLUMNS = ("text", "sentence")
SEQUENCE_LABEL_COLUMNS = ("category", "label")
TOKEN_LABEL_COLUMNS = ("pos_tags", "ner_tags", "upos", "labels", "tags")


@dataclass
class AnalysisArguments:
    model_name_or_path: str = field(metadata={"help": "The encoder to analyse (a Hub id or a local checkpoint)."})
    output_dir: str = field(metadata={"help": "Where to write alignment_report.json, alignment_report.md and PNGs."})
    compare_to: str | None = field(
        default=None,
        metadata={"help": "A second encoder (e.g. the model before realignment); every metric gets its change."},
    )
    parallel_data: str = field(
        default="tatoeba",
        metadata={
            "help": "The held-out parallel sentences: 'tatoeba' (mteb/tatoeba-bitext-mining, test split), 'sib200' "
            "(the FLORES-200 sentences of Davlan/sib200, aligned by index_id across languages, so non-English pairs "
            "work too), or a folder of local files in run_realign.py's formats ({code}.tsv English<TAB>translation, "
            "{code}.jsonl with a 'translation' dict, or en-{code}.en + en-{code}.{code})."
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Read 'tatoeba' / 'sib200' (and --task_data sib200) from local files instead of the Hub, in "
            "run_xnli.py's --data_dir layout: DIR/tatoeba/deu-eng/test.jsonl (columns sentence1, sentence2), "
            "DIR/sib200/eng_Latn/test.tsv (columns index_id, category, text)."
        },
    )
    parallel_split: str | None = field(
        default=None,
        metadata={"help": "The Hub split(s) to read, '+'-joined (default: tatoeba 'test', sib200 all three)."},
    )
    languages: str | None = field(
        default=None,
        metadata={
            "help": "A comma list of language codes (each paired with English: fra → fra-eng) and/or pairs a-b "
            "(deu-fra; sib200 only, the other sources being English-centric), or a subset name. Default: every "
            "language of a local folder; the companion paper's nine (deu spa fas fra hin jpn kaz kor rus) otherwise."
        },
    )
    layers: str = field(
        default="4,8,12",
        metadata={
            "help": "The hidden_states indices to analyse (0 = embeddings, 12 = last layer of a 12-layer model)."
        },
    )
    max_pairs: int | None = field(
        default=None, metadata={"help": "Use at most this many sentence pairs per language pair (the first ones)."}
    )
    max_length: int = field(default=128, metadata={"help": "The token limit of an embedded sentence."})
    batch_size: int = field(default=32, metadata={"help": "Sentences embedded per forward pass."})
    dictionaries: str | None = field(
        default=None,
        metadata={
            "help": "Bilingual dictionaries for the token-level distances: a comma list of code=PATH (lines "
            "'english_word translation', i.e. MUSE's en-xx files as distributed) or a-b=PATH (lines 'a_word "
            "b_word'). Each word is embedded alone and mean-pooled over its sub-words."
        },
    )
    max_dictionary_pairs: int | None = field(
        default=5000, metadata={"help": "Use at most this many dictionary entries per language pair."}
    )
    task_data: str | None = field(
        default=None,
        metadata={
            "help": "Enables the gradient cosines: English task examples, 'sib200' (SIB-200 English train split, "
            "topic classification) or a local file (.parquet, .jsonl, .tsv) with text + category/label columns "
            "(sequence classification) or tokens + pos_tags/ner_tags/upos/labels (token classification, first "
            "sub-words labelled)."
        },
    )
    task_model: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint fine-tuned on the task (its head and encoder are used for the gradients of "
            "--model_name_or_path, as in the companion paper's Table 3). Default: a freshly initialised head (seeded) "
            "on --model_name_or_path, which measures the direction of the task gradient at the start of fine-tuning."
        },
    )
    compare_task_model: str | None = field(
        default=None, metadata={"help": "Likewise for --compare_to (default: a fresh head on --compare_to)."}
    )
    gradient_batches: int = field(
        default=2, metadata={"help": "Batches whose gradients are summed, for the task and per language pair."}
    )
    gradient_batch_size: int = field(default=16, metadata={"help": "Examples (task) or pairs (alignment) per batch."})
    temperature: float = field(default=0.1, metadata={"help": "The temperature of the alignment loss (paper: 0.1)."})
    seed: int = field(default=42, metadata={"help": "Seeds the fresh task head and the sampled task examples."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub models and datasets are cached."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Whether to run code from a model's Hub repository (only if you trust it)."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, … (default: cuda when available)."})

    def __post_init__(self):
        try:
            self.layer_list = [int(x) for x in self.layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--layers must be a comma list of integers, got {self.layers!r}.") from None
        if not self.layer_list:
            raise ValueError("--layers needs at least one hidden_states index, e.g. 4,8,12.")
        if self.parallel_data not in HUB_SOURCES and not os.path.isdir(self.parallel_data):
            raise ValueError(
                f"--parallel_data {self.parallel_data!r} is neither {' nor '.join(HUB_SOURCES)} nor a folder."
            )
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ValueError(f"--data_dir {self.data_dir} is not a folder.")
        for name in ("max_pairs", "max_dictionary_pairs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1.")
        if self.gradient_batches < 1 or self.gradient_batch_size < 2:
            raise ValueError("--gradient_batches must be ≥ 1 and --gradient_batch_size ≥ 2 (in-batch negatives).")
        if self.temperature <= 0:
            raise ValueError("--temperature must be positive.")
        if self.task_model is not None and self.task_data is None:
            raise ValueError("--task_model needs --task_data (the examples its task loss is computed on).")


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ParallelSet:
    """Translation pairs of one language pair a-b: row i of `a` translates row i of `b`."""

    name: str  # "fra-eng"
    a: list[str]
    b: list[str]
    origin: str


def resolve_pairs(args: AnalysisArguments, registry) -> list[tuple[str, str]]:
    """(a, b) canonical codes: a bare code L means (L, eng); a-b is taken as given."""
    spec = args.languages
    if spec is None:
        if args.parallel_data in HUB_SOURCES:
            return [(code, ENGLISH) for code in PAPER_LANGUAGES]
        found = []
        for code in registry.languages:
            if code == ENGLISH:
                continue
            try:
                find_local_parallel_file(args.parallel_data, registry.languages[code])
            except FileNotFoundError:
                continue
            found.append((code, ENGLISH))
        if not found:
            raise ValueError(f"--parallel_data {args.parallel_data} holds no parallel file of a registered language.")
        return found
    pairs: list[tuple[str, str]] = []
    singles = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if "-" in item and all(part in registry for part in item.split("-", 1)):
            a, b = (registry.resolve(part) for part in item.split("-", 1))
            pairs.append((a, b))
        else:
            singles.append(item)
    if singles:
        pairs.extend(
            (code, ENGLISH)
            for code in lang_registry.parse_language_list(",".join(singles), registry=registry, seed=args.seed)
            if code != ENGLISH
        )
    if args.parallel_data != "sib200" and any(ENGLISH not in pair for pair in pairs):
        raise ValueError(
            f"Pairs without English ({', '.join('-'.join(p) for p in pairs if ENGLISH not in p)}) need multi-way "
            "parallel data: use --parallel_data sib200 (FLORES-200 sentences aligned by index_id)."
        )
    return list(dict.fromkeys(pairs))


def _hub_or_local(source: str, hub_id: str, config: str, split: str, args: AnalysisArguments):
    """One split, from --data_dir (run_xnli.py's layout) or the Hub."""
    if args.data_dir is not None:
        path = find_local_split(args.data_dir, source, config, split, (".parquet", ".jsonl", ".json", ".tsv"))
        return read_local_table(path, args.cache_dir), str(path)
    return load_hub_split(hub_id, config, split, cache_dir=args.cache_dir), f"{hub_id} {config}/{split}"


def _splits(args: AnalysisArguments) -> list[str]:
    return [s for s in (args.parallel_split or DEFAULT_SPLITS[args.parallel_data]).split("+") if s]


def load_parallel_sets(args: AnalysisArguments, pairs: list[tuple[str, str]], registry) -> list[ParallelSet]:
    """The held-out pairs of every language pair, capped at --max_pairs."""
    sets = []
    sib_cache: dict[str, dict[str, str]] = {}
    for a, b in pairs:
        name = f"{a}-{b}"
        if args.parallel_data == "sib200":
            texts = [_sib200_texts(code, args, registry, sib_cache) for code in (a, b)]
            shared = [key for key in texts[0] if key in texts[1]]
            left, right, origin = [texts[0][k] for k in shared], [texts[1][k] for k in shared], SIB200_HUB_ID
        else:
            other = a if b == ENGLISH else b
            if args.parallel_data == "tatoeba":
                config = registry.get(other).eval.get("tatoeba")
                if config is None:
                    raise ValueError(
                        f"Tatoeba has no {other}-eng pair in the registry; drop {other} from --languages."
                    )
                left, right, origins = [], [], []
                for split in _splits(args):
                    dataset, origin = _hub_or_local("tatoeba", TATOEBA_HUB_ID, config, split, args)
                    left += dataset["sentence1"]
                    right += dataset["sentence2"]
                    origins.append(origin)
                origin = ", ".join(origins)
            else:
                files = find_local_parallel_file(args.parallel_data, registry.get(other))
                data = read_local_parallel(files)
                left, right, origin = data["tgt"], data["src"], ", ".join(str(f) for f in files)
            if a == ENGLISH:  # eng-xxx: English first
                left, right = right, left
        if args.max_pairs is not None:
            left, right = left[: args.max_pairs], right[: args.max_pairs]
        if len(left) < 2:
            raise ValueError(f"{name}: {len(left)} sentence pair(s) in {origin}; retrieval needs at least 2.")
        sets.append(ParallelSet(name, list(left), list(right), origin))
        logger.info("%s: %d pairs from %s", name, len(left), origin)
    return sets


def _sib200_texts(code: str, args: AnalysisArguments, registry, cache: dict) -> dict[str, str]:
    """{index_id: text} of a language's SIB-200 (FLORES-200) sentences over the requested splits."""
    if code not in cache:
        config = registry.get(code).eval.get("sib200")
        if config is None:
            raise ValueError(f"SIB-200 has no config for {code} in the registry; drop it from --languages.")
        texts = {}
        for split in _splits(args):
            dataset, _ = _hub_or_local("sib200", SIB200_HUB_ID, config, split, args)
            texts.update(zip((str(i) for i in dataset["index_id"]), dataset["text"]))
        cache[code] = texts
    return cache[code]


def read_dictionaries(args: AnalysisArguments, registry) -> dict[str, list[tuple[str, str]]]:
    """{pair name: [(word_a, word_b), ...]} from --dictionaries; code=PATH files hold English first (MUSE en-xx)."""
    out = {}
    for item in (x.strip() for x in (args.dictionaries or "").split(",")):
        if not item:
            continue
        key, sep, path = item.partition("=")
        if not sep or not os.path.isfile(path):
            raise ValueError(f"--dictionaries: expected code=PATH or a-b=PATH with an existing file, got {item!r}.")
        if "-" in key:
            a, b = (registry.resolve(part) for part in key.split("-", 1))
            english_first = False
        else:
            a, b = registry.resolve(key), ENGLISH
            english_first = True
        entries = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                fields = line.split()
                if len(fields) != 2:
                    raise ValueError(f"{path}:{lineno}: expected two words separated by white space, got {line!r}.")
                entries.append((fields[1], fields[0]) if english_first else (fields[0], fields[1]))
        if args.max_dictionary_pairs is not None:
            entries = entries[: args.max_dictionary_pairs]
        if len(entries) < 2:
            raise ValueError(f"{path}: {len(entries)} entries; the random-pair baseline needs at least 2.")
        out[f"{a}-{b}"] = entries
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Representational metrics
# ---------------------------------------------------------------------------------------------------------------------


class Embedder:
    """Mean-pooled vectors of the chosen layers for one model, cached by text (English recurs across pairs)."""

    def __init__(self, model, tokenizer, layers: list[int], args: AnalysisArguments, device):
        self.model, self.tokenizer, self.layers, self.args, self.device = model, tokenizer, layers, args, device
        self.cache: dict[str, dict[int, torch.Tensor]] = {}

    def __call__(self, texts: list[str]) -> dict[int, torch.Tensor]:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            vectors = encode_layers(
                self.model,
                self.tokenizer,
                missing,
                self.layers,
                batch_size=self.args.batch_size,
                max_length=self.args.max_length,
                device=self.device,
            )
            for row, text in enumerate(missing):
                self.cache[text] = {layer: vectors[layer][row] for layer in self.layers}
        return {layer: torch.stack([self.cache[t][layer] for t in texts]) for layer in self.layers}


def pair_metrics(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Retrieval recall@k both ways (raw and mean-centered per language) and translation vs random-pair cosines."""
    metrics: dict[str, float] = {}
    for suffix, (x, y) in {"": (a, b), "_centered": (center(a), center(b))}.items():
        forward, backward = retrieval_recall_at_k(x, y, KS), retrieval_recall_at_k(y, x, KS)
        for k in KS:
            metrics[f"recall@{k}_a2b{suffix}"] = forward[k]
            metrics[f"recall@{k}_b2a{suffix}"] = backward[k]
            metrics[f"recall@{k}{suffix}"] = (forward[k] + backward[k]) / 2
    metrics.update(cosine_gap(a, b, "cos"))
    return metrics


def cosine_gap(a: torch.Tensor, b: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean cosine of the rows that translate each other and of all other (random) row pairs, and their gap."""
    cosines = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T  # (n, n)
    n = len(cosines)
    translation = cosines.diagonal().mean().item()
    random = ((cosines.sum() - cosines.diagonal().sum()) / (n * n - n)).item()
    return {f"{prefix}_translation": translation, f"{prefix}_random": random, f"{prefix}_gap": translation - random}


def dictionary_metrics(embedder: Embedder, entries: list[tuple[str, str]]) -> dict[int, dict[str, float]]:
    """Cosine distance (1 − cos) of dictionary translations and of random word pairs, per layer."""
    a = embedder([x for x, _ in entries])
    b = embedder([y for _, y in entries])
    out = {}
    for layer in embedder.layers:
        gap = cosine_gap(a[layer], b[layer], "cos")
        out[layer] = {
            "token_cos_distance": 1 - gap["cos_translation"],
            "token_cos_distance_random": 1 - gap["cos_random"],
        }
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Gradient cosines
# ---------------------------------------------------------------------------------------------------------------------


def layer_groups(parameter_names: list[str], layers: list[int]) -> dict[str, list[str]]:
    """Encoder parameters grouped as `embeddings`, `layers i-j` (between consecutive --layers) and `all`.

    Encoder block k (0-based) produces hidden_states[k + 1], so --layers 4,8,12 gives groups layers 1-4, 5-8 and 9-12
    (1-based blocks). Parameters outside the embeddings and the blocks (BERT's pooler) are left out.
    """
    bounds = sorted({layer for layer in layers if layer > 0})
    groups: dict[str, list[str]] = {"embeddings": []}
    for index, upper in enumerate(bounds):
        groups[f"layers {(bounds[index - 1] if index else 0) + 1}-{upper}"] = []
    groups["all"] = []
    pattern = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
    for name in parameter_names:
        match = pattern.search(name)
        if match:
            block = int(match.group(1)) + 1
            upper = next((b for b in bounds if block <= b), None)
            if upper is not None:
                lower = bounds[bounds.index(upper) - 1] + 1 if bounds.index(upper) else 1
                groups[f"layers {lower}-{upper}"].append(name)
            groups["all"].append(name)
        elif name.startswith("embeddings.") or ".embeddings." in name:
            groups["embeddings"].append(name)
            groups["all"].append(name)
    return {group: names for group, names in groups.items() if names}


def group_cosines(g1: dict[str, torch.Tensor], g2: dict[str, torch.Tensor], groups: dict[str, list[str]]) -> dict:
    """Cosine between two gradients (parameter name → tensor) over each group's parameters."""
    out = {}
    for group, names in groups.items():
        a = torch.cat([g1[n].flatten() for n in names]).double()
        b = torch.cat([g2[n].flatten() for n in names]).double()
        denominator = a.norm() * b.norm()
        out[group] = (a @ b / denominator).item() if denominator > 0 else float("nan")
    return out


def load_task_examples(args: AnalysisArguments):
    """The task examples (a shuffled, seeded sample) and whether they are token-level."""
    if args.task_data == "sib200":
        config = lang_registry.load_registry().get(ENGLISH).eval["sib200"]
        dataset, origin = _hub_or_local("sib200", SIB200_HUB_ID, config, "train", args)
    else:
        dataset, origin = read_local_table(Path(args.task_data), args.cache_dir), args.task_data
    token_level = "tokens" in dataset.column_names
    wanted = TOKEN_LABEL_COLUMNS if token_level else SEQUENCE_LABEL_COLUMNS
    label_column = next((c for c in wanted if c in dataset.column_names), None)
    text_column = "tokens" if token_level else next((c for c in TEXT_COLUMNS if c in dataset.column_names), None)
    if label_column is None or text_column is None:
        raise ValueError(
            f"{origin}: --task_data needs text + category/label columns (sequence classification) or tokens + "
            f"{'/'.join(TOKEN_LABEL_COLUMNS)} (token classification); found {dataset.column_names}."
        )
    count = min(len(dataset), args.gradient_batches * args.gradient_batch_size)
    dataset = dataset.shuffle(seed=args.seed).select(range(count))
    logger.info(
        "Task examples: %d from %s (%s-level, labels in %r)",
        count,
        origin,
        "token" if token_level else "sequence",
        label_column,
    )
    return dataset.rename_columns({text_column: "_text", label_column: "_label"}), token_level


def task_label_ids(values: list, config) -> tuple[list, int]:
    """Label ids (by the task model's label names where it has them, else sorted names / the integers themselves)."""
    flat = [v for row in values for v in row] if values and isinstance(values[0], list) else list(values)
    names = getattr(config, "label2id", None) or {}
    if all(isinstance(v, str) for v in flat):
        mapping = dict(names) if set(flat) <= set(names) else {n: i for i, n in enumerate(sorted(set(flat)))}
    else:
        mapping = {v: int(v) for v in set(flat)}
    convert = (
        (lambda row: [mapping[v] for v in row]) if values and isinstance(values[0], list) else mapping.__getitem__
    )
    num_labels = max(len(names), max(mapping.values()) + 1)
    return [convert(v) for v in values], num_labels


def task_batches(
    dataset, token_level: bool, tokenizer, label_ids: list, args: AnalysisArguments, device
) -> list[dict]:
    """Tokenised task batches; token-level labels on first sub-words only (other pieces and specials −100)."""
    batches = []
    for start in range(0, len(dataset), args.gradient_batch_size):
        rows = dataset[start : start + args.gradient_batch_size]
        labels = label_ids[start : start + args.gradient_batch_size]
        if token_level:
            encoded = tokenizer(
                rows["_text"],
                is_split_into_words=True,
                truncation=True,
                max_length=args.max_length,
                padding=True,
                return_tensors="pt",
            )
            aligned = []
            for row, tags in enumerate(labels):
                previous, row_labels = None, []
                for word in encoded.word_ids(row):
                    row_labels.append(-100 if word is None or word == previous else tags[word])
                    previous = word
                aligned.append(row_labels)
            encoded["labels"] = torch.tensor(aligned)
        else:
            encoded = tokenizer(
                rows["_text"], truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"
            )
            encoded["labels"] = torch.tensor(labels)
        batches.append({k: v.to(device) for k, v in encoded.items()})
    return batches


def gradient_cosines(
    model_path: str,
    task_model: str | None,
    sets: list[ParallelSet],
    args: AnalysisArguments,
    layers: list[int],
    device,
) -> dict[str, Any]:
    """Cosine between the task-loss gradient and each pair's alignment-loss gradient, per layer group.

    Both gradients are taken at the same parameters (the encoder of `task_model`, or of `model_path` under a fresh
    seeded head), with dropout off, summed over --gradient_batches batches. The alignment loss is run_realign.py's:
    mean-pooled last layer, symmetric in-batch InfoNCE at --temperature.
    """
    dataset, token_level = load_task_examples(args)
    source = task_model or model_path
    config = AutoConfig.from_pretrained(source, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)
    label_ids, num_labels = task_label_ids(dataset["_label"], config if task_model else None)
    auto_class = AutoModelForTokenClassification if token_level else AutoModelForSequenceClassification
    torch.manual_seed(args.seed)  # the fresh head, when there is one, is the same for every run
    kwargs = {} if task_model else {"num_labels": num_labels}
    model = (
        auto_class.from_pretrained(
            source, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code, **kwargs
        )
        .to(device)
        .eval()
    )
    tokenizer = AutoTokenizer.from_pretrained(
        source, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code
    )
    encoder = model.base_model
    names = [n for n, p in encoder.named_parameters() if p.requires_grad]
    groups = layer_groups(names, layers)
    parameters = [dict(encoder.named_parameters())[n] for n in groups["all"]]

    def gradient(losses) -> dict[str, torch.Tensor]:
        total = [torch.zeros_like(p) for p in parameters]
        for loss in losses:
            for acc, g in zip(total, torch.autograd.grad(loss, parameters, allow_unused=True)):
                if g is not None:
                    acc += g
        return dict(zip(groups["all"], total))

    task_gradient = gradient(
        model(**batch).loss for batch in task_batches(dataset, token_level, tokenizer, label_ids, args, device)
    )
    special_ids = pooling_special_ids(tokenizer).to(device)

    def alignment_losses(parallel: ParallelSet):
        count = min(len(parallel.a), args.gradient_batches * args.gradient_batch_size)
        for start in range(0, count, args.gradient_batch_size):
            stop = min(count, start + args.gradient_batch_size)
            if stop - start < 2:
                continue
            texts = parallel.a[start:stop] + parallel.b[start:stop]
            batch = tokenizer(
                texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"
            ).to(device)
            hidden = encoder(**batch).last_hidden_state  # (2N, L, d)
            pooled = masked_mean_pool(
                hidden, content_token_mask(batch["input_ids"], batch["attention_mask"], special_ids)
            )
            yield contrastive_alignment_loss(*pooled.chunk(2), args.temperature)[0]  # realignment's own loss

    result: dict[str, Any] = {
        "grad_cosine": {},
        "grad_norm_alignment": {},
        "task": "token" if token_level else "sequence",
    }
    result["grad_norm_task"] = {
        g: math.sqrt(sum(task_gradient[n].double().pow(2).sum().item() for n in ns)) for g, ns in groups.items()
    }
    for parallel in sets:
        align_gradient = gradient(alignment_losses(parallel))
        result["grad_cosine"][parallel.name] = group_cosines(task_gradient, align_gradient, groups)
        result["grad_norm_alignment"][parallel.name] = {
            g: math.sqrt(sum(align_gradient[n].double().pow(2).sum().item() for n in ns)) for g, ns in groups.items()
        }
    result["groups"] = list(groups)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------------------------------------------------


def resolve_layers(requested: list[int], num_layers: int, model_path: str) -> list[int]:
    layers = []
    for layer in requested:
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"--layers {layer}: {model_path} has {num_layers} layers (hidden_states indices 0 … {num_layers}, or "
                f"negative from the end)."
            )
        layers.append(layer % (num_layers + 1))
    return list(dict.fromkeys(layers))


def analyse_model(model_path: str, task_model: str | None, sets, dictionaries, args, device) -> dict[str, Any]:
    """Every metric of one model: {"layers": {pair: {layer: {metric: value}}}, "gradients": ..., "seconds": ...}."""
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code
    )
    model = (
        AutoModel.from_pretrained(model_path, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)
        .to(device)
        .eval()
    )
    layers = resolve_layers(args.layer_list, model.config.num_hidden_layers, model_path)
    embedder = Embedder(model, tokenizer, layers, args, device)
    per_pair: dict[str, dict[int, dict[str, float]]] = {}
    for parallel in sets:
        a, b = embedder(parallel.a), embedder(parallel.b)
        per_pair[parallel.name] = {layer: pair_metrics(a[layer], b[layer]) for layer in layers}
    for name, entries in dictionaries.items():
        for layer, values in dictionary_metrics(embedder, entries).items():
            per_pair.setdefault(name, {}).setdefault(layer, {}).update(values)
    timings = {"representations": time.perf_counter() - start}
    del model, embedder
    gradients = None
    if args.task_data is not None:
        start = time.perf_counter()
        gradients = gradient_cosines(model_path, task_model, sets, args, layers, device)
        timings["gradients"] = time.perf_counter() - start
    return {"model": model_path, "layers": layers, "metrics": per_pair, "gradients": gradients, "seconds": timings}


def difference(new: dict, old: dict) -> dict:
    """new − old for every number both nested dicts hold."""
    out = {}
    for key, value in new.items():
        if key not in old:
            continue
        if isinstance(value, dict) and isinstance(old[key], dict):
            out[key] = difference(value, old[key])
        elif isinstance(value, (int, float)) and isinstance(old[key], (int, float)):
            out[key] = value - old[key]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown_report(report: dict[str, Any]) -> str:
    """Tables per metric: language pairs as rows, layers as columns; retrieval cells read 'raw (centered)'."""
    lines = [f"# Alignment diagnostics: `{report['model']['model']}`", ""]
    if report.get("compare_to"):
        lines += [f"Compared with `{report['compare_to']['model']}` (Δ = this model − that one).", ""]
    lines += [
        f"Parallel data: {report['parallel_data']}; pooling: mean over text tokens of hidden_states[layer]. "
        "Recall cells read `raw (mean-centered)`: centering subtracts each language's mean embedding and needs no "
        "training, so only a gain beyond it is credited to realignment.",
        "",
    ]
    views = [("model", report["model"]["metrics"])]
    if report.get("delta"):
        views += [("compare_to", report["compare_to"]["metrics"]), ("delta", report["delta"]["metrics"])]
    layers = report["model"]["layers"]
    for metric in [m for m in LAYER_METRICS if not m.endswith("_centered")]:
        present = any(metric in values for pairs in report["model"]["metrics"].values() for values in pairs.values())
        if not present:
            continue
        for view, table in views:
            title = {"model": "", "compare_to": " — compare_to", "delta": " — Δ"}[view]
            lines += [
                f"## {metric}{title}",
                "",
                "| pair | " + " | ".join(f"layer {layer}" for layer in layers) + " |",
                "|---|" + "---|" * len(layers),
            ]
            for pair, per_layer in table.items():
                cells = []
                for layer in layers:
                    values = per_layer.get(layer, per_layer.get(str(layer), {}))
                    cell = _fmt(values.get(metric))
                    if metric.startswith("recall@"):
                        cell += f" ({_fmt(values.get(metric + '_centered'))})"
                    cells.append(cell)
                if any(c not in ("–", "– (–)") for c in cells):
                    lines.append(f"| {pair} | " + " | ".join(cells) + " |")
            lines.append("")
    gradients = report["model"].get("gradients")
    if gradients:
        grad_views = [("model", gradients)]
        if report.get("delta") and report["delta"].get("gradients"):
            grad_views += [("compare_to", report["compare_to"]["gradients"]), ("delta", report["delta"]["gradients"])]
        for view, grads in grad_views:
            title = {"model": "", "compare_to": " — compare_to", "delta": " — Δ"}[view]
            groups = gradients["groups"]
            lines += [
                f"## grad_cosine (task: {gradients['task']}-level){title}",
                "",
                "| pair | " + " | ".join(groups) + " |",
                "|---|" + "---|" * len(groups),
            ]
            for pair, values in grads["grad_cosine"].items():
                lines.append(f"| {pair} | " + " | ".join(_fmt(values.get(g)) for g in groups) + " |")
            lines.append("")
    lines += [f"Run time: {report['seconds']:.1f} s.", ""]
    return "\n".join(lines)


def plot_reports(report: dict[str, Any], output_dir: Path) -> list[Path]:
    """One PNG per metric: a heat map per model (and Δ), language pairs on rows, layers (or layer groups) on x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    layers = report["model"]["layers"]
    panels = [("model", report["model"]["metrics"])]
    if report.get("delta"):
        panels += [("compare_to", report["compare_to"]["metrics"]), ("Δ", report["delta"]["metrics"])]
    tables = {}
    for metric in LAYER_METRICS:
        pairs = [
            p
            for p, per_layer in report["model"]["metrics"].items()
            if any(metric in per_layer.get(layer, {}) for layer in layers)
        ]
        if pairs:
            tables[metric] = (
                pairs,
                [str(layer) for layer in layers],
                [
                    (name, [[m.get(p, {}).get(layer, {}).get(metric, np.nan) for layer in layers] for p in pairs])
                    for name, m in panels
                ],
            )
    gradients = report["model"].get("gradients")
    if gradients:
        pairs, groups = list(gradients["grad_cosine"]), gradients["groups"]
        grad_panels = [("model", gradients)]
        if report.get("delta") and report["delta"].get("gradients"):
            grad_panels += [("compare_to", report["compare_to"]["gradients"]), ("Δ", report["delta"]["gradients"])]
        tables["grad_cosine"] = (
            pairs,
            groups,
            [
                (name, [[g["grad_cosine"].get(p, {}).get(group, np.nan) for group in groups] for p in pairs])
                for name, g in grad_panels
            ],
        )
    for metric, (rows, columns, values) in tables.items():
        fig, axes = plt.subplots(
            1, len(values), figsize=(1.2 + 1.3 * len(columns) * len(values), 0.9 + 0.4 * len(rows)), squeeze=False
        )
        # The two models share one colour scale; Δ and gradient cosines get a signed scale centred on 0.
        absolute = np.array([g for name, g in values if name != "Δ"], dtype=float)
        finite = absolute[np.isfinite(absolute)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        for ax, (name, grid) in zip(axes[0], values):
            data = np.array(grid, dtype=float)
            if name == "Δ" or metric == "grad_cosine":
                bound = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
                bound = bound if bound > 0 else 1.0
                image = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound)
            else:
                image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=low, vmax=high)
            ax.set_xticks(range(len(columns)), columns, rotation=30 if metric == "grad_cosine" else 0)
            ax.set_yticks(range(len(rows)), rows)
            ax.set_xlabel("layer group" if metric == "grad_cosine" else "layer")
            ax.set_title(name)
            for (i, j), value in np.ndenumerate(data):
                if not np.isnan(value):
                    ax.text(
                        j,
                        i,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "alpha": 0.6, "linewidth": 0},
                    )
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.suptitle(metric)
        fig.tight_layout()
        path = output_dir / (re.sub(r"[^A-Za-z0-9_.-]", "_", metric.replace("@", "_at_")) + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = parse_args((AnalysisArguments,), None, argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        level=logging.INFO,
        handlers=[logging.StreamHandler(sys.stdout)],
        force=True,
    )
    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    registry = lang_registry.load_registry()
    pairs = resolve_pairs(args, registry)
    sets = load_parallel_sets(args, pairs, registry)
    dictionaries = read_dictionaries(args, registry)
    report: dict[str, Any] = {
        "parallel_data": args.parallel_data if args.parallel_data in HUB_SOURCES else str(Path(args.parallel_data)),
        "pairs": {s.name: {"sentences": len(s.a), "origin": s.origin} for s in sets},
        "dictionaries": {name: len(entries) for name, entries in dictionaries.items()},
        "settings": {k: v for k, v in vars(args).items() if k != "layer_list"},
        "model": analyse_model(args.model_name_or_path, args.task_model, sets, dictionaries, args, device),
    }
    if args.compare_to is not None:
        report["compare_to"] = analyse_model(
            args.compare_to, args.compare_task_model, sets, dictionaries, args, device
        )
        if report["compare_to"]["layers"] != report["model"]["layers"]:
            raise ValueError("--compare_to resolves --layers to other indices; compare models of the same depth.")
        report["delta"] = {
            "metrics": difference(report["model"]["metrics"], report["compare_to"]["metrics"]),
            "gradients": difference(report["model"]["gradients"] or {}, report["compare_to"]["gradients"] or {}),
        }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pngs = plot_reports(report, output_dir)
    report["seconds"] = time.perf_counter() - start
    write_json_atomic(output_dir / REPORT_JSON, report)
    (output_dir / REPORT_MD).write_text(markdown_report(report), encoding="utf-8")
    logger.info(
        "Wrote %s, %s and %d PNG(s) to %s in %.1f s", REPORT_JSON, REPORT_MD, len(pngs), output_dir, report["seconds"]
    )
    return report


if __name__ == "__main__":
    main()
