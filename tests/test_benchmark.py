"""The throughput benchmark runs end to end on a tiny configuration and reports every figure it promises.

Speed itself is not asserted (the numbers depend on the machine); the padding share is, since it depends only on
the data and the sampler.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import realign_throughput  # noqa: E402


@pytest.fixture
def restore_logging():
    """The benchmark silences logging process-wide, as a script may; the tests after it must not inherit that."""
    import datasets
    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    yield
    logging.disable(logging.NOTSET)
    transformers.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.enable_progress_bar()
    datasets.enable_progress_bars()


def test_benchmark_reports_every_figure(tmp_path, single_thread, restore_logging, capsys):
    output = tmp_path / "bench.json"
    realign_throughput.main(
        [
            "--models",
            "tiny",
            "--steps",
            "4",
            "--warmup",
            "1",
            "--rounds",
            "1",
            "--tokenize_pairs",
            "200",
            "--grouped_steps",
            "20",
            "--eval_examples",
            "64",
            "--device",
            "cpu",
            "--output",
            str(output),
        ]
    )
    printed = capsys.readouterr().out
    assert "| tiny |" in printed and "b/a" in printed and "paper's 24,544 steps" in printed
    report = json.loads(output.read_text())
    (tiny,) = report["results"]
    assert set(tiny["pairs_per_s"]) == {"a", "b0", "b", "c"}
    assert all(v > 0 for v in tiny["pairs_per_s"].values())
    assert tiny["b_over_a"] > 0 and tiny["b0_over_a"] > 0 and tiny["b_over_c"] > 0
    assert tiny["model_tflops_per_s"]["b"] > 0 and tiny["mfu"] is None  # no known peak on CPU
    extra = report["extra"]
    grouped = next(v for k, v in extra.items() if k.startswith("realignment"))  # mega-batches of 5 batches
    assert grouped["group_by_length_padding_share"] < 0.5 * grouped["random_padding_share"]
    evaluation = next(v for k, v in extra.items() if k.startswith("evaluation"))
    assert evaluation["length_sorted_examples_per_s"] > 0


def test_gpu_peaks_are_matched_most_specific_first():
    assert realign_throughput.bf16_peak_of("NVIDIA H100 80GB HBM3") == 989.0
    assert realign_throughput.bf16_peak_of("NVIDIA H100 PCIe") == 756.0
    assert realign_throughput.bf16_peak_of("NVIDIA H200") == 989.0
    assert realign_throughput.bf16_peak_of("NVIDIA GeForce RTX 4090") is None
