"""Word alignment for `--alignment word`: words, eflomal links and their cache, character offsets → sub-word spans.

The contrastive loss can align word pairs instead of averaged sentences (Wu & Dredze 2020; the paper's Appendix A.2
comparison). The pairs come from a statistical word aligner run once per language over the parallel data:

1. `split_words` cuts each side into words (`WORD_PATTERN`);
2. `extract_word_links` aligns the words of the whole corpus with eflomal in both directions, keeps the intersection
   (precise one-to-one links) without punctuation, and caches it by the texts and the aligner's version;
3. `word_token_spans` / `links_to_token_spans` map each linked word to its sub-word tokens through the tokenizer's
   character offsets, so that the loss can pool a word's tokens.

Everything takes plain values (texts, an aligner name, a cache folder), not the scripts' argument dataclasses.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.metadata
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import regex

from realign_utils import atomic_writer

logger = logging.getLogger(__name__)

ALIGNERS = ("eflomal",)

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


def tokenize_with_offsets(tokenizer, texts: list[str]):
    """The tokenizer's output with character offsets (fast tokenizers only: words are mapped to sub-words by them)."""
    try:
        return tokenizer(texts, add_special_tokens=True, truncation=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as err:
        raise ValueError(
            f"--alignment word maps words to sub-words through character offsets, which {type(tokenizer).__name__} "
            f"does not provide ({err}). Use a fast (tokenizers-backed) tokenizer."
        ) from err


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
        lines = run_eflomal([" ".join(w) for w in src_words], [" ".join(w) for w in tgt_words])
        seconds = time.perf_counter() - start
        logger.info(
            "%s: eflomal aligned %d pairs in %.1f s (%.1f s per 10k pairs); cached in %s",
            desc,
            len(src_texts),
            seconds,
            seconds * 10_000 / max(1, len(src_texts)),
            path,
        )
        with atomic_writer(path) as f:
            f.write("\n".join(lines) + "\n")
    if len(lines) != len(src_texts):
        raise ValueError(
            f"{path}: {len(lines)} alignment lines for {len(src_texts)} pairs; delete the file to redo it."
        )
    links = []
    for line, src, tgt in zip(lines, src_words, tgt_words):
        pairs = [tuple(map(int, link.split("-"))) for link in line.split()]
        links.append(
            [[i, j] for i, j in pairs if i < len(src) and j < len(tgt) and is_word(src[i]) and is_word(tgt[j])]
        )
    return links, key


def run_eflomal(src_lines: list[str], tgt_lines: list[str]) -> list[str]:
    """Intersection of eflomal's forward and reverse links, one Pharaoh line ("0-0 2-1") per pair."""
    import eflomal

    with tempfile.TemporaryDirectory(prefix="realign-eflomal-") as folder:
        forward, reverse = Path(folder) / "forward", Path(folder) / "reverse"
        eflomal.Aligner().align(
            src_lines, tgt_lines, links_filename_fwd=str(forward), links_filename_rev=str(reverse), quiet=True
        )
        forward_lines = forward.read_text(encoding="utf-8").split("\n")[: len(src_lines)]
        reverse_lines = reverse.read_text(encoding="utf-8").split("\n")[: len(src_lines)]
    out = []
    for f_line, r_line in zip(forward_lines, reverse_lines):
        common = set(f_line.split()) & set(r_line.split())
        out.append(" ".join(sorted(common, key=lambda link: tuple(map(int, link.split("-"))))))
    return out


def add_word_links(raw: dict[str, Any], code: str, aligner: str, cache_dir: str | None) -> str:
    """Align a language's training and held-out pairs together (more text, better alignments) and add a `word_links`
    column to both (`raw` holds the `train` and `eval` datasets, eval possibly None); returns the alignments'
    digest."""
    parts = [raw["train"]] + ([raw["eval"]] if raw.get("eval") is not None else [])
    src = [text for part in parts for text in part["src"]]
    tgt = [text for part in parts for text in part["tgt"]]
    cache_root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "realign_word_alignments"
    links, key = extract_word_links(src, tgt, aligner, cache_root, desc=code)
    feature = datasets.List(datasets.List(datasets.Value("int32")))
    raw["train"] = raw["train"].add_column("word_links", links[: len(raw["train"])], feature=feature)
    if raw.get("eval") is not None:
        raw["eval"] = raw["eval"].add_column("word_links", links[len(raw["train"]) :], feature=feature)
    n_links = sum(len(x) for x in links)
    logger.info("%s: %d word links, %.1f per pair", code, n_links, n_links / max(1, len(links)))
    return key
