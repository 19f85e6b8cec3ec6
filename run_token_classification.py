#!/usr/bin/env python
"""Fine-tune an encoder for POS tagging or NER on English and evaluate it zero-shot on every listed language.

One process, one fine-tune: English UDPOS (POS) or WikiANN (NER), then a score per (source, language) on XTREME-R
UDPOS + MasakhaPOS or WikiANN + MasakhaNER 2.0, their macro averages in `all_results.json`, and one row per
(language, metric) in the results table.

    python run_token_classification.py --task pos --model_name_or_path out/xlmr-uriel20 --eval_languages paper \
        --output_dir out/pos-uriel20 --seed 17
    accelerate launch run_token_classification.py --task ner --model_name_or_path xlm-roberta-base \
        --eval_languages paper --output_dir out/ner-baseline
    accelerate launch run_token_classification.py --task pos --model_name_or_path out/xlmr-uriel20 \
        --data_dir data/downstream --eval_languages yor,wol,fra --output_dir out/pos-local   # local files
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    Trainer,
    TrainingArguments,
    set_seed,
)

import lang_registry
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
    require_equal_lengths,
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
    read_text_lines,
    save_metrics,
    setup_logging,
    train_unless_finished,
)

logger = logging.getLogger(__name__)

# The paper's downstream settings (A.6): lr 2e-5, batch 32, 5 epochs for POS and NER, linear decay after a 10 %
# warm-up (a float warmup_steps below 1 is a ratio in transformers 5), no model selection on target-language dev data.
PAPER_TRAINING_DEFAULTS = {
    "num_train_epochs": 5,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 32,
    "learning_rate": 2e-5,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
    "weight_decay": 0.0,
    "do_train": True,
    "do_eval": True,
    "save_steps": 1000,
    "save_total_limit": 2,
    "logging_steps": 50,
    "report_to": "none",
}

# Label orders as the Hub datasets store them (ClassLabel names); used only to read files holding bare integers.
# Evaluation labels are always matched to the training labels by name, never by position.
UDPOS_TAGS = (
    "ADJ",
    "ADP",
    "ADV",
    "AUX",
    "CCONJ",
    "DET",
    "INTJ",
    "NOUN",
    "NUM",
    "PART",
    "PRON",
    "PROPN",
    "PUNCT",
    "SCONJ",
    "SYM",
    "VERB",
    "X",
)
MASAKHAPOS_TAGS = (
    "NOUN",
    "PUNCT",
    "ADP",
    "NUM",
    "SYM",
    "SCONJ",
    "ADJ",
    "PART",
    "DET",
    "CCONJ",
    "PROPN",
    "PRON",
    "X",
    "ADV",
    "INTJ",
    "VERB",
    "AUX",
)
WIKIANN_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
MASAKHANER_TAGS = (*WIKIANN_TAGS, "B-DATE", "I-DATE")
# google/xtreme names its UDPOS configs udpos.<LanguageName> (33 languages; XTREME-R adds lt, pl, ro, uk and wo).
XTREME_UDPOS_LANGUAGES = (
    "Afrikaans",
    "Arabic",
    "Basque",
    "Bulgarian",
    "Chinese",
    "Dutch",
    "English",
    "Estonian",
    "Finnish",
    "French",
    "German",
    "Greek",
    "Hebrew",
    "Hindi",
    "Hungarian",
    "Indonesian",
    "Italian",
    "Japanese",
    "Kazakh",
    "Korean",
    "Marathi",
    "Persian",
    "Portuguese",
    "Russian",
    "Spanish",
    "Tagalog",
    "Tamil",
    "Telugu",
    "Thai",
    "Turkish",
    "Urdu",
    "Vietnamese",
    "Yoruba",
)
MASAKHAPOS_RAW_URL = (
    "https://raw.githubusercontent.com/masakhane-io/masakhane-pos/{revision}/data/{config}/{split}.txt"
)


@dataclass(frozen=True)
class TaggingSource:
    """A token-classification dataset: where it lives, its columns and how its labels are named."""

    name: str  # key of metrics and results rows, and the --data_dir sub-folder
    hub_id: str
    label_column: str
    label_names: tuple[str, ...]  # the Hub's label order, for files that store bare integers
    registry_resource: str | None  # the registry's `eval` key giving each language's config
    split: str = "test"  # the split every language is evaluated on
    loader: str = "hub"  # hub: load_dataset; parquet_branch: refs/convert/parquet; github_raw: the raw text files
    raw_format: str | None = None  # extra local format: conllu (UD) or txt (one "token TAG" per line)
    label_renames: tuple[tuple[str, str], ...] = ()


# You can add a tagging dataset here (then list it in TASK_SOURCES and give its languages in languages.yaml).
SOURCES = {
    "udpos": TaggingSource("udpos", "izhx/xtreme-r-udpos", "pos_tags", UDPOS_TAGS, "udpos", raw_format="conllu"),
    "xtreme_udpos": TaggingSource("xtreme_udpos", "google/xtreme", "pos_tags", UDPOS_TAGS, None, raw_format="conllu"),
    # masakhane/masakhapos is a loading script without a parquet branch: read the raw files the script points at.
    "masakhapos": TaggingSource(
        "masakhapos",
        "masakhane/masakhapos",
        "upos",
        MASAKHAPOS_TAGS,
        "masakhapos",
        loader="github_raw",
        raw_format="txt",
    ),
    "wikiann": TaggingSource("wikiann", "unimelb-nlp/wikiann", "ner_tags", WIKIANN_TAGS, "wikiann"),
    # MasakhaNER 2.0 has DATE entities that WikiANN lacks; the reference code maps them to O.
    "masakhaner": TaggingSource(
        "masakhaner",
        "masakhane/masakhaner2",
        "ner_tags",
        MASAKHANER_TAGS,
        "masakhaner",
        loader="parquet_branch",
        raw_format="txt",
        label_renames=(("B-DATE", "O"), ("I-DATE", "O")),
    ),
}
TASK_METRICS = {"pos": ("accuracy",), "ner": ("f1", "precision", "recall")}
# Evaluation sources per task; POS trains and evaluates on the first one (XTREME-R UDPOS, or google/xtreme's with
# --udpos_dataset xtreme), NER on WikiANN.
TASK_SOURCES = {"pos": ("udpos", "masakhapos"), "ner": ("wikiann", "masakhaner")}
# The paper (REF) evaluates WikiANN on the XTREME-R NER set, 47 languages; the registry lists every WikiANN config.
NOT_IN_PAPER = {"wikiann": ("amh", "ibo", "kin", "lin", "aym", "grn")}


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
        metadata={
            "help": "'pos': train on English UDPOS, evaluate on XTREME-R UDPOS and MasakhaPOS (token accuracy over "
            "first sub-words). 'ner': train on English WikiANN, evaluate on WikiANN and MasakhaNER 2.0 (seqeval "
            "entity F1, precision and recall in strict IOB2 mode, after turning every I-X that does not continue an "
            "X entity into B-X in gold and predicted tags, as the reference code does; MasakhaNER's B-DATE and "
            "I-DATE become O)."
        }
    )
    eval_languages: str = field(
        default="paper",
        metadata={
            "help": "The languages to evaluate zero-shot: 'paper' (every language the paper evaluates for the task: "
            "POS 37 UDPOS + 20 MasakhaPOS, NER 47 WikiANN + 20 MasakhaNER), a subset YAML or name (uriel_20), 'all' "
            "(the 65 realignment languages) or a comma list of codes (yor,swa,fra). A language is evaluated on every "
            "source that has it; languages without data are skipped with a warning. English, the training language, "
            "is always evaluated in-language. Metrics are named eval_{source}_{language}_{metric} (e.g. "
            "eval_masakhaner_yor_f1, eval_wikiann_yor_f1, eval_udpos_eng_accuracy) with the canonical ISO 639-3 "
            "code; eval_avg_{metric} is the unweighted mean over every evaluated (source, language) except English, "
            "and eval_avg_{source}_{metric} the mean within one source."
        },
    )
    eval_sources: str | None = field(
        default=None,
        metadata={
            "help": "A comma list restricting evaluation to some sources: udpos (or xtreme_udpos) and masakhapos for "
            "POS, wikiann and masakhaner for NER. Default: all of the task's sources."
        },
    )
    udpos_dataset: str = field(
        default="xtreme-r",
        metadata={
            "help": "The UDPOS dataset for POS training and evaluation: 'xtreme-r' (izhx/xtreme-r-udpos, the paper's, "
            "38 languages, source key udpos) or 'xtreme' (google/xtreme udpos.<Language>, 33 languages, source key "
            "xtreme_udpos)."
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Read every dataset from local files instead of the Hub (there is no fallback either way). "
            "Layout: DIR/<source>/<config>/<split>.<ext>, with the Hub's source key (udpos, xtreme_udpos, masakhapos, "
            "wikiann, masakhaner), config (en, yor, udpos.English) and split (train for English, test otherwise), "
            "e.g. DIR/wikiann/yo/test.parquet or DIR/masakhaner/yor/test/0000.parquet (a parquet-branch folder). "
            "Formats: .parquet, .jsonl or .json with the Hub's columns (tokens and pos_tags / upos / ner_tags; labels "
            "as ClassLabel ids, tag names, or integers in the Hub's order); .conllu for UD sources (FORM and UPOS; "
            "multi-word token lines 1-2 and empty nodes 1.1 are dropped; a treebank's own file name is found too, "
            "e.g. DIR/udpos/fr/fr_gsd-ud-test.conllu); .txt for MasakhaPOS / MasakhaNER (one 'token TAG' per line, a "
            "blank line between sentences: their GitHub repositories' data/<lang>/test.txt as they are). With "
            "--data_dir, a (source, language) whose file is absent is skipped with one warning listing them all; a "
            "file that is there but malformed is an error."
        },
    )
    dataset_revisions: str | None = field(
        default=None,
        metadata={
            "help": "Pin dataset versions: a comma list of source=revision (a Hub commit, or for masakhapos a GitHub "
            "commit of masakhane-io/masakhane-pos). masakhaner reads refs/convert/parquet unless pinned."
        },
    )
    max_seq_length: int = field(
        default=200,
        metadata={
            "help": "The maximum number of tokens of a training sentence, special tokens included (paper: 200; the "
            "reference code trains at 96). Words beyond it get no label."
        },
    )
    eval_max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": "The maximum number of tokens of an evaluation sentence (default: --max_seq_length). The "
            "reference code evaluates at 128 or 256 while training at 96; words cut off are not scored."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "For debugging: keep only the first this many English training sentences."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "For debugging: keep only the first this many sentences of every language."}
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
            "help": "The results table to append one row per (source, language, metric) to (columns: "
            "realign_utils.RESULTS_COLUMNS). 'none' writes no rows."
        },
    )

    def __post_init__(self):
        if self.task not in TASK_SOURCES:
            raise ValueError(f"--task must be one of {', '.join(TASK_SOURCES)}, got {self.task!r}.")
        if self.udpos_dataset not in ("xtreme-r", "xtreme"):
            raise ValueError(f"--udpos_dataset must be 'xtreme-r' or 'xtreme', got {self.udpos_dataset!r}.")
        if self.eval_sources is not None:
            unknown = sorted(set(self.eval_source_list) - set(task_source_names(self)))
            if unknown or not self.eval_source_list:
                raise ValueError(
                    f"--eval_sources {self.eval_sources!r}: unknown source(s) {unknown}; the {self.task} sources are "
                    f"{', '.join(task_source_names(self))}."
                )
        self.revisions = parse_revisions(self.dataset_revisions, list(SOURCES))
        for name in ("max_seq_length", "eval_max_seq_length"):
            value = getattr(self, name)
            if value is not None and value < 3:
                raise ValueError(f"--{name} must leave room for special tokens and text (at least 3).")
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ValueError(f"--data_dir {self.data_dir} is not a folder.")

    @property
    def eval_source_list(self) -> list[str]:
        return [s.strip() for s in (self.eval_sources or "").split(",") if s.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def task_source_names(data_args: DataArguments) -> list[str]:
    """The task's sources in order, the training source first."""
    names = list(TASK_SOURCES[data_args.task])
    if data_args.task == "pos" and data_args.udpos_dataset == "xtreme":
        names[0] = "xtreme_udpos"
    return names


def source_configs(source: TaggingSource) -> dict[str, str]:
    """{canonical code: config name} of every language the source has, from the registry."""
    if source.registry_resource is not None:
        return eval_configs(source.registry_resource)
    registry = lang_registry.load_registry()
    udpos = eval_configs("udpos")
    return {
        code: f"udpos.{registry.languages[code].name}"
        for code in udpos
        if registry.languages[code].name in XTREME_UDPOS_LANGUAGES
    }


def paper_languages(source: TaggingSource) -> list[str]:
    """The languages the paper evaluates on `source` (English excluded: it is the training language)."""
    excluded = {ENGLISH, *NOT_IN_PAPER.get(source.name, ())}
    return [code for code in source_configs(source) if code not in excluded]


def resolve_targets(data_args: DataArguments, seed: int) -> list[EvalTarget]:
    """English (in-language, from the training source) first, then every requested (source, language)."""
    names = task_source_names(data_args)
    train_source = SOURCES[names[0]]
    english = EvalTarget(train_source.name, ENGLISH, source_configs(train_source)[ENGLISH])
    wanted = [n for n in names if n in data_args.eval_source_list] if data_args.eval_sources else names
    available = {n: source_configs(SOURCES[n]) for n in wanted}
    paper = {n: paper_languages(SOURCES[n]) for n in wanted}
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


def read_conllu(path: Path, label_column: str) -> datasets.Dataset:
    """Read the FORM and UPOS columns of a CoNLL-U file, dropping multi-word token lines (1-2) and empty nodes (1.1).

    Lines are split on tabs only, so a FORM holding a space (UD Vietnamese 'Hà Nội', French '2 001') stays one word.
    Sentences end at blank (or whitespace-only) lines; comment-only sentences are dropped; a byte-order mark and
    CRLF line ends are accepted.
    """
    sentences, tokens, tags = [], [], []
    for lineno, line in read_text_lines(path):
        if not line.strip():
            if tokens:
                sentences.append((tokens, tags))
            tokens, tags = [], []
            continue
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 10:
            raise ValueError(f"{path}:{lineno}: {len(fields)} tab-separated fields; CoNLL-U lines have 10.")
        if "-" in fields[0] or "." in fields[0]:
            continue  # multi-word token range or empty node: not a word of the sentence
        tokens.append(fields[1])
        tags.append(fields[3])
    if tokens:
        sentences.append((tokens, tags))
    return datasets.Dataset.from_dict({"tokens": [s[0] for s in sentences], label_column: [s[1] for s in sentences]})


def read_token_tag_lines(path: Path, label_column: str) -> datasets.Dataset:
    """Read the MasakhaPOS / MasakhaNER raw format: one 'token TAG' per line, a blank line between sentences.

    The tag is the last whitespace-separated field and the token everything before it (spaces or a tab between
    them; a token may hold a space). A line with a tag but no token (MasakhaNER 2.0's xho train has two) is left
    out, with one warning naming its lines.
    """
    sentences, tokens, tags, tokenless = [], [], [], []
    for lineno, line in read_text_lines(path):
        parts = line.split()
        if not parts:
            if tokens:
                sentences.append((tokens, tags))
            tokens, tags = [], []
            continue
        if len(parts) == 1:
            if line[:1].isspace():
                tokenless.append(lineno)
                continue
            raise ValueError(f"{path}:{lineno}: expected 'token TAG' (two fields), got {line.strip()!r}.")
        tokens.append(line.strip()[: -len(parts[-1])].strip())
        tags.append(parts[-1])
    if tokens:
        sentences.append((tokens, tags))
    if tokenless:
        logger.warning(
            "%s: %d line(s) hold a tag but no token, left out: line %s",
            path,
            len(tokenless),
            ", ".join(map(str, tokenless[:20])) + (", ..." if len(tokenless) > 20 else ""),
        )
    return datasets.Dataset.from_dict(
        {
            "id": [str(i) for i in range(len(sentences))],
            "tokens": [s[0] for s in sentences],
            label_column: [s[1] for s in sentences],
        }
    )


def load_split(source: TaggingSource, config: str, split: str, data_args, cache_dir) -> tuple[datasets.Dataset, str]:
    """One split of one source, from --data_dir or the Hub (never one for the other), and where it came from."""
    revision = data_args.revisions.get(source.name)
    if data_args.data_dir is not None:
        extensions = LOCAL_TABLE_EXTENSIONS + ((f".{source.raw_format}",) if source.raw_format else ())
        path = find_local_split(data_args.data_dir, source.name, config, split, extensions)
        origin = str(path)
        if path.suffix == ".conllu":
            dataset = read_conllu(path, source.label_column)
        elif path.suffix == ".txt":
            dataset = read_token_tag_lines(path, source.label_column)
        else:
            dataset = read_local_table(path, cache_dir)
    elif source.loader == "github_raw":
        from datasets.utils.file_utils import cached_path

        raw_split = {"validation": "dev"}.get(split, split)
        origin = MASAKHAPOS_RAW_URL.format(revision=revision or "main", config=config, split=raw_split)
        local = cached_path(origin, download_config=datasets.DownloadConfig(cache_dir=cache_dir))
        dataset = read_token_tag_lines(Path(local), source.label_column)
    else:
        origin = f"{source.hub_id} {config}/{split}"
        dataset = load_hub_split(
            source.hub_id,
            config,
            split,
            parquet_branch=source.loader == "parquet_branch",
            revision=revision,
            cache_dir=cache_dir,
        )
    require_columns(
        dataset,
        ("tokens", source.label_column),
        origin,
        f"{source.name} data needs the columns of {source.hub_id}: tokens and {source.label_column}.",
    )
    if len(dataset) == 0:
        raise ValueError(f"{origin} holds no sentences.")
    require_equal_lengths(dataset, ("tokens", source.label_column), origin)
    return dataset, origin


def load_training_data(data_args: DataArguments, model_args: ModelArguments, do_train: bool):
    """The English training sentences (None when not training) and the label list, in the training data's order."""
    source = SOURCES[task_source_names(data_args)[0]]
    config = source_configs(source)[ENGLISH]
    dataset, origin = load_split(
        source, config, "train" if do_train else source.split, data_args, model_args.cache_dir
    )
    label_list = class_label_names(dataset.features[source.label_column]) or list(source.label_names)
    logger.info("Labels (%d) from %s: %s", len(label_list), origin, label_list)
    if not do_train:
        return None, label_list
    dataset = labels_to_training_ids(
        dataset, source.label_column, label_list, origin=origin, declared_names=source.label_names
    )
    if data_args.max_train_samples is not None:
        dataset = dataset.select(range(min(len(dataset), data_args.max_train_samples)))
    return EvalSet(source.name, ENGLISH, dataset, origin), label_list


def load_eval_data(targets, label_list, data_args: DataArguments, model_args: ModelArguments) -> list[EvalSet]:
    """The raw evaluation sentences of every target, labels rewritten as training label ids (matched by name).

    With --data_dir, a target whose file is absent is skipped (one warning lists them all); a file that exists but
    cannot be read is an error, and so is a run left with nothing to evaluate.
    """
    eval_sets, skipped = [], []
    for target in targets:
        source = SOURCES[target.source]
        try:
            dataset, origin = load_split(source, target.config, source.split, data_args, model_args.cache_dir)
        except MissingLocalSplit as err:
            skipped.append((target, err))
            continue
        dataset = labels_to_training_ids(
            dataset,
            source.label_column,
            label_list,
            origin=origin,
            declared_names=source.label_names,
            renames=dict(source.label_renames),
        )
        if data_args.max_eval_samples is not None:
            dataset = dataset.select(range(min(len(dataset), data_args.max_eval_samples)))
        eval_sets.append(EvalSet(target.source, target.language, dataset, origin))
    log_skipped_local_splits(skipped, data_args.data_dir)
    require_eval_sets(eval_sets, skipped, data_args.data_dir)
    return eval_sets


# You can change the preprocessing here (e.g. label every sub-word instead of the first one).
def tokenize_and_align_labels(examples, tokenizer, label_column: str, max_length: int) -> dict[str, Any]:
    """Tokenise pre-split words and label the first sub-word of each word; other pieces and special tokens get -100."""
    tokenized = tokenizer(examples["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
    labels, unscored = [], []
    for i, word_labels in enumerate(examples[label_column]):
        row, previous, scored = [], None, 0
        for word_id in tokenized.word_ids(batch_index=i):
            if word_id is None or word_id == previous:
                row.append(-100)
            else:
                row.append(word_labels[word_id])
                scored += 1
            previous = word_id
        labels.append(row)
        unscored.append(len(word_labels) - scored)  # words cut off by max_length, or that tokenise to nothing
    tokenized["labels"] = labels
    tokenized["unscored_words"] = unscored
    return tokenized


def tokenize_set(eval_set: EvalSet, tokenizer, max_length: int, data_args: DataArguments) -> EvalSet:
    """Tokenise one (source, language) dataset and log how many words could not be scored."""
    dataset = eval_set.dataset
    tokenized = dataset.map(
        tokenize_and_align_labels,
        batched=True,
        fn_kwargs={
            "tokenizer": tokenizer,
            "label_column": SOURCES[eval_set.source].label_column,
            "max_length": max_length,
        },
        num_proc=data_args.preprocessing_num_workers,
        remove_columns=dataset.column_names,
        load_from_cache_file=not data_args.overwrite_cache,
        desc=f"Tokenizing {eval_set.source} {eval_set.language}",
    )
    unscored = int(np.sum(tokenized["unscored_words"]))
    if unscored:
        logger.warning(
            "%s %s: %d word(s) get no label position (cut at %d tokens, or no sub-word at all).",
            eval_set.source,
            eval_set.language,
            unscored,
            max_length,
        )
    return EvalSet(eval_set.source, eval_set.language, tokenized.remove_columns("unscored_words"), eval_set.origin)


# ---------------------------------------------------------------------------------------------------------------------
# Model and metrics
# ---------------------------------------------------------------------------------------------------------------------


def load_tokenizer_and_model(model_args: ModelArguments, label_list: list[str], task: str):
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
    config.finetuning_task = task
    # Byte-level BPE tokenizers need a prefix space to split pre-tokenised words as in running text.
    extra = {"add_prefix_space": True} if config.model_type in {"roberta", "gpt2", "bloom", "deberta"} else {}
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
        **extra,
    )
    if not tokenizer.is_fast:
        raise ValueError(f"{model_args.model_name_or_path}: a fast tokenizer is needed to map sub-words to words.")
    model = AutoModelForTokenClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    if model_args.finetune_mode == "linear":
        freeze_encoder(model)
    return tokenizer, model


def repair_bio(tags: list[str]) -> list[str]:
    """Turn every I-X that does not continue an X entity into B-X, as the reference code does before scoring."""
    repaired, previous = [], "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            tag = "B-" + tag[2:]
        repaired.append(tag)
        previous = tag
    return repaired


def ner_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity-level seqeval F1 / precision / recall in strict IOB2 mode, after the BIO repair of both sides."""
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    gold = [repair_bio(s) for s in gold]
    predicted = [repair_bio(s) for s in predicted]
    kwargs = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    return {
        "f1": float(f1_score(gold, predicted, **kwargs)),
        "precision": float(precision_score(gold, predicted, **kwargs)),
        "recall": float(recall_score(gold, predicted, **kwargs)),
    }


# You can change the metrics here; evaluate_languages (downstream_utils.py) applies them to every language.
def build_compute_metrics(task: str, label_list: list[str]):
    """POS: accuracy over first sub-words. NER: seqeval scores over the labelled positions."""

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids  # (N, L) each, -100 where unscored
        mask = labels != -100
        if task == "pos":
            return {"accuracy": float((predictions[mask] == labels[mask]).mean())}
        gold = [[label_list[i] for i in row[keep]] for row, keep in zip(labels, mask)]
        predicted = [[label_list[i] for i in row[keep]] for row, keep in zip(predictions, mask)]
        return ner_scores(gold, predicted)

    return compute_metrics


def argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the predicted label ids: the Trainer then gathers (N, L) integers instead of (N, L, C) logits."""
    return logits.argmax(dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def parse_token_classification_args(argv: list[str] | None = None):
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
    data_keys = ("task", "udpos_dataset", "data_dir", "dataset_revisions", "max_seq_length", "max_train_samples")
    return {
        "model_name_or_path": model_args.model_name_or_path,
        "finetune_mode": model_args.finetune_mode,
        **{f"data.{k}": v for k, v in asdict_public(data_args).items() if k in data_keys},
        **{f"training.{k}": getattr(training_args, k) for k in FINETUNE_TRAINING_KEYS},
    }


def write_model_card(trainer, data_args, model_args, targets, metrics: dict[str, float]) -> None:
    """The model card (and, with --push_to_hub, the upload) of the fine-tuned model, with its zero-shot scores."""
    write_downstream_model_card(
        trainer,
        finetuned_from=model_args.model_name_or_path,
        task_tag="token-classification",
        dataset_ids=[SOURCES[n].hub_id for n in task_source_names(data_args)],
        languages=[t.language for t in targets],
        tags=[data_args.task, f"finetune-{model_args.finetune_mode}"],
        metrics=metrics,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_token_classification_args(argv)
    setup_logging(training_args)
    logger.info("Token classification: %s; model %s", data_args, model_args)
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
        data_collator=DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_multiple),
        compute_metrics=build_compute_metrics(data_args.task, label_list),
        preprocess_logits_for_metrics=argmax_logits,
    )
    metrics: dict[str, float] = {}
    if training_args.do_train:
        metrics = dict(train_unless_finished(trainer, last_checkpoint), train_samples=len(train_set.dataset))
        trainer.log_metrics("train", metrics)
        save_metrics(trainer, "train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        eval_metrics, entries = evaluate_languages(trainer, eval_sets, TASK_METRICS[data_args.task])
        trainer.log_metrics("eval", eval_metrics)
        save_metrics(trainer, "eval", eval_metrics)
        metrics.update(eval_metrics)
        if trainer.is_world_process_zero() and data_args.results_file.lower() not in ("", "none"):
            append_downstream_results(
                data_args.results_file,
                entries,
                TASK_METRICS[data_args.task],
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
