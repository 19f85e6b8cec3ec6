#!/usr/bin/env python
"""Realign a multilingual encoder: pull the sentence-averaged representations of translation pairs together.

The realignment phase of "Rethinking what Matters: Effective and Robust Multilingual Realignment for Low-Resource
Languages": English ↔ L translation pairs, languages mixed within a batch, a symmetric in-batch contrastive loss over
masked-mean pooled sentences. The output is a plain encoder checkpoint that any `AutoModelFor*.from_pretrained` loads.

    python run_realign.py --subset subsets/uriel_20.yaml --model_name_or_path xlm-roberta-base --output_dir out/xlmr-uriel20
    accelerate launch run_realign.py --subset subsets/uriel_20.yaml --model_name_or_path xlm-roberta-base \
        --output_dir out/xlmr-uriel20 --gather_negatives
    python run_realign.py --subset uriel_20 --parallel_data_dir data/parallel --model_name_or_path xlm-roberta-base \
        --output_dir out/xlmr-uriel20 --reference_compat   # offline files, the reference code's behaviour
    python run_realign.py --subset uriel_20 --model_name_or_path xlm-roberta-base --output_dir out/xlmr-words \
        --alignment word --aligner eflomal --loss_weights sentence=1,mlm=1   # aligned word pairs plus MLM

`--alignment word` aligns word pairs extracted by eflomal instead of averaged sentences (the paper's Appendix A.2
comparison); `--loss_weights` combines the contrastive loss with the companion paper's word-level (bag-of-words) and
MLM losses (λ_S·L_S + λ_W·L_W + λ_M·L_M).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import tempfile
import time
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import regex
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, Trainer, TrainingArguments, set_seed
from transformers.trainer_pt_utils import get_length_grouped_indices

import lang_registry
from realign_utils import (
    asdict_public,
    atomic_writer,
    check_settings,
    code_version,
    content_token_mask,
    detect_checkpoint,
    find_local_parallel_file,
    masked_mean_pool,
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
MLM_HEAD_PREFIX = "realign_mlm_head."
HEAD_PREFIXES = (PROJECTION_PREFIX, MLM_HEAD_PREFIX)  # trained with the encoder, never saved with it


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "The encoder to realign: a Hub model id (xlm-roberta-base) or a local checkpoint folder."}
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
        metadata={"help": "Whether to run code from the model's Hub repository. Only enable it for repositories you trust."},
    )
    freeze_word_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Whether to keep the word-embedding matrix fixed. It saves memory and time (XLM-R's matrix has 250k "
            "rows) and keeps the vocabulary of unseen languages where pre-training left it."
        },
    )


@dataclass
class DataArguments:
    subset: str | None = field(
        default=None,
        metadata={
            "help": "The languages to realign with: a subset YAML (subsets/uriel_20.yaml) or its bare name (uriel_20). "
            "Random subsets are drawn with --seed, as in the paper."
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
        default=96, metadata={"help": "The maximum number of tokens per sentence, special tokens included (paper: 96)."}
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
            "size (the paper), 'proportional' to corpus size, or 'temperature' (size ** (1 / --sampling_temperature)). "
            "--train_sampling_strategy group_by_length then batches the drawn pairs by length (less padding)."
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
        metadata={"help": "For debugging: keep at most this many training pairs in all, spread evenly over languages."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "For debugging: keep at most this many held-out pairs per language."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "The number of processes used to tokenise."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Whether to tokenise again instead of reusing the cache."})

    def __post_init__(self):
        if self.subset is None and self.languages is None:
            raise ValueError("Give the languages to realign with: --subset subsets/uriel_20.yaml or --languages yor,swa.")
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
        default=0.1, metadata={"help": "The softmax temperature T of the contrastive loss (scale = 1 / T; paper: 0.1)."}
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
        metadata={"help": "Whether to drop stand-alone '▁' tokens produced by SentencePiece tokenizers (reference code)."},
    )
    same_meaning: str | None = field(
        default=None,
        metadata={
            "help": "What the contrastive loss does with another translation of the same English sentence in the batch "
            "(multi-way parallel data such as UDHR, FLORES or the Bible; pairs share a meaning when their normalised "
            "English text, or the 'id' column of a local file, is the same): 'positive' (default: it counts as a "
            "positive, as in supervised contrastive learning), 'ignore' (left out of the loss) or 'negative' (pushed "
            "away like any other sentence: the paper's printed loss and the reference code, set by "
            "--reference_compat). 'positive' is the default because it gave the best held-out retrieval in the "
            "quickstart's comparison (README, 'Same-meaning negatives'). On data without repeated sentences the "
            "three are the same loss."
        },
    )
    gather_negatives: bool = field(
        default=False,
        metadata={
            "help": "Under multi-process training, gather the pooled vectors of every process (with gradients) so each "
            "pair has per_device_train_batch_size × world_size − 1 other pairs as negatives instead of "
            "per_device_train_batch_size − 1."
        },
    )
    alignment: str = field(
        default="sentence",
        metadata={
            "help": "What the contrastive loss aligns: 'sentence' (the paper's averaging trick: one pooled vector per "
            "sentence) or 'word' (word pairs extracted by --aligner from the parallel data, Wu & Dredze 2020 style: "
            "each aligned word pair is a positive, the other aligned words of the batch are negatives)."
        },
    )
    aligner: str = field(
        default="eflomal",
        metadata={
            "help": "The word aligner of --alignment word: 'eflomal' (pip install eflomal; a faster successor of "
            "FastAlign). It runs once per language; its alignments are cached by the content of the data. It aligns "
            "only the pairs --max_pairs_per_language / --max_train_samples keep (its time grows with the corpus)."
        },
    )
    word_pooling: str = field(
        default="first",
        metadata={
            "help": "How --alignment word represents a word by its sub-words: 'first' (the first sub-word) or 'mean' "
            "(the mean of its sub-words)."
        },
    )
    loss_weights: str = field(
        default="sentence=1",
        metadata={
            "help": "Weights of the loss terms, as in the companion paper's λ_S·L_S + λ_W·L_W + λ_M·L_M: a comma list "
            "of sentence=…, word=…, mlm=… (missing terms are 0; e.g. sentence=1,word=0,mlm=1). 'sentence' is the "
            "contrastive alignment loss (over sentences, or over aligned words with --alignment word); 'word' the "
            "companion paper's bag-of-words loss against sampled vocabulary negatives; 'mlm' masked language "
            "modelling on both sides. Default: the paper's loss alone."
        },
    )
    word_negatives: int = field(
        default=512,
        metadata={"help": "How many vocabulary negatives the 'word' loss samples per batch (companion paper: 512)."},
    )
    mlm_probability: float = field(
        default=0.15,
        metadata={"help": "The share of text tokens the 'mlm' loss masks (BERT / XLM-R pre-training: 0.15)."},
    )
    length_buckets: int = field(
        default=1,
        metadata={
            "help": "Encode each batch's sentences in this many forward passes over rows of similar length, each padded "
            "to its own longest row, instead of one pass padded to the batch's longest sentence. The batches, pooled "
            "vectors and loss stay the same (up to float rounding); the computation spent on padding shrinks, which "
            "saves time where compute grows with padded tokens, as on CPUs (the quickstart uses 4; README, "
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
        if self.alignment not in ("sentence", "word"):
            raise ValueError(f"--alignment must be 'sentence' or 'word', got {self.alignment!r}.")
        if self.aligner not in ALIGNERS:
            raise ValueError(f"--aligner must be one of {', '.join(ALIGNERS)}, got {self.aligner!r}.")
        if self.word_pooling not in ("first", "mean"):
            raise ValueError(f"--word_pooling must be 'first' or 'mean', got {self.word_pooling!r}.")
        self.loss_weights = format_loss_weights(parse_loss_weights(self.loss_weights))
        if self.alignment == "word" and self.gather_negatives:
            raise ValueError(
                "--gather_negatives works with --alignment sentence only: processes hold different numbers of aligned "
                "words, so their word vectors cannot be gathered into one tensor. Drop one of the two flags."
            )
        if self.word_negatives < 1:
            raise ValueError("--word_negatives must be at least 1 (the companion paper samples 512).")
        if not 0 < self.mlm_probability < 1:
            raise ValueError("--mlm_probability must be between 0 and 1 (BERT uses 0.15).")
        if self.length_buckets < 1:
            raise ValueError("--length_buckets must be at least 1 (1: one forward pass per batch).")
        if self.length_buckets > 1 and self.alignment == "word":
            raise ValueError("--length_buckets applies to --alignment sentence only; drop it for --alignment word.")
        if not math.isfinite(self.temperature):  # NaN passes `temperature <= 0` and makes every logit NaN
            raise ValueError(f"--temperature must be a finite positive number (paper: 0.1), got {self.temperature}.")

    @property
    def weights(self) -> dict[str, float]:
        """The loss weights as a dict {sentence, word, mlm}."""
        return parse_loss_weights(self.loss_weights)


LOSS_TERMS = ("sentence", "word", "mlm")
SAME_MEANING_TREATMENTS = ("positive", "ignore", "negative")
DEFAULT_SAME_MEANING = "positive"
DEFAULT_LOSS_WEIGHTS = {"sentence": 1.0, "word": 0.0, "mlm": 0.0}
ALIGNERS = ("eflomal",)


def parse_loss_weights(spec: str) -> dict[str, float]:
    """Parse `sentence=1,word=0,mlm=1` into {sentence, word, mlm}; missing terms are 0, at least one must be positive."""
    weights = dict.fromkeys(LOSS_TERMS, 0.0)
    for item in spec.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in LOSS_TERMS:
            raise ValueError(
                f"--loss_weights: expected term=weight with term one of {', '.join(LOSS_TERMS)}, got {item.strip()!r} "
                "(e.g. --loss_weights sentence=1,word=0,mlm=1)."
            )
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"--loss_weights: the weight of {name} must be a number, got {value.strip()!r}.") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--loss_weights: the weight of {name} must be a non-negative number, got {weight}.")
        weights[name] = weight
    if not any(weights.values()):
        raise ValueError("--loss_weights: at least one of sentence, word and mlm needs a positive weight.")
    return weights


def format_loss_weights(weights: dict[str, float]) -> str:
    """The canonical spelling of the weights (`sentence=1,word=0,mlm=1`), recorded in the run's settings."""
    return ",".join(f"{name}={weights[name]:g}" for name in LOSS_TERMS)


# ----------------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------------


def contrastive_alignment_loss(
    src_embeddings: torch.Tensor,
    tgt_embeddings: torch.Tensor,
    temperature: float = 0.1,
    all_src_embeddings: torch.Tensor | None = None,
    all_tgt_embeddings: torch.Tensor | None = None,
    rank: int = 0,
    meaning_keys: torch.Tensor | None = None,
    all_meaning_keys: torch.Tensor | None = None,
    same_meaning: str = "positive",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric in-batch contrastive loss between the two sides of N translation pairs.

    Every sentence of the batch, in either language, is a query; its translation is the positive and the other
    sentences (both languages) are the negatives. Similarities are cosines divided by the temperature, the query's
    similarity with itself is masked out, and the loss is the cross-entropy of picking the positive, averaged over
    the 2N queries. This is the loss the paper (Eq. 1) describes and the reference code minimises: Eq. 1 as printed
    lacks the minus sign and leaves the positive out of the denominator.

    Multi-way parallel data (UDHR, FLORES, Tatoeba, the Bible; short OPUS sentences) puts translations of one
    English sentence into several pairs of a batch. `meaning_keys` says which pairs share a meaning, and
    `same_meaning` what the loss does with a candidate c that shares the query i's meaning (c ≠ i). With s the scaled
    cosines, p(i) the query's own translation, P(i) every candidate sharing its meaning (p(i) included) and N(i) the
    candidates of another meaning:

    - ``"negative"``: ignore the keys; every other sentence is a negative, as in the paper and the reference code
      (``--reference_compat``). ℓ_i = −log( e^{s_{i,p(i)}} / Σ_{c≠i} e^{s_{ic}} ). It pushes apart sentences that
      mean the same: even perfectly language-neutral embeddings keep a loss of about log |P(i)|.
    - ``"ignore"``: leave same-meaning candidates out of the denominator.
      ℓ_i = −log( e^{s_{i,p(i)}} / (e^{s_{i,p(i)}} + Σ_{c∈N(i)} e^{s_{ic}}) ).
    - ``"positive"``: every same-meaning sentence, in either language, is a positive, each contrasted with the
      negatives alone: ℓ_i = 1/|P(i)| Σ_{c∈P(i)} −log( e^{s_{ic}} / (e^{s_{ic}} + Σ_{n∈N(i)} e^{s_{in}}) ).
      This is pytorch-metric-learning's ``NTXentLoss`` with the meaning keys as labels (it averages over all
      positive pairs; here over a query's positives, then over queries, so each sentence weighs the same). The
      supervised contrastive loss (SupCon, L_out) differs in keeping the other positives in each denominator, so its
      minimum is log |P(i)| > 0 even for language-neutral embeddings.

    Without repeated meanings in the batch (P(i) = {p(i)}) the three are the same loss: NT-Xent.

    Also known as: InfoNCE or NT-Xent with in-batch negatives (SimCLR's loss applied to translation pairs); "strong
    alignment" in Gaschi et al. (2023). sentence-transformers' MultipleNegativesRankingLoss is the one-directional
    variant whose negatives are the other targets only, and avoids repeated meanings at the sampler level instead
    (its no-duplicates batch sampler); the companion paper's "cross-lingual negatives only" variant would drop the
    same-language negatives.

    Args:
        src_embeddings: (N, d) pooled English sentences.
        tgt_embeddings: (N, d) pooled translations, row i translating row i of `src_embeddings`.
        temperature: T in exp(cos / T); scale = 1 / T. The paper uses 0.1. Lower is sharper.
        all_src_embeddings: (W·N, d) the English sides of every process, to use other processes' pairs as extra
            negatives (gathered with gradients); `None` for the local batch only.
        all_tgt_embeddings: (W·N, d) likewise for the translations.
        rank: this process's index in the gathered tensors (its pairs are rows rank·N … rank·N + N − 1).
        meaning_keys: (N,) integer key of each pair's meaning (pairs with equal keys translate the same sentence);
            `None`: every pair has its own meaning.
        all_meaning_keys: (W·N,) the keys of every process, given with the gathered embeddings.
        same_meaning: "positive", "ignore" or "negative", as above.

    Returns:
        The scalar loss and detached statistics: `retrieval_acc` (share of queries whose most similar candidate
        shares their meaning: their translation or another one of the same sentence), `positive_cosine` (mean cosine
        with the translation), `negative_cosine` (mean cosine with candidates of another meaning) and
        `same_meaning_per_query` (mean number of candidates sharing the query's meaning besides its translation).

    References:
        Chen et al. (2020), A Simple Framework for Contrastive Learning of Visual Representations (NT-Xent);
        Khosla et al. (2020), Supervised Contrastive Learning; Gaschi et al. (2023), Exploring the Relationship
        between Alignment and Cross-lingual Transfer; the paper, §2 and Appendix A.6.

    Example:
        >>> src, tgt = torch.randn(4, 8), torch.randn(4, 8)
        >>> keys = torch.tensor([7, 7, 8, 9])  # pairs 0 and 1: two translations of one English sentence
        >>> loss, stats = contrastive_alignment_loss(src, tgt, temperature=0.1, meaning_keys=keys)
        >>> loss.shape, sorted(stats)
        (torch.Size([]), ['negative_cosine', 'positive_cosine', 'retrieval_acc', 'same_meaning_per_query'])
    """
    if same_meaning not in SAME_MEANING_TREATMENTS:
        raise ValueError(f"same_meaning must be one of {', '.join(SAME_MEANING_TREATMENTS)}, got {same_meaning!r}.")
    n = src_embeddings.shape[0]
    queries = F.normalize(torch.cat([src_embeddings, tgt_embeddings]), dim=-1)  # (2N, d)
    if all_src_embeddings is None:
        candidates, total, offset, candidate_keys = queries, n, 0, meaning_keys
    else:
        candidates = F.normalize(torch.cat([all_src_embeddings, all_tgt_embeddings]), dim=-1)  # (2WN, d)
        total, offset, candidate_keys = all_src_embeddings.shape[0], rank * n, all_meaning_keys
    cosines = queries @ candidates.T  # (2N, 2WN)
    local = torch.arange(n, device=queries.device)
    self_index = torch.cat([offset + local, total + offset + local])  # (2N,)
    positive_index = torch.cat([total + offset + local, offset + local])  # (2N,)
    rows = torch.arange(2 * n, device=queries.device)
    self_mask = torch.zeros_like(cosines, dtype=torch.bool)
    self_mask[rows, self_index] = True
    # finfo.min rather than -inf or -1e6: finite in fp16/bf16, and exp() of it is exactly 0.
    logits = (cosines / temperature).masked_fill(self_mask, torch.finfo(cosines.dtype).min)
    if meaning_keys is None:
        same = torch.zeros_like(self_mask)
        same[rows, positive_index] = True  # (2N, 2WN): the translation alone
    else:
        if candidate_keys is None:
            raise ValueError("Give all_meaning_keys together with the gathered embeddings.")
        same = (meaning_keys.repeat(2)[:, None] == candidate_keys.repeat(2)[None, :]) & ~self_mask  # (2N, 2WN)
    if same_meaning == "negative" or meaning_keys is None:
        loss = F.cross_entropy(logits, positive_index)
    elif same_meaning == "ignore":
        others = same.clone()
        others[rows, positive_index] = False
        loss = F.cross_entropy(logits.masked_fill(others, torch.finfo(cosines.dtype).min), positive_index)
    else:
        scores = logits.float()  # the log-sum-exp and softplus below in fp32 under fp16/bf16 autocast
        negatives = torch.logsumexp(scores.masked_fill(same, torch.finfo(torch.float32).min), dim=1)  # (2N,)
        # −log(e^s / (e^s + Σ_neg e^s_n)) = softplus(logsumexp_neg − s), for every candidate; `where`, not a product,
        # so that the huge values at masked positions never meet a zero.
        per_positive = torch.where(same, F.softplus(negatives[:, None] - scores), 0.0)  # (2N, 2WN)
        loss = (per_positive.sum(dim=1) / same.sum(dim=1)).mean()
    with torch.no_grad():
        negative_mask = ~(same | self_mask)
        nearest = logits.argmax(dim=1)  # (2N,), self excluded
        stats = {
            "retrieval_acc": same[rows, nearest].float().mean(),
            "positive_cosine": cosines[rows, positive_index].float().mean(),
            # A masked mean rather than cosines[negative_mask]: boolean indexing would make the GPU wait every step.
            "negative_cosine": (cosines.float() * negative_mask).sum() / negative_mask.sum().clamp(min=1),
            "same_meaning_per_query": same.sum(dim=1).float().mean() - 1,
        }
    return loss, stats


def word_bag_loss(
    queries: torch.Tensor,
    pair_input_ids: torch.Tensor,
    embedding_matrix: torch.Tensor,
    candidate_ids: torch.Tensor,
    num_negatives: int = 512,
    temperature: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The companion paper's word-level loss L_W: a parallel pair's representation must predict its bag of words.

    For each of the n translation pairs of the batch, the query q is the representation of the concatenated pair
    (English sentence + translation, encoded as one sequence); its bag of words B is the set of distinct vocabulary
    items (sub-words) of the concatenation, special tokens excluded; S is a set of `num_negatives` vocabulary items
    sampled uniformly per batch (special tokens excluded, and, for each pair, the items of its own bag removed, so
    that negatives come from V \\ B as in HiCTL). e(w) is the encoder's input embedding of w (the embedding lookup
    the paper names) and s(·,·) the cosine divided by the temperature, as for the sentence loss:

        L_W = −1/n Σ_i 1/|B_i| Σ_{w_t ∈ B_i} log [ exp(s(q_i, e(w_t))) /
                                                  ( exp(s(q_i, e(w_t))) + Σ_{w_j ∈ S \\ B_i} exp(s(q_i, e(w_j))) ) ]

    which is the companion paper's §4.2 formula, −1/(n|B|) Σ_i Σ_t log(...), with |B| read per pair (bags differ in
    size). The paper leaves q unspecified ("the query"); we use the hidden state of the first position ([CLS] / <s>)
    of the concatenated pair at the aligned layer, HiCTL's sentence representation.

    Also known as: HiCTL's word-level contrastive loss (Wei et al., 2021), a bag-of-words prediction task with
    sampled-softmax negatives. Relations: unlike `contrastive_alignment_loss`, positives are vocabulary items, not
    other sentences, so it mainly moves the input embeddings and the sentence representation; the companion paper
    finds that this loss alone (S0W1M0) hurts retrieval and downstream accuracy.

    Args:
        queries: (n, d) the representations q of the n concatenated pairs.
        pair_input_ids: (n, L) the token ids of the concatenated pairs, padding and special tokens included; the ids
            not in `candidate_ids` (special tokens, padding) are left out of the bags.
        embedding_matrix: (V, d) the input embeddings e(·).
        candidate_ids: (C,) the vocabulary items that may be sampled as negatives or belong to a bag (the vocabulary
            without special tokens).
        num_negatives: |S|; capped at C.
        temperature: T in exp(cos / T) (the companion paper uses 0.1 for every loss).
        generator: the random generator that draws S (the global one when None).

    Returns:
        The scalar loss and detached statistics: `word_bag_size` (mean |B_i|) and `word_bag_acc` (share of bag items
        more similar to q than every negative).

    References:
        Wei et al. (2021), On Learning Universal Representations Across Languages (HiCTL), §3.2;
        the companion paper (Veitsman et al., "Why Better Cross-Lingual Alignment Fails for Better Cross-Lingual
        Transfer"), §4.2 and Table 4 (512 negatives, T = 0.1).

    Example:
        >>> embeddings = torch.randn(20, 8)
        >>> loss, stats = word_bag_loss(torch.randn(2, 8), torch.tensor([[0, 5, 6, 1], [0, 7, 7, 1]]), embeddings,
        ...                             torch.arange(2, 20), num_negatives=6)
        >>> loss.shape, sorted(stats)
        (torch.Size([]), ['word_bag_acc', 'word_bag_size'])
    """
    device = queries.device
    count = min(num_negatives, len(candidate_ids))
    negatives = candidate_ids[torch.randperm(len(candidate_ids), generator=generator)[:count].to(device)]  # (K,)
    # Bags: the distinct candidate ids of each row (sorted; repeats and non-candidates masked out).
    ids, _ = pair_input_ids.sort(dim=1)  # (n, L)
    in_bag = torch.isin(ids, candidate_ids)
    in_bag[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    q = F.normalize(queries, dim=-1)  # (n, d)
    positive_cos = torch.einsum("nd,nld->nl", q, F.normalize(embedding_matrix[ids], dim=-1))  # (n, L)
    negative_cos = q @ F.normalize(embedding_matrix[negatives], dim=-1).T  # (n, K)
    negative_in_bag = ((ids[:, :, None] == negatives[None, None, :]) & in_bag[:, :, None]).any(dim=1)  # (n, K)
    negative_logits = (negative_cos / temperature).masked_fill(negative_in_bag, torch.finfo(negative_cos.dtype).min)
    negative_lse = torch.logsumexp(negative_logits, dim=1, keepdim=True)  # (n, 1)
    positive_logits = positive_cos / temperature  # (n, L)
    # −log(e^p / (e^p + Σ e^neg)) = log(e^p + Σ e^neg) − p
    per_item = torch.logaddexp(positive_logits, negative_lse) - positive_logits  # (n, L)
    bag_sizes = in_bag.sum(dim=1)  # (n,)
    per_pair = (per_item * in_bag).sum(dim=1) / bag_sizes.clamp(min=1)  # (n,)
    has_bag = bag_sizes > 0
    loss = per_pair[has_bag].mean() if bool(has_bag.any()) else per_pair.sum() * 0.0
    with torch.no_grad():
        beats_negatives = (positive_logits > negative_logits.max(dim=1, keepdim=True).values) & in_bag
        stats = {
            "word_bag_size": bag_sizes.float().mean(),
            "word_bag_acc": beats_negatives.sum().float() / in_bag.sum().clamp(min=1),
        }
    return loss, stats


def masked_lm_loss(
    encoder: nn.Module,
    mlm_head: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Masked language modelling (L_M) on the given sentences, BERT's recipe: predict the tokens at masked positions.

    Each text token (special tokens and padding excluded) is selected with `probability`; a selected token is replaced
    by the mask token 80 % of the time, by a random vocabulary item 10 % of the time and kept 10 % of the time, and

        L_M = −1/|M| Σ_{m ∈ M} log p(x_m | x̃)

    with M the selected positions, x̃ the corrupted input and p the MLM head's softmax over the vocabulary. Only the
    selected positions go through the head: the (rows, length, vocabulary) logits of a 250k-item vocabulary would not
    fit in memory.

    Also known as: the MLM / cloze objective of BERT and XLM-R pre-training; the companion paper's L_M (following
    HiCTL and InfoXLM, which keep MLM next to their contrastive terms to preserve the pre-trained representations).

    Args:
        encoder: the encoder (an `AutoModel`); its last hidden layer feeds the head.
        mlm_head: the pre-trained MLM head of the encoder's `AutoModelForMaskedLM`, tied to its input embeddings.
        input_ids: (B, L) the sentences (both sides of the pairs, stacked), padded.
        attention_mask: (B, L).
        special_ids: (S,) token ids never masked.
        mask_token_id: the tokenizer's mask token.
        vocab_size: random replacements are drawn from 0 … vocab_size − 1.
        probability: the selection rate (0.15).
        generator: the random generator of the masking (the global one when None).

    Returns:
        The scalar loss (0, with a gradient graph, when no position was selected).

    References:
        Devlin et al. (2019), BERT, §3.1; Conneau et al. (2020), XLM-R; the companion paper, §4.2.

    Example:
        >>> # loss = masked_lm_loss(encoder, head, batch["input_ids"], batch["attention_mask"], specials, 4, 30522)
    """
    device = input_ids.device
    maskable = content_token_mask(input_ids, attention_mask, special_ids)  # (B, L)
    draws = torch.rand(input_ids.shape, generator=generator).to(device)  # (B, L)
    selected = maskable & (draws < probability)
    corrupted = input_ids.clone()
    # Reuse the draw: < 0.8·p → mask, 0.8·p … 0.9·p → random token, ≥ 0.9·p → unchanged.
    corrupted[selected & (draws < 0.8 * probability)] = mask_token_id
    random_positions = selected & (draws >= 0.8 * probability) & (draws < 0.9 * probability)
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator).to(device)
    corrupted[random_positions] = random_tokens[random_positions]
    hidden = encoder(input_ids=corrupted, attention_mask=attention_mask).last_hidden_state  # (B, L, d)
    if not bool(selected.any()):
        return mlm_head(hidden[:, 0]).sum() * 0.0  # nothing to predict: zero, with the head in the graph
    logits = mlm_head(hidden[selected])  # (M, V)
    return F.cross_entropy(logits.float(), input_ids[selected])


def layer_hidden_states(model, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
    """The hidden states (B, L, d) of `hidden_states[layer]` (0 = embeddings, -1 = last layer)."""
    base = getattr(model, "module", model)  # a DeepSpeed engine's .config is its own dict, not the model's
    last = layer in (-1, base.config.num_hidden_layers) if hasattr(base, "config") else layer == -1
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=not last, **extra)
    return outputs.last_hidden_state if last else outputs.hidden_states[layer]


def word_pair_vectors(
    hidden: torch.Tensor, word_spans: torch.Tensor, n_pairs: int, pooling: str = "first"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vectors of aligned words: (P, d) English words and (P, d) their translations.

    `hidden` (2N, L, d) holds the N English sentences then their N translations; each row of `word_spans` (P, 5) is
    [pair index, English start, English end, translation start, translation end] (token positions, end exclusive).
    A word is its first sub-word (`first`) or the mean of its sub-words (`mean`).
    """
    pair, src_start, src_end, tgt_start, tgt_end = word_spans.unbind(dim=1)  # (P,) each
    tgt_row = pair + n_pairs
    if pooling == "first":
        return hidden[pair, src_start], hidden[tgt_row, tgt_start]
    # Span means from prefix sums: (C[end] − C[start]) / (end − start), no (P, L, d) gather.
    prefix = F.pad(hidden.float().cumsum(dim=1), (0, 0, 1, 0))  # (2N, L + 1, d)

    def span_mean(rows, start, end):
        width = (end - start).clamp(min=1).unsqueeze(1).to(prefix.dtype)  # (P, 1)
        return ((prefix[rows, end] - prefix[rows, start]) / width).to(hidden.dtype)  # (P, d)

    return span_mean(pair, src_start, src_end), span_mean(tgt_row, tgt_start, tgt_end)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


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
        "csv", data_files=url, delimiter="\t", header=None, quoting=3, usecols=[0, 1], names=[first, second],
        cache_dir=cache_dir, split="train",
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
    alignment_digest: str | None = None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Filter and tokenise one language's pairs once (cached); returns the dataset and per-reason drop counts.

    Every pair gets a `meaning_key` (see `meaning_key`; from the `id` column when there is one). Pairs with a side
    that holds no token to pool (nothing but special tokens) are dropped: they would reach the loss as zero vectors.
    Extra columns are built only when a loss needs them: `word_spans` (from the `word_links` column that
    `add_word_links` adds) for --alignment word, and `pair_input_ids` (the two sides encoded as one sequence) for the
    'word' loss. `alignment_digest` identifies the word alignments, so that cached tokenisations follow them.
    """
    n_raw = len(dataset)
    space_id = _standalone_space_id(tokenizer) if realign_args.strip_sentencepiece_space else None
    max_len = data_args.max_seq_length
    word_mode = realign_args.alignment == "word"
    pair_mode = realign_args.weights["word"] > 0
    if word_mode and "word_links" not in dataset.column_names:
        raise ValueError("--alignment word: the pairs carry no word alignments (call add_word_links first).")
    skip_ids = set(tokenizer.all_special_ids) | ({_standalone_space_id(tokenizer, quiet=True)} - {None})
    not_pooled = set(pooling_special_ids(tokenizer).tolist()) | ({space_id} - {None})
    with_ids = "id" in dataset.column_names

    def is_usable(batch):
        return [bool(s.strip()) and bool(t.strip()) and s.strip() != t.strip() for s, t in zip(batch["src"], batch["tgt"])]

    def tokenize(batch):
        ids_column = batch["id"] if with_ids else [None] * len(batch["src"])
        out = {"meaning_key": [meaning_key(text, key) for text, key in zip(batch["src"], ids_column)]}
        content = None
        spans = {}
        for side in ("src", "tgt"):
            if word_mode:
                encoded = _tokenize_with_offsets(tokenizer, batch[side])
                ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
                if space_id is not None:
                    offsets = [[o for o, t in zip(off, seq) if t != space_id] for off, seq in zip(offsets, ids)]
            else:
                ids = tokenizer(batch[side], add_special_tokens=True, truncation=False)["input_ids"]
            if space_id is not None:
                ids = [[t for t in seq if t != space_id] for seq in ids]
            out[f"{side}_length"] = [len(seq) for seq in ids]
            counts = [sum(t not in not_pooled for t in seq) for seq in ids]
            content = counts if content is None else [min(a, b) for a, b in zip(content, counts)]
            if word_mode:
                # Words cut off by --overlong truncate lose their span (the last position holds </s> / [SEP]).
                spans[side] = [
                    word_token_spans(text, seq, off, skip_ids, len(seq) if len(seq) <= max_len else max_len - 1)
                    for text, seq, off in zip(batch[side], ids, offsets)
                ]
            if data_args.overlong == "truncate":
                ids = [seq if len(seq) <= max_len else seq[: max_len - 1] + seq[-1:] for seq in ids]
            out[f"{side}_input_ids"] = ids
            # The reference code's prefix pooling averages over as many positions as the sentence has words.
            out[f"{side}_n_words"] = [len(text.split()) for text in batch[side]]
        if word_mode:
            out["word_spans"] = [
                links_to_token_spans(links, src_spans, tgt_spans)
                for links, src_spans, tgt_spans in zip(batch["word_links"], spans["src"], spans["tgt"])
            ]
        if pair_mode:
            out.update(_tokenize_concatenated_pairs(tokenizer, batch["src"], batch["tgt"], 2 * max_len, space_id))
        out["content_tokens"] = content
        return out

    extra_key = (["word", alignment_digest] if word_mode else []) + (["pair_inputs"] if pair_mode else [])
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
        "raw": n_raw, "empty_or_identical": n_unusable, "no_text_tokens": n_no_text, "overlong": n_overlong,
        "kept": len(tokenized),
    }
    logger.info(
        "%s: %d pairs kept of %d (dropped %d empty or identical, %d without text tokens, %d %s)",
        desc, counts["kept"], n_raw, n_unusable, n_no_text, n_overlong,
        f"longer than {max_len} tokens" if data_args.overlong == "drop" else "over-long (truncated, not dropped)",
    )
    return tokenized, counts


def _standalone_space_id(tokenizer, quiet: bool = False) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids("▁")
    if token_id is None or token_id == tokenizer.unk_token_id:
        if not quiet:
            logger.warning("--strip_sentencepiece_space: the tokenizer has no stand-alone '▁' token; nothing to strip.")
        return None
    return token_id


# Bumped whenever tokenize_pairs' output columns change, so that caches of an older layout are not read back.
TOKENIZED_FORMAT = 2


def _tokenized_cache_kwargs(files, language, tokenizer, data_args, realign_args, cache_dir, desc, extra_key=None) -> dict:
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
            language, desc, tokenizer.name_or_path, len(tokenizer), data_args.max_seq_length, data_args.overlong,
            realign_args.strip_sentencepiece_space, data_args.validation_pairs_per_language, transformers.__version__,
            TOKENIZED_FORMAT, *(extra_key or []),
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


# ----------------------------------------------------------------------------------------------------------------------
# Word alignments (--alignment word) and concatenated pairs (the 'word' loss)
# ----------------------------------------------------------------------------------------------------------------------

# Words for the aligner: runs of letters, marks and digits (regex's \w includes combining marks, so Devanagari or
# Yoruba words stay whole), or single other non-space characters. Scripts written without spaces between words
# (zh, ja, th, my, km, lo) come out as one "word" per run of text between spaces or punctuation: word alignment is
# of little use for them without a dedicated word segmenter.
WORD_PATTERN = regex.compile(r"\w+|[^\w\s]")
ALIGNMENT_CACHE_VERSION = 1


def split_words(text: str) -> list[tuple[int, int]]:
    """The character spans (start, end) of the words of `text` (see WORD_PATTERN)."""
    return [match.span() for match in WORD_PATTERN.finditer(text)]


def is_word(text: str) -> bool:
    """Whether a pre-tokenised word holds a letter or digit (punctuation is never aligned)."""
    return regex.search(r"\w", text) is not None


def word_token_spans(
    text: str, input_ids: list[int], offsets: list[tuple[int, int]], skip_ids: set[int], limit: int
) -> list[tuple[int, int]]:
    """The token span (start, end exclusive) of every word of `text`, or (-1, -1) for a word without its own token.

    A token belongs to the word its first character falls in (special tokens, empty offsets and the ids of `skip_ids`,
    such as XLM-R's stand-alone "▁", belong to none), so every token is in at most one word and a word's tokens are
    contiguous. Words with a token at or beyond `limit` (cut by truncation) get (-1, -1).
    """
    words = split_words(text)
    starts = [start for start, _ in words]
    spans = [[-1, -1] for _ in words]
    for position, ((start, end), token) in enumerate(zip(offsets, input_ids)):
        if start == end or token in skip_ids:
            continue
        index = bisect.bisect_right(starts, start) - 1
        if index < 0 or start >= words[index][1]:
            continue
        if spans[index][0] < 0:
            spans[index][0] = position
        spans[index][1] = position + 1
    return [(a, b) if 0 <= a and b <= limit else (-1, -1) for a, b in spans]


def links_to_token_spans(
    links: list[list[int]], src_spans: list[tuple[int, int]], tgt_spans: list[tuple[int, int]]
) -> list[list[int]]:
    """[English start, end, translation start, end] of every word link (i, j) whose two words both have tokens."""
    out = []
    for i, j in links:
        if i < len(src_spans) and j < len(tgt_spans) and src_spans[i][0] >= 0 and tgt_spans[j][0] >= 0:
            out.append([*src_spans[i], *tgt_spans[j]])
    return out


def _tokenize_with_offsets(tokenizer, texts: list[str]):
    try:
        return tokenizer(texts, add_special_tokens=True, truncation=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as err:
        raise ValueError(
            f"--alignment word maps words to sub-words through character offsets, which {type(tokenizer).__name__} "
            f"does not provide ({err}). Use a fast (tokenizers-backed) tokenizer."
        ) from err


def _tokenize_concatenated_pairs(tokenizer, src: list[str], tgt: list[str], max_length: int, space_id: int | None):
    """The English sentence and its translation as one sequence ([CLS] en [SEP] xx [SEP] / <s> en </s></s> xx </s>)."""
    encoded = tokenizer(src, tgt, truncation="longest_first", max_length=max_length)
    out = {"pair_input_ids": encoded["input_ids"]}
    if "token_type_ids" in encoded:
        out["pair_token_type_ids"] = encoded["token_type_ids"]
    if space_id is not None:
        keep = [[t != space_id for t in seq] for seq in out["pair_input_ids"]]
        out = {k: [[v for v, kept in zip(seq, mask) if kept] for seq, mask in zip(column, keep)]
               for k, column in out.items()}
    return out


def extract_word_links(
    src_texts: list[str], tgt_texts: list[str], aligner: str, cache_root: str | Path, desc: str = ""
) -> tuple[list[list[list[int]]], str]:
    """One-to-one word links (i, j) between the words of each English sentence and its translation, and their digest.

    The words (WORD_PATTERN) of the whole corpus are aligned in both directions by `aligner` (eflomal: an IBM-1 +
    HMM + fertility model sampled by Gibbs sampling, a faster successor of FastAlign) and the forward and reverse
    alignments are intersected, which keeps precise, one-to-one links (each direction links a word to at most one
    word of the other side). Links touching punctuation are dropped. Alignments are cached under `cache_root`, keyed
    by the aligner, its version and the texts, so the aligner runs once per corpus and a resumed run sees the same
    pairs (eflomal samples at random).
    """
    import eflomal  # noqa: F401  (checked here so a missing install fails before any work)

    version = importlib.metadata.version("eflomal")
    digest = hashlib.sha256(json.dumps([ALIGNMENT_CACHE_VERSION, aligner, version, WORD_PATTERN.pattern]).encode())
    for text in (*src_texts, "\u0000", *tgt_texts):
        digest.update(text.encode("utf-8") + b"\n")
    key = digest.hexdigest()[:24]
    path = Path(cache_root) / f"{aligner}-{key}.txt"
    src_words = [[text[a:b] for a, b in split_words(text)] for text in src_texts]
    tgt_words = [[text[a:b] for a, b in split_words(text)] for text in tgt_texts]
    if path.is_file():
        lines = path.read_text(encoding="utf-8").split("\n")[: len(src_texts)]
        logger.info("%s: word alignments read from the cache %s", desc, path)
    else:
        start = time.perf_counter()
        lines = _run_eflomal([" ".join(w) for w in src_words], [" ".join(w) for w in tgt_words])
        seconds = time.perf_counter() - start
        logger.info(
            "%s: eflomal aligned %d pairs in %.1f s (%.1f s per 10k pairs); cached in %s",
            desc, len(src_texts), seconds, seconds * 10_000 / max(1, len(src_texts)), path,
        )
        with atomic_writer(path) as f:
            f.write("\n".join(lines) + "\n")
    if len(lines) != len(src_texts):
        raise ValueError(f"{path}: {len(lines)} alignment lines for {len(src_texts)} pairs; delete the file to redo it.")
    links = []
    for line, src, tgt in zip(lines, src_words, tgt_words):
        pairs = [tuple(map(int, link.split("-"))) for link in line.split()]
        links.append([[i, j] for i, j in pairs if i < len(src) and j < len(tgt) and is_word(src[i]) and is_word(tgt[j])])
    return links, key


def _run_eflomal(src_lines: list[str], tgt_lines: list[str]) -> list[str]:
    """Intersection of eflomal's forward and reverse links, one Pharaoh line ("0-0 2-1") per pair."""
    import eflomal

    with tempfile.TemporaryDirectory(prefix="realign-eflomal-") as folder:
        forward, reverse = Path(folder) / "forward", Path(folder) / "reverse"
        eflomal.Aligner().align(src_lines, tgt_lines, links_filename_fwd=str(forward),
                                links_filename_rev=str(reverse), quiet=True)
        forward_lines = forward.read_text(encoding="utf-8").split("\n")[: len(src_lines)]
        reverse_lines = reverse.read_text(encoding="utf-8").split("\n")[: len(src_lines)]
    out = []
    for f_line, r_line in zip(forward_lines, reverse_lines):
        common = set(f_line.split()) & set(r_line.split())
        out.append(" ".join(sorted(common, key=lambda link: tuple(map(int, link.split("-"))))))
    return out


def add_word_links(raw: dict[str, Any], code: str, realign_args: RealignArguments, cache_dir: str | None) -> str:
    """Align a language's training and held-out pairs together (more text, better alignments) and add a `word_links`
    column to both; returns the alignments' digest."""
    parts = [raw["train"]] + ([raw["eval"]] if raw.get("eval") is not None else [])
    src = [text for part in parts for text in part["src"]]
    tgt = [text for part in parts for text in part["tgt"]]
    cache_root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "realign_word_alignments"
    links, key = extract_word_links(src, tgt, realign_args.aligner, cache_root, desc=code)
    feature = datasets.List(datasets.List(datasets.Value("int32")))
    raw["train"] = raw["train"].add_column("word_links", links[: len(raw["train"])], feature=feature)
    if raw.get("eval") is not None:
        raw["eval"] = raw["eval"].add_column("word_links", links[len(raw["train"]) :], feature=feature)
    n_links = sum(len(x) for x in links)
    logger.info("%s: %d word links, %.1f per pair", code, n_links, n_links / max(1, len(links)))
    return key


def build_datasets(
    codes: list[str],
    tokenizer,
    data_args: DataArguments,
    realign_args: RealignArguments,
    model_args: ModelArguments,
    seed: int,
    with_eval: bool,
) -> tuple[datasets.Dataset, datasets.Dataset | None, dict[str, dict[str, int]]]:
    """Tokenised training pairs of every language (with a `lang_id` column), held-out pairs, and per-language counts."""
    registry = lang_registry.load_registry()
    train_parts, eval_parts, stats = [], [], {}
    per_language_cap = data_args.max_pairs_per_language
    if data_args.max_train_samples is not None:
        even_share = max(1, data_args.max_train_samples // len(codes))
        per_language_cap = min(per_language_cap or even_share, even_share)
    for lang_id, code in enumerate(codes):
        language = registry.get(code)
        raw = load_parallel(language, data_args, model_args.cache_dir)
        if not with_eval:
            raw["eval"] = None
        digest = None
        if realign_args.alignment == "word":
            if per_language_cap is not None and len(raw["train"]) > per_language_cap:
                # Align only what will be used (eflomal's time grows with the corpus): the same random sample of the
                # whole corpus, drawn before filtering, so a language may end a few pairs short of the cap.
                raw["train"] = raw["train"].shuffle(seed=seed).select(range(per_language_cap))
            digest = add_word_links(raw, code, realign_args, model_args.cache_dir)
        train_ds, counts = tokenize_pairs(
            raw["train"], code, tokenizer, data_args, realign_args, model_args.cache_dir, f"{code} train",
            raw["train_files"], digest,
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
                raw["eval"], code, tokenizer, data_args, realign_args, model_args.cache_dir, f"{code} held-out",
                raw["eval_files"], digest,
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
            stream = stream[get_length_grouped_indices(self.lengths[stream].tolist(), self.batch_size, generator=generator)]
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
    since translations have similar lengths.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [f["src_input_ids"] for f in features] + [f["tgt_input_ids"] for f in features]
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        width = int(lengths.max())
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        attention_mask = np.arange(width)[None, :] < lengths[:, None]  # (2N, L)
        input_ids = np.full((len(sequences), width), self.pad_token_id, dtype=np.int64)
        input_ids[attention_mask] = np.concatenate(sequences)  # row-major: each row's tokens land left-aligned
        attention_mask = attention_mask.astype(np.int64)
        n_words = [f["src_n_words"] for f in features] + [f["tgt_n_words"] for f in features]
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "n_words": torch.tensor(n_words, dtype=torch.long),
            "lang_id": torch.tensor([f["lang_id"] for f in features], dtype=torch.long),
        }
        if "meaning_key" in features[0]:
            batch["meaning_key"] = torch.tensor([f["meaning_key"] for f in features], dtype=torch.long)
        return batch


@dataclass
class RealignCollator(PairCollator):
    """`PairCollator` plus the columns of the optional losses; used only when one of them is on.

    `word_spans` (P, 5): [pair index, English start, end, translation start, end] of every aligned word pair of the
    batch (--alignment word). `pair_input_ids`, `pair_attention_mask` (and `pair_token_type_ids` for BERT) (N, Lp):
    the concatenated pairs of the 'word' loss.
    """

    word_spans: bool = False
    pair_inputs: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        if self.word_spans:
            rows = [[index, *span] for index, f in enumerate(features) for span in f["word_spans"]]
            batch["word_spans"] = torch.tensor(rows, dtype=torch.long).reshape(-1, 5)
        if self.pair_inputs:
            sequences = [f["pair_input_ids"] for f in features]
            lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
            width = int(lengths.max())
            if self.pad_to_multiple_of:
                width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
            mask = np.arange(width)[None, :] < lengths[:, None]  # (N, Lp)
            input_ids = np.full((len(sequences), width), self.pad_token_id, dtype=np.int64)
            input_ids[mask] = np.concatenate(sequences)
            batch["pair_input_ids"] = torch.from_numpy(input_ids)
            batch["pair_attention_mask"] = torch.from_numpy(mask.astype(np.int64))
            if "pair_token_type_ids" in features[0]:
                token_types = np.zeros((len(sequences), width), dtype=np.int64)
                token_types[mask] = np.concatenate([f["pair_token_type_ids"] for f in features])
                batch["pair_token_type_ids"] = torch.from_numpy(token_types)
        return batch


# ----------------------------------------------------------------------------------------------------------------------
# Model and Trainer
# ----------------------------------------------------------------------------------------------------------------------


def load_encoder(model_args: ModelArguments, realign_args: RealignArguments) -> transformers.PreTrainedModel:
    """The encoder to realign, with the parameters that receive no gradient frozen and the optional head attached."""
    model = AutoModel.from_pretrained(
        model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    num_layers = model.config.num_hidden_layers
    if not -(num_layers + 1) <= realign_args.realign_layer <= num_layers:
        raise ValueError(
            f"--realign_layer {realign_args.realign_layer} is out of range: the model has {num_layers} layers "
            f"(hidden_states indices -{num_layers + 1} … {num_layers})."
        )
    # Parameters that never receive a gradient (pooler, layers above the aligned one) are frozen so that DDP does
    # not fail on unused parameters; their pre-trained values are saved unchanged for the downstream heads.
    weights = realign_args.weights
    frozen = [getattr(model, "pooler", None)]
    layer_index = realign_args.realign_layer % (num_layers + 1)
    encoder_layers = getattr(getattr(model, "encoder", None), "layer", None)
    if encoder_layers is not None and not weights["mlm"]:  # the MLM head reads the last layer
        frozen.extend(encoder_layers[layer_index:])
    if model_args.freeze_word_embeddings:
        frozen.append(model.get_input_embeddings())
    for module in frozen:
        if module is not None:
            module.requires_grad_(False)
    if weights["mlm"]:
        # Registered on the model so checkpoints carry it for resuming; stripped from the final save.
        model.realign_mlm_head = load_mlm_head(model, model_args)
        if model_args.freeze_word_embeddings:
            model.realign_mlm_head.requires_grad_(False)
    if realign_args.projection_head and weights["sentence"]:
        hidden = model.config.hidden_size
        # Registered on the model so checkpoints carry it for resuming; stripped from the final save.
        model.realign_projection = nn.Sequential(
            nn.Linear(hidden, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, 128, bias=False)
        )
    return model


def load_mlm_head(encoder: transformers.PreTrainedModel, model_args: ModelArguments) -> nn.Module:
    """The pre-trained MLM head of the encoder's `AutoModelForMaskedLM`, its decoder tied to `encoder`'s embeddings.

    The encoder itself stays the `AutoModel` already loaded: some MLM classes leave out parts of the encoder
    (BertForMaskedLM has no pooler), and the saved checkpoint must keep them for `AutoModelFor*` downstream. The head
    (BERT's `cls`, XLM-R's `lm_head`) is what the MLM model adds on top of its base model.
    """
    mlm_model, info = AutoModelForMaskedLM.from_pretrained(
        model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
        output_loading_info=True,
    )
    heads = {name: child for name, child in mlm_model.named_children() if name != mlm_model.base_model_prefix}
    if len(heads) != 1:
        raise ValueError(
            f"{type(mlm_model).__name__} has {len(heads)} modules besides its encoder ({', '.join(heads)}); the 'mlm' "
            "loss expects exactly one MLM head."
        )
    ((name, head),) = heads.items()
    missing = [key for key in info["missing_keys"] if key.startswith(f"{name}.")]
    if missing:
        logger.warning(
            "%s has no MLM head weights (%d missing, e.g. %s): the 'mlm' loss starts from a freshly initialised head. "
            "Realigned checkpoints keep no MLM head; start from the pre-trained model to keep its head.",
            model_args.model_name_or_path, len(missing), missing[0],
        )
    output = mlm_model.get_output_embeddings()
    if output is not None and output.weight is mlm_model.get_input_embeddings().weight:
        output.weight = encoder.get_input_embeddings().weight  # keep the pre-training tie, to the trained encoder
    return head


class RealignTrainer(Trainer):
    """A Trainer whose loss is `contrastive_alignment_loss` over pooled sentences of translation pairs.

    Batches come from `PairCollator`: `input_ids` (2N, L) with the English sides first, `n_words` (2N,), `lang_id`
    (N,). Besides the loss, training logs the in-batch retrieval accuracy and the mean positive / negative cosines;
    `evaluate()` adds per-language retrieval precision@1 on held-out pairs.

    With `--loss_weights` the loss is λ_S·L_S + λ_W·L_W + λ_M·L_M (companion paper, §4.2): L_S the contrastive loss
    above (over aligned word pairs with --alignment word, whose spans come from `RealignCollator`), L_W
    `word_bag_loss` and L_M `masked_lm_loss`; each active term is logged as `train_loss_{sentence,word,mlm}`.
    """

    # compute_loss returns a per-batch mean, not a sum normalised by num_items_in_batch: the Trainer must divide it
    # by the gradient-accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, realign_args: RealignArguments, language_codes: list[str], sampling_probs, **kwargs):
        super().__init__(*args, **kwargs)
        self.realign_args = realign_args
        self.language_codes = language_codes
        self.sampling_probs = sampling_probs
        tokenizer = self.processing_class
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.pooling_ids = pooling_special_ids(tokenizer)
        # Statistics stay detached tensors until logging: an .item() per step would make the GPU wait every step.
        self._train_stats: dict[str, list[torch.Tensor | float]] = defaultdict(list)
        self._unwrapped: tuple[Any, Any] = (None, None)
        self._special_ids_by_device: dict[tuple[torch.device, bool], torch.Tensor] = {}
        self._non_embedding_params: int | None = None
        self._final_save = False
        self.loss_weights = realign_args.weights
        if self.loss_weights["word"] or self.loss_weights["mlm"]:
            vocab_size = self.model.get_input_embeddings().weight.shape[0]
            # Vocabulary items that may be bag words, word-loss negatives or random MLM replacements.
            candidates = torch.ones(vocab_size, dtype=torch.bool)
            candidates[self.special_ids[self.special_ids < vocab_size]] = False
            self.candidate_ids = torch.nonzero(candidates).squeeze(1)
            self.vocab_size = vocab_size
            self.mask_token_id = tokenizer.mask_token_id

    # -- per-step helpers -------------------------------------------------------------------------------------------

    def unwrapped(self, model):
        """`accelerator.unwrap_model(model)`, looked up once per wrapper: accelerate checks the installed packages on
        every call, which cost more than the tiny model's whole loss."""
        if self._unwrapped[0] is not model:
            self._unwrapped = (model, self.accelerator.unwrap_model(model))
        return self._unwrapped[1]

    def special_ids_on(self, device: torch.device, pooling: bool = False) -> torch.Tensor:
        """The special token ids on `device` (with `pooling`, those that pooling leaves out: `pooling_special_ids`),
        copied there once rather than every step."""
        if (device, pooling) not in self._special_ids_by_device:
            self._special_ids_by_device[device, pooling] = (self.pooling_ids if pooling else self.special_ids).to(device)
        return self._special_ids_by_device[device, pooling]

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's estimate, 6 × tokens × non-embedding parameters, with the parameter count taken once rather
        than by walking every module each step."""
        if self._non_embedding_params is None:
            self._non_embedding_params = self.unwrapped(self.model).num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._non_embedding_params

    # -- representations --------------------------------------------------------------------------------------------

    def pool(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_words: torch.Tensor) -> torch.Tensor:
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
        """`pool` over one forward pass; `trim` first cuts the padding columns no row of these needs (one host sync)."""
        if trim:
            width = int(attention_mask.sum(dim=1).max())
            input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]  # right-padded rows
        hidden = layer_hidden_states(model, self.realign_args.realign_layer, input_ids, attention_mask)  # (B, L, d)
        if self.realign_args.pooling == "mean":
            mask = content_token_mask(input_ids, attention_mask, self.special_ids_on(input_ids.device, pooling=True))
        else:
            # Reference code: the first n_words positions, [CLS]/<s> included, whatever tokens they hold.
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]  # (1, L)
            mask = (positions < n_words[:, None]) & attention_mask.bool()
        return masked_mean_pool(hidden, mask)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = self.loss_weights
        if weights == DEFAULT_LOSS_WEIGHTS and self.realign_args.alignment == "sentence":
            return self.sentence_alignment_loss(model, inputs, return_outputs)  # the paper's loss, as it always was
        terms: dict[str, torch.Tensor] = {}
        if weights["sentence"]:
            if self.realign_args.alignment == "word":
                terms["sentence"] = self.word_alignment_loss(model, inputs)
            else:
                terms["sentence"] = self.sentence_alignment_loss(model, inputs)
        if weights["word"]:
            terms["word"] = self.bag_of_words_loss(model, inputs)
        if weights["mlm"]:
            terms["mlm"] = self.mlm_loss(model, inputs)
        loss = sum(term if weights[name] == 1 else weights[name] * term for name, term in terms.items())
        if model.training:
            for name, term in terms.items():
                self._train_stats[f"loss_{name}"].append(term.detach())
        return (loss, {}) if return_outputs else loss

    def word_alignment_loss(self, model, inputs) -> torch.Tensor:
        """`contrastive_alignment_loss` over the aligned words of the batch: each word pair is a positive, the other
        2P − 2 aligned words (both languages) are the negatives."""
        hidden = layer_hidden_states(model, self.realign_args.realign_layer, inputs["input_ids"], inputs["attention_mask"])
        n_pairs = inputs["input_ids"].shape[0] // 2
        src, tgt = word_pair_vectors(hidden, inputs["word_spans"], n_pairs, self.realign_args.word_pooling)  # (P, d)
        projection = getattr(self.unwrapped(model), "realign_projection", None)
        if projection is not None:
            src, tgt = projection(src), projection(tgt)  # (P, 128) each
        if len(src) == 0:
            # No aligned word in this batch: no signal, but every trainable parameter in the graph (DDP expects it).
            return (hidden.sum() + src.sum() + tgt.sum()) * 0.0
        keys = None
        if "meaning_key" in inputs:
            # Two translations of one English sentence align the same English word (same token span): one meaning.
            spans = inputs["word_spans"]
            keys = inputs["meaning_key"][spans[:, 0]] * 1_000_003 + spans[:, 1]  # (P,), int64 arithmetic wraps
        loss, stats = contrastive_alignment_loss(
            src, tgt, self.realign_args.temperature, meaning_keys=keys, same_meaning=self.realign_args.same_meaning
        )
        if model.training:
            for name, value in stats.items():
                self._train_stats[name].append(value)
            self._train_stats["aligned_words"].append(len(src))
            self._train_stats["negatives_per_query"].append(2 * len(src) - 2)
        return loss

    def bag_of_words_loss(self, model, inputs) -> torch.Tensor:
        """`word_bag_loss` on the concatenated pairs, q being the first position of the aligned layer."""
        extra = {"token_type_ids": inputs["pair_token_type_ids"]} if "pair_token_type_ids" in inputs else {}
        hidden = layer_hidden_states(
            model, self.realign_args.realign_layer, inputs["pair_input_ids"], inputs["pair_attention_mask"], **extra
        )  # (N, Lp, d)
        embeddings = self.unwrapped(model).get_input_embeddings().weight  # (V, d)
        candidates = self.candidate_ids.to(hidden.device)
        pair_ids = inputs["pair_input_ids"].masked_fill(inputs["pair_attention_mask"] == 0, -1)  # padding: no bag item
        loss, stats = word_bag_loss(
            hidden[:, 0], pair_ids, embeddings, candidates, self.realign_args.word_negatives, self.realign_args.temperature
        )
        if model.training:
            for name, value in stats.items():
                self._train_stats[name].append(value)
        return loss

    def mlm_loss(self, model, inputs) -> torch.Tensor:
        """`masked_lm_loss` on both sides of the pairs."""
        head = self.unwrapped(model).realign_mlm_head
        return masked_lm_loss(
            model, head, inputs["input_ids"], inputs["attention_mask"], self.special_ids_on(inputs["input_ids"].device),
            self.mask_token_id, self.vocab_size, self.realign_args.mlm_probability,
        )

    def sentence_alignment_loss(self, model, inputs, return_outputs: bool = False):
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
        loss, stats = contrastive_alignment_loss(
            src, tgt, self.realign_args.temperature, meaning_keys=keys, same_meaning=self.realign_args.same_meaning,
            **gathered,
        )
        if model.training:
            for name, value in stats.items():
                self._train_stats[name].append(value)
            pairs = len(gathered["all_src_embeddings"]) if gathered else len(src)
            self._train_stats["negatives_per_query"].append(2 * pairs - 2)
        return (loss, {"pooled": pooled}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._train_stats:
            for name, values in self._train_stats.items():
                mean = torch.stack(values).float().mean().item() if torch.is_tensor(values[0]) else np.mean(values)
                logs[f"train_{name}"] = round(float(mean), 4)
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
                "batch_size": self.args.train_batch_size * self.args.gradient_accumulation_steps,  # as transformers does
            }
        return LanguageMixingSampler(lang_ids, self.sampling_probs, num_samples, self.args.seed, **grouped)

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
                batch = self.data_collator(list(subset.select(range(start, min(len(subset), start + self.args.per_device_eval_batch_size)))))
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
        """Save the encoder alone (projection head dropped), loadable with `AutoModelFor*.from_pretrained`."""
        self._final_save = True
        try:
            self.save_model(output_dir, _internal_call=True)  # no upload from here: write_model_card uploads once
        finally:
            self._final_save = False

    def _issue_warnings_after_load(self, load_result) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if getattr(model, "realign_mlm_head", None) is not None:
            # Keys `_save` left out because they alias the embeddings are not missing: loading re-filled them.
            state = model.state_dict()
            aliases = set(state) - set(without_shared_aliases(state, MLM_HEAD_PREFIX))
            load_result = load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in aliases])
        super()._issue_warnings_after_load(load_result)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self._final_save:
            state_dict = state_dict if state_dict is not None else self.accelerator.unwrap_model(self.model).state_dict()
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIXES)}
        elif getattr(self.accelerator.unwrap_model(self.model), "realign_mlm_head", None) is not None:
            # The MLM head's decoder shares the embedding matrix: checkpoints store it once, resuming re-ties it.
            state_dict = state_dict if state_dict is not None else self.accelerator.unwrap_model(self.model).state_dict()
            state_dict = without_shared_aliases(state_dict, MLM_HEAD_PREFIX)
        super()._save(output_dir, state_dict=state_dict)

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


def check_loss_requirements(tokenizer, realign_args: RealignArguments) -> None:
    """Fail before any work when a requested loss cannot run: no mask token for 'mlm', no aligner installed."""
    if realign_args.weights["mlm"] and tokenizer.mask_token_id is None:
        raise ValueError(
            f"--loss_weights mlm={realign_args.weights['mlm']:g} needs a tokenizer with a mask token, and "
            f"{tokenizer.name_or_path} has none. Set mlm=0 or use the model's MLM tokenizer (--tokenizer_name)."
        )
    if realign_args.alignment == "word":
        try:
            import eflomal  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "--alignment word --aligner eflomal needs the eflomal package: pip install eflomal (it compiles a "
                "small C extension)."
            ) from err


def make_collator(tokenizer, realign_args: RealignArguments, pad_multiple: int | None) -> PairCollator:
    """`PairCollator` for the paper's loss; `RealignCollator` when word spans or concatenated pairs are needed."""
    word_spans, pair_inputs = realign_args.alignment == "word", realign_args.weights["word"] > 0
    if word_spans or pair_inputs:
        return RealignCollator(tokenizer.pad_token_id, pad_multiple, word_spans=word_spans, pair_inputs=pair_inputs)
    return PairCollator(tokenizer.pad_token_id, pad_multiple)


def without_shared_aliases(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`state_dict` without the keys under `prefix` whose tensor another (earlier) key already holds."""
    seen, kept = set(), {}
    for key, tensor in state_dict.items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key.startswith(prefix) and identity in seen:
            continue
        seen.add(identity)
        kept[key] = tensor
    return kept


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def parse_realign_args(argv: list[str] | None = None):
    model_args, data_args, realign_args, training_args = parse_args(
        (ModelArguments, DataArguments, RealignArguments, TrainingArguments), PAPER_TRAINING_DEFAULTS, argv,
        help_overrides={
            "train_sampling_strategy": "'random' (default): each pair's language is drawn as --language_sampling "
            "says, pairs shuffled within a language. 'group_by_length': the same draws, reordered so that a batch "
            "holds pairs of similar length (less padding; a batch's negatives then tend to share a length). The other "
            "values are refused."
        },
    )
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
    gathered = training_args.world_size if realign_args.gather_negatives else 1
    if (
        realign_args.alignment == "sentence"
        and realign_args.weights["sentence"]
        and (training_args.per_device_train_batch_size * gathered < 2)
    ):
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
    if training_args.ddp_find_unused_parameters is None and (realign_args.weights["mlm"] or realign_args.projection_head):
        # Heads used outside the encoder's forward (MLM, projection) would be taken for unused parameters and then
        # marked ready twice; load_encoder freezes every parameter that gets no gradient, so DDP need not look.
        training_args.ddp_find_unused_parameters = False
    return model_args, data_args, realign_args, training_args


def wants_eval(data_args: DataArguments, training_args: TrainingArguments) -> bool:
    """Held-out pairs are evaluated when they are given, unless evaluation is explicitly switched off."""
    has_data = data_args.eval_parallel_data_dir is not None or data_args.validation_pairs_per_language > 0
    return has_data or training_args.do_eval


def run_settings(model_args, data_args, realign_args, training_args, codes, subset_info) -> dict[str, Any]:
    """What determines the realigned checkpoint: a run in the same output_dir must match it exactly."""
    training_keys = (
        "seed", "max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size", "world_size",
        "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "bf16", "fp16",
        "train_sampling_strategy",
    )
    # --subset and --languages as typed are left out: `subset` and `languages` are what they resolve to.
    unrecorded = ("subset", "languages", "preprocessing_num_workers", "overwrite_cache")
    return {
        "model_name_or_path": model_args.model_name_or_path,
        "freeze_word_embeddings": model_args.freeze_word_embeddings,
        "subset": subset_info["name"],
        "languages": codes,
        **{f"data.{k}": v for k, v in asdict_public(data_args).items() if k not in unrecorded},
        **{f"loss.{k}": v for k, v in asdict_public(realign_args).items() if k != "length_buckets"},  # speed only
        **{f"training.{k}": getattr(training_args, k) for k in training_keys},
    }


def write_realign_config(trainer, settings, subset_info, pair_stats, train_metrics, eval_metrics) -> None:
    config = {
        "base_model": settings["model_name_or_path"],
        "subset": subset_info,
        "languages": settings["languages"],
        "pair_counts": pair_stats,
        "loss": {k.removeprefix("loss."): v for k, v in settings.items() if k.startswith("loss.")},
        "steps": trainer.state.global_step,
        "seed": settings["training.seed"],
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
    iso = list(dict.fromkeys(registry.get(c).iso639_1 or c for c in ["eng", *settings["languages"]]))
    loss = {k.removeprefix("loss."): v for k, v in settings.items() if k.startswith("loss.")}
    output_dir = Path(trainer.args.output_dir)
    trainer.create_model_card(
        language=iso,
        tags=["multilingual-realignment", "contrastive", f"subset-{subset_info['name']}"],
        finetuned_from=settings["model_name_or_path"],
        model_name=(trainer.args.hub_model_id or output_dir.name).split("/")[-1],
    )
    path = output_dir / "README.md"
    card = ModelCard.load(path)
    card.data.base_model = settings["model_name_or_path"]
    card.data.realignment = {
        "subset": subset_info["name"],
        "languages": list(settings["languages"]),
        "steps": trainer.state.global_step,
        "seed": settings["training.seed"],
        "loss": loss,
    }
    lines = [
        "",
        "## Realignment",
        "",
        f"- Base model: `{settings['model_name_or_path']}`",
        f"- Subset: `{subset_info['name']}` ({len(settings['languages'])} languages): {', '.join(settings['languages'])}",
        f"- Steps: {trainer.state.global_step}, seed {settings['training.seed']}",
        "- Loss: " + ", ".join(f"{k}={v}" for k, v in loss.items()),
    ]
    if eval_metrics.get("eval_avg_retrieval_acc") is not None:
        lines.append(f"- Held-out retrieval accuracy (mean of both directions): {eval_metrics['eval_avg_retrieval_acc']:.4f}")
        per_language = [
            f"| {code} | {eval_metrics[f'eval_{code}_retrieval_en2xx']:.4f} | {eval_metrics[f'eval_{code}_retrieval_xx2en']:.4f} |"
            for code in settings["languages"]
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
    model_args, data_args, realign_args, training_args = parse_realign_args(argv)
    setup_logging(training_args)
    logger.info("Realignment %s, data %s", realign_args, data_args)
    set_seed(training_args.seed)

    codes, subset_info = resolve_languages(data_args, training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    check_loss_requirements(tokenizer, realign_args)
    with training_args.main_process_first(desc="tokenising the parallel data"):
        train_dataset, eval_dataset, pair_stats = build_datasets(
            codes, tokenizer, data_args, realign_args, model_args, training_args.seed, wants_eval(data_args, training_args)
        )
    # Recorded once the data is known to be good, so that a run failing on its input leaves nothing behind.
    settings = run_settings(model_args, data_args, realign_args, training_args, codes, subset_info)
    check_settings(training_args.output_dir, settings, SETTINGS_FILE, training_args.should_save)
    last_checkpoint = detect_checkpoint(training_args)
    sizes = np.array([pair_stats[c]["used"] for c in codes])
    sampling_probs = language_probabilities(sizes, data_args.language_sampling, data_args.sampling_temperature)
    model = load_encoder(model_args, realign_args)
    pad_multiple = 8 if torch.cuda.is_available() and not training_args.use_cpu else None

    trainer = RealignTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=make_collator(tokenizer, realign_args, pad_multiple),
        realign_args=realign_args,
        language_codes=codes,
        sampling_probs=sampling_probs,
    )
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
