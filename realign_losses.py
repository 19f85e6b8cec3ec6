"""The realignment losses as pure tensor functions: what `run_realign.py` and its extensions minimise.

- `contrastive_alignment_loss`: the paper's symmetric in-batch contrastive loss over translation pairs (sentences, or
  aligned words with `--alignment word`), with the three treatments of same-meaning sentences.
- `bag_of_words_loss`: the companion paper's word-level loss L_W (a pair's representation predicts its bag of words).
- `masked_lm_loss`: masked language modelling L_M on both sides of the pairs.
- `layer_hidden_states`, `word_pair_vectors`: the representations the losses compare.

Nothing here knows about the Trainer, the data or the command line: each function takes tensors and returns the loss
and detached statistics, so it can be tested against hand-computed values and reused (`analyze_alignment.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from realign_utils import content_token_mask

# What the contrastive loss does with a candidate that shares the query's meaning (see contrastive_alignment_loss).
SAME_MEANING_TREATMENTS = ("positive", "ignore", "negative")


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


def bag_of_words_loss(
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
        The scalar loss and detached statistics: `bow_size` (mean |B_i|) and `bow_acc` (share of bag items more
        similar to q than every negative).

    References:
        Wei et al. (2021), On Learning Universal Representations Across Languages (HiCTL), §3.2;
        the companion paper (Veitsman et al., "Why Better Cross-Lingual Alignment Fails for Better Cross-Lingual
        Transfer"), §4.2 and Table 4 (512 negatives, T = 0.1).

    Example:
        >>> embeddings = torch.randn(20, 8)
        >>> loss, stats = bag_of_words_loss(torch.randn(2, 8), torch.tensor([[0, 5, 6, 1], [0, 7, 7, 1]]), embeddings,
        ...                             torch.arange(2, 20), num_negatives=6)
        >>> loss.shape, sorted(stats)
        (torch.Size([]), ['bow_acc', 'bow_size'])
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
            "bow_size": bag_sizes.float().mean(),
            "bow_acc": beats_negatives.sum().float() / in_bag.sum().clamp(min=1),
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


def layer_hidden_states(
    model, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra
) -> torch.Tensor:
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
