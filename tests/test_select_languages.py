"""Tests of select_languages.py: solvers against brute force, strategies, YAML output, --compare and bad input."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import yaml

import lang_registry
import select_languages as sl


def synthetic_problem(m: int = 12, dim: int = 6, seed: int = 0, groups: bool = False) -> sl.Problem:
    """Random non-negative vectors (like URIEL's 0/1 features) and their angular distances; index 0 is the anchor."""
    rng = np.random.RandomState(seed)
    vectors = rng.random_sample((m + 1, dim)) ** 2
    distances = sl.angular_distances(vectors)
    labels = np.array([i % 4 if i % 3 else -1 for i in range(m)]) if groups else None
    return sl.Problem(distances[1:, 1:], distances[0, 1:], labels)


def brute_force(problem: sl.Problem, n: int, sense: str) -> float:
    values = [
        problem.objective(subset)
        for subset in itertools.combinations(range(problem.size), n)
        if problem.feasible(subset)
    ]
    return max(values) if sense == "max" else min(values)


@pytest.fixture(scope="module")
def registry():
    return lang_registry.load_registry()


@pytest.fixture(scope="module")
def fake_distances(registry) -> sl.DistanceMatrix:
    """Distances for English and the 65 pool languages from random vectors: fast, and independent of lang2vec."""
    codes = [sl.ANCHOR, *registry.pool()]
    vectors = np.random.RandomState(7).randint(0, 2, size=(len(codes), 40)).astype(float)
    vectors[:, 0] = 1.0  # no all-zero vector
    return sl.DistanceMatrix(codes, sl.angular_distances(vectors), "synthetic", {c: c for c in codes})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One lang2vec distance cache shared by the command-line tests (computed once, about 5 s)."""
    return str(tmp_path_factory.mktemp("distance-cache"))


def run(argv: list[str], cache_dir: str) -> dict:
    return sl.main([*argv, "--cache_dir", cache_dir])


SOLVER_ARGS = sl.SolverArguments(milp_time_limit=10.0, restarts=20)


# ---------------------------------------------------------------------------------------------------------------------
# Distances and solvers
# ---------------------------------------------------------------------------------------------------------------------


def test_angular_distance_matches_paper_definition():
    u, v, w = np.array([1.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0])
    distances = sl.angular_distances(np.stack([u, v, w]))
    expected = np.arccos(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))) / np.pi
    assert distances[0, 1] == pytest.approx(expected)
    assert np.allclose(distances, distances.T) and np.all(np.diag(distances) == 0)
    # Missing values: compared on the features both languages have.
    known = np.array([[True, True, False], [True, True, True], [True, True, True]])
    masked = sl.angular_distances(np.stack([u, v, w]), known=known)
    assert masked[0, 1] == pytest.approx(0.5)  # (1, 0) vs (0, 1): orthogonal
    assert masked[1, 2] == pytest.approx(distances[1, 2])


@pytest.mark.parametrize("sense", ["max", "min"])
@pytest.mark.parametrize("n", [2, 4, 6, 10])
def test_solvers_agree_with_brute_force(sense, n):
    problem = synthetic_problem()
    expected = brute_force(problem, n, sense)
    exhaustive = sl.solve_exhaustive(problem, n, sense)
    milp = sl.solve_milp(problem, n, sense, time_limit=10.0)
    local = sl.solve_local_search(problem, n, sense, seed=0, restarts=20)
    assert exhaustive.optimal and milp.optimal and not local.optimal
    for solution in (exhaustive, milp, local):
        assert len(solution.indices) == n
        assert solution.objective == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("sense", ["max", "min"])
def test_solvers_respect_groups(sense):
    problem = synthetic_problem(groups=True)
    n = 5  # four groups of two or three candidates plus four unconstrained ones
    expected = brute_force(problem, n, sense)
    for solution in (
        sl.solve_exhaustive(problem, n, sense),
        sl.solve_milp(problem, n, sense, time_limit=10.0),
        sl.solve_local_search(problem, n, sense, seed=1, restarts=20),
    ):
        assert problem.feasible(solution.indices)
        assert solution.objective == pytest.approx(expected, abs=1e-9)


def test_enumeration_covers_every_subset_once():
    problem = synthetic_problem(m=9)
    subsets, values = zip(*sl.enumerate_objectives(problem, 4, chunk_size=7))
    subsets, values = np.concatenate(subsets), np.concatenate(values)
    assert len(subsets) == math.comb(9, 4) == len({tuple(row) for row in subsets})
    for row, value in zip(subsets[:20], values[:20]):
        assert value == pytest.approx(problem.objective(row))


def test_exhaustive_complement_for_large_n():
    problem = synthetic_problem(m=14)
    for sense in ("max", "min"):
        solution = sl.solve_exhaustive(problem, 12, sense)
        assert "complements" in solution.details
        assert solution.objective == pytest.approx(brute_force(problem, 12, sense))


def test_auto_solver_and_determinism():
    problem = synthetic_problem(m=30, seed=3)
    args = sl.SolverArguments(exhaustive_limit=1000, milp_time_limit=2.0, restarts=10)
    minimum = sl.solve(problem, 8, "min", args, seed=0)
    assert minimum.solver == "milp" and minimum.optimal
    maximum = sl.solve(problem, 8, "max", args, seed=0)
    assert maximum.solver == "local-search+milp" and maximum.bound >= maximum.objective - 1e-9
    again = sl.solve(problem, 8, "max", args, seed=0)
    assert again.indices == maximum.indices
    small = sl.solve(problem, 3, "max", sl.SolverArguments(), seed=0)
    assert small.solver == "exhaustive" and small.optimal


def test_percentile_exact_and_sampled_agree():
    problem = synthetic_problem(m=16, seed=5)
    best = sl.solve_exhaustive(problem, 4, "max")
    exact = sl.objective_percentile(problem, 4, best.objective, samples=1, exhaustive_limit=10**7, seed=0)
    assert exact["method"] == "exact" and exact["rank_from_most_diverse"] == 1 and exact["percentile"] == 100.0
    middle = problem.objective([0, 1, 2, 3])
    exact = sl.objective_percentile(problem, 4, middle, samples=1, exhaustive_limit=10**7, seed=0)
    sampled = sl.objective_percentile(problem, 4, middle, samples=20000, exhaustive_limit=10, seed=0)
    assert sampled["method"].startswith("estimated")
    assert sampled["percentile"] == pytest.approx(exact["percentile"], abs=2.0)


# ---------------------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["uriel-most", "uriel-least", "latin-most", "latin-least", "family-ie", "random"])
@pytest.mark.parametrize("pool", ["all", "joshi2", "seen-xlmr", "africa"])
def test_strategies_return_n_languages_from_their_pool(registry, fake_distances, strategy, pool):
    candidates, _, _ = sl.candidates_for(registry, strategy, pool)
    n = min(6, len(candidates))
    if n == 0:
        with pytest.raises(ValueError, match="larger than the 0 candidate"):
            sl.select(registry, strategy, pool, 1, fake_distances, SOLVER_ARGS, seed=17)
        return
    selection = sl.select(registry, strategy, pool, n, fake_distances, SOLVER_ARGS, seed=17)
    assert len(selection.languages) == len(set(selection.languages)) == n
    assert set(selection.languages) <= set(sl.pool_codes(registry, pool))
    assert sl.ANCHOR not in selection.languages
    if strategy.startswith("latin"):
        assert all(registry.languages[c].script == "Latin" for c in selection.languages)
    if strategy == "family-ie":
        assert all(sl.is_indo_european(registry.languages[c]) for c in selection.languages)


@pytest.mark.parametrize("pool", sorted(sl.POOLS))
def test_pools_follow_registry_fields(registry, pool):
    codes = sl.pool_codes(registry, pool)
    assert codes and set(codes) <= set(registry.pool())
    checks = {
        "joshi2": lambda lang: lang.joshi <= 2,
        "joshi3-5": lambda lang: lang.joshi >= 3,
        "unseen-mbert": lambda lang: not lang.seen_mbert,
        "latin": lambda lang: lang.script == "Latin",
        "africa": lambda lang: lang.africa,
    }
    if pool in checks:
        assert all(checks[pool](registry.languages[c]) for c in codes)
        assert all(not checks[pool](registry.languages[c]) for c in registry.pool() if c not in codes)


def test_family_and_script_pick_distinct_groups(registry, fake_distances):
    family = sl.select(registry, "family", "all", 10, fake_distances, SOLVER_ARGS, seed=0)
    labels = [sl.family_label(registry.languages[c]) for c in family.languages]
    assert len(family.languages) == 10 and len(set(labels)) == 10
    assert not any(sl.is_indo_european(registry.languages[c]) for c in family.languages)
    script = sl.select(registry, "script", "all", 8, fake_distances, SOLVER_ARGS, seed=0)
    scripts = [registry.languages[c].script for c in script.languages]
    assert len(set(scripts)) == 8 and "Latin" not in scripts
    wide = sl.select(
        registry, "family", "all", 26, fake_distances, SOLVER_ARGS, seed=0, family_include_indo_european=True
    )
    assert len({sl.family_label(registry.languages[c]) for c in wide.languages}) == 26
    assert not any(registry.languages[c].family == "Germanic" for c in wide.languages)  # English holds Germanic


def test_random_matches_the_loader_and_reference_draw(registry, tmp_path):
    selection = sl.select(registry, "random", "all", 10, None, SOLVER_ARGS, seed=17)
    np.random.seed(17)
    expected = list(np.random.choice(registry.pool(), 10, replace=False))
    assert selection.languages == expected
    assert selection.languages == lang_registry.load_subset("random_10", registry=registry, seed=17).languages
    again = sl.select(registry, "random", "joshi2", 5, None, SOLVER_ARGS, seed=17)
    np.random.seed(17)
    assert again.languages == list(np.random.choice(sl.pool_codes(registry, "joshi2"), 5, replace=False))


def test_every_paper_subset_strategy_is_understood():
    for path in sorted(lang_registry.SUBSETS_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if (data.get("source") or {}).get("table") not in (6, 8):
            continue  # not a row of the paper (e.g. a hand-made quickstart subset)
        parsed, pool = sl.parse_file_strategy(data["strategy"])
        assert parsed in sl.STRATEGIES and pool in sl.POOLS, path
    assert sl.parse_file_strategy("joshi35-uriel") == ("uriel-most", "joshi3-5")
    assert sl.parse_file_strategy("family-indo-european") == ("family-ie", "all")
    assert sl.parse_file_strategy("unseen-xlmr-family") == ("family", "unseen-xlmr")


# ---------------------------------------------------------------------------------------------------------------------
# Command line: YAML output, --compare, errors
# ---------------------------------------------------------------------------------------------------------------------


def test_yaml_output_loads_and_compare_gives_jaccard_one(registry, tmp_path, cache_dir, capsys):
    output = tmp_path / "my_uriel_least_6.yaml"
    report = run(["--strategy", "uriel-least", "--n", "6", "--pool", "latin", "--output", str(output)], cache_dir)
    assert report["proven_optimal"] and report["solver"] in ("exhaustive", "milp")
    subset = lang_registry.load_subset(output, registry=registry)
    assert subset.languages == report["languages"] and subset.declared_n == 6
    assert subset.strategy == "latin-uriel-least"
    assert any("Objective" in note for note in subset.notes)
    printed = capsys.readouterr().out
    assert "proven optimal: True" in printed and "Wrote" in printed

    comparison = run(["--compare", str(output), "--report_json", str(tmp_path / "report.json")], cache_dir)
    assert comparison["jaccard"] == 1.0 and comparison["overlap"] == 6
    assert comparison["file_rank"]["rank_from_least_diverse"] == 1
    assert json.loads((tmp_path / "report.json").read_text())["jaccard"] == 1.0


def test_max_selection_is_deterministic_and_documented(registry, tmp_path, cache_dir):
    args = ["--strategy", "uriel-most", "--n", "12", "--milp_time_limit", "0.5", "--seed", "3"]
    first = run([*args, "--output", str(tmp_path / "a.yaml")], cache_dir)
    second = run([*args, "--output", str(tmp_path / "b.yaml")], cache_dir)
    assert first["languages"] == second["languages"] and len(first["languages"]) == 12
    assert first["solver"] == "local-search+milp" and first["bound"] >= first["objective"]
    data = yaml.safe_load((tmp_path / "a.yaml").read_text())
    assert set(data) <= set(lang_registry.SUBSET_KEYS)
    assert data["strategy"] == "uriel-most" and data["n"] == 12


def test_random_yaml_is_drawn_by_the_loader(registry, tmp_path, cache_dir):
    output = tmp_path / "random_7.yaml"
    report = run(["--strategy", "random", "--n", "7", "--seed", "23", "--output", str(output)], cache_dir)
    data = yaml.safe_load(output.read_text())
    assert data["languages"] is None and data["pool"] == "all" and data["strategy"] == "random"
    assert lang_registry.load_subset(output, registry=registry, seed=23).languages == report["languages"]
    comparison = run(["--compare", str(output), "--seed", "23"], cache_dir)
    assert comparison["jaccard"] == 1.0


def test_compare_paper_row_reports_overlap_and_percentile(cache_dir, capsys):
    report = run(["--compare", "subsets/uriel_5.yaml"], cache_dir)
    assert report["strategy"] == "uriel-most" and report["n_computed"] == 5
    assert report["file_rank"]["method"] == "exact" and 0 <= report["file_rank"]["percentile"] <= 100
    assert report["selection"]["proven_optimal"]
    out = capsys.readouterr().out
    assert "Jaccard" in out and "percentile" in out
    if report["jaccard"] < sl.LOW_OVERLAP:
        assert "Low overlap" in out
    pool_row = run(["--compare", "subsets/xtremer_47.yaml"], cache_dir)
    assert pool_row["strategy"] == "pool" and pool_row["jaccard"] == 1.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategy", "uriel-most", "--n", "5", "--pool", "joshi9"], "Unknown pool 'joshi9'"),
        (["--strategy", "uriel-most", "--n", "30", "--pool", "africa"], "larger than the 21 candidate"),
        (["--strategy", "uriel-most", "--n", "5", "--features", "wals"], "Unknown feature set"),
        (["--strategy", "uriel-best", "--n", "5"], "Unknown strategy"),
        (["--strategy", "uriel-most"], "needs --n"),
        (["--n", "5"], "Pass --strategy"),
        (["--strategy", "family", "--n", "30"], "family_include_indo_european"),
        (["--strategy", "script", "--n", "19"], "distinct scripts"),
        (["--strategy", "uriel-most", "--n", "0"], "positive"),
        (["--strategy", "uriel-most", "--n", "3", "--features", "urielplus", "--code_style", "macro"], "Glottocodes"),
    ],
)
def test_bad_input_gives_clear_errors(argv, message, cache_dir):
    with pytest.raises(ValueError, match=message):
        run(argv, cache_dir)


def test_existing_output_is_not_overwritten(tmp_path, cache_dir):
    output = tmp_path / "taken.yaml"
    output.write_text("keep me\n")
    with pytest.raises(ValueError, match="overwrite_output"):
        run(["--strategy", "random", "--n", "3", "--output", str(output)], cache_dir)
    assert output.read_text() == "keep me\n"


def test_output_that_is_a_folder_leaves_no_temporary_file(tmp_path, cache_dir):
    folder = tmp_path / "subsets"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"--output .*subsets is a folder; give the path of the YAML file"):
        run(["--strategy", "random", "--n", "3", "--output", str(folder), "--overwrite_output"], cache_dir)
    assert list(tmp_path.iterdir()) == [folder] and not any(folder.iterdir())
