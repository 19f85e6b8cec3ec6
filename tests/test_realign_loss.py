"""The contrastive loss, pooling, sampling and collation of run_realign.py, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import run_realign
from realign_losses import contrastive_alignment_loss
from realign_utils import content_token_mask, masked_mean_pool, retrieval_precision_at_1
from run_realign import LanguageMixingSampler, PairCollator, language_probabilities


def reference_loss(src: np.ndarray, tgt: np.ndarray, temperature: float) -> float:
    """Eq. 1 of the paper in its intended form, written out row by row."""
    z = np.concatenate([src, tgt])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(src)
    losses = []
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        denominator = sum(math.exp(z[i] @ z[j] / temperature) for j in range(2 * n) if j != i)
        losses.append(-math.log(math.exp(z[i] @ z[positive] / temperature) / denominator))
    return float(np.mean(losses))


def test_loss_orthogonal_pairs_by_hand():
    # Two pairs of identical orthogonal unit vectors, T = 1: every row sees cos 1 (positive) and cos 0 twice.
    src = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss, stats = contrastive_alignment_loss(src, src.clone(), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)
    assert stats["retrieval_acc"].item() == 1.0
    assert stats["positive_cosine"].item() == pytest.approx(1.0)
    assert stats["negative_cosine"].item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("temperature", [0.05, 0.1, 1.0])
def test_loss_matches_row_by_row_formula(temperature):
    rng = np.random.default_rng(0)
    src, tgt = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    loss, stats = contrastive_alignment_loss(torch.tensor(src), torch.tensor(tgt), temperature=temperature)
    assert loss.item() == pytest.approx(reference_loss(src, tgt, temperature), rel=1e-6)
    z = np.concatenate([src, tgt]) / np.linalg.norm(np.concatenate([src, tgt]), axis=1, keepdims=True)
    cos = z @ z.T
    positives = [cos[i, (i + 3) % 6] for i in range(6)]
    negatives = [cos[i, j] for i in range(6) for j in range(6) if j not in (i, (i + 3) % 6)]
    assert stats["positive_cosine"].item() == pytest.approx(np.mean(positives), rel=1e-6)
    assert stats["negative_cosine"].item() == pytest.approx(np.mean(negatives), rel=1e-6)


def test_temperature_sharpens():
    src = torch.tensor([[1.0, 0.2], [0.1, 1.0]])
    tgt = torch.tensor([[0.9, 0.1], [0.2, 1.0]])
    sharp, _ = contrastive_alignment_loss(src, tgt, temperature=0.05)
    soft, _ = contrastive_alignment_loss(src, tgt, temperature=1.0)
    assert sharp.item() < soft.item()  # correctly ranked pairs: a lower temperature gives a lower loss


def test_loss_is_symmetric_in_the_two_sides():
    rng = np.random.default_rng(1)
    src, tgt = torch.tensor(rng.normal(size=(4, 6))), torch.tensor(rng.normal(size=(4, 6)))
    a, _ = contrastive_alignment_loss(src, tgt)
    b, _ = contrastive_alignment_loss(tgt, src)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_self_similarity_is_masked():
    # If self-similarity were not masked, every query would "retrieve" itself (cos 1) and accuracy would be 0.
    src = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tgt = torch.tensor([[0.95, 0.31], [0.31, 0.95]])
    _, stats = contrastive_alignment_loss(src, tgt, temperature=0.1)
    assert stats["retrieval_acc"].item() == 1.0


def test_fp16_masking_stays_finite():
    src = torch.randn(4, 8, dtype=torch.float16)
    tgt = torch.randn(4, 8, dtype=torch.float16)
    loss, _ = contrastive_alignment_loss(src, tgt, temperature=0.1)
    assert torch.isfinite(loss)
    exact, _ = contrastive_alignment_loss(src.float(), tgt.float(), temperature=0.1)
    assert loss.float().item() == pytest.approx(exact.item(), abs=0.05)


def test_gradients_reach_both_sides():
    src = torch.randn(3, 4, requires_grad=True)
    tgt = torch.randn(3, 4, requires_grad=True)
    loss, _ = contrastive_alignment_loss(src, tgt)
    loss.backward()
    assert src.grad.abs().sum() > 0 and tgt.grad.abs().sum() > 0


def test_gathered_negatives_equal_the_global_batch_loss():
    # Two "processes" with 2 pairs each: the mean of their local losses over gathered candidates must equal the loss
    # of the 4-pair batch computed in one place.
    rng = np.random.default_rng(2)
    src, tgt = torch.tensor(rng.normal(size=(4, 5))), torch.tensor(rng.normal(size=(4, 5)))
    full, _ = contrastive_alignment_loss(src, tgt, temperature=0.1)
    local = [
        contrastive_alignment_loss(
            src[2 * r : 2 * r + 2], tgt[2 * r : 2 * r + 2], 0.1, all_src_embeddings=src, all_tgt_embeddings=tgt, rank=r
        )[0]
        for r in range(2)
    ]
    assert torch.stack(local).mean().item() == pytest.approx(full.item(), rel=1e-6)


def test_masked_mean_pool_ignores_special_tokens_and_padding():
    hidden = torch.tensor([[[100.0], [1.0], [3.0], [100.0], [100.0]]])  # [CLS] a b [SEP] [PAD]
    input_ids = torch.tensor([[101, 7, 8, 102, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 0]])
    mask = content_token_mask(input_ids, attention, torch.tensor([0, 101, 102]))
    assert mask.tolist() == [[False, True, True, False, False]]
    assert masked_mean_pool(hidden, mask).item() == pytest.approx(2.0)
    assert masked_mean_pool(hidden, torch.zeros_like(mask)).item() == 0.0  # empty row: zero, not NaN


def test_retrieval_precision_at_1():
    a = torch.eye(3)
    assert retrieval_precision_at_1(a, a) == 1.0
    assert retrieval_precision_at_1(a, a[[1, 0, 2]]) == pytest.approx(1 / 3)


def test_collator_stacks_sides_and_pads():
    collator = PairCollator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collator(
        [
            {"src_input_ids": [5, 6, 7], "tgt_input_ids": [5, 8], "src_n_words": 1, "tgt_n_words": 1, "lang_id": 0},
            {
                "src_input_ids": [5, 9],
                "tgt_input_ids": [5, 1, 2, 3, 4],
                "src_n_words": 2,
                "tgt_n_words": 3,
                "lang_id": 1,
            },
        ]
    )
    assert batch["input_ids"].shape == (4, 8)  # 2N rows, longest 5 padded to a multiple of 4
    assert batch["input_ids"][0, :3].tolist() == [5, 6, 7] and batch["input_ids"][2, :2].tolist() == [5, 8]
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 2, 2, 5]
    assert batch["n_words"].tolist() == [1, 2, 1, 3]
    assert batch["lang_id"].tolist() == [0, 1]


def test_sampler_is_uniform_over_languages_and_shuffles_whole_corpora():
    lang_ids = np.array([0] * 10 + [1] * 1000)
    probs = language_probabilities(np.array([10, 1000]), "uniform", 1.0)
    sampler = LanguageMixingSampler(lang_ids, probs, num_samples=4000, seed=3)
    stream = np.array(list(sampler))
    share_small = (lang_ids[stream] == 0).mean()
    assert 0.45 < share_small < 0.55  # uniform over languages, not over pairs
    assert len(set(stream[lang_ids[stream] == 1])) > 800  # the large corpus is read well beyond its head
    assert list(sampler) == stream.tolist()  # deterministic for a seed and epoch
    sampler.set_epoch(1)
    assert list(sampler) != stream.tolist()


def test_length_grouped_sampler_reorders_the_same_draws_into_batches_of_similar_length():
    rng = np.random.default_rng(0)
    lang_ids = np.repeat([0, 1, 2], 300)
    lengths = rng.integers(5, 97, size=len(lang_ids))
    probs = language_probabilities(np.array([300, 300, 300]), "uniform", 1.0)
    plain = LanguageMixingSampler(lang_ids, probs, num_samples=3200, seed=3)
    grouped = LanguageMixingSampler(lang_ids, probs, num_samples=3200, seed=3, lengths=lengths, batch_size=16)
    stream, grouped_stream = np.array(list(plain)), np.array(list(grouped))
    assert sorted(grouped_stream) == sorted(stream)  # the same pairs, languages drawn as often
    assert list(grouped) == grouped_stream.tolist()  # deterministic for a seed and epoch: resumable

    def padded_tokens(order):
        batches = lengths[order].reshape(-1, 16)
        return (batches.max(axis=1, keepdims=True) - batches).sum()

    assert padded_tokens(grouped_stream) < 0.1 * padded_tokens(stream)
    assert lengths[grouped_stream[0]] == lengths.max()  # the longest batch comes first: out-of-memory shows at once
    grouped.set_epoch(1)
    assert list(grouped) != grouped_stream.tolist()


def test_language_probabilities():
    sizes = np.array([100, 400])
    assert language_probabilities(sizes, "proportional", 1.0).tolist() == pytest.approx([0.2, 0.8])
    assert language_probabilities(sizes, "temperature", 2.0).tolist() == pytest.approx([1 / 3, 2 / 3])


def test_reference_compat_fills_unset_switches_only():
    ref = run_realign.RealignArguments(reference_compat=True, projection_head=False)
    assert (ref.pooling, ref.realign_layer, ref.projection_head, ref.strip_sentencepiece_space) == (
        "reference_prefix",
        -2,
        False,
        True,
    )
    paper = run_realign.RealignArguments()
    assert (paper.pooling, paper.realign_layer, paper.projection_head, paper.strip_sentencepiece_space) == (
        "mean",
        -1,
        False,
        False,
    )


def test_reference_prefix_pooling_on_crafted_input(tiny_xlmr):
    """Prefix pooling averages the first n_words positions, <s> included; mean pooling skips <s> and </s>."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_xlmr)
    model = AutoModel.from_pretrained(tiny_xlmr).eval()
    ids = tokenizer(["The child reads a book."], return_tensors="pt")
    hidden = model(**ids).last_hidden_state[0]  # (L, d)

    class Stub:
        processing_class = tokenizer
        pool_rows = run_realign.RealignTrainer.pool_rows

        def special_ids_on(self, device, pooling=False):
            return self.special_ids

    for pooling, expected in (("reference_prefix", hidden[:5].mean(0)), ("mean", hidden[1:-1].mean(0))):
        trainer = Stub()
        trainer.realign_args = run_realign.RealignArguments(pooling=pooling)
        trainer.special_ids = torch.tensor(tokenizer.all_special_ids)
        pooled = run_realign.RealignTrainer.pool(
            trainer, model, ids["input_ids"], ids["attention_mask"], torch.tensor([5])
        )
        assert torch.allclose(pooled[0], expected, atol=1e-5), pooling


def test_standalone_space_is_stripped(tiny_xlmr):
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_xlmr)
    space = tokenizer.convert_tokens_to_ids("▁")
    data = datasets.Dataset.from_dict({"src": ["The child reads a book."], "tgt": ["L'enfant lit un livre."]})
    data_args = run_realign.DataArguments(languages="fra")
    kept, _ = run_realign.tokenize_pairs(
        data, "fra", tokenizer, data_args, run_realign.RealignArguments(strip_sentencepiece_space=False), None, "x"
    )
    stripped, _ = run_realign.tokenize_pairs(
        data, "fra", tokenizer, data_args, run_realign.RealignArguments(strip_sentencepiece_space=True), None, "x"
    )
    assert space in kept[0]["src_input_ids"]
    assert space not in stripped[0]["src_input_ids"]
    assert len(stripped[0]["src_input_ids"]) < len(kept[0]["src_input_ids"])


def test_length_buckets_pool_the_same_vectors(tiny_bert):
    """--length_buckets encodes rows of similar length together: each pooled vector is the one of a single pass."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModel.from_pretrained(tiny_bert).eval()
    texts = ["The child reads a book in the garden every morning.", "A book.", "The child.", "Reads.", "The garden."]
    features = [
        {
            "src_input_ids": tokenizer(a)["input_ids"],
            "tgt_input_ids": tokenizer(b)["input_ids"],
            "src_n_words": 2,
            "tgt_n_words": 2,
            "lang_id": 0,
        }
        for a, b in zip(texts, texts[::-1])
    ]
    batch = PairCollator(tokenizer.pad_token_id)(features)

    class Stub:
        pool_rows = run_realign.RealignTrainer.pool_rows

        def special_ids_on(self, device, pooling=False):
            return run_realign.pooling_special_ids(tokenizer)

    pooled = {}
    for buckets in (1, 3, 20):
        trainer = Stub()
        trainer.realign_args = run_realign.RealignArguments(length_buckets=buckets)
        pooled[buckets] = run_realign.RealignTrainer.pool(
            trainer, model, batch["input_ids"], batch["attention_mask"], batch["n_words"]
        )
    assert pooled[1].shape == (10, model.config.hidden_size)
    assert torch.allclose(pooled[3], pooled[1], atol=1e-5) and torch.allclose(pooled[20], pooled[1], atol=1e-5)
    with pytest.raises(ValueError, match="--length_buckets must be at least 1"):
        run_realign.RealignArguments(length_buckets=0)
