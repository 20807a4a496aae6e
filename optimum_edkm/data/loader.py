"""The one text loader, :func:`load_text`: a built-in text (:mod:`.corpora`), a file or folder, or a
``datasets`` id, all reaching the tokenizer the same way (as a :class:`~.text.TextData`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .corpora import BUILTIN_TEXTS, DEFAULT_TEXT, load_builtin
from .text import TEXT_FILE_SUFFIXES, TextData, text_from_files

USER_FILE_LICENCE = "unknown (user-supplied files)"


def load_text(
    source: Optional[str] = None,
    *,
    split: Optional[str] = None,
    config: Optional[str] = None,
    text_column: str = "text",
    cache_dir: Optional[os.PathLike] = None,
) -> TextData:
    """Load a text (the kinds of ``source`` are listed in :mod:`optimum_edkm.data`).

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
        return load_builtin(name, split, cache_dir)
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


def _load_local(path: Path) -> TextData:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_FILE_SUFFIXES)
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no text files (looked for {', '.join(TEXT_FILE_SUFFIXES)})")
    else:
        files = [path]
    source = f"{len(files)} file(s) under {str(path.resolve())}"
    return text_from_files(path.name, "whole", files, USER_FILE_LICENCE, source)


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


def _looks_like_path(source: str) -> bool:
    # datasets ids are "name" or "owner/name"; anything else shaped like a path is a missing file.
    return (
        source.startswith((".", "/", "~", "\\"))
        or source.count("/") > 1
        or Path(source).suffix.lower() in TEXT_FILE_SUFFIXES
    )
