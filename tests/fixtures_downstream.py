"""Downstream fixture files in the scripts' --data_dir layout, with the real schemas of the Hub datasets (DESIGN §5).

`build_downstream_dir(root)` writes DIR/<source>/<config>/<split>.<ext> for every config the registry lists, so the
paper's full evaluation sets resolve offline. Column names, ClassLabel names and their ORDER, split names and config
names copy the Hub datasets; the label orders are written out here on purpose rather than imported from the scripts
under test. The files use every local format the scripts accept: parquet with ClassLabel features (most), a
parquet-branch folder (`<config>/<split>/0000.parquet`: MasakhaNER 2.0, IndoNLI), JSON lines with integer ids or tag
names, CoNLL-U (udpos yo, with a multi-word token line and an empty node), MasakhaPOS' raw "token TAG" text (hau) and
AfriXNLI's TSV.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import PARALLEL
from datasets import ClassLabel, Dataset, Features, List, Value

ROOT = Path(__file__).resolve().parents[1]

# Hub label orders (ClassLabel names), copied from the dataset cards.
UDPOS_TAGS = [
    "ADJ",
    "ADP",
    "ADV",
    "AUX",
    "CCONJ",
    "DET",
    "INTJ",
    "NOUN",
    "NUM",
    "PART",
    "PRON",
    "PROPN",
    "PUNCT",
    "SCONJ",
    "SYM",
    "VERB",
    "X",
]
MASAKHAPOS_TAGS = [
    "NOUN",
    "PUNCT",
    "ADP",
    "NUM",
    "SYM",
    "SCONJ",
    "ADJ",
    "PART",
    "DET",
    "CCONJ",
    "PROPN",
    "PRON",
    "X",
    "ADV",
    "INTJ",
    "VERB",
    "AUX",
]
WIKIANN_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
MASAKHANER_TAGS = [*WIKIANN_TAGS, "B-DATE", "I-DATE"]
NLI_LABELS = ["entailment", "neutral", "contradiction"]

# A MasakhaPOS sentence whose tags, read by position in the UDPOS order, would be wrong five times out of six:
# MasakhaPOS ids [0, 8, 15, 0, 3, 1] mean NOUN DET VERB NOUN NUM PUNCT; as UDPOS ids they would be
# ADJ NUM VERB ADJ AUX ADP.
MASAKHAPOS_CRAFTED = {
    "tokens": ["Ọmọ", "náà", "ka", "ìwé", "kan", "."],
    "names": ["NOUN", "DET", "VERB", "NOUN", "NUM", "PUNCT"],
}
# A MasakhaNER sentence with a DATE entity (→ O for the WikiANN-trained model).
MASAKHANER_CRAFTED = {
    "tokens": ["Ada", "Lovelace", "lọ", "sí", "Lagos", "ní", "ọjọ́", "Ajé", "."],
    "names": ["B-PER", "I-PER", "O", "O", "B-LOC", "O", "B-DATE", "I-DATE", "O"],
}
MYXNLI_STRINGS = ["entailment", "contradiction", "neutral"]

DETERMINERS = {"the", "a", "an", "le", "la", "l'", "un", "une", "les", "des", "du", "ma", "mon", "my", "náà", "kan"}
PEOPLE = ["Ada Lovelace", "Kofi", "Amina Yusuf", "John", "Marie Curie", "Chinua Achebe"]
PLACES = ["Lagos", "Paris", "New York", "Nairobi", "Dakar", "Accra"]
ORGS = ["Red Cross", "UNESCO", "Bank of Ghana", "Google"]
TEMPLATES = [
    ("{per} lives in {loc} .", None),
    ("{per} works for {org} in {loc} .", None),
    ("The {org} office is in {loc} .", None),
    ("{per} met {per2} at the market .", None),
]


def words(text: str) -> list[str]:
    """Whitespace tokens with final punctuation split off, as the UD / WikiANN files are pre-tokenised."""
    out = []
    for token in text.split():
        if len(token) > 1 and token[-1] in ".,?!":
            out += [token[:-1], token[-1]]
        else:
            out.append(token)
    return out


def pos_tags(tokens: list[str]) -> list[str]:
    """Deterministic, roughly plausible UPOS tags for fixture sentences."""
    tags = []
    for i, token in enumerate(tokens):
        if token in ".,?!":
            tags.append("PUNCT")
        elif token.lower() in DETERMINERS:
            tags.append("DET")
        elif i > 0 and token[:1].isupper():
            tags.append("PROPN")
        else:
            tags.append("VERB" if i % 3 == 1 else "NOUN")
    return tags


def ner_sentence(index: int) -> tuple[list[str], list[str]]:
    """A sentence with PER / ORG / LOC entities (multi-word ones give I- tags) and its IOB2 tags."""
    template = TEMPLATES[index % len(TEMPLATES)][0]
    fills = {
        "per": PEOPLE[index % len(PEOPLE)],
        "per2": PEOPLE[(index + 3) % len(PEOPLE)],
        "loc": PLACES[index % len(PLACES)],
        "org": ORGS[index % len(ORGS)],
    }
    kinds = {"per": "PER", "per2": "PER", "loc": "LOC", "org": "ORG"}
    tokens, tags = [], []
    for piece in template.split():
        if piece.startswith("{"):
            key = piece.strip("{}")
            entity = fills[key].split()
            tokens += entity
            tags += [f"B-{kinds[key]}"] + [f"I-{kinds[key]}"] * (len(entity) - 1)
        else:
            tokens.append(piece)
            tags.append("O")
    return tokens, tags


def texts(code: str, n: int, offset: int = 0) -> list[str]:
    """n sentences 'in' language `code`: real French / Yoruba / Swahili where conftest has them, English otherwise."""
    column = {"fra": 1, "fr": 1, "yor": 2, "yo": 2, "swa": 3, "sw": 3}.get(code, 0)
    return [PARALLEL[(offset + i) % len(PARALLEL)][column] for i in range(n)]


def registry_configs(resource: str) -> dict[str, str]:
    """{code: config} straight from languages.yaml (the registry is input data, not code under test)."""
    data = yaml.safe_load((ROOT / "languages.yaml").read_text(encoding="utf-8"))
    return {e["code"]: e["eval"][resource] for e in data["languages"] if e["eval"][resource] is not None}


# -- writers ----------------------------------------------------------------------------------------------------------


def write_parquet(path: Path, columns: dict, features: Features) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(columns, features=features).to_parquet(str(path))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def tagging_features(label_column: str, names: list[str], extra: dict | None = None) -> Features:
    return Features({**(extra or {}), "tokens": List(Value("string")), label_column: List(ClassLabel(names=names))})


def udpos_columns(sentences: list[list[str]]) -> dict:
    return {"tokens": sentences, "pos_tags": [[UDPOS_TAGS.index(t) for t in pos_tags(s)] for s in sentences]}


def write_udpos(root: Path, source: str, config: str, split: str, n: int, code: str, fmt: str = "parquet") -> None:
    sentences = [words(t) for t in texts(code, n, offset=len(config))]
    folder = root / source / config
    if fmt == "parquet":
        write_parquet(folder / f"{split}.parquet", udpos_columns(sentences), tagging_features("pos_tags", UDPOS_TAGS))
    elif fmt == "jsonl-names":
        write_jsonl(folder / f"{split}.jsonl", [{"tokens": s, "pos_tags": pos_tags(s)} for s in sentences])
    elif fmt == "conllu":
        lines = []
        for k, sentence in enumerate(sentences):
            lines += [f"# sent_id = {config}-{k}", f"# text = {' '.join(sentence)}"]
            if k == 0:
                # A multi-word token line and an empty node: neither is a word, both must be dropped.
                lines.append(f"1-2\t{sentence[0]}{sentence[1]}\t_\t_\t_\t_\t_\t_\t_\t_")
            for i, (token, tag) in enumerate(zip(sentence, pos_tags(sentence)), start=1):
                lines.append(f"{i}\t{token}\t{token.lower()}\t{tag}\t_\t_\t{max(0, i - 1)}\tdep\t_\t_")
                if k == 0 and i == 2:
                    lines.append("2.1\tghost\tghost\tNOUN\t_\t_\t_\t_\t1:dep\t_")
            lines.append("")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}.conllu").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_masakhapos(root: Path, config: str, n: int, fmt: str = "parquet") -> None:
    sentences = [words(t) for t in texts(config, n, offset=3)]
    tags = [pos_tags(s) for s in sentences]
    if config == "yor":
        sentences[0], tags[0] = MASAKHAPOS_CRAFTED["tokens"], MASAKHAPOS_CRAFTED["names"]
    folder = root / "masakhapos" / config
    if fmt == "txt":
        blocks = ["\n".join(f"{w} {t}" for w, t in zip(s, ts)) for s, ts in zip(sentences, tags)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "test.txt").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
        return
    columns = {
        "id": [str(i) for i in range(n)],
        "tokens": sentences,
        "upos": [[MASAKHAPOS_TAGS.index(t) for t in ts] for ts in tags],
    }
    write_parquet(folder / "test.parquet", columns, tagging_features("upos", MASAKHAPOS_TAGS, {"id": Value("string")}))


def write_wikiann(root: Path, config: str, split: str, n: int, fmt: str = "parquet", offset: int = 0) -> None:
    sentences, tags = zip(*(ner_sentence(offset + i) for i in range(n)))
    folder = root / "wikiann" / config
    spans = [[f"{t[2:]}: {w}" for w, t in zip(s, ts) if t.startswith("B-")] for s, ts in zip(sentences, tags)]
    langs = [[config] * len(s) for s in sentences]
    if fmt == "jsonl-ids":
        rows = [
            {"tokens": s, "ner_tags": [WIKIANN_TAGS.index(t) for t in ts], "langs": lg, "spans": sp}
            for s, ts, lg, sp in zip(sentences, tags, langs, spans)
        ]
        write_jsonl(folder / f"{split}.jsonl", rows)
        return
    features = Features(
        {
            "tokens": List(Value("string")),
            "ner_tags": List(ClassLabel(names=WIKIANN_TAGS)),
            "langs": List(Value("string")),
            "spans": List(Value("string")),
        }
    )
    columns = {
        "tokens": list(sentences),
        "ner_tags": [[WIKIANN_TAGS.index(t) for t in ts] for ts in tags],
        "langs": langs,
        "spans": spans,
    }
    write_parquet(folder / f"{split}.parquet", columns, features)


def write_masakhaner(root: Path, config: str, n: int) -> None:
    sentences, tags = (list(x) for x in zip(*(ner_sentence(i + 1) for i in range(n))))
    if config == "yor":
        sentences[0], tags[0] = MASAKHANER_CRAFTED["tokens"], MASAKHANER_CRAFTED["names"]
    features = tagging_features("ner_tags", MASAKHANER_TAGS, {"id": Value("string")})
    columns = {
        "id": [str(i) for i in range(n)],
        "tokens": sentences,
        "ner_tags": [[MASAKHANER_TAGS.index(t) for t in ts] for ts in tags],
    }
    # The layout of the Hub's refs/convert/parquet branch: <config>/<split>/0000.parquet.
    write_parquet(root / "masakhaner" / config / "test" / "0000.parquet", columns, features)


def nli_rows(code: str, n: int, offset: int = 0) -> list[dict]:
    premises = texts(code, n, offset)
    hypotheses = texts(code, n, offset + 5)
    return [
        {"premise": p, "hypothesis": h, "label": (offset + i) % 3}
        for i, (p, h) in enumerate(zip(premises, hypotheses))
    ]


NLI_FEATURES = Features(
    {"premise": Value("string"), "hypothesis": Value("string"), "label": ClassLabel(names=NLI_LABELS)}
)


def write_nli_parquet(path: Path, rows: list[dict]) -> None:
    write_parquet(path, {k: [r[k] for r in rows] for k in ("premise", "hypothesis", "label")}, NLI_FEATURES)


def write_afrixnli(root: Path, config: str, n: int) -> None:
    lines = ["premise\thypothesis\tlabel"] + [
        f"{r['premise']}\t{r['hypothesis']}\t{r['label']}" for r in nli_rows(config, n, 1)
    ]
    folder = root / "afrixnli" / config
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_myxnli(root: Path, n: int) -> None:
    rows = []
    for i, r in enumerate(nli_rows("eng", n, 2)):
        rows.append(
            {
                "genre": "fiction",
                "label": MYXNLI_STRINGS[i % 3],
                "sentence1_en": r["premise"],
                "sentence2_en": r["hypothesis"],
                "sentence1_my": texts("yor", 1, i)[0],
                "sentence2_my": texts("yor", 1, i + 4)[0],
            }
        )
    write_jsonl(root / "myxnli" / "default" / "test.jsonl", rows)


def build_downstream_dir(root: Path, per_language: int = 2) -> Path:
    """Write every downstream source for every registered config (English train + test included)."""
    root = Path(root)
    for code, config in registry_configs("udpos").items():
        fmt = {"yo": "conllu", "de": "jsonl-names"}.get(config, "parquet")
        write_udpos(root, "udpos", config, "test", per_language, code, fmt)
    write_udpos(root, "udpos", "en", "train", 24, "eng")
    for config, code in (("udpos.English", "eng"), ("udpos.French", "fra"), ("udpos.Yoruba", "yor")):
        write_udpos(root, "xtreme_udpos", config, "test", per_language, code)
    write_udpos(root, "xtreme_udpos", "udpos.English", "train", 24, "eng")
    for config in registry_configs("masakhapos").values():
        write_masakhapos(root, config, max(per_language, 2), "txt" if config == "hau" else "parquet")
    for config in registry_configs("wikiann").values():
        write_wikiann(root, config, "test", per_language, "jsonl-ids" if config == "fr" else "parquet", offset=1)
    write_wikiann(root, "en", "train", 24)
    for config in registry_configs("masakhaner").values():
        write_masakhaner(root, config, max(per_language, 2))
    for code, config in registry_configs("xnli").items():
        write_nli_parquet(root / "xnli" / config / "test.parquet", nli_rows(code, per_language))
    write_nli_parquet(root / "xnli" / "en" / "train.parquet", nli_rows("eng", 24))
    for config in registry_configs("afrixnli").values():
        write_afrixnli(root, config, per_language)
    for code, config in registry_configs("americasnli").items():
        write_nli_parquet(root / "americasnli" / config / "test.parquet", nli_rows(code, per_language))
    write_nli_parquet(root / "indonli" / "indonli" / "test_expert" / "0000.parquet", nli_rows("ind", per_language))
    write_myxnli(root, max(per_language, 3))
    return root


_BUILT: dict[str, Path] = {}


def downstream_dir_for_session(tmp_path_factory) -> Path:
    """Build the fixture folder once per test session, whichever test module asks first."""
    if "root" not in _BUILT:
        _BUILT["root"] = build_downstream_dir(tmp_path_factory.mktemp("downstream"))
    return _BUILT["root"]


# -- SIB-200 (Davlan/sib200): TSV per config and split, columns index_id, category (a topic STRING), text -------------

# The seven topics as the dataset card lists them, written out here rather than imported from the script under test.
SIB200_CATEGORIES = ["science/technology", "travel", "politics", "sports", "health", "entertainment", "geography"]


def sib200_rows(code: str, n: int, offset: int = 0) -> list[dict]:
    """n SIB-200 rows: FLORES-style index ids shared across languages (the same sentence has the same id
    everywhere)."""
    return [
        {
            "index_id": str(1000 + offset + i),
            "category": SIB200_CATEGORIES[(offset + i) % len(SIB200_CATEGORIES)],
            "text": text,
        }
        for i, text in enumerate(texts(code, n, offset))
    ]


def write_sib200(root: Path, config: str, split: str, rows: list[dict]) -> Path:
    path = Path(root) / "sib200" / config / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["index_id\tcategory\ttext"] + [f"{r['index_id']}\t{r['category']}\t{r['text']}" for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_sib200_dir(root: Path, per_language: int = 7, train: int = 28) -> Path:
    """Every registered SIB-200 config's test split, and English train / validation / test (a --data_dir)."""
    root = Path(root)
    for code, config in registry_configs("sib200").items():
        write_sib200(root, config, "test", sib200_rows(code, per_language))
    write_sib200(root, "eng_Latn", "train", sib200_rows("eng", train, offset=3))
    write_sib200(root, "eng_Latn", "validation", sib200_rows("eng", per_language, offset=1))
    return root
