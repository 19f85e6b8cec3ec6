"""recipes/downstream_real_data.sh end to end on tiny models and a synthetic --data_dir laid out like the real one
(UD treebank file names, MasakhaPOS 'token TAG' text), and its table (recipes/downstream_table.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_downstream import write_masakhapos, write_udpos

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import downstream_table  # noqa: E402


def real_layout_dir(root: Path) -> Path:
    """English train and test, French test under UD treebank names; Yoruba and Hausa MasakhaPOS test text."""
    for config, split, n, code in (("en", "train", 16, "eng"), ("en", "test", 3, "eng"), ("fr", "test", 3, "fra")):
        write_udpos(root, "udpos", config, split, n, code, fmt="conllu")
        plain = root / "udpos" / config / f"{split}.conllu"
        plain.rename(plain.with_name(f"{config}_tiny-ud-{split}.conllu"))
    write_masakhapos(root, "yor", 3, "txt")
    write_masakhapos(root, "hau", 3, "txt")
    return root


def recipe(env_vars: dict[str, str], *models: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, **env_vars)
    return subprocess.run(
        ["bash", "recipes/downstream_real_data.sh", *models],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_recipe_end_to_end(tiny_bert, tiny_xlmr, tmp_path):
    data = real_layout_dir(tmp_path / "data")
    out = tmp_path / "out"
    env = {
        "DATA_DIR": str(data),
        "OUT_ROOT": str(out),
        "SEEDS": "3",
        "TRAINED": "yor",
        "TRAIN_ARGS": "--max_steps 3 --per_device_train_batch_size 4 --learning_rate 1e-3",
        "EXTRA_ARGS": f"--use_cpu --cache_dir {tmp_path / 'cache'}",
    }
    first = recipe(env, f"bert={tiny_bert}", f"xlmr={tiny_xlmr}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for label in ("bert", "xlmr"):
        results = json.loads((out / label / "seed3" / "all_results.json").read_text())
        assert {k for k in results if k.endswith("_samples") and k.startswith("eval_")} == {
            "eval_udpos_eng_samples",
            "eval_udpos_fra_samples",
            "eval_masakhapos_yor_samples",
            "eval_masakhapos_hau_samples",
        }
        assert not (out / label / "seed3" / "model.safetensors").exists()  # scored, weights removed (KEEP_MODELS=0)
        log = (out / label / "seed3.log").read_text()
        assert "skipped" in log and "udpos/yor" in log  # absent languages: one warning, not an error
    table = (out / "table.md").read_text()
    bert = json.loads((out / "bert" / "seed3" / "all_results.json").read_text())
    row = next(line for line in table.splitlines() if line.startswith("| masakhapos | yor |"))
    assert f"{100 * bert['eval_masakhapos_yor_accuracy']:.1f}" in row and "| yes |" in row
    trained = next(line for line in table.splitlines() if "mean, trained languages" in line)
    assert f"{100 * bert['eval_masakhapos_yor_accuracy']:.1f}" in trained
    other = next(line for line in table.splitlines() if "mean, other languages" in line)
    expected = (bert["eval_udpos_fra_accuracy"] + bert["eval_masakhapos_hau_accuracy"]) / 2
    assert f"{100 * expected:.1f}" in other
    assert "xlmr − bert" in table.splitlines()[0]

    again = recipe(env, f"bert={tiny_bert}", f"xlmr={tiny_xlmr}")
    assert again.returncode == 0 and again.stdout.count("finished earlier") == 2
    # Other settings in the same OUT_ROOT, or another model under a label, are refused rather than mixed in.
    changed = recipe({**env, "TRAIN_ARGS": "--max_steps 4"}, f"bert={tiny_bert}")
    assert changed.returncode == 2 and "other settings" in changed.stderr
    swapped = recipe(env, f"bert={tiny_xlmr}")
    assert swapped.returncode == 2 and "use another label" in swapped.stderr


def test_recipe_refuses_bad_arguments(tmp_path):
    assert "usage" in recipe({"DATA_DIR": str(tmp_path)}).stderr
    twice = recipe({"DATA_DIR": str(tmp_path), "OUT_ROOT": str(tmp_path / "o")}, "a/model", "b/model")
    assert twice.returncode == 2 and "Two models are labelled model" in twice.stderr


def write_run(out: Path, label: str, seed: int, scores: dict[str, float]) -> None:
    folder = out / label / f"seed{seed}"
    folder.mkdir(parents=True)
    metrics = {f"eval_{k}_accuracy": v for k, v in scores.items()}
    metrics.update(
        {"eval_avg_accuracy": 0.0, "eval_avg_udpos_accuracy": 0.0, "eval_udpos_fra_samples": 3, "train_loss": 1.0}
    )
    (folder / "all_results.json").write_text(json.dumps(metrics))


def test_table_means_over_seeds_and_groups(tmp_path):
    write_run(
        tmp_path, "base", 1, {"udpos_eng": 0.9, "udpos_fra": 0.6, "masakhapos_yor": 0.2, "xtreme_udpos_deu": 0.5}
    )
    write_run(
        tmp_path, "base", 2, {"udpos_eng": 0.9, "udpos_fra": 0.8, "masakhapos_yor": 0.4, "xtreme_udpos_deu": 0.7}
    )
    write_run(tmp_path, "new", 1, {"udpos_eng": 0.9, "udpos_fra": 0.7, "masakhapos_yor": 0.5, "xtreme_udpos_deu": 0.6})
    runs = downstream_table.collect(tmp_path, ["base", "new"])
    assert runs["base"][1][("xtreme_udpos", "deu")] == 0.5  # a source key holding an underscore
    header, rows, records = downstream_table.build_table(runs, {"yor"})
    assert header[3:] == ["base (seeds 1,2)", "new (seeds 1)", "new − base"]
    by_language = {row[1]: row for row in rows}
    assert by_language["eng"][2] == "en (fine-tuning)"
    assert (
        by_language["fra"][3] == "70.0 ± 14.1" and by_language["fra"][4] == "70.0" and by_language["fra"][5] == "0.0"
    )
    assert by_language["**mean, trained languages**"][3:] == ["30.0 ± 14.1", "50.0", "20.0"]
    # Other = fra and deu, per seed (0.55, 0.75), then over seeds; English is in neither group.
    assert by_language["**mean, other languages**"][3] == "65.0 ± 14.1"
    assert by_language["**mean, all zero-shot**"][4] == "60.0"
    record = next(r for r in records if r["model"] == "base" and r["language"] == "yor")
    assert record["mean"] == pytest.approx(0.3) and record["seeds"] == 2 and record["trained"] is True


def test_table_cli_writes_markdown_and_csv(tmp_path):
    write_run(tmp_path, "base", 17, {"udpos_eng": 0.9, "masakhapos_wol": 0.3})
    assert (
        downstream_table.main(
            ["--out_root", str(tmp_path), "--models", "base", "--trained", "wo", "--output", str(tmp_path / "table")]
        )
        == 0
    )
    assert "| masakhapos | wol | yes | 30.0 |" in (tmp_path / "table.md").read_text()
    assert "Trained: wol." in (tmp_path / "table.md").read_text()  # aliases resolve to the canonical code
    assert (tmp_path / "table.csv").read_text().startswith("model,source,language,trained,mean,std,seeds")
    with pytest.raises(ValueError, match="no finished run"):
        downstream_table.collect(tmp_path, ["missing"])
