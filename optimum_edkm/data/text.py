"""A loaded text (:class:`TextData`), how texts are cached as files and read back through ``datasets``, and
calibration windows drawn from a token stream."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import atomic
from ..validation import is_int

TEXT_FILE_SUFFIXES = (".txt", ".md", ".rst", ".text")
DOCUMENT_SEPARATOR = "\n\n"


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


# ----------------------------------------------------------------------------------------- files and cache
def content_key(parts: Sequence[str]) -> str:
    """A short content key of ``parts`` (for cache folder names)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def cache_folder(cache_dir: Optional[os.PathLike], key: str, split: str) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / "text" / key / split


def cached_documents(
    cache_dir: Optional[os.PathLike], key: str, split: str, documents: Sequence[tuple[str, str]]
) -> list[Path]:
    """Write ``(name, text)`` documents once as numbered files under the cache; returns the files in order."""
    folder = cache_folder(cache_dir, key, split)
    files = []
    for position, (name, text) in enumerate(documents):
        file = folder / f"{position:04d}-{_safe_file_name(name)[:80]}.txt"
        if not file.exists():
            atomic.write_file(file, text)
        files.append(file)
    return files


def text_from_files(name: str, split: str, files: Sequence[Path], licence: str, source: str) -> TextData:
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
