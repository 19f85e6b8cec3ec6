#!/usr/bin/env python
"""Realign a multilingual encoder: pull the sentence-averaged representations of translation pairs together.

The realignment phase of "Rethinking what Matters: Effective and Robust Multilingual Realignment for Low-Resource
Languages": English ↔ L translation pairs, languages mixed within a batch, a symmetric in-batch contrastive loss over
masked-mean pooled sentences. The output is a plain encoder checkpoint that any `AutoModelFor*.from_pretrained` loads.

    accelerate launch run_realign.py --subset subsets/uriel_20.yaml   # XLM-R base → out/realign/xlm-roberta-base/...
    accelerate launch run_realign.py --subset subsets/uriel_20.yaml --model_name_or_path bert-base-multilingual-cased \
        --output_dir out/mbert-uriel20 --gather_negatives
    python run_realign.py --subset uriel_20 --parallel_data_dir data/parallel --reference_compat   # offline files
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml run_realign.py --subset uriel_20

The file follows the method in reading order: arguments, languages → parallel data → tokenisation, sampling and
collation, the encoder, `RealignTrainer` (pooling, the loss, held-out retrieval, saving), `main`. The pure loss
functions live in `realign_losses.py`; the companion paper's extensions (`--alignment word`, `--loss_weights
align=…,bow=…,mlm=…`) in `realign_extensions.py`, which hooks into the places marked "(extensions)".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import unicodedata
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
import transformers
from torch import nn
from transformers import AutoModel, AutoTokenizer, Trainer, TrainingArguments, set_seed
from transformers.trainer_pt_utils import get_length_grouped_indices

import lang_registry
from realign_extensions import DEPRECATED_FLAGS, MLM_HEAD_PREFIX, ExtensionArguments, RealignExtensions
from realign_losses import SAME_MEANING_TREATMENTS, contrastive_alignment_loss, layer_hidden_states
from realign_utils import (
    TRAINING_SETTING_KEYS,
    asdict_public,
    check_settings,
    code_version,
    content_token_mask,
    detect_checkpoint,
    find_local_parallel_file,
    masked_mean_pool,
    pad_sequences,
    parse_args,
    pooling_special_ids,
    push_model_folder,
    read_local_parallel,
    retrieval_precision_at_1,
    save_metrics,
    setup_logging,
    train_unless_finished,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

# The paper's realignment settings (A.6): 24,544 steps = 2 XNLI epochs at batch 32, 16 pairs, lr 2e-5. The reference
# code trains with Adam at a constant rate and no warm-up; AdamW without weight decay is Adam.
PAPER_TRAINING_DEFAULTS = {
    "max_steps": 24_544,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 2e-5,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "do_train": True,
    "save_steps": 2000,
    "save_total_limit": 2,
    "logging_steps": 50,
    "report_to": "none",
}
SETTINGS_FILE = "realign_settings.json"
CONFIG_FILE = "realign_config.json"
PROJECTION_PREFIX = "realign_projection."
HEAD_PREFIXES = (PROJECTION_PREFIX, MLM_HEAD_PREFIX)  # trained with the encoder, never saved with it
# --same_meaning without --reference_compat: 'positive' and 'ignore' measured equal in the quickstart, both above
# 'negative' (docs/quickstart.md); 'positive' also learns from the extra translations.
DEFAULT_SAME_MEANING = "positive"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="xlm-roberta-base",
        metadata={
            "help": "The encoder to realign: a Hub model id or a local checkpoint folder (default: the paper's XLM-R "
            "base; bert-base-multilingual-cased is its mBERT)."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "The tokenizer to use, if it differs from --model_name_or_path."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store models, datasets and tokenised caches downloaded or built."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "The model version to use: a branch name, tag name or commit id."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Whether to run code from the model's Hub repository. Only enable it for repositories you trust."
        },
    )
    freeze_word_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Whether to keep the word-embedding matrix fixed. It saves memory and time (XLM-R's matrix has "
            "250k rows) and keeps the vocabulary of unseen languages where pre-training left it."
        },
    )


@dataclass
class DataArguments:
    subset: str | None = field(
        default=None,
        metadata={
            "help": "The languages to realign with: a subset YAML (subsets/uriel_20.yaml) or its bare name "
            "(uriel_20). Random subsets are drawn with --seed, as in the paper."
        },
    )
    languages: str | None = field(
        default=None,
        metadata={"help": "A comma-separated list of language codes, instead of --subset (e.g. yor,swa,fra)."},
    )
    parallel_data_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder of local parallel files to read instead of the Hub, one per language: {code}.tsv "
            "(English<TAB>translation per line, or columns named by a header line such as id<TAB>en<TAB>yor), "
            "{code}.jsonl or {code}.parquet (a 'translation' dict with an 'en' or 'eng' key and one other, and "
            "optionally an 'id'), en-{code}.en plus en-{code}.{code} (one sentence per line, aligned by line), or "
            "OPUS-100's own layout as a snapshot of the Hub dataset leaves it (en-yo/train-*.parquet; its "
            "validation split is then held out). The code may be the registry code, an alias or the ISO 639-1 code. "
            "An 'id' says which pairs translate the same sentence (see --same_meaning); without one, pairs with the "
            "same English text do."
        },
    )
    eval_parallel_data_dir: str | None = field(
        default=None,
        metadata={"help": "A folder of held-out parallel files (same formats) for evaluation: loss and retrieval."},
    )
    validation_pairs_per_language: int = field(
        default=0,
        metadata={
            "help": "How many pairs per language to hold out of the training data for evaluation, when no "
            "--eval_parallel_data_dir is given (0: none)."
        },
    )
    max_seq_length: int = field(
        default=96,
        metadata={"help": "The maximum number of tokens per sentence, special tokens included (paper: 96)."},
    )
    overlong: str = field(
        default="drop",
        metadata={
            "help": "What to do with a pair whose either side is longer than --max_seq_length: 'drop' it (the pair "
            "would no longer be a translation once cut) or 'truncate' it."
        },
    )
    language_sampling: str = field(
        default="uniform",
        metadata={
            "help": "How to pick the language of each training pair: 'uniform' over languages whatever their corpus "
            "size (the paper), 'proportional' to corpus size, or 'temperature' (size ** (1 / "
            "--sampling_temperature)). --train_sampling_strategy group_by_length then batches the drawn pairs by "
            "length (less padding)."
        },
    )
    sampling_temperature: float = field(
        default=5.0, metadata={"help": "The temperature of --language_sampling temperature (1 = proportional)."}
    )
    max_pairs_per_language: int | None = field(
        default=None,
        metadata={
            "help": "Keep at most this many pairs per language, drawn at random from the whole corpus with --seed "
            "(not the head of the file)."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "For debugging: keep at most this many training pairs in all, spread evenly over languages."
        },
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "For debugging: keep at most this many held-out pairs per language."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "The number of processes used to tokenise."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Whether to tokenise again instead of reusing the cache."}
    )

    def __post_init__(self):
        if self.subset is None and self.languages is None:
            raise ValueError(
                "Give the languages to realign with: --subset subsets/uriel_20.yaml or --languages yor,swa."
            )
        if self.subset is not None and self.languages is not None:
            raise ValueError("Give either --subset or --languages, not both.")
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"--overlong must be 'drop' or 'truncate', got {self.overlong!r}.")
        if self.language_sampling not in ("uniform", "proportional", "temperature"):
            raise ValueError(
                f"--language_sampling must be uniform, proportional or temperature, got {self.language_sampling!r}."
            )
        if self.sampling_temperature <= 0:
            raise ValueError("--sampling_temperature must be positive.")
        if self.max_seq_length < 3:
            raise ValueError("--max_seq_length must leave room for special tokens and text (at least 3).")
        for name in ("parallel_data_dir", "eval_parallel_data_dir"):
            path = getattr(self, name)
            if path is not None and not os.path.isdir(path):
                raise ValueError(f"--{name} {path} is not a folder.")
        if not math.isfinite(self.sampling_temperature):
            raise ValueError(
                f"--sampling_temperature must be a finite positive number, got {self.sampling_temperature}."
            )
        for name in ("max_pairs_per_language", "max_train_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(
                    f"--{name} must be at least 1 (leave it out to keep every pair), got {getattr(self, name)}."
                )
        for name in ("max_eval_samples", "validation_pairs_per_language"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name} cannot be negative, got {getattr(self, name)}.")


@dataclass
class RealignArguments:
    temperature: float = field(
        default=0.1,
        metadata={"help": "The softmax temperature T of the contrastive loss (scale = 1 / T; paper: 0.1)."},
    )
    reference_compat: bool = field(
        default=False,
        metadata={
            "help": "Reproduce the reference code's behaviour instead of the paper's intent: prefix pooling, "
            "penultimate layer, a projection head, XLM-R's stand-alone '▁' tokens removed, and other translations of "
            "a batch's English sentences used as negatives (--same_meaning negative). Each of the five can also be "
            "set on its own with the flags below, which take precedence."
        },
    )
    pooling: str | None = field(
        default=None,
        metadata={
            "help": "'mean': average over the sentence's non-special tokens (paper, default); 'reference_prefix': "
            "average over the first L positions, [CLS]/<s> included, with L the number of words (reference code)."
        },
    )
    realign_layer: int | None = field(
        default=None,
        metadata={
            "help": "The hidden_states index to align (0 = embeddings, -1 = last layer, the default; -2 = the "
            "penultimate, which is the reference code's hidden_states[11] for 12-layer models)."
        },
    )
    projection_head: bool | None = field(
        default=None,
        metadata={
            "help": "Whether to train a Linear(d, d) → ReLU → Linear(d, 128) head on the pooled vectors and align its "
            "output (reference code). The head is discarded when the encoder is saved."
        },
    )
    strip_sentencepiece_space: bool | None = field(
        default=None,
        metadata={
            "help": "Whether to drop stand-alone '▁' tokens produced by SentencePiece tokenizers (reference code)."
        },
    )
    same_meaning: str | None = field(
        default=None,
        metadata={
            "help": "What the contrastive loss does with another translation of the same English sentence in the "
            "batch (multi-way parallel data such as UDHR, FLORES or the Bible; pairs share a meaning when their "
            "normalised English text, or the 'id' column of a local file, is the same): 'positive' (default: it "
            "counts as a positive, as in supervised contrastive learning), 'ignore' (left out of the loss) or "
            "'negative' (pushed away like any other sentence: the paper's printed loss and the reference code, set by "
            "--reference_compat). In the quickstart's comparison (docs/quickstart.md, 2 seeds) 'positive' and "
            "'ignore' gave the same held-out retrieval (within 0.006 P@1), both above 'negative' (+0.024 at article "
            "and +0.029 at paragraph level on the trained languages); 'positive' is the default because it learns "
            "from the extra translations instead of discarding them. On data without repeated sentences the three "
            "are the same loss."
        },
    )
    gather_negatives: bool = field(
        default=False,
        metadata={
            "help": "Under multi-process training, gather the pooled vectors of every process (with gradients) so "
            "each pair has per_device_train_batch_size × world_size − 1 other pairs as negatives instead of "
            "per_device_train_batch_size − 1."
        },
    )
    length_buckets: int = field(
        default=1,
        metadata={
            "help": "Encode each batch's sentences in this many forward passes over rows of similar length, each "
            "padded to its own longest row, instead of one pass padded to the batch's longest sentence. The batches, "
            "pooled vectors and loss stay the same (up to float rounding); the computation spent on padding shrinks, "
            "which saves time where compute grows with padded tokens, as on CPUs (the quickstart uses 4; README, "
            "Performance). Each bucket costs one host sync. Single-process runs only; sentence alignment only."
        },
    )

    def __post_init__(self):
        reference = {"pooling": "reference_prefix", "realign_layer": -2, "projection_head": True}
        paper = {"pooling": "mean", "realign_layer": -1, "projection_head": False}
        for name, value in (reference if self.reference_compat else paper).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.strip_sentencepiece_space is None:
            self.strip_sentencepiece_space = self.reference_compat
        if self.same_meaning is None:
            self.same_meaning = "negative" if self.reference_compat else DEFAULT_SAME_MEANING
        if self.same_meaning not in SAME_MEANING_TREATMENTS:
            raise ValueError(
                f"--same_meaning must be one of {', '.join(SAME_MEANING_TREATMENTS)}, got {self.same_meaning!r}."
            )
        if self.pooling not in ("mean", "reference_prefix"):
            raise ValueError(f"--pooling must be 'mean' or 'reference_prefix', got {self.pooling!r}.")
        if self.temperature <= 0:
            raise ValueError("--temperature must be positive (the paper uses 0.1).")
        if self.length_buckets < 1:
            raise ValueError("--length_buckets must be at least 1 (1: one forward pass per batch).")
        if not math.isfinite(self.temperature):  # NaN passes `temperature <= 0` and makes every logit NaN
            raise ValueError(f"--temperature must be a finite positive number (paper: 0.1), got {self.temperature}.")


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def resolve_languages(data_args: DataArguments, seed: int) -> tuple[list[str], dict[str, Any]]:
    """The canonical codes to realign with, and a description of where they came from."""
    registry = lang_registry.load_registry()
    if data_args.subset is not None:
        subset = lang_registry.load_subset(data_args.subset, registry=registry, seed=seed)
        codes, info = subset.languages, {"name": subset.name, "path": str(subset.path), "strategy": subset.strategy}
    else:
        codes = lang_registry.parse_language_list(data_args.languages, registry=registry, seed=seed)
        info = {"name": "custom", "path": None, "strategy": "list"}
    codes = [c for c in codes if c != registry.english.code]
    if not codes:
        raise ValueError("No language other than English to realign with.")
    logger.info("Realigning with %d languages: %s", len(codes), ", ".join(codes))
    return codes, info


# You can read another parallel corpus here: return datasets with an English `src` and a translated `tgt` column
# (and an `id` when translations of one sentence should share a meaning); everything downstream stays the same.
def load_hub_parallel(language: lang_registry.Language, cache_dir: str | None) -> dict[str, datasets.Dataset]:
    """Load a language's pairs from the Hub: OPUS-100 where it has the pair, NLLB otherwise (per the registry)."""
    source = language.parallel
    if source is None:
        raise ValueError(f"The registry gives no parallel data for {language.code} ({language.name}).")
    if source["source"] == "opus100":
        raw = datasets.load_dataset("Helsinki-NLP/opus-100", source["config"], cache_dir=cache_dir)
        xx = next(code for code in source["config"].split("-") if code != "en")

        def to_columns(batch):
            return {"src": [t["en"] for t in batch["translation"]], "tgt": [t[xx] for t in batch["translation"]]}

        return {
            split: ds.map(to_columns, batched=True, remove_columns=ds.column_names, desc=f"Reading {language.code}")
            for split, ds in raw.items()
        }
    # allenai/nllb is a loading-script repository, which datasets >= 4 no longer runs: read the raw gzipped TSV the
    # script points at (columns: source, target, LASER score, source LID, target LID, ...; sides in config order).
    first, second = source["config"].split("-")
    url = f"https://storage.googleapis.com/allennlp-data-bucket/nllb/{first}-{second}.gz"
    raw = datasets.load_dataset(
        "csv",
        data_files=url,
        delimiter="\t",
        header=None,
        quoting=3,
        usecols=[0, 1],
        names=[first, second],
        cache_dir=cache_dir,
        split="train",
    )
    english = first if first.startswith("eng_") else second
    other = second if english == first else first
    raw = raw.rename_columns({english: "src", other: "tgt"})
    return {"train": raw}


def load_parallel(language: lang_registry.Language, data_args: DataArguments, cache_dir: str | None) -> dict[str, Any]:
    """Train and held-out pairs of one language (datasets with `src` and `tgt` columns) and the local files read.

    Returns a dict with `train`, `eval` (or None), `train_files` and `eval_files` (lists, empty for Hub data).
    """
    eval_ds, train_files, eval_files = None, [], []
    if data_args.parallel_data_dir is not None:
        train_files = find_local_parallel_file(data_args.parallel_data_dir, language)
        train_ds = datasets.Dataset.from_dict(read_local_parallel(train_files))
        if train_files[0].parent != Path(data_args.parallel_data_dir):
            # OPUS-100's own layout (en-xx/train-*.parquet): its validation split is held out, as from the Hub.
            with contextlib.suppress(FileNotFoundError):
                eval_files = find_local_parallel_file(data_args.parallel_data_dir, language, split="validation")
                eval_ds = datasets.Dataset.from_dict(read_local_parallel(eval_files))
    else:
        splits = load_hub_parallel(language, cache_dir)
        train_ds = splits["train"]
        eval_ds = splits.get("validation")
    if data_args.eval_parallel_data_dir is not None:
        eval_files = find_local_parallel_file(data_args.eval_parallel_data_dir, language, split="validation")
        eval_ds = datasets.Dataset.from_dict(read_local_parallel(eval_files))
    elif data_args.validation_pairs_per_language > 0:
        if len(train_ds) <= data_args.validation_pairs_per_language:
            raise ValueError(
                f"{language.code} has {len(train_ds)} pairs, not enough to hold out "
                f"--validation_pairs_per_language {data_args.validation_pairs_per_language}."
            )
        split = train_ds.train_test_split(test_size=data_args.validation_pairs_per_language, seed=0)
        train_ds, eval_ds = split["train"], split["test"]
        # The split is drawn afresh from the same files: key its cache by them and the split's role.
        eval_files = train_files
    return {"train": train_ds, "eval": eval_ds, "train_files": train_files, "eval_files": eval_files}


def meaning_key(english: str, identifier: str | None = None) -> int:
    """A 64-bit key of what a pair means: its explicit `id` when the data gives one, else its English text (Unicode
    NFC, runs of whitespace collapsed, case kept), so that translations of one English sentence into several
    languages share a key. Explicit ids and English texts never collide with each other."""
    if identifier is not None:
        text = "id\0" + identifier
    else:
        text = "en\0" + unicodedata.normalize("NFC", " ".join(english.split()))
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def tokenize_pairs(
    dataset: datasets.Dataset,
    language: str,
    tokenizer,
    data_args: DataArguments,
    realign_args: RealignArguments,
    cache_dir: str | None,
    desc: str,
    source_files: list[Path] | None = None,
    extensions: RealignExtensions | None = None,
    alignment_digest: str | None = None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Filter and tokenise one language's pairs once (cached); returns the dataset and per-reason drop counts.

    Every pair gets a `meaning_key` (see `meaning_key`; from the `id` column when there is one). Pairs with a side
    that holds no token to pool (nothing but special tokens) are dropped: they would reach the loss as zero vectors.
    `extensions` adds the columns its loss terms need (`RealignExtensions.token_columns`); `alignment_digest`
    identifies the word alignments of `--alignment word`, so that cached tokenisations follow them.
    """
    n_raw = len(dataset)
    space_id = _standalone_space_id(tokenizer) if realign_args.strip_sentencepiece_space else None
    max_len = data_args.max_seq_length
    if extensions is not None:
        extensions.check_columns(dataset.column_names)
    not_pooled = set(pooling_special_ids(tokenizer).tolist()) | ({space_id} - {None})
    with_ids = "id" in dataset.column_names

    def is_usable(batch):
        return [
            bool(s.strip()) and bool(t.strip()) and s.strip() != t.strip() for s, t in zip(batch["src"], batch["tgt"])
        ]

    def tokenize(batch):
        ids_column = batch["id"] if with_ids else [None] * len(batch["src"])
        out = {"meaning_key": [meaning_key(text, key) for text, key in zip(batch["src"], ids_column)]}
        content = None
        for side in ("src", "tgt"):
            ids = tokenizer(batch[side], add_special_tokens=True, truncation=False)["input_ids"]
            if space_id is not None:
                ids = [[t for t in seq if t != space_id] for seq in ids]
            out[f"{side}_length"] = [len(seq) for seq in ids]
            counts = [sum(t not in not_pooled for t in seq) for seq in ids]
            content = counts if content is None else [min(a, b) for a, b in zip(content, counts)]
            if data_args.overlong == "truncate":
                ids = [seq if len(seq) <= max_len else seq[: max_len - 1] + seq[-1:] for seq in ids]
            out[f"{side}_input_ids"] = ids
            # The reference code's prefix pooling averages over as many positions as the sentence has words.
            out[f"{side}_n_words"] = [len(text.split()) for text in batch[side]]
        if extensions is not None:  # (extensions) the columns of their loss terms
            out.update(extensions.token_columns(batch, tokenizer, max_len, space_id))
        out["content_tokens"] = content
        return out

    extra_key = extensions.cache_key(alignment_digest) if extensions is not None else []
    cache_kwargs = _tokenized_cache_kwargs(
        source_files, language, tokenizer, data_args, realign_args, cache_dir, desc, extra_key
    )
    usable = dataset.filter(is_usable, batched=True, desc=f"Filtering {desc}", **cache_kwargs.get("filter", {}))
    n_unusable = n_raw - len(usable)
    if len(usable) == 0:
        return usable, {"raw": n_raw, "empty_or_identical": n_unusable, "no_text_tokens": 0, "overlong": 0, "kept": 0}
    tokenized = usable.map(
        tokenize,
        batched=True,
        num_proc=data_args.preprocessing_num_workers,
        remove_columns=usable.column_names,
        load_from_cache_file=not data_args.overwrite_cache,
        desc=f"Tokenizing {desc}",
        **cache_kwargs.get("map", {}),
    )
    before = len(tokenized)
    tokenized = tokenized.filter(
        lambda batch: [n > 0 for n in batch["content_tokens"]],
        batched=True,
        desc=f"Dropping {desc} without text tokens",
        **cache_kwargs.get("content", {}),
    )
    n_no_text = before - len(tokenized)
    n_overlong = 0
    if data_args.overlong == "drop":
        before = len(tokenized)
        tokenized = tokenized.filter(
            lambda batch: [max(a, b) <= max_len for a, b in zip(batch["src_length"], batch["tgt_length"])],
            batched=True,
            desc=f"Dropping over-long {desc}",
            **cache_kwargs.get("overlong", {}),
        )
        n_overlong = before - len(tokenized)
    tokenized = tokenized.remove_columns(["src_length", "tgt_length", "content_tokens"])
    counts = {
        "raw": n_raw,
        "empty_or_identical": n_unusable,
        "no_text_tokens": n_no_text,
        "overlong": n_overlong,
        "kept": len(tokenized),
    }
    logger.info(
        "%s: %d pairs kept of %d (dropped %d empty or identical, %d without text tokens, %d %s)",
        desc,
        counts["kept"],
        n_raw,
        n_unusable,
        n_no_text,
        n_overlong,
        f"longer than {max_len} tokens" if data_args.overlong == "drop" else "over-long (truncated, not dropped)",
    )
    return tokenized, counts


def _standalone_space_id(tokenizer, quiet: bool = False) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids("▁")
    if token_id is None or token_id == tokenizer.unk_token_id:
        if not quiet:
            logger.warning(
                "--strip_sentencepiece_space: the tokenizer has no stand-alone '▁' token; nothing to strip."
            )
        return None
    return token_id


# Bumped whenever tokenize_pairs' output columns change, so that caches of an older layout are not read back.
TOKENIZED_FORMAT = 2


def _tokenized_cache_kwargs(
    files, language, tokenizer, data_args, realign_args, cache_dir, desc, extra_key=None
) -> dict:
    """Cache files for in-memory datasets built from local files, keyed by the files' content and the settings.

    Datasets loaded from the Hub are already file-backed and cached by `datasets` itself. `extra_key` lists what the
    optional columns depend on (word alignments, concatenated pairs); it is empty on the default path.
    """
    if not files:
        return {}
    digest = hashlib.sha256()
    for path in files:
        digest.update(Path(path).read_bytes())
    key = json.dumps(
        [
            language,
            desc,
            tokenizer.name_or_path,
            len(tokenizer),
            data_args.max_seq_length,
            data_args.overlong,
            realign_args.strip_sentencepiece_space,
            data_args.validation_pairs_per_language,
            transformers.__version__,
            TOKENIZED_FORMAT,
            *(extra_key or []),
        ]
    )
    digest.update(key.encode())
    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "realign_tokenized" / digest.hexdigest()[:24]
    root.mkdir(parents=True, exist_ok=True)
    return {
        "filter": {"cache_file_name": str(root / "usable.arrow")},
        "map": {"cache_file_name": str(root / "tokenized.arrow")},
        "content": {"cache_file_name": str(root / "with_content.arrow")},
        "overlong": {"cache_file_name": str(root / "not_overlong.arrow")},
    }


def build_datasets(
    codes: list[str],
    tokenizer,
    data_args: DataArguments,
    realign_args: RealignArguments,
    extensions: RealignExtensions | None,
    cache_dir: str | None,
    seed: int,
    with_eval: bool,
) -> tuple[datasets.Dataset, datasets.Dataset | None, dict[str, dict[str, int]]]:
    """Tokenised training pairs of every language (with a `lang_id` column), held-out pairs, and per-language
    counts."""
    registry = lang_registry.load_registry()
    train_parts, eval_parts, stats = [], [], {}
    per_language_cap = data_args.max_pairs_per_language
    if data_args.max_train_samples is not None:
        even_share = max(1, data_args.max_train_samples // len(codes))
        per_language_cap = min(per_language_cap or even_share, even_share)
    for lang_id, code in enumerate(codes):
        language = registry.get(code)
        raw = load_parallel(language, data_args, cache_dir)
        if not with_eval:
            raw["eval"] = None
        # (extensions) --alignment word extracts its word links here, from the pairs that will be used.
        digest = extensions.prepare_language(raw, code, cache_dir, per_language_cap, seed) if extensions else None
        train_ds, counts = tokenize_pairs(
            raw["train"],
            code,
            tokenizer,
            data_args,
            realign_args,
            cache_dir,
            f"{code} train",
            raw["train_files"],
            extensions,
            digest,
        )
        if len(train_ds) == 0:
            raise ValueError(
                f"Every {code} training pair was filtered out ({counts}). Check the file, or use --overlong truncate "
                "or a larger --max_seq_length."
            )
        if per_language_cap is not None and len(train_ds) > per_language_cap:
            # A random sample of the whole corpus, not its head: corpora are often sorted by source or score.
            train_ds = train_ds.shuffle(seed=seed).select(range(per_language_cap))
            counts["capped"] = per_language_cap
        counts["used"] = len(train_ds)
        train_parts.append(train_ds.add_column("lang_id", [lang_id] * len(train_ds)))
        if raw["eval"] is not None and with_eval:
            eval_ds, _ = tokenize_pairs(
                raw["eval"],
                code,
                tokenizer,
                data_args,
                realign_args,
                cache_dir,
                f"{code} held-out",
                raw["eval_files"],
                extensions,
                digest,
            )
            if data_args.max_eval_samples is not None:
                eval_ds = eval_ds.select(range(min(len(eval_ds), data_args.max_eval_samples)))
            counts["held_out"] = len(eval_ds)
            if len(eval_ds):
                eval_parts.append(eval_ds.add_column("lang_id", [lang_id] * len(eval_ds)))
        stats[code] = counts
    train_dataset = datasets.concatenate_datasets(train_parts)
    eval_dataset = datasets.concatenate_datasets(eval_parts) if eval_parts else None
    return train_dataset, eval_dataset, stats


# You can change how languages are mixed within a batch here (RealignTrainer._get_train_sampler builds it).
class LanguageMixingSampler(torch.utils.data.Sampler):
    """Yield training indices whose language is drawn per pair (uniform by default), each corpus shuffled whole.

    Within a language, pairs come in the order of a fresh permutation of the whole corpus, reshuffled when used up,
    so small corpora are repeated and large ones are read beyond their head. The stream depends only on the seed
    and the epoch, which is what lets the Trainer resume mid-epoch by skipping batches.

    With `lengths` (--train_sampling_strategy group_by_length), the drawn stream is then reordered as transformers'
    `LengthGroupedSampler` orders a dataset: shuffled, cut into mega-batches of 50 batches, each sorted by length, so
    that a batch holds pairs of similar length and pads less. How often each language is drawn does not change, but a
    batch then tends to hold languages whose sentences tokenise to similar lengths, which changes its negatives.
    """

    def __init__(
        self,
        lang_ids: np.ndarray,
        probabilities: np.ndarray,
        num_samples: int,
        seed: int,
        lengths: np.ndarray | None = None,
        batch_size: int | None = None,
    ):
        self.num_samples = num_samples
        self.probabilities = probabilities
        self.seed = seed
        self.epoch = 0
        self.lengths = lengths
        self.batch_size = batch_size
        order = np.argsort(lang_ids, kind="stable")
        boundaries = np.searchsorted(lang_ids[order], np.arange(len(probabilities) + 1))
        self.indices_by_language = [order[boundaries[k] : boundaries[k + 1]] for k in range(len(probabilities))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        languages = rng.choice(len(self.probabilities), size=self.num_samples, p=self.probabilities)
        stream = np.empty(self.num_samples, dtype=np.int64)
        for k, indices in enumerate(self.indices_by_language):
            positions = np.flatnonzero(languages == k)
            if len(positions) == 0:
                continue
            repeats = math.ceil(len(positions) / len(indices))
            stream[positions] = np.concatenate([rng.permutation(indices) for _ in range(repeats)])[: len(positions)]
        if self.lengths is not None:
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            stream = stream[
                get_length_grouped_indices(self.lengths[stream].tolist(), self.batch_size, generator=generator)
            ]
        return iter(stream.tolist())


def pair_lengths(dataset: datasets.Dataset) -> np.ndarray:
    """Tokens of the longer side of each pair (what the pair pads its batch to), read from Arrow without decoding."""
    table = dataset.with_format("arrow")
    src = pc.list_value_length(table["src_input_ids"]).to_numpy()
    tgt = pc.list_value_length(table["tgt_input_ids"]).to_numpy()
    return np.maximum(src, tgt)


def language_probabilities(sizes: np.ndarray, strategy: str, temperature: float) -> np.ndarray:
    """Probability of drawing each language: uniform (the paper), proportional to size, or size ** (1 / T)."""
    if strategy == "uniform":
        weights = np.ones(len(sizes))
    elif strategy == "proportional":
        weights = sizes.astype(float)
    else:
        weights = sizes.astype(float) ** (1.0 / temperature)
    return weights / weights.sum()


@dataclass
class PairCollator:
    """Stack both sides of N pairs into one (2N, L) batch, English rows first, padded to the longest sentence; with
    each pair's `meaning_key` (N,) when the features have one.

    One forward pass over 2N rows is cheaper than two over N, and padding both sides to a common length costs little
    since translations have similar lengths. `extra_columns(features, batch, pad_token_id, pad_to_multiple_of)` adds
    the columns of other loss terms to the batch (`RealignExtensions.collate`).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    extra_columns: Callable[..., None] | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [f["src_input_ids"] for f in features] + [f["tgt_input_ids"] for f in features]
        input_ids, attention_mask = pad_sequences(sequences, self.pad_token_id, self.pad_to_multiple_of)  # (2N, L)
        n_words = [f["src_n_words"] for f in features] + [f["tgt_n_words"] for f in features]
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "n_words": torch.tensor(n_words, dtype=torch.long),
            "lang_id": torch.tensor([f["lang_id"] for f in features], dtype=torch.long),
        }
        if "meaning_key" in features[0]:
            batch["meaning_key"] = torch.tensor([f["meaning_key"] for f in features], dtype=torch.long)
        if self.extra_columns is not None:  # (extensions)
            self.extra_columns(features, batch, self.pad_token_id, self.pad_to_multiple_of)
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# Model and Trainer
# ---------------------------------------------------------------------------------------------------------------------


def load_tokenizer(model_args: ModelArguments):
    return AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )


def load_encoder(
    model_args: ModelArguments, realign_args: RealignArguments, extensions: RealignExtensions
) -> transformers.PreTrainedModel:
    """The encoder to realign, with the parameters that receive no gradient frozen and the optional heads attached."""
    load_kwargs = {
        "pretrained_model_name_or_path": model_args.model_name_or_path,
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "trust_remote_code": model_args.trust_remote_code,
    }
    model = AutoModel.from_pretrained(**load_kwargs)
    num_layers = model.config.num_hidden_layers
    if not -(num_layers + 1) <= realign_args.realign_layer <= num_layers:
        raise ValueError(
            f"--realign_layer {realign_args.realign_layer} is out of range: the model has {num_layers} layers "
            f"(hidden_states indices -{num_layers + 1} … {num_layers})."
        )
    # Parameters that never receive a gradient (pooler, layers above the aligned one) are frozen so that DDP does
    # not fail on unused parameters; their pre-trained values are saved unchanged for the downstream heads.
    frozen = [getattr(model, "pooler", None)]
    layer_index = realign_args.realign_layer % (num_layers + 1)
    encoder_layers = getattr(getattr(model, "encoder", None), "layer", None)
    if encoder_layers is not None and not extensions.needs_last_layer:
        frozen.extend(encoder_layers[layer_index:])
    if model_args.freeze_word_embeddings:
        frozen.append(model.get_input_embeddings())
    for module in frozen:
        if module is not None:
            module.requires_grad_(False)
    extensions.attach_heads(model, load_kwargs, model_args.freeze_word_embeddings)  # (extensions) the MLM head
    if realign_args.projection_head and extensions.weights["align"]:
        hidden = model.config.hidden_size
        # Registered on the model so checkpoints carry it for resuming; stripped from the final save.
        model.realign_projection = nn.Sequential(
            nn.Linear(hidden, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, 128, bias=False)
        )
    return model


class CachedLookups:
    """Lookups that the Trainer's loop would otherwise repeat at every step, each done once."""

    _unwrapped: tuple[Any, Any] = (None, None)
    _non_embedding_params: int | None = None

    def unwrapped(self, model):
        """`accelerator.unwrap_model(model)` once per wrapper: accelerate checks the installed packages each call."""
        if self._unwrapped[0] is not model:
            self._unwrapped = (model, self.accelerator.unwrap_model(model))
        return self._unwrapped[1]

    def special_ids_on(self, device: torch.device, pooling: bool = False) -> torch.Tensor:
        """The special token ids (with `pooling`, those pooling leaves out) on `device`: one copy, not one per step."""
        cache = vars(self).setdefault("_special_ids_by_device", {})
        if (device, pooling) not in cache:
            cache[device, pooling] = (self.pooling_ids if pooling else self.special_ids).to(device)
        return cache[device, pooling]

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's 6 × tokens × non-embedding parameters, with the count taken once, not by a walk per step."""
        if self._non_embedding_params is None:
            self._non_embedding_params = self.unwrapped(self.model).num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._non_embedding_params


class RealignTrainer(CachedLookups, Trainer):
    """A Trainer whose loss is `contrastive_alignment_loss` over pooled sentences of translation pairs.

    Batches come from `PairCollator`: `input_ids` (2N, L) with the English sides first, `n_words` (2N,), `lang_id`
    (N,), `meaning_key` (N,). Besides the loss, training logs the in-batch retrieval accuracy, the mean positive /
    negative cosines and the same-meaning candidates per query; `evaluate()` adds per-language retrieval
    precision@1 on held-out pairs.

    `loss_terms` ({name: (weight, term)}) holds the weighted terms of the loss, each a `(model, inputs) -> (loss,
    stats)` callable: the paper's sentence term as `align`, and whatever `main` adds from
    `RealignExtensions.loss_terms` (an `align` entry there replaces the sentence term: word-level alignment).
    Unless the loss is the alignment term alone, each term is logged as `train_loss_{name}`.
    """

    # compute_loss returns a per-batch mean, not a sum normalised by num_items_in_batch: the Trainer must divide it
    # by the gradient-accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        realign_args: RealignArguments,
        language_codes: list[str],
        sampling_probs: np.ndarray,
        align_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.realign_args = realign_args
        self.language_codes = language_codes
        self.sampling_probs = sampling_probs
        self.special_ids = torch.tensor(sorted(set(self.processing_class.all_special_ids)), dtype=torch.long)
        self.pooling_ids = pooling_special_ids(self.processing_class)
        # The loss: {name: (weight, term)}, the paper's sentence alignment first.
        self.loss_terms: dict[str, tuple[float, Callable]] = {}
        if align_weight:
            self.loss_terms["align"] = (align_weight, self.sentence_alignment_loss)
        # Statistics stay detached tensors until logging: an .item() per step would make the GPU wait every step.
        self._train_stats: dict[str, list[torch.Tensor]] = defaultdict(list)

    # -- representations --------------------------------------------------------------------------------------------

    def pool(
        self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_words: torch.Tensor
    ) -> torch.Tensor:
        """Sentence vectors (B, d) from the configured layer and pooling.

        With --length_buckets K the rows are sorted by length and encoded in K passes, each padded to its own longest
        row: each row's vector is the same (padding is masked out of attention), but far fewer padding positions are
        computed when lengths vary.
        """
        buckets = self.realign_args.length_buckets
        if buckets > 1 and len(input_ids) > 1:
            order = torch.argsort(attention_mask.sum(dim=1), stable=True)  # (B,), shortest first
            pooled = [
                self.pool_rows(model, input_ids[rows], attention_mask[rows], n_words[rows], trim=True)
                for rows in order.tensor_split(min(buckets, len(order)))
            ]
            return torch.cat(pooled)[torch.argsort(order)]  # (B, d), back in batch order
        return self.pool_rows(model, input_ids, attention_mask, n_words)

    def pool_rows(self, model, input_ids, attention_mask, n_words, trim: bool = False) -> torch.Tensor:
        """`pool` over one forward pass; `trim` first cuts the padding columns no row of these needs (one host
        sync)."""
        if trim:
            width = int(attention_mask.sum(dim=1).max())
            input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]  # right-padded rows
        hidden = layer_hidden_states(model, self.realign_args.realign_layer, input_ids, attention_mask)  # (B, L, d)
        # You can change the pooling here (e.g. [CLS] only, or max pooling); evaluation uses the same function.
        if self.realign_args.pooling == "mean":
            mask = content_token_mask(input_ids, attention_mask, self.special_ids_on(input_ids.device, pooling=True))
        else:
            # Reference code: the first n_words positions, [CLS]/<s> included, whatever tokens they hold.
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]  # (1, L)
            mask = (positions < n_words[:, None]) & attention_mask.bool()
        return masked_mean_pool(hidden, mask)

    # -- the loss ---------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Σ weight × term over `self.loss_terms`: the paper's sentence alignment alone by default."""
        total = None
        for name, (weight, term) in self.loss_terms.items():
            loss, stats = term(model, inputs)
            if model.training:
                for stat, value in stats.items():
                    self._train_stats[stat].append(value)
                if list(self.loss_terms) != ["align"]:  # a combination: log each term beside the total
                    self._train_stats[f"loss_{name}"].append(loss.detach())
            weighted = loss if weight == 1 else weight * loss
            total = weighted if total is None else total + weighted
        return (total, {}) if return_outputs else total

    def sentence_alignment_loss(self, model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The paper's loss: `contrastive_alignment_loss` over the pooled sentences of the batch."""
        pooled = self.pool(model, inputs["input_ids"], inputs["attention_mask"], inputs["n_words"])  # (2N, d)
        projection = getattr(self.unwrapped(model), "realign_projection", None)
        if projection is not None:
            pooled = projection(pooled)  # (2N, 128)
        src, tgt = pooled.chunk(2)  # (N, d) each
        keys = inputs.get("meaning_key")  # (N,)
        gathered = {}
        if self.realign_args.gather_negatives and self.args.world_size > 1:
            # all_gather from torch.distributed.nn keeps the graph: other processes' vectors get gradients too.
            from torch.distributed.nn.functional import all_gather

            gathered = {
                "all_src_embeddings": torch.cat(all_gather(src.contiguous())),
                "all_tgt_embeddings": torch.cat(all_gather(tgt.contiguous())),
                "rank": self.args.process_index,
            }
            if keys is not None:
                all_keys = [torch.empty_like(keys) for _ in range(self.args.world_size)]
                torch.distributed.all_gather(all_keys, keys.contiguous())  # keys need no gradient
                gathered["all_meaning_keys"] = torch.cat(all_keys)
        # You can change the loss here: any function of (src, tgt) → (scalar, stats) trains with the same Trainer.
        loss, stats = contrastive_alignment_loss(
            src,
            tgt,
            self.realign_args.temperature,
            meaning_keys=keys,
            same_meaning=self.realign_args.same_meaning,
            **gathered,
        )
        pairs = len(gathered["all_src_embeddings"]) if gathered else len(src)
        stats["negatives_per_query"] = torch.tensor(float(2 * pairs - 2))
        return loss, stats

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The Trainer would log a non-finite loss as the mean of the previous ones (--logging_nan_inf_filter), step
        # the optimizer with NaN gradients and save the result as if nothing happened. Stopping here, before that
        # step, keeps every checkpoint saved so far clean and writes no final model. The Trainer's filter already
        # reads this value every step, so checking it adds no wait for the GPU.
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"The realignment loss is {loss.item()} at step {self.state.global_step + 1}: training stopped, and "
                "no model was saved from this step on (earlier checkpoints are kept). Check --temperature, "
                "--learning_rate and the data; under --fp16, try --bf16."
            )
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._train_stats:
            for name, values in self._train_stats.items():
                logs[f"train_{name}"] = round(torch.stack(values).float().mean().item(), 4)
            self._train_stats.clear()
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lang_ids = np.asarray(dataset["lang_id"])
        if self.args.max_steps > 0:
            # One "epoch" covers the whole run, so the language stream is never cut and restarted.
            num_samples = (
                self.args.max_steps
                * self.args.per_device_train_batch_size
                * self.args.gradient_accumulation_steps
                * self.args.world_size
            )
        else:
            num_samples = len(dataset)
        grouped = {}
        if self.args.train_sampling_strategy == "group_by_length":
            grouped = {
                "lengths": pair_lengths(dataset),
                "batch_size": self.args.train_batch_size
                * self.args.gradient_accumulation_steps,  # as transformers does
            }
        return LanguageMixingSampler(lang_ids, self.sampling_probs, num_samples, self.args.seed, **grouped)

    # -- evaluation and saving --------------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        retrieval = self.retrieval_metrics(dataset, metric_key_prefix)
        metrics.update(retrieval)
        self.log(retrieval)
        return metrics

    # You can change realignment's evaluation here: it runs on the held-out pairs at every `evaluate()`.
    @torch.no_grad()
    def retrieval_metrics(self, dataset: datasets.Dataset, prefix: str = "eval") -> dict[str, float]:
        """Per-language precision@1 of finding each held-out sentence's translation among that language's pairs."""
        model = self.model
        was_training = model.training
        model.eval()
        lang_ids = np.asarray(dataset["lang_id"])
        metrics, averages = {}, []
        for lang_id in np.unique(lang_ids):
            subset = dataset.select(np.flatnonzero(lang_ids == lang_id))
            # Longest pairs first, so batches pad little; both sides keep the same order, so row i still translates
            # row i and precision@1 is unchanged.
            subset = subset.select(np.argsort(-pair_lengths(subset), kind="stable"))
            src, tgt = [], []
            for start in range(0, len(subset), self.args.per_device_eval_batch_size):
                batch = self.data_collator(
                    list(subset.select(range(start, min(len(subset), start + self.args.per_device_eval_batch_size))))
                )
                batch = {k: v.to(self.args.device) for k, v in batch.items()}
                pooled = self.pool(model, batch["input_ids"], batch["attention_mask"], batch["n_words"]).float()
                s, t = pooled.chunk(2)
                src.append(s)
                tgt.append(t)
            src, tgt = torch.cat(src), torch.cat(tgt)
            code = self.language_codes[int(lang_id)]
            en_to_xx = retrieval_precision_at_1(src, tgt)
            xx_to_en = retrieval_precision_at_1(tgt, src)
            metrics[f"{prefix}_{code}_retrieval_en2xx"] = en_to_xx
            metrics[f"{prefix}_{code}_retrieval_xx2en"] = xx_to_en
            metrics[f"{prefix}_{code}_retrieval_acc"] = (en_to_xx + xx_to_en) / 2
            averages.append((en_to_xx + xx_to_en) / 2)
        if averages:
            metrics[f"{prefix}_avg_retrieval_acc"] = float(np.mean(averages))
        model.train(was_training)
        return metrics

    def save_encoder(self, output_dir: str | None = None) -> None:
        """Save the encoder alone (projection and MLM heads left out) with its tokenizer: a checkpoint that
        `AutoModelFor*.from_pretrained` loads. Checkpoints keep the heads, for resuming."""
        output_dir = output_dir or self.args.output_dir
        # Every process takes part: under DeepSpeed ZeRO-3 the full weights are gathered onto the main one.
        state_dict = self.accelerator.get_state_dict(self.deepspeed if self.is_deepspeed_enabled else self.model)
        if self.args.should_save:
            encoder = {name: tensor for name, tensor in state_dict.items() if not name.startswith(HEAD_PREFIXES)}
            self.unwrapped(self.model).save_pretrained(output_dir, state_dict=encoder)
            self.processing_class.save_pretrained(output_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def parse_realign_args(argv: list[str] | None = None):
    model_args, data_args, realign_args, extension_args, training_args = parse_args(
        (ModelArguments, DataArguments, RealignArguments, ExtensionArguments, TrainingArguments),
        {**PAPER_TRAINING_DEFAULTS, "output_dir": ""},  # "": derived from the model, subset and seed
        argv,
        help_overrides={
            "train_sampling_strategy": "'random' (default): each pair's language is drawn as --language_sampling "
            "says, pairs shuffled within a language. 'group_by_length': the same draws, reordered so that a batch "
            "holds pairs of similar length (less padding; a batch's negatives then tend to share a length). The other "
            "values are refused.",
            "output_dir": "Where to write the realigned encoder, checkpoints and records. Default: "
            "out/realign/<model>/<subset>/seed<seed>, printed at start.",
        },
    )
    if not training_args.output_dir:
        training_args.output_dir = default_output_dir(model_args, data_args, training_args.seed)
        logger.warning("No --output_dir given: writing to %s", training_args.output_dir)
    if training_args.train_sampling_strategy not in ("random", "group_by_length"):
        raise ValueError(
            f"--train_sampling_strategy {training_args.train_sampling_strategy} is not available for realignment: "
            "pairs are drawn language by language ('random', the default) and can then be grouped by length "
            "('group_by_length')."
        )
    if training_args.do_train and training_args.max_steps <= 0:
        raise ValueError(
            f"--max_steps must be positive for realignment, got {training_args.max_steps}: the language sampler draws "
            "max_steps × batch pairs, so a run is as long as its steps say (the paper: 24,544); --num_train_epochs is "
            "not used."
        )
    weights, word_level = extension_args.weights, extension_args.alignment == "word"
    if word_level and (realign_args.gather_negatives or realign_args.length_buckets > 1):
        raise ValueError(
            "--gather_negatives and --length_buckets work with --alignment sentence only: processes hold different "
            "numbers of aligned words, and words are pooled from the whole padded batch. Drop one of the flags."
        )
    gathered = training_args.world_size if realign_args.gather_negatives else 1
    if not word_level and weights["align"] and training_args.per_device_train_batch_size * gathered < 2:
        raise ValueError(
            f"--per_device_train_batch_size {training_args.per_device_train_batch_size} leaves the contrastive loss "
            "no negatives (each pair's negatives are the other pairs of its batch), so it is 0 and nothing is learnt. "
            "Use at least 2 pairs per batch (the paper uses 16), or --gather_negatives with several processes."
        )
    # The src_*/tgt_* columns are not arguments of the model's forward, and the Trainer would otherwise drop them.
    training_args.remove_unused_columns = False
    if training_args.world_size > 1:
        # Every process must hold full batches of the same size, or the gathered negatives would not line up.
        training_args.dataloader_drop_last = True
        if realign_args.length_buckets > 1:
            # DDP and DeepSpeed expect one forward pass of the wrapped model per backward pass.
            raise ValueError("--length_buckets needs a single process; drop it under torchrun / accelerate launch.")
    if training_args.ddp_find_unused_parameters is None and (weights["mlm"] or realign_args.projection_head):
        # Heads used outside the encoder's forward (MLM, projection) would be taken for unused parameters and then
        # marked ready twice; load_encoder freezes every parameter that gets no gradient, so DDP need not look.
        training_args.ddp_find_unused_parameters = False
    return model_args, data_args, realign_args, extension_args, training_args


def default_output_dir(model_args: ModelArguments, data_args: DataArguments, seed: int) -> str:
    """out/realign/<model>/<subset>/seed<seed>: one folder per realigned checkpoint, as the paper's grid keeps them."""
    model = Path(model_args.model_name_or_path.rstrip("/")).name
    if data_args.subset is not None:
        subset = Path(data_args.subset).name.removesuffix(".yaml").removesuffix(".yml")
    else:
        subset = "languages-" + "-".join(sorted(code.strip().lower() for code in data_args.languages.split(",")))
    return str(Path("out") / "realign" / model / subset[:80] / f"seed{seed}")


def wants_eval(data_args: DataArguments, training_args: TrainingArguments) -> bool:
    """Held-out pairs are evaluated when they are given, unless evaluation is explicitly switched off."""
    has_data = data_args.eval_parallel_data_dir is not None or data_args.validation_pairs_per_language > 0
    return has_data or training_args.do_eval


def run_settings(model_args, data_args, realign_args, extension_args, training_args, codes, subset_info) -> dict:
    """What determines the realigned checkpoint, as {model, data, loss, training}: a run in the same output_dir must
    match it, and realign_config.json and the model card report it."""
    training_keys = (*TRAINING_SETTING_KEYS, "train_sampling_strategy")
    # --subset and --languages as typed are left out: `subset` and `languages` are what they resolve to.
    unrecorded = ("subset", "languages", "preprocessing_num_workers", "overwrite_cache")
    speed_only = ("length_buckets", *DEPRECATED_FLAGS)
    return {
        "model": {
            "model_name_or_path": model_args.model_name_or_path,
            "freeze_word_embeddings": model_args.freeze_word_embeddings,
        },
        "data": {
            "subset": subset_info["name"],
            "languages": codes,
            **{k: v for k, v in asdict_public(data_args).items() if k not in unrecorded},
        },
        "loss": {
            k: v
            for args in (realign_args, extension_args)
            for k, v in asdict_public(args).items()
            if k not in speed_only
        },
        "training": {k: getattr(training_args, k) for k in training_keys},
    }


def write_realign_config(trainer, settings, subset_info, pair_stats, train_metrics, eval_metrics) -> None:
    config = {
        "base_model": settings["model"]["model_name_or_path"],
        "subset": subset_info,
        "languages": settings["data"]["languages"],
        "pair_counts": pair_stats,
        "loss": settings["loss"],
        "steps": trainer.state.global_step,
        "seed": settings["training"]["seed"],
        "settings": settings,
        "code_version": code_version(),
        "train_metrics": train_metrics,
        "eval_metrics": eval_metrics,
    }
    write_json_atomic(Path(trainer.args.output_dir) / CONFIG_FILE, config)


def write_model_card(trainer, settings, subset_info, eval_metrics) -> None:
    """Write the model card (`README.md`) and, with `--push_to_hub`, upload it with the encoder and tokenizer.

    The card's metadata lists the languages (English and the realignment languages), the base model and a
    `realignment` mapping (subset, languages, steps, seed, loss options); its text adds a "Realignment" section with
    the same facts and the held-out retrieval accuracy when there was an evaluation. `Trainer.push_to_hub` is not
    used: it would regenerate the card without that section and save the model again, projection head included.
    The upload carries what a reader of the card needs (`push_model_folder`) and `realign_config.json` without local
    paths; the run's other records stay local.
    """
    from huggingface_hub import ModelCard

    if not trainer.is_world_process_zero():
        return  # one card and one upload (`should_save` also holds on the other nodes with --save_on_each_node)
    registry = lang_registry.load_registry()
    languages, base_model = settings["data"]["languages"], settings["model"]["model_name_or_path"]
    iso = list(dict.fromkeys(registry.get(c).iso639_1 or c for c in ["eng", *languages]))
    loss, seed = settings["loss"], settings["training"]["seed"]
    output_dir = Path(trainer.args.output_dir)
    trainer.create_model_card(
        language=iso,
        tags=["multilingual-realignment", "contrastive", f"subset-{subset_info['name']}"],
        finetuned_from=base_model,
        model_name=(trainer.args.hub_model_id or output_dir.name).split("/")[-1],
    )
    path = output_dir / "README.md"
    card = ModelCard.load(path)
    card.data.base_model = base_model
    card.data.realignment = {
        "subset": subset_info["name"],
        "languages": list(languages),
        "steps": trainer.state.global_step,
        "seed": seed,
        "loss": loss,
    }
    lines = [
        "",
        "## Realignment",
        "",
        f"- Base model: `{base_model}`",
        f"- Subset: `{subset_info['name']}` ({len(languages)} languages): {', '.join(languages)}",
        f"- Steps: {trainer.state.global_step}, seed {seed}",
        "- Loss: " + ", ".join(f"{k}={v}" for k, v in loss.items()),
    ]
    if eval_metrics.get("eval_avg_retrieval_acc") is not None:
        lines.append(
            f"- Held-out retrieval accuracy (mean of both directions): {eval_metrics['eval_avg_retrieval_acc']:.4f}"
        )
        per_language = [
            f"| {code} | {eval_metrics[f'eval_{code}_retrieval_en2xx']:.4f} "
            f"| {eval_metrics[f'eval_{code}_retrieval_xx2en']:.4f} |"
            for code in languages
            if f"eval_{code}_retrieval_en2xx" in eval_metrics and f"eval_{code}_retrieval_xx2en" in eval_metrics
        ]
        if per_language:
            lines += ["", "| language | retrieval en→xx | retrieval xx→en |", "|---|---|---|", *per_language]
    card.text = card.text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
    card.save(path)
    if trainer.args.push_to_hub:
        # realign_config.json goes up without the run's settings and the subset file's path (local paths).
        config = json.loads((output_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        config.pop("settings", None)
        config["subset"] = {k: v for k, v in config["subset"].items() if k != "path"}
        public = {CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
        push_model_folder(trainer, "End of realignment", extra_files=public)


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, realign_args, extension_args, training_args = parse_realign_args(argv)
    setup_logging(training_args)
    logger.info("Realignment %s, %s, data %s", realign_args, extension_args, data_args)
    set_seed(training_args.seed)

    codes, subset_info = resolve_languages(data_args, training_args.seed)
    tokenizer = load_tokenizer(model_args)
    extensions = RealignExtensions(
        extension_args, realign_args.realign_layer, realign_args.temperature, realign_args.same_meaning
    )
    extensions.check_requirements(tokenizer)
    with_eval = wants_eval(data_args, training_args)
    with training_args.main_process_first(desc="tokenising the parallel data"):
        train_dataset, eval_dataset, pair_stats = build_datasets(
            codes, tokenizer, data_args, realign_args, extensions, model_args.cache_dir, training_args.seed, with_eval
        )
    # Recorded once the data is known to be good, so that a run failing on its input leaves nothing behind.
    settings = run_settings(model_args, data_args, realign_args, extension_args, training_args, codes, subset_info)
    check_settings(training_args.output_dir, settings, SETTINGS_FILE, training_args.should_save)
    last_checkpoint = detect_checkpoint(training_args)
    sizes = np.array([pair_stats[c]["used"] for c in codes])
    sampling_probs = language_probabilities(sizes, data_args.language_sampling, data_args.sampling_temperature)
    model = load_encoder(model_args, realign_args, extensions)
    pad_multiple = 8 if torch.cuda.is_available() and not training_args.use_cpu else None

    trainer = RealignTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=PairCollator(tokenizer.pad_token_id, pad_multiple, extra_columns=extensions.collate),
        realign_args=realign_args,
        language_codes=codes,
        sampling_probs=sampling_probs,
        align_weight=extensions.weights["align"],
    )
    # (extensions) The companion paper's terms, which read the Trainer's cached lookups.
    trainer.loss_terms.update(extensions.loss_terms(tokenizer, trainer.unwrapped, trainer.special_ids_on))
    train_metrics, eval_metrics = {}, {}
    if training_args.do_train:
        train_metrics = train_unless_finished(trainer, last_checkpoint, save=trainer.save_encoder)
        train_metrics = dict(train_metrics, train_pairs=len(train_dataset))
        trainer.log_metrics("train", train_metrics)
        save_metrics(trainer, "train", train_metrics)
        trainer.save_state()
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        save_metrics(trainer, "eval", eval_metrics)
    if training_args.should_save:
        write_realign_config(trainer, settings, subset_info, pair_stats, train_metrics, eval_metrics)
        write_model_card(trainer, settings, subset_info, eval_metrics)
    end_distributed()
    return {**train_metrics, **eval_metrics}


def end_distributed() -> None:
    """Wait for every process, then tear the process group down before the interpreter exits.

    Left to interpreter shutdown, a process whose communication threads are still alive can abort ("terminate called
    without an active exception"), as seen with DeepSpeed's shared-memory backend on CPU.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
