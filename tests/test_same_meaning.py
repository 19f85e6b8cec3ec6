"""Multi-way parallel batches: translations of one English sentence under --same_meaning positive / ignore /
negative."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import run_realign
from realign_losses import contrastive_alignment_loss
from run_realign import PairCollator, meaning_key

TREATMENTS = ("positive", "ignore", "negative")


def reference_loss(src: np.ndarray, tgt: np.ndarray, keys: list[int], temperature: float, treatment: str) -> float:
    """The three treatments of the docstring, written out query by query with Python floats."""
    z = np.concatenate([src, tgt])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(src)
    key = list(keys) * 2
    losses = []
    for i in range(2 * n):
        own = i + n if i < n else i - n
        e = {j: math.exp(z[i] @ z[j] / temperature) for j in range(2 * n) if j != i}
        same = [j for j in e if key[j] == key[i]]
        negatives = sum(e[j] for j in e if key[j] != key[i])
        if treatment == "negative":
            losses.append(-math.log(e[own] / sum(e.values())))
        elif treatment == "ignore":
            losses.append(-math.log(e[own] / (e[own] + negatives)))
        else:
            losses.append(np.mean([-math.log(e[p] / (e[p] + negatives)) for p in same]))
    return float(np.mean(losses))


def multi_way_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    src, tgt = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    src[1] = src[0]  # the same English sentence twice, as the encoder would see it
    src[4] = src[0]
    return src, tgt, [11, 11, 12, 13, 11]


@pytest.mark.parametrize("treatment", TREATMENTS)
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_each_treatment_matches_its_formula(treatment, temperature):
    src, tgt, keys = multi_way_batch()
    loss, _ = contrastive_alignment_loss(
        torch.tensor(src), torch.tensor(tgt), temperature, meaning_keys=torch.tensor(keys), same_meaning=treatment
    )
    assert loss.item() == pytest.approx(reference_loss(src, tgt, keys, temperature, treatment), rel=1e-6)


def test_two_pairs_sharing_english_by_hand():
    # Pairs 0 and 1 translate one sentence, pair 2 another; the two meanings are orthogonal and language-neutral
    # (each translation equals its English side). T = 1. A query of pair 0 or 1 sees three same-meaning candidates at
    # cos 1 (its translation and the other pair's two sides) and pair 2's two sides at cos 0.
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    src = torch.tensor([e1, e1, e2])
    keys = torch.tensor([5, 5, 6])
    losses = {
        t: contrastive_alignment_loss(src, src.clone(), 1.0, meaning_keys=keys, same_meaning=t)[0].item()
        for t in TREATMENTS
    }
    e = math.e
    # rows of pairs 0/1 (4 rows): candidates e, e, e (same meaning) and 1, 1; rows of pair 2 (2 rows): e and 1 × 4.
    negative = (4 * -math.log(e / (3 * e + 2)) + 2 * -math.log(e / (e + 4))) / 6
    ignore = (4 * -math.log(e / (e + 2)) + 2 * -math.log(e / (e + 4))) / 6
    assert losses["negative"] == pytest.approx(negative, abs=1e-6)
    assert losses["ignore"] == pytest.approx(ignore, abs=1e-6)
    assert losses["positive"] == pytest.approx(ignore, abs=1e-6)  # every positive sits at cos 1: same terms


def test_language_neutral_embeddings_reach_zero_loss_on_multi_way_batches():
    # 8 pairs over 3 meanings, every sentence of a meaning embedded identically: nothing is left to learn.
    meanings = torch.eye(3)
    keys = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    src = meanings[keys]
    losses = {
        t: contrastive_alignment_loss(src, src.clone(), 0.05, meaning_keys=keys, same_meaning=t)[0].item()
        for t in TREATMENTS
    }
    assert losses["positive"] < 1e-6
    assert losses["ignore"] < 1e-6
    assert losses["negative"] > 1.0  # log of 4–6 same-meaning candidates


def test_negative_is_the_old_loss_exactly_and_all_agree_without_repeats():
    rng = np.random.default_rng(3)
    src, tgt = torch.tensor(rng.normal(size=(4, 5))), torch.tensor(rng.normal(size=(4, 5)))
    old, old_stats = contrastive_alignment_loss(src, tgt, 0.1)  # no keys: every pair its own meaning
    with_repeats = torch.tensor([1, 1, 2, 1])
    negative, _ = contrastive_alignment_loss(src, tgt, 0.1, meaning_keys=with_repeats, same_meaning="negative")
    assert torch.equal(negative, old)
    distinct = torch.tensor([1, 2, 3, 4])
    for treatment in TREATMENTS:
        loss, stats = contrastive_alignment_loss(src, tgt, 0.1, meaning_keys=distinct, same_meaning=treatment)
        assert loss.item() == pytest.approx(old.item(), rel=1e-6), treatment
        assert {k: v.item() for k, v in stats.items()} == pytest.approx({k: v.item() for k, v in old_stats.items()})


@pytest.mark.parametrize("treatment", TREATMENTS)
def test_gathered_keys_equal_the_global_batch(treatment):
    # Two "processes" of 3 pairs each, with a meaning shared across them.
    rng = np.random.default_rng(4)
    src, tgt = torch.tensor(rng.normal(size=(6, 5))), torch.tensor(rng.normal(size=(6, 5)))
    keys = torch.tensor([1, 2, 1, 3, 1, 2])
    full, _ = contrastive_alignment_loss(src, tgt, 0.1, meaning_keys=keys, same_meaning=treatment)
    local = [
        contrastive_alignment_loss(
            src[3 * r : 3 * r + 3],
            tgt[3 * r : 3 * r + 3],
            0.1,
            all_src_embeddings=src,
            all_tgt_embeddings=tgt,
            rank=r,
            meaning_keys=keys[3 * r : 3 * r + 3],
            all_meaning_keys=keys,
            same_meaning=treatment,
        )[0]
        for r in range(2)
    ]
    assert torch.stack(local).mean().item() == pytest.approx(full.item(), rel=1e-6)


def test_statistics_count_same_meaning_candidates():
    # Pair 1 translates pair 0's sentence; its translation is far from everything, pair 0's English side is its
    # nearest candidate: a correct retrieval, since it means the same.
    src = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    tgt = torch.tensor([[1.0, 0.1, 0.0], [0.9, 0.0, 0.5], [0.0, 1.0, 0.1]])
    keys = torch.tensor([7, 7, 8])
    _, stats = contrastive_alignment_loss(src, tgt, 0.1, meaning_keys=keys, same_meaning="negative")
    assert stats["retrieval_acc"].item() == 1.0
    assert stats["same_meaning_per_query"].item() == pytest.approx((4 * 2 + 2 * 0) / 6)
    _, no_keys = contrastive_alignment_loss(src, tgt, 0.1)
    assert no_keys["same_meaning_per_query"].item() == 0.0
    assert no_keys["retrieval_acc"].item() < 1.0  # without keys, finding the other translation counts as a miss


@pytest.mark.parametrize("treatment", ["positive", "ignore"])
def test_fp16_and_gradients(treatment):
    src = torch.randn(6, 8, dtype=torch.float16, requires_grad=True)
    tgt = torch.randn(6, 8, dtype=torch.float16, requires_grad=True)
    keys = torch.tensor([1, 1, 2, 2, 2, 3])
    loss, _ = contrastive_alignment_loss(src, tgt, 0.1, meaning_keys=keys, same_meaning=treatment)
    assert torch.isfinite(loss)
    exact, _ = contrastive_alignment_loss(src.float(), tgt.float(), 0.1, meaning_keys=keys, same_meaning=treatment)
    assert loss.float().item() == pytest.approx(exact.item(), abs=0.05)
    loss.float().backward()
    assert torch.isfinite(src.grad).all() and src.grad.abs().sum() > 0 and tgt.grad.abs().sum() > 0


def test_every_query_without_negatives_gives_zero_not_nan():
    src = torch.randn(3, 4, requires_grad=True)
    loss, _ = contrastive_alignment_loss(
        src, src * 2, 0.1, meaning_keys=torch.tensor([1, 1, 1]), same_meaning="positive"
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(src.grad).all()


def test_meaning_key_normalises_english_and_prefers_ids():
    assert meaning_key("All human  beings\tare born free.") == meaning_key(" All human beings are born free. ")
    assert meaning_key("Caf\u00e9") == meaning_key("Cafe\u0301")  # NFC: composed and decomposed é
    assert meaning_key("All human beings") != meaning_key("all human beings")  # case kept
    assert meaning_key("Hello", "a-1") == meaning_key("Something else", "a-1")
    assert meaning_key("a-1") != meaning_key("Hello", "a-1")  # an id never equals an English text
    assert -(2**63) <= meaning_key("x") < 2**63


def test_tokenised_pairs_carry_keys_and_the_collator_stacks_them(tiny_bert):
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    data = datasets.Dataset.from_dict(
        {"src": ["The child reads.", "The  child reads.", "A book."], "tgt": ["x y", "z w", "u v"]}
    )
    args = run_realign.DataArguments(languages="fra"), run_realign.RealignArguments()
    tokenized, _ = run_realign.tokenize_pairs(data, "fra", tokenizer, *args, None, "x")
    keys = tokenized["meaning_key"]
    assert keys[0] == keys[1] != keys[2]
    with_ids = data.add_column("id", ["u1", "u2", "u1"])
    keyed, _ = run_realign.tokenize_pairs(with_ids, "fra", tokenizer, *args, None, "y")
    assert keyed["meaning_key"][0] == keyed["meaning_key"][2] != keyed["meaning_key"][1]
    batch = PairCollator(tokenizer.pad_token_id)([dict(row, lang_id=0) for row in keyed])
    assert batch["meaning_key"].tolist() == keyed["meaning_key"]


def test_reference_compat_keeps_the_old_negatives():
    assert run_realign.RealignArguments().same_meaning == run_realign.DEFAULT_SAME_MEANING
    assert run_realign.RealignArguments(reference_compat=True).same_meaning == "negative"
    assert run_realign.RealignArguments(reference_compat=True, same_meaning="ignore").same_meaning == "ignore"
    with pytest.raises(ValueError, match="--same_meaning must be one of positive, ignore, negative"):
        run_realign.RealignArguments(same_meaning="drop")


def write_multi_way(folder, rows, with_ids: bool):
    folder.mkdir(parents=True)
    for code, column in (("fra", 1), ("yor", 2)):
        with open(folder / f"{code}.jsonl", "w", encoding="utf-8") as f:
            for index, row in enumerate(rows):
                record = {"translation": {"en": row[0], code: row[column]}}
                if with_ids:
                    record["id"] = f"s{index}"
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


@pytest.mark.parametrize("treatment", TREATMENTS)
def test_training_logs_same_meaning_candidates(treatment, tiny_bert, tmp_path):
    # fra and yor translate the same 12 English sentences: batches of 8 pairs from 24 hold repeated meanings.
    from conftest import PARALLEL

    write_multi_way(tmp_path / "data", PARALLEL[:12], with_ids=treatment == "ignore")
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path",
        tiny_bert,
        "--languages",
        "fra,yor",
        "--parallel_data_dir",
        str(tmp_path / "data"),
        "--output_dir",
        str(out),
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "8",
        "--logging_steps",
        "3",
        "--learning_rate",
        "1e-3",
        "--use_cpu",
        "--seed",
        "3",
        "--same_meaning",
        treatment,
    ]
    run_realign.main(argv)
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(logs) == 2
    assert all(e["train_same_meaning_per_query"] > 0 for e in logs)
    assert all(math.isfinite(e["loss"]) for e in logs)
    config = json.loads((out / run_realign.CONFIG_FILE).read_text())
    assert config["loss"]["same_meaning"] == treatment
