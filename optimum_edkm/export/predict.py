"""Run exported packages with Core ML (macOS only; Linux can only verify them, see :mod:`.verify`)."""

from __future__ import annotations

import os
import sys

import numpy as np

from .common import INPUT_NAME, MASK_NAME, METADATA_PREFIX, OUTPUT_NAME
from .errors import import_coremltools
from .stateful import greedy_generate


def _load(path: str):
    if sys.platform != "darwin":
        raise RuntimeError(
            "running a Core ML package needs macOS (Core ML is not available on "
            f"{sys.platform}); verify_coreml checks the package from its files instead"
        )
    return import_coremltools().models.MLModel(os.fspath(path))


def predict_logits(path: str, input_ids) -> np.ndarray:
    """Run a fixed-window package and return its logits as float32."""
    mlmodel = _load(path)
    ids = np.asarray(input_ids.cpu() if hasattr(input_ids, "cpu") else input_ids, dtype=np.int32)
    return np.asarray(mlmodel.predict({INPUT_NAME: ids})[OUTPUT_NAME], dtype=np.float32)


def package_step(mlmodel, state):
    """``step(input_ids, causal_mask) -> logits`` of a loaded generation package on one ``MLState``, for
    :func:`optimum_edkm.export.stateful.greedy_generate`."""

    def step(input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        inputs = {INPUT_NAME: input_ids.astype(np.int32), MASK_NAME: mask.astype(np.float16)}
        return np.asarray(mlmodel.predict(inputs, state=state)[OUTPUT_NAME], dtype=np.float32)

    return step


def generate_with_package(path_or_model, prompt_ids, max_new_tokens: int, eos_token_id=None, on_token=None) -> list:
    """Greedy generation with a generation package (:func:`optimum_edkm.export.to_coreml_generate`, a path or a
    loaded ``MLModel``): the prompt in one call, then one call per token, on a fresh ``MLState``. ``on_token`` is
    called with each new token. Returns the new token ids."""
    mlmodel = _load(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    context = int(mlmodel.user_defined_metadata[METADATA_PREFIX + "context_length"])
    return greedy_generate(
        package_step(mlmodel, mlmodel.make_state()), prompt_ids, max_new_tokens, context, eos_token_id, on_token
    )
