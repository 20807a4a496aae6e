"""Post-training palettization of a prepared model, decoder layer by decoder layer (see :mod:`optimum_edkm.ptq`):
each clustered linear's palette is chosen on the inputs the already-palettized layers before it produce, and
written into the train-time module so that :func:`optimum_edkm.palettize` stores exactly it."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..calibration import (
    check_block_and_damp,
    check_calibration_ids,
    decoder_layers,
    for_each_hessian,
    layer_by_layer,
    module_names,
)
from ..nn import Palette, is_clustered
from .rounding import IMPORTANCES, PaletteCandidate, output_error, palettize_weight

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PostTrainingResult:
    """What :func:`palettize_post_training` did to a model (palettized in place, still a train-time model).

    Attributes:
        storage: per palettized module (``named_modules`` name), its
            :class:`~optimum_edkm.storage.WeightStorage` (indices, LUT, scale), for the bits accounting.
        settings: the options and the configuration the model was palettized with.
        details: per module, the output error ``tr((W - Q) H (W - Q)^T)`` of every candidate (``"output_error"``),
            the one kept (``"chosen"``) and the weights whose nearest LUT entry is not their index (``"mismatched"``:
            near-duplicate entries; palettizing keeps the index, a training step may move them).
    """

    storage: dict
    settings: dict = dataclasses.field(default_factory=dict)
    details: dict = dataclasses.field(default_factory=dict)


@torch.no_grad()
def install_palette(module, candidate: PaletteCandidate) -> dict:
    """Write a palettization into a train-time module (:meth:`~optimum_edkm.nn.ClusteredModule.start_from`: the
    decoded weight as its float weight, the LUT as its centroids, the scale, the absolute temperature; palettizing
    gives the candidate's indices back exactly). Returns ``{"mismatched": n}``: weights whose nearest LUT entry is
    another than their index (near-duplicate refit LUT entries), which a training step may move."""
    palette = Palette.from_indices(module.palette_format, candidate.indices, candidate.lut, candidate.scale)
    return {"mismatched": module.start_from(palette)}


@torch.no_grad()
def palettize_post_training(
    model,
    calibration_ids: torch.Tensor,
    config=None,
    *,
    importance: str = "hessian",
    fisher: Optional[dict] = None,
    refits: int = 1,
    refit_scales: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> "PostTrainingResult":
    """GPTQ-style post-training palettization of every clustered linear (``EDKMLinear``, ``EDKMConv1D``) of the
    decoder layers (any decoder-only model :func:`optimum_edkm.calibration.decoder_layers` finds, each layer
    replayed with its own attention mask and position embeddings).

    The model must be prepared for eDKM (:func:`optimum_edkm.prepare`, or pass ``config`` to prepare a float
    model here). It stays a train-time model holding the post-training palettization (see the module
    docstring): fine-tune it with eDKM, or finalize it with :func:`optimum_edkm.palettize`.

    Args:
        calibration_ids: ``[n_samples, seq_len]`` calibration token ids.
        config: an :class:`~optimum_edkm.EDKMConfig` to prepare a float model with first (``None``: the model is
            prepared already).
        importance: the k-means weighting of the LUT: ``"hessian"``, ``"obs"``, ``"fisher"`` or ``"none"``.
        fisher: ``{module name: Fisher diagonal}`` (e.g. :func:`optimum_edkm.sensitivity.fisher_diagonal` of
            the float model), needed with ``importance="fisher"``.
        refits: least-squares LUT refits, each followed by another rounding pass (0: one pass, no refit).
        refit_scales: refit the per-channel scales with the LUT (models with a per-channel scale only).
        block_size, damp, act_order: GPTQ's lazy-batch block, dampening and column order.
        batch_size: calibration sequences per forward.

    Returns a :class:`PostTrainingResult`: the storage of every palettized weight, the settings, and per module
    the output error ``tr((W - Q) H (W - Q)^T)`` of each candidate.
    """
    from ..api import edkm_config, prepare

    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if importance == "fisher" and not fisher:
        raise ValueError(
            "importance='fisher' needs fisher={module name: Fisher diagonal}, e.g. from "
            "optimum_edkm.sensitivity.fisher_diagonal(float_model, token_ids)"
        )
    if not isinstance(refits, int) or isinstance(refits, bool) or refits < 0:
        raise ValueError(f"refits must be an integer >= 0, got {refits!r}")
    check_block_and_damp(block_size, damp)
    check_calibration_ids(calibration_ids)
    layers = decoder_layers(model)  # a model the layer walker cannot drive is refused before it is prepared
    if config is not None:
        prepare(model, config)
    prepared = edkm_config(model)
    if prepared.palettized:
        raise ValueError(
            "the model is palettized already; post-training palettization needs the train-time model "
            "(load the float model and prepare it)"
        )
    names = module_names(model)
    clustered = [m for m in model.modules() if is_clustered(m)]
    covered = {id(m) for layer in layers for m in _clustered_linears(layer).values()}
    skipped = [names[id(m)] for m in clustered if id(m) not in covered]
    if skipped:
        logger.warning(
            "post-training palettization covers the linears of the decoder layers; %d clustered "
            "module(s) outside them keep their k-means LUT: %s",
            len(skipped),
            ", ".join(skipped[:5]),
        )
    storage, details = {}, {}

    def palettize_module(module, hessian: torch.Tensor) -> None:
        full = names[id(module)]
        weight_fisher = None
        if importance == "fisher":
            if full not in fisher:
                raise ValueError(f"fisher has no entry for {full!r}; compute it for every linear")
            weight_fisher = fisher[full]
        original = module.rows().detach().clone()
        best, errors = palettize_weight(
            original,
            hessian,
            module.spec,
            module.lut_dtype,
            module.weight_scale is not None,
            importance,
            weight_fisher,
            refits,
            refit_scales,
            block_size,
            damp,
            act_order,
            seed=prepared.seed,
            name=f"{full}.weight",
        )
        installed = install_palette(module, best)
        dense = module.snapped_weight()
        errors["final"] = output_error(original, module.rows(dense), hessian)
        details[full] = {"output_error": errors, "chosen": best.origin, **installed}
        storage[full] = module.storage()

    was_training = model.training
    model.eval()
    try:
        steps = layer_by_layer(model, calibration_ids, batch_size)
        for step in tqdm(
            steps, total=len(layers), desc="post-training palettization", unit="layer", disable=not progress
        ):
            layer_started = time.perf_counter()
            linears = _clustered_linears(step.layer)
            if linears:
                for_each_hessian(step.layer, step.calls, palettize_module, linears)
            logger.info(
                "post-training palettization: layer %d/%d in %.1f s",
                step.index + 1,
                len(layers),
                time.perf_counter() - layer_started,
            )
    finally:
        model.train(was_training)
    settings = {
        "importance": importance,
        "refits": refits,
        "refit_scales": refit_scales,
        "block_size": block_size,
        "damp": damp,
        "act_order": act_order,
        "calibration_tokens": int(calibration_ids.numel()),
        "bits": prepared.bits,
        "granularity": prepared.granularity,
        "group_size": prepared.group_size,
        "per_channel_scale": prepared.enable_per_channel_scale,
    }
    return PostTrainingResult(storage=storage, settings=settings, details=details)


def _clustered_linears(layer) -> dict:
    """The train-time eDKM modules of a decoder layer that compute ``x W^T`` (``EDKMLinear``, ``EDKMConv1D``)."""
    return {name: m for name, m in layer.named_modules() if is_clustered(m) and m.kind == "linear"}
