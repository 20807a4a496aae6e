"""AWQ (Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", MLSys 2024), written from the paper and checked against the behaviour of the reference code
(github.com/mit-han-lab/llm-awq: ``awq/quantize/pre_quant.py`` ``run_awq``, ``auto_scale.py``
``auto_scale_block`` / ``_search_module_scale``, ``auto_clip.py`` ``auto_clip_layer``) and its ports
(casper-hansen/AutoAWQ ``awq/quantize/quantizer.py``, ModelCloud/GPTQModel ``looper/awq_processor.py``).

Per decoder layer, on the inputs that the *unquantized* model gives it (as ``run_awq`` does):

1. Scaling groups (input -> linears -> module whose output is compared, :mod:`.awq_groups`), for a Llama-style
   layer: ``input_layernorm -> q,k,v -> self_attn``; ``v_proj -> o_proj -> o_proj`` only when the two weights
   have the same shape (no grouped-query attention: with GQA ``v_proj`` has fewer outputs than ``o_proj`` has
   inputs); ``post_attention_layernorm -> gate,up -> mlp``; ``up_proj -> down_proj -> down_proj``.
2. Scale search per group: ``a = mean |x|`` per input channel over the calibration tokens; for
   ``alpha in {0, 1/20, ..., 19/20}``: ``s = max(a**alpha, 1e-4)``, normalised by ``sqrt(max(s) min(s))``; the
   group's weights become ``Q(W diag(s)) diag(s)^-1``; keep the ``s`` with the lowest mean squared error of the
   inspected module's output against its float output (``alpha = 0`` is plain RTN, so the search never picks
   worse than RTN for the group). All groups are searched on the original weights, then the scales are folded:
   ``1/s`` into the previous norm's weight (or the previous linear's output rows), ``s`` into the linears'
   input columns; the float model computes the same function (checked).
3. Clipping search for every linear except q and k (their product inside attention makes a per-layer output
   error a poor proxy): per output row and group, the clamp ``max|w| * (1 - i/20)``, ``i = 0..9``, that minimises
   ``mean_t (x_t . (w - Q(clamp(w))))^2`` on about 512 tokens sampled evenly from the calibration inputs
   (scaled by ``1/s`` like the weights were).
4. Every linear of the layer is rounded to the grid (:mod:`optimum_edkm.baselines.quantizer`).

The scaling groups are architecture knowledge: Llama-style layers (Llama, Mistral, Qwen2/3, SmolLM), Gemma 2/3
(sandwich norms, ``1 + weight`` RMSNorms), Phi-3 (fused ``qkv_proj`` / ``gate_up_proj``) and OPT are supported;
other layers (GPT-2, GPT-NeoX, ...) are refused by name before any work.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import LayerCall, decoder_layers, layer_by_layer, layer_output, module_names, named_linears
from ..storage import WeightStorage
from .awq_groups import fold_scales, scaling_groups
from .quantizer import check_bits_and_group, fake_quantize, minmax_params, quantize_groupwise
from .result import BaselineResult

#: substrings of the linears whose clipping AWQ does not search (query and key projections, fused or not).
NO_CLIP = ("q_proj", "k_proj", "qkv_proj")
#: relative error of the layer's float output allowed after folding the scales (only float rounding remains).
FOLD_TOLERANCE = 1e-4


@dataclasses.dataclass
class _LayerRecording:
    """What one float forward of a layer over all calibration calls showed."""

    linear_inputs: dict  # linear name -> [tokens, in_features]
    inspect_calls: dict  # inspected module name -> list of (args, kwargs), one per call
    inspect_outputs: dict  # inspected module name -> list of float outputs, one per call
    layer_outputs: list  # the layer's float outputs, one per call


@torch.no_grad()
def _record_layer(layer: nn.Module, calls: list[LayerCall], linears: dict, inspected: list[str]) -> _LayerRecording:
    inputs = {name: [] for name in linears}
    inspect_calls = {name: [] for name in inspected}
    inspect_outputs = {name: [] for name in inspected}
    handles = []
    for name, linear in linears.items():
        handles.append(
            linear.register_forward_pre_hook(
                lambda _m, args, name=name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1]))
            )
        )
    for name in inspected:
        module = layer.get_submodule(name)
        handles.append(
            module.register_forward_pre_hook(
                lambda _m, args, kwargs, name=name: inspect_calls[name].append((args, kwargs)), with_kwargs=True
            )
        )
        handles.append(
            module.register_forward_hook(
                lambda _m, _args, output, name=name: inspect_outputs[name].append(layer_output(output))
            )
        )
    try:
        layer_outputs = [layer_output(layer(*call.args, **call.kwargs)) for call in calls]
    finally:
        for handle in handles:
            handle.remove()
    return _LayerRecording({k: torch.cat(v) for k, v in inputs.items()}, inspect_calls, inspect_outputs, layer_outputs)


@torch.no_grad()
def search_scale(
    module: nn.Module,
    calls: list,
    reference_outputs: list,
    linears: list[nn.Linear],
    features: torch.Tensor,
    bits: int,
    group_size: Optional[int],
    symmetric: bool,
    n_grid: int = 20,
) -> tuple[torch.Tensor, float, list[float]]:
    """AWQ's grid search of per-input-channel scales for ``linears`` (which all read ``features``); returns the
    best scales, the best alpha and the loss of every alpha."""
    mean_abs = features.abs().float().mean(0)
    originals = [linear.weight.detach().clone() for linear in linears]
    elements = sum(out.numel() for out in reference_outputs)
    best_loss, best_alpha, best_scales, history = math.inf, None, None, []
    try:
        for step in range(n_grid):
            alpha = step / n_grid
            scales = mean_abs.pow(alpha).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            for linear, original in zip(linears, originals):
                scaled = original * scales.to(original.dtype).view(1, -1)
                linear.weight.copy_(
                    quantize_groupwise(scaled, bits, group_size, symmetric) / scales.to(original.dtype).view(1, -1)
                )
            squared_error = 0.0
            for (args, kwargs), reference in zip(calls, reference_outputs):
                output = layer_output(module(*args, **kwargs))
                squared_error += float((output - reference).float().pow(2).sum())
            loss = squared_error / elements
            history.append(loss)
            if loss < best_loss:
                best_loss, best_alpha, best_scales = loss, alpha, scales
    finally:
        for linear, original in zip(linears, originals):
            linear.weight.copy_(original)
    if best_scales is None:
        raise FloatingPointError(f"every AWQ scale candidate gave a non-finite output error: {history}")
    return best_scales, best_alpha, history


@torch.no_grad()
def search_clip(
    weight: torch.Tensor,
    features: torch.Tensor,
    bits: int,
    group_size: Optional[int],
    symmetric: bool,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    sample_tokens: int = 512,
    rows_per_chunk: int = 1024,
) -> torch.Tensor:
    """AWQ's clipping search: the best ``max |w|`` per row and group, shape ``[rows, groups, 1]``."""
    rows, columns = weight.shape
    size = columns if group_size is None else group_size
    padding = (-columns) % size  # zero columns change neither the grid (range contains 0) nor the outputs
    x = features[:: max(1, features.shape[0] // sample_tokens)].float()
    x = nn.functional.pad(x, (0, padding)).view(x.shape[0], -1, size).transpose(0, 1)  # [G, t, size]
    w_all = nn.functional.pad(weight.float(), (0, padding)).view(rows, -1, size)  # [rows, G, size]
    best_all = []
    for w in w_all.split(rows_per_chunk):
        original_max = w.abs().amax(-1, keepdim=True)
        best = original_max.clone()
        best_error = torch.full_like(original_max, math.inf)
        for step in range(int(max_shrink * n_grid)):
            max_val = original_max * (1 - step / n_grid)
            clipped = torch.clamp(w, -max_val, max_val)
            difference = w - fake_quantize(clipped, minmax_params(clipped, bits, symmetric))  # [r, G, size]
            error = torch.matmul(x, difference.permute(1, 2, 0)).pow(2).mean(1)  # [G, r]
            error = error.transpose(0, 1).unsqueeze(-1)  # [r, G, 1]
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best = torch.where(better, max_val, best)
        best_all.append(best)
    return torch.cat(best_all)


def _apply_clip(weight: torch.Tensor, max_val: torch.Tensor, group_size: Optional[int]) -> None:
    rows, columns = weight.shape
    size = columns if group_size is None else group_size
    grouped = nn.functional.pad(weight, (0, (-columns) % size)).view(rows, -1, size)
    clipped = torch.clamp(grouped, -max_val.to(weight.dtype), max_val.to(weight.dtype))
    weight.copy_(clipped.view(rows, -1)[:, :columns])


@torch.no_grad()
def awq(
    model: nn.Module,
    input_ids: torch.Tensor,
    bits: int,
    group_size: Optional[int] = 128,
    symmetric: bool = False,
    n_grid: int = 20,
    clip: bool = True,
    max_shrink: float = 0.5,
    clip_tokens: int = 512,
    batch_size: int = 8,
    progress: bool = True,
) -> BaselineResult:
    """AWQ every ``nn.Linear`` of the decoder layers in place: scale search and folding, clipping search, then
    round-to-nearest (fake-quantized: de-quantized float weights; norm weights change too). The scaling groups
    are architecture knowledge (:func:`~optimum_edkm.baselines.awq_groups.scaling_groups`: Llama-, Gemma-, Phi-3-
    and OPT-style layers); other layers are refused by name before any work.

    Args:
        input_ids: ``[n_samples, seq_len]`` calibration token ids.
        bits, group_size, symmetric: the number format (AWQ's default is asymmetric, with zero points).
        n_grid: alpha candidates ``0, 1/n_grid, ..., (n_grid-1)/n_grid`` (and clipping steps of ``1/n_grid``).
        clip: run the clipping search.
        max_shrink: largest clipping fraction tried.
        clip_tokens: calibration tokens (sampled evenly) used by the clipping search.
        batch_size: calibration sequences per forward.
    """
    check_bits_and_group(bits, group_size)
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be an integer >= 1, got {n_grid!r}")
    if not 0 <= max_shrink < 1:
        raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink!r}")
    names = module_names(model)
    layers = decoder_layers(model)
    plans = [scaling_groups(layer, model) for layer in layers]  # an unsupported layer is refused before any work
    storage, alphas = {}, {}
    steps = layer_by_layer(model, input_ids, batch_size)
    for step in tqdm(steps, total=len(layers), desc=f"AWQ {bits}-bit", unit="layer", disable=not progress):
        layer, calls, groups = step.layer, step.calls, plans[step.index]
        linears = named_linears(layer)
        recording = _record_layer(layer, calls, linears, sorted({g.inspect for g in groups}))

        chosen = []
        for group in groups:
            scales, alpha, _ = search_scale(
                layer.get_submodule(group.inspect),
                recording.inspect_calls[group.inspect],
                recording.inspect_outputs[group.inspect],
                [linears[name] for name in group.linears],
                recording.linear_inputs[group.linears[0]],
                bits,
                group_size,
                symmetric,
                n_grid,
            )
            chosen.append((group, scales))
            alphas[f"{names[id(layer)]}.{group.previous}"] = alpha
        for group, scales in chosen:
            fold_scales(layer, group, scales)
            for name in group.linears:
                recording.linear_inputs[name] = recording.linear_inputs[name] / scales.to(
                    recording.linear_inputs[name].dtype
                )
        _check_fold(layer, calls[0], recording.layer_outputs[0], step.index)

        if clip:
            for name, linear in linears.items():
                if any(marker in name for marker in NO_CLIP):
                    continue
                max_val = search_clip(
                    linear.weight,
                    recording.linear_inputs[name],
                    bits,
                    group_size,
                    symmetric,
                    n_grid,
                    max_shrink,
                    clip_tokens,
                )
                _apply_clip(linear.weight, max_val, group_size)
        for name, linear in linears.items():
            linear.weight.copy_(quantize_groupwise(linear.weight, bits, group_size, symmetric))
            storage[names[id(linear)]] = WeightStorage.uniform(tuple(linear.weight.shape), bits, group_size, symmetric)
        step.outputs = recording.layer_outputs  # the next layer reads the float layer's outputs
        del recording
    return BaselineResult(
        storage=storage,
        settings={
            "symmetric": symmetric,
            "n_grid": n_grid,
            "clip": clip,
            "max_shrink": max_shrink,
            "clip_tokens": clip_tokens,
            "calibration_tokens": int(input_ids.numel()),
        },
        details={"alpha": alphas},
    )


@torch.no_grad()
def _check_fold(layer: nn.Module, call: LayerCall, reference: torch.Tensor, index: int) -> None:
    output = layer_output(layer(*call.args, **call.kwargs))
    error = float((output - reference).float().norm() / reference.float().norm().clamp(min=1e-12))
    if not error < FOLD_TOLERANCE:
        raise RuntimeError(
            f"folding the AWQ scales changed decoder layer {index}'s float output (relative error {error:.2e}); "
            f"its norms or projections are not the kind these scaling groups assume"
        )
