"""Tests for the language registry (languages.yaml), the subset files (subsets/*.yaml) and their loader."""

import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lang_registry  # noqa: E402
from lang_registry import (  # noqa: E402
    ENTRY_KEYS,
    EVAL_RESOURCES,
    Language,
    available_subsets,
    load_registry,
    load_subset,
    parse_language_list,
)

# Table 6, row "All 65 languages", as printed (gaz and swh are Table 5's orm and swa).
TABLE6_ALL_65 = (
    "afr amh ara aze bul ben deu ell spa est eus fas fin fra guj heb hin hun ind ita jpn kat kaz kor lit mal mar msa "
    "mya nld pan pol por ron rus tam tha tur ukr urd vie zho bam ewe fon hau ibo kin lin lug luo mos nya gaz sna swh "
    "tsn twi wol xho yor zul jav tgl tel"
).split()
SUBSET_FILES = sorted((ROOT / "subsets").glob("*.yaml"))
TABLE6_FILES = [p for p in SUBSET_FILES if not p.stem.startswith("random_") and p.stem != "quickstart_udhr"]
EVAL_ONLY = ["aym", "bzd", "cni", "grn", "hch", "nah", "oto", "quy", "shp", "tar", "bbj", "pcm", "sot"]


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def raw_entries():
    return yaml.safe_load((ROOT / "languages.yaml").read_text(encoding="utf-8"))["languages"]


def write_registry(tmp_path, entries):
    path = tmp_path / "languages.yaml"
    path.write_text(yaml.safe_dump({"languages": entries}, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def write_subset(tmp_path, text, name="custom"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------


def test_pool_is_table6_order(registry):
    aliases = {"gaz": "orm", "swh": "swa"}
    assert registry.pool() == [aliases.get(code, code) for code in TABLE6_ALL_65]
    assert len(registry.pool()) == 65
    codes = list(registry.languages)
    assert codes[:65] == registry.pool(), "pool entries come first, in Table 6 order"


def test_registry_covers_english_and_eval_only_languages(registry):
    assert registry.english.code == "eng"
    assert not registry.english.pool
    assert set(registry.languages) == set(registry.pool()) | {"eng"} | set(EVAL_ONLY)
    for code in EVAL_ONLY:
        assert not registry.get(code).pool
        assert registry.get(code).parallel is None


def test_every_field_present(raw_entries):
    for entry in raw_entries:
        assert list(entry) == list(ENTRY_KEYS), entry["code"]
        assert set(entry["eval"]) == set(EVAL_RESOURCES), entry["code"]


def test_flags_and_counts(registry):
    pool = [registry.get(code) for code in registry.pool()]
    assert sum(language.xtremer for language in pool) == 47
    assert sum(language.africa for language in pool) == 21
    assert sum(language.seen_mbert for language in pool) == 46
    assert sum(language.seen_xlmr for language in pool) == 49
    assert Counter(language.parallel["source"] for language in pool) == {"opus100": 38, "nllb": 27}
    assert registry.get("yor").seen_mbert and not registry.get("yor").seen_xlmr
    assert registry.get("orm").seen_xlmr and not registry.get("orm").seen_mbert
    assert registry.get("fra").resource_level == "HRL"
    assert registry.get("kor").resource_level == "MRL"
    assert registry.get("fon").resource_level == "LRL"
    assert hash(registry.get("fra")) == hash(registry.get("fra"))


def test_parallel_configs(registry):
    for code in registry.pool():
        language = registry.get(code)
        if language.parallel["source"] == "opus100":
            assert language.parallel["config"] == "-".join(sorted([language.iso639_1, "en"]))
        else:
            assert language.parallel["config"] == "-".join(sorted(["eng_Latn", language.flores]))
    assert registry.get("afr").parallel == {"source": "opus100", "config": "af-en"}
    assert registry.get("fra").parallel == {"source": "opus100", "config": "en-fr"}
    assert registry.get("orm").parallel == {"source": "nllb", "config": "eng_Latn-gaz_Latn"}
    assert registry.get("swa").parallel == {"source": "nllb", "config": "eng_Latn-swh_Latn"}
    assert registry.get("amh").parallel == {"source": "nllb", "config": "amh_Ethi-eng_Latn"}


def test_languages_with(registry):
    assert len(registry.languages_with("udpos")) == 38
    assert "eng" in registry.languages_with("udpos")
    assert registry.languages_with("masakhaner") == registry.languages_with("masakhapos")
    assert len(registry.languages_with("masakhaner")) == 20
    assert len(registry.languages_with("americasnli")) == 10
    assert len(registry.languages_with("xnli")) == 15
    assert registry.languages_with("indonli") == ["ind"]
    assert registry.languages_with("myxnli") == ["mya"]
    assert registry.get("swa").eval["masakhaner"] == "swa" and registry.get("swa").eval["xnli"] == "sw"
    assert registry.get("grn").eval["americasnli"] == "gn"
    for code in ("hau", "zul", "xho", "orm"):
        assert registry.get(code).eval["wikiann"] is None
    with pytest.raises(ValueError, match="udpos"):
        registry.languages_with("pos")


@pytest.mark.parametrize(
    "code, expected",
    [
        ("gaz", "orm"),
        ("gax", "orm"),
        ("swh", "swa"),
        ("fr", "fra"),
        ("FRA", "fra"),
        ("cmn", "zho"),
        ("zh", "zho"),
        ("arb", "ara"),
        ("pes", "fas"),
        ("zsm", "msa"),
        ("azj", "aze"),
        ("ekk", "est"),
        ("en", "eng"),
        ("gn", "grn"),
    ],
)
def test_alias_resolution(registry, code, expected):
    assert registry.resolve(code) == expected
    assert registry.get(code).code == expected


def test_aliases_are_other_spellings_only(registry):
    """Each accepted spelling of a language once: the messages that list them printed "om, gaz, gax, om"."""
    oromo = registry.get("orm")
    assert oromo.aliases == ("gaz", "gax") and oromo.iso639_1 == "om"
    assert registry.resolve("om") == registry.resolve("gax") == "orm"
    for language in registry.languages.values():
        spellings = [language.code, *language.aliases, language.iso639_1]
        assert len(spellings) == len(set(spellings)), language.code


def test_alias_mapping_is_logged(registry, caplog):
    with caplog.at_level(logging.INFO, logger="lang_registry"):
        registry.resolve("gaz")
        registry.resolve("fra")
    messages = [record.getMessage() for record in caplog.records]
    assert "Mapped language code 'gaz' to 'orm'" in messages
    assert not any("'fra'" in message for message in messages), "canonical codes are not reported as mappings"


@pytest.mark.parametrize("code, suggestion", [("frx", "fra"), ("yor_Latn", "yor"), ("swahili", "swa")])
def test_unknown_code_suggests_nearest(registry, code, suggestion):
    with pytest.raises(ValueError) as error:
        registry.resolve(code)
    message = str(error.value)
    assert repr(code) in message and "Did you mean" in message
    assert suggestion in message.split("Did you mean:")[1].split("?")[0]


def test_default_registry_is_cached():
    assert load_registry() is load_registry()


def test_valid_copy_loads(tmp_path, raw_entries):
    registry = load_registry(write_registry(tmp_path, raw_entries))
    assert registry.pool() == load_registry().pool()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda entries: entries.append(dict(entries[0])), "duplicate code 'afr'"),
        (lambda entries: entries[3].pop("script"), r"missing key\(s\) \['script'\]"),
        (lambda entries: entries[3].update(joshi=7), "joshi must be an integer from 0 to 5"),
        (lambda entries: entries[3].update(joshi="3"), "joshi must be int"),
        (lambda entries: entries[3].update(joshi=True), "joshi must be int"),
        (lambda entries: entries[3].update(seen_mbert="yes"), "seen_mbert must be bool"),
        (lambda entries: entries[3].update(colour="red"), r"unknown key\(s\) \['colour'\]"),
        (lambda entries: entries[3]["eval"].update(squad="x"), "eval must have exactly the keys"),
        (lambda entries: entries[3].update(aliases=["fr"]), "code/alias 'fr' is already used by"),
        (lambda entries: entries[3].update(pool=False, parallel=None), "expected 65 pool languages"),
        (lambda entries: entries[3].update(flores="ara-Arab"), "flores must look like"),
        (lambda entries: entries[3].update(aliases=["ar", False]), "YAML reads an unquoted no, off or n as false"),
    ],
)
def test_bad_registry_is_rejected(tmp_path, raw_entries, mutate, expected):
    entries = [dict(entry, eval=dict(entry["eval"])) for entry in raw_entries]
    mutate(entries)
    path = write_registry(tmp_path, entries)
    with pytest.raises(ValueError, match=expected) as error:
        load_registry(path)
    assert str(path) in str(error.value)


def test_registry_not_a_mapping(tmp_path):
    path = tmp_path / "languages.yaml"
    path.write_text("- code: afr\n", encoding="utf-8")
    with pytest.raises(ValueError, match="top-level key 'languages'"):
        load_registry(path)


def test_language_is_frozen(registry):
    with pytest.raises(AttributeError):
        registry.get("fra").joshi = 1  # type: ignore[misc]
    assert isinstance(registry.get("fra"), Language)


# ---------------------------------------------------------------------------------------------------------------------
# Subset files
# ---------------------------------------------------------------------------------------------------------------------


def test_subset_file_inventory():
    assert len(SUBSET_FILES) == 62
    assert {path.stem for path in SUBSET_FILES} - {path.stem for path in TABLE6_FILES} == {
        "random_5",
        "random_10",
        "random_20",
        "random_40",
        "quickstart_udhr",  # the offline quickstart's languages, not a row of the paper
    }
    sections = Counter(yaml.safe_load(path.read_text(encoding="utf-8"))["source"]["section"] for path in TABLE6_FILES)
    assert sections == {
        "Baseline": 3,
        "Featural Diversity": 8,
        "Phylogenetic Diversity": 7,
        "Script Diversity": 10,
        "Ablation Languages": 29,
    }
    assert sorted(available_subsets()) == sorted(path.stem for path in SUBSET_FILES)


@pytest.mark.parametrize("path", SUBSET_FILES, ids=lambda path: path.stem)
def test_subset_schema(path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    expected = ["name", "description", "source", "strategy", "n", "languages", "notes"]
    if data["strategy"] == "random":
        expected.insert(6, "pool")
    assert list(data) == expected
    assert data["name"] == path.stem
    assert set(data["source"]) == {"table", "section", "row", "n_printed"}
    assert data["source"]["n_printed"] == data["n"]
    assert all(isinstance(note, str) and note for note in data["notes"])


@pytest.mark.parametrize("path", TABLE6_FILES, ids=lambda path: path.stem)
def test_every_subset_code_resolves(path, registry):
    subset = load_subset(path, registry=registry)
    pool = set(registry.pool())
    for code in subset.printed:
        assert registry.resolve(code) in pool, f"{path.name}: {code}"
    assert len(subset.languages) == len(subset.printed), "no Table 6 row repeats a code or lists English"


def test_uriel_20_lists_22_and_warns(registry, caplog):
    with caplog.at_level(logging.WARNING, logger="lang_registry"):
        subset = load_subset("uriel_20", registry=registry)
    assert subset.declared_n == 20
    assert len(subset.printed) == 22 and len(subset.languages) == 22
    assert subset.strategy == "uriel-most"
    assert subset.source["row"] == "Most diverse from English"
    assert any("declares n=20 but lists 22" in record.getMessage() for record in caplog.records)


def test_subset_by_path_and_name_agree(registry):
    by_name = load_subset("family_25", registry=registry)
    by_path = load_subset(ROOT / "subsets" / "family_25.yaml", registry=registry)
    assert by_name.languages == by_path.languages
    assert "kor" in by_name.languages and "lin" in by_name.languages
    assert by_name.path == by_path.path


def test_subset_aliases_are_logged(registry, caplog):
    with caplog.at_level(logging.INFO, logger="lang_registry"):
        subset = load_subset("uriel_5", registry=registry)
    assert subset.languages == ["fon", "kat", "kaz", "lin", "orm"]
    assert subset.printed == ["fon", "kat", "kaz", "lin", "gaz"]
    assert any(record.getMessage() == "Mapped language code 'gaz' to 'orm'" for record in caplog.records)


def test_known_anomalies_are_recorded():
    def data(name):
        return yaml.safe_load((ROOT / "subsets" / f"{name}.yaml").read_text(encoding="utf-8"))

    assert len(data("joshi35_random")["languages"]) == 37 and data("joshi35_random")["n"] == 23
    assert (
        data("seen_mbert_script")["languages"]
        == data("seen_xlmr_script")["languages"]
        == data("script_10")["languages"]
    )
    assert "yor" in data("seen_mbert_random")["languages"] and "yor" in data("unseen_mbert_random")["languages"]
    assert any("swapped" in note for note in data("latin_most_20")["notes"])
    assert any("swapped" in note for note in data("latin_least_20")["notes"])
    for name, lost in [
        ("family_25", "kor lin"),
        ("family_ie_20", "por pan"),
        ("latin_most_41", "hun ibo"),
        ("latin_most_41", "por ron"),
        ("latin_least_20", "spa tgl"),
    ]:
        assert any(lost in note for note in data(name)["notes"]), (name, lost)
    for name, listed in [
        ("seen_mbert_random", 46),
        ("seen_xlmr_random", 49),
        ("unseen_mbert_random", 20),
        ("unseen_xlmr_random", 16),
    ]:
        assert len(data(name)["languages"]) == listed


# ---------------------------------------------------------------------------------------------------------------------
# Random subsets
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 10, 20, 40])
def test_random_subset_matches_reference_draw(registry, n):
    for seed in (17, 23, 42, 66):
        subset = load_subset(f"random_{n}", registry=registry, seed=seed)
        np.random.seed(seed)
        expected = list(np.random.choice(registry.pool(), n, replace=False))
        assert subset.languages == expected
        assert len(subset.languages) == len(set(subset.languages)) == n
        assert set(subset.languages) <= set(registry.pool())
        assert subset.printed is None and subset.strategy == "random"


def test_random_subset_is_deterministic_per_seed(registry):
    first = load_subset("random_10", registry=registry, seed=42).languages
    assert load_subset("random_10", registry=registry, seed=42).languages == first
    assert load_subset("random_10", registry=registry, seed=17).languages != first


def test_random_subset_needs_seed(registry):
    with pytest.raises(ValueError, match="random subsets need the run seed"):
        load_subset("random_5", registry=registry)


def test_random_subset_from_another_pool(tmp_path, registry):
    path = write_subset(tmp_path, "name: j3\nstrategy: random\nn: 10\nlanguages: null\npool: joshi3_random\n")
    pool = load_subset("joshi3_random", registry=registry).languages
    subset = load_subset(path, registry=registry, seed=23)
    np.random.seed(23)
    assert subset.languages == list(np.random.choice(pool, 10, replace=False))
    too_many = write_subset(tmp_path, "strategy: random\nn: 18\nlanguages: null\npool: joshi3_random\n", "big")
    with pytest.raises(ValueError, match="cannot draw n=18"):
        load_subset(too_many, registry=registry, seed=23)
    itself = write_subset(tmp_path, "strategy: random\nn: 2\nlanguages: null\npool: itself\n", "itself")
    with pytest.raises(ValueError, match="cannot use itself"):
        load_subset(itself, registry=registry, seed=23)


# ---------------------------------------------------------------------------------------------------------------------
# Bad subset files
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_subset_lists_available(registry):
    with pytest.raises(FileNotFoundError) as error:
        load_subset("uriel_21", registry=registry)
    assert "uriel_20" in str(error.value) and "random_40" in str(error.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("languages: [fra, deu\n", "not valid YAML"),
        ("- fra\n- deu\n", "must be a YAML mapping"),
        ("languages: [fra]\ncolour: red\n", r"unknown key\(s\) \['colour'\]"),
        ("name: x\nstrategy: uriel-most\nn: 2\n", "missing 'languages'"),
        ("languages: fra, deu\n", "must be a YAML list"),
        ("strategy: random\nn: 3\nlanguages: [fra]\n", "lists no languages"),
        ("languages: [fra]\nn: two\n", "n must be an integer"),
        ("languages: [yor, no]\n", r"got \['yor', False\]\. YAML reads an unquoted no, off or n as false .* 'no'"),
    ],
)
def test_malformed_subset(tmp_path, registry, text, expected):
    path = write_subset(tmp_path, text)
    with pytest.raises(ValueError, match=expected) as error:
        load_subset(path, registry=registry, seed=1)
    assert str(path) in str(error.value)


def test_unknown_code_in_subset(tmp_path, registry):
    path = write_subset(tmp_path, "languages: [fra, deux, ita]\n")
    with pytest.raises(ValueError) as error:
        load_subset(path, registry=registry)
    message = str(error.value)
    assert str(path) in message and "'deux'" in message and "deu" in message


def test_english_and_duplicates_dropped(tmp_path, registry, caplog):
    path = write_subset(tmp_path, "name: mixed\nn: 4\nlanguages: [fra, en, gaz, orm, FRA, eng, swh]\n")
    with caplog.at_level(logging.WARNING, logger="lang_registry"):
        subset = load_subset(path, registry=registry)
    assert subset.languages == ["fra", "orm", "swa"]
    assert subset.printed == ["fra", "en", "gaz", "orm", "FRA", "eng", "swh"]
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "dropping English" in messages and "dropping duplicate" in messages
    assert "declares n=4 but lists 3" in messages


# ---------------------------------------------------------------------------------------------------------------------
# parse_language_list
# ---------------------------------------------------------------------------------------------------------------------


def test_parse_language_list(registry):
    assert parse_language_list("all", registry=registry) == registry.pool()
    assert parse_language_list("pool", registry=registry) == registry.pool()
    assert parse_language_list("fr, gaz,swh", registry=registry) == ["fra", "orm", "swa"]
    assert parse_language_list(["yo", "yor", "en"], registry=registry) == ["yor", "eng"]
    assert parse_language_list("uriel_5", registry=registry) == ["fon", "kat", "kaz", "lin", "orm"]
    assert parse_language_list("subsets/uriel_5.yaml", registry=registry) == ["fon", "kat", "kaz", "lin", "orm"]
    assert (
        parse_language_list("random_5", registry=registry, seed=42)
        == load_subset("random_5", registry=registry, seed=42).languages
    )
    assert parse_language_list("deu", registry=registry) == ["deu"]


def test_parse_language_list_errors(registry):
    with pytest.raises(ValueError, match="neither a language code nor a subset"):
        parse_language_list("uriel_21", registry=registry)
    with pytest.raises(ValueError, match="Empty language list"):
        parse_language_list("  ", registry=registry)
    with pytest.raises(ValueError, match="Did you mean"):
        parse_language_list("fra,xx1", registry=registry)


def test_module_has_no_global_numpy_side_effect(registry):
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    lang_registry.load_subset("random_5", registry=registry, seed=42)
    assert np.random.rand() == expected
