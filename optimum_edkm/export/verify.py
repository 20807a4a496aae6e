"""Verify a saved Core ML package against the torch palettized model, from the files alone (works on Linux).

What it proves: the package is an ML program for the intended specification with the expected interface
(a fixed window, or the stateful generation step with its KV-cache states); every palettized weight is one
``constexpr_lut_to_dense`` op with ``uint{bits}`` indices feeding its ``linear``/``gather`` (both, for a tied
embedding), and no dense copy is left; the stored indices, LUTs and scales, decoded here independently of
coremltools, equal the torch modules' bit for bit, and so do the dense weights (also cross-checked with
coremltools' own decoder); a torch model rebuilt from the package's weights gives the model's logits within fp16
tolerance; the stored sizes are n-bit sizes. What it cannot prove: that Core ML *executes* the program correctly
(that needs macOS: :mod:`optimum_edkm.export.predict`).

The verification is a pipeline: each step reads the package (and the model) and returns what the next step
needs; failed and passed checks are collected in one :class:`Findings`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..storage import model_size
from ..version import __version__
from .common import (
    INPUT_NAME,
    KEY_CACHE,
    MASK_NAME,
    METADATA_PREFIX,
    OUTPUT_NAME,
    VALUE_CACHE,
    WRAPPER_ATTRIBUTE,
    PaletteRecord,
    export_copy,
    manifest_path_for,
    palette_records,
    palettized_tensor_ids,
    reference_input_ids,
    storage_groups,
)
from .errors import VerificationError, import_coremltools
from .mil import INDEX_BITS, MilOp, MilPackage, PackageFormatError, unpack_bits
from .stateful import cache_geometry
from .targets import SPEC_VERSIONS, resolve_target

#: the quantization-config fields that decide how the weights are stored (training knobs may differ)
LAYOUT_FIELDS = (
    "quant_method",
    "bits",
    "granularity",
    "group_size",
    "enable_per_channel_scale",
    "embedding_bits",
    "lut_dtype",
    "palettized",
    "modules_to_not_convert",
)
FLOAT_DTYPES = {10, 11}  # MIL fp16, fp32
UINT8 = 31
#: the precision a Core ML package stores float tensors, LUTs and scales in
PACKAGE_FLOAT_BITS = 16
#: ``optimum_edkm.interface`` metadata: what the package computes
FIXED_WINDOW, GENERATE = "fixed_window", "generate"
# "lm_model_layers_0_mlp_up_proj_weight_1_cast_fp16" -> "model_layers_0_mlp_up_proj_weight"; torch.export adds
# "p_" (parameters) or "b_" (buffers)
_OP_NAME = re.compile(rf"^(?:[pb]_)?{WRAPPER_ATTRIBUTE}_(?P<key>.+?)(?:_\d+)?(?:_cast_fp16|_to_fp16|_to_fp32)?$")


def _flat_key(key: str) -> Optional[str]:
    match = _OP_NAME.match(key)
    return match.group("key") if match else None


@dataclass
class ModuleReport:
    """How one palettized module is stored in the package."""

    name: str
    kind: str  # "linear" or "embedding"
    bits: int
    groups: int
    per_channel_scale: bool
    weight_op: str = ""  # the op whose output the linear / gather consumes
    lut_op: str = ""
    scale_op: Optional[str] = None
    consumers: list = field(default_factory=list)
    indices_dtype: str = ""
    lut_shape: tuple = ()
    layout: str = ""
    index_bytes: int = 0
    lut_bytes: int = 0
    scale_bytes: int = 0
    equivalent_indices: int = 0  # indices that differ from ours but select an identical LUT value
    tied_to: tuple = ()  # modules reading the same stored weight (a palettized tied embedding)


@dataclass
class VerificationReport:
    path: str
    spec_version: int = 0
    target: str = ""
    interface: str = FIXED_WINDOW
    context_length: Optional[int] = None
    states: dict = field(default_factory=dict)  # name -> shape, for the generation package
    op_counts: dict = field(default_factory=dict)
    lut_ops: int = 0
    modules: list = field(default_factory=list)
    decoders_agree: Optional[bool] = None
    logits_max_abs_diff: Optional[float] = None
    logits_tolerance: Optional[float] = None
    weight_bin_bytes: int = 0
    blob_count: int = 0  # tensors stored in weight.bin (each costs a 64-byte record)
    index_bytes: int = 0
    nbit_index_bytes: int = 0
    palettized_payload_bytes: int = 0  # indices + LUTs + scales as stored in the package
    nbit_payload_bytes: int = 0  # the same in torch: packed indices + fp16 LUTs + fp16 scales
    float_bytes: int = 0  # model tensors stored densely (fp16)
    converter_bytes: int = 0  # constants the converter added (zero biases, rope tables, mask)
    nbit_reference_bytes: int = 0  # nbit payload + every other model tensor at fp16, ties once
    float_tensors_in_package: list = field(default_factory=list)
    float_tensors_not_stored: list = field(default_factory=list)
    tied_embedding: Optional[dict] = None
    manifest_checked: bool = False
    checks: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    #: the package or its manifest could not be read at all (its own CLI exit code: 3)
    malformed: bool = False

    def summary(self) -> str:
        interface = (
            f"stateful generation step, context {self.context_length}" if self.interface == GENERATE else "fixed window"
        )
        lines = [
            f"{self.path}: ML program spec {self.spec_version} ({self.target}, {interface}), {self.lut_ops} LUT "
            f"ops for {len(self.modules)} palettized modules",
            f"  weight.bin {self.weight_bin_bytes:,} B: palettized payload {self.palettized_payload_bytes:,} B "
            f"(n-bit {self.nbit_payload_bytes:,} B; indices {self.index_bytes:,} B), float tensors "
            f"{self.float_bytes:,} B, converter constants {self.converter_bytes:,} B; n-bit reference "
            f"{self.nbit_reference_bytes:,} B",
        ]
        if self.logits_max_abs_diff is not None:
            lines.append(
                f"  logits of the rebuilt torch model: max abs diff {self.logits_max_abs_diff:.3g} "
                f"(tolerance {self.logits_tolerance:.3g})"
            )
        lines += [f"  ok: {check}" for check in self.checks]
        lines += [f"  FAILED: {failure}" for failure in self.failures]
        return "\n".join(lines)


class Findings:
    """Passed and failed checks, in the order they were made; ``malformed`` once a file could not be read."""

    def __init__(self):
        self.checks, self.failures = [], []
        self.malformed = False

    def ok(self, message: str) -> None:
        self.checks.append(message)

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def unreadable(self, what: str, error: BaseException) -> None:
        self.malformed = True
        self.failures.append(f"malformed {what}: {type(error).__name__}: {error}")


#: what reading a damaged package or manifest raises
READ_ERRORS = (PackageFormatError, OSError, ValueError, KeyError, IndexError, struct.error)


# -------------------------------------------------------------------------------------------- interface
@dataclass
class Interface:
    """What the package's metadata and description say it computes."""

    target: str = ""
    kind: str = FIXED_WINDOW
    input_shape: Optional[tuple] = None  # (batch, tokens) for the logits check; None if unusable
    context_length: Optional[int] = None
    states: dict = field(default_factory=dict)


def check_metadata(package: MilPackage, model, target_name: Optional[str], findings: Findings) -> Interface:
    """Specification version of the target, and the ``optimum_edkm.*`` metadata against the model."""
    metadata = package.user_metadata()
    target_name = target_name or metadata.get(METADATA_PREFIX + "minimum_deployment_target")
    interface = Interface(kind=metadata.get(METADATA_PREFIX + "interface", FIXED_WINDOW))
    if target_name is None:
        findings.fail(
            f"the package has no {METADATA_PREFIX}minimum_deployment_target metadata and no target was "
            f"given: it was not written by optimum_edkm.export.to_coreml"
        )
        return interface
    target = resolve_target(target_name)
    interface.target = target.name
    if package.spec_version != SPEC_VERSIONS[target.name]:
        findings.fail(
            f"specification version {package.spec_version}, expected {SPEC_VERSIONS[target.name]} for {target.name}"
        )
    else:
        findings.ok(f"ML program, specification version {package.spec_version} ({target.name}, opset {package.opset})")

    required = ("version", "quantization_config", "model_config")
    missing = [key for key in required if METADATA_PREFIX + key not in metadata]
    if missing:
        findings.fail(f"metadata lacks {', '.join(METADATA_PREFIX + k for k in missing)}")
        return interface
    stored = json.loads(metadata[METADATA_PREFIX + "quantization_config"])
    expected = model.config.quantization_config.to_dict()
    differ = {
        key: (stored.get(key), expected.get(key)) for key in LAYOUT_FIELDS if stored.get(key) != expected.get(key)
    }
    if differ:
        findings.fail(f"metadata quantization_config differs from the model's (package, model): {differ}")
    else:
        findings.ok(
            f"metadata: quantization config matches, written by optimum-edkm "
            f"{metadata[METADATA_PREFIX + 'version']} (this is {__version__})"
        )
    stored_config = json.loads(metadata[METADATA_PREFIX + "model_config"])
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings"):
        ours = getattr(model.config, key, None)
        if key in stored_config and stored_config[key] != ours:
            findings.fail(f"metadata model_config.{key}={stored_config[key]!r}, the model has {ours!r}")
    if interface.kind == GENERATE:
        context = metadata.get(METADATA_PREFIX + "context_length", "")
        interface.context_length = int(context) if context.isdigit() else None
    return interface


def _description_shape(feature) -> tuple:
    array = feature.type.multiArrayType
    return tuple(int(s) for s in array.shape)


def _description_ranges(feature) -> list:
    """``[(lower, upper)]`` per dimension of a flexible input (upper -1: unbounded); fixed sizes as (s, s)."""
    array = feature.type.multiArrayType
    if array.WhichOneof("ShapeFlexibility") == "shapeRange":
        return [(int(r.lowerBound), int(r.upperBound)) for r in array.shapeRange.sizeRanges]
    return [(int(s), int(s)) for s in array.shape]


def check_fixed_window_io(package: MilPackage, model, interface: Interface, findings: Findings) -> Interface:
    """``input_ids`` int32 ``[batch, seq]`` -> ``logits [batch, seq, vocab]``; no state."""
    inputs = {i.name: i for i in package.spec.description.input}
    outputs = {o.name: o for o in package.spec.description.output}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        findings.fail(
            f"inputs {sorted(inputs)} / outputs {sorted(outputs)}; expected {INPUT_NAME!r} -> {OUTPUT_NAME!r}"
        )
        return interface
    input_shape = _description_shape(inputs[INPUT_NAME])
    out_shape = _description_shape(outputs[OUTPUT_NAME])
    vocab = model.config.vocab_size
    if len(input_shape) != 2 or out_shape != input_shape + (vocab,) or len(inputs) != 1:
        findings.fail(
            f"inputs {sorted(inputs)}, {INPUT_NAME}{list(input_shape)} -> output {OUTPUT_NAME}"
            f"{list(out_shape)}, expected one input [batch, seq] -> [batch, seq, {vocab}]"
        )
        return interface
    if package.spec.description.state:
        findings.fail(f"a fixed-window package has states {[s.name for s in package.spec.description.state]}")
    interface.input_shape = input_shape
    findings.ok(f"{INPUT_NAME} int32 {list(input_shape)} -> {OUTPUT_NAME} {list(out_shape)}")
    return interface


def check_generation_io(package: MilPackage, model, interface: Interface, findings: Findings) -> Interface:
    """``input_ids`` int32 ``[batch, 1..C]`` and ``causal_mask`` fp16 ``[batch, 1, 1..C, 1..C]`` -> ``logits
    [batch, 1, vocab]``, with the fp16 states ``key_cache`` / ``value_cache`` ``[layers, batch, kv_heads, C,
    head_dim]`` (C = context length)."""
    context = interface.context_length
    if context is None:
        findings.fail(f"a generation package without {METADATA_PREFIX}context_length metadata")
        return interface
    description = package.spec.description
    inputs = {i.name: i for i in description.input}
    outputs = {o.name: o for o in description.output}
    if set(inputs) != {INPUT_NAME, MASK_NAME} or OUTPUT_NAME not in outputs:
        findings.fail(
            f"inputs {sorted(inputs)} / outputs {sorted(outputs)}; expected {INPUT_NAME!r}, {MASK_NAME!r} -> "
            f"{OUTPUT_NAME!r}"
        )
        return interface
    ids_ranges, mask_ranges = _description_ranges(inputs[INPUT_NAME]), _description_ranges(inputs[MASK_NAME])
    batch = ids_ranges[0][0] if ids_ranges else 0
    flexible = (1, context)
    ids_ok = (
        ids_ranges == [(batch, batch), flexible]
        and inputs[INPUT_NAME].type.multiArrayType.dataType == inputs[INPUT_NAME].type.multiArrayType.INT32
    )
    mask_ok = (
        mask_ranges == [(batch, batch), (1, 1), flexible, flexible]
        and inputs[MASK_NAME].type.multiArrayType.dataType == inputs[MASK_NAME].type.multiArrayType.FLOAT16
    )
    out_shape = _description_shape(outputs[OUTPUT_NAME])
    vocab = model.config.vocab_size
    if not (ids_ok and mask_ok and out_shape == (batch, 1, vocab)):
        findings.fail(
            f"{INPUT_NAME} {ids_ranges}, {MASK_NAME} {mask_ranges} -> {OUTPUT_NAME} {list(out_shape)}; "
            f"expected int32 [{batch}, 1..{context}], fp16 [{batch}, 1, 1..{context}, 1..{context}] -> "
            f"[{batch}, 1, {vocab}]"
        )
        return interface
    findings.ok(
        f"{INPUT_NAME} int32 [{batch}, 1..{context}], {MASK_NAME} fp16 [{batch}, 1, 1..{context}, "
        f"1..{context}] -> {OUTPUT_NAME} [{batch}, 1, {vocab}]"
    )

    expected = cache_geometry(model).shape(batch, context)
    states = {}
    for state in description.state:
        array = state.type.stateType.arrayType
        states[state.name] = (tuple(int(s) for s in array.shape), array.dataType == array.FLOAT16)
    function_states = {name: value for name, value in package.inputs.items() if value.kind == "state"}
    good = (
        set(states) == {KEY_CACHE, VALUE_CACHE}
        and all(shape == expected and fp16 for shape, fp16 in states.values())
        and {name: (value.shape, value.dtype) for name, value in function_states.items()}
        == {name: (expected, "fp16") for name in (KEY_CACHE, VALUE_CACHE)}
    )
    interface.states = {name: list(shape) for name, (shape, _) in states.items()}
    if not good:
        findings.fail(
            f"states {states} (program: {function_states}); expected fp16 {KEY_CACHE} and {VALUE_CACHE} of "
            f"shape {list(expected)} [layers, batch, kv_heads, context, head_dim]"
        )
        return interface
    findings.ok(
        f"states {KEY_CACHE}, {VALUE_CACHE}: fp16 {list(expected)} [layers, batch, kv_heads, context, head_dim]"
    )
    interface.input_shape = (batch, min(context, 8))
    return interface


def check_state_updates(package: MilPackage, model, findings: Findings) -> None:
    """Each layer writes its new keys and values into the states once: ``2 * layers`` ``write_state`` ops, half
    on each state, each writing a ``slice_update`` of a value read from that same state."""
    layers = int(model.config.num_hidden_layers)
    writes = [op for op in package.ops if op.type == "write_state"]
    per_state = {KEY_CACHE: 0, VALUE_CACHE: 0}
    wrong = []
    for op in writes:
        state = (op.argument_names("input") or [""])[0]
        data = package.by_output.get((op.argument_names("data") or [""])[0])
        source = package.by_output.get((data.argument_names("x") or [""])[0]) if data is not None else None
        if (
            state not in per_state
            or data is None
            or data.type != "slice_update"
            or source is None
            or source.type != "read_state"
            or source.argument_names("input") != [state]
        ):
            wrong.append(op.name)
            continue
        per_state[state] += 1
    if wrong or per_state != {KEY_CACHE: layers, VALUE_CACHE: layers}:
        findings.fail(
            f"state writes {per_state} for {layers} layers (ops not writing a slice_update of their own "
            f"state: {wrong[:3]}); expected {layers} per state"
        )
    else:
        findings.ok(f"{len(writes)} write_state ops: one slice_update of {KEY_CACHE} and of {VALUE_CACHE} per layer")


# ------------------------------------------------------------------------------------------ LUT weights
@dataclass
class _Chain:
    head: MilOp  # consumed by a non-constexpr op
    ops: list  # head and its constexpr producers
    consumers: list  # [(op, param)]

    def of_type(self, op_type: str) -> list:
        return [op for op in self.ops if op.type == op_type]


def _weight_chains(package: MilPackage) -> list:
    chains = []
    for op in package.ops:
        if not op.type.startswith("constexpr_"):
            continue
        consumers = package.consumers.get(op.name, [])
        if consumers and all(c.type.startswith("constexpr_") for c, _ in consumers):
            continue
        members, pending = [], [op]
        while pending:
            member = pending.pop()
            members.append(member)
            for arguments in member.inputs.values():
                for argument in arguments:
                    if argument.WhichOneof("binding") == "name":
                        producer = package.by_output.get(argument.name)
                        if producer is not None and producer.type.startswith("constexpr_"):
                            pending.append(producer)
        chains.append(_Chain(op, members, consumers))
    return chains


def match_lut_ops(package: MilPackage, records: dict, findings: Findings) -> tuple:
    """``({module name: chain}, LUT op count)``: each stored weight (tied modules share one) must be exactly one
    ``constexpr_lut_to_dense`` chain, named after one of its modules."""
    groups = storage_groups(records)
    group_of = {name: tuple(members) for members in groups for name in members}
    chains = [c for c in _weight_chains(package) if c.of_type("constexpr_lut_to_dense")]
    lut_ops = sum(1 for op in package.ops if op.type == "constexpr_lut_to_dense")
    by_key = {name.replace(".", "_") + "_weight": name for name in records}
    found, unmatched = {}, []
    for chain in chains:
        owners = {group_of[by_key[key]] for key in (_flat_key(op.name) for op in chain.ops) if key in by_key}
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


@dataclass
class StoredPalette:
    """One palettized weight as a Core ML storage layout holds it (decoded with numpy)."""

    layout: str
    indices: np.ndarray  # [out, in] uint8
    lut_rows: np.ndarray  # [out, 2**bits]: the LUT each row uses
    lut_shape: tuple
    lut_bytes: int
    index_bytes: int
    indices_dtype: str
    scale: Optional[np.ndarray] = None
    scale_bytes: int = 0
    scale_op: Optional[str] = None


class LayoutError(ValueError):
    """The op's tensors do not have the shapes or types of the layout that should hold the module."""


def _rows_of(table: np.ndarray, rows: int) -> np.ndarray:
    """Per-row view of a LUT-like table (leading axis = blocks of consecutive rows)."""
    return table[np.arange(rows) // (rows // table.shape[0])]


def read_packed_stream_palette(
    package: MilPackage, lut_op: MilOp, chain: _Chain, record: PaletteRecord
) -> StoredPalette:
    """iOS16/17 op: one per-tensor 1-D LUT, the indices as a packed uint8 stream plus the dense shape."""
    rows, columns, bits = record.palette.out_channels, record.palette.in_channels, record.palette.bits
    indices_tensor, lut_tensor = package.param(lut_op, "indices"), package.param(lut_op, "lut")
    shape = tuple(int(s) for s in package.param(lut_op, "shape").array.reshape(-1))
    packed = math.ceil(rows * columns * bits / 8)
    if indices_tensor.mil_dtype != UINT8 or indices_tensor.array.shape != (packed,) or shape != (rows, columns):
        raise LayoutError(
            f"iOS16 indices {indices_tensor.dtype_name}{list(indices_tensor.array.shape)} shape "
            f"{list(shape)}, expected uint8[{packed}] for [{rows}, {columns}]"
        )
    if lut_tensor.array.shape != (2**bits,):
        raise LayoutError(f"LUT of shape {lut_tensor.array.shape}, expected ({2**bits},)")
    indices = unpack_bits(indices_tensor.array.astype(np.uint8), bits, rows * columns).reshape(rows, columns)
    return StoredPalette(
        layout="per-tensor LUT (iOS16 op: packed uint8 stream, 1-D LUT)",
        indices=indices,
        lut_rows=np.ascontiguousarray(np.broadcast_to(lut_tensor.array, (rows, 2**bits))),
        lut_shape=tuple(lut_tensor.array.shape),
        lut_bytes=lut_tensor.stored_bytes or lut_tensor.array.nbytes,
        index_bytes=packed,
        indices_dtype=indices_tensor.dtype_name,
    )


def _typed_indices(package: MilPackage, lut_op: MilOp, record: PaletteRecord):
    tensor = package.param(lut_op, "indices")
    palette = record.palette
    if INDEX_BITS.get(tensor.mil_dtype) != palette.bits or tensor.array.shape != palette.shape:
        raise LayoutError(
            f"indices {tensor.dtype_name}{list(tensor.array.shape)}, expected uint{palette.bits}{list(palette.shape)}"
        )
    return tensor


def _lut_table(lut_tensor, record: PaletteRecord) -> np.ndarray:
    table = lut_tensor.array
    palette = record.palette
    if table.ndim != 4 or table.shape[1:] != (1, palette.entries, 1) or palette.out_channels % table.shape[0]:
        raise LayoutError(f"LUT of shape {table.shape}, expected (groups, 1, {palette.entries}, 1)")
    return table


def _scale_of(scale_tensor, shape: tuple) -> np.ndarray:
    if scale_tensor.array.shape != shape:
        raise LayoutError(f"scale of shape {scale_tensor.array.shape}, expected {shape}")
    return scale_tensor.array.reshape(-1)


def _grouped(package, lut_op, chain, record, lut_tensor, layout, **scaled) -> StoredPalette:
    indices = _typed_indices(package, lut_op, record)
    table = _lut_table(lut_tensor, record)
    return StoredPalette(
        layout=layout,
        indices=indices.array,
        lut_rows=_rows_of(table[:, 0, :, 0], record.palette.out_channels),
        lut_shape=tuple(table.shape),
        lut_bytes=lut_tensor.stored_bytes or lut_tensor.array.nbytes,
        index_bytes=record.palette.storage().index_bytes,
        indices_dtype=indices.dtype_name,
        **scaled,
    )


def read_grouped_palette(package: MilPackage, lut_op: MilOp, chain: _Chain, record: PaletteRecord) -> StoredPalette:
    """iOS18 op without scale: ``uint{bits}`` indices ``[out, in]``, LUTs ``(groups, 1, 2**bits, 1)``."""
    lut_tensor = package.param(lut_op, "lut")
    layout = "per-tensor LUT" if lut_tensor.array.shape[:1] == (1,) else "grouped LUT"
    return _grouped(package, lut_op, chain, record, lut_tensor, layout)


def read_row_scaled_palette(package: MilPackage, lut_op: MilOp, chain: _Chain, record: PaletteRecord) -> StoredPalette:
    """iOS18 with a per-channel scale: the converter folds the scale into a LUT tiled per output row,
    ``constexpr_blockwise_shift_scale(data = LUT per row, scale) -> constexpr_lut_to_dense``."""
    producer = package.producer(lut_op, "lut")
    scale_tensor = package.param(producer, "scale")
    return _grouped(
        package,
        lut_op,
        chain,
        record,
        package.param(producer, "data"),
        "per-row LUT, per-channel scale folded into it (shift_scale -> lut_to_dense)",
        scale=_scale_of(scale_tensor, (record.palette.out_channels, 1, 1, 1)),
        scale_bytes=scale_tensor.stored_bytes or scale_tensor.array.nbytes,
        scale_op=producer.name,
    )


def read_lut_then_scale_palette(
    package: MilPackage, lut_op: MilOp, chain: _Chain, record: PaletteRecord
) -> StoredPalette:
    """iOS26 with a per-channel scale: ``constexpr_lut_to_dense -> constexpr_blockwise_shift_scale``."""
    lut_tensor = package.param(lut_op, "lut")
    scale_tensor = package.param(chain.head, "scale")
    layout = (
        "per-tensor LUT" if lut_tensor.array.shape[:1] == (1,) else "grouped LUT"
    ) + ", then per-channel scale (lut_to_dense -> shift_scale)"
    return _grouped(
        package,
        lut_op,
        chain,
        record,
        lut_tensor,
        layout,
        scale=_scale_of(scale_tensor, (record.palette.out_channels, 1)),
        scale_bytes=scale_tensor.stored_bytes or scale_tensor.array.nbytes,
        scale_op=chain.head.name,
    )


def read_palette(package: MilPackage, chain: _Chain, record: PaletteRecord) -> StoredPalette:
    """Pick the reader of the chain's storage layout."""
    lut_op = chain.of_type("constexpr_lut_to_dense")[0]
    if package.has_param(lut_op, "shape"):
        reader = read_packed_stream_palette
    elif (package.producer(lut_op, "lut") or lut_op).type == "constexpr_blockwise_shift_scale":
        reader = read_row_scaled_palette
    elif chain.head.type == "constexpr_blockwise_shift_scale":
        reader = read_lut_then_scale_palette
    else:
        reader = read_grouped_palette
    return reader(package, lut_op, chain, record)


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


def _expected_consumers(records: dict, name: str) -> list:
    return sorted({records[member].consumer for member in (name, *records[name].tied_to)})


def check_module(package: MilPackage, records: dict, name: str, chain: _Chain, findings: Findings) -> tuple:
    """``(ModuleReport, decoded dense weight or None)``: the stored indices, LUT, scale and dense weight of one
    palettized module against the torch module, bit for bit."""
    record = records[name]
    entry = ModuleReport(
        name=name,
        kind=record.kind,
        bits=record.palette.bits,
        groups=record.palette.groups,
        per_channel_scale=record.palette.scale is not None,
        tied_to=record.tied_to,
    )
    lut_op = chain.of_type("constexpr_lut_to_dense")[0]
    entry.weight_op, entry.lut_op = chain.head.name, lut_op.name
    entry.consumers = sorted({f"{op.type}.{param}" for op, param in chain.consumers})
    expected_consumers = _expected_consumers(records, name)
    if entry.consumers != expected_consumers:
        findings.fail(f"'{name}': weight feeds {entry.consumers}, expected {expected_consumers}")
    decompression = ("constexpr_lut_to_dense", "constexpr_blockwise_shift_scale")
    extra = [op.type for op in chain.ops if op.type not in decompression]
    if extra or len(chain.ops) > 2:
        findings.fail(f"'{name}': unexpected decompression chain {[op.type for op in chain.ops]}")
        return entry, None
    try:
        stored = read_palette(package, chain, record)
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
    torch_lut_rows = _rows_of(_torch_numpy(record.palette.lut), record.palette.out_channels)
    if not _same_bits(stored.lut_rows, torch_lut_rows):
        findings.fail(f"'{name}.weight_lut': the package's LUT differs from the torch LUT")
    if (stored.scale is None) != (record.palette.scale is None):
        findings.fail(
            f"'{name}.weight_scale': {'missing from' if stored.scale is None else 'unexpected in'} the package"
        )
    elif stored.scale is not None and not _same_bits(stored.scale, _torch_numpy(record.palette.scale)):
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


# ---------------------------------------------------------------------------------------- float tensors
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
        tensor_id = by_key.get(_flat_key(op.name) or "")
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
                    f"{', '.join(_expected_consumers(records, name))}"
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


# ----------------------------------------------------------------------------------------------- sizes
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


# ------------------------------------------------------------------------------------------ cross-check
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


# ----------------------------------------------------------------------------------------------- logits
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


# --------------------------------------------------------------------------------------------- manifest
def check_manifest(package: MilPackage, manifest_path: str, records: dict, modules: list, findings: Findings) -> bool:
    """The manifest's modules, tensor sha256 and op names must match the model and the package."""
    from .manifest import FORMAT, FORMAT_VERSION, record_tensors, sha256_file

    with open(manifest_path) as handle:
        document = json.load(handle)
    if document.get("format") != FORMAT or document.get("format_version") != FORMAT_VERSION:
        findings.fail(
            f"{manifest_path}: format {document.get('format')!r} v{document.get('format_version')}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION}"
        )
        return False
    before = len(findings.failures)
    entries = {entry["name"]: entry for entry in document.get("modules", [])}
    if set(entries) != set(records):
        findings.fail(f"manifest lists {sorted(set(entries) ^ set(records))} differently from the model")
    ops = {m.name: m for m in modules}
    for name, record in records.items():
        entry = entries.get(name)
        if entry is None:
            continue
        if entry.get("bits") != record.palette.bits or entry.get("lut_shape") != list(record.palette.lut.shape):
            findings.fail(f"manifest: '{name}' bits/lut_shape {entry.get('bits')}/{entry.get('lut_shape')}")
        for role, description in record_tensors(record).items():
            if entry.get("tensors", {}).get(role, {}).get("sha256") != description["sha256"]:
                findings.fail(f"manifest: sha256 of '{description['name']}' does not match the model")
        coreml = entry.get("coreml", {})
        if name in ops and coreml.get("lut_op") != ops[name].lut_op:
            findings.fail(f"manifest: '{name}' LUT op {coreml.get('lut_op')!r}, the package has {ops[name].lut_op!r}")
    for relative, description in document.get("coreml", {}).get("weight_files", {}).items():
        file_path = os.path.join(package.model_dir, relative)
        if not os.path.isfile(file_path) or sha256_file(file_path) != description.get("sha256"):
            findings.fail(f"manifest: sha256 of {relative} does not match the package")
    if len(findings.failures) == before:
        findings.ok(f"manifest {os.path.basename(manifest_path)}: modules, tensor sha256 and op names match")
    return True


# ------------------------------------------------------------------------------------------------ entry
def verify_coreml(
    path: str,
    model,
    *,
    minimum_deployment_target=None,
    manifest="auto",
    check_logits: bool = True,
    logits_rtol: float = 1e-2,
    cross_check: bool = True,
    raise_on_failure: bool = True,
) -> VerificationReport:
    """Check the package at ``path`` against the palettized torch ``model`` (see the module docstring).

    Args:
        minimum_deployment_target: expected target; default: the one recorded in the package's metadata.
        manifest: path of the manifest to check too; ``"auto"``: ``<stem>.manifest.json`` if it exists;
            ``None``: skip.
        check_logits: rebuild a torch model from the package's weights and compare its logits with ``model``'s
            (tolerance ``logits_rtol * max(1, max |logits|)``).
        cross_check: also decode the LUT weights with coremltools' own loader and compare with ours.
        raise_on_failure: raise :class:`VerificationError` listing every failed check (else only report it).
    """
    import_coremltools()
    report = VerificationReport(path=os.fspath(path))
    findings = Findings()
    try:
        package = MilPackage(report.path)
    except READ_ERRORS as error:
        findings.unreadable("package", error)
        return _finish(report, findings, raise_on_failure, error)
    report.op_counts = package.op_counts()
    records = palette_records(model)
    if not records:
        findings.fail(
            "the torch model has no palettized module to compare with: pass the model after "
            "optimum_edkm.palettize (or loaded from the saved palettized checkpoint)"
        )
        return _finish(report, findings, raise_on_failure)
    report.spec_version = package.spec_version
    interface = check_metadata(
        package, model, getattr(minimum_deployment_target, "name", minimum_deployment_target), findings
    )
    report.target, report.interface, report.context_length = interface.target, interface.kind, interface.context_length
    if interface.kind == GENERATE:
        interface = check_generation_io(package, model, interface, findings)
        check_state_updates(package, model, findings)
        report.states = interface.states
    else:
        interface = check_fixed_window_io(package, model, interface, findings)
    chains, report.lut_ops = match_lut_ops(package, records, findings)
    decoded = {}
    try:
        for name, chain in chains.items():
            entry, dense = check_module(package, records, name, chain, findings)
            report.modules.append(entry)
            if dense is not None:
                decoded[name] = dense
        floats = check_float_tensors(package, model, records, chains, findings)
        sizes = measure_sizes(package, model, records, report.modules, findings)
        if cross_check and decoded:
            report.decoders_agree = cross_check_decoders(package, chains, decoded, findings)
    except READ_ERRORS as error:
        findings.unreadable("package", error)
        return _finish(report, findings, raise_on_failure, error)
    _fill_sizes(report, sizes, floats)
    if not findings.failures and chains:
        widths = "/".join(f"uint{b}" for b in sorted({m.bits for m in report.modules}))
        findings.ok(
            f"indices ({widths}), LUTs, scales and dense weights of {len(report.modules)} modules equal the "
            f"torch model bit for bit ({sum(m.equivalent_indices for m in report.modules)} indices select an "
            f"identical duplicate LUT value)"
        )
    if check_logits and not findings.failures and interface.input_shape is not None:
        report.logits_max_abs_diff, report.logits_tolerance = compare_logits(
            model, records, decoded, floats, interface.input_shape, logits_rtol, findings
        )
    manifest_path = manifest_path_for(report.path) if manifest == "auto" else manifest
    if manifest_path is not None and (manifest != "auto" or os.path.exists(manifest_path)):
        try:
            report.manifest_checked = check_manifest(
                package, os.fspath(manifest_path), records, report.modules, findings
            )
        except READ_ERRORS as error:
            findings.unreadable(f"manifest {manifest_path}", error)
    return _finish(report, findings, raise_on_failure)


def _fill_sizes(report: VerificationReport, sizes: Sizes, floats: FloatTensors) -> None:
    report.weight_bin_bytes, report.blob_count = sizes.weight_bin_bytes, sizes.blob_count
    report.index_bytes, report.nbit_index_bytes = sizes.index_bytes, sizes.nbit_index_bytes
    report.palettized_payload_bytes = sizes.palettized_payload_bytes
    report.nbit_payload_bytes = sizes.nbit_payload_bytes
    report.nbit_reference_bytes = sizes.nbit_reference_bytes
    report.float_bytes, report.converter_bytes = floats.float_bytes, floats.converter_bytes
    report.float_tensors_in_package, report.float_tensors_not_stored = floats.in_package, floats.not_stored
    report.tied_embedding = floats.tied_embedding


def _finish(report: VerificationReport, findings: Findings, raise_on_failure: bool, cause=None) -> VerificationReport:
    report.checks, report.failures, report.malformed = findings.checks, findings.failures, findings.malformed
    if report.failures and raise_on_failure:
        raise VerificationError(report.path, report.failures, malformed=findings.malformed) from cause
    return report
