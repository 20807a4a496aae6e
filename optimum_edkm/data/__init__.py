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

Modules: :mod:`.loader` (:func:`load_text`), :mod:`.corpora` (the built-in texts), :mod:`.text` (:class:`TextData`,
the file cache, :func:`sample_windows`).
"""

from .corpora import (
    BUILTIN_TEXTS,
    CALIBRATION_SPLIT,
    DEFAULT_SPLITS,
    DEFAULT_TEXT,
    EVALUATION_SPLIT,
    GENSIM_INSTALL,
    OOD_TEST_TEXT,
    OOD_VALIDATION_TEXT,
    TEST_SPLIT,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    enwiki_articles,
    gensim_data_file,
    help_topic_split,
    wikitext_to_plain,
)
from .loader import load_text
from .text import DOCUMENT_SEPARATOR, TextData, default_cache_dir, sample_windows

__all__ = [
    "BUILTIN_TEXTS",
    "CALIBRATION_SPLIT",
    "DEFAULT_SPLITS",
    "DEFAULT_TEXT",
    "DOCUMENT_SEPARATOR",
    "EVALUATION_SPLIT",
    "GENSIM_INSTALL",
    "OOD_TEST_TEXT",
    "OOD_VALIDATION_TEXT",
    "TEST_SPLIT",
    "TRAIN_SPLIT",
    "TextData",
    "VALIDATION_SPLIT",
    "default_cache_dir",
    "enwiki_articles",
    "gensim_data_file",
    "help_topic_split",
    "load_text",
    "sample_windows",
    "wikitext_to_plain",
]
