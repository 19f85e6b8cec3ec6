"""Build realignment language subsets (URIEL featural diversity, family, script, random) and compare them with the
paper.

Writes a subset YAML in the schema of `subsets/*.yaml` (loadable with `languages.load_subset`), or compares a subset
file with what a strategy computes (overlap, Jaccard, and where the file's featural objective ranks among all subsets
of its size).

    python select_languages.py --strategy uriel-most --n 20 --output subsets/my_uriel_20.yaml
    python select_languages.py --strategy uriel-least --n 10 --pool latin
    python select_languages.py --strategy family --n 10
    python select_languages.py --strategy random --n 10 --seed 17
    python select_languages.py --strategy uriel-most --n 10 --pool joshi2 --features urielplus
    python select_languages.py --compare subsets/uriel_10.yaml --features lang2vec

Objective (paper A.1): the angular distance d(u, v) = arccos(cos(u, v)) / pi between URIEL featural vectors, summed
over all pairs of S + {eng}; English is counted in the sum but not in n. `uriel-most` maximises it, `uriel-least`
minimises it. Solvers: exhaustive enumeration when the search space is small (n <= 5 over the 65 languages is 8.3 M
subsets, vectorised), an exact MILP (HiGHS through `scipy.optimize.milp`) for minimisation, and greedy construction
plus best-improvement swap local search with seeded restarts for maximisation, followed by a time-limited MILP that
certifies how far from optimal the result can be. Every result says which solver produced it and whether it is proven
optimal.

Distances: `--features lang2vec` (default) uses lang2vec's `syntax_knn+phonology_knn+inventory_knn` vectors;
`--features urielplus` uses the URIEL+ featural distance after integrating its databases (Glottocodes, so the eight
macrolanguage codes of Table 5 are looked up as arb azj ekk pes zsm gaz swh cmn; every mapping is logged). URIEL+
reports 2 * arccos / pi; it is halved to the paper's definition. Matrices are cached under `.cache/select_languages/`
(the first URIEL+ run takes about two minutes, later runs a second).

Strategies (each applied within `--pool`: all, joshi2 (Joshi 0-2), joshi3, joshi3-5, joshi4-5, seen-mbert, seen-xlmr,
unseen-mbert, unseen-xlmr, latin, africa, xtremer; filters on the registry's fields):
- `uriel-most` / `uriel-least`: most / least featurally diverse subset.
- `latin-most` / `latin-least`: the same, restricted to Latin-script languages.
- `family`: one language per non-Indo-European family (Table 5 labels; English's Germanic branch is Indo-European),
  choosing among those the most featurally diverse combination. With `--family_include_indo_european` each
  Indo-European branch (Romance, Balto-Slavic, Indo-Iranian, Hellenic; not Germanic, which English occupies) counts as
  a family too, which the paper's n = 20 and 25 rows need.
- `family-ie` (alias `family-indo-european`): Indo-European languages only, most featurally diverse.
- `script`: one language per non-Latin script (English occupies Latin), most featurally diverse combination.
- `random`: `np.random.seed(seed); np.random.choice(pool, n, replace=False)`, exactly like `languages.load_subset`.
- `pool`: the whole pool (e.g. `--strategy pool --pool xtremer` rebuilds the "Present in XTREME-R" row).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import lang_registry

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = HERE / ".cache" / "select_languages"
ANCHOR = "eng"

STRATEGIES = (
    "uriel-most",
    "uriel-least",
    "latin-most",
    "latin-least",
    "family",
    "family-ie",
    "script",
    "random",
    "pool",
)
STRATEGY_ALIASES = {"family-indo-european": "family-ie", "uriel": "uriel-most", "latin": "latin-most"}
# Strategies that optimise the featural objective, and in which direction.
SENSE = {
    "uriel-most": "max",
    "latin-most": "max",
    "family": "max",
    "family-ie": "max",
    "script": "max",
    "uriel-least": "min",
    "latin-least": "min",
}

# Pools are filters on the registry's fields (languages.yaml), applied to the 65 realignment languages.
POOLS: dict[str, tuple[str, Any]] = {
    "all": ("the 65 realignment languages", lambda lang: True),
    "joshi2": ("Joshi class 0-2, the paper's low-resource 'Joshi Class = 2' pool", lambda lang: lang.joshi <= 2),
    "joshi3": ("Joshi class 3", lambda lang: lang.joshi == 3),
    "joshi3-5": ("Joshi class 3-5 (the paper's 'Joshi Class = 3,5', i.e. 3, 4 and 5)", lambda lang: lang.joshi >= 3),
    "joshi4-5": ("Joshi class 4-5", lambda lang: lang.joshi >= 4),
    "seen-mbert": ("seen in mBERT pre-training (Table 7)", lambda lang: lang.seen_mbert),
    "seen-xlmr": ("seen in XLM-R pre-training (Table 7)", lambda lang: lang.seen_xlmr),
    "unseen-mbert": ("not seen in mBERT pre-training (Table 7)", lambda lang: not lang.seen_mbert),
    "unseen-xlmr": ("not seen in XLM-R pre-training (Table 7)", lambda lang: not lang.seen_xlmr),
    "latin": ("written in Latin script (Table 5)", lambda lang: lang.script == "Latin"),
    "africa": ("the 'Present in Africa' row (21)", lambda lang: lang.africa),
    "xtremer": ("the 'Present in XTREME-R' row (47)", lambda lang: lang.xtremer),
}
POOL_ALIASES = {"pool": "all", "joshi35": "joshi3-5", "joshi45": "joshi4-5", "joshi345": "joshi3-5"}

# Table 5 prints genus-level labels. These branches make up Indo-European among the 65 languages (plus the ones that
# a registry extension might add). Basque (family: null, "N/A" in Table 5) is an isolate: its own family.
INDO_EUROPEAN_BRANCHES = frozenset(
    {"Germanic", "Romance", "Balto-Slavic", "Indo-Iranian", "Hellenic", "Celtic", "Armenian", "Albanian"}
)

FEATURE_SOURCES = ("lang2vec", "urielplus")
DEFAULT_LANG2VEC_FEATURES = "syntax_knn+phonology_knn+inventory_knn"
# Table 5 uses macrolanguage codes; the URIEL+ databases (Glottocodes) only know the individual languages.
MACRO_TO_INDIVIDUAL = {
    "ara": "arb",
    "aze": "azj",
    "est": "ekk",
    "fas": "pes",
    "msa": "zsm",
    "orm": "gaz",
    "swa": "swh",
    "zho": "cmn",
}
CODE_STYLES = ("auto", "macro", "individual")
SOLVERS = ("auto", "exhaustive", "milp", "local-search")
LOW_OVERLAP = 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class SelectionArguments:
    """What to select (or which subset file to compare) and where to write it."""

    strategy: str | None = field(
        default=None,
        metadata={
            "help": f"The selection strategy, one of {', '.join(STRATEGIES)}. Required unless --compare is given, in "
            "which case it overrides the strategy read from the file's 'strategy' key."
        },
    )
    n: int | None = field(
        default=None,
        metadata={
            "help": "The number of languages to select, English not counted. Required unless --compare is given "
            "(which uses the number of languages listed in the file) or --strategy pool."
        },
    )
    pool: str | None = field(
        default=None,
        metadata={
            "help": f"The candidate pool, one of {', '.join(POOLS)} (default: all, the 65 languages; with --compare "
            "the pool read from the file's strategy, e.g. joshi2 for 'joshi2-uriel'). Joshi pools: joshi2 is classes "
            "0-2 (the paper's low-resource 'Joshi Class = 2' pool), joshi3-5 is classes 3, 4 and 5."
        },
    )
    seed: int = field(
        default=42,
        metadata={
            "help": "The random seed: it draws the random strategy's languages (the paper uses 17, 23, 42 and 66), "
            "the local-search restarts and the sampled percentiles of --compare. Same seed, same result."
        },
    )
    output: str | None = field(
        default=None,
        metadata={
            "help": "Where to write the subset YAML (e.g. subsets/my_uriel_20.yaml). Without it the result is only "
            "printed. With --compare, writes the computed subset."
        },
    )
    overwrite_output: bool = field(
        default=False, metadata={"help": "Whether to replace an existing --output file instead of failing."}
    )
    name: str | None = field(
        default=None, metadata={"help": "The subset name written to the YAML (default: the --output file stem)."}
    )
    compare: str | None = field(
        default=None,
        metadata={
            "help": "A subset YAML (path or bare name in subsets/) to compare with what the strategy computes: "
            "overlap, Jaccard index, and the rank/percentile of the file's objective among all subsets of its size."
        },
    )
    report_json: str | None = field(
        default=None, metadata={"help": "Also write the selection or comparison report as JSON to this path."}
    )
    family_include_indo_european: bool = field(
        default=False,
        metadata={
            "help": "Whether the family strategy counts each Indo-European branch of Table 5 (Romance, Balto-Slavic, "
            "Indo-Iranian, Hellenic) as a family of its own; Germanic stays excluded because English occupies it."
        },
    )

    def __post_init__(self):
        if self.strategy is not None:
            self.strategy = canonical_strategy(self.strategy)
        if self.pool is not None:
            self.pool = canonical_pool(self.pool)
        if self.compare is None and self.strategy is None:
            raise ValueError("Pass --strategy (e.g. --strategy uriel-most --n 10) or --compare <subset file>.")
        if self.compare is None and self.n is None and self.strategy != "pool":
            raise ValueError(f"--strategy {self.strategy} needs --n, the number of languages to select.")
        if self.n is not None and self.n < 1:
            raise ValueError(f"--n must be a positive number of languages, got {self.n}.")


@dataclass
class FeatureArguments:
    """Which URIEL vectors define the featural distance, and how codes are mapped to them."""

    features: str = field(
        default="lang2vec",
        metadata={
            "help": "The source of URIEL featural vectors: lang2vec (URIEL as shipped with lang2vec, offline) or "
            "urielplus (the URIEL+ featural distance, offline; pip install urielplus==1.3.2)."
        },
    )
    lang2vec_features: str = field(
        default=DEFAULT_LANG2VEC_FEATURES,
        metadata={
            "help": "The lang2vec feature sets joined by '+', used with --features lang2vec. Sets with missing "
            "values (e.g. syntax_wals) are compared on the features both languages have."
        },
    )
    urielplus_databases: bool = field(
        default=True,
        metadata={
            "help": "Whether URIEL+ integrates its additional databases (Grambank, APICS, SAPHON, BDPROTO, eWAVE, "
            "Glottolog) before computing distances, as URIEL+ intends. This switches URIEL+ to Glottocodes and takes "
            "about two minutes once; the distance matrix is then cached. Use --no_urielplus_databases for the "
            "original URIEL vectors with ISO codes."
        },
    )
    code_style: str = field(
        default="auto",
        metadata={
            "help": "Which codes look up the eight macrolanguages of Table 5 (ara aze est fas msa orm swa zho): "
            "macro (as is), individual (arb azj ekk pes zsm gaz swh cmn) or auto (individual for URIEL+ with "
            "databases, which has no macro codes; macro otherwise). Every mapping is logged."
        },
    )
    include_english: bool = field(
        default=True,
        metadata={
            "help": "Whether English is part of the objective (paper A.1: pairs over S + {eng}; English is not "
            "counted in n). Use --no_include_english for the plain subset objective."
        },
    )
    cache_dir: str = field(
        default=str(DEFAULT_CACHE_DIR),
        metadata={"help": "The folder where distance matrices are cached (keyed by feature source and settings)."},
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Whether to recompute the distance matrix even if it is cached."}
    )

    def __post_init__(self):
        if self.features not in FEATURE_SOURCES:
            raise ValueError(
                f"Unknown feature set --features {self.features!r}; use one of {', '.join(FEATURE_SOURCES)}."
            )
        if self.code_style not in CODE_STYLES:
            raise ValueError(f"Unknown --code_style {self.code_style!r}; use one of {', '.join(CODE_STYLES)}.")
        if self.features == "urielplus" and self.urielplus_databases and self.code_style == "macro":
            raise ValueError(
                "URIEL+ with its databases uses Glottocodes and has no entry for the macrolanguage codes "
                f"{', '.join(MACRO_TO_INDIVIDUAL)}; use --code_style individual (or auto), or "
                "--no_urielplus_databases."
            )


@dataclass
class SolverArguments:
    """How the featural objective is optimised."""

    solver: str = field(
        default="auto",
        metadata={
            "help": f"The solver, one of {', '.join(SOLVERS)}. auto: exhaustive when at most --exhaustive_limit "
            "subsets exist, else the MILP for minimisation and local search (then a MILP bound) for maximisation."
        },
    )
    exhaustive_limit: int = field(
        default=10_000_000,
        metadata={"help": "The largest number of subsets that auto enumerates exhaustively (8.3 M for n=5 of 65)."},
    )
    restarts: int = field(
        default=100, metadata={"help": "The number of local-search restarts (the first is greedy, the others random)."}
    )
    milp_time_limit: float = field(
        default=3.0,
        metadata={
            "help": "Seconds the MILP may run. Minimisation is usually proven optimal in under a second; for "
            "maximisation the MILP rarely finishes, and its bound certifies how far the local-search result can be "
            "from the optimum. 0 skips the MILP bound after local search."
        },
    )
    compare_samples: int = field(
        default=100_000,
        metadata={
            "help": "How many random subsets estimate the percentile of --compare when there are more than "
            "--exhaustive_limit subsets of that size (otherwise the percentile is exact)."
        },
    )

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"Unknown --solver {self.solver!r}; use one of {', '.join(SOLVERS)}.")
        if self.restarts < 1:
            raise ValueError(f"--restarts must be at least 1, got {self.restarts}.")
        if self.milp_time_limit < 0:
            raise ValueError(f"--milp_time_limit must be >= 0 seconds, got {self.milp_time_limit}.")
        if self.compare_samples < 1:
            raise ValueError(f"--compare_samples must be at least 1, got {self.compare_samples}.")


def canonical_strategy(strategy: str) -> str:
    """Return the canonical name of a strategy, accepting the aliases used in subsets/*.yaml."""
    key = strategy.strip().lower()
    key = STRATEGY_ALIASES.get(key, key)
    if key not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.")
    return key


def canonical_pool(pool: str) -> str:
    """Return the canonical name of a pool, accepting the spellings of subsets/*.yaml (joshi35, joshi45)."""
    key = pool.strip().lower().replace("_", "-")
    key = POOL_ALIASES.get(key, key)
    if key not in POOLS:
        raise ValueError(f"Unknown pool {pool!r}; use one of {', '.join(POOLS)}.")
    return key


def parse_arguments(argv: list[str] | None = None) -> tuple[SelectionArguments, FeatureArguments, SolverArguments]:
    """Parse the three argument groups from the command line (or `argv`)."""
    from transformers import HfArgumentParser  # imported here: `import select_languages` stays light for tests

    class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Show defaults and keep the docstring's command examples as written."""

    parser = HfArgumentParser(
        (SelectionArguments, FeatureArguments, SolverArguments), description=__doc__, formatter_class=HelpFormatter
    )
    args = sys.argv[1:] if argv is None else list(argv)
    return parser.parse_args_into_dataclasses(args=args)


def parse_file_strategy(text: str) -> tuple[str, str]:
    """Split a subset file's strategy key into (strategy, pool), e.g. 'joshi2-uriel' -> ('uriel-most', 'joshi2').

    Understands every strategy written by this script and by subsets/*.yaml; the baseline rows ('all', 'xtremer',
    'africa') map to the `pool` strategy.
    """
    key = text.strip().lower()
    if key in POOLS or key in POOL_ALIASES:
        return "pool", canonical_pool(key)
    try:
        return canonical_strategy(key), "all"
    except ValueError:
        pass
    pool_names = sorted([*POOLS, *POOL_ALIASES], key=len, reverse=True)
    for pool in pool_names:
        if key.startswith(pool + "-"):
            rest = key[len(pool) + 1 :]
            try:
                return canonical_strategy(rest), canonical_pool(pool)
            except ValueError:
                continue
    raise ValueError(
        f"Cannot infer a strategy from {text!r}; pass --strategy (one of {', '.join(STRATEGIES)}) and --pool."
    )


def file_strategy_name(strategy: str, pool: str) -> str:
    """The strategy key written to a subset YAML, in the style of subsets/*.yaml ('uriel-most', 'joshi2-uriel')."""
    if strategy == "pool":
        return pool
    if pool == "all":
        return strategy
    short = {"uriel-most": "uriel"}.get(strategy, strategy)
    return f"{pool}-{short}"


# ---------------------------------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DistanceMatrix:
    """Pairwise angular distances (paper A.1: arccos(cos) / pi) between registry languages."""

    codes: list[str]
    matrix: np.ndarray
    description: str
    source_codes: dict[str, str]

    def index(self, codes: list[str]) -> np.ndarray:
        position = {code: i for i, code in enumerate(self.codes)}
        missing = [code for code in codes if code not in position]
        if missing:
            raise ValueError(f"No featural distances for {missing}; recompute the cache with --overwrite_cache.")
        return np.array([position[code] for code in codes], dtype=np.int64)


def angular_distances(
    vectors: np.ndarray, known: np.ndarray | None = None, names: list[str] | None = None
) -> np.ndarray:
    """Angular distance arccos(cos(u, v)) / pi between all rows of `vectors` (paper A.1), in [0, 1].

    With a `known` mask (False = missing value), every pair is compared on the features both languages have, as
    URIEL+ does. A pair with no shared feature raises; a zero vector on the shared features counts as orthogonal.
    """
    x = np.asarray(vectors, dtype=np.float64)
    if known is None:
        known = np.ones_like(x, dtype=bool)
    mask = known.astype(np.float64)
    x = np.where(known, x, 0.0)
    shared = mask @ mask.T  # (L, L) number of features known for both languages
    if np.any(shared == 0):
        names = names or [f"#{i}" for i in range(len(x))]
        pairs = [f"{names[i]}-{names[j]}" for i, j in np.argwhere(np.triu(shared == 0, 1))]
        raise ValueError(
            f"{len(pairs)} language pair(s) share no known feature (e.g. {', '.join(pairs[:5])}), so their distance "
            "is undefined; choose feature sets without gaps, such as the *_knn sets of lang2vec."
        )
    dots = x @ x.T
    squares = (x * x) @ mask.T  # squares[i, j] = |x_i|^2 over the features j also has
    norms = np.sqrt(squares * squares.T)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    distances = np.arccos(np.clip(cosine, -1.0, 1.0)) / np.pi
    np.fill_diagonal(distances, 0.0)
    return (distances + distances.T) / 2


def feature_codes(
    registry: lang_registry.Registry, codes: list[str], feature_args: FeatureArguments
) -> dict[str, str]:
    """Map canonical registry codes to the codes the feature source is queried with, logging every mapping."""
    style = feature_args.code_style
    if style == "auto":
        integrated = feature_args.features == "urielplus" and feature_args.urielplus_databases
        style = "individual" if integrated else "macro"
    mapping = {}
    for code in codes:
        target = MACRO_TO_INDIVIDUAL.get(code, code) if style == "individual" else code
        if target != code:
            if target not in registry.get(code).aliases:
                logger.warning("Registry entry %s does not list %s among its aliases.", code, target)
            logger.info(
                "%s: %s is looked up as %s (individual language of the macrolanguage)",
                feature_args.features,
                code,
                target,
            )
        mapping[code] = target
    return mapping


def _lang2vec_distances(codes: list[str], feature_sets: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lang2vec imports the deprecated pkg_resources
        import lang2vec.lang2vec as l2v

    listed = l2v.available_languages()
    for code in codes:
        if code not in listed:
            logger.info(
                "lang2vec: %s is not in lang2vec.available_languages() but lang2vec returns a vector for it", code
            )
    try:
        vectors = l2v.get_features(codes, feature_sets)
    except Exception as error:  # lang2vec raises bare Exceptions for unknown sets or languages
        raise ValueError(
            f"lang2vec could not build {feature_sets!r} for {codes}: {error}. Check --lang2vec_features (sets such "
            "as syntax_knn, phonology_knn, inventory_knn, syntax_wals joined by '+')."
        ) from error
    raw = np.array([[-1.0 if value == "--" else float(value) for value in vectors[code]] for code in codes])
    return angular_distances(raw, known=raw != -1.0, names=codes)


def _urielplus_distances(codes: list[str], integrate: bool) -> np.ndarray:
    try:
        import pandas as pd
        from urielplus import urielplus
    except ImportError as error:
        raise ValueError("--features urielplus needs the urielplus package: pip install urielplus==1.3.2") from error
    root_level = logging.getLogger().level
    uriel = urielplus.URIELPlus()
    logging.getLogger().setLevel(root_level)  # urielplus configures the root logger at import time
    lookup = list(codes)
    if integrate:
        start = time.perf_counter()
        logger.info("URIEL+: integrating its databases (takes a minute or two; the result is cached)")
        uriel.integrate_databases()
        logger.info("URIEL+: databases integrated in %.0f s", time.perf_counter() - start)
        if uriel.get_codes() != "Glotto":
            uriel.set_glottocodes()
        table = pd.read_csv(
            Path(uriel.cur_dir) / "database" / "urielplus_csvs" / "uriel_glottocode_map.csv",
            dtype=str,
            keep_default_na=False,
            na_filter=False,
        )
        glottocodes = {iso.strip(): glotto.strip() for iso, glotto in zip(table["iso_code"], table["glottocode"])}
        missing = [code for code in codes if not glottocodes.get(code)]
        if missing:
            raise ValueError(f"URIEL+ has no Glottocode for {missing}; use --code_style individual.")
        lookup = [glottocodes[code] for code in codes]
        for code, glotto in zip(codes, lookup):
            logger.info("URIEL+: %s is looked up as Glottocode %s", code, glotto)
    known = set(map(str, uriel.langs[1]))
    missing = [code for code in lookup if code not in known]
    if missing:
        raise ValueError(f"URIEL+ has no featural vector for {missing}.")
    matrix = np.asarray(uriel.new_featural_distance(lookup), dtype=np.float64)
    if np.any(matrix < 0):
        pairs = [f"{codes[i]}-{codes[j]}" for i, j in np.argwhere(np.triu(matrix < 0, 1))]
        raise ValueError(
            f"URIEL+ has no shared featural data for {len(pairs)} language pair(s) (e.g. {', '.join(pairs[:5])}), so "
            "their distance is undefined. Keep --urielplus_databases on (the default) or use --features lang2vec."
        )
    # URIEL+ reports 2 * arccos(cos) / pi (rounded to 4 decimals); the paper's A.1 distance is arccos(cos) / pi.
    return matrix / 2.0


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not-installed"


def load_distances(registry: lang_registry.Registry, feature_args: FeatureArguments) -> DistanceMatrix:
    """Distances between English and every pool language, from the cache or computed (then cached)."""
    codes = [ANCHOR, *registry.pool()]
    source_codes = feature_codes(registry, codes, feature_args)
    lookup = [source_codes[code] for code in codes]
    if feature_args.features == "lang2vec":
        settings = {
            "features": "lang2vec",
            "sets": feature_args.lang2vec_features,
            "version": _package_version("lang2vec"),
        }
        description = f"lang2vec {settings['version']} {feature_args.lang2vec_features}"
    else:
        settings = {
            "features": "urielplus",
            "databases": feature_args.urielplus_databases,
            "version": _package_version("urielplus"),
        }
        description = f"URIEL+ {settings['version']} featural distance" + (
            " (databases integrated, Glottocodes)" if feature_args.urielplus_databases else " (original URIEL data)"
        )
    settings["codes"] = lookup
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(feature_args.cache_dir) / f"{feature_args.features}-{key}.npz"
    if cache.is_file() and not feature_args.overwrite_cache:
        with np.load(cache) as data:
            matrix = data["matrix"]
        logger.info("Loaded %s distances from %s", description, cache)
    else:
        start = time.perf_counter()
        if feature_args.features == "lang2vec":
            matrix = _lang2vec_distances(lookup, feature_args.lang2vec_features)
        else:
            matrix = _urielplus_distances(lookup, feature_args.urielplus_databases)
        logger.info(
            "Computed %s distances in %.1f s; caching them in %s", description, time.perf_counter() - start, cache
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".npz", delete=False) as handle:
            np.savez(handle, matrix=matrix, codes=np.array(lookup), settings=json.dumps(settings))
        os.replace(handle.name, cache)
    return DistanceMatrix(codes=codes, matrix=matrix, description=description, source_codes=source_codes)


# ---------------------------------------------------------------------------------------------------------------------
# The objective and its solvers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """Choose n of m candidates to optimise sum of pairwise `distances` over S plus sum of `anchor` over S.

    `anchor[i]` is candidate i's distance to the anchor language (English), or 0 without one. `groups[i] >= 0` puts
    candidate i in a group of which at most one member may be chosen (-1: unconstrained).
    """

    distances: np.ndarray
    anchor: np.ndarray
    groups: np.ndarray | None = None

    @property
    def size(self) -> int:
        return len(self.anchor)

    def objective(self, indices) -> float:
        chosen = np.asarray(sorted(indices), dtype=np.int64)
        block = self.distances[np.ix_(chosen, chosen)]
        return float(np.triu(block, 1).sum() + self.anchor[chosen].sum())

    def feasible(self, indices) -> bool:
        if self.groups is None:
            return True
        labels = self.groups[np.asarray(list(indices), dtype=np.int64)]
        labels = labels[labels >= 0]
        return len(labels) == len(np.unique(labels))

    def max_size(self) -> int:
        """The largest feasible n under the group constraints."""
        if self.groups is None:
            return self.size
        return int(np.sum(self.groups < 0) + len(np.unique(self.groups[self.groups >= 0])))


@dataclass
class Solution:
    indices: list[int]
    objective: float
    solver: str
    optimal: bool
    seconds: float
    bound: float | None = None
    details: str = ""

    @property
    def gap(self) -> float | None:
        """Relative distance to the proven bound (0 when optimal), or None without a bound."""
        if self.optimal:
            return 0.0
        if self.bound is None or self.objective == 0:
            return None
        return abs(self.bound - self.objective) / abs(self.objective)


def count_subsets(m: int, n: int) -> int:
    return math.comb(m, n)


def _enumeration_size(m: int, k: int) -> int:
    """Rows the level-by-level enumeration holds at once (all levels below k plus one level-k chunk)."""
    return sum(math.comb(m, j) for j in range(k))


def enumerate_objectives(problem: Problem, n: int, chunk_size: int = 2_000_000):
    """Yield (subsets, objectives) chunks over every feasible n-subset, vectorised with numpy.

    Subsets are built level by level (each combination extended by larger indices); the last level is produced in
    chunks of about `chunk_size` rows, so memory stays bounded for the 8.3 M five-language subsets of 65.
    """
    m = problem.size
    if n == 0:
        yield np.zeros((1, 0), dtype=np.int16), np.zeros(1)
        return
    flat = problem.distances.ravel()
    groups = problem.groups

    def extend(parents: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        last = parents[:, -1].astype(np.int64) if parents.shape[1] else np.full(len(parents), -1, dtype=np.int64)
        counts = m - 1 - last
        total = int(counts.sum())
        owner = np.repeat(np.arange(len(parents)), counts)
        offsets = np.cumsum(counts) - counts
        new = last[owner] + 1 + (np.arange(total) - offsets[owner])
        out = values[owner] + problem.anchor[new]
        keep = np.ones(total, dtype=bool)
        for column in range(parents.shape[1]):
            previous = parents[owner, column].astype(np.int64)
            out += flat[previous * m + new]
            if groups is not None:
                keep &= (groups[new] < 0) | (groups[new] != groups[previous])
        children = np.concatenate([parents[owner], new[:, None].astype(np.int16)], axis=1)
        return children[keep], out[keep]

    parents, values = np.zeros((1, 0), dtype=np.int16), np.zeros(1)
    for _ in range(n - 1):
        parents, values = extend(parents, values)
    last = parents[:, -1].astype(np.int64) if parents.shape[1] else np.full(len(parents), -1, dtype=np.int64)
    children_per_parent = m - 1 - last
    start = 0
    while start < len(parents):
        stop = start + max(1, int(np.searchsorted(np.cumsum(children_per_parent[start:]), chunk_size)))
        chunk, chunk_values = extend(parents[start:stop], values[start:stop])
        if len(chunk):
            yield chunk, chunk_values
        start = stop


def _complement_problem(problem: Problem, k: int) -> tuple[Problem, float]:
    """Choosing S of size m-k equals removing T of size k: obj(S) = constant + obj'(T) with a modified anchor."""
    row_sums = problem.distances.sum(axis=1)
    constant = float(np.triu(problem.distances, 1).sum() + problem.anchor.sum())
    return Problem(problem.distances, -(row_sums + problem.anchor)), constant


def _exhaustive_plan(problem: Problem, n: int) -> tuple[Problem, int, float, bool] | None:
    """Pick direct or complement enumeration, whichever is smaller; None when groups forbid the complement."""
    m = problem.size
    if n <= m - n or problem.groups is not None:
        return problem, n, 0.0, False
    complement, constant = _complement_problem(problem, m - n)
    return complement, m - n, constant, True


def exhaustive_size(problem: Problem, n: int) -> int:
    """How many rows exhaustive search touches (a bound when groups prune subsets)."""
    _, k, _, _ = _exhaustive_plan(problem, n)
    return max(count_subsets(problem.size, k), _enumeration_size(problem.size, k))


def solve_exhaustive(problem: Problem, n: int, sense: str) -> Solution:
    """Enumerate every feasible n-subset (or its complement) and return the best: proven optimal."""
    start = time.perf_counter()
    plan, k, constant, complemented = _exhaustive_plan(problem, n)
    best_value, best_subset, seen = None, None, 0
    for subsets, values in enumerate_objectives(plan, k):
        seen += len(values)
        position = int(np.argmax(values) if sense == "max" else np.argmin(values))
        value = float(values[position])
        if best_value is None or (value > best_value if sense == "max" else value < best_value):
            best_value, best_subset = value, subsets[position]
    if best_subset is None:
        raise ValueError(f"No feasible subset of size {n} exists under the strategy's constraints.")
    chosen = [int(i) for i in best_subset]
    if complemented:
        chosen = sorted(set(range(problem.size)) - set(chosen))
    return Solution(
        indices=sorted(chosen),
        objective=problem.objective(chosen),
        solver="exhaustive",
        optimal=True,
        seconds=time.perf_counter() - start,
        details=f"enumerated {seen:,} subsets" + (" (as complements)" if complemented else ""),
    )


def solve_milp(problem: Problem, n: int, sense: str, time_limit: float) -> Solution:
    """Exact MILP (HiGHS): x_i binary, y_ij = x_i * x_j linearised, plus sum_j y_ij = (n-1) x_i (tight for both
    senses).

    Proven optimal when HiGHS finishes within `time_limit`; otherwise returns its best subset (if any) and its bound.
    """
    import scipy.sparse as sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    start = time.perf_counter()
    m = problem.size
    iu, ju = np.triu_indices(m, 1)
    pairs = len(iu)
    sign = 1.0 if sense == "min" else -1.0
    cost = sign * np.concatenate([problem.anchor, problem.distances[iu, ju]])
    y = m + np.arange(pairs)
    blocks = [
        # y_ij <= x_i, y_ij <= x_j, x_i + x_j - y_ij <= 1
        (np.repeat(np.arange(pairs), 2), np.stack([y, iu], 1).ravel(), np.tile([1.0, -1.0], pairs), -np.inf, 0.0),
        (np.repeat(np.arange(pairs), 2), np.stack([y, ju], 1).ravel(), np.tile([1.0, -1.0], pairs), -np.inf, 0.0),
        (
            np.repeat(np.arange(pairs), 3),
            np.stack([iu, ju, y], 1).ravel(),
            np.tile([1.0, 1.0, -1.0], pairs),
            -np.inf,
            1.0,
        ),
        # sum_j y_ij - (n - 1) x_i = 0 for every i
        (
            np.concatenate([iu, ju, np.arange(m)]),
            np.concatenate([y, y, np.arange(m)]),
            np.concatenate([np.ones(2 * pairs), np.full(m, -(n - 1.0))]),
            0.0,
            0.0,
        ),
        # sum_i x_i = n
        (np.zeros(m, dtype=np.int64), np.arange(m), np.ones(m), float(n), float(n)),
    ]
    if problem.groups is not None:
        labels = np.unique(problem.groups[problem.groups >= 0])
        members = np.flatnonzero(problem.groups >= 0)
        rows = np.searchsorted(labels, problem.groups[members])
        blocks.append((rows, members, np.ones(len(members)), -np.inf, 1.0))
    constraints = []
    for rows, cols, values, lower, upper in blocks:
        count = int(rows.max()) + 1
        matrix = sparse.csr_matrix((values, (rows, cols)), shape=(count, m + pairs))
        constraints.append(LinearConstraint(matrix, np.full(count, lower), np.full(count, upper)))
    result = milp(
        cost,
        constraints=constraints,
        integrality=np.concatenate([np.ones(m), np.zeros(pairs)]),
        bounds=Bounds(0.0, 1.0),
        options={"time_limit": max(time_limit, 0.01), "disp": False},
    )
    seconds = time.perf_counter() - start
    bound = getattr(result, "mip_dual_bound", None)
    bound = None if bound is None or not np.isfinite(bound) else sign * float(bound)
    if result.x is None:
        return Solution([], float("nan"), "milp", False, seconds, bound, f"no solution: {result.message}")
    chosen = [int(i) for i in np.flatnonzero(result.x[:m] > 0.5)]
    optimal = result.status == 0
    details = "HiGHS proved optimality" if optimal else f"HiGHS stopped: {result.message}"
    return Solution(sorted(chosen), problem.objective(chosen), "milp", optimal, seconds, bound, details)


def _start_subset(
    problem: Problem, n: int, weights: np.ndarray, anchor: np.ndarray, first: int | None, order: np.ndarray | None
) -> list[int]:
    """Greedy construction (from `first`), or the first feasible n of a random `order`."""
    m = problem.size
    used_groups: set[int] = set()
    chosen: list[int] = []

    def allowed(i: int) -> bool:
        return problem.groups is None or problem.groups[i] < 0 or int(problem.groups[i]) not in used_groups

    def take(i: int) -> None:
        chosen.append(i)
        if problem.groups is not None and problem.groups[i] >= 0:
            used_groups.add(int(problem.groups[i]))

    if order is not None:
        for i in order:
            if len(chosen) == n:
                break
            if allowed(int(i)):
                take(int(i))
        return chosen
    take(first)
    gain = anchor + weights[:, first]
    while len(chosen) < n:
        candidates = [i for i in range(m) if i not in chosen and allowed(i)]
        best = max(candidates, key=lambda i: (gain[i], -i))
        take(best)
        gain = gain + weights[:, best]
    return chosen


def _swap_descent(problem: Problem, chosen: list[int], weights: np.ndarray, anchor: np.ndarray) -> list[int]:
    """Best-improvement swap local search on the maximisation of sum(weights over pairs) + sum(anchor)."""
    m = problem.size
    inside = np.zeros(m, dtype=bool)
    inside[chosen] = True
    contribution = anchor + weights[:, inside].sum(axis=1)
    while True:
        members = np.flatnonzero(inside)
        outside = np.flatnonzero(~inside)
        if len(outside) == 0:
            break
        delta = contribution[outside][None, :] - contribution[members][:, None] - weights[np.ix_(members, outside)]
        if problem.groups is not None:
            owner = {int(problem.groups[i]): k for k, i in enumerate(members) if problem.groups[i] >= 0}
            for column, j in enumerate(outside):
                label = int(problem.groups[j])
                if label >= 0 and label in owner:
                    keep = delta[owner[label], column]
                    delta[:, column] = -np.inf
                    delta[owner[label], column] = keep
        position = int(np.argmax(delta))
        if delta.flat[position] <= 1e-12:
            break
        leave, enter = members[position // len(outside)], outside[position % len(outside)]
        inside[leave], inside[enter] = False, True
        contribution += weights[:, enter] - weights[:, leave]
    return sorted(int(i) for i in np.flatnonzero(inside))


def solve_local_search(problem: Problem, n: int, sense: str, seed: int, restarts: int) -> Solution:
    """Greedy construction plus swap local search, then `restarts - 1` seeded random restarts; best kept."""
    start = time.perf_counter()
    sign = 1.0 if sense == "max" else -1.0
    weights, anchor = sign * problem.distances, sign * problem.anchor
    rng = np.random.RandomState(seed)
    first = int(np.argmax(anchor)) if np.any(anchor) else int(np.argmax(weights.sum(axis=1)))
    best, best_value = None, -np.inf
    for attempt in range(restarts):
        order = None if attempt == 0 else rng.permutation(problem.size)
        chosen = _start_subset(problem, n, weights, anchor, first, order)
        if len(chosen) < n:
            raise ValueError(f"No feasible subset of size {n} exists under the strategy's constraints.")
        chosen = _swap_descent(problem, chosen, weights, anchor)
        value = sign * problem.objective(chosen)
        if value > best_value + 1e-12:
            best, best_value = chosen, value
    return Solution(
        indices=best,
        objective=problem.objective(best),
        solver="local-search",
        optimal=False,
        seconds=time.perf_counter() - start,
        details=f"greedy + swap descent, {restarts} restarts, seed {seed}",
    )


def solve(problem: Problem, n: int, sense: str, solver_args: SolverArguments, seed: int) -> Solution:
    """Run the requested solver (or pick one: exhaustive if small, MILP for min, local search + MILP bound for max)."""
    if n > problem.max_size():
        raise ValueError(f"Cannot choose n={n}: at most {problem.max_size()} candidates satisfy the constraints.")
    method = solver_args.solver
    if method == "auto":
        if exhaustive_size(problem, n) <= solver_args.exhaustive_limit:
            method = "exhaustive"
        else:
            method = "milp" if sense == "min" else "local-search"
    if method == "exhaustive":
        return solve_exhaustive(problem, n, sense)
    if method == "milp":
        solution = solve_milp(problem, n, sense, solver_args.milp_time_limit)
        if solution.optimal or solver_args.solver == "milp" and solution.indices:
            return solution
        fallback = solve_local_search(problem, n, sense, seed, solver_args.restarts)
        return _merge(fallback, solution, sense)
    solution = solve_local_search(problem, n, sense, seed, solver_args.restarts)
    if solver_args.solver == "auto" and solver_args.milp_time_limit > 0:
        solution = _merge(solution, solve_milp(problem, n, sense, solver_args.milp_time_limit), sense)
    return solution


def _merge(heuristic: Solution, exact: Solution, sense: str) -> Solution:
    """Combine local search with a (possibly unfinished) MILP: best subset, MILP bound, optimality if certified."""
    better = sense == "max" and exact.objective > heuristic.objective + 1e-9
    better |= sense == "min" and exact.objective < heuristic.objective - 1e-9
    best = exact if exact.indices and better else heuristic
    bound = exact.bound
    proven = exact.optimal or (bound is not None and abs(bound - best.objective) <= 1e-7 * max(1.0, abs(bound)))
    solver = f"{heuristic.solver}+milp"
    details = f"{heuristic.details}; MILP: {exact.details}"
    return Solution(best.indices, best.objective, solver, proven, heuristic.seconds + exact.seconds, bound, details)


# ---------------------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------------------


def is_indo_european(language: lang_registry.Language) -> bool:
    return language.family in INDO_EUROPEAN_BRANCHES


def family_label(language: lang_registry.Language) -> str:
    """Table 5's family label; a missing family (Basque, 'N/A') is an isolate: a family of its own."""
    return language.family or f"isolate:{language.code}"


def pool_codes(registry: lang_registry.Registry, pool: str) -> list[str]:
    """The pool's languages in registry (Table 6 'All 65 languages') order."""
    _, keep = POOLS[canonical_pool(pool)]
    return [code for code in registry.pool() if keep(registry.languages[code])]


def candidates_for(
    registry: lang_registry.Registry, strategy: str, pool: str, family_include_indo_european: bool = False
) -> tuple[list[str], list[str] | None, str]:
    """The strategy's candidate languages within the pool, their group labels (at most one per group) and a note."""
    codes = pool_codes(registry, pool)
    english = registry.english
    if strategy in ("latin-most", "latin-least"):
        return [c for c in codes if registry.languages[c].script == "Latin"], None, "Latin-script languages"
    if strategy == "family-ie":
        return [c for c in codes if is_indo_european(registry.languages[c])], None, "Indo-European languages"
    if strategy == "script":
        kept = [c for c in codes if registry.languages[c].script != english.script]
        return kept, [registry.languages[c].script for c in kept], "one language per non-Latin script"
    if strategy == "family":
        if family_include_indo_european:
            kept = [c for c in codes if registry.languages[c].family != english.family]
            note = "one language per family, Indo-European branches counted as families (not English's Germanic)"
        else:
            kept = [c for c in codes if not is_indo_european(registry.languages[c])]
            note = "one language per non-Indo-European family"
        return kept, [family_label(registry.languages[c]) for c in kept], note
    return codes, None, "all pool languages"


def build_problem(
    distances: DistanceMatrix, codes: list[str], labels: list[str] | None, include_english: bool
) -> Problem:
    index = distances.index(codes)
    matrix = distances.matrix[np.ix_(index, index)]
    if include_english:
        anchor = distances.matrix[distances.index([ANCHOR])[0], index]
    else:
        anchor = np.zeros(len(codes))
    groups = None
    if labels is not None:
        names = sorted(set(labels))
        groups = np.array([names.index(label) for label in labels], dtype=np.int64)
    return Problem(distances=matrix, anchor=anchor, groups=groups)


def draw_random(registry: lang_registry.Registry, codes: list[str], n: int, seed: int) -> list[str]:
    """Draw exactly as `languages.load_subset` does for `strategy: random`, over `codes` in registry pool order."""
    chosen = set(codes)
    pool = [code for code in registry.pool() if code in chosen] + [c for c in codes if c not in registry.pool()]
    return lang_registry.draw_random(pool, n, seed)


@dataclass
class Selection:
    """A computed subset with everything needed to document it."""

    strategy: str
    pool: str
    n: int
    languages: list[str]
    candidates: list[str]
    constraint: str
    features: str | None
    objective: float | None
    solution: Solution | None
    seed: int
    include_english: bool


def _check_size(strategy: str, pool: str, n: int, codes: list[str], labels: list[str] | None) -> None:
    if labels is None:
        if n > len(codes):
            raise ValueError(
                f"--n {n} is larger than the {len(codes)} candidate languages of strategy {strategy} in pool "
                f"{pool!r}; use --n {len(codes)} or less, or a larger --pool."
            )
        return
    distinct = sorted(set(labels))
    if n > len(distinct):
        kind = "scripts" if strategy == "script" else "families"
        hint = (
            " or pass --family_include_indo_european to count each Indo-European branch as a family (the paper's "
            "n = 20 and 25 rows do)"
            if strategy == "family"
            else ""
        )
        raise ValueError(
            f"--strategy {strategy} picks one language per distinct {kind[:-1] if kind == 'scripts' else 'family'}, "
            f"but pool {pool!r} has only {len(distinct)} distinct {kind} ({', '.join(distinct)}): use --n "
            f"{len(distinct)} or less{hint}."
        )


def select(
    registry: lang_registry.Registry,
    strategy: str,
    pool: str,
    n: int | None,
    distances: DistanceMatrix | None,
    solver_args: SolverArguments,
    seed: int,
    include_english: bool = True,
    family_include_indo_european: bool = False,
) -> Selection:
    """Compute the subset of `strategy` within `pool` (all strategies; `distances` only needed for optimised ones)."""
    strategy, pool = canonical_strategy(strategy), canonical_pool(pool)
    codes, labels, constraint = candidates_for(registry, strategy, pool, family_include_indo_european)
    if strategy == "pool":
        if n is not None and n != len(codes):
            raise ValueError(f"--strategy pool returns the whole pool {pool!r} ({len(codes)}); drop --n or set it so.")
        return Selection(strategy, pool, len(codes), codes, codes, constraint, None, None, None, seed, include_english)
    if n is None:
        raise ValueError(f"--strategy {strategy} needs --n.")
    _check_size(strategy, pool, n, codes, labels)
    if strategy == "random":
        chosen = draw_random(registry, codes, n, seed)
        objective = None
        if distances is not None:
            objective = build_problem(distances, codes, None, include_english).objective(
                [codes.index(c) for c in chosen]
            )
        return Selection(
            strategy,
            pool,
            n,
            chosen,
            codes,
            constraint,
            distances and distances.description,
            objective,
            None,
            seed,
            include_english,
        )
    problem = build_problem(distances, codes, labels, include_english)
    solution = solve(problem, n, SENSE[strategy], solver_args, seed)
    chosen = [codes[i] for i in sorted(solution.indices)]
    order = {code: i for i, code in enumerate(registry.pool())}
    chosen.sort(key=order.__getitem__)
    return Selection(
        strategy,
        pool,
        n,
        chosen,
        codes,
        constraint,
        distances.description,
        solution.objective,
        solution,
        seed,
        include_english,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Comparison with a subset file
# ---------------------------------------------------------------------------------------------------------------------


def objective_percentile(
    problem: Problem, n: int, value: float, samples: int, exhaustive_limit: int, seed: int
) -> dict[str, Any]:
    """Where `value` ranks among all n-subsets of the problem's candidates (group constraints ignored).

    Exact (enumeration) when there are at most `exhaustive_limit` subsets, else estimated from `samples` uniform
    random subsets (seeded). `percentile` is the share of subsets whose objective is <= value (100: the most diverse
    possible, 0: the least); ranks count from 1 in each direction (ties share the better rank).
    """
    unconstrained = Problem(problem.distances, problem.anchor)
    total = count_subsets(problem.size, n)
    tolerance = 1e-9
    less = greater = seen = 0

    def tally(values: np.ndarray) -> None:
        nonlocal less, greater, seen
        less += int(np.sum(values < value - tolerance))
        greater += int(np.sum(values > value + tolerance))
        seen += len(values)

    if exhaustive_size(unconstrained, n) <= exhaustive_limit:
        plan, k, constant, _ = _exhaustive_plan(unconstrained, n)
        for _, values in enumerate_objectives(plan, k):
            tally(values + constant)
        method = "exact"
    else:
        rng = np.random.RandomState(seed)
        batch = max(1, min(samples, 4_000_000 // (n * n)))
        while seen < samples:
            size = min(batch, samples - seen)
            draws = np.argpartition(rng.random_sample((size, problem.size)), n - 1, axis=1)[:, :n]
            pair_sums = problem.distances[draws[:, :, None], draws[:, None, :]].sum(axis=(1, 2)) / 2
            tally(pair_sums + problem.anchor[draws].sum(axis=1))
        method = f"estimated from {seen:,} random subsets"
    iu = np.triu_indices(problem.size, 1)
    random_mean = math.comb(n, 2) * float(problem.distances[iu].mean()) + n * float(problem.anchor.mean())
    return {
        "method": method,
        "exact": method == "exact",
        "subsets": total,
        "random_mean": random_mean,
        "percentile": 100.0 * (seen - greater) / seen,
        "rank_from_most_diverse": 1 + round(greater / seen * total),
        "rank_from_least_diverse": 1 + round(less / seen * total),
    }


def compare(
    registry: lang_registry.Registry,
    path: str,
    selection_args: SelectionArguments,
    feature_args: FeatureArguments,
    solver_args: SolverArguments,
    family_include_indo_european: bool = False,
) -> tuple[dict[str, Any], Selection]:
    """Compare a subset file with the selection its strategy computes; returns (report, computed selection)."""
    subset = lang_registry.load_subset(path, registry=registry, seed=selection_args.seed)
    strategy, pool = (None, None)
    if subset.strategy:
        try:
            strategy, pool = parse_file_strategy(subset.strategy)
        except ValueError:
            if selection_args.strategy is None:
                raise
    strategy = selection_args.strategy or strategy
    if strategy is None:
        raise ValueError(f"{subset.path} has no strategy key; pass --strategy.")
    pool = selection_args.pool or pool or "all"
    listed = subset.languages
    n = selection_args.n or len(listed)
    notes = []
    if subset.declared_n is not None and subset.declared_n != len(listed):
        notes.append(f"The file declares n={subset.declared_n} but lists {len(listed)} languages; compared at n={n}.")
    codes, labels, _ = candidates_for(registry, strategy, pool, family_include_indo_european)
    outside = [c for c in listed if c not in codes]
    if outside:
        notes.append(
            f"{len(outside)} listed language(s) are outside the strategy's candidates in pool {pool!r}: "
            f"{', '.join(outside)}."
        )
    if strategy == "random" and n > len(codes):
        notes.append(f"n={n} exceeds the pool's {len(codes)} languages; compared with the whole pool.")
        n = len(codes)
    if strategy in ("family", "script") and labels is not None and n > len(set(labels)):
        notes.append(f"n={n} exceeds the {len(set(labels))} distinct groups; computed with n={len(set(labels))}.")
        n = len(set(labels))
    distances = None if strategy == "pool" else load_distances(registry, feature_args)
    if strategy == "pool":
        n = None
    selection = select(
        registry,
        strategy,
        pool,
        n,
        distances,
        solver_args,
        selection_args.seed,
        feature_args.include_english,
        family_include_indo_european,
    )
    computed, printed = set(selection.languages), set(listed)
    overlap = len(computed & printed)
    report: dict[str, Any] = {
        "file": str(subset.path),
        "file_strategy": subset.strategy,
        "strategy": strategy,
        "pool": pool,
        "n_listed": len(listed),
        "n_declared": subset.declared_n,
        "n_computed": len(selection.languages),
        "features": selection.features,
        "file_languages": listed,
        "computed_languages": selection.languages,
        "overlap": overlap,
        "jaccard": overlap / len(computed | printed) if computed | printed else 1.0,
        "only_in_file": [c for c in listed if c not in computed],
        "only_computed": [c for c in selection.languages if c not in printed],
        "selection": selection_metadata(selection),
        "notes": notes,
    }
    if distances is not None:
        # Rank the file among subsets of the strategy's candidates, or of the pool if the file strays outside them.
        reference, among = codes, "strategy candidates"
        if any(c not in reference for c in listed):
            reference, among = pool_codes(registry, pool), f"pool {pool!r}"
        if any(c not in reference for c in listed):
            reference, among = registry.pool(), "pool 'all'"
        problem = build_problem(distances, reference, None, feature_args.include_english)
        value = problem.objective([reference.index(c) for c in listed])
        report["file_objective"] = value
        report["computed_objective"] = selection.objective
        report["percentile_among"] = f"the {len(reference)} {among}"
        report["file_rank"] = objective_percentile(
            problem, len(listed), value, solver_args.compare_samples, solver_args.exhaustive_limit, selection_args.seed
        )
        mean = report["file_rank"]["random_mean"]
        if selection.objective is not None and len(listed) == len(selection.languages) and selection.objective != mean:
            # 0 = no better than a random subset on average, 1 = as good as the computed subset (the optimum if proven)
            report["file_position"] = (value - mean) / (selection.objective - mean)
        if SENSE.get(strategy) and report["jaccard"] < LOW_OVERLAP:
            notes.append(
                f"Low overlap (Jaccard {report['jaccard']:.2f}): the file's languages are not the "
                f"{'maximum' if SENSE[strategy] == 'max' else 'minimum'} of this objective under "
                f"{selection.features}. "
                "The paper's URIEL+ settings (feature sets, databases, imputation, code mapping) are not published, "
                "so the paper's rows are not reproducible exactly; the percentile says how diverse the row is instead."
            )
    return report, selection


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------


def selection_metadata(selection: Selection) -> dict[str, Any]:
    """The strategy, parameters, objective, solver and optimality status of a selection (JSON/YAML friendly)."""
    meta: dict[str, Any] = {
        "strategy": selection.strategy,
        "pool": selection.pool,
        "n": selection.n,
        "candidates": len(selection.candidates),
        "constraint": selection.constraint,
        "seed": selection.seed,
    }
    if selection.features is not None:
        meta["features"] = selection.features
        meta["include_english"] = selection.include_english
        meta["objective"] = None if selection.objective is None else round(float(selection.objective), 6)
    if selection.solution is not None:
        solution = selection.solution
        meta.update(
            solver=solution.solver,
            proven_optimal=bool(solution.optimal),
            bound=None if solution.bound is None else round(float(solution.bound), 6),
            gap=None if solution.gap is None else round(float(solution.gap), 6),
            seconds=round(solution.seconds, 3),
            solver_details=solution.details,
        )
    return meta


def subset_document(selection: Selection, name: str, registry: lang_registry.Registry, command: str) -> dict[str, Any]:
    """The subset YAML content (schema of subsets/*.yaml; `selection` only if the loader accepts that key)."""
    meta = selection_metadata(selection)
    random_all = selection.strategy == "random" and selection.pool == "all"
    description = (
        f"{selection.strategy} selection of n={selection.n} from pool '{selection.pool}' "
        f"({POOLS[selection.pool][0]}), computed by select_languages.py."
    )
    notes = []
    if selection.solution is not None:
        status = (
            "proven optimal"
            if selection.solution.optimal
            else (
                f"not proven optimal (bound {meta['bound']}, gap {meta['gap']})"
                if meta["bound"] is not None
                else "not proven optimal"
            )
        )
        notes.append(
            f"Objective (sum of pairwise angular distances over S{' + eng' if selection.include_english else ''}, "
            f"{selection.features}): {meta['objective']}; solver {meta['solver']}, {status}, "
            f"{meta['seconds']} s; constraint: {selection.constraint}."
        )
    if selection.strategy == "random":
        notes.append(
            f"Drawn with np.random.seed(seed); np.random.choice(pool, n, replace=False); seed {selection.seed} "
            f"gives: {', '.join(selection.languages)}."
        )
    document: dict[str, Any] = {
        "name": name,
        "description": description,
        "source": {"script": "select_languages.py", "command": command},
        "strategy": "random" if random_all else file_strategy_name(selection.strategy, selection.pool),
        "n": selection.n,
        "languages": None if random_all else list(selection.languages),
    }
    if random_all:
        document["pool"] = "all"
        notes.insert(0, "strategy: random with languages: null draws n languages with the run seed at load time.")
    document["notes"] = notes
    document["selection"] = meta
    return document


def subset_yaml(document: dict[str, Any]) -> str:
    """Render a subset document in the layout of subsets/*.yaml (flow lists and mappings, one note per line)."""

    def scalar(value: Any) -> str:
        if isinstance(value, str):
            if re.fullmatch(r"[A-Za-z][\w.\-]*", value) and yaml.safe_load(value) == value:
                return value
            return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid double-quoted YAML scalar
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()

    lines = []
    for key, value in document.items():
        if key == "notes":
            lines.append("notes:")
            lines.extend(f"  - {scalar(note)}" for note in value)
        elif isinstance(value, dict) and key == "selection":
            lines.append("selection:")
            lines.extend(f"  {inner}: {scalar(item)}" for inner, item in value.items())
        elif isinstance(value, dict):
            lines.append(f"{key}: {{" + ", ".join(f"{inner}: {scalar(item)}" for inner, item in value.items()) + "}")
        elif isinstance(value, list):
            lines.append(f"{key}: [" + ", ".join(value) + "]")
        else:
            lines.append(f"{key}: {scalar(value)}")
    text = "\n".join(lines) + "\n"
    if yaml.safe_load(text) != document:  # never write a file that reads back differently
        text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=119)
    return text


def write_yaml_atomic(path: str | Path, document: dict[str, Any], overwrite: bool) -> Path:
    """Write the subset YAML through a temporary file, so that a failure never leaves half a file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; give the path of the YAML file, e.g. {path / 'mine.yaml'}.")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass --overwrite_output to replace it or choose another --output.")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = subset_yaml(document)
    # realign_utils.atomic_writer does the same, but importing it would load torch into this numpy-only tool.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def format_selection(selection: Selection, registry: lang_registry.Registry) -> str:
    meta = selection_metadata(selection)
    lines = [
        f"Strategy {selection.strategy}, pool {selection.pool} ({len(selection.candidates)} candidates; "
        f"{selection.constraint}), n={selection.n}",
    ]
    if selection.features:
        lines.append(f"Features: {selection.features}; English in objective: {selection.include_english}")
    if selection.objective is not None:
        lines.append(f"Objective: {selection.objective:.6f}")
    if selection.solution is not None:
        lines.append(
            f"Solver: {meta['solver']} ({meta['solver_details']}), {meta['seconds']:.2f} s, "
            f"proven optimal: {meta['proven_optimal']}"
            + (
                f", bound {meta['bound']}, gap {meta['gap']}"
                if meta["bound"] is not None and not meta["proven_optimal"]
                else ""
            )
        )
    lines.append(f"Languages ({len(selection.languages)}): {', '.join(selection.languages)}")
    for code in selection.languages:
        language = registry.languages[code]
        lines.append(
            f"  {code}  {language.name:<16} {family_label(language):<24} {language.script:<11} joshi {language.joshi}"
        )
    return "\n".join(lines)


def format_comparison(report: dict[str, Any]) -> str:
    lines = [
        f"File: {report['file']} (strategy {report['file_strategy']!r}; listed {report['n_listed']}, declared "
        f"{report['n_declared']})",
        f"Computed: strategy {report['strategy']}, pool {report['pool']}, n={report['n_computed']}, "
        f"features {report['features']}",
        f"  file:     {', '.join(report['file_languages'])}",
        f"  computed: {', '.join(report['computed_languages'])}",
        f"Overlap: {report['overlap']} of {report['n_listed']} (Jaccard {report['jaccard']:.3f})",
        f"  only in file:     {', '.join(report['only_in_file']) or '-'}",
        f"  only in computed: {', '.join(report['only_computed']) or '-'}",
    ]
    if "file_objective" in report:
        rank = report["file_rank"]
        computed = report["computed_objective"]
        lines.append(
            f"Objective: file {report['file_objective']:.4f}"
            + (f", computed {computed:.4f}" if computed is not None else "")
        )
        if rank["exact"]:
            where = (
                f"rank {rank['rank_from_most_diverse']:,} from the most diverse, "
                f"{rank['rank_from_least_diverse']:,} from the least"
            )
        elif rank["percentile"] == 100.0:
            where = "more diverse than every sampled subset"
        elif rank["rank_from_least_diverse"] == 1:
            where = "less diverse than every sampled subset"
        elif rank["percentile"] >= 50:
            where = f"about the top {100 - rank['percentile']:.3g}% by diversity"
        else:
            where = f"about the bottom {rank['percentile']:.3g}% by diversity"
        lines.append(
            f"File's objective among all {rank['subsets']:,} subsets of size {report['n_listed']} of "
            f"{report['percentile_among']}: percentile {rank['percentile']:.2f} (100 = most diverse; {where}; "
            f"{rank['method']}); a random subset averages {rank['random_mean']:.4f}"
        )
        if "file_position" in report:
            lines.append(
                "File's position between a random subset (0) and the computed subset (1): "
                f"{report['file_position']:.2f}"
            )
    selection = report["selection"]
    if "solver" in selection:
        lines.append(
            f"Solver: {selection['solver']}, {selection['seconds']} s, proven optimal: {selection['proven_optimal']}"
        )
    lines.extend(f"Note: {note}" for note in report["notes"])
    return "\n".join(lines)


def setup_logging() -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.WARNING
    )
    for name in (__name__, "languages", "select_languages"):
        logging.getLogger(name).setLevel(logging.INFO)


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "python select_languages.py " + " ".join(shlex.quote(arg) for arg in args)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    selection_args, feature_args, solver_args = parse_arguments(argv)
    setup_logging()
    registry = lang_registry.load_registry()
    command = command_line(argv)
    include_ie = selection_args.family_include_indo_european
    if selection_args.compare is not None:
        report, selection = compare(
            registry, selection_args.compare, selection_args, feature_args, solver_args, include_ie
        )
        print(format_comparison(report))
    else:
        needs_distances = selection_args.strategy not in ("random", "pool")
        distances = load_distances(registry, feature_args) if needs_distances else None
        selection = select(
            registry,
            selection_args.strategy,
            selection_args.pool or "all",
            selection_args.n,
            distances,
            solver_args,
            selection_args.seed,
            feature_args.include_english,
            include_ie,
        )
        report = selection_metadata(selection) | {"languages": selection.languages}
        print(format_selection(selection, registry))
    if selection_args.output is not None:
        name = selection_args.name or Path(selection_args.output).stem
        path = write_yaml_atomic(
            selection_args.output, subset_document(selection, name, registry, command), selection_args.overwrite_output
        )
        report["output"] = str(path)
        print(f"Wrote {path}")
    if selection_args.report_json is not None:
        Path(selection_args.report_json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
