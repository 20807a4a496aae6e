"""Logits of a torch model rebuilt from the package's weights against the model's own: the package's decoded
palettized weights and fp16 float tensors compute the same function (what can be checked without Core ML)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..common import export_copy, reference_input_ids
from .floats import FloatTensors
from .report import Findings


@torch.no_grad()
def compare_logits(
    model, records: dict, decoded: dict, floats: FloatTensors, input_shape: tuple, rtol: float, findings: Findings
) -> tuple:
    """``(max abs diff, tolerance)`` between the logits of a torch model rebuilt from the package's weights and
    the model's own (both fp32, the palettized weights decoded)."""
    reference_model = export_copy(model, records)
    rebuilt = export_copy(model, records)
    group_of = {key: tensor_id for tensor_id, (_, keys) in floats.groups.items() for key in keys}
    replacements = {tensor_id: torch.from_numpy(values) for tensor_id, values in floats.values.items()}
    for module_name, submodule in rebuilt.named_modules():
        for store in (submodule._parameters, submodule._buffers):
            for key, tensor in list(store.items()):
                value = replacements.get(group_of.get(f"{module_name}.{key}" if module_name else key))
                if tensor is not None and value is not None:
                    store[key] = nn.Parameter(value, requires_grad=False) if isinstance(tensor, nn.Parameter) else value
    for name in records:
        rebuilt.get_submodule(name).weight = nn.Parameter(
            torch.from_numpy(decoded[name].astype(np.float32)), requires_grad=False
        )
    batch, seq_len = input_shape
    ids = reference_input_ids(model.config.vocab_size, batch, seq_len, seed=1)
    reference = reference_model(input_ids=ids, use_cache=False).logits.float()
    logits = rebuilt(input_ids=ids, use_cache=False).logits.float()
    difference = float((logits - reference).abs().max())
    tolerance = rtol * max(1.0, float(reference.abs().max()))
    if difference <= tolerance:
        findings.ok(
            f"logits of a torch model rebuilt from the package's weights: max abs diff {difference:.3g} "
            f"<= {tolerance:.3g}"
        )
    else:
        findings.fail(
            f"logits of a torch model rebuilt from the package's weights differ by {difference:.3g} (> {tolerance:.3g})"
        )
    return difference, tolerance
