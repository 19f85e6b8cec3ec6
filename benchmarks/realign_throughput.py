#!/usr/bin/env python
"""Throughput of realignment training against its floor and against sentence-transformers, on identical batches.

For each model (a tiny one and a 12-layer, hidden-768 one built from config with random weights) it measures, on the
same pre-tokenised translation pairs, in one process:

  (a) bare encoder: forward + backward of both sides stacked into one batch, plus the same AdamW step (the floor);
  (b0) the project's own per-step work in a plain loop: fetching and collating the pairs, RealignTrainer.compute_loss
       (pooling and loss), backward and the same AdamW step, so b0/a is what the loss, pooling and collation cost;
  (b) run_realign's RealignTrainer training steps (pooling, loss, collation, Trainer bookkeeping included);
  (c) sentence-transformers' MultipleNegativesRankingLoss with its own trainer on the same texts and model;

and prints samples/s (pairs/s), tokens/s, model TFLOP/s (and model FLOPs utilisation when the device's peak is
known), peak memory, the ratios b0/a, b/a and b/c, and the time the paper's 24,544 steps would take at that speed.
It also measures tokenisation + caching of parallel data (pairs/s), realignment on pairs of varied length with and
without --train_sampling_strategy group_by_length, and evaluation throughput (examples/s) with and without
length-sorted batches. The four training measurements are interleaved over --rounds (--base_rounds) rounds and the
median is reported, so that load from other processes affects them alike; the ratios of the fastest steps are
printed too, since such load can only slow a step down.

    python benchmarks/realign_throughput.py                       # both models, about 10 minutes on 2 CPU cores
    python benchmarks/realign_throughput.py --models tiny --rounds 9
    python benchmarks/realign_throughput.py --models base --device cuda --bf16 --base_steps 50 --batch 128
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

PAPER_STEPS = run_realign.PAPER_TRAINING_DEFAULTS["max_steps"]
# Dense bf16 peak, in TFLOP/s, of the accelerators this is likely to run on (vendor datasheets), matched in this
# order against the device name: the PCIe and NVL H100 parts are slower than the SXM one.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}

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


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it."""
    if device == "cuda":
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall-clock time of each optimizer step, read after training."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)


def make_texts(n: int, words_per_sentence: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words_per_sentence)) + " ." for _ in range(n)]


def build_model(kind: str, folder: Path, texts: list[str]) -> Path:
    from tokenizers import BertWordPieceTokenizer

    wordpiece = BertWordPieceTokenizer(lowercase=False)
    wordpiece.train_from_iterator(texts, vocab_size=2000, min_frequency=1)
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=False)
    tokenizer.add_special_tokens(
        {
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
        }
    )
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
    tokenized, _ = run_realign.tokenize_pairs(
        data, "fra", tokenizer, data_args, run_realign.RealignArguments(), None, "bench"
    )
    return tokenized.add_column("lang_id", [0] * len(tokenized))


def bare_encoder(model_dir: Path, dataset: datasets.Dataset, batch: int, steps: int, opts) -> list[float]:
    """(a) forward + backward of both sides in one (2N, L) batch and a fused AdamW step: nothing else."""
    model = BertModel.from_pretrained(model_dir).to(opts.device).train()
    model.pooler.requires_grad_(False)  # as RealignTrainer does: the pooler gets no gradient
    # The Trainer's default optimizer (adamw_torch_fused), so that (a) and (b)/(c) differ only in what surrounds it.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0, fused=True)
    forward = torch.compile(model) if opts.compile else model
    collator = run_realign.PairCollator(pad_token_id=0, pad_to_multiple_of=pad_multiple(opts))
    batches = [collator([dataset[i] for i in range(s * batch, (s + 1) * batch)]) for s in range(steps)]
    times = []
    for inputs in batches:
        synchronize(opts.device)
        start = time.perf_counter()
        input_ids, attention_mask = inputs["input_ids"].to(opts.device), inputs["attention_mask"].to(opts.device)
        with torch.autocast(opts.device, dtype=torch.bfloat16, enabled=opts.bf16):
            hidden = forward(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden.float().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(opts.device)
        times.append(time.perf_counter() - start)
    return times


def pad_multiple(opts) -> int | None:
    """What run_realign pads to: a multiple of 8 on GPU (tensor cores), the longest sentence on CPU."""
    return 8 if opts.device == "cuda" else None


def paper_loss_only(realign_args) -> run_realign.RealignExtensions:
    """No companion-paper term: the benchmark times the paper's loss."""
    return run_realign.RealignExtensions(
        run_realign.ExtensionArguments(),
        realign_args.realign_layer,
        realign_args.temperature,
        realign_args.same_meaning,
    )


class SequentialRealignTrainer(run_realign.RealignTrainer):
    """RealignTrainer fed the benchmark's batches in order (the language sampler is irrelevant to speed)."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def training_args(output_dir: str, batch: int, steps: int, opts, **kwargs) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=2e-5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        use_cpu=opts.device == "cpu",
        bf16=opts.bf16,
        torch_compile=opts.compile,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **kwargs,
    )


def realign_trainer(
    model_dir: Path,
    dataset: datasets.Dataset,
    batch: int,
    steps: int,
    opts,
    trainer_class=SequentialRealignTrainer,
    collator=None,
    **args,
) -> list[float]:
    """(b) the project's training step."""
    from transformers import AutoTokenizer

    realign_args = run_realign.RealignArguments()
    model = run_realign.load_encoder(
        run_realign.ModelArguments(model_name_or_path=str(model_dir)), realign_args, paper_loss_only(realign_args)
    )
    timer = StepTimer(opts.device)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**training_args(out, batch, steps, opts, remove_unused_columns=False, **args))
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            data_collator=collator or run_realign.PairCollator(0, pad_multiple(opts)),
            realign_args=realign_args,
            language_codes=["fra"],
            sampling_probs=np.ones(1),
            callbacks=[timer],
        )
        trainer.train()
    return timer.times


def realign_loss_loop(model_dir: Path, dataset: datasets.Dataset, batch: int, steps: int, opts) -> list[float]:
    """(b0) the project's own per-step work without the Trainer's loop: fetching and collating the pairs,
    `RealignTrainer.compute_loss` (pooling and loss), backward and the same fused AdamW step as (a)."""
    from transformers import AutoTokenizer

    realign_args = run_realign.RealignArguments()
    model = run_realign.load_encoder(
        run_realign.ModelArguments(model_name_or_path=str(model_dir)), realign_args, paper_loss_only(realign_args)
    )
    model = model.to(opts.device).train()
    collator = run_realign.PairCollator(0, pad_multiple(opts))
    with tempfile.TemporaryDirectory() as out:
        trainer = run_realign.RealignTrainer(
            model=model,
            args=TrainingArguments(**training_args(out, batch, steps, opts, remove_unused_columns=False)),
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            data_collator=collator,
            realign_args=realign_args,
            language_codes=["fra"],
            sampling_probs=np.ones(1),
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0, fused=True)
    forward = torch.compile(model) if opts.compile else model
    times = []
    for step in range(steps):
        synchronize(opts.device)
        start = time.perf_counter()
        features = dataset.__getitems__(list(range(step * batch, (step + 1) * batch)))
        inputs = {k: v.to(opts.device) for k, v in collator(features).items()}
        with torch.autocast(opts.device, dtype=torch.bfloat16, enabled=opts.bf16):
            loss = trainer.compute_loss(forward, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(opts.device)
        times.append(time.perf_counter() - start)
    return times


def sentence_transformers_mnrl(
    model_dir: Path, src: list[str], tgt: list[str], batch: int, steps: int, max_length: int, opts
):
    """(c) sentence-transformers' trainer with MultipleNegativesRankingLoss on the same texts and model."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(str(model_dir), device=opts.device)  # Transformer + mean pooling
    model.max_seq_length = max_length
    train = datasets.Dataset.from_dict({"anchor": src[: batch * steps], "positive": tgt[: batch * steps]})
    timer = StepTimer(opts.device)
    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(**training_args(out, batch, steps, opts))
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


def training_flops(model_dir: Path, tokens_per_step: float, mean_length: float) -> float:
    """Model FLOPs of one training step: 6 per non-embedding parameter and token, plus attention's 12·layers·d·L per
    token (the PaLM paper's accounting, Appendix B); forward + backward, no recomputation."""
    config = BertConfig.from_pretrained(model_dir)
    model = BertModel(config)
    dense = model.num_parameters(exclude_embeddings=True)
    attention = 12 * config.num_hidden_layers * config.hidden_size * mean_length
    return (6 * dense + attention) * tokens_per_step


def peak_tflops(opts) -> float | None:
    """The device's dense bf16 peak: --peak_tflops, or looked up from the GPU's name; unknown on CPU."""
    if opts.peak_tflops:
        return opts.peak_tflops
    if opts.device == "cuda" and opts.bf16:
        return bf16_peak_of(torch.cuda.get_device_name())
    return None


def bf16_peak_of(device_name: str) -> float | None:
    """The datasheet bf16 peak of a GPU from its name ('NVIDIA H100 80GB HBM3' → 989), None when not listed."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)


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
            run_realign.tokenize_pairs(
                raw, "fra", tokenizer, data_args, run_realign.RealignArguments(), folder, "bench", [path]
            )
            result[f"{label}_pairs_per_s"] = n_pairs / (time.perf_counter() - start)
    return result


def evaluation_throughput(model_dir: Path, n: int, batch: int, opts) -> dict[str, float]:
    """Examples/s of Trainer.predict on sentences of varied length, in random order vs sorted by length."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = np.random.default_rng(5)
    texts = [" ".join(rng.choice(WORDS, int(k))) for k in rng.integers(5, 120, size=n)]
    data = datasets.Dataset.from_dict(tokenizer(texts, truncation=True, max_length=256))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    result = {}
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_eval_batch_size=batch,
            use_cpu=opts.device == "cpu",
            bf16_full_eval=opts.bf16,
            report_to="none",
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer))
        lengths = np.array([len(ids) for ids in data["input_ids"]])
        for label, dataset in (("unsorted", data), ("length_sorted", data.select(np.argsort(lengths)))):
            start = time.perf_counter()
            trainer.predict(dataset)
            result[f"{label}_examples_per_s"] = n / (time.perf_counter() - start)
    return result


class CountingCollator(run_realign.PairCollator):
    """`PairCollator` that also counts the real and padded token positions it produced."""

    real = padded = 0

    def __call__(self, features):
        batch = super().__call__(features)
        self.real += int(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()
        return batch


def length_grouped_throughput(model_dir: Path, opts, n_pairs: int, batch: int, steps: int) -> dict[str, float]:
    """Pairs/s and padding share of RealignTrainer on pairs of 5-80 words, its language sampler drawing them
    at random or grouped by length (--train_sampling_strategy)."""
    rng = np.random.default_rng(6)
    words = rng.integers(5, 81, size=n_pairs)
    src = [" ".join(rng.choice(WORDS, int(k))) + " ." for k in words]
    tgt = [" ".join(rng.choice(WORDS, int(k + rng.integers(-2, 3)))) + " ." for k in words]  # translations: ±2 words
    dataset = tokenized_pairs(model_dir, src, tgt, opts.max_length)
    result = {}
    for strategy in ("random", "group_by_length"):
        collator = CountingCollator(0, pad_multiple(opts))
        times = realign_trainer(
            model_dir,
            dataset,
            batch,
            steps,
            opts,
            trainer_class=run_realign.RealignTrainer,
            collator=collator,
            train_sampling_strategy=strategy,
        )
        result[f"{strategy}_pairs_per_s"] = batch / steady(times, opts.warmup)
        result[f"{strategy}_padding_share"] = 1 - collator.real / collator.padded
    return result


def benchmark_model(kind: str, args, root: Path) -> dict:
    steps, rounds = (args.steps, args.rounds) if kind == "tiny" else (args.base_steps, args.base_rounds)
    n_pairs = args.batch * steps
    src, tgt = make_texts(n_pairs, 24, 1), make_texts(n_pairs, 24, 2)
    model_dir = build_model(kind, root / kind, src + tgt)
    dataset = tokenized_pairs(model_dir, src, tgt, args.max_length)
    tokens_per_step = sum(len(x) + len(y) for x, y in zip(dataset["src_input_ids"], dataset["tgt_input_ids"])) / steps
    measured = {"a": [], "b0": [], "b": [], "c": []}  # per round, the steady steps' seconds
    for _ in range(rounds):
        measured["a"].append(bare_encoder(model_dir, dataset, args.batch, steps, args)[args.warmup :])
        gc.collect()
        measured["b0"].append(realign_loss_loop(model_dir, dataset, args.batch, steps, args)[args.warmup :])
        gc.collect()
        measured["b"].append(realign_trainer(model_dir, dataset, args.batch, steps, args)[args.warmup :])
        gc.collect()
        if not args.skip_sentence_transformers:
            measured["c"].append(
                sentence_transformers_mnrl(model_dir, src, tgt, args.batch, steps, args.max_length, args)[
                    args.warmup :
                ]
            )
            gc.collect()
    measured = {k: v for k, v in measured.items() if v}
    # The median over rounds of each round's median step; and the fastest step of all, which other processes'
    # load can only slow down, as a second reading on a shared machine.
    seconds = {k: statistics.median(statistics.median(r) for r in v) for k, v in measured.items()}
    fastest = {k: min(min(r) for r in v) for k, v in measured.items()}
    flops = training_flops(model_dir, tokens_per_step, tokens_per_step / (2 * args.batch))
    peak = peak_tflops(args)
    result = {
        "model": kind,
        "params": sum(p.numel() for p in BertModel.from_pretrained(model_dir).parameters()),
        "pairs_per_step": args.batch,
        "tokens_per_step": tokens_per_step,
        "seconds_per_step": seconds,
        "steps_per_s": {k: 1 / v for k, v in seconds.items()},
        "pairs_per_s": {k: args.batch / v for k, v in seconds.items()},
        "tokens_per_s": {k: tokens_per_step / v for k, v in seconds.items()},
        "model_tflops_per_s": {k: flops / v / 1e12 for k, v in seconds.items()},
        "mfu": {k: flops / v / 1e12 / peak for k, v in seconds.items()} if peak else None,
        "paper_steps_hours_b": PAPER_STEPS * seconds["b"] / 3600,
        "b_over_a": seconds["a"] / seconds["b"],
        "b_over_a_fastest": fastest["a"] / fastest["b"],
        "b0_over_a": seconds["a"] / seconds["b0"],
        "b0_over_a_fastest": fastest["a"] / fastest["b0"],
        "peak_memory_mb_so_far": peak_memory_mb(args),
        "rounds": measured,
    }
    if "c" in seconds:
        result["b_over_c"] = seconds["c"] / seconds["b"]
        result["b_over_c_fastest"] = fastest["c"] / fastest["b"]
    return result


def peak_memory_mb(opts) -> float:
    """Peak GPU memory allocated on GPU, peak resident memory of the process on CPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if opts.device == "cuda" else peak_rss_mb()


def print_table(results: list[dict], extra: dict, opts) -> None:
    precision = "bf16" if opts.bf16 else "fp32"
    print(f"\ndevice: {device_name(opts)}, {precision}{', torch.compile' if opts.compile else ''}")
    print(
        "| model | params | (a) bare pairs/s | (b0) loss + collation pairs/s | (b) RealignTrainer pairs/s | "
        "(c) ST MNRL pairs/s | b0/a | b/a | b/c | b0/a, b/a, b/c (fastest steps) | steps/s (b) | tokens/s (b) | "
        "TFLOP/s (b) | MFU (b) | paper's 24,544 steps (b) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        p = r["pairs_per_s"]
        mfu = f"{r['mfu']['b']:.1%}" if r["mfu"] else "n/a"
        print(
            f"| {r['model']} | {r['params'] / 1e6:.2f} M | {p['a']:.1f} | {p['b0']:.1f} | {p['b']:.1f} | "
            f"{p.get('c', float('nan')):.1f} | {r['b0_over_a']:.3f} | {r['b_over_a']:.3f} | "
            f"{r.get('b_over_c', float('nan')):.3f} | {r['b0_over_a_fastest']:.3f}, {r['b_over_a_fastest']:.3f}, "
            f"{r.get('b_over_c_fastest', float('nan')):.3f} | "
            f"{r['steps_per_s']['b']:.2f} | {r['tokens_per_s']['b']:.0f} | {r['model_tflops_per_s']['b']:.3f} | "
            f"{mfu} | {r['paper_steps_hours_b']:.2f} h |"
        )
    print(f"\npeak memory: {peak_memory_mb(opts):.0f} MB ({'GPU allocated' if opts.device == 'cuda' else 'RSS'})")
    for name, values in extra.items():
        print(f"{name}: " + ", ".join(f"{k} = {v:.3g}" if v < 1 else f"{k} = {v:.1f}" for k, v in values.items()))


def device_name(opts) -> str:
    if opts.device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,base", help="Comma list of models to measure: tiny, base.")
    parser.add_argument("--batch", type=int, default=16, help="Translation pairs per step (the paper's 16).")
    parser.add_argument("--max_length", type=int, default=96, help="Token limit per sentence (the paper's 96).")
    parser.add_argument("--steps", type=int, default=40, help="Steps per measurement for the tiny model.")
    parser.add_argument("--base_steps", type=int, default=8, help="Steps per measurement for the 12-layer model.")
    parser.add_argument("--warmup", type=int, default=2, help="Steps left out of each measurement (warm-up).")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="Interleaved rounds of (a), (b0), (b), (c) for the tiny model; medians reported.",
    )
    parser.add_argument("--base_rounds", type=int, default=3, help="Interleaved rounds for the 12-layer model.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice).")
    parser.add_argument("--skip_sentence_transformers", action="store_true", help="Do not measure (c).")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="Where to train (default: the GPU when there is one).",
    )
    parser.add_argument("--bf16", action="store_true", help="Train in bf16 autocast (as run_realign.py --bf16).")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model (run_realign.py --torch_compile)."
    )
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="The device's peak TFLOP/s, for model FLOPs utilisation (default: known GPUs in bf16).",
    )
    parser.add_argument("--tokenize_pairs", type=int, default=20_000, help="Pairs for the tokenisation measurement.")
    parser.add_argument(
        "--grouped_steps",
        type=int,
        default=30,
        help="Steps of the random vs group_by_length measurement (tiny model, 0 to skip).",
    )
    parser.add_argument("--eval_examples", type=int, default=2000, help="Examples for the evaluation measurement.")
    parser.add_argument("--output", default=None, help="Also write the results as JSON to this file.")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible to torch")
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
        tokenization_label = f"tokenisation + caching (tiny tokenizer, {args.tokenize_pairs:,} pairs), pairs/s"
        extra = {tokenization_label: tokenization_throughput(tiny, args.tokenize_pairs, args.max_length)}
        if args.grouped_steps:
            extra[f"realignment, tiny model, pairs of 5-80 words, {args.grouped_steps} steps"] = (
                length_grouped_throughput(tiny, args, args.batch * args.grouped_steps, args.batch, args.grouped_steps)
            )
        extra[f"evaluation, tiny model, {args.eval_examples:,} examples of 5-120 words, examples/s"] = (
            evaluation_throughput(tiny, args.eval_examples, 32, args)
        )
    print_table(results, extra, args)
    output = {
        "device": device_name(args),
        "bf16": args.bf16,
        "compile": args.compile,
        "torch_threads": torch.get_num_threads(),
        "results": results,
        "extra": extra,
    }
    if args.output:
        Path(args.output).write_text(json.dumps(output, indent=2), encoding="utf-8")
    return output


if __name__ == "__main__":
    main()
