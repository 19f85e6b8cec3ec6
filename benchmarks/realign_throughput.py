#!/usr/bin/env python
"""Throughput of realignment training against its floor and against sentence-transformers, on identical batches.

For each model (a tiny one and a 12-layer, hidden-768 one built from config with random weights) it measures, on the
same pre-tokenised translation pairs, in one process:

  (a) bare encoder: forward + backward of both sides stacked into one batch, plus the same AdamW step (the floor);
  (b) run_realign's RealignTrainer training steps (pooling, loss, collation, Trainer bookkeeping included);
  (c) sentence-transformers' MultipleNegativesRankingLoss with its own trainer on the same texts and model;

and prints samples/s (pairs/s), tokens/s, peak RSS and the ratios b/a and b/c. It also measures tokenisation +
caching of parallel data (pairs/s) and evaluation throughput (examples/s) with and without length-sorted batches.
The three training measurements are interleaved over --rounds rounds and the median is reported, so that load from
other processes affects them alike.

    python benchmarks/realign_throughput.py                       # both models, a few minutes on 2 CPU cores
    python benchmarks/realign_throughput.py --models tiny --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import run_realign  # noqa: E402

MODELS = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    # mBERT-sized: 12 layers, hidden 768, its 119,547-row vocabulary.
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
BASE_VOCAB = 119_547
WORDS = (
    "the a of to and in is was for on that with as by at from it this be are have not or which one all were they "
    "we when there can an more if no man out so said what up its about into than them only other new some could "
    "time these two may then do first any my now such like our over even most made after also did many before must "
    "through back years where much your way well down should because each just those people how too little state good "
    "very make world still own see men work long get here between both life being under never day same another know "
    "while last might us great old year off come since against go came right used take three states himself few house"
).split()


class StepTimer(TrainerCallback):
    """Wall-clock time of each optimizer step, read after training."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def make_texts(n: int, words_per_sentence: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words_per_sentence)) + " ." for _ in range(n)]


def build_model(kind: str, folder: Path, texts: list[str]) -> Path:
    from tokenizers import BertWordPieceTokenizer

    wordpiece = BertWordPieceTokenizer(lowercase=False)
    wordpiece.train_from_iterator(texts, vocab_size=2000, min_frequency=1)
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=False)
    tokenizer.add_special_tokens({"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]",
                                  "mask_token": "[MASK]"})
    vocab = len(tokenizer) if kind == "tiny" else BASE_VOCAB
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=vocab, max_position_embeddings=512, **MODELS[kind]))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tokenized_pairs(model_dir: Path, src: list[str], tgt: list[str], max_length: int) -> datasets.Dataset:
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    data = datasets.Dataset.from_dict({"src": src, "tgt": tgt})
    data_args = run_realign.DataArguments(languages="fra", max_seq_length=max_length, overlong="truncate")
    tokenized, _ = run_realign.tokenize_pairs(data, "fra", tokenizer, data_args, run_realign.RealignArguments(), None, "bench")
    return tokenized.add_column("lang_id", [0] * len(tokenized))


def bare_encoder(model_dir: Path, dataset: datasets.Dataset, batch: int, steps: int) -> list[float]:
    """(a) forward + backward of both sides in one (2N, L) batch and a fused AdamW step: nothing else."""
    model = BertModel.from_pretrained(model_dir).train()
    model.pooler.requires_grad_(False)  # as RealignTrainer does: the pooler gets no gradient
    # The Trainer's default optimizer (adamw_torch_fused), so that (a) and (b)/(c) differ only in what surrounds it.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0, fused=True)
    collator = run_realign.PairCollator(pad_token_id=0)
    batches = [collator([dataset[i] for i in range(s * batch, (s + 1) * batch)]) for s in range(steps)]
    times = []
    for inputs in batches:
        start = time.perf_counter()
        hidden = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        hidden.float().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


class SequentialRealignTrainer(run_realign.RealignTrainer):
    """RealignTrainer fed the benchmark's batches in order (the language sampler is irrelevant to speed)."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def training_args(output_dir: str, batch: int, steps: int, **kwargs) -> dict:
    return dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-5,
        lr_scheduler_type="constant", weight_decay=0.0, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0, **kwargs,
    )


def realign_trainer(model_dir: Path, dataset: datasets.Dataset, batch: int, steps: int) -> list[float]:
    """(b) the project's training step."""
    from transformers import AutoTokenizer

    realign_args = run_realign.RealignArguments()
    model = run_realign.load_encoder(run_realign.ModelArguments(model_name_or_path=str(model_dir)), realign_args)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**training_args(out, batch, steps, remove_unused_columns=False))
        trainer = SequentialRealignTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model_dir),
            data_collator=run_realign.PairCollator(0), realign_args=realign_args, language_codes=["fra"],
            sampling_probs=np.ones(1), callbacks=[timer],
        )
        trainer.train()
    return timer.times


def sentence_transformers_mnrl(model_dir: Path, src: list[str], tgt: list[str], batch: int, steps: int, max_length: int):
    """(c) sentence-transformers' trainer with MultipleNegativesRankingLoss on the same texts and model."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(str(model_dir), device="cpu")  # Transformer + mean pooling
    model.max_seq_length = max_length
    train = datasets.Dataset.from_dict({"anchor": src[: batch * steps], "positive": tgt[: batch * steps]})
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(**training_args(out, batch, steps))
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=train, loss=MultipleNegativesRankingLoss(model), callbacks=[timer]
        )
        trainer.train()
    return timer.times


def steady(times: list[float], warmup: int) -> float:
    """Median seconds per step after the first `warmup` steps."""
    return statistics.median(times[warmup:])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tokenization_throughput(model_dir: Path, n_pairs: int, max_length: int) -> dict[str, float]:
    """Pairs/s of filtering + tokenising + caching local parallel data, and of reading it back from the cache."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    src, tgt = make_texts(n_pairs, 20, 3), make_texts(n_pairs, 20, 4)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fra.tsv"
        path.write_text("".join(f"{s}\t{t}\n" for s, t in zip(src, tgt)), encoding="utf-8")
        data_args = run_realign.DataArguments(languages="fra", max_seq_length=max_length)
        result = {}
        for label in ("fresh", "cached"):
            start = time.perf_counter()
            raw = datasets.Dataset.from_dict(run_realign.read_local_parallel([path]))
            run_realign.tokenize_pairs(raw, "fra", tokenizer, data_args, run_realign.RealignArguments(), folder,
                                       "bench", [path])
            result[f"{label}_pairs_per_s"] = n_pairs / (time.perf_counter() - start)
    return result


def evaluation_throughput(model_dir: Path, n: int, batch: int) -> dict[str, float]:
    """Examples/s of Trainer.predict on sentences of varied length, in random order vs sorted by length."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = np.random.default_rng(5)
    texts = [" ".join(rng.choice(WORDS, int(k))) for k in rng.integers(5, 120, size=n)]
    data = datasets.Dataset.from_dict(tokenizer(texts, truncation=True, max_length=256))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    result = {}
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_eval_batch_size=batch, use_cpu=True, report_to="none",
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer))
        lengths = np.array([len(ids) for ids in data["input_ids"]])
        for label, dataset in (("unsorted", data), ("length_sorted", data.select(np.argsort(lengths)))):
            start = time.perf_counter()
            trainer.predict(dataset)
            result[f"{label}_examples_per_s"] = n / (time.perf_counter() - start)
    return result


def benchmark_model(kind: str, args, root: Path) -> dict:
    steps = args.steps if kind == "tiny" else args.base_steps
    n_pairs = args.batch * steps
    src, tgt = make_texts(n_pairs, 24, 1), make_texts(n_pairs, 24, 2)
    model_dir = build_model(kind, root / kind, src + tgt)
    dataset = tokenized_pairs(model_dir, src, tgt, args.max_length)
    tokens_per_step = sum(len(x) + len(y) for x, y in zip(dataset["src_input_ids"], dataset["tgt_input_ids"])) / steps
    measured = {"a": [], "b": [], "c": []}
    for _ in range(args.rounds):
        measured["a"].append(steady(bare_encoder(model_dir, dataset, args.batch, steps), args.warmup))
        gc.collect()
        measured["b"].append(steady(realign_trainer(model_dir, dataset, args.batch, steps), args.warmup))
        gc.collect()
        if not args.skip_sentence_transformers:
            measured["c"].append(steady(sentence_transformers_mnrl(model_dir, src, tgt, args.batch, steps,
                                                                   args.max_length), args.warmup))
            gc.collect()
    seconds = {k: statistics.median(v) for k, v in measured.items() if v}
    result = {
        "model": kind,
        "params": sum(p.numel() for p in BertModel.from_pretrained(model_dir).parameters()),
        "pairs_per_step": args.batch,
        "tokens_per_step": tokens_per_step,
        "seconds_per_step": seconds,
        "pairs_per_s": {k: args.batch / v for k, v in seconds.items()},
        "tokens_per_s": {k: tokens_per_step / v for k, v in seconds.items()},
        "b_over_a": seconds["a"] / seconds["b"],
        "peak_rss_mb_so_far": peak_rss_mb(),
        "rounds": {k: v for k, v in measured.items() if v},
    }
    if "c" in seconds:
        result["b_over_c"] = seconds["c"] / seconds["b"]
    return result


def print_table(results: list[dict], extra: dict) -> None:
    print("\n| model | params | (a) bare pairs/s | (b) RealignTrainer pairs/s | (c) ST MNRL pairs/s | b/a | b/c | "
          "tokens/s (b) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        p = r["pairs_per_s"]
        print(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {p['a']:.1f} | {p['b']:.1f} | "
              f"{p.get('c', float('nan')):.1f} | {r['b_over_a']:.3f} | {r.get('b_over_c', float('nan')):.3f} | "
              f"{r['tokens_per_s']['b']:.0f} |")
    print(f"\npeak RSS: {peak_rss_mb():.0f} MB")
    for name, values in extra.items():
        print(f"{name}: " + ", ".join(f"{k} = {v:.1f}" for k, v in values.items()))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,base", help="Comma list of models to measure: tiny, base.")
    parser.add_argument("--batch", type=int, default=16, help="Translation pairs per step (the paper's 16).")
    parser.add_argument("--max_length", type=int, default=96, help="Token limit per sentence (the paper's 96).")
    parser.add_argument("--steps", type=int, default=40, help="Steps per measurement for the tiny model.")
    parser.add_argument("--base_steps", type=int, default=8, help="Steps per measurement for the 12-layer model.")
    parser.add_argument("--warmup", type=int, default=2, help="Steps left out of each measurement (warm-up).")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of (a), (b), (c); medians reported.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice).")
    parser.add_argument("--skip_sentence_transformers", action="store_true", help="Do not measure (c).")
    parser.add_argument("--output", default=None, help="Also write the results as JSON to this file.")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for kind in args.models.split(","):
            results.append(benchmark_model(kind, args, root))
        tiny = build_model("tiny", root / "tiny-extra", make_texts(2000, 24, 9))
        extra = {
            "tokenisation + caching (tiny tokenizer, 20k pairs), pairs/s": tokenization_throughput(tiny, 20_000,
                                                                                                args.max_length),
            "evaluation, tiny model, 2,000 examples of 5-120 words, examples/s": evaluation_throughput(tiny, 2000, 32),
        }
    print_table(results, extra)
    output = {"torch_threads": torch.get_num_threads(), "results": results, "extra": extra}
    if args.output:
        Path(args.output).write_text(json.dumps(output, indent=2), encoding="utf-8")
    return output


if __name__ == "__main__":
    main()
