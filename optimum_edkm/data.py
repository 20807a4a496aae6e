"""Text for calibration, fine-tuning and evaluation, always loaded through ``datasets``.

One loader, :func:`load_text`, serves every source so that a built-in corpus, a user's files and a Hub
dataset all reach the tokenizer the same way:

* ``None`` or ``"python-help-topics"`` (the default, works offline): the help topics of the Python Language
  Reference that ship with every CPython (``pydoc_data.topics``, PSF licence). Topics that share paragraphs
  (many are subsections of others) are grouped; the groups, ordered by name, at positions 0, 5, 10, ... (every
  5th, starting with the first) form the ``"evaluation"`` split, all the others the ``"calibration"`` split, and
  no paragraph of 40 characters or more is in both (see :func:`help_topic_split`). The split is written once to text files
  under a cache folder and read back with ``load_dataset("text", data_files=..., sample_by="document")``.
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
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

DEFAULT_TEXT = "python-help-topics"
#: every ``HELD_OUT_EVERY``-th topic (sorted by name, starting with the first) is held out for evaluation.
HELD_OUT_EVERY = 5
#: topics sharing a paragraph at least this long are one group (short ones are boilerplate such as "See also:").
MIN_SHARED_PARAGRAPH = 40
#: part of the cache key: change it whenever help_topic_split changes.
SPLIT_RULE = f"groups-sharing-paragraphs-{MIN_SHARED_PARAGRAPH}-every-{HELD_OUT_EVERY}-v1"
EVALUATION_SPLIT = "evaluation"
CALIBRATION_SPLIT = "calibration"
DEFAULT_SPLITS = (EVALUATION_SPLIT, CALIBRATION_SPLIT)
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
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 2):
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
    """Load a text (see the module docstring for the three kinds of ``source``).

    Args:
        source: ``None`` / ``"python-help-topics"``, a file or folder path, or a ``datasets`` id.
        split: for the built-in corpus ``"evaluation"`` or ``"calibration"`` (default ``"evaluation"``); for a
            ``datasets`` id the split to load (required); must stay ``None`` for a file or folder.
        config: the ``datasets`` configuration name (e.g. ``"wikitext-2-raw-v1"``); only for a dataset id.
        text_column: the column holding the text in a ``datasets`` dataset.
        cache_dir: where the built-in corpus is written (default :func:`default_cache_dir`).
    """
    if source is None or source == DEFAULT_TEXT:
        if config is not None:
            raise ValueError(f"config={config!r} only applies to a datasets id, not to the built-in {DEFAULT_TEXT!r}")
        return _load_help_topics(split or EVALUATION_SPLIT, cache_dir)
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
    if not _is_int(n_samples) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if not _is_int(seq_len) or seq_len < 1:
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
    ``"customization"``, ``"attribute-access"``, ...), so a split by topic alone would evaluate on calibration text.
    Topics that share a paragraph of at least ``MIN_SHARED_PARAGRAPH`` characters are therefore kept together as one
    group; groups are ordered by their first topic name and every ``HELD_OUT_EVERY``-th group, starting with the
    first, is the evaluation split. Inside a split a repeated paragraph is kept only where it first appears (topics
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
    splits: dict[str, list[tuple[str, str]]] = {EVALUATION_SPLIT: [], CALIBRATION_SPLIT: []}
    for index, first in enumerate(sorted(groups)):
        split = EVALUATION_SPLIT if index % HELD_OUT_EVERY == 0 else CALIBRATION_SPLIT
        splits[split] += [(name, topics[name]) for name in groups[first]]
    for split, documents in splits.items():
        seen: set = set()
        kept = []
        for name, text in documents:
            pieces = [p for p in text.split(DOCUMENT_SEPARATOR)
                      if len(p.strip()) < MIN_SHARED_PARAGRAPH or p.strip() not in seen]
            seen.update(p.strip() for p in pieces)
            text = DOCUMENT_SEPARATOR.join(pieces)
            if text.strip():
                kept.append((name, text))
        splits[split] = kept
    return splits


def _long_paragraphs(text: str) -> set:
    return {p.strip() for p in text.split(DOCUMENT_SEPARATOR) if len(p.strip()) >= MIN_SHARED_PARAGRAPH}


def _load_help_topics(split: str, cache_dir: Optional[os.PathLike]) -> TextData:
    if split not in DEFAULT_SPLITS:
        raise ValueError(f"the built-in {DEFAULT_TEXT!r} text has splits {DEFAULT_SPLITS}, got split={split!r}")
    from pydoc_data.topics import topics

    version = "%d.%d.%d" % sys.version_info[:3]
    # The topics change between CPython releases: key the folder by version and content.
    digest = hashlib.sha256("\0".join([SPLIT_RULE] + [f"{k}\0{topics[k]}" for k in sorted(topics)]).encode()
                            ).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / "text" / f"{DEFAULT_TEXT}-{version}-{digest}" / split
    documents = help_topic_split(topics)[split]
    files = []
    for position, (name, text) in enumerate(documents):
        file = folder / f"{position:03d}-{_safe_file_name(name)}.txt"
        if not file.exists():
            _write_text_atomically(file, text)
        files.append(file)
    dataset = _load_text_files(files)
    return TextData(
        name=DEFAULT_TEXT,
        split=split,
        dataset=dataset,
        licence=PSF_LICENCE,
        source=f"Python {version} Language Reference help topics (pydoc_data.topics), {len(documents)} of "
               f"{len(topics)} topics: topics sharing paragraphs grouped, every {HELD_OUT_EVERY}th group by sorted "
               f"name (from the first) is the evaluation split, the rest calibration; no paragraph in both",
    )


def _load_local(path: Path) -> TextData:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_FILE_SUFFIXES)
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no text files (looked for {', '.join(TEXT_FILE_SUFFIXES)})")
    else:
        files = [path]
    return TextData(
        name=path.name,
        split="whole",
        dataset=_load_text_files(files),
        licence=USER_FILE_LICENCE,
        source=f"{len(files)} file(s) under {str(path.resolve())}",
    )


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


def _load_text_files(files: Sequence[Path]):
    import datasets

    return datasets.load_dataset(
        "text", data_files=[str(f) for f in files], sample_by="document", split="train", keep_in_memory=True
    )


def _write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _safe_file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _looks_like_path(source: str) -> bool:
    # datasets ids are "name" or "owner/name"; anything else shaped like a path is a missing file.
    return (source.startswith((".", "/", "~", "\\")) or source.count("/") > 1
            or Path(source).suffix.lower() in TEXT_FILE_SUFFIXES)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
