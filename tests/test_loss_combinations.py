"""--loss_weights of run_realign.py: the 7 combinations of align / bow / MLM losses train, the bag-of-words loss
matches the companion paper's formula written out, MLM masks like BERT, and an MLM run still saves a plain encoder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification, Trainer

import realign_extensions
import run_realign
from realign_extensions import ExtensionArguments, RealignExtensions, TiedOutputEmbedding, parse_loss_weights
from realign_losses import bag_of_words_loss, masked_lm_loss

COMBINATIONS = ["align=1", "bow=1", "mlm=1", "align=1,bow=1", "align=1,mlm=1", "bow=1,mlm=1", "align=1,bow=1,mlm=1"]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


def combo_argv(model, parallel_dirs, out, weights, *extra):
    return [
        "--model_name_or_path",
        model,
        "--languages",
        "fra,yor,swa",
        "--parallel_data_dir",
        str(parallel_dirs["train"]),
        "--output_dir",
        str(out),
        "--max_steps",
        "16",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "4",
        "--save_steps",
        "100",
        "--use_cpu",
        "--seed",
        "7",
        "--cache_dir",
        str(out.parent / "cache"),
        "--loss_weights",
        weights,
        *extra,
    ]


@pytest.mark.parametrize("weights", COMBINATIONS)
def test_each_combination_trains(weights, tiny_bert, parallel_dirs, tmp_path):
    out = tmp_path / "out"
    run_realign.main(combo_argv(tiny_bert, parallel_dirs, out, weights))
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    losses = [e["loss"] for e in logs]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    active = {name for name, w in parse_loss_weights(weights).items() if w}
    if active != {"align"}:
        for entry in logs:
            logged = {name for name in realign_extensions.LOSS_TERMS if f"train_loss_{name}" in entry}
            assert logged == active
            # With unit weights the total is the sum of its logged components (each rounded to 4 decimals).
            assert entry["loss"] == pytest.approx(sum(entry[f"train_loss_{n}"] for n in active), abs=1e-3)
    config = json.loads((out / run_realign.CONFIG_FILE).read_text())
    assert parse_loss_weights(config["loss"]["loss_weights"]) == parse_loss_weights(weights)


def test_mlm_checkpoint_is_a_plain_encoder_and_resumes(tiny_bert, parallel_dirs, tmp_path, crash_after):
    full = tmp_path / "full"
    argv = combo_argv(tiny_bert, parallel_dirs, full, "align=1,mlm=1", "--max_steps", "8", "--save_steps", "4")
    run_realign.main(argv)
    base = load_file(f"{tiny_bert}/model.safetensors")
    saved = load_file(full / "model.safetensors")
    assert set(saved) == set(base)  # no MLM-head keys, and BERT's pooler is still there
    assert not any(k.startswith(run_realign.MLM_HEAD_PREFIX) or k.startswith("cls.") for k in saved)
    assert not torch.equal(saved["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"])
    assert torch.equal(saved["pooler.dense.weight"], base["pooler.dense.weight"])
    reloaded = AutoModel.from_pretrained(full)
    assert torch.equal(reloaded.embeddings.word_embeddings.weight, saved["embeddings.word_embeddings.weight"])
    AutoModelForSequenceClassification.from_pretrained(full, num_labels=3)
    # Intermediate checkpoints carry the head (to resume), with the tied decoder stored once, as the embeddings.
    checkpoint = load_file(full / "checkpoint-4" / "model.safetensors")
    head = {k for k in checkpoint if k.startswith(run_realign.MLM_HEAD_PREFIX)}
    assert f"{run_realign.MLM_HEAD_PREFIX}predictions.transform.dense.weight" in head
    assert f"{run_realign.MLM_HEAD_PREFIX}predictions.decoder.weight" not in head

    interrupted = tmp_path / "interrupted"
    argv_interrupted = combo_argv(
        tiny_bert, parallel_dirs, interrupted, "align=1,mlm=1", "--max_steps", "8", "--save_steps", "4"
    )
    with crash_after(Trainer, 6):
        run_realign.main(argv_interrupted)
    run_realign.main(argv_interrupted)  # resumes from checkpoint-4, the decoder re-tied to the embeddings
    resumed = load_file(interrupted / "model.safetensors")
    for key in saved:
        assert torch.allclose(saved[key], resumed[key], atol=1e-5), key


def test_mlm_head_is_tied_to_the_trained_embeddings(tiny_xlmr):
    model_args = run_realign.ModelArguments(model_name_or_path=tiny_xlmr)
    realign_args = run_realign.RealignArguments(realign_layer=1)
    extensions = RealignExtensions(ExtensionArguments(loss_weights="mlm=1"), 1, 0.1, "positive")
    model = run_realign.load_encoder(model_args, realign_args, extensions)
    decoder = model.realign_mlm_head.decoder
    assert isinstance(decoder, TiedOutputEmbedding) and decoder.embeddings[0] is model.get_input_embeddings()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(2)  # the head follows the trained embeddings, not a copy
        hidden = torch.randn(3, model.config.hidden_size)
        expected = hidden @ model.get_input_embeddings().weight.T + decoder.bias
        assert torch.allclose(decoder(hidden), expected, atol=1e-6)
    # The head holds its output bias once: nothing in its state aliases another tensor.
    pointers = [t.data_ptr() for t in model.realign_mlm_head.state_dict().values()]
    assert len(pointers) == len(set(pointers))
    # MLM reads the last layer: nothing above --realign_layer is frozen when it is on.
    assert all(p.requires_grad for p in model.encoder.layer[1].parameters())


def reference_word_loss(q, bags, embeddings, negatives, temperature):
    """The companion paper's L_W written out term by term (cosine / T; negatives in a pair's bag left out)."""

    def s(u, v):
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))) / temperature

    per_pair = []
    for i, bag in enumerate(bags):
        terms = []
        for w in bag:
            positive = math.exp(s(q[i], embeddings[w]))
            denominator = positive + sum(math.exp(s(q[i], embeddings[j])) for j in negatives if j not in bag)
            terms.append(-math.log(positive / denominator))
        per_pair.append(np.mean(terms))
    return float(np.mean(per_pair))


def test_bag_of_words_loss_matches_the_formula():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(12, 6))
    q = rng.normal(size=(2, 6))
    pair_ids = torch.tensor([[0, 5, 6, 5, 1, 7, 1], [0, 8, 3, 1, 9, 1, -1]])  # 0, 1 special; -1 padding; 5 twice
    candidates = torch.arange(2, 12)
    torch.manual_seed(3)
    loss, stats = bag_of_words_loss(
        torch.tensor(q), pair_ids, torch.tensor(embeddings), candidates, num_negatives=6, temperature=0.1
    )
    torch.manual_seed(3)
    negatives = candidates[torch.randperm(len(candidates))[:6]].tolist()  # the same draw
    expected = reference_word_loss(q, [{5, 6, 7}, {8, 3, 9}], embeddings, negatives, 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["bow_size"].item() == 3.0


def test_bag_of_words_loss_learns_a_bag():
    torch.manual_seed(0)
    embeddings = torch.nn.Parameter(torch.randn(30, 8))
    query = torch.nn.Parameter(torch.randn(1, 8))
    optimizer = torch.optim.SGD([embeddings, query], lr=0.5)
    ids = torch.tensor([[0, 4, 9, 1]])
    first = None
    for _ in range(30):
        loss, stats = bag_of_words_loss(query, ids, embeddings, torch.arange(2, 30), num_negatives=16, temperature=0.1)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first and stats["bow_acc"].item() == 1.0


def test_masked_lm_masks_like_bert():
    class Recorder(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            self.seen = input_ids.clone()
            hidden = torch.nn.functional.one_hot(input_ids, 50).float().requires_grad_()
            return type("Out", (), {"last_hidden_state": hidden})()

    encoder = Recorder()
    input_ids = torch.randint(3, 50, (64, 40))
    input_ids[:, 0], input_ids[:, -1] = 0, 1  # [CLS] … [SEP]
    attention = torch.ones_like(input_ids)
    generator = torch.Generator().manual_seed(0)
    loss = masked_lm_loss(
        encoder, torch.nn.Identity(), input_ids, attention, torch.tensor([0, 1, 2]), 2, 50, 0.15, generator
    )
    changed = encoder.seen != input_ids
    masked = encoder.seen == 2
    assert not changed[:, 0].any() and not changed[:, -1].any()  # special tokens never touched
    content = 64 * 38
    assert 0.1 < masked.sum().item() / content < 0.14  # 15 % selected, 80 % of them masked: 12 %
    assert 0 < (changed & ~masked).sum().item() / content < 0.03  # 10 % of them random tokens: 1.5 % (some unchanged)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("align=0", "at least one"),
        ("align=1,words=1", "term=weight"),
        ("mlm=-1", "non-negative"),
        ("mlm=x", "must be a number"),
        ("mlm", "term=weight"),
    ],
)
def test_bad_loss_weights(spec, match):
    with pytest.raises(ValueError, match=match):
        ExtensionArguments(loss_weights=spec)


def test_loss_weights_are_recorded_canonically():
    assert ExtensionArguments(loss_weights="mlm=1, align=1").loss_weights == "align=1,bow=0,mlm=1"
    assert ExtensionArguments().weights == realign_extensions.DEFAULT_LOSS_WEIGHTS


def test_earlier_names_still_work_with_a_warning():
    with pytest.warns(FutureWarning, match="sentence= is deprecated; write align="):
        assert ExtensionArguments(loss_weights="sentence=1,word=0.5").loss_weights == "align=1,bow=0.5,mlm=0"
    with pytest.warns(FutureWarning, match="--word_negatives is deprecated; use --bow_negatives"):
        args = ExtensionArguments(word_negatives=64)
    assert args.bow_negatives == 64 and args.word_negatives is None
    with pytest.warns(FutureWarning, match="--word_pooling is deprecated; use --subword_pooling"):
        assert ExtensionArguments(word_pooling="mean").subword_pooling == "mean"


def test_mlm_needs_a_mask_token(tiny_bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tokenizer.mask_token = None
    with pytest.raises(ValueError, match="needs a tokenizer with a mask token"):
        RealignExtensions(ExtensionArguments(loss_weights="mlm=1"), -1, 0.1, "positive").check_requirements(tokenizer)


@pytest.mark.slow
def test_two_process_run_with_every_loss(tiny_bert, parallel_dirs, tmp_path):
    """Under DDP the MLM head runs outside the encoder's forward: it must not be taken for an unused parameter."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    argv = combo_argv(
        tiny_bert,
        parallel_dirs,
        out,
        "align=1,bow=1,mlm=1",
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "2",
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(root / "run_realign.py"),
        *argv,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert all(
        {"train_loss_align", "train_loss_bow", "train_loss_mlm"} <= set(e) for e in state["log_history"] if "loss" in e
    )
    assert not any(k.startswith(run_realign.MLM_HEAD_PREFIX) for k in load_file(out / "model.safetensors"))
