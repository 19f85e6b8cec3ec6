"""analyze_alignment.py: retrieval with the centering control, cosines, dictionary distances and gradient cosines on
tiny models and local files; known answers on toy input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_downstream import build_sib200_dir, write_jsonl

import analyze_alignment
from analyze_alignment import group_cosines, layer_groups, pair_metrics
from realign_losses import contrastive_alignment_loss
from realign_utils import retrieval_recall_at_k

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


def test_recall_at_k_known_answers():
    x = torch.randn(20, 8)
    assert retrieval_recall_at_k(x, x.clone()) == {1: 1.0, 5: 1.0, 10: 1.0}  # identical sentences: always found
    # Query 0 is nearest to candidate 0 (cos 1, candidates 1 and 2 come close); queries 1 and 2 only see their own
    # candidate's small component: every translation is ranked first.
    queries = torch.eye(4)
    candidates = torch.tensor([[1.0, 0, 0, 0], [1.0, 0.1, 0, 0], [1.0, 0, 0.1, 0], [0, 0, 0, 1.0]])
    assert retrieval_recall_at_k(queries, candidates, (1,)) == {1: 1.0}
    # Ties do not push a translation down: one-dimensional vectors all have cosine 1 with each other.
    assert retrieval_recall_at_k(torch.ones(5, 1), torch.ones(5, 1), (1,)) == {1: 1.0}
    shuffled = torch.randn(10, 5)
    recall = retrieval_recall_at_k(shuffled, shuffled[torch.roll(torch.arange(10), 1)], (1, 10))
    assert recall[10] == 1.0 and recall[1] < 1.0


def test_pair_metrics_centering_control():
    # Two "languages" whose vectors differ by a constant offset: raw retrieval can fail, centering removes the offset.
    torch.manual_seed(0)
    base = torch.randn(30, 16)
    offset = torch.full((16,), 5.0)
    metrics = pair_metrics(base + offset, base + 0.05 * torch.randn(30, 16) - offset)
    assert metrics["recall@1_centered"] == 1.0 and metrics["recall@1_a2b_centered"] == 1.0
    assert metrics["recall@1"] < metrics["recall@1_centered"]
    same = pair_metrics(base, base)
    assert same["cos_translation"] == pytest.approx(1.0) and same["cos_gap"] > 0.5


def test_gradient_cosine_of_a_loss_with_itself_is_one(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_bert).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    names = [n for n, _ in model.named_parameters()]
    groups = layer_groups(names, [1, 2])
    assert list(groups) == ["embeddings", "layers 1-1", "layers 2-2", "all"]
    assert not any("pooler" in n for n in groups["all"])
    params = [dict(model.named_parameters())[n] for n in groups["all"]]

    def grads(texts):
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        pooled = model(**batch).last_hidden_state.mean(dim=1)
        loss, _ = contrastive_alignment_loss(*pooled.chunk(2))
        return dict(zip(groups["all"], torch.autograd.grad(loss, params)))

    texts = ["The child reads a book.", "The water is cold.", "L'enfant lit un livre.", "L'eau est froide."]
    g = grads(texts)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in group_cosines(g, grads(texts), groups).values())
    negated = {k: -v for k, v in g.items()}
    assert all(v == pytest.approx(-1.0, abs=1e-6) for v in group_cosines(g, negated, groups).values())


def test_layer_groups_for_twelve_layers():
    names = [
        "embeddings.word_embeddings.weight",
        *(f"encoder.layer.{i}.output.dense.weight" for i in range(12)),
        "pooler.dense.weight",
    ]
    groups = layer_groups(names, [4, 8, 12])
    assert list(groups) == ["embeddings", "layers 1-4", "layers 5-8", "layers 9-12", "all"]
    assert groups["layers 5-8"] == [f"encoder.layer.{i}.output.dense.weight" for i in range(4, 8)]
    assert len(groups["all"]) == 13


def identical_dir(root: Path) -> Path:
    """A 'parallel' folder whose translations are the English sentences themselves: retrieval must be perfect."""
    from conftest import PARALLEL

    root.mkdir(parents=True, exist_ok=True)
    (root / "deu.tsv").write_text("".join(f"{r[0]}\t{r[0]}\n" for r in PARALLEL), encoding="utf-8")
    return root


def test_identical_sentences_give_recall_one(tiny_bert, tmp_path):
    out = tmp_path / "report"
    report = analyze_alignment.main(
        [
            "--model_name_or_path",
            tiny_bert,
            "--parallel_data",
            str(identical_dir(tmp_path / "same")),
            "--layers",
            "0,1,2",
            "--output_dir",
            str(out),
        ]
    )
    for layer in (0, 1, 2):
        values = report["model"]["metrics"]["deu-eng"][layer]
        for k in (1, 5, 10):
            assert values[f"recall@{k}"] == 1.0 and values[f"recall@{k}_centered"] == 1.0
        assert values["cos_translation"] == pytest.approx(1.0)


def test_full_report_with_compare_dictionary_and_gradients(tiny_bert, parallel_dirs, tmp_path):
    dictionary = tmp_path / "en-fr.txt"
    dictionary.write_text("child enfant\nbook livre\nwater eau\nbread pain\n", encoding="utf-8")
    sib = build_sib200_dir(tmp_path / "sib", per_language=2, train=16)
    out = tmp_path / "report"
    report = analyze_alignment.main(
        [
            "--model_name_or_path",
            tiny_bert,
            "--compare_to",
            tiny_bert,
            "--parallel_data",
            str(parallel_dirs["train"]),
            "--languages",
            "fra,yor",
            "--layers",
            "1,2",
            "--dictionaries",
            f"fra={dictionary}",
            "--task_data",
            str(sib / "sib200" / "eng_Latn" / "train.tsv"),
            "--gradient_batch_size",
            "4",
            "--output_dir",
            str(out),
        ]
    )
    metrics = report["model"]["metrics"]
    assert set(metrics) == {"fra-eng", "yor-eng"} and report["pairs"]["fra-eng"]["sentences"] == 18
    for pair in metrics:
        for layer in (1, 2):
            values = metrics[pair][layer]
            assert {
                "recall@1",
                "recall@5",
                "recall@10",
                "recall@1_centered",
                "recall@1_a2b",
                "recall@1_b2a_centered",
                "cos_translation",
                "cos_random",
                "cos_gap",
            } <= set(values)
            assert 0 <= values["recall@1"] <= values["recall@5"] <= values["recall@10"] <= 1
    assert {"token_cos_distance", "token_cos_distance_random"} <= set(metrics["fra-eng"][2])
    gradients = report["model"]["gradients"]
    assert gradients["task"] == "sequence" and gradients["groups"] == ["embeddings", "layers 1-1", "layers 2-2", "all"]
    for pair in ("fra-eng", "yor-eng"):
        assert all(-1 <= v <= 1 for v in gradients["grad_cosine"][pair].values())
    # The same model twice: every change is exactly zero, gradients included (the fresh head is seeded).
    delta = report["delta"]
    assert all(v == 0 for pair in delta["metrics"].values() for layer in pair.values() for v in layer.values())
    assert all(v == 0 for pair in delta["gradients"]["grad_cosine"].values() for v in pair.values())

    saved = json.loads((out / analyze_alignment.REPORT_JSON).read_text())
    assert saved["model"]["metrics"]["fra-eng"]["1"]["recall@1"] == metrics["fra-eng"][1]["recall@1"]
    markdown = (out / analyze_alignment.REPORT_MD).read_text()
    assert "## recall@1" in markdown and "## recall@1 — Δ" in markdown and "mean-centered" in markdown
    assert "## grad_cosine (task: sequence-level)" in markdown and "| fra-eng |" in markdown
    pngs = {p.name for p in out.glob("*.png")}
    assert {
        "recall_at_1.png",
        "recall_at_1_centered.png",
        "cos_gap.png",
        "token_cos_distance.png",
        "grad_cosine.png",
    } <= pngs


def test_sib200_pairs_without_english_and_token_task(tiny_xlmr, tmp_path):
    sib = build_sib200_dir(tmp_path / "sib", per_language=6, train=8)
    task = tmp_path / "pos.jsonl"
    write_jsonl(
        task,
        [{"tokens": ["The", "child", "reads", "."], "pos_tags": [5, 7, 15, 12]}] * 4
        + [{"tokens": ["Water", "is", "cold"], "pos_tags": [7, 3, 0]}] * 4,
    )
    report = analyze_alignment.main(
        [
            "--model_name_or_path",
            tiny_xlmr,
            "--parallel_data",
            "sib200",
            "--data_dir",
            str(sib),
            "--parallel_split",
            "test",
            "--languages",
            "fra-yor,swa",
            "--layers",
            "-1",
            "--task_data",
            str(task),
            "--gradient_batch_size",
            "4",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert set(report["model"]["metrics"]) == {"fra-yor", "swa-eng"}
    assert report["model"]["layers"] == [2] and report["pairs"]["fra-yor"]["sentences"] == 6
    assert report["model"]["gradients"]["task"] == "token"


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--languages", "fra-yor"], "Pairs without English.*sib200"),
        (["--layers", "5"], "has 2 layers"),
        (["--parallel_data", "opus"], "neither tatoeba nor sib200 nor a folder"),
        (["--task_model", "x"], "--task_model needs --task_data"),
    ],
)
def test_bad_input(extra, match, tiny_bert, parallel_dirs, tmp_path):
    argv = [
        "--model_name_or_path",
        tiny_bert,
        "--parallel_data",
        str(parallel_dirs["train"]),
        "--layers",
        "1",
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
    ]
    with pytest.raises(ValueError, match=match):
        analyze_alignment.main(argv)
    assert not (tmp_path / "out").exists()
