"""The model's float tensors in the package (each stored once, as its fp16 rounding; no dense copy of a
palettized weight; the tied embedding once) and the sizes: indices at exactly n bits, the palettized payload no
larger than in torch, against the n-bit reference of :func:`optimum_edkm.storage.model_size`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ...storage import model_size
from ..common import palettized_tensor_ids, storage_groups
from ..layouts import flat_key
from ..mil import MilPackage
from .report import Findings
from .weights import expected_consumers

FLOAT_DTYPES = {10, 11}  # MIL fp16, fp32
#: the precision a Core ML package stores float tensors, LUTs and scales in
PACKAGE_FLOAT_BITS = 16


@dataclass
class FloatTensors:
    """The model's float tensors as the package stores them."""

    values: dict = field(default_factory=dict)  # tensor id -> fp16-rounded values from the package (fp32)
    groups: dict = field(default_factory=dict)  # tensor id -> (torch tensor, [state-dict keys])
    float_bytes: int = 0
    converter_bytes: int = 0
    in_package: list = field(default_factory=list)
    not_stored: list = field(default_factory=list)
    tied_embedding: Optional[dict] = None


def check_float_tensors(package: MilPackage, model, records: dict, chains: dict, findings: Findings) -> FloatTensors:
    """Every dense float constant is either a model tensor (stored once, as its fp16 rounding) or a converter
    constant that cannot be a palettized weight's dense copy."""
    palettized = palettized_tensor_ids(records)
    result = FloatTensors()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in palettized and tensor.is_floating_point():
            result.groups.setdefault(id(tensor), (tensor, []))[1].append(key)
    by_key = {key.replace(".", "_"): tensor_id for tensor_id, (_, keys) in result.groups.items() for key in keys}
    chain_ops = {op.name for chain in chains.values() for op in chain.ops}
    palettized_shapes = {tuple(record.palette.shape) for record in records.values()}
    stored = {}
    for op in package.ops:
        if op.type != "const" or op.output_dtype not in FLOAT_DTYPES or op.name in chain_ops:
            continue
        tensor = package.evaluate(op.name)
        tensor_id = by_key.get(flat_key(op.name) or "")
        if tensor_id is None:
            result.converter_bytes += tensor.stored_bytes
            if tensor.array.ndim == 2 and tensor.array.shape in palettized_shapes and tensor.array.size >= 256:
                findings.fail(
                    f"dense float constant {op.name!r} {tensor.array.shape} has the shape of a palettized "
                    f"weight and maps to no float tensor of the model: a dense copy?"
                )
            continue
        stored.setdefault(tensor_id, []).append((op.name, tensor))
    for tensor_id, entries in stored.items():
        torch_tensor, keys = result.groups[tensor_id]
        if len(entries) > 1:
            findings.fail(f"{' / '.join(keys)} is stored {len(entries)} times: {[e[0] for e in entries]}")
        op_name, tensor = entries[0]
        values = tensor.array.astype(np.float32).reshape(tuple(torch_tensor.shape))
        if not np.array_equal(values, torch_tensor.detach().float().half().float().numpy()):
            findings.fail(f"{keys[0]}: the package's {op_name!r} is not the fp16 rounding of the torch tensor")
        result.float_bytes += sum(t.stored_bytes for _, t in entries)
        result.values[tensor_id] = values
        result.in_package.extend(keys)
    state = model.state_dict(keep_vars=True)
    result.not_stored = [
        keys[0] for tensor_id, (_, keys) in result.groups.items() if tensor_id not in stored and keys[0] in state
    ]
    result.tied_embedding = _tied_embedding(model, records, chains, result.groups, stored, findings)
    return result


def _tied_embedding(
    model, records: dict, chains: dict, groups: dict, stored: dict, findings: Findings
) -> Optional[dict]:
    for name, record in records.items():  # a palettized tied embedding: one LUT op for both uses
        if record.kind == "embedding" and any(records[other].kind == "linear" for other in record.tied_to):
            members = (name, *record.tied_to)
            count = 1 if name in chains else 0
            if count:
                findings.ok(
                    f"palettized tied embedding stored once ({chains[name].head.name}), read by "
                    f"{', '.join(expected_consumers(records, name))}"
                )
            return {"keys": [f"{member}.weight" for member in members], "palettized": True, "stored": count}
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    input_embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(input_embeddings, "weight", None)
    if output_embeddings is None or weight is None or getattr(output_embeddings, "weight", None) is not weight:
        return None
    count = len(stored.get(id(weight), []))
    if count == 1:
        findings.ok(f"tied embedding stored once ({stored[id(weight)][0][0]}), used by gather and linear")
    else:
        findings.fail(f"tied embedding stored {count} times")
    return {"keys": groups[id(weight)][1] if id(weight) in groups else [], "palettized": False, "stored": count}


@dataclass
class Sizes:
    weight_bin_bytes: int
    blob_count: int
    index_bytes: int
    nbit_index_bytes: int
    palettized_payload_bytes: int
    nbit_payload_bytes: int
    nbit_reference_bytes: int


def measure_sizes(package: MilPackage, model, records: dict, modules: list, findings: Findings) -> Sizes:
    """Indices at exactly n bits; indices + LUTs + scales no larger than in torch (plus per-row LUT copies)."""
    first = [storage[0] for storage in storage_groups(records)]  # each stored weight once
    stored = [m for m in modules if m.name in set(first)]
    index_bytes = sum(m.index_bytes for m in stored)
    payload = sum(m.index_bytes + m.lut_bytes + m.scale_bytes for m in stored)
    storage = {name: records[name].storage() for name in first}
    nbit = model_size(model, storage, unquantized_bits=PACKAGE_FLOAT_BITS)
    nbit_index_bytes = sum(description.index_bytes for description in storage.values())
    sizes = Sizes(
        weight_bin_bytes=sum(package.weight_files().values()),
        blob_count=package.blob_count(),
        index_bytes=index_bytes,
        nbit_index_bytes=nbit_index_bytes,
        palettized_payload_bytes=payload,
        nbit_payload_bytes=nbit.compressed_bytes,
        nbit_reference_bytes=nbit.model_bytes,
    )
    if index_bytes != nbit_index_bytes:
        findings.fail(f"indices take {index_bytes} B, {nbit_index_bytes} B at n bits")
    palettes = [records[m.name].palette for m in stored if m.layout.startswith("per-row")]
    folded = sum((p.out_channels - p.groups) * p.entries * PACKAGE_FLOAT_BITS // 8 for p in palettes)
    nbit_payload = nbit.compressed_bytes
    if payload > nbit_payload + folded:
        findings.fail(
            f"palettized weights take {payload} B in the package, more than their n-bit size "
            f"{nbit_payload} B (+{folded} B of per-row LUTs)"
        )
    else:
        findings.ok(
            f"palettized weights stored at n bits: {payload:,} B (n-bit {nbit_payload:,} B"
            f"{f' + {folded:,} B per-row LUTs' if folded else ''})"
        )
    return sizes
