"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023), written from the paper and checked against the behaviour of the reference
code (github.com/IST-DASLab/gptq: ``gptq.py`` ``GPTQ.fasterquant``, ``quant.py``, ``llama.py``) and its maintained
re-implementations (ModelCloud/GPTQModel ``gptqmodel/quantization/gptq.py``, vllm-project/llm-compressor
``modifiers/gptq/gptq_quantize.py``).

Per linear layer with weight ``W`` (rows = outputs) and calibration inputs ``X``:

1. ``H = 2/N * sum_x x x^T`` over the N calibration tokens (the Hessian of ``||X W^T - X Q^T||^2``).
2. Inputs that are always zero ("dead" columns): ``H_ii = 1``, ``W[:, i] = 0``. Damping:
   ``H += damp * mean(diag H) * I``.
3. The upper Cholesky factor ``U`` of ``H^-1``. Row ``j`` of ``U`` is, up to the factor ``1/U_jj``, row ``j`` of the
   inverse Hessian of the columns not yet quantized, so the optimal-brain-quantization update after quantizing
   column ``j`` is ``W[:, j:] -= (w_j - q_j) / U_jj * U[j, j:]`` - no matrix is re-inverted.
4. Columns are processed in blocks of ``block_size`` ("lazy batch updates"): updates inside a block are applied at
   once, the rest of the matrix is updated once per block with ``W[:, i2:] -= Err @ U[i1:i2, i2:]``.
5. Groups: the scale/zero of a group are computed when the group's first column is reached, from the weights as
   updated so far. Blocks are cut so that a group starting inside a block also ends inside it; then every group's
   parameters see fully updated weights and the result equals the column-by-column algorithm for any block size
   (the reference code reads the not-yet-updated matrix there, which only differs when groups are smaller than
   or misaligned with blocks). Optional act-order processes columns by decreasing ``diag(H)``; with groups it then
   needs a per-column group index (``static_groups`` fixes the groups in the original column order instead).

The model is processed decoder layer by decoder layer ("true sequential": inside a layer, q/k/v are quantized
first, then o, then gate/up, then down, each with inputs produced by the already-quantized earlier linears) and
the next layer's inputs are the outputs of the quantized layer.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import (
    check_block_and_damp,
    dampen,
    decoder_layers,
    error_feedback,
    for_each_hessian,
    layer_by_layer,
    module_names,
    single_cpu_thread,
    upper_cholesky_of_inverse,
    weight_rows,
    working_copies,
)
from ..storage import WeightStorage
from .quantizer import QuantParams, check_bits_and_group, fake_quantize, minmax_params
from .result import BaselineResult

#: bits of the per-input-column group index that act-order with dynamic groups must store (int32, as in
#: GPTQ checkpoints' ``g_idx``).
GROUP_INDEX_BITS = 32


class GPTQResult(NamedTuple):
    weight: torch.Tensor
    loss: float


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: Optional[int] = None,
    symmetric: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
) -> GPTQResult:
    """Quantize one ``[rows, columns]`` weight with GPTQ given the ``[columns, columns]`` input Hessian.

    Returns the de-quantized weight (dtype of ``weight``) and GPTQ's loss estimate
    ``sum (w - q)^2 / (2 U_jj^2)`` (proportional to the increase of the layer's output error).
    """
    check_bits_and_group(bits, group_size)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    if tuple(hessian.shape) != (columns, columns):
        raise ValueError(
            f"hessian must be [{columns}, {columns}] for a weight with {columns} columns, got {tuple(hessian.shape)}"
        )
    check_block_and_damp(block_size, damp)
    with single_cpu_thread(weight.device):
        return _gptq(weight, hessian, bits, group_size, symmetric, block_size, damp, act_order, static_groups)


def _gptq(weight, hessian, bits, group_size, symmetric, block_size, damp, act_order, static_groups) -> GPTQResult:
    rows, columns = weight.shape
    W, H = working_copies(weight, hessian)

    static_params: list[QuantParams] = []
    if group_size is not None and static_groups:
        static_params = [
            minmax_params(W[:, g : g + group_size], bits, symmetric) for g in range(0, columns, group_size)
        ]
    params = minmax_params(W, bits, symmetric) if group_size is None else None

    permutation = None
    if act_order:
        permutation = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, permutation], H[permutation][:, permutation]

    U = upper_cholesky_of_inverse(dampen(H, damp))

    dynamic_groups = group_size is not None and not static_groups
    Q = torch.zeros_like(W)
    losses = torch.zeros(rows, dtype=W.dtype, device=W.device)

    def quantize_column(column: int, i: int, W1: torch.Tensor) -> torch.Tensor:
        nonlocal params
        if dynamic_groups and column % group_size == 0:
            # At a block start W holds fully updated weights; inside a block W1 does (and the group fits).
            source = W[:, column : column + group_size] if i == 0 else W1[:, i : i + group_size]
            params = minmax_params(source, bits, symmetric)
        elif static_params:
            original = int(permutation[column]) if permutation is not None else column
            params = static_params[original // group_size]
        q = fake_quantize(W1[:, i].unsqueeze(1), params).flatten()
        Q[:, column] = q
        return q

    for Err1 in error_feedback(W, U, quantize_column, block_size, group_size if dynamic_groups else None):
        losses += Err1.pow(2).sum(1) / 2  # (w - q)^2 / (2 U_jj^2) per column

    if permutation is not None:
        Q = Q[:, torch.argsort(permutation)]
    return GPTQResult(Q.to(weight.dtype), float(losses.sum()))


@torch.no_grad()
def gptq(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    bits: int,
    group_size: Optional[int] = 128,
    symmetric: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    true_sequential: bool = True,
    batch_size: int = 8,
    progress: bool = True,
) -> BaselineResult:
    """GPTQ every linear (``nn.Linear``, ``Conv1D``) of the decoder layers in place (fake-quantized: de-quantized
    float weights).

    Args:
        input_ids: ``[n_samples, seq_len]`` calibration token ids.
        bits, group_size, symmetric: the number format (see :mod:`optimum_edkm.baselines.quantizer`).
        block_size: columns per lazy batch update (does not change the result, only the speed).
        damp: dampening as a fraction of the mean Hessian diagonal.
        act_order: quantize columns in order of decreasing Hessian diagonal.
        static_groups: with act-order and groups, compute group parameters up front in the original order.
        true_sequential: calibrate each linear on inputs from the already-quantized linears before it.
        batch_size: calibration sequences per forward.
    """
    check_bits_and_group(bits, group_size)
    check_block_and_damp(block_size, damp)
    names = module_names(model)
    layers = decoder_layers(model)
    needs_group_index = act_order and group_size is not None and not static_groups
    storage, losses = {}, {}

    def quantize(linear: nn.Module, hessian: torch.Tensor) -> None:
        rows = weight_rows(linear)
        result = gptq_quantize_weight(
            rows, hessian, bits, group_size, symmetric, block_size, damp, act_order, static_groups
        )
        rows.copy_(result.weight)
        full_name = names[id(linear)]
        losses[full_name] = result.loss
        storage[full_name] = WeightStorage.uniform(
            tuple(rows.shape),
            bits,
            group_size,
            symmetric,
            extra_bits=rows.shape[1] * GROUP_INDEX_BITS if needs_group_index else 0,
        )

    steps = layer_by_layer(model, input_ids, batch_size)
    for step in tqdm(steps, total=len(layers), desc=f"GPTQ {bits}-bit", unit="layer", disable=not progress):
        for_each_hessian(step.layer, step.calls, quantize, true_sequential=true_sequential)
    return BaselineResult(
        storage=storage,
        settings={
            "symmetric": symmetric,
            "block_size": block_size,
            "damp": damp,
            "act_order": act_order,
            "static_groups": static_groups,
            "true_sequential": true_sequential,
            "calibration_tokens": int(input_ids.numel()),
        },
        details={"gptq_loss": losses},
    )
