"""The palettized weights in the package: each stored weight is exactly one ``constexpr_lut_to_dense`` chain
feeding the right ops, and its indices, LUT, scale and dense values equal the torch module's bit for bit
(decoded here with numpy, and cross-checked with coremltools' own decoder)."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..common import storage_groups
from ..layouts import LayoutError, WeightChain, flat_key, read_palette, rows_of, weight_chains
from ..mil import MilPackage
from .report import Findings, ModuleReport


def match_lut_ops(package: MilPackage, records: dict, findings: Findings) -> tuple:
    """``({module name: chain}, LUT op count)``: each stored weight (tied modules share one) must be exactly one
    ``constexpr_lut_to_dense`` chain, named after one of its modules."""
    groups = storage_groups(records)
    group_of = {name: tuple(members) for members in groups for name in members}
    chains = [c for c in weight_chains(package) if c.of_type("constexpr_lut_to_dense")]
    lut_ops = sum(1 for op in package.ops if op.type == "constexpr_lut_to_dense")
    by_key = {name.replace(".", "_") + "_weight": name for name in records}
    found, unmatched = {}, []
    for chain in chains:
        owners = {group_of[by_key[key]] for key in (flat_key(op.name) for op in chain.ops) if key in by_key}
        if len(owners) != 1:
            unmatched.append((chain.head.name, sorted(name for owner in owners for name in owner)))
            continue
        members = owners.pop()
        if members[0] in found:
            findings.fail(
                f"'{members[0]}' is stored by two LUT ops: {found[members[0]].head.name} and {chain.head.name}"
            )
        for name in members:
            found[name] = chain
    for head, names in unmatched:
        findings.fail(f"LUT op {head!r} matches {'no' if not names else 'several'} palettized module(s) {names}")
    missing = [name for name in records if name not in found]
    if missing:
        findings.fail(
            f"{len(missing)} palettized module(s) have no LUT op (stored dense or dropped): "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    tied = sum(len(members) - 1 for members in groups)
    described = f"{len(records)} palettized modules" + (f" ({tied} tied, sharing their LUT op)" if tied else "")
    if lut_ops == len(groups) and not missing and not unmatched:
        findings.ok(f"{lut_ops} constexpr_lut_to_dense ops = {described}")
    elif lut_ops != len(groups):
        findings.fail(f"{lut_ops} constexpr_lut_to_dense ops for {described}")
    return found, lut_ops


def _same_bits(package_values: np.ndarray, torch_values: np.ndarray) -> bool:
    if package_values.shape != torch_values.shape:
        return False
    if package_values.dtype == np.float16 and torch_values.dtype == np.float16:
        return bool(np.array_equal(package_values.view(np.uint16), torch_values.view(np.uint16)))
    return bool(np.array_equal(package_values.astype(np.float64), torch_values.astype(np.float64)))


def _torch_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def expected_consumers(records: dict, name: str) -> list:
    return sorted({records[member].consumer for member in (name, *records[name].tied_to)})


def check_module(package: MilPackage, records: dict, name: str, chain: WeightChain, findings: Findings) -> tuple:
    """``(ModuleReport, decoded dense weight or None)``: the stored indices, LUT, scale and dense weight of one
    palettized module against the torch module, bit for bit."""
    record = records[name]
    palette = record.palette
    entry = ModuleReport(
        name=name,
        kind=record.kind,
        bits=palette.bits,
        groups=palette.groups,
        per_channel_scale=palette.scale is not None,
        tied_to=record.tied_to,
    )
    lut_op = chain.of_type("constexpr_lut_to_dense")[0]
    entry.weight_op, entry.lut_op = chain.head.name, lut_op.name
    entry.consumers = sorted({f"{op.type}.{param}" for op, param in chain.consumers})
    expected = expected_consumers(records, name)
    if entry.consumers != expected:
        findings.fail(f"'{name}': weight feeds {entry.consumers}, expected {expected}")
    decompression = ("constexpr_lut_to_dense", "constexpr_blockwise_shift_scale")
    extra = [op.type for op in chain.ops if op.type not in decompression]
    if extra or len(chain.ops) > 2:
        findings.fail(f"'{name}': unexpected decompression chain {[op.type for op in chain.ops]}")
        return entry, None
    try:
        stored = read_palette(package, chain, palette)
    except LayoutError as error:
        findings.fail(f"'{name}': {error}")
        return entry, None
    entry.layout, entry.lut_shape, entry.indices_dtype = stored.layout, stored.lut_shape, stored.indices_dtype
    entry.index_bytes, entry.lut_bytes, entry.scale_bytes, entry.scale_op = (
        stored.index_bytes,
        stored.lut_bytes,
        stored.scale_bytes,
        stored.scale_op,
    )
    torch_lut_rows = rows_of(_torch_numpy(palette.lut), palette.out_channels)
    if not _same_bits(stored.lut_rows, torch_lut_rows):
        findings.fail(f"'{name}.weight_lut': the package's LUT differs from the torch LUT")
    if (stored.scale is None) != (palette.scale is None):
        findings.fail(
            f"'{name}.weight_scale': {'missing from' if stored.scale is None else 'unexpected in'} the package"
        )
    elif stored.scale is not None and not _same_bits(stored.scale, _torch_numpy(palette.scale)):
        findings.fail(f"'{name}.weight_scale': the package's per-channel scale differs from the torch scale")

    dense = package.evaluate(chain.head.name).array
    expected = _torch_numpy(record.dense(torch.float16))
    if dense.shape != expected.shape:
        findings.fail(f"'{name}.weight': decodes to shape {dense.shape}, expected {expected.shape}")
        return entry, None
    torch_indices = _torch_numpy(record.indices())
    same_value = dense.astype(np.float32) == expected.astype(np.float32)
    if not same_value.all():
        row, column = (int(i) for i in np.argwhere(~same_value)[0])
        findings.fail(
            f"'{name}.weight': {int((~same_value).sum())} of {same_value.size} decoded weights differ from "
            f"the torch palettized weight (first at [{row}, {column}]: package {float(dense[row, column])!r}"
            f" vs torch {float(expected[row, column])!r}, index {int(stored.indices[row, column])} vs "
            f"{int(torch_indices[row, column])}): the converter re-approximated it"
        )
    other_index = stored.indices != torch_indices
    entry.equivalent_indices = int((other_index & same_value).sum())
    if dense.dtype == np.float16 and not np.array_equal(
        dense.view(np.uint16)[~other_index], expected.view(np.uint16)[~other_index]
    ):
        findings.fail(f"'{name}.weight': equal indices decode to different bits")
    return entry, dense


def cross_check_decoders(package: MilPackage, chains: dict, decoded: dict, findings: Findings) -> bool:
    """coremltools' own loader and decoders must give the same dense weights as ours."""
    from coremltools.converters.mil.frontend.milproto.load import load_mil_proto

    weights_dir = os.path.join(package.model_dir, "weights")
    program = load_mil_proto(package.spec.mlProgram, package.spec_version, weights_dir)
    ops = {op.outputs[0].name: op for op in program.functions["main"].operations if op.outputs}

    def materialize(op):
        if op.op_type == "constexpr_lut_to_dense" and op.lut.val is None:
            vector_axis = None if op.vector_axis is None else op.vector_axis.val
            return op.decompress(op.indices.val, materialize(op.lut.op), vector_axis)
        return op.materialized_val_inference()

    disagree, heads = [], {}
    for name, chain in chains.items():
        if name in decoded and chain.head.name not in heads:
            heads[chain.head.name] = name
    for head, name in heads.items():
        theirs = np.asarray(materialize(ops[head]))
        if not _same_bits(theirs.astype(decoded[name].dtype), decoded[name]):
            disagree.append(name)
    if disagree:
        findings.fail(f"coremltools' decoder disagrees with ours on {disagree}")
    else:
        findings.ok(f"coremltools' decoder agrees bit for bit on all {len(heads)} palettized weights")
    return not disagree
