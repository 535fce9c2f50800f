"""Real evaluation and calibration text that installs from the package registry.

No hub access is possible at run time, so the texts come from the test data that the gensim 4.4.0
wheel ships: a shortened dump of English Wikipedia articles (wiki markup) and 300 news articles
(the "Lee background" corpus). The conversion is deterministic; every produced file is checked
against a recorded sha256 so that all runs evaluate on exactly the same text. Reports call them
"Wikipedia subset" and "news", never WikiText-2. Wikipedia text: CC BY-SA, Wikipedia contributors.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CalibrationDataError, DataIntegrityError
from .outputs import write_text_atomic

GENSIM_VERSION = "4.4.0"
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
NEWSGROUPS_FILE = "mini_newsgroup"  # 200 Usenet posts (20 Newsgroups), a zlib'd protocol-0 pickle

#: Split names and the sha256 of the text each one produces from gensim 4.4.0.
TEXT_SHA256: dict[str, str] = {
    "wiki_train": "17facff1d285a375ad86b186d67e153b8e2fead703e57e695fb9737c35c946ca",
    "wiki_valid": "7222d226fcdbe0db1c56435da6c6644fbca3d5abcd41738d9bd488b9fbb2571b",
    "wiki_test": "bd1927f42c51003619b9f2b826b4250150c40ae9e05dd63f383432e1e6fab9b1",
    "news": "2dba646f83b469d64fc6bd06df4a536d10f026e605be72b9beea4e534d6c9bd7",
    "newsgroups": "c21acf8d3b702d1ea8043bb3cc049dc71b7448adbc02fb3c91b22738dffa8e3d",
}

MIN_ARTICLE_CHARS = 2000
MIN_PARAGRAPH_CHARS = 40


def cache_dir() -> Path:
    """Where built models and texts live: $STRUPRUNE_CACHE or ~/.cache/struprune."""
    root = Path(os.environ.get("STRUPRUNE_CACHE") or Path.home() / ".cache" / "struprune").expanduser()
    for folder in (root, *root.parents):  # the first one that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                raise DataIntegrityError(
                    f"the cache folder {root} cannot be created: {folder} is not a folder. Fix: point "
                    "STRUPRUNE_CACHE at a folder (or unset it for ~/.cache/struprune)"
                )
            break
    return root


def _gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataIntegrityError(
            f"gensim is not installed; the evaluation text ships with it. "
            f"Fix: pip install gensim=={GENSIM_VERSION}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    missing = [name for name in (WIKI_DUMP, NEWS_FILE, NEWSGROUPS_FILE) if not (path / name).exists()]
    if missing:
        raise DataIntegrityError(
            f"{path} lacks {', '.join(missing)}. Fix: pip install gensim=={GENSIM_VERSION}"
        )
    return path


_EMPHASIS = re.compile(r"'{2,}")  # wiki bold/italic quotes
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")


def _article_to_text(title: str, markup: str) -> str:
    """Wiki markup -> WikiText-style prose: headings as ' = = Section = = ', prose paragraphs only."""
    from gensim.corpora.wikicorpus import filter_wiki

    lines = [f" = {title} = ", ""]
    for raw in filter_wiki(markup).split("\n"):
        line = _EMPHASIS.sub("", raw).strip()
        heading = _HEADING.match(line)
        if heading:
            depth = len(heading.group(1))
            marks = " ".join(["="] * depth)
            lines += ["", f" {marks} {heading.group(2).strip()} {marks} ", ""]
            continue
        if len(line) < MIN_PARAGRAPH_CHARS or line[0] in "*#:;|!{}" or line.startswith("thumb"):
            continue
        lines += [f" {line} ", ""]
    return "\n".join(lines).strip("\n") + "\n"


def _wikipedia_articles(test_data: Path) -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(test_data / WIKI_DUMP, "rb") as handle:
        for title, markup, _pageid in extract_pages(handle, filter_namespaces=("0",)):
            if not markup or markup.lstrip().lower().startswith("#redirect"):
                continue
            text = _article_to_text(title, markup)
            if len(text) >= MIN_ARTICLE_CHARS:
                articles.append(text)
    return articles


def build_texts(test_data: Path | None = None) -> dict[str, str]:
    """All splits as strings. Article i goes to test if i % 10 == 3, valid if 7, else train."""
    test_data = test_data or _gensim_test_data()
    articles = _wikipedia_articles(test_data)
    splits: dict[str, list[str]] = {"wiki_train": [], "wiki_valid": [], "wiki_test": []}
    for i, article in enumerate(articles):
        key = {3: "wiki_test", 7: "wiki_valid"}.get(i % 10, "wiki_train")
        splits[key].append(article)
    texts = {k: "\n".join(v) for k, v in splits.items()}
    news_lines = (test_data / NEWS_FILE).read_text(encoding="utf-8").splitlines()
    texts["news"] = "\n".join(line.strip() for line in news_lines if line.strip()) + "\n"
    texts["newsgroups"] = newsgroup_posts(test_data / NEWSGROUPS_FILE)
    return texts


_PICKLED_UNICODE = re.compile(r"^a?V(.*)$", re.M)


def newsgroup_posts(path: Path) -> str:
    """The bodies (headers dropped) of the Usenet posts in gensim's `mini_newsgroup`, a third kind
    of text: informal forum discussion with quoted replies (alt.atheism, sci.space, ...).

    The file is a pickled scikit-learn Bunch. It is never unpickled (that would run code named in
    the file): its protocol-0 text form stores each post as a `V...` line in raw-unicode-escape,
    which is read directly; only strings that are posts (they carry a Subject header) are kept."""
    raw = zlib.decompress(path.read_bytes()).decode("latin-1")
    strings = [
        m.group(1).encode("latin-1").decode("raw_unicode_escape") for m in _PICKLED_UNICODE.finditer(raw)
    ]
    bodies = []
    for post in strings:
        header, sep, body = post.partition("\n\n")
        if sep and "\nSubject:" in "\n" + header and body.strip():
            lines = [line.rstrip() for line in body.strip().splitlines()]
            bodies.append("\n".join(lines))
    if not bodies:
        raise DataIntegrityError(
            f"{path} holds no newsgroup posts. Fix: pip install gensim=={GENSIM_VERSION}"
        )
    return "\n\n".join(bodies) + "\n"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TextCorpus:
    """Paths of the prepared text files, one per split."""

    root: Path

    def path(self, split: str) -> Path:
        if split not in TEXT_SHA256:
            raise CalibrationDataError(
                f"unknown text split {split!r}. Fix: choose one of {', '.join(sorted(TEXT_SHA256))}"
            )
        return self.root / f"{split}.txt"

    def read(self, split: str) -> str:
        return self.path(split).read_text(encoding="utf-8")


def ensure_texts(root: Path | None = None) -> TextCorpus:
    """Build the text files once into the cache, verify their checksums, and reuse them."""
    root = Path(root) if root else cache_dir() / "texts"
    corpus = TextCorpus(root)
    if all(_matches(corpus.path(s), digest) for s, digest in TEXT_SHA256.items()):
        return corpus
    texts = build_texts()
    root.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        expected = TEXT_SHA256[split]
        actual = sha256_text(text)
        if expected and actual != expected:
            raise DataIntegrityError(
                f"text split {split!r} built from gensim has sha256 {actual}, expected {expected}. "
                f"Fix: install exactly gensim=={GENSIM_VERSION}"
            )
        write_text_atomic(corpus.path(split), text)  # a unique temporary name: runs may race here
    return corpus


def _matches(path: Path, digest: str) -> bool:
    return path.exists() and bool(digest) and sha256_text(path.read_text("utf-8")) == digest


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Whole text as one 1-D id tensor, without special tokens (BOS is a per-window choice)."""
    if not text.strip():
        raise CalibrationDataError("the text is empty. Fix: pass a non-empty text file")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_calibration(
    token_ids: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0, bos_token_id: int | None = None
) -> torch.Tensor:
    """`num_samples` random windows of `seq_len` tokens (SparseGPT/Wanda style), reproducible by seed.

    With `bos_token_id` every window is BOS + `seq_len - 1` text tokens, as the model sees text in
    evaluation: models trained with a BOS on every sequence (Gemma) put an attention sink with very
    large activations on it, and calibrating without one fits the layers to inputs they never see."""
    if num_samples < 1 or seq_len < 2:
        raise CalibrationDataError(
            f"calibration needs at least 1 sample of at least 2 tokens "
            f"(got {num_samples} x {seq_len}). Fix: raise --calib-samples / --calib-len"
        )
    token_ids = token_ids.reshape(-1)
    if token_ids.numel() <= seq_len:
        raise CalibrationDataError(
            f"calibration text has {token_ids.numel()} tokens, shorter than one window of "
            f"{seq_len + 1}. Fix: use a longer text or a smaller --calib-len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seq_len, (num_samples,), generator=generator)
    windows = torch.stack([token_ids[s : s + seq_len] for s in starts.tolist()])
    if bos_token_id is not None:
        windows = torch.cat([torch.full_like(windows[:, :1], bos_token_id), windows[:, :-1]], dim=1)
    return windows
