#!/usr/bin/env python
"""Fine-tune an encoder on English XNLI (or SIB-200) and evaluate it zero-shot on every listed language and dataset.

One process, one fine-tune: English XNLI training, then accuracy per (source, language) on XNLI's 14 other
languages, AfriXNLI (16 African languages), AmericasNLI (10, out of distribution), IndoNLI (test_expert) and
Myanmar-XNLI, their macro averages in `all_results.json`, and one row per language in the results table.
`--task sib200` trains on English SIB-200 topic classification instead (the companion paper's sentence-level task)
and evaluates on SIB-200's other languages.

    python run_xnli.py --model_name_or_path out/xlmr-uriel20 --eval_languages paper --output_dir out/xnli-uriel20
    accelerate launch run_xnli.py --model_name_or_path xlm-roberta-base --eval_languages paper \
        --output_dir out/xnli-baseline --seed 23
    accelerate launch run_xnli.py --model_name_or_path out/xlmr-uriel20 --data_dir data/downstream \
        --eval_languages yor,swa,quy --output_dir out/xnli-local   # local files
    python run_xnli.py --task sib200 --model_name_or_path out/xlmr-uriel20 --eval_languages paper \
        --finetune_mode linear --output_dir out/sib200-uriel20
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from downstream_utils import (
    FINETUNE_TRAINING_KEYS,
    LOCAL_TABLE_EXTENSIONS,
    EvalSet,
    EvalTarget,
    MissingLocalSplit,
    append_downstream_results,
    check_checkpoint_labels,
    class_label_names,
    eval_configs,
    evaluate_languages,
    find_local_split,
    freeze_encoder,
    labels_to_training_ids,
    load_hub_split,
    log_skipped_local_splits,
    parse_revisions,
    read_local_table,
    require_columns,
    require_eval_sets,
    resolve_eval_languages,
    write_downstream_model_card,
)
from realign_utils import (
    ENGLISH,
    FINETUNE_SETTINGS_FILE,
    asdict_public,
    check_settings,
    detect_checkpoint,
    parse_args,
    save_metrics,
    setup_logging,
    train_unless_finished,
)

logger = logging.getLogger(__name__)

# The paper's downstream settings (A.6): lr 2e-5, batch 32, 2 epochs for NLI, linear decay after a 10 % warm-up (a
# float warmup_steps below 1 is a ratio in transformers 5), no model selection on target-language dev data.
PAPER_TRAINING_DEFAULTS = {
    "num_train_epochs": 2,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 32,
    "learning_rate": 2e-5,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
    "weight_decay": 0.0,
    "do_train": True,
    "do_eval": True,
    "save_steps": 2000,
    "save_total_limit": 2,
    "logging_steps": 50,
    "report_to": "none",
}

# XNLI's ClassLabel order, shared by AfriXNLI's integer labels (0/1/2); used only to read files holding bare
# integers. Evaluation labels are always matched to the training labels by name, never by position.
NLI_LABELS = ("entailment", "neutral", "contradiction")
# Myanmar-XNLI's main branch has been rewritten; this commit holds the test split with string labels.
MYXNLI_REVISION = "56b5468e589a550006cff24060de0bc9ca98c24a"
METRICS = ("accuracy",)


@dataclass(frozen=True)
class NLISource:
    """An NLI dataset: where it lives and what its text columns are called."""

    name: str  # key of metrics and results rows, the registry's `eval` key, and the --data_dir sub-folder
    hub_id: str
    text_columns: tuple[str, ...] = ("premise", "hypothesis")
    split: str = "test"  # the split every language is evaluated on
    parquet_branch: bool = False  # script-only repositories are read from refs/convert/parquet
    revision: str | None = None
    label_column: str = "label"
    label_renames: tuple[tuple[str, str], ...] = ()  # source label names -> the task's (after normalize_label_name)


# You can add a sentence-pair or sentence dataset here (then a Task in TASKS, and its languages in languages.yaml).
SOURCES = {
    "xnli": NLISource("xnli", "facebook/xnli"),
    "afrixnli": NLISource("afrixnli", "masakhane/afrixnli"),
    "americasnli": NLISource("americasnli", "nala-cub/americas_nli"),
    # IndoNLI's own JSON lines (github.com/ir-nlp-csui/indonli) write the labels as e / n / c.
    "indonli": NLISource(
        "indonli",
        "afaji/indonli",
        split="test_expert",
        parquet_branch=True,
        label_renames=(("e", "entailment"), ("n", "neutral"), ("c", "contradiction")),
    ),
    "myxnli": NLISource("myxnli", "akhtet/myanmar-xnli", ("sentence1_my", "sentence2_my"), revision=MYXNLI_REVISION),
}
TRAIN_SOURCE = "xnli"
# AfriXNLI also ships French (and English, which is the training language): the paper restricts it to its 16 African
# languages. Both can still be requested explicitly (keys eval_afrixnli_fra_accuracy, eval_afrixnli_eng_accuracy).
NOT_IN_PAPER = {"afrixnli": ("fra",)}

# SIB-200 (Adelani et al., 2024): FLORES-200 sentences labelled with one of 7 topics, a `category` STRING column. The
# label ids of this script follow this fixed order (the one the dataset card lists them in); files are matched to it
# by name (case-insensitive), never by position.
SIB200_LABELS = ("science/technology", "travel", "politics", "sports", "health", "entertainment", "geography")
SIB200_SOURCES = {"sib200": NLISource("sib200", "Davlan/sib200", ("text",), label_column="category")}
# The companion paper's sentence-classification languages (§4.4): de, es, fa, fr, hi, ja, kk, ko, ru.
SIB200_PAPER_LANGUAGES = ("deu", "spa", "fas", "fra", "hin", "jpn", "kaz", "kor", "rus")


@dataclass(frozen=True)
class Task:
    """A sequence-classification task: its evaluation sources, English training source and labels."""

    name: str  # --task, the `task` column of the results table
    sources: dict[str, NLISource]
    train_source: str
    labels: tuple[str, ...]  # the label order of files holding bare integers, and of SIB-200's ids
    text_columns: tuple[str, ...]  # what every source's text columns are renamed to
    paper: dict[str, tuple[str, ...]]  # per source: the languages of `--eval_languages paper`, when not the registry's


TASKS = {
    "nli": Task("nli", SOURCES, TRAIN_SOURCE, NLI_LABELS, ("premise", "hypothesis"), {}),
    "sib200": Task("sib200", SIB200_SOURCES, "sib200", SIB200_LABELS, ("text",), {"sib200": SIB200_PAPER_LANGUAGES}),
}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={
            "help": "The encoder to fine-tune: a Hub model id (xlm-roberta-base) or a local (realigned) checkpoint."
        }
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "The tokenizer to use, if it differs from --model_name_or_path."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store the models and datasets downloaded from the Hub."}
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
    finetune_mode: str = field(
        default="full",
        metadata={
            "help": "'full' fine-tunes the whole model (the paper); 'linear' freezes the encoder and trains the "
            "classification head only (a linear probe)."
        },
    )

    def __post_init__(self):
        if self.finetune_mode not in ("full", "linear"):
            raise ValueError(f"--finetune_mode must be 'full' or 'linear', got {self.finetune_mode!r}.")


@dataclass
class DataArguments:
    task: str = field(
        default="nli",
        metadata={
            "help": "'nli': English XNLI training, zero-shot on the NLI sources (the paper). 'sib200': English "
            "SIB-200 topic classification (Davlan/sib200, 7 topics, the companion paper's sentence-level task), "
            "zero-shot on SIB-200's other languages; labels in the fixed order "
            + ", ".join(SIB200_LABELS)
            + ", matched by name."
        },
    )
    eval_languages: str = field(
        default="paper",
        metadata={
            "help": "The languages to evaluate zero-shot: 'paper' (the paper's 42: XNLI 14, AfriXNLI 16, "
            "AmericasNLI 10, IndoNLI ind, Myanmar-XNLI mya; with --task sib200 the companion paper's 9: deu spa fas "
            "fra hin jpn kaz kor rus), a subset YAML or name (uriel_20), 'all' (the 65 "
            "realignment languages) or a comma list of codes (yor,swa,quy). A language is evaluated on every source "
            "that has it; languages without data are skipped with a warning. English, the training language, is "
            "always evaluated in-language. Metrics are named eval_{source}_{language}_accuracy (e.g. "
            "eval_xnli_swa_accuracy, eval_afrixnli_swa_accuracy, eval_xnli_eng_accuracy) with the canonical ISO "
            "639-3 code; eval_avg_accuracy is the unweighted mean over every evaluated (source, language) except "
            "English, and eval_avg_{source}_accuracy the mean within one source."
        },
    )
    eval_sources: str | None = field(
        default=None,
        metadata={
            "help": "A comma list restricting evaluation to some sources: xnli, afrixnli, americasnli, indonli, "
            "myxnli (--task sib200: sib200). Default: all of them."
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Read every dataset from local files instead of the Hub (there is no fallback either way). "
            "Layout: DIR/<source>/<config>/<split>.<ext>, with the source key (xnli, afrixnli, americasnli, indonli, "
            "myxnli), the Hub config (en, sw, swa, quy, indonli, default) and split (train for English; test, or "
            "test_expert for IndoNLI), e.g. DIR/xnli/sw/test.parquet, DIR/afrixnli/swa/test.tsv, "
            "DIR/myxnli/default/test.jsonl or DIR/indonli/indonli/test_expert/0000.parquet (a parquet-branch folder). "
            "Formats: .parquet, .jsonl, .json or .tsv (header line) with the Hub's columns (premise, hypothesis, "
            "label; Myanmar-XNLI: sentence1_my, sentence2_my, label); labels as ClassLabel ids, names (entailment, "
            "neutral, contradiction; case-insensitive; IndoNLI's own e, n, c too) or integers 0/1/2 in that order. "
            "SIB-200: DIR/sib200/<config>/<split>.tsv (e.g. DIR/sib200/eng_Latn/train.tsv, "
            "DIR/sib200/yor_Latn/test.tsv) with the Hub's columns index_id, category, text. A (source, language) "
            "whose file is absent is skipped with one warning listing them all; a file that is there but malformed is "
            "an error."
        },
    )
    dataset_revisions: str | None = field(
        default=None,
        metadata={
            "help": "Pin dataset versions: a comma list of source=revision (Hub commits). myxnli is pinned to "
            f"{MYXNLI_REVISION[:10]}… by default; indonli reads refs/convert/parquet unless pinned."
        },
    )
    max_seq_length: int = field(
        default=200,
        metadata={
            "help": "The maximum number of tokens of a training pair, special tokens included (paper: 200; the "
            "reference code trains at 96)."
        },
    )
    eval_max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": "The maximum number of tokens of an evaluation pair (default: --max_seq_length). The reference "
            "code evaluates at 128 or 256 while training at 96."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "For debugging: keep only the first this many English training pairs."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "For debugging: keep only the first this many pairs of every language."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "The number of processes used to tokenise."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Whether to tokenise again instead of reusing the cache."}
    )
    results_file: str = field(
        default="results/results.csv",
        metadata={
            "help": "The results table to append one row per (source, language) to (columns: "
            "realign_utils.RESULTS_COLUMNS). 'none' writes no rows."
        },
    )

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}.")
        sources = TASKS[self.task].sources
        if self.eval_sources is not None:
            unknown = sorted(set(self.eval_source_list) - set(sources))
            if unknown or not self.eval_source_list:
                raise ValueError(
                    f"--eval_sources {self.eval_sources!r}: unknown source(s) {unknown}; the {self.task.upper()} "
                    f"sources are {', '.join(sources)}."
                )
        self.revisions = {name: s.revision for name, s in sources.items() if s.revision}
        self.revisions.update(parse_revisions(self.dataset_revisions, list(sources)))
        for name in ("max_seq_length", "eval_max_seq_length"):
            value = getattr(self, name)
            if value is not None and value < 3:
                raise ValueError(f"--{name} must leave room for special tokens and text (at least 3).")
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ValueError(f"--data_dir {self.data_dir} is not a folder.")

    @property
    def eval_source_list(self) -> list[str]:
        return [s.strip() for s in (self.eval_sources or "").split(",") if s.strip()]

    @property
    def task_spec(self) -> Task:
        return TASKS[self.task]


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def paper_languages(source: str, task: Task | None = None) -> list[str]:
    """The languages the paper evaluates on `source` (English excluded: it is the training language)."""
    excluded = {ENGLISH, *NOT_IN_PAPER.get(source, ())}
    listed = (task or TASKS["nli"]).paper.get(source)
    configs = eval_configs(source)
    return [code for code in (listed or configs) if code not in excluded and code in configs]


def resolve_targets(data_args: DataArguments, seed: int) -> list[EvalTarget]:
    """English (in-language, on the training source) first, then every requested (source, language)."""
    task = data_args.task_spec
    english = EvalTarget(task.train_source, ENGLISH, eval_configs(task.train_source)[ENGLISH])
    sources = task.sources
    wanted = [n for n in sources if n in data_args.eval_source_list] if data_args.eval_sources else list(sources)
    available = {n: eval_configs(n) for n in wanted}
    paper = {n: paper_languages(n, task) for n in wanted}
    targets = [english]
    for target in resolve_eval_languages(data_args.eval_languages, available, paper, seed):
        if target not in targets:
            targets.append(target)
    counts = {n: sum(t.source == n and t.language != ENGLISH for t in targets) for n in wanted}
    logger.info(
        "Evaluating %d (source, language) entries plus English: %s",
        len(targets) - 1,
        ", ".join(f"{n} {c}" for n, c in counts.items()),
    )
    return targets


def load_split(source: NLISource, config: str, split: str, data_args, cache_dir) -> tuple[datasets.Dataset, str]:
    """One split of one source, from --data_dir or the Hub (never one for the other), and where it came from.

    Text columns are renamed to the task's (premise/hypothesis for NLI, text for SIB-200) and the label column to
    `label`.
    """
    if data_args.data_dir is not None:
        path = find_local_split(data_args.data_dir, source.name, config, split, (*LOCAL_TABLE_EXTENSIONS, ".tsv"))
        dataset, origin = read_local_table(path, cache_dir), str(path)
    else:
        revision = data_args.revisions.get(source.name)
        dataset = load_hub_split(
            source.hub_id, config, split, parquet_branch=source.parquet_branch, revision=revision, cache_dir=cache_dir
        )
        origin = f"{source.hub_id} {config}/{split}"
    require_columns(
        dataset,
        (*source.text_columns, source.label_column),
        origin,
        f"{source.name} data needs the columns of {source.hub_id}: {', '.join(source.text_columns)} and "
        f"{source.label_column}.",
    )
    if len(dataset) == 0:
        raise ValueError(f"{origin} holds no examples.")
    columns = ("premise", "hypothesis") if len(source.text_columns) == 2 else ("text",)
    dataset = dataset.select_columns([*source.text_columns, source.label_column])
    dataset = dataset.rename_columns(
        {old: new for old, new in zip((*source.text_columns, source.label_column), (*columns, "label")) if old != new}
    )
    empty = {c: dataset.data.column(c).null_count for c in columns}
    if any(empty.values()):
        logger.warning("%s: %s null text value(s), read as empty strings.", origin, empty)
        dataset = dataset.map(
            lambda batch: {c: [text or "" for text in batch[c]] for c in columns},
            batched=True,
            desc=f"Filling null texts of {origin}",
        )
    return dataset, origin


def normalize_label_name(name: str) -> str:
    """String labels (Myanmar-XNLI) are matched case- and space-insensitively: 'Entailment ' is entailment."""
    return name.strip().lower()


def load_training_data(data_args: DataArguments, model_args: ModelArguments, do_train: bool):
    """The English training examples (None when not training) and the label list, in the training data's order
    (NLI: XNLI's ClassLabel order; SIB-200: the fixed `SIB200_LABELS` order, its labels being strings)."""
    task = data_args.task_spec
    source = task.sources[task.train_source]
    config = eval_configs(task.train_source)[ENGLISH]
    dataset, origin = load_split(
        source, config, "train" if do_train else source.split, data_args, model_args.cache_dir
    )
    if task.name == "nli":
        label_list = class_label_names(dataset.features["label"]) or list(NLI_LABELS)
    else:
        label_list = list(task.labels)
    logger.info("Labels from %s: %s", origin, label_list)
    if not do_train:
        return None, label_list
    dataset = labels_to_training_ids(
        dataset, "label", label_list, origin=origin, declared_names=task.labels, normalize=normalize_label_name
    )
    if data_args.max_train_samples is not None:
        dataset = dataset.select(range(min(len(dataset), data_args.max_train_samples)))
    return EvalSet(task.train_source, ENGLISH, dataset, origin), label_list


def load_eval_data(targets, label_list, data_args: DataArguments, model_args: ModelArguments) -> list[EvalSet]:
    """The raw evaluation pairs of every target, labels rewritten as training label ids (matched by name).

    With --data_dir, a target whose file is absent is skipped (one warning lists them all); a file that exists but
    cannot be read is an error, and so is a run left with nothing to evaluate.
    """
    eval_sets, skipped = [], []
    task = data_args.task_spec
    for target in targets:
        source = task.sources[target.source]
        try:
            dataset, origin = load_split(source, target.config, source.split, data_args, model_args.cache_dir)
        except MissingLocalSplit as err:
            skipped.append((target, err))
            continue
        dataset = labels_to_training_ids(
            dataset,
            "label",
            label_list,
            origin=origin,
            declared_names=task.labels,
            renames=dict(source.label_renames),
            normalize=normalize_label_name,
        )
        if data_args.max_eval_samples is not None:
            dataset = dataset.select(range(min(len(dataset), data_args.max_eval_samples)))
        eval_sets.append(EvalSet(target.source, target.language, dataset, origin))
    log_skipped_local_splits(skipped, data_args.data_dir)
    require_eval_sets(eval_sets, skipped, data_args.data_dir)
    return eval_sets


def tokenize_pairs(examples, tokenizer, max_length: int) -> dict[str, Any]:
    """Tokenise premise/hypothesis pairs (the longer side is cut first), or single texts, and keep the label ids."""
    if "text" in examples:
        tokenized = tokenizer(examples["text"], truncation=True, max_length=max_length)
    else:
        tokenized = tokenizer(examples["premise"], examples["hypothesis"], truncation=True, max_length=max_length)
    tokenized["labels"] = examples["label"]
    return tokenized


def tokenize_set(eval_set: EvalSet, tokenizer, max_length: int, data_args: DataArguments) -> EvalSet:
    dataset = eval_set.dataset.map(
        tokenize_pairs,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        num_proc=data_args.preprocessing_num_workers,
        remove_columns=eval_set.dataset.column_names,
        load_from_cache_file=not data_args.overwrite_cache,
        desc=f"Tokenizing {eval_set.source} {eval_set.language}",
    )
    return EvalSet(eval_set.source, eval_set.language, dataset, eval_set.origin)


# ---------------------------------------------------------------------------------------------------------------------
# Model and metrics
# ---------------------------------------------------------------------------------------------------------------------


def load_tokenizer_and_model(model_args: ModelArguments, label_list: list[str], task: str = "nli"):
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    check_checkpoint_labels(config, label_list, model_args.model_name_or_path)
    config.num_labels = len(label_list)
    config.id2label = dict(enumerate(label_list))
    config.label2id = {label: i for i, label in enumerate(label_list)}
    config.finetuning_task = "xnli" if task == "nli" else task
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    if model_args.finetune_mode == "linear":
        freeze_encoder(model)
    return tokenizer, model


# You can change the metric here; evaluate_languages (downstream_utils.py) applies it to every language.
def compute_metrics(eval_pred) -> dict[str, float]:
    """Accuracy of the predicted classes (already arg-maxed by `argmax_logits`)."""
    predictions, labels = eval_pred.predictions, eval_pred.label_ids  # (N,) each
    return {"accuracy": float((np.asarray(predictions) == np.asarray(labels)).mean())}


def argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the predicted class ids, so the Trainer gathers (N,) integers instead of (N, 3) logits."""
    return logits.argmax(dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def parse_xnli_args(argv: list[str] | None = None):
    model_args, data_args, training_args = parse_args(
        (ModelArguments, DataArguments, TrainingArguments), PAPER_TRAINING_DEFAULTS, argv
    )
    if training_args.eval_strategy != "no":
        raise ValueError(
            "--eval_strategy must stay 'no': the paper selects no model on target-language dev data; every language "
            "is evaluated once, after training."
        )
    return model_args, data_args, training_args


def run_settings(model_args, data_args, training_args) -> dict[str, Any]:
    """What determines the fine-tuned model: a run resumed in the same output_dir must match it exactly."""
    data_keys = ("data_dir", "dataset_revisions", "max_seq_length", "max_train_samples")
    return {
        "model_name_or_path": model_args.model_name_or_path,
        "finetune_mode": model_args.finetune_mode,
        "data.task": data_args.task,
        **{f"data.{k}": v for k, v in asdict_public(data_args).items() if k in data_keys},
        **{f"training.{k}": getattr(training_args, k) for k in FINETUNE_TRAINING_KEYS},
    }


def write_model_card(trainer, data_args, model_args, targets, metrics: dict[str, float]) -> None:
    """The model card (and, with --push_to_hub, the upload) of the fine-tuned model, with its zero-shot scores."""
    write_downstream_model_card(
        trainer,
        finetuned_from=model_args.model_name_or_path,
        task_tag="text-classification",
        dataset_ids=[s.hub_id for s in data_args.task_spec.sources.values()],
        languages=[t.language for t in targets],
        tags=[data_args.task, f"finetune-{model_args.finetune_mode}"],
        metrics=metrics,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_xnli_args(argv)
    setup_logging(training_args)
    logger.info("%s: %s; model %s", data_args.task.upper(), data_args, model_args)
    set_seed(training_args.seed)

    targets = resolve_targets(data_args, training_args.seed)
    with training_args.main_process_first(desc="reading the datasets"):
        raw_train, label_list = load_training_data(data_args, model_args, training_args.do_train)
        raw_evals = load_eval_data(targets, label_list, data_args, model_args) if training_args.do_eval else []
    tokenizer, model = load_tokenizer_and_model(model_args, label_list, data_args.task)
    eval_length = data_args.eval_max_seq_length or data_args.max_seq_length
    with training_args.main_process_first(desc="tokenising the datasets"):
        train_set = tokenize_set(raw_train, tokenizer, data_args.max_seq_length, data_args) if raw_train else None
        eval_sets = [tokenize_set(raw, tokenizer, eval_length, data_args) for raw in raw_evals]
    # Recorded once the data is known to be good, so that a run failing on its input leaves nothing behind.
    settings = run_settings(model_args, data_args, training_args)
    check_settings(training_args.output_dir, settings, FINETUNE_SETTINGS_FILE, training_args.should_save)
    last_checkpoint = detect_checkpoint(training_args)

    pad_multiple = 8 if torch.cuda.is_available() and not training_args.use_cpu else None
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set.dataset if train_set else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple),
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=argmax_logits,
    )
    metrics: dict[str, float] = {}
    if training_args.do_train:
        metrics = dict(train_unless_finished(trainer, last_checkpoint), train_samples=len(train_set.dataset))
        trainer.log_metrics("train", metrics)
        save_metrics(trainer, "train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        eval_metrics, entries = evaluate_languages(trainer, eval_sets, METRICS)
        trainer.log_metrics("eval", eval_metrics)
        save_metrics(trainer, "eval", eval_metrics)
        metrics.update(eval_metrics)
        if trainer.is_world_process_zero() and data_args.results_file.lower() not in ("", "none"):
            append_downstream_results(
                data_args.results_file,
                entries,
                METRICS,
                task=data_args.task,
                model_name_or_path=model_args.model_name_or_path,
                seed=training_args.seed,
                run_dir=training_args.output_dir,
            )
    if training_args.do_train:
        write_model_card(trainer, data_args, model_args, targets, metrics)
    return metrics


if __name__ == "__main__":
    main()
