"""The companion paper's opt-in additions to realignment, kept out of `run_realign.py` so that it reads as the paper.

"Why Better Cross-Lingual Alignment Fails for Better Cross-Lingual Transfer" combines the contrastive alignment loss
with other terms, λ_A·L_align + λ_B·L_bow + λ_M·L_mlm (`--loss_weights align=…,bow=…,mlm=…`), and the paper's
Appendix A.2 aligns eflomal word pairs instead of averaged sentences (`--alignment word`). `ExtensionArguments`
holds their flags; `run_realign.py` builds one `RealignExtensions` from them and calls it at five places (where in
`run_realign.py` → `RealignExtensions` method: what it adds):

- `build_datasets`, per language → `prepare_language`: eflomal word links (`--alignment word`)
- `tokenize_pairs` → `token_columns`, `cache_key`: `word_spans`; the concatenated pairs of `bow`
- `PairCollator(extra_columns=...)` → `collate`: those columns as batch tensors
- `load_encoder` → `attach_heads`, `needs_last_layer`: the pre-trained MLM head of `mlm`
- `main`, into `RealignTrainer.loss_terms` → `loss_terms`: `(model, inputs) -> (loss, stats)` callables

To add a loss term: write the tensor function in `realign_losses.py`, add its weight name to `LOSS_TERMS`, return
its callable from `RealignExtensions.loss_terms`, and, if it needs batch columns, build them in `token_columns` and
stack them in `collate`. This module never imports `run_realign.py`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForMaskedLM

from realign_losses import (
    bag_of_words_loss,
    contrastive_alignment_loss,
    layer_hidden_states,
    masked_lm_loss,
    word_pair_vectors,
)
from realign_utils import pad_sequences
from word_alignment import ALIGNERS, add_word_links, links_to_token_spans, tokenize_with_offsets, word_token_spans

logger = logging.getLogger(__name__)

LOSS_TERMS = ("align", "bow", "mlm")
DEFAULT_LOSS_WEIGHTS = {"align": 1.0, "bow": 0.0, "mlm": 0.0}
# Names of earlier versions, still accepted with a warning: "sentence" also named the word-level alignment term, and
# "word" the bag-of-words term, which made both names say less than they meant.
LEGACY_TERM_NAMES = {"sentence": "align", "word": "bow"}
DEPRECATED_FLAGS = {"word_pooling": "subword_pooling", "word_negatives": "bow_negatives"}
MLM_HEAD_PREFIX = "realign_mlm_head."

# A loss term: (model, batch) → (scalar loss, detached statistics to log as train_{name}).
LossTerm = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class ExtensionArguments:
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
    subword_pooling: str = field(
        default="first",
        metadata={
            "help": "How --alignment word represents a word by its sub-words: 'first' (the first sub-word) or 'mean' "
            "(the mean of its sub-words)."
        },
    )
    loss_weights: str = field(
        default="align=1",
        metadata={
            "help": "Weights of the loss terms, as in the companion paper's λ_S·L_S + λ_W·L_W + λ_M·L_M: a comma list "
            "of align=…, bow=…, mlm=… (missing terms are 0; e.g. align=1,bow=0,mlm=1). 'align' is the contrastive "
            "alignment loss (over sentences, or over aligned words with --alignment word; the companion paper's "
            "L_S); 'bow' the companion paper's bag-of-words loss L_W against sampled vocabulary negatives; 'mlm' "
            "masked language modelling on both sides. The earlier names sentence= and word= are still accepted. "
            "Default: the paper's loss alone."
        },
    )
    bow_negatives: int = field(
        default=512,
        metadata={"help": "How many vocabulary negatives the 'bow' loss samples per batch (companion paper: 512)."},
    )
    mlm_probability: float = field(
        default=0.15,
        metadata={"help": "The share of text tokens the 'mlm' loss masks (BERT / XLM-R pre-training: 0.15)."},
    )
    word_pooling: str | None = field(
        default=None, metadata={"help": "Deprecated: the earlier name of --subword_pooling, which it sets."}
    )
    word_negatives: int | None = field(
        default=None, metadata={"help": "Deprecated: the earlier name of --bow_negatives, which it sets."}
    )

    def __post_init__(self):
        for old, new in DEPRECATED_FLAGS.items():
            if getattr(self, old) is not None:
                _deprecated(f"--{old} is deprecated; use --{new} (it takes the same values).")
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        if self.alignment not in ("sentence", "word"):
            raise ValueError(f"--alignment must be 'sentence' or 'word', got {self.alignment!r}.")
        if self.aligner not in ALIGNERS:
            raise ValueError(f"--aligner must be one of {', '.join(ALIGNERS)}, got {self.aligner!r}.")
        if self.subword_pooling not in ("first", "mean"):
            raise ValueError(f"--subword_pooling must be 'first' or 'mean', got {self.subword_pooling!r}.")
        self.loss_weights = format_loss_weights(parse_loss_weights(self.loss_weights))
        if self.bow_negatives < 1:
            raise ValueError("--bow_negatives must be at least 1 (the companion paper samples 512).")
        if not 0 < self.mlm_probability < 1:
            raise ValueError("--mlm_probability must be between 0 and 1 (BERT uses 0.15).")

    @property
    def weights(self) -> dict[str, float]:
        """The loss weights as a dict {align, bow, mlm}."""
        return parse_loss_weights(self.loss_weights)


def _deprecated(message: str) -> None:
    warnings.warn(message, FutureWarning, stacklevel=3)
    logger.warning(message)


def parse_loss_weights(spec: str) -> dict[str, float]:
    """Parse `align=1,bow=0,mlm=1` into {align, bow, mlm}; missing terms are 0, at least one must be positive."""
    weights = dict.fromkeys(LOSS_TERMS, 0.0)
    for item in spec.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if name in LEGACY_TERM_NAMES:
            _deprecated(f"--loss_weights {name}= is deprecated; write {LEGACY_TERM_NAMES[name]}= (the same term).")
            name = LEGACY_TERM_NAMES[name]
        if not sep or name not in LOSS_TERMS:
            raise ValueError(
                f"--loss_weights: expected term=weight with term one of {', '.join(LOSS_TERMS)}, got {item.strip()!r} "
                "(e.g. --loss_weights align=1,bow=0,mlm=1)."
            )
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(
                f"--loss_weights: the weight of {name} must be a number, got {value.strip()!r}."
            ) from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--loss_weights: the weight of {name} must be a non-negative number, got {weight}.")
        weights[name] = weight
    if not any(weights.values()):
        raise ValueError("--loss_weights: at least one of align, bow and mlm needs a positive weight.")
    return weights


def format_loss_weights(weights: dict[str, float]) -> str:
    """The canonical spelling of the weights (`align=1,bow=0,mlm=1`), recorded in the run's settings."""
    return ",".join(f"{name}={weights[name]:g}" for name in LOSS_TERMS)


class TiedOutputEmbedding(nn.Module):
    """An MLM head's output layer x ↦ x·Eᵀ + b that reads E from the encoder at each call.

    Pre-training ties the head's decoder to the input embeddings by sharing one parameter; a shared tensor would be
    saved twice in checkpoints (safetensors refuses it unless the model class declares the tie). Reading E from the
    encoder keeps the tie, during training and after resuming, with E stored once.
    """

    def __init__(self, embeddings: nn.Embedding, bias: torch.Tensor | None):
        super().__init__()
        self.embeddings = [embeddings]  # a list, so that the encoder's embeddings are not registered here as well
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embeddings[0].weight, self.bias)


class RealignExtensions:
    """The companion paper's loss terms and word-level alignment, switched on by `ExtensionArguments`.

    Args:
        args: the parsed flags.
        realign_layer: the `hidden_states` index that the alignment terms read.
        temperature: the temperature of every contrastive term (the companion paper uses one T for all).
        same_meaning: what word-level alignment does with two translations of one English word (see
            `contrastive_alignment_loss`).
    """

    def __init__(self, args: ExtensionArguments, realign_layer: int, temperature: float, same_meaning: str):
        self.args = args
        self.weights = args.weights
        self.realign_layer = realign_layer
        self.temperature = temperature
        self.same_meaning = same_meaning

    @property
    def word_alignment(self) -> bool:
        return self.args.alignment == "word"

    @property
    def pair_inputs(self) -> bool:
        """Whether batches carry each pair as one concatenated sequence (the 'bow' loss's input)."""
        return self.weights["bow"] > 0

    @property
    def needs_last_layer(self) -> bool:
        """Whether the layers above `realign_layer` take part (the MLM head reads the last layer)."""
        return self.weights["mlm"] > 0

    # -- data -------------------------------------------------------------------------------------------------------

    def prepare_language(self, raw: dict[str, Any], code: str, cache_dir: str | None, cap: int | None, seed: int):
        """Add eflomal word links to a language's raw pairs (--alignment word); returns their digest, else None.

        Only the pairs that will be used are aligned (eflomal's time grows with the corpus): the same random sample
        of the whole corpus as the cap draws later, taken before filtering, so a language may end a few pairs short.
        """
        if not self.word_alignment:
            return None
        if cap is not None and len(raw["train"]) > cap:
            raw["train"] = raw["train"].shuffle(seed=seed).select(range(cap))
        return add_word_links(raw, code, self.args.aligner, cache_dir)

    def cache_key(self, alignment_digest: str | None) -> list[str]:
        """What the extra columns depend on, for the tokenised-data cache key (empty on the paper's path)."""
        return (["word", str(alignment_digest)] if self.word_alignment else []) + (
            ["pairs"] if self.pair_inputs else []
        )

    def check_columns(self, column_names: list[str]) -> None:
        if self.word_alignment and "word_links" not in column_names:
            raise ValueError("--alignment word: the pairs carry no word alignments (call prepare_language first).")

    def token_columns(self, batch: dict[str, list], tokenizer, max_length: int, space_id: int | None) -> dict:
        """Extra columns of one tokenisation batch: `word_spans` and the concatenated `pair_input_ids`.

        Word spans are computed on the same token sequences as the core's `src_input_ids` / `tgt_input_ids`
        (stand-alone "▁" removed when `space_id` is given); words cut off by truncation to `max_length` get none.
        """
        out = {}
        if self.word_alignment:
            skip_ids = set(tokenizer.all_special_ids) | ({space_id} - {None})
            spans = {}
            for side in ("src", "tgt"):
                encoded = tokenize_with_offsets(tokenizer, batch[side])
                sequences, offsets = encoded["input_ids"], encoded["offset_mapping"]
                if space_id is not None:
                    offsets = [[o for o, t in zip(off, seq) if t != space_id] for off, seq in zip(offsets, sequences)]
                    sequences = [[t for t in seq if t != space_id] for seq in sequences]
                # The last kept position of a truncated sequence holds </s> / [SEP].
                spans[side] = [
                    word_token_spans(text, seq, off, skip_ids, len(seq) if len(seq) <= max_length else max_length - 1)
                    for text, seq, off in zip(batch[side], sequences, offsets)
                ]
            out["word_spans"] = [
                links_to_token_spans(links, src_spans, tgt_spans)
                for links, src_spans, tgt_spans in zip(batch["word_links"], spans["src"], spans["tgt"])
            ]
        if self.pair_inputs:
            # [CLS] en [SEP] xx [SEP] / <s> en </s></s> xx </s>, cut to twice the sentence limit.
            encoded = tokenizer(batch["src"], batch["tgt"], truncation="longest_first", max_length=2 * max_length)
            pair = {"pair_input_ids": encoded["input_ids"]}
            if "token_type_ids" in encoded:
                pair["pair_token_type_ids"] = encoded["token_type_ids"]
            if space_id is not None:
                keep = [[t != space_id for t in seq] for seq in pair["pair_input_ids"]]
                pair = {
                    name: [[v for v, kept in zip(seq, mask) if kept] for seq, mask in zip(column, keep)]
                    for name, column in pair.items()
                }
            out.update(pair)
        return out

    def collate(self, features: list[dict[str, Any]], batch: dict[str, torch.Tensor], pad_id: int, multiple) -> None:
        """`PairCollator`'s hook: `word_spans` (P, 5) = [pair index, English start, end, translation start, end] of
        every aligned word pair; `pair_input_ids`, `pair_attention_mask` (and `pair_token_type_ids`) (N, Lp)."""
        if self.word_alignment:
            rows = [[index, *span] for index, f in enumerate(features) for span in f["word_spans"]]
            batch["word_spans"] = torch.tensor(rows, dtype=torch.long).reshape(-1, 5)
        if self.pair_inputs:
            ids, mask = pad_sequences([f["pair_input_ids"] for f in features], pad_id, multiple)
            batch["pair_input_ids"], batch["pair_attention_mask"] = ids, mask
            if "pair_token_type_ids" in features[0]:
                types, _ = pad_sequences([f["pair_token_type_ids"] for f in features], 0, multiple)
                batch["pair_token_type_ids"] = types

    # -- model ------------------------------------------------------------------------------------------------------

    def check_requirements(self, tokenizer) -> None:
        """Fail before any work when a requested term cannot run: no mask token for 'mlm', no aligner installed."""
        if self.weights["mlm"] and tokenizer.mask_token_id is None:
            raise ValueError(
                f"--loss_weights mlm={self.weights['mlm']:g} needs a tokenizer with a mask token, and "
                f"{tokenizer.name_or_path} has none. Set mlm=0 or use the model's MLM tokenizer (--tokenizer_name)."
            )
        if self.word_alignment:
            try:
                import eflomal  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "--alignment word --aligner eflomal needs the eflomal package: pip install eflomal (it compiles a "
                    "small C extension)."
                ) from err

    def attach_heads(self, encoder: nn.Module, load_kwargs: dict[str, Any], freeze_word_embeddings: bool) -> None:
        """Register the pre-trained MLM head on `encoder` (as `realign_mlm_head`) when the 'mlm' term is on.

        Registered on the model so that checkpoints carry it for resuming; the saved encoder leaves it out.
        """
        if not self.weights["mlm"]:
            return
        encoder.realign_mlm_head = load_mlm_head(encoder, load_kwargs)
        if freeze_word_embeddings:
            encoder.realign_mlm_head.requires_grad_(False)

    # -- loss terms -------------------------------------------------------------------------------------------------

    def loss_terms(self, tokenizer, unwrap, special_ids_on) -> dict[str, tuple[float, LossTerm]]:
        """The active extra terms as {name: (weight, term)}; an 'align' entry replaces the sentence alignment term.

        `unwrap(model)` gives the bare encoder of a wrapped (DDP, DeepSpeed) model, `special_ids_on(device)` the
        tokenizer's special token ids on a device: the Trainer's cached lookups.
        """
        terms: dict[str, tuple[float, LossTerm]] = {}
        if self.word_alignment and self.weights["align"]:
            terms["align"] = (
                self.weights["align"],
                lambda model, inputs: self.word_alignment_loss(model, inputs, unwrap),
            )
        if self.weights["bow"] or self.weights["mlm"]:
            vocab_size = len(tokenizer)
            special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
            candidates = torch.ones(vocab_size, dtype=torch.bool)
            candidates[special[special < vocab_size]] = False
            # Vocabulary items that may be bag words, bag-of-words negatives or random MLM replacements.
            candidate_ids = torch.nonzero(candidates).squeeze(1)
        if self.weights["bow"]:
            terms["bow"] = (
                self.weights["bow"],
                lambda model, inputs: self.bag_of_words_loss(model, inputs, unwrap, candidate_ids),
            )
        if self.weights["mlm"]:
            mask_id = tokenizer.mask_token_id

            def mlm(model, inputs):
                ids = inputs["input_ids"]
                loss = masked_lm_loss(
                    model,
                    unwrap(model).realign_mlm_head,
                    ids,
                    inputs["attention_mask"],
                    special_ids_on(ids.device),
                    mask_id,
                    vocab_size,
                    self.args.mlm_probability,
                )
                return loss, {}

            terms["mlm"] = (self.weights["mlm"], mlm)
        return terms

    def word_alignment_loss(self, model, inputs, unwrap) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`contrastive_alignment_loss` over the aligned words of the batch: each word pair is a positive, the other
        aligned words (both languages) are the negatives."""
        hidden = layer_hidden_states(model, self.realign_layer, inputs["input_ids"], inputs["attention_mask"])
        n_pairs = inputs["input_ids"].shape[0] // 2
        spans = inputs["word_spans"]
        src, tgt = word_pair_vectors(hidden, spans, n_pairs, self.args.subword_pooling)  # (P, d) each
        projection = getattr(unwrap(model), "realign_projection", None)
        if projection is not None:
            src, tgt = projection(src), projection(tgt)  # (P, 128) each
        if len(src) == 0:
            # No aligned word in this batch: no signal, but every trainable parameter in the graph (DDP expects it).
            return (hidden.sum() + src.sum() + tgt.sum()) * 0.0, {}
        keys = None
        if "meaning_key" in inputs:
            # Two translations of one English sentence align the same English word (same token span): one meaning.
            keys = inputs["meaning_key"][spans[:, 0]] * 1_000_003 + spans[:, 1]  # (P,), int64 arithmetic wraps
        loss, stats = contrastive_alignment_loss(
            src, tgt, self.temperature, meaning_keys=keys, same_meaning=self.same_meaning
        )
        stats["aligned_words"] = torch.tensor(float(len(src)))
        stats["negatives_per_query"] = torch.tensor(float(2 * len(src) - 2))
        return loss, stats

    def bag_of_words_loss(self, model, inputs, unwrap, candidate_ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`bag_of_words_loss` on the concatenated pairs, q being the first position of the aligned layer."""
        extra = {"token_type_ids": inputs["pair_token_type_ids"]} if "pair_token_type_ids" in inputs else {}
        hidden = layer_hidden_states(
            model, self.realign_layer, inputs["pair_input_ids"], inputs["pair_attention_mask"], **extra
        )  # (N, Lp, d)
        embeddings = unwrap(model).get_input_embeddings().weight  # (V, d)
        pair_ids = inputs["pair_input_ids"].masked_fill(inputs["pair_attention_mask"] == 0, -1)  # padding: no bag item
        return bag_of_words_loss(
            hidden[:, 0],
            pair_ids,
            embeddings,
            candidate_ids.to(hidden.device),
            self.args.bow_negatives,
            self.temperature,
        )


def load_mlm_head(encoder: nn.Module, load_kwargs: dict[str, Any]) -> nn.Module:
    """The pre-trained MLM head of the encoder's `AutoModelForMaskedLM`, its output layer tied to `encoder`'s
    embeddings through `TiedOutputEmbedding`.

    The encoder itself stays the `AutoModel` already loaded: some MLM classes leave out parts of the encoder
    (BertForMaskedLM has no pooler), and the saved checkpoint must keep them for `AutoModelFor*` downstream. The head
    (BERT's `cls`, XLM-R's `lm_head`) is what the MLM model adds on top of its base model. `load_kwargs` are the
    `from_pretrained` arguments of the encoder (model path, cache_dir, revision, trust_remote_code).
    """
    mlm_model, info = AutoModelForMaskedLM.from_pretrained(**load_kwargs, output_loading_info=True)
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
            load_kwargs.get("pretrained_model_name_or_path"),
            len(missing),
            missing[0],
        )
    output = mlm_model.get_output_embeddings()
    if output is not None and output.weight is mlm_model.get_input_embeddings().weight:
        # Keep the pre-training tie, now to the encoder being trained, without sharing the parameter. The heads also
        # hold the output bias under a second name (BERT's predictions.bias, XLM-R's lm_head.bias): dropped too.
        tied = TiedOutputEmbedding(encoder.get_input_embeddings(), output.bias)
        for parent in list(head.modules()):
            for child_name, child in list(parent.named_children()):
                if child is output:
                    setattr(parent, child_name, tied)
            for parameter_name, parameter in list(parent.named_parameters(recurse=False)):
                if output.bias is not None and parameter is output.bias:
                    delattr(parent, parameter_name)
    return head
