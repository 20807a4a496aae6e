"""Text for calibration, fine-tuning and evaluation, always loaded through ``datasets``.

One loader, :func:`load_text`, serves every source so that a built-in corpus, a user's files and a Hub
dataset all reach the tokenizer the same way:

* a built-in text (:data:`BUILTIN_TEXTS`, all offline), written once to text files under a cache folder and read
  back with ``load_dataset("text", data_files=..., sample_by="document")``:

  - ``None`` or ``"python-help-topics"`` (the default, the *in-domain* text): the help topics of the Python
    Language Reference that ship with every CPython (``pydoc_data.topics``, PSF licence). Topics that share
    paragraphs (many are subsections of others) are grouped; of the groups, ordered by name, those at positions
    0, 5, 10, ... form the ``"test"`` split (the former ``"evaluation"`` split, unchanged), those at 3, 8, 13, ...
    the ``"validation"`` split, all others the ``"train"`` split (``"calibration"`` is an alias of ``"train"``);
    no paragraph of 40 characters or more is in two splits (see :func:`help_topic_split`).
  - ``"gensim-enwiki"`` (split ``"test"``, the *out-of-domain test* text): English Wikipedia articles of a 2016
    dump excerpt shipped in the ``gensim`` wheel (``gensim/test/test_data``), wiki markup stripped, each article
    cut to its first ~4,000 characters so that a few thousand tokens span many subjects. Encyclopedic prose;
    never used for training, calibration or any choice.
  - ``"gensim-lee-news"`` (split ``"validation"``, the *out-of-domain validation* text): the 300 ABC news
    articles of the Lee document-similarity background corpus, shipped in the same wheel. Every
    hyper-parameter is chosen on this text and the help topics' validation split, never on a test split.
* a path to a text file, or to a folder of ``.txt`` / ``.md`` / ``.rst`` files (read recursively, sorted):
  used whole, one document per file.
* anything else is a ``datasets`` id (``split`` required, ``config`` and ``text_column`` optional), e.g.
  ``load_text("wikitext", config="wikitext-2-raw-v1", split="test")`` for users who are online.

Documents are joined with a blank line (``"\\n\\n"``) and tokenised as one stream, as Hugging Face's
perplexity guide does for WikiText-2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from . import atomic
from .validation import is_int

DEFAULT_TEXT = "python-help-topics"
#: the out-of-domain test text (encyclopedic prose) and validation text (news), both from the gensim wheel
OOD_TEST_TEXT = "gensim-enwiki"
OOD_VALIDATION_TEXT = "gensim-lee-news"
TRAIN_SPLIT, VALIDATION_SPLIT, TEST_SPLIT = "train", "validation", "test"
#: former names of the help topics' splits, still accepted: "calibration" is the train split (GPTQ/AWQ
#: calibration and fine-tuning), "evaluation" the test split (unchanged, so old figures stay comparable)
CALIBRATION_SPLIT, EVALUATION_SPLIT = TRAIN_SPLIT, TEST_SPLIT
SPLIT_ALIASES = {"calibration": TRAIN_SPLIT, "evaluation": TEST_SPLIT}
DEFAULT_SPLITS = (TRAIN_SPLIT, VALIDATION_SPLIT, TEST_SPLIT)
#: built-in text name -> its splits
BUILTIN_TEXTS = {DEFAULT_TEXT: DEFAULT_SPLITS, OOD_TEST_TEXT: (TEST_SPLIT,), OOD_VALIDATION_TEXT: (VALIDATION_SPLIT,)}
#: of the topic groups sorted by name, position % HELD_OUT_EVERY == TEST_POSITION is the test split and
#: == VALIDATION_POSITION the validation split
HELD_OUT_EVERY = 5
TEST_POSITION, VALIDATION_POSITION = 0, 3
#: topics sharing a paragraph at least this long are one group (short ones are boilerplate such as "See also:").
MIN_SHARED_PARAGRAPH = 40
#: part of the cache key: change it whenever help_topic_split changes.
SPLIT_RULE = (
    f"groups-sharing-paragraphs-{MIN_SHARED_PARAGRAPH}-every-{HELD_OUT_EVERY}-test-{TEST_POSITION}-"
    f"validation-{VALIDATION_POSITION}-v2"
)
TEXT_FILE_SUFFIXES = (".txt", ".md", ".rst", ".text")
DOCUMENT_SEPARATOR = "\n\n"
PSF_LICENCE = "PSF-2.0 (Python Software Foundation License; ships with CPython as pydoc_data.topics)"
USER_FILE_LICENCE = "unknown (user-supplied files)"


def default_cache_dir() -> Path:
    """Where the built-in corpus is written: ``$OPTIMUM_EDKM_CACHE`` or ``~/.cache/optimum_edkm``."""
    return Path(os.environ.get("OPTIMUM_EDKM_CACHE", Path.home() / ".cache" / "optimum_edkm"))


@dataclasses.dataclass(frozen=True)
class TextData:
    """A loaded text: a ``datasets.Dataset`` with one ``"text"`` column, and where it came from.

    Attributes:
        name: short name for tables (``"python-help-topics"``, a file name, a dataset id).
        split: the split used (``"evaluation"``, ``"calibration"``, ``"test"``, ... or ``"whole"`` for files).
        dataset: the documents, one per row, column ``"text"``.
        licence: the licence of the text, as far as it is known.
        source: a human-readable origin (package and Python version, path, or dataset id and config).
    """

    name: str
    split: str
    dataset: Any
    licence: str
    source: str

    @property
    def documents(self) -> list[str]:
        return list(self.dataset["text"])

    def joined(self) -> str:
        """All non-empty documents joined by a blank line."""
        return DOCUMENT_SEPARATOR.join(doc for doc in self.documents if doc.strip())

    def token_ids(self, tokenizer, max_tokens: Optional[int] = None) -> torch.Tensor:
        """The text as one 1-D ``int64`` token stream (tokenizer's own special tokens), optionally cut to the
        first ``max_tokens`` tokens."""
        if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 2):
            raise ValueError(f"max_tokens must be an integer >= 2 or None for the whole text, got {max_tokens!r}")
        text = self.joined()
        if not text:
            raise ValueError(f"text {self.name!r} (split {self.split!r}) is empty; pass a text with content")
        # verbose=False: the stream is longer than model_max_length on purpose; windows are cut later.
        ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
        ids = torch.tensor(ids, dtype=torch.long)
        return ids if max_tokens is None else ids[:max_tokens]

    def describe(self, tokens: Optional[int] = None) -> dict:
        """A record for results tables: name, split, source, licence, documents, characters and tokens used."""
        record = {
            "name": self.name,
            "split": self.split,
            "source": self.source,
            "licence": self.licence,
            "documents": len(self.dataset),
            "characters": len(self.joined()),
        }
        if tokens is not None:
            record["tokens"] = int(tokens)
        return record


def load_text(
    source: Optional[str] = None,
    *,
    split: Optional[str] = None,
    config: Optional[str] = None,
    text_column: str = "text",
    cache_dir: Optional[os.PathLike] = None,
) -> TextData:
    """Load a text (see the module docstring for the kinds of ``source``).

    Args:
        source: ``None`` / a name in :data:`BUILTIN_TEXTS`, a file or folder path, or a ``datasets`` id.
        split: for a built-in text one of its splits (``"train"``, ``"validation"``, ``"test"``; default: the
            help topics' ``"test"`` split, the only split of the others; ``"calibration"`` and ``"evaluation"``
            are the former names of ``"train"`` and ``"test"``); for a ``datasets`` id the split to load
            (required); must stay ``None`` for a file or folder.
        config: the ``datasets`` configuration name (e.g. ``"wikitext-2-raw-v1"``); only for a dataset id.
        text_column: the column holding the text in a ``datasets`` dataset.
        cache_dir: where the built-in texts are written (default :func:`default_cache_dir`).
    """
    if source is None or (isinstance(source, str) and source in BUILTIN_TEXTS):
        name = DEFAULT_TEXT if source is None else source
        if config is not None:
            raise ValueError(f"config={config!r} only applies to a datasets id, not to the built-in {name!r}")
        splits = BUILTIN_TEXTS[name]
        split = SPLIT_ALIASES.get(split, split) if name == DEFAULT_TEXT else split
        if split is None:
            split = TEST_SPLIT if TEST_SPLIT in splits else splits[0]
        if split not in splits:
            raise ValueError(f"the built-in text {name!r} has split(s) {splits}, got split={split!r}")
        loader = {DEFAULT_TEXT: _load_help_topics, OOD_TEST_TEXT: _load_enwiki, OOD_VALIDATION_TEXT: _load_lee_news}[
            name
        ]
        return loader(split, cache_dir)
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise TypeError(f"source must be a path, a datasets id or None, got {source!r}")
    path = Path(source).expanduser()
    if path.exists():
        if split is not None or config is not None:
            raise ValueError(
                f"{str(source)!r} is a local file/folder and is used whole; split/config only apply to datasets ids. "
                f"Put calibration and evaluation text in separate files and pass each one"
            )
        return _load_local(path)
    if _looks_like_path(str(source)):
        raise FileNotFoundError(f"no such file or folder: {str(source)!r} (pass an existing path, or a datasets id)")
    return _load_hub(str(source), split=split, config=config, text_column=text_column)


@dataclasses.dataclass
class CalibrationData:
    """Tokenised calibration text, as every compression method in the benchmark receives it.

    Attributes:
        input_ids: ``[n_samples, seq_len]`` random windows of the calibration text (what GPTQ / AWQ use).
        token_ids: the whole calibration text as one token stream (for methods that fine-tune on more).
        text: the calibration text itself.
        tokenizer: the tokenizer that produced the ids.
        seed: the seed that drew the windows.
    """

    input_ids: torch.Tensor
    token_ids: torch.Tensor
    text: TextData
    tokenizer: Any
    seed: int

    def describe(self) -> dict:
        record = self.text.describe(tokens=self.token_ids.numel())
        record.update(samples=int(self.input_ids.shape[0]), seq_len=int(self.input_ids.shape[1]), seed=self.seed)
        return record


def sample_windows(token_ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` consecutive tokens at seeded uniform random starts (as the GPTQ and
    AWQ papers draw calibration segments); returns ``[n_samples, seq_len]`` int64."""
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be a 1-D token stream, got shape {tuple(token_ids.shape)}")
    if not is_int(n_samples) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if not is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    if token_ids.numel() < seq_len:
        raise ValueError(
            f"the text has {token_ids.numel()} tokens, fewer than seq_len={seq_len}; use a shorter seq_len or "
            f"a longer calibration text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seq_len + 1, (n_samples,), generator=generator)
    return torch.stack([token_ids[s : s + seq_len] for s in starts.tolist()])


def calibration_data(text: TextData, tokenizer, n_samples: int, seq_len: int, seed: int = 0) -> CalibrationData:
    """Tokenise ``text`` and draw ``n_samples`` x ``seq_len`` seeded calibration windows from it."""
    token_ids = text.token_ids(tokenizer)
    return CalibrationData(
        input_ids=sample_windows(token_ids, n_samples, seq_len, seed),
        token_ids=token_ids,
        text=text,
        tokenizer=tokenizer,
        seed=seed,
    )


# ----------------------------------------------------------------------------------------------------------------
# the three kinds of source


def help_topic_split(topics: Mapping[str, str]) -> dict[str, list[tuple[str, str]]]:
    """The fixed split of the help topics into ``(topic name, text)`` documents per split.

    Many topics repeat each other (``"if"`` and ``"else"`` are identical; ``"specialnames"`` contains
    ``"customization"``, ``"attribute-access"``, ...), so a split by topic alone would evaluate on training text.
    Topics that share a paragraph of at least ``MIN_SHARED_PARAGRAPH`` characters are therefore kept together as one
    group; groups are ordered by their first topic name, and the group at position ``i`` goes to the test split
    when ``i % HELD_OUT_EVERY == TEST_POSITION``, to the validation split when it is ``VALIDATION_POSITION``, to
    the train split otherwise. Inside a split a repeated paragraph is kept only where it first appears (topics
    in sorted order), and topics left empty are dropped.
    """
    names = sorted(topics)
    parent = {name: name for name in names}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    first_topic_with: dict[str, str] = {}
    for name in names:
        for paragraph in _long_paragraphs(topics[name]):
            other = first_topic_with.setdefault(paragraph, name)
            a, b = root(name), root(other)
            parent[max(a, b)] = min(a, b)  # the group's root is its first topic name
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(root(name), []).append(name)
    splits: dict[str, list[tuple[str, str]]] = {split: [] for split in DEFAULT_SPLITS}
    for index, first in enumerate(sorted(groups)):
        position = index % HELD_OUT_EVERY
        split = (
            TEST_SPLIT
            if position == TEST_POSITION
            else VALIDATION_SPLIT
            if position == VALIDATION_POSITION
            else TRAIN_SPLIT
        )
        splits[split] += [(name, topics[name]) for name in groups[first]]
    for split, documents in splits.items():
        seen: set = set()
        kept = []
        for name, text in documents:
            pieces = [
                p
                for p in text.split(DOCUMENT_SEPARATOR)
                if len(p.strip()) < MIN_SHARED_PARAGRAPH or p.strip() not in seen
            ]
            seen.update(p.strip() for p in pieces)
            text = DOCUMENT_SEPARATOR.join(pieces)
            if text.strip():
                kept.append((name, text))
        splits[split] = kept
    return splits


def _long_paragraphs(text: str) -> set:
    return {p.strip() for p in text.split(DOCUMENT_SEPARATOR) if len(p.strip()) >= MIN_SHARED_PARAGRAPH}


def _load_help_topics(split: str, cache_dir: Optional[os.PathLike]) -> TextData:
    from pydoc_data.topics import topics

    version = "%d.%d.%d" % sys.version_info[:3]
    # The topics change between CPython releases: key the folder by version and content.
    digest = _digest([SPLIT_RULE] + [f"{k}\0{topics[k]}" for k in sorted(topics)])
    documents = help_topic_split(topics)[split]
    files = _cached_documents(cache_dir, f"{DEFAULT_TEXT}-{version}-{digest}", split, documents)
    source = (
        f"Python {version} Language Reference help topics (pydoc_data.topics), {len(documents)} of "
        f"{len(topics)} topics: topics sharing paragraphs grouped; of the groups sorted by name, every "
        f"{HELD_OUT_EVERY}th from position {TEST_POSITION} is the test split, from position "
        f"{VALIDATION_POSITION} the validation split, the rest train; no paragraph in two splits"
    )
    return _text_from_files(DEFAULT_TEXT, split, files, PSF_LICENCE, source)


# -- the out-of-domain texts: shipped in the gensim wheel as test data; read as files, gensim is never imported

GENSIM_PACKAGE = "gensim"
GENSIM_VERSION = "4.4.0"
GENSIM_INSTALL = f"pip install gensim=={GENSIM_VERSION}"
GENSIM_DATA = "test/test_data"
ENWIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_NEWS_FILE = "lee_background.cor"
#: every article is cut at the last paragraph end before this many characters (breadth in a few thousand tokens)
ENWIKI_ARTICLE_CHARS = 4000
#: articles shorter than this after cleaning (stubs, lists) are dropped
ENWIKI_MIN_CHARS = 500
ENWIKI_RULE = f"wikitext-clean-v2-cut-{ENWIKI_ARTICLE_CHARS}-min-{ENWIKI_MIN_CHARS}"
ENWIKI_LICENCE = (
    "CC BY-SA 3.0 and GFDL (English Wikipedia text, April 2016 dump excerpt), redistributed as test "
    "data in the gensim wheel (gensim itself: LGPL-2.1-only)"
)
LEE_NEWS_LICENCE = (
    "no licence stated for the article text (Australian Broadcasting Corporation news, collected for "
    "the Lee, Pincombe & Welsh 2005 document-similarity study); redistributed as test data in the "
    "gensim wheel (gensim itself: LGPL-2.1-only)"
)
#: sections from which an article is cut (reference lists, not prose)
_ENWIKI_TAIL_SECTIONS = (
    "references",
    "external links",
    "see also",
    "notes",
    "further reading",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
)


def gensim_data_file(name: str) -> Path:
    """A file of the gensim wheel's test data (found without importing gensim)."""
    import importlib.util

    spec = importlib.util.find_spec(GENSIM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the out-of-domain texts ({OOD_TEST_TEXT!r}, {OOD_VALIDATION_TEXT!r}) ship in the gensim wheel, which "
            f'is not installed; install it with:\n    {GENSIM_INSTALL}\n(or pip install -e ".[examples]")'
        )
    path = Path(spec.origin).parent / GENSIM_DATA / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed gensim; reinstall with:\n    "
            f"pip install --force-reinstall {GENSIM_INSTALL.split(' ', 2)[2]}"
        )
    return path


def _gensim_version() -> str:
    from importlib import metadata

    try:
        return metadata.version(GENSIM_PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def wikitext_to_plain(wikitext: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, references, comments, files, categories and HTML
    tags removed, links replaced by their label, headings kept as lines, list markers dropped, and the article
    cut at its first reference-like section (References, External links, See also, ...)."""
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(
        r"<(math|gallery|timeline|source|syntaxhighlight|score|imagemap)[^>]*>.*?</\1>", "", text, flags=re.S | re.I
    )
    text = _remove_nested(text, r"\{\{[^{}]*\}\}")  # templates, innermost first
    text = _remove_nested(text, r"\{\|(?:(?!\{\|)[\s\S])*?\|\}")  # tables, innermost first

    def link(match):
        target, _, label = match.group(1).partition("|")
        if re.match(r"\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?)\s*:", target, flags=re.I):
            return ""  # files, categories, interlanguage links
        return (label.split("|")[-1] if label else target).strip()

    previous = None
    while previous != text:  # innermost links first, so a file caption's links go before the file
        previous = text
        # a label may hold single brackets ("Bicyclo[1.1.0]butane"), never a link
        text = re.sub(r"\[\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\]", link, text)
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = html.unescape(text).replace("\xa0", " ")
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            if heading.group(2).lower() in _ENWIKI_TAIL_SECTIONS:
                break
            line = heading.group(2)
        elif line.startswith(("|", "!", "{", "}", "__")):
            continue  # table or magic-word remnants
        else:
            line = re.sub(r"^[*#:;]+\s*", "", line)
        lines.append(line)
    paragraphs = re.split(r"\n\s*\n", "\n".join(lines))
    return DOCUMENT_SEPARATOR.join(re.sub(r"[ \t]+", " ", p).strip() for p in paragraphs if p.strip())


def _remove_nested(text: str, pattern: str) -> str:
    previous = None
    while previous != text:
        previous = text
        text = re.sub(pattern, "", text)
    return text


def _cut_at_paragraph(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(DOCUMENT_SEPARATOR, 0, limit)
    return text[:cut] if cut > 0 else text[:limit]


def enwiki_articles(path: os.PathLike) -> list[tuple[str, str]]:
    """``(title, plain text)`` of the main-namespace articles of a MediaWiki XML dump (``.bz2`` or plain), in
    dump order: redirects and disambiguation pages skipped, markup stripped (:func:`wikitext_to_plain`), each
    cut to ``ENWIKI_ARTICLE_CHARS`` at a paragraph end, articles under ``ENWIKI_MIN_CHARS`` dropped."""
    import bz2
    import xml.etree.ElementTree as ElementTree

    opener = bz2.open if str(path).endswith(".bz2") else open
    articles = []
    with opener(path, "rb") as handle:
        for _, element in ElementTree.iterparse(handle):
            if not element.tag.endswith("}page") and element.tag != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in element.iter()}
            title = fields["title"].text or ""
            namespace = fields.get("ns")
            body = fields.get("text")
            wikitext = (body.text or "") if body is not None else ""
            element.clear()
            if (
                (namespace is not None and namespace.text != "0")
                or fields.get("redirect") is not None
                or wikitext.lstrip().lower().startswith("#redirect")
                or "(disambiguation)" in title
            ):
                continue
            plain = _cut_at_paragraph(wikitext_to_plain(wikitext), ENWIKI_ARTICLE_CHARS)
            if len(plain) >= ENWIKI_MIN_CHARS:
                articles.append((title, plain))
    return articles


def _load_enwiki(split: str, cache_dir: Optional[os.PathLike]) -> TextData:
    path = gensim_data_file(ENWIKI_FILE)
    version = _gensim_version()
    digest = _digest([ENWIKI_RULE, f"{path.stat().st_size}"])
    folder = _cache_folder(cache_dir, f"{OOD_TEST_TEXT}-{version}-{digest}", split)
    files = sorted(folder.glob("*.txt")) if (folder / ".complete").exists() else None
    if files is None:
        files = _cached_documents(cache_dir, f"{OOD_TEST_TEXT}-{version}-{digest}", split, enwiki_articles(path))
        atomic.write_file(folder / ".complete", "")
    source = (
        f"English Wikipedia articles from gensim {version} ({GENSIM_DATA}/{ENWIKI_FILE}): {len(files)} "
        f"articles in dump order, markup stripped, each cut to {ENWIKI_ARTICLE_CHARS} characters at a "
        f"paragraph end; out-of-domain test text, never trained, calibrated or chosen on"
    )
    return _text_from_files(OOD_TEST_TEXT, split, files, ENWIKI_LICENCE, source)


def _load_lee_news(split: str, cache_dir: Optional[os.PathLike]) -> TextData:
    path = gensim_data_file(LEE_NEWS_FILE)
    version = _gensim_version()
    articles = [
        line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()
    ]
    digest = _digest(articles)
    files = _cached_documents(
        cache_dir,
        f"{OOD_VALIDATION_TEXT}-{version}-{digest}",
        split,
        [(f"article-{i:03d}", text) for i, text in enumerate(articles)],
    )
    source = (
        f"ABC news articles of the Lee background corpus from gensim {version} ({GENSIM_DATA}/"
        f"{LEE_NEWS_FILE}), {len(articles)} articles in file order; out-of-domain validation text"
    )
    return _text_from_files(OOD_VALIDATION_TEXT, split, files, LEE_NEWS_LICENCE, source)


def _digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def _cache_folder(cache_dir: Optional[os.PathLike], key: str, split: str) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / "text" / key / split


def _cached_documents(
    cache_dir: Optional[os.PathLike], key: str, split: str, documents: Sequence[tuple[str, str]]
) -> list[Path]:
    """Write ``(name, text)`` documents once as numbered files under the cache; returns the files in order."""
    folder = _cache_folder(cache_dir, key, split)
    files = []
    for position, (name, text) in enumerate(documents):
        file = folder / f"{position:04d}-{_safe_file_name(name)[:80]}.txt"
        if not file.exists():
            atomic.write_file(file, text)
        files.append(file)
    return files


def _load_local(path: Path) -> TextData:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_FILE_SUFFIXES)
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no text files (looked for {', '.join(TEXT_FILE_SUFFIXES)})")
    else:
        files = [path]
    source = f"{len(files)} file(s) under {str(path.resolve())}"
    return _text_from_files(path.name, "whole", files, USER_FILE_LICENCE, source)


def _load_hub(dataset_id: str, *, split: Optional[str], config: Optional[str], text_column: str) -> TextData:
    if split is None:
        raise ValueError(f"datasets id {dataset_id!r} needs a split (e.g. split='test'); pass split=...")
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as error:  # the id may have been meant as a path: say both
        raise ValueError(
            f"could not load {dataset_id!r}: it is not an existing file or folder, and loading it as a datasets "
            f"id (config={config!r}, split={split!r}) failed with {type(error).__name__}: {error}"
        ) from error
    if text_column not in dataset.column_names:
        raise ValueError(
            f"dataset {dataset_id!r} has no column {text_column!r}; its columns are {dataset.column_names}; "
            f"pass text_column=..."
        )
    dataset = dataset.select_columns([text_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    licence = (getattr(dataset.info, "license", None) or "").strip() or "see the dataset card"
    return TextData(
        name=dataset_id if config is None else f"{dataset_id}/{config}",
        split=split,
        dataset=dataset,
        licence=licence,
        source=f"datasets.load_dataset({dataset_id!r}, {config!r}, split={split!r}), column {text_column!r}",
    )


def _text_from_files(name: str, split: str, files: Sequence[Path], licence: str, source: str) -> TextData:
    """The text of ``files``, one document per file (each checked to be UTF-8 first)."""
    import datasets

    for path in files:  # datasets' own error names neither the file nor the encoding
        try:
            with open(path, encoding="utf-8") as handle:
                while handle.read(1 << 20):
                    pass
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason}); convert it, e.g. "
                f"iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}"
            ) from None
    dataset = datasets.load_dataset(
        "text", data_files=[str(f) for f in files], sample_by="document", split="train", keep_in_memory=True
    )
    return TextData(name=name, split=split, dataset=dataset, licence=licence, source=source)


def _safe_file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _looks_like_path(source: str) -> bool:
    # datasets ids are "name" or "owner/name"; anything else shaped like a path is a missing file.
    return (
        source.startswith((".", "/", "~", "\\"))
        or source.count("/") > 1
        or Path(source).suffix.lower() in TEXT_FILE_SUFFIXES
    )
