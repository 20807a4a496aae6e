"""Every check an export makes before any work is done: the request (path, shapes, target, capture, toolchain),
the model (palettized, on CPU, storable exactly by the target) and the graph wrapper (it computes the model's
own logits)."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from . import common
from .common import check_representable, manifest_path_for, palette_records, tensors_path_for
from .errors import CoreMLExportError
from .targets import STATE_SPEC, DeploymentTarget, check_target


def check_positive(**values) -> None:
    for label, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CoreMLExportError(f"{label} must be a positive integer, got {value!r}")


def check_exportable(
    model,
    path: str,
    *,
    tokens: int,
    batch_size: int,
    target: DeploymentTarget,
    capture: str,
    tokens_label: str = "seq_len",
) -> dict:
    """Every check that needs no conversion; returns the palettized weights (``{name: PaletteRecord}``)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).endswith(".mlpackage"):
        raise CoreMLExportError(f"path must name an .mlpackage directory (e.g. 'model.mlpackage'), got {path!r}")
    if capture not in common.CAPTURES:
        raise CoreMLExportError(f"capture must be one of {common.CAPTURES}, got {capture!r}")
    check_positive(**{tokens_label: tokens, "batch_size": batch_size})
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    records = palette_records(model)
    if getattr(quantization, "quant_method", None) != "edkm" or not records:
        raise CoreMLExportError(
            "the model has no palettized module: call optimum_edkm.palettize(model) after training, or load a "
            "saved palettized model with AutoModelForCausalLM.from_pretrained(path) after `import optimum_edkm`"
        )
    elsewhere = {str(t.device) for t in list(model.parameters()) + list(model.buffers()) if t.device.type != "cpu"}
    if elsewhere:
        raise CoreMLExportError(
            f"the model has tensors on {', '.join(sorted(elsewhere))}; the Core ML converter "
            f"works on CPU tensors: call model.cpu() before exporting"
        )
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and tokens > limit:
        raise CoreMLExportError(f"{tokens_label}={tokens} exceeds the model's max_position_embeddings={limit}")
    check_target(records, target)
    for record in records.values():
        check_representable(record)
    return records


def check_not_there(path: str, overwrite: bool) -> None:
    existing = [p for p in (path, manifest_path_for(path), tensors_path_for(path)) if os.path.exists(p)]
    if existing and not overwrite:
        raise CoreMLExportError(f"{existing[0]} already exists; pass overwrite=True (CLI: --overwrite) to replace it")


@torch.no_grad()
def check_wrapper(model, wrapper: nn.Module, input_ids: torch.Tensor) -> float:
    """The fixed-length graph must compute the model's own logits (``model`` is the module the wrapper
    holds); otherwise the architecture does not take an explicit additive 4-D mask and the export would be
    wrong."""
    reference = model(input_ids=input_ids, use_cache=False).logits.float()
    traced = wrapper(input_ids).float()
    difference = float((traced - reference).abs().max())
    tolerance = 1e-3 * max(1.0, float(reference.abs().max()))
    if not difference <= tolerance:
        raise CoreMLExportError(
            f"the fixed-length export graph (explicit 4-D causal mask and position ids, no cache) does not "
            f"reproduce model(input_ids).logits (max abs diff {difference:.3g} > {tolerance:.3g}): "
            f"{type(model).__name__} does not accept an additive 4-D attention mask, so it cannot be exported "
            f"this way"
        )
    return difference


def check_toolchain(ct, capture: str) -> None:
    import numpy

    numpy_version = tuple(int(part) for part in numpy.__version__.split(".")[:2])
    if capture == "trace" and ct.__version__.startswith("9.0") and numpy_version >= (2, 4):
        raise CoreMLExportError(
            f"coremltools {ct.__version__} cannot convert traced transformers models with numpy "
            f"{numpy.__version__} (TypeError: only 0-dimensional arrays can be converted to Python scalars): "
            f'install numpy<2.4 (pip install "optimum-edkm[coreml]") or pass capture="export"'
        )


def check_generation_request(model, context_length: int, target: DeploymentTarget, check_tokens: int) -> None:
    if target.spec_version < STATE_SPEC:
        raise CoreMLExportError(
            f"minimum_deployment_target={target.name} has no stateful models (Core ML states, "
            f"which hold the KV cache, exist from iOS18 / macOS15 on): export with "
            f"minimum_deployment_target='iOS18' (or later)"
        )
    check_positive(check_tokens=check_tokens)
    if check_tokens + 4 > context_length:
        raise CoreMLExportError(
            f"context_length={context_length} leaves no room for the {check_tokens}-token "
            f"generation check before conversion: use context_length >= {check_tokens + 4}"
        )
    window = getattr(model.config, "sliding_window", None)
    if isinstance(window, int) and window < context_length:
        raise CoreMLExportError(
            f"the model attends over a sliding window of {window} tokens, the generation export "
            f"over the whole context: use context_length <= {window}"
        )
