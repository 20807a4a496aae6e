"""The built-in texts, all offline: the CPython help topics (in-domain: train / validation / test splits) and two
out-of-domain texts from the gensim wheel (Wikipedia for testing, news for validation), each built once into
text files under the cache (:func:`~.text.cached_documents`) and read back through ``datasets``."""

from __future__ import annotations

import html
import os
import re
import sys
from pathlib import Path
from typing import Mapping, Optional

from .. import atomic
from .text import DOCUMENT_SEPARATOR, TextData, cache_folder, cached_documents, content_key, text_from_files

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
PSF_LICENCE = "PSF-2.0 (Python Software Foundation License; ships with CPython as pydoc_data.topics)"


def load_builtin(name: str, split: Optional[str], cache_dir: Optional[os.PathLike]) -> TextData:
    """The built-in text ``name`` (:data:`BUILTIN_TEXTS`), split ``split`` (default: ``"test"`` where there is
    one, else its only split; the help topics also take the former names ``"calibration"`` and ``"evaluation"``)."""
    splits = BUILTIN_TEXTS[name]
    split = SPLIT_ALIASES.get(split, split) if name == DEFAULT_TEXT else split
    if split is None:
        split = TEST_SPLIT if TEST_SPLIT in splits else splits[0]
    if split not in splits:
        raise ValueError(f"the built-in text {name!r} has split(s) {splits}, got split={split!r}")
    loader = {DEFAULT_TEXT: _load_help_topics, OOD_TEST_TEXT: _load_enwiki, OOD_VALIDATION_TEXT: _load_lee_news}[name]
    return loader(split, cache_dir)


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
    digest = content_key([SPLIT_RULE] + [f"{k}\0{topics[k]}" for k in sorted(topics)])
    documents = help_topic_split(topics)[split]
    files = cached_documents(cache_dir, f"{DEFAULT_TEXT}-{version}-{digest}", split, documents)
    source = (
        f"Python {version} Language Reference help topics (pydoc_data.topics), {len(documents)} of "
        f"{len(topics)} topics: topics sharing paragraphs grouped; of the groups sorted by name, every "
        f"{HELD_OUT_EVERY}th from position {TEST_POSITION} is the test split, from position "
        f"{VALIDATION_POSITION} the validation split, the rest train; no paragraph in two splits"
    )
    return text_from_files(DEFAULT_TEXT, split, files, PSF_LICENCE, source)


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
    digest = content_key([ENWIKI_RULE, f"{path.stat().st_size}"])
    folder = cache_folder(cache_dir, f"{OOD_TEST_TEXT}-{version}-{digest}", split)
    files = sorted(folder.glob("*.txt")) if (folder / ".complete").exists() else None
    if files is None:
        files = cached_documents(cache_dir, f"{OOD_TEST_TEXT}-{version}-{digest}", split, enwiki_articles(path))
        atomic.write_file(folder / ".complete", "")
    source = (
        f"English Wikipedia articles from gensim {version} ({GENSIM_DATA}/{ENWIKI_FILE}): {len(files)} "
        f"articles in dump order, markup stripped, each cut to {ENWIKI_ARTICLE_CHARS} characters at a "
        f"paragraph end; out-of-domain test text, never trained, calibrated or chosen on"
    )
    return text_from_files(OOD_TEST_TEXT, split, files, ENWIKI_LICENCE, source)


def _load_lee_news(split: str, cache_dir: Optional[os.PathLike]) -> TextData:
    path = gensim_data_file(LEE_NEWS_FILE)
    version = _gensim_version()
    articles = [
        line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()
    ]
    digest = content_key(articles)
    files = cached_documents(
        cache_dir,
        f"{OOD_VALIDATION_TEXT}-{version}-{digest}",
        split,
        [(f"article-{i:03d}", text) for i, text in enumerate(articles)],
    )
    source = (
        f"ABC news articles of the Lee background corpus from gensim {version} ({GENSIM_DATA}/"
        f"{LEE_NEWS_FILE}), {len(articles)} articles in file order; out-of-domain validation text"
    )
    return text_from_files(OOD_VALIDATION_TEXT, split, files, LEE_NEWS_LICENCE, source)
