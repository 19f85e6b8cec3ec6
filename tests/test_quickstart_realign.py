"""A short realignment of the real multilingual-e5-small on real UDHR text: the method works, not only the plumbing.

Thresholds were set from measured runs (see the comments) with a margin: the assertions check the direction and a
fraction of the measured effect, not the exact numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import run_realign
from quickstart.evaluate_udhr import Embedder, read_units, score_language

LANGUAGES = ("yor", "wol", "ewe")  # start badly aligned on this model (UDHR article P@1 0.3–0.7 before training)


def train_article_retrieval(model: str, udhr_dir: Path) -> float:
    """Mean P@1 over both directions and LANGUAGES on the training articles (1–20, 20 candidates each)."""
    embed = Embedder(model, max_length=128, batch_size=16)
    scores = [score_language(embed, *read_units(udhr_dir / "train" / f"{code}.jsonl")) for code in LANGUAGES]
    return float(np.mean([(s["en2xx"] + s["xx2en"]) / 2 for s in scores]))


def test_short_realignment_improves_retrieval(e5_dir, udhr_dir, tmp_path):
    out = tmp_path / "realigned"
    run_realign.main(
        [
            "--model_name_or_path",
            str(e5_dir),
            "--languages",
            ",".join(LANGUAGES),
            "--parallel_data_dir",
            str(udhr_dir / "train"),
            "--output_dir",
            str(out),
            "--max_seq_length",
            "128",
            "--overlong",
            "truncate",
            "--freeze_word_embeddings",
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "5e-5",
            "--max_steps",
            "24",
            "--logging_steps",
            "6",
            "--save_steps",
            "1000",
            "--use_cpu",
            "--seed",
            "17",
        ]
    )
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 4
    assert losses[-1] < 0.8 * losses[0], losses

    before = train_article_retrieval(str(e5_dir), udhr_dir)
    after = train_article_retrieval(str(out), udhr_dir)
    assert after >= before + 0.1, (before, after)
