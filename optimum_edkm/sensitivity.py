"""Sensitivity of each weight to the model's loss, and sensitivity-weighted palettization.

The Fisher information's diagonal, estimated as the mean over calibration sequences of the squared gradient
of the language-modelling loss (SqueezeLLM; coremltools' ``SKMPalettizer``), says how much a small error in
each weight costs: to second order, ``loss(w + e) - loss(w) ~ 1/2 sum F_i e_i^2``. A k-means weighted by it
puts the LUT entries where errors are expensive (:func:`optimum_edkm.clustering.init_centroids` with
``sample_weight``), which is what ``optimum_edkm.prepare(model, config, importance=fisher)`` does for every
clustered module; the same
numbers rank whole modules for a mixed bit-width allocation (:func:`module_sensitivity`).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)


def _linear_weights(model) -> dict:
    """``{module name: weight}`` of the decoder's linear layers (what eDKM clusters by default)."""
    from transformers.pytorch_utils import Conv1D

    embeddings = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and id(module) not in embeddings
    }


def fisher_diagonal(
    model, token_ids: torch.Tensor, samples: int = 16, seq_len: int = 256, seed: int = 0, modules: Optional[dict] = None
) -> dict:
    """Empirical Fisher diagonal of the weights of ``modules`` (default: every decoder linear layer of a float
    model): the mean over ``samples`` calibration windows (``seq_len`` tokens drawn with ``seed`` from the 1-D
    stream ``token_ids``) of the squared gradient of that window's mean next-token cross-entropy. One backward
    per window, so that squares are taken per sequence, not of a batch sum. Returns ``{name: [out, in] float32
    tensor}`` in the module's own weight layout, on the CPU. Gradients of the model are left cleared."""
    from .data import sample_windows

    weights = modules if modules is not None else _linear_weights(model)
    if not weights:
        raise ValueError("no linear layer found to estimate the Fisher diagonal of; pass modules={name: weight}")
    windows = sample_windows(token_ids, samples, seq_len, seed)
    device = next(model.parameters()).device
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    wanted = {id(w) for w in weights.values()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in wanted)
    fisher = {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deployed function
    try:
        for window in windows:
            ids = window.unsqueeze(0).to(device)
            loss = model(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, list(weights.values()))
            for (name, _), grad in zip(weights.items(), grads):
                fisher[name] += grad.detach().float().pow(2).cpu()
    finally:
        model.train(was_training)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])
    for value in fisher.values():
        value /= len(windows)
    return fisher


def module_sensitivity(fisher: dict, model, bits: int) -> dict:
    """A per-module score of how much the loss would grow if the module alone were rounded to ``bits``:
    ``1/2 sum F_i (w_i - q(w_i))^2`` with ``q`` a per-row min-max uniform ``bits``-bit rounding (a cheap stand-in
    for the palettization error). Used to decide where extra bits pay most."""
    scores = {}
    levels = 2**bits - 1
    for name, importance in fisher.items():
        weight = model.get_submodule(name).weight.detach().float().cpu()
        low, high = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
        step = ((high - low) / levels).clamp_min(torch.finfo(torch.float32).tiny)
        error = weight - (low + torch.round((weight - low) / step) * step)
        scores[name] = float(0.5 * (importance * error.pow(2)).sum())
    return scores


def allocate_bits(sizes: dict, costs: dict, budget: float) -> dict:
    """Per-module bit widths meeting an average budget: ``{module: bits}``.

    Args:
        sizes: ``{module: number of weights}``.
        costs: ``{module: {bits: estimated loss increase}}`` for every candidate width of every module (e.g.
            :func:`module_sensitivity` at each width); every module needs the same candidate widths.
        budget: the largest allowed weighted mean of the widths (bits per weight over the modules).

    Every module starts at the smallest width; the upgrade with the largest cost saving per extra bit is taken
    while the budget allows (greedy on the convex hull, as HAWQ-style allocations do); upgrades that no longer
    fit are skipped, so a smaller one may still be taken.
    """
    if set(sizes) != set(costs):
        raise ValueError("sizes and costs must name the same modules")
    widths = sorted({b for c in costs.values() for b in c})
    if any(sorted(c) != widths for c in costs.values()):
        raise ValueError(f"every module needs a cost for each width {widths}")
    total = sum(sizes.values())
    chosen = {name: widths[0] for name in sizes}
    used = widths[0] * total
    if used > budget * total + 1e-9:
        raise ValueError(f"even {widths[0]} bits everywhere exceeds the budget of {budget} bits per weight")
    while True:
        best = None
        for name, bits in chosen.items():
            for higher in (b for b in widths if b > bits):
                extra = (higher - bits) * sizes[name]
                if used + extra > budget * total + 1e-9:
                    continue
                gain = (costs[name][bits] - costs[name][higher]) / extra
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, name, higher, extra)
        if best is None:
            return chosen
        _, name, higher, extra = best
        chosen[name] = higher
        used += extra
