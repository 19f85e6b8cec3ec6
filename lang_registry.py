"""Language registry and language-subset loading shared by the training and evaluation scripts.

The registry (`languages.yaml` next to this file) describes the paper's 65 realignment languages, English and the
evaluation-only languages: codes, aliases, script, family, Joshi class, pre-training coverage, the parallel corpus
that supplies each language and the dataset configs that evaluate it. Subset files (`subsets/*.yaml`) record the rows
of the paper's Table 6 verbatim plus the seeded random subsets of Tables 8/10.

    >>> registry = load_registry()
    >>> registry.resolve("gaz")          # aliases map to the canonical ISO 639-3 code of Table 5
    'orm'
    >>> len(registry.pool())
    65
    >>> subset = load_subset("uriel_20")  # warns: the paper lists 22 codes for this n=20 row
    >>> languages = parse_language_list("random_10", seed=42)
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFAULT_REGISTRY = HERE / "languages.yaml"
SUBSETS_DIR = HERE / "subsets"

POOL_SIZE = 65
# Evaluation resources (keys of every entry's `eval`; the Hub ids are listed in the header of languages.yaml).
EVAL_RESOURCES = tuple(
    "udpos masakhapos wikiann masakhaner xnli afrixnli americasnli indonli myxnli sib200 tatoeba".split()
)
PARALLEL_SOURCES = ("opus100", "nllb")
# `selection` records how select_languages.py computed a subset (objective, solver, optimality).
SUBSET_KEYS = ("name", "description", "source", "strategy", "n", "languages", "pool", "notes", "selection")
RANDOM_STRATEGY = "random"


@dataclass(frozen=True)
class Language:
    """One registry entry; see the comment block of `languages.yaml` for the meaning of every field."""

    code: str
    name: str
    aliases: tuple[str, ...]
    iso639_1: str | None
    script: str
    family: str | None
    joshi: int
    seen_mbert: bool
    seen_xlmr: bool
    pool: bool
    xtremer: bool
    africa: bool
    parallel: dict[str, str] | None = field(hash=False)
    flores: str | None
    udhr: str | None
    eval: dict[str, str | None] = field(hash=False)
    notes: tuple[str, ...] = ()

    @property
    def resource_level(self) -> str:
        """Resource level used by the paper (footnote 3): HRL = Joshi 5, MRL = Joshi 3-4, LRL = Joshi 0-2."""
        return "HRL" if self.joshi == 5 else "MRL" if self.joshi >= 3 else "LRL"


ENTRY_KEYS = tuple(f.name for f in fields(Language))  # the keys of every registry entry, in file order


class Registry:
    """All registered languages, keyed by canonical code in file order, with alias resolution."""

    def __init__(self, languages: dict[str, Language], path: Path | None = None) -> None:
        self.languages = languages
        self.path = path
        self._lookup: dict[str, str] = {}
        for language in languages.values():
            for key in (language.code, language.iso639_1, *language.aliases):
                if key:
                    self._lookup[key.lower()] = language.code

    def __contains__(self, code: object) -> bool:
        return isinstance(code, str) and code.strip().lower() in self._lookup

    def __len__(self) -> int:
        return len(self.languages)

    def resolve(self, code: str) -> str:
        """Return the canonical code for a canonical code, an alias or an ISO 639-1 code (case-insensitive).

        Logs every mapping at INFO level; raises `ValueError` with the nearest valid codes for unknown input.
        """
        key = str(code).strip().lower()
        canonical = self._lookup.get(key)
        if canonical is None:
            raise ValueError(
                f"Unknown language code {code!r}. Did you mean: {', '.join(self.suggest(key)) or 'none found'}? "
                f"Use a code from the registry {self.path or DEFAULT_REGISTRY} (ISO 639-3 as in the paper's Table 5, "
                "an ISO 639-1 code or a listed alias; FLORES-style codes such as 'yor_Latn' are not accepted)."
            )
        if code != canonical:
            logger.info("Mapped language code %r to %r", code, canonical)
        return canonical

    def suggest(self, code: str, n: int = 5) -> list[str]:
        """Return up to `n` canonical codes close to `code` (difflib over codes, aliases and names)."""
        key = code.strip().lower()
        vocabulary = dict(self._lookup)
        vocabulary.update({language.name.lower(): language.code for language in self.languages.values()})
        suggestions: list[str] = []
        head = re.split(r"[_\-\s]", key)[0]
        if head in self._lookup:
            suggestions.append(self._lookup[head])
        for match in difflib.get_close_matches(key, list(vocabulary), n=3 * n, cutoff=0.5):
            if vocabulary[match] not in suggestions:
                suggestions.append(vocabulary[match])
        return suggestions[:n]

    def get(self, code: str) -> Language:
        """Return the `Language` for any accepted spelling of its code."""
        return self.languages[self.resolve(code)]

    def pool(self) -> list[str]:
        """Return the 65 realignment languages in the order of Table 6's "All 65 languages" row."""
        return [code for code, language in self.languages.items() if language.pool]

    def languages_with(self, resource: str) -> list[str]:
        """Return the codes (file order) that have a config for evaluation `resource` (e.g. "udpos")."""
        if resource not in EVAL_RESOURCES:
            raise ValueError(f"Unknown evaluation resource {resource!r}; expected one of {', '.join(EVAL_RESOURCES)}.")
        return [code for code, language in self.languages.items() if language.eval[resource] is not None]

    @property
    def english(self) -> Language:
        """The English entry (the training language of every experiment)."""
        return self.languages["eng"]


def _check_entry(raw: Any, index: int, path: Path) -> Language:
    """Validate one raw YAML entry and build its `Language`."""
    label = raw.get("code", "?") if isinstance(raw, dict) else "?"

    def fail(problem: str) -> ValueError:
        return ValueError(f"{path}: entry #{index + 1} (code {label!r}): {problem}")

    if not isinstance(raw, dict):
        raise fail(f"expected a mapping with keys {', '.join(ENTRY_KEYS)}, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(ENTRY_KEYS))
    missing = [key for key in ENTRY_KEYS if key not in raw]
    if unknown:
        raise fail(f"unknown key(s) {unknown}; allowed keys are {', '.join(ENTRY_KEYS)}.")
    if missing:
        raise fail(f"missing key(s) {missing}; every key must be present (use null where not applicable).")

    def expect(key: str, kinds: tuple[type, ...], nullable: bool = False) -> None:
        value = raw[key]
        if value is None and nullable:
            return
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = "/".join(kind.__name__ for kind in kinds) + (" or null" if nullable else "")
            raise fail(f"{key} must be {names}, got {value!r}.")

    for key in ("code", "name", "script"):
        expect(key, (str,))
    for key in ("iso639_1", "family", "flores", "udhr"):
        expect(key, (str,), nullable=True)
    for key in ("seen_mbert", "seen_xlmr", "pool", "xtremer", "africa"):
        expect(key, (bool,))
    expect("joshi", (int,))
    expect("aliases", (list,))
    expect("notes", (list,))
    expect("eval", (dict,))
    expect("parallel", (dict,), nullable=True)
    if not re.fullmatch(r"[a-z]{3}", raw["code"]):
        raise fail(f"code must be three lowercase letters (ISO 639-3), got {raw['code']!r}.")
    if not 0 <= raw["joshi"] <= 5:
        raise fail(f"joshi must be an integer from 0 to 5, got {raw['joshi']!r}.")
    if raw["flores"] is not None and not re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", raw["flores"]):
        raise fail(f"flores must look like 'yor_Latn', got {raw['flores']!r}.")
    for key in ("aliases", "notes"):
        if not all(isinstance(item, str) and item for item in raw[key]):
            raise fail(f"{key} must be a list of non-empty strings, got {raw[key]!r}.{_yaml_hint(raw[key])}")
    evaluation = raw["eval"]
    if set(evaluation) != set(EVAL_RESOURCES):
        raise fail(
            f"eval must have exactly the keys {', '.join(EVAL_RESOURCES)} (null where absent); "
            f"unknown: {sorted(set(evaluation) - set(EVAL_RESOURCES))}, "
            f"missing: {sorted(set(EVAL_RESOURCES) - set(evaluation))}."
        )
    if not all(value is None or isinstance(value, str) for value in evaluation.values()):
        raise fail(f"eval values must be config names (strings) or null, got {evaluation!r}.")
    parallel = raw["parallel"]
    if parallel is not None and (
        set(parallel) != {"source", "config"}
        or parallel["source"] not in PARALLEL_SOURCES
        or not isinstance(parallel["config"], str)
    ):
        raise fail(f"parallel must be null or {{source: opus100|nllb, config: <name>}}, got {parallel!r}.")
    if raw["pool"] and parallel is None:
        raise fail("a pool (realignment) language needs a parallel corpus; set parallel: {source: ..., config: ...}.")
    return Language(
        code=raw["code"],
        name=raw["name"],
        # Other spellings only: the code and the ISO 639-1 code are looked up anyway, and listing them again would
        # repeat them in every message that lists a language's accepted names.
        aliases=tuple(dict.fromkeys(a for a in raw["aliases"] if a not in (raw["code"], raw["iso639_1"]))),
        iso639_1=raw["iso639_1"],
        script=raw["script"],
        family=raw["family"],
        joshi=raw["joshi"],
        seen_mbert=raw["seen_mbert"],
        seen_xlmr=raw["seen_xlmr"],
        pool=raw["pool"],
        xtremer=raw["xtremer"],
        africa=raw["africa"],
        parallel=dict(parallel) if parallel is not None else None,
        flores=raw["flores"],
        udhr=raw["udhr"],
        eval={key: evaluation[key] for key in EVAL_RESOURCES},
        notes=tuple(raw["notes"]),
    )


def _yaml_hint(values: Any) -> str:
    """A hint for YAML 1.1 booleans among values meant as codes: an unquoted `no` (Norwegian) is read as false."""
    if isinstance(values, list) and any(isinstance(value, bool) for value in values):
        return (
            " YAML reads an unquoted no, off or n as false (and yes, on or y as true): quote such a code, e.g. 'no'."
        )
    return ""


def _read_registry(path: Path) -> Registry:
    """Parse and validate a registry file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error}).") from error
    if not isinstance(data, dict) or set(data) != {"languages"} or not isinstance(data["languages"], list):
        raise ValueError(f"{path}: expected a single top-level key 'languages' holding a list of language entries.")
    languages: dict[str, Language] = {}
    owners: dict[str, str] = {}
    for index, raw in enumerate(data["languages"]):
        language = _check_entry(raw, index, path)
        if language.code in languages:
            raise ValueError(f"{path}: entry #{index + 1}: duplicate code {language.code!r}; codes must be unique.")
        for key in {language.code, language.iso639_1, *language.aliases} - {None}:
            owner = owners.get(key.lower())
            if owner is not None and owner != language.code:
                raise ValueError(
                    f"{path}: entry #{index + 1} (code {language.code!r}): code/alias {key!r} is already used by "
                    f"{owner!r}; every code and alias must identify exactly one language."
                )
            owners[key.lower()] = language.code
        languages[language.code] = language
    registry = Registry(languages, path=path)
    if len(registry.pool()) != POOL_SIZE:
        raise ValueError(f"{path}: expected {POOL_SIZE} pool languages (pool: true), found {len(registry.pool())}.")
    if "eng" not in languages:
        raise ValueError(f"{path}: English (code eng) must be registered.")
    return registry


_DEFAULT_CACHE: dict[str, Registry] = {}


def load_registry(path: str | Path | None = None) -> Registry:
    """Load and validate a registry file (default: `languages.yaml` next to this module, cached)."""
    if path is None:
        if "default" not in _DEFAULT_CACHE:
            _DEFAULT_CACHE["default"] = _read_registry(DEFAULT_REGISTRY)
        return _DEFAULT_CACHE["default"]
    return _read_registry(Path(path))


@dataclass
class Subset:
    """A language subset: canonical codes after normalisation plus the row as printed and its provenance."""

    name: str
    description: str
    source: dict[str, Any]
    strategy: str
    declared_n: int | None
    languages: list[str]
    printed: list[str] | None
    notes: list[str]
    path: Path


def available_subsets() -> list[str]:
    """Return the names of the subset files shipped in `subsets/`."""
    return sorted(path.stem for path in SUBSETS_DIR.glob("*.yaml"))


def _subset_path(path_or_name: str | Path) -> Path:
    """Map a subset path or bare name to an existing file."""
    text = str(path_or_name)
    path = Path(text)
    if not path.exists() and "/" not in text and "\\" not in text:
        path = SUBSETS_DIR / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
    elif not path.exists() and not path.is_absolute() and (HERE / path).is_file():
        path = HERE / path  # e.g. "subsets/uriel_20.yaml" given from another working directory
    if not path.is_file():
        raise FileNotFoundError(
            f"Subset {text!r} not found (looked for {path}). Pass a path to a subset YAML or one of the names in "
            f"{SUBSETS_DIR}: {', '.join(available_subsets())}."
        )
    return path


def _draw_random(path: Path, n: Any, pool_name: Any, registry: Registry, seed: int | None) -> list[str]:
    """Draw `n` languages without replacement as the authors' code does: seed, then np.random.choice over the pool."""
    if seed is None:
        raise ValueError(
            f"{path}: random subsets need the run seed (pass --seed / seed=...); the paper draws them with the seeds "
            "17, 23, 42 and 66."
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{path}: a random subset needs a positive integer n, got {n!r}.")
    if pool_name in (None, "all", "pool"):
        pool = registry.pool()
    else:
        sibling = path.parent / f"{pool_name}.yaml"  # a pool name is looked up next to this file, then in subsets/
        pool_path = sibling if sibling.is_file() else _subset_path(str(pool_name))
        if pool_path.resolve() == path.resolve():
            raise ValueError(
                f"{path}: a random subset cannot use itself as its pool; use pool: all or another subset."
            )
        pool = load_subset(pool_path, registry=registry, seed=seed).languages
    if n > len(pool):
        raise ValueError(f"{path}: cannot draw n={n} languages from a pool of {len(pool)} ({pool_name or 'all'}).")
    return draw_random(pool, n, seed)


def draw_random(pool: list[str], n: int, seed: int) -> list[str]:
    """The reference code's draw: `np.random.seed(seed); np.random.choice(pool, n, replace=False)`.

    The same stream, from a private RandomState so numpy's global state is left alone. Pool order matters.
    """
    return [str(code) for code in np.random.RandomState(seed).choice(pool, n, replace=False)]


def load_subset(path_or_name: str | Path, registry: Registry | None = None, seed: int | None = None) -> Subset:
    """Load a subset YAML (a path, or a bare name looked up in `subsets/`) and normalise its languages.

    Codes are resolved through the registry (aliases are logged), English and duplicates are dropped with a warning,
    and a listed count that differs from the declared `n` is a warning, not an error (the paper has such rows).
    `strategy: random` with `languages: null` draws `n` languages from `pool` (`all` or another subset) with `seed`.
    """
    registry = registry or load_registry()
    path = _subset_path(path_or_name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error}). Fix the syntax; see subsets/README.md.") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a subset file must be a YAML mapping with keys {', '.join(SUBSET_KEYS)}.")
    unknown = sorted(set(data) - set(SUBSET_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; allowed keys are {', '.join(SUBSET_KEYS)}.")
    strategy = str(data.get("strategy") or "")
    declared_n = data.get("n")
    if declared_n is not None and (isinstance(declared_n, bool) or not isinstance(declared_n, int)):
        raise ValueError(f"{path}: n must be an integer or null, got {declared_n!r}.")
    notes = data.get("notes") or []
    source = data.get("source") or {}
    if not isinstance(notes, list) or not isinstance(source, dict):
        raise ValueError(f"{path}: notes must be a list of strings and source a mapping.")
    printed = data.get("languages")

    if strategy == RANDOM_STRATEGY:
        if printed is not None:
            raise ValueError(
                f"{path}: a random subset lists no languages (set languages: null, n: <size>, pool: all|<subset>)."
            )
        languages = _draw_random(path, declared_n, data.get("pool"), registry, seed)
    else:
        if "languages" not in data or printed is None:
            raise ValueError(f"{path}: missing 'languages' (a YAML list of codes); only strategy: random may omit it.")
        if not isinstance(printed, list) or not all(isinstance(code, str) for code in printed):
            hint = _yaml_hint(printed)
            raise ValueError(f"{path}: languages must be a YAML list of code strings, got {printed!r}.{hint}")
        if data.get("pool") is not None:
            raise ValueError(f"{path}: 'pool' is only meaningful with strategy: random.")
        languages = []
        for code in printed:
            try:
                canonical = registry.resolve(code)
            except ValueError:
                raise ValueError(
                    f"{path}: unknown language code {code!r}. Nearest valid codes: "
                    f"{', '.join(registry.suggest(code)) or 'none found'}."
                ) from None
            if canonical == "eng":
                logger.warning(
                    "%s: dropping English (%r): it is the training language, not a realignment target.", path, code
                )
            elif canonical in languages:
                logger.warning("%s: dropping duplicate language %r (%s).", path, code, canonical)
            else:
                languages.append(canonical)
        if declared_n is not None and len(languages) != declared_n:
            logger.warning(
                "%s: declares n=%d but lists %d languages; using the %d listed.",
                path,
                declared_n,
                len(languages),
                len(languages),
            )
    return Subset(
        name=str(data.get("name") or path.stem),
        description=str(data.get("description") or ""),
        source=source,
        strategy=strategy,
        declared_n=declared_n,
        languages=languages,
        printed=list(printed) if printed is not None else None,
        notes=[str(note) for note in notes],
        path=path,
    )


def parse_language_list(
    spec: str | list[str] | tuple[str, ...], registry: Registry | None = None, seed: int | None = None
) -> list[str]:
    """Parse a `--languages` value: a subset path/name, `all`/`pool` (the 65), or a comma list of codes.

    Comma lists keep English if it is listed (evaluation scripts may want it); subsets never contain English.
    Duplicates are dropped, keeping the first occurrence.
    """
    registry = registry or load_registry()
    if isinstance(spec, (list, tuple)):
        codes = [str(item) for item in spec]
    else:
        text = str(spec).strip()
        if not text:
            raise ValueError("Empty language list; pass a subset name/path, 'all', or comma-separated codes.")
        if text.lower() in ("all", "pool"):
            return registry.pool()
        looks_like_file = text.endswith((".yaml", ".yml")) or Path(text).is_file()
        if looks_like_file or text in available_subsets():
            return load_subset(text, registry=registry, seed=seed).languages
        codes = [part for part in re.split(r"[,\s]+", text) if part]
        if len(codes) == 1 and codes[0] not in registry:
            raise ValueError(
                f"{text!r} is neither a language code nor a subset. Nearest codes: "
                f"{', '.join(registry.suggest(text)) or 'none found'}; subsets: {', '.join(available_subsets())}."
            )
    languages: list[str] = []
    for code in codes:
        canonical = registry.resolve(code)
        if canonical not in languages:
            languages.append(canonical)
    return languages
