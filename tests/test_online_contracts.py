"""`pytest -m online`: the Hub datasets still look the way the scripts expect them to (DESIGN.md §5).

Each check loads the first rows of one source by the id, config, split and revision the scripts use, and compares
column names, label names and their order, config names and split names with the scripts' own constants and the
language registry. Run it before a release, from a machine that reaches the Hub:

    .venv/bin/python -m pytest -m online -q tests/test_online_contracts.py

The default test run deselects these tests (pyproject.toml: `-m "not online"`); where the Hub cannot be reached they
are skipped in a second, with one reason. The contract checks themselves also run offline, on the schema-faithful
fixture files (the last tests of this module), so that a broken check does not wait for a release to show.
"""

from __future__ import annotations

import itertools
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest

import downstream_utils
import lang_registry
import realign_utils
import run_token_classification as rtc
import run_xnli

online = pytest.mark.online
ROWS = 5  # first rows read from every source
PROBE_TIMEOUT_S = 3.0


def _reachable(url: str) -> str | None:
    """None when a TCP connection to `url`'s host opens within the timeout, else why not."""
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        return None
    except OSError as err:
        return f"{host}:{port} unreachable ({type(err).__name__}: {err})"


@pytest.fixture(scope="module")
def hub():
    """Online for this module: undo the test suite's offline switches, or skip when the Hub cannot be reached."""
    import datasets
    import huggingface_hub

    reason = _reachable(huggingface_hub.constants.ENDPOINT)
    if reason:
        pytest.skip(f"Hub not reachable, online contract checks skipped: {reason}")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            patch.setenv(name, "0")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False, raising=False)
        yield


@pytest.fixture(scope="module")
def github():
    reason = _reachable("https://raw.githubusercontent.com")
    if reason:
        pytest.skip(f"GitHub not reachable, the MasakhaPOS raw files are not checked: {reason}")


# -- reading the Hub as the scripts do --------------------------------------------------------------------------------


def first_rows(hub_id: str, config: str | None, split: str, revision: str | None = None):
    """(features, first rows) of one split, streamed: `load_dataset` with the scripts' id, config, split, revision."""
    import datasets

    stream = datasets.load_dataset(hub_id, config, split=split, revision=revision, streaming=True)
    rows = list(itertools.islice(stream, ROWS))
    features = stream.features
    if features is None:
        features = datasets.load_dataset_builder(hub_id, config, revision=revision).info.features
    return features, rows


def parquet_branch_files(hub_id: str, revision: str | None = None) -> list[str]:
    from huggingface_hub import HfApi

    return HfApi().list_repo_files(hub_id, repo_type="dataset", revision=revision or "refs/convert/parquet")


def parquet_branch_has(files: list[str], config: str, split: str) -> bool:
    """The layouts load_hub_split reads: <config>/<split>/*.parquet or <config>/*-<split>[-NNNNN-of-NNNNN].parquet."""
    pattern = re.compile(
        rf"^{re.escape(config)}/({re.escape(split)}/[^/]+|[^/]*-{re.escape(split)}(-[^/]*)?)\.parquet$"
    )
    return any(pattern.match(f) for f in files)


def split_names(hub_id: str, config: str | None, revision: str | None = None) -> list[str]:
    import datasets

    return list(datasets.get_dataset_split_names(hub_id, config, revision=revision))


def config_names(hub_id: str, revision: str | None = None) -> list[str]:
    import datasets

    return list(datasets.get_dataset_config_names(hub_id, revision=revision))


# -- the contracts (pure: also checked offline on the fixtures below) ------------------------------------------------


def tagging_problems(features, rows: list[dict], source: rtc.TaggingSource, origin: str) -> list[str]:
    """What in one token-classification split differs from what run_token_classification.py expects of `source`."""
    problems = []
    missing = [c for c in ("tokens", source.label_column) if c not in features]
    if missing:
        return [f"{origin}: missing column(s) {missing}; has {list(features)}"]
    names = downstream_utils.class_label_names(features[source.label_column])
    if names is not None and tuple(names) != source.label_names:
        problems.append(
            f"{origin}: {source.label_column} names {names}, the script declares {list(source.label_names)}"
        )
    allowed = set(source.label_names)
    for i, row in enumerate(rows):
        tags = row[source.label_column]
        if len(tags) != len(row["tokens"]):
            problems.append(f"{origin}: row {i} has {len(row['tokens'])} tokens but {len(tags)} tags")
        if names is None and any(
            t not in allowed and not (isinstance(t, int) and 0 <= t < len(allowed)) for t in tags
        ):
            problems.append(f"{origin}: row {i} has tags outside {sorted(allowed)}: {tags}")
    if not rows:
        problems.append(f"{origin}: no rows")
    return problems


def nli_problems(
    features, rows: list[dict], source: run_xnli.NLISource, labels: tuple[str, ...], origin: str
) -> list[str]:
    """What in one sentence-classification split differs from what run_xnli.py expects of `source`."""
    missing = [c for c in (*source.text_columns, source.label_column) if c not in features]
    if missing:
        return [f"{origin}: missing column(s) {missing}; has {list(features)}"]
    problems = []
    names = downstream_utils.class_label_names(features[source.label_column])
    renames = dict(source.label_renames)
    if names is not None and tuple(names) != labels:
        problems.append(f"{origin}: {source.label_column} names {names}, the script expects {list(labels)}")
    for i, row in enumerate(rows):
        value = row[source.label_column]
        if isinstance(value, str):
            name = run_xnli.normalize_label_name(value)
            if renames.get(name, name) not in labels:
                problems.append(f"{origin}: row {i} label {value!r} is none of {list(labels)}")
        elif not (isinstance(value, int) and 0 <= value < len(labels)):
            problems.append(f"{origin}: row {i} label {value!r} is not an id 0..{len(labels) - 1}")
        if any(not isinstance(row[c], str) for c in source.text_columns):
            problems.append(f"{origin}: row {i} has a text that is not a string")
    if not rows:
        problems.append(f"{origin}: no rows")
    return problems


def masakhapos_script_names(script: str) -> list[str]:
    """The ClassLabel names list of the masakhane/masakhapos loading script (its upos feature)."""
    match = re.search(r"names\s*=\s*\[(.*?)\]", script, flags=re.DOTALL)
    return re.findall(r"[\"']([A-Z]+)[\"']", match.group(1)) if match else []


# -- online: token classification -------------------------------------------------------------------------------------


@online
@pytest.mark.parametrize("name", ["udpos", "xtreme_udpos", "wikiann"])
def test_tagging_sources_load_dataset(hub, name):
    source = rtc.SOURCES[name]
    configs = rtc.source_configs(source)
    english = configs[realign_utils.ENGLISH]
    features, rows = first_rows(source.hub_id, english, "train")
    problems = tagging_problems(features, rows, source, f"{source.hub_id} {english}/train")
    available = set(config_names(source.hub_id))
    absent = sorted(c for c in configs.values() if c not in available)
    if absent:
        problems.append(f"{source.hub_id}: registry configs {absent} are not on the Hub")
    for config in sorted(set(configs.values()) - set(absent)):
        splits = split_names(source.hub_id, config)
        if source.split not in splits:
            problems.append(f"{source.hub_id} {config}: no {source.split!r} split (has {splits})")
    if "train" not in split_names(source.hub_id, english):
        problems.append(f"{source.hub_id} {english}: no train split")
    if name == "wikiann":
        problems += [f"{source.hub_id}: no column {c}" for c in ("langs", "spans") if c not in features]
    assert not problems, "\n".join(problems)


@online
def test_masakhaner_parquet_branch(hub):
    source = rtc.SOURCES["masakhaner"]
    files = parquet_branch_files(source.hub_id)
    configs = rtc.source_configs(source)
    problems = [
        f"{source.hub_id}: refs/convert/parquet has no {c}/{source.split}"
        for c in configs.values()
        if not parquet_branch_has(files, c, source.split)
    ]
    dataset = downstream_utils.load_hub_split(source.hub_id, "yor", source.split, parquet_branch=True)
    problems += tagging_problems(
        dataset.features, dataset.select(range(ROWS)).to_list(), source, f"{source.hub_id} yor/{source.split}"
    )
    if "id" not in dataset.column_names:
        problems.append(f"{source.hub_id}: no id column")
    assert not problems, "\n".join(problems)


@online
def test_masakhapos_raw_files_and_script_label_order(hub, github):
    from datasets.utils.file_utils import cached_path
    from huggingface_hub import hf_hub_download

    source = rtc.SOURCES["masakhapos"]
    script = Path(hf_hub_download(source.hub_id, "masakhapos.py", repo_type="dataset")).read_text(encoding="utf-8")
    problems = []
    if tuple(masakhapos_script_names(script)) != source.label_names:
        problems.append(
            f"{source.hub_id} loading script names {masakhapos_script_names(script)}, the script declares "
            f"{list(source.label_names)}"
        )
    for config in rtc.source_configs(source).values():
        url = rtc.MASAKHAPOS_RAW_URL.format(revision="main", config=config, split=source.split)
        dataset = rtc.read_token_tag_lines(Path(cached_path(url)), source.label_column)
        problems += tagging_problems(dataset.features, dataset.select(range(ROWS)).to_list(), source, url)
        unknown = set(itertools.chain.from_iterable(dataset[source.label_column])) - set(source.label_names)
        if unknown:
            problems.append(f"{url}: tags {sorted(unknown)} are not MasakhaPOS tags")
    assert not problems, "\n".join(problems)


# -- online: sentence classification ----------------------------------------------------------------------------------


@online
@pytest.mark.parametrize("name", ["xnli", "afrixnli", "americasnli", "myxnli"])
def test_nli_sources_load_dataset(hub, name):
    source = run_xnli.SOURCES[name]
    configs = downstream_utils.eval_configs(name)
    problems = []
    for config in sorted(set(configs.values())):
        splits = split_names(source.hub_id, config, source.revision)
        if source.split not in splits:
            problems.append(f"{source.hub_id} {config}: no {source.split!r} split (has {splits})")
    config = configs.get(realign_utils.ENGLISH) or next(iter(configs.values()))
    split = "train" if name == run_xnli.TRAIN_SOURCE else source.split
    features, rows = first_rows(source.hub_id, config, split, source.revision)
    problems += nli_problems(features, rows, source, run_xnli.NLI_LABELS, f"{source.hub_id} {config}/{split}")
    assert not problems, "\n".join(problems)


@online
def test_indonli_parquet_branch(hub):
    source = run_xnli.SOURCES["indonli"]
    files = parquet_branch_files(source.hub_id)
    problems = [
        f"{source.hub_id}: refs/convert/parquet has no indonli/{s}"
        for s in ("train", "validation", "test_lay", "test_expert")
        if not parquet_branch_has(files, "indonli", s)
    ]
    dataset = downstream_utils.load_hub_split(source.hub_id, "indonli", source.split, parquet_branch=True)
    problems += nli_problems(
        dataset.features,
        dataset.select(range(ROWS)).to_list(),
        source,
        run_xnli.NLI_LABELS,
        f"{source.hub_id} indonli/{source.split}",
    )
    assert not problems, "\n".join(problems)


@online
def test_sib200(hub):
    source = run_xnli.SIB200_SOURCES["sib200"]
    configs = downstream_utils.eval_configs("sib200")
    available = set(config_names(source.hub_id))
    problems = [
        f"{source.hub_id}: registry config {c} is not on the Hub" for c in configs.values() if c not in available
    ]
    for split in ("train", "test"):
        features, rows = first_rows(source.hub_id, configs[realign_utils.ENGLISH], split)
        problems += nli_problems(features, rows, source, run_xnli.SIB200_LABELS, f"{source.hub_id} eng_Latn/{split}")
        if "index_id" not in features:
            problems.append(f"{source.hub_id}: no index_id column (analyze_alignment.py aligns SIB-200 by it)")
    assert not problems, "\n".join(problems)


# -- online: realignment and diagnostics data -------------------------------------------------------------------------


@online
def test_opus100_configs_and_columns(hub):
    registry = lang_registry.load_registry()
    configs = sorted(
        lang.parallel["config"]
        for lang in registry.languages.values()
        if lang.parallel and lang.parallel["source"] == "opus100"
    )
    available = set(config_names("Helsinki-NLP/opus-100"))
    problems = [f"Helsinki-NLP/opus-100: no config {c}" for c in configs if c not in available]
    features, rows = first_rows("Helsinki-NLP/opus-100", "en-fr", "train")
    if "translation" not in features or any(set(r["translation"]) != {"en", "fr"} for r in rows):
        problems.append(f"Helsinki-NLP/opus-100 en-fr: expected translation {{en, fr}}, got {rows[:1]}")
    assert not problems, "\n".join(problems)


@online
def test_nllb_raw_file(hub):
    import datasets

    reason = _reachable("https://storage.googleapis.com")
    if reason:
        pytest.skip(f"NLLB's file host not reachable: {reason}")
    registry = lang_registry.load_registry()
    pair = next(
        lang.parallel["config"]
        for lang in registry.languages.values()
        if lang.parallel and lang.parallel["source"] == "nllb"
    )
    first, second = pair.split("-")
    url = f"https://storage.googleapis.com/allennlp-data-bucket/nllb/{first}-{second}.gz"  # as run_realign.py reads it
    stream = datasets.load_dataset(
        "csv", data_files=url, delimiter="\t", header=None, quoting=3, split="train", streaming=True
    )
    rows = list(itertools.islice(stream, ROWS))
    assert rows and all(len(r) >= 5 and all(isinstance(r[k], str) for k in list(r)[:2]) for r in rows), rows


@online
def test_tatoeba(hub):
    from analyze_alignment import TATOEBA_HUB_ID

    configs = downstream_utils.eval_configs("tatoeba")
    available = set(config_names(TATOEBA_HUB_ID))
    problems = [
        f"{TATOEBA_HUB_ID}: registry config {c} is not on the Hub" for c in configs.values() if c not in available
    ]
    features, rows = first_rows(TATOEBA_HUB_ID, "deu-eng", "test")
    problems += [f"{TATOEBA_HUB_ID} deu-eng: no column {c}" for c in ("sentence1", "sentence2") if c not in features]
    assert not problems, "\n".join(problems)


# -- the checks themselves, offline, on the fixture files that copy the Hub schemas -----------------------------------


def _local(path: Path, source_name: str):
    if path.suffix == ".txt":
        return rtc.read_token_tag_lines(path, rtc.SOURCES[source_name].label_column)
    return downstream_utils.read_local_table(path)


def test_contract_checks_pass_on_the_fixtures_and_catch_drift(downstream_dir):
    for name, config in (("udpos", "en"), ("wikiann", "en"), ("masakhapos", "hau")):
        split = "test" if name == "masakhapos" else "train"
        path = downstream_utils.find_local_split(str(downstream_dir), name, config, split, (".parquet", ".txt"))
        dataset = _local(path, name)
        assert tagging_problems(dataset.features, dataset.to_list()[:ROWS], rtc.SOURCES[name], str(path)) == []
    masakhaner = downstream_utils.read_local_table(downstream_dir / "masakhaner" / "yor" / "test")
    assert tagging_problems(masakhaner.features, masakhaner.to_list(), rtc.SOURCES["masakhaner"], "m") == []
    for name, config, split in (
        ("xnli", "en", "train"),
        ("afrixnli", "yor", "test"),
        ("myxnli", "default", "test"),
        ("indonli", "indonli", "test_expert"),
    ):
        path = downstream_utils.find_local_split(
            str(downstream_dir), name, config, split, (".parquet", ".tsv", ".jsonl")
        )
        dataset = downstream_utils.read_local_table(path)
        source = run_xnli.SOURCES[name]
        assert nli_problems(dataset.features, dataset.to_list()[:ROWS], source, run_xnli.NLI_LABELS, str(path)) == []

    # Drift is caught: a label order that is not the declared one, a renamed column, a label that is none of ours.
    import datasets

    wikiann = downstream_utils.read_local_table(downstream_dir / "wikiann" / "en" / "train.parquet")
    features = wikiann.features.copy()
    features["ner_tags"] = datasets.List(datasets.ClassLabel(names=list(reversed(rtc.WIKIANN_TAGS))))
    assert "names" in tagging_problems(features, wikiann.to_list()[:2], rtc.SOURCES["wikiann"], "w")[0]
    assert "missing column" in tagging_problems({"tokens": None}, [], rtc.SOURCES["wikiann"], "w")[0]
    rows = [{"premise": "a", "hypothesis": "b", "label": "maybe"}]
    features = {"premise": None, "hypothesis": None, "label": datasets.Value("string")}
    assert "none of" in nli_problems(features, rows, run_xnli.SOURCES["xnli"], run_xnli.NLI_LABELS, "x")[0]
    rows = [{"premise": "a", "hypothesis": "b", "label": "c"}]
    assert nli_problems(features, rows, run_xnli.SOURCES["indonli"], run_xnli.NLI_LABELS, "i") == []


def test_masakhapos_script_names_parser():
    script = 'datasets.features.ClassLabel(\n    names=[\n        "NOUN",\n        "PUNCT", "ADP"\n    ]\n)'
    assert masakhapos_script_names(script) == ["NOUN", "PUNCT", "ADP"]


def test_parquet_branch_layouts_recognised():
    files = ["yor/test/0000.parquet", "hau/masakhaner2-test.parquet", "ibo/masakhaner2-train-00000-of-00002.parquet"]
    assert parquet_branch_has(files, "yor", "test") and parquet_branch_has(files, "hau", "test")
    assert parquet_branch_has(files, "ibo", "train") and not parquet_branch_has(files, "ibo", "test")
    assert not parquet_branch_has(files, "yo", "test")


def test_offline_skip_is_fast_and_clean():
    """With no route to the Hub the probe answers at once (the suite's online checks then skip with one reason)."""
    import time

    start = time.monotonic()
    assert _reachable("https://nonexistent.invalid") is not None
    assert time.monotonic() - start < PROBE_TIMEOUT_S + 1
