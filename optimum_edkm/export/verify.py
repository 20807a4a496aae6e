"""Verify a saved Core ML package against the torch palettized model, from the files alone (works on Linux).

What it proves: the package is an ML program for the intended specification; every palettized module is one
``constexpr_lut_to_dense`` op with ``uint{bits}`` indices feeding a ``linear``/``gather``, and no dense copy is
left; the stored indices, LUTs and scales, decoded here independently of coremltools, equal the torch modules'
bit for bit, and so do the dense weights (also cross-checked with coremltools' own decoder); a torch model
rebuilt from the package's weights gives the model's logits within fp16 tolerance; the stored sizes are n-bit
sizes. What it cannot prove: that Core ML *executes* the program correctly (that needs macOS:
:func:`predict_logits`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..nn import PalettizedEmbedding
from .coreml import (INPUT_NAME, METADATA_PREFIX, OUTPUT_NAME, WRAPPER_ATTRIBUTE, export_copy, manifest_path_for,
                     palettized_modules, reference_input_ids)
from .errors import VerificationError, import_coremltools
from .mil import INDEX_BITS, MilPackage, PackageFormatError, unpack_bits
from .targets import SPEC_VERSIONS, resolve_target

#: the quantization-config fields that decide how the weights are stored (training knobs may differ)
LAYOUT_FIELDS = ("quant_method", "bits", "granularity", "group_size", "enable_per_channel_scale", "embedding_bits",
                 "lut_dtype", "palettized", "modules_to_not_convert")
FLOAT_DTYPES = {10, 11}                 # MIL fp16, fp32
UINT8 = 31
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
    kind: str                       # "linear" or "embedding"
    bits: int
    groups: int
    per_channel_scale: bool
    weight_op: str = ""             # the op whose output the linear / gather consumes
    lut_op: str = ""
    scale_op: Optional[str] = None
    consumers: list = field(default_factory=list)
    indices_dtype: str = ""
    lut_shape: tuple = ()
    layout: str = ""
    index_bytes: int = 0
    lut_bytes: int = 0
    scale_bytes: int = 0
    equivalent_indices: int = 0     # indices that differ from ours but select an identical LUT value


@dataclass
class VerificationReport:
    path: str
    spec_version: int = 0
    target: str = ""
    op_counts: dict = field(default_factory=dict)
    lut_ops: int = 0
    modules: list = field(default_factory=list)
    decoders_agree: Optional[bool] = None
    logits_max_abs_diff: Optional[float] = None
    logits_tolerance: Optional[float] = None
    weight_bin_bytes: int = 0
    blob_count: int = 0                        # tensors stored in weight.bin (each costs a 64-byte record)
    index_bytes: int = 0
    nbit_index_bytes: int = 0
    palettized_payload_bytes: int = 0          # indices + LUTs + scales as stored in the package
    nbit_payload_bytes: int = 0                # the same in torch: packed indices + fp16 LUTs + fp16 scales
    float_bytes: int = 0                       # model tensors stored densely (fp16)
    converter_bytes: int = 0                   # constants the converter added (zero biases, rope tables, mask)
    nbit_reference_bytes: int = 0              # nbit payload + every other model tensor at fp16, ties once
    float_tensors_in_package: list = field(default_factory=list)
    float_tensors_not_stored: list = field(default_factory=list)
    tied_embedding: Optional[dict] = None
    manifest_checked: bool = False
    checks: list = field(default_factory=list)
    failures: list = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.path}: ML program spec {self.spec_version} ({self.target}), {self.lut_ops} LUT ops for "
                 f"{len(self.modules)} palettized modules",
                 f"  weight.bin {self.weight_bin_bytes:,} B: palettized payload {self.palettized_payload_bytes:,} B "
                 f"(n-bit {self.nbit_payload_bytes:,} B; indices {self.index_bytes:,} B), float tensors "
                 f"{self.float_bytes:,} B, converter constants {self.converter_bytes:,} B; n-bit reference "
                 f"{self.nbit_reference_bytes:,} B"]
        if self.logits_max_abs_diff is not None:
            lines.append(f"  logits of the rebuilt torch model: max abs diff {self.logits_max_abs_diff:.3g} "
                         f"(tolerance {self.logits_tolerance:.3g})")
        lines += [f"  ok: {check}" for check in self.checks]
        lines += [f"  FAILED: {failure}" for failure in self.failures]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- chains
@dataclass
class _Chain:
    head: object                    # MilOp consumed by a non-constexpr op
    ops: list                       # head and its constexpr producers
    consumers: list                 # [(op, param)]

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


def _rows_of(table: np.ndarray, rows: int) -> np.ndarray:
    """Per-row view of a LUT-like table (leading axis = blocks of consecutive rows)."""
    return table[np.arange(rows) // (rows // table.shape[0])]


class _Verifier:
    def __init__(self, path: str, model, report: VerificationReport):
        self.path, self.model, self.report = path, model, report
        self.modules = palettized_modules(model)

    def fail(self, message: str) -> None:
        self.report.failures.append(message)

    def ok(self, message: str) -> None:
        self.report.checks.append(message)

    # ------------------------------------------------------------------------------------- structure
    def check_spec(self, package: MilPackage, target_name: Optional[str]) -> None:
        metadata = package.user_metadata()
        stored_target = metadata.get(METADATA_PREFIX + "minimum_deployment_target")
        target_name = target_name or stored_target
        report = self.report
        report.spec_version = package.spec_version
        if target_name is None:
            self.fail(f"the package has no {METADATA_PREFIX}minimum_deployment_target metadata and no target was "
                      f"given: it was not written by optimum_edkm.export.to_coreml")
            return
        target = resolve_target(target_name)
        report.target = target.name
        if package.spec_version != SPEC_VERSIONS[target.name]:
            self.fail(f"specification version {package.spec_version}, expected {SPEC_VERSIONS[target.name]} for "
                      f"{target.name}")
        else:
            self.ok(f"ML program, specification version {package.spec_version} ({target.name}, opset "
                    f"{package.opset})")

        from .. import __version__

        missing = [key for key in ("version", "quantization_config", "model_config", "seq_len")
                   if METADATA_PREFIX + key not in metadata]
        if missing:
            self.fail(f"metadata lacks {', '.join(METADATA_PREFIX + k for k in missing)}")
        else:
            stored = json.loads(metadata[METADATA_PREFIX + "quantization_config"])
            expected = self.model.config.quantization_config.to_dict()
            differ = {key: (stored.get(key), expected.get(key)) for key in LAYOUT_FIELDS
                      if stored.get(key) != expected.get(key)}
            if differ:
                self.fail(f"metadata quantization_config differs from the model's (package, model): {differ}")
            else:
                self.ok(f"metadata: quantization config matches, written by optimum-edkm "
                        f"{metadata[METADATA_PREFIX + 'version']} (this is {__version__})")
            stored_config = json.loads(metadata[METADATA_PREFIX + "model_config"])
            for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings"):
                ours = getattr(self.model.config, key, None)
                if key in stored_config and stored_config[key] != ours:
                    self.fail(f"metadata model_config.{key}={stored_config[key]!r}, the model has {ours!r}")

        inputs = {i.name: i for i in package.spec.description.input}
        outputs = {o.name: o for o in package.spec.description.output}
        self.input_shape = None
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            self.fail(f"inputs {sorted(inputs)} / outputs {sorted(outputs)}; expected {INPUT_NAME!r} -> "
                      f"{OUTPUT_NAME!r}")
            return
        array = inputs[INPUT_NAME].type.multiArrayType
        self.input_shape = tuple(int(s) for s in array.shape)
        out_shape = tuple(int(s) for s in outputs[OUTPUT_NAME].type.multiArrayType.shape)
        vocab = self.model.config.vocab_size
        if len(self.input_shape) != 2 or out_shape != self.input_shape + (vocab,):
            self.fail(f"input {INPUT_NAME}{list(self.input_shape)} -> output {OUTPUT_NAME}{list(out_shape)}, "
                      f"expected [batch, seq] -> [batch, seq, {vocab}]")
        else:
            self.ok(f"{INPUT_NAME} int32 {list(self.input_shape)} -> {OUTPUT_NAME} {list(out_shape)}")

    # ------------------------------------------------------------------------------------ LUT weights
    def map_chains(self, package: MilPackage) -> dict:
        chains = [c for c in _weight_chains(package) if c.of_type("constexpr_lut_to_dense")]
        self.report.lut_ops = sum(1 for op in package.ops if op.type == "constexpr_lut_to_dense")
        by_key = {name.replace(".", "_") + "_weight": name for name in self.modules}
        found, unmatched = {}, []
        for chain in chains:
            names = {by_key.get(_flat_key(op.name)) for op in chain.ops} - {None}
            if len(names) != 1:
                unmatched.append((chain.head.name, sorted(names)))
                continue
            name = names.pop()
            if name in found:
                self.fail(f"'{name}' is stored by two LUT ops: {found[name].head.name} and {chain.head.name}")
            found[name] = chain
        for head, names in unmatched:
            self.fail(f"LUT op {head!r} matches {'no' if not names else 'several'} palettized module(s) {names}")
        missing = [name for name in self.modules if name not in found]
        if missing:
            self.fail(f"{len(missing)} palettized module(s) have no LUT op (stored dense or dropped): "
                      f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if self.report.lut_ops == len(self.modules) and not missing and not unmatched:
            self.ok(f"{self.report.lut_ops} constexpr_lut_to_dense ops = {len(self.modules)} palettized modules")
        elif self.report.lut_ops != len(self.modules):
            self.fail(f"{self.report.lut_ops} constexpr_lut_to_dense ops for {len(self.modules)} palettized modules")
        return found

    def check_module(self, package: MilPackage, name: str, module, chain: _Chain) -> ModuleReport:
        rows, columns, bits = module.out_channels, module.in_channels, module.bits
        groups = module.weight_lut.shape[0]
        entry = ModuleReport(name=name, kind="embedding" if isinstance(module, PalettizedEmbedding) else "linear",
                             bits=bits, groups=groups, per_channel_scale=module.weight_scale is not None)
        self.report.modules.append(entry)
        lut_op = chain.of_type("constexpr_lut_to_dense")[0]
        entry.weight_op, entry.lut_op = chain.head.name, lut_op.name
        entry.consumers = sorted({f"{op.type}.{param}" for op, param in chain.consumers})
        expected_consumer = "gather.x" if entry.kind == "embedding" else "linear.weight"
        if entry.consumers != [expected_consumer]:
            self.fail(f"'{name}': weight feeds {entry.consumers}, expected [{expected_consumer}]")
        extra = [op.type for op in chain.ops if op.type not in ("constexpr_lut_to_dense",
                                                                "constexpr_blockwise_shift_scale")]
        if extra or len(chain.ops) > 2:
            self.fail(f"'{name}': unexpected decompression chain {[op.type for op in chain.ops]}")
            return entry

        torch_indices = _torch_numpy(module.indices())
        torch_lut = _torch_numpy(module.weight_lut)
        torch_scale = None if module.weight_scale is None else _torch_numpy(module.weight_scale)
        indices_tensor = package.param(lut_op, "indices")
        entry.indices_dtype = indices_tensor.dtype_name
        scale_tensor = None
        if package.has_param(lut_op, "shape"):                       # iOS16/17 form
            lut_tensor = package.param(lut_op, "lut")
            shape = tuple(int(s) for s in package.param(lut_op, "shape").array.reshape(-1))
            entry.layout = "per-tensor LUT (iOS16 op: packed uint8 stream, 1-D LUT)"
            packed = math.ceil(rows * columns * bits / 8)
            if indices_tensor.mil_dtype != UINT8 or indices_tensor.array.shape != (packed,) or shape != (rows, columns):
                self.fail(f"'{name}': iOS16 indices {indices_tensor.dtype_name}{list(indices_tensor.array.shape)} "
                          f"shape {list(shape)}, expected uint8[{packed}] for [{rows}, {columns}]")
                return entry
            if lut_tensor.array.shape != (2 ** bits,):
                self.fail(f"'{name}': LUT of shape {lut_tensor.array.shape}, expected ({2 ** bits},)")
                return entry
            indices = unpack_bits(indices_tensor.array.astype(np.uint8), bits, rows * columns).reshape(rows, columns)
            row_luts = np.broadcast_to(lut_tensor.array, (rows, 2 ** bits))
            lut_rows_ok = _same_bits(np.ascontiguousarray(row_luts), _rows_of(torch_lut, rows))
            entry.lut_shape = tuple(lut_tensor.array.shape)
            entry.index_bytes = packed
        else:
            if INDEX_BITS.get(indices_tensor.mil_dtype) != bits or indices_tensor.array.shape != (rows, columns):
                self.fail(f"'{name}': indices {indices_tensor.dtype_name}{list(indices_tensor.array.shape)}, "
                          f"expected uint{bits}[{rows}, {columns}]")
                return entry
            indices = indices_tensor.array
            entry.index_bytes = math.ceil(rows * columns * bits / 8)
            lut_producer = package.producer(lut_op, "lut")
            if lut_producer is not None and lut_producer.type == "constexpr_blockwise_shift_scale":
                # iOS18: the converter folds the per-channel scale into a LUT tiled per output row
                lut_tensor, scale_tensor = package.param(lut_producer, "data"), package.param(lut_producer, "scale")
                entry.scale_op = lut_producer.name
                entry.layout = "per-row LUT, per-channel scale folded into it (shift_scale -> lut_to_dense)"
                scale_shape = (rows, 1, 1, 1)
            else:
                lut_tensor = package.param(lut_op, "lut")
                entry.layout = "per-tensor LUT" if lut_tensor.array.shape[0] == 1 else "grouped LUT"
                if chain.head.type == "constexpr_blockwise_shift_scale":     # iOS26 order: scale after the LUT
                    scale_tensor = package.param(chain.head, "scale")
                    entry.scale_op = chain.head.name
                    entry.layout += ", then per-channel scale (lut_to_dense -> shift_scale)"
                    scale_shape = (rows, 1)
            table = lut_tensor.array
            if table.ndim != 4 or table.shape[1:] != (1, 2 ** bits, 1) or rows % table.shape[0]:
                self.fail(f"'{name}': LUT of shape {table.shape}, expected (groups, 1, {2 ** bits}, 1)")
                return entry
            lut_rows_ok = _same_bits(_rows_of(table[:, 0, :, 0], rows), _rows_of(torch_lut, rows))
            entry.lut_shape = tuple(table.shape)
            if scale_tensor is not None and scale_tensor.array.shape != scale_shape:
                self.fail(f"'{name}': scale of shape {scale_tensor.array.shape}, expected {scale_shape}")
                return entry
        entry.lut_bytes = lut_tensor.stored_bytes or lut_tensor.array.nbytes
        if not lut_rows_ok:
            self.fail(f"'{name}.weight_lut': the package's LUT differs from the torch LUT")
        if (scale_tensor is None) != (torch_scale is None):
            self.fail(f"'{name}.weight_scale': {'missing from' if scale_tensor is None else 'unexpected in'} the "
                      f"package")
        elif scale_tensor is not None:
            entry.scale_bytes = scale_tensor.stored_bytes or scale_tensor.array.nbytes
            if not _same_bits(scale_tensor.array.reshape(-1), torch_scale):
                self.fail(f"'{name}.weight_scale': the package's per-channel scale differs from the torch scale")

        dense = package.evaluate(chain.head.name).array
        expected = _torch_numpy(module.dense_weight(torch.float16))
        if dense.shape != expected.shape:
            self.fail(f"'{name}.weight': decodes to shape {dense.shape}, expected {expected.shape}")
            return entry
        same_value = dense.astype(np.float32) == expected.astype(np.float32)
        if not same_value.all():
            row, column = (int(i) for i in np.argwhere(~same_value)[0])
            self.fail(f"'{name}.weight': {int((~same_value).sum())} of {same_value.size} decoded weights differ from "
                      f"the torch palettized weight (first at [{row}, {column}]: package {float(dense[row, column])!r}"
                      f" vs torch {float(expected[row, column])!r}, index {int(indices[row, column])} vs "
                      f"{int(torch_indices[row, column])}): the converter re-approximated it")
        other_index = indices != torch_indices
        entry.equivalent_indices = int((other_index & same_value).sum())
        if dense.dtype == np.float16 and not np.array_equal(dense.view(np.uint16)[~other_index],
                                                            expected.view(np.uint16)[~other_index]):
            self.fail(f"'{name}.weight': equal indices decode to different bits")
        self.decoded[name] = dense
        return entry

    # --------------------------------------------------------------------------------- float tensors
    def check_float_tensors(self, package: MilPackage, chains: dict) -> None:
        report = self.report
        palettized_tensors = {id(t) for m in self.modules.values()
                              for t in (m.weight, m.weight_lut, m.weight_scale) if t is not None}
        groups = {}
        for key, tensor in self.model.state_dict(keep_vars=True).items():
            if id(tensor) not in palettized_tensors and tensor.is_floating_point():
                groups.setdefault(id(tensor), (tensor, []))[1].append(key)
        by_key = {key.replace(".", "_"): tensor_id for tensor_id, (_, keys) in groups.items() for key in keys}
        chain_ops = {op.name for chain in chains.values() for op in chain.ops}
        palettized_shapes = {(m.out_channels, m.in_channels) for m in self.modules.values()}
        stored, converter_bytes = {}, 0
        for op in package.ops:
            if op.type != "const" or op.output_dtype not in FLOAT_DTYPES or op.name in chain_ops:
                continue
            tensor = package.evaluate(op.name)
            tensor_id = by_key.get(_flat_key(op.name) or "")
            if tensor_id is None:
                converter_bytes += tensor.stored_bytes
                if tensor.array.ndim == 2 and tensor.array.shape in palettized_shapes and tensor.array.size >= 256:
                    self.fail(f"dense float constant {op.name!r} {tensor.array.shape} has the shape of a palettized "
                              f"weight and maps to no float tensor of the model: a dense copy?")
                continue
            stored.setdefault(tensor_id, []).append((op.name, tensor))
        report.converter_bytes = converter_bytes
        self.floats = {}
        for tensor_id, entries in stored.items():
            torch_tensor, keys = groups[tensor_id]
            if len(entries) > 1:
                self.fail(f"{' / '.join(keys)} is stored {len(entries)} times: {[e[0] for e in entries]}")
            op_name, tensor = entries[0]
            values = tensor.array.astype(np.float32).reshape(tuple(torch_tensor.shape))
            if not np.array_equal(values, torch_tensor.detach().float().half().float().numpy()):
                self.fail(f"{keys[0]}: the package's {op_name!r} is not the fp16 rounding of the torch tensor")
            report.float_bytes += sum(t.stored_bytes for _, t in entries)
            self.floats[tensor_id] = values
            report.float_tensors_in_package.extend(keys)
        state = self.model.state_dict(keep_vars=True)
        report.float_tensors_not_stored = [keys[0] for tensor_id, (_, keys) in groups.items()
                                           if tensor_id not in stored and keys[0] in state]
        self.float_groups = groups

        output_embeddings = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        input_embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if output_embeddings is not None and input_embeddings is not None and \
                getattr(output_embeddings, "weight", None) is getattr(input_embeddings, "weight", None):
            tensor_id = id(input_embeddings.weight)
            count = len(stored.get(tensor_id, []))
            report.tied_embedding = {"keys": groups[tensor_id][1] if tensor_id in groups else [],
                                     "palettized": tensor_id in palettized_tensors, "stored": count}
            if tensor_id not in palettized_tensors and count == 1:
                self.ok(f"tied embedding stored once ({stored[tensor_id][0][0]}), used by gather and linear")
            elif tensor_id not in palettized_tensors:
                self.fail(f"tied embedding stored {count} times")

    # -------------------------------------------------------------------------------------------- logits
    @torch.no_grad()
    def check_logits(self, rtol: float) -> None:
        if self.input_shape is None:
            return
        # both in fp32, with the palettized weights decoded: the torch model's own, and the package's
        reference_model = export_copy(self.model, self.modules)
        rebuilt = export_copy(self.model, self.modules)
        group_of = {key: tensor_id for tensor_id, (_, keys) in self.float_groups.items() for key in keys}
        replacements = {tensor_id: torch.from_numpy(values) for tensor_id, values in self.floats.items()}
        for module_name, submodule in rebuilt.named_modules():
            for store in (submodule._parameters, submodule._buffers):
                for key, tensor in list(store.items()):
                    value = replacements.get(group_of.get(f"{module_name}.{key}" if module_name else key))
                    if tensor is not None and value is not None:
                        store[key] = nn.Parameter(value, requires_grad=False) if isinstance(tensor, nn.Parameter) \
                            else value
        for name in self.modules:
            rebuilt.get_submodule(name).weight = nn.Parameter(torch.from_numpy(self.decoded[name].astype(np.float32)),
                                                              requires_grad=False)
        batch, seq_len = self.input_shape
        ids = reference_input_ids(self.model.config.vocab_size, batch, seq_len, seed=1)
        reference = reference_model(input_ids=ids, use_cache=False).logits.float()
        logits = rebuilt(input_ids=ids, use_cache=False).logits.float()
        difference = float((logits - reference).abs().max())
        tolerance = rtol * max(1.0, float(reference.abs().max()))
        self.report.logits_max_abs_diff, self.report.logits_tolerance = difference, tolerance
        if difference <= tolerance:
            self.ok(f"logits of a torch model rebuilt from the package's weights: max abs diff {difference:.3g} "
                    f"<= {tolerance:.3g}")
        else:
            self.fail(f"logits of a torch model rebuilt from the package's weights differ by {difference:.3g} "
                      f"(> {tolerance:.3g})")

    # ------------------------------------------------------------------------------------- cross-check
    def cross_check_coremltools(self, package: MilPackage, chains: dict) -> None:
        """coremltools' own loader and decoders must give the same dense weights as ours."""
        from coremltools.converters.mil.frontend.milproto.load import load_mil_proto

        weights_dir = os.path.join(package.model_dir, "weights")
        program = load_mil_proto(package.spec.mlProgram, package.spec_version, weights_dir)
        ops = {op.outputs[0].name: op for op in program.functions["main"].operations}

        def materialize(op):
            if op.op_type == "constexpr_lut_to_dense" and op.lut.val is None:
                vector_axis = None if op.vector_axis is None else op.vector_axis.val
                return op.decompress(op.indices.val, materialize(op.lut.op), vector_axis)
            return op.materialized_val_inference()

        disagree = []
        for name, chain in chains.items():
            if name not in self.decoded:
                continue
            theirs = np.asarray(materialize(ops[chain.head.name]))
            if not _same_bits(theirs.astype(self.decoded[name].dtype), self.decoded[name]):
                disagree.append(name)
        self.report.decoders_agree = not disagree
        if disagree:
            self.fail(f"coremltools' decoder disagrees with ours on {disagree}")
        else:
            self.ok(f"coremltools' decoder agrees bit for bit on all {len(chains)} palettized weights")

    # ------------------------------------------------------------------------------------------- sizes
    def check_sizes(self, package: MilPackage) -> None:
        report = self.report
        report.weight_bin_bytes = sum(package.weight_files().values())
        report.blob_count = package.blob_count()
        report.index_bytes = sum(m.index_bytes for m in report.modules)
        report.nbit_index_bytes = sum(math.ceil(m.out_channels * m.in_channels * m.bits / 8)
                                      for m in self.modules.values())
        report.palettized_payload_bytes = sum(m.index_bytes + m.lut_bytes + m.scale_bytes for m in report.modules)
        fp16 = 2
        report.nbit_payload_bytes = report.nbit_index_bytes + sum(
            m.weight_lut.numel() * fp16 + (m.out_channels * fp16 if m.weight_scale is not None else 0)
            for m in self.modules.values())
        state = self.model.state_dict(keep_vars=True)
        persistent = {id(t) for t in state.values()}
        report.nbit_reference_bytes = report.nbit_payload_bytes + sum(
            tensor.numel() * fp16 for tensor_id, (tensor, _) in self.float_groups.items() if tensor_id in persistent)
        if report.index_bytes != report.nbit_index_bytes:
            self.fail(f"indices take {report.index_bytes} B, {report.nbit_index_bytes} B at n bits")
        folded = sum((m.out_channels - m.weight_lut.shape[0]) * m.weight_lut.shape[1] * fp16
                     for name, m in self.modules.items()
                     if any(r.name == name and r.layout.startswith("per-row") for r in report.modules))
        if report.palettized_payload_bytes > report.nbit_payload_bytes + folded:
            self.fail(f"palettized weights take {report.palettized_payload_bytes} B in the package, more than their "
                      f"n-bit size {report.nbit_payload_bytes} B (+{folded} B of per-row LUTs)")
        else:
            self.ok(f"palettized weights stored at n bits: {report.palettized_payload_bytes:,} B "
                    f"(n-bit {report.nbit_payload_bytes:,} B{f' + {folded:,} B per-row LUTs' if folded else ''})")

    # ------------------------------------------------------------------------------------------ manifest
    def check_manifest(self, package: MilPackage, manifest_path: str) -> None:
        from .manifest import FORMAT, FORMAT_VERSION, module_entry_tensors, sha256_file

        with open(manifest_path) as handle:
            document = json.load(handle)
        if document.get("format") != FORMAT or document.get("format_version") != FORMAT_VERSION:
            self.fail(f"{manifest_path}: format {document.get('format')!r} v{document.get('format_version')}, "
                      f"expected {FORMAT!r} v{FORMAT_VERSION}")
            return
        entries = {entry["name"]: entry for entry in document.get("modules", [])}
        if set(entries) != set(self.modules):
            self.fail(f"manifest lists {sorted(set(entries) ^ set(self.modules))} differently from the model")
        ops = {m.name: m for m in self.report.modules}
        for name, module in self.modules.items():
            entry = entries.get(name)
            if entry is None:
                continue
            if entry.get("bits") != module.bits or entry.get("lut_shape") != list(module.weight_lut.shape):
                self.fail(f"manifest: '{name}' bits/lut_shape {entry.get('bits')}/{entry.get('lut_shape')}")
            tensors = module_entry_tensors(name, module)
            for role, description in tensors.items():
                if entry.get("tensors", {}).get(role, {}).get("sha256") != description["sha256"]:
                    self.fail(f"manifest: sha256 of '{description['name']}' does not match the model")
            coreml = entry.get("coreml", {})
            if name in ops and coreml.get("lut_op") != ops[name].lut_op:
                self.fail(f"manifest: '{name}' LUT op {coreml.get('lut_op')!r}, the package has {ops[name].lut_op!r}")
        for relative, description in document.get("coreml", {}).get("weight_files", {}).items():
            file_path = os.path.join(package.model_dir, relative)
            if not os.path.isfile(file_path) or sha256_file(file_path) != description.get("sha256"):
                self.fail(f"manifest: sha256 of {relative} does not match the package")
        self.report.manifest_checked = True
        if not any(f.startswith("manifest") for f in self.report.failures):
            self.ok(f"manifest {os.path.basename(manifest_path)}: modules, tensor sha256 and op names match")


def verify_coreml(path: str, model, *, minimum_deployment_target=None, manifest="auto", check_logits: bool = True,
                  logits_rtol: float = 1e-2, cross_check: bool = True, raise_on_failure: bool = True
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
    verifier = _Verifier(report.path, model, report)
    verifier.decoded, verifier.floats, verifier.float_groups, verifier.input_shape = {}, {}, {}, None
    try:
        package = MilPackage(report.path)
    except (PackageFormatError, OSError) as error:
        report.failures.append(str(error))
        if raise_on_failure:
            raise VerificationError(report.path, report.failures) from error
        return report
    report.op_counts = package.op_counts()
    if not verifier.modules:
        report.failures.append("the torch model has no palettized module to compare with: pass the model after "
                               "optimum_edkm.palettize (or loaded from the saved palettized checkpoint)")
        if raise_on_failure:
            raise VerificationError(report.path, report.failures)
        return report
    verifier.check_spec(package, getattr(minimum_deployment_target, "name", minimum_deployment_target))
    chains = verifier.map_chains(package)
    try:
        for name, chain in chains.items():
            verifier.check_module(package, name, verifier.modules[name], chain)
        verifier.check_float_tensors(package, chains)
        verifier.check_sizes(package)
        if cross_check and verifier.decoded:
            verifier.cross_check_coremltools(package, chains)
    except PackageFormatError as error:
        verifier.fail(f"malformed package: {error}")
    if not report.failures and chains:
        widths = "/".join(f"uint{b}" for b in sorted({m.bits for m in report.modules}))
        verifier.ok(f"indices ({widths}), "
                    f"LUTs, scales and dense weights of {len(report.modules)} modules equal the torch model bit for "
                    f"bit ({sum(m.equivalent_indices for m in report.modules)} indices select an identical "
                    f"duplicate LUT value)")
    if check_logits and not report.failures:
        verifier.check_logits(logits_rtol)
    manifest_path = manifest_path_for(report.path) if manifest == "auto" else manifest
    if manifest_path is not None and (manifest != "auto" or os.path.exists(manifest_path)):
        verifier.check_manifest(package, os.fspath(manifest_path))
    if report.failures and raise_on_failure:
        raise VerificationError(report.path, report.failures)
    return report


def predict_logits(path: str, input_ids) -> np.ndarray:
    """Run the package with Core ML (macOS only) and return its logits as float32."""
    if sys.platform != "darwin":
        raise RuntimeError("running a Core ML package needs macOS (Core ML is not available on "
                           f"{sys.platform}); verify_coreml checks the package from its files instead")
    ct = import_coremltools()
    mlmodel = ct.models.MLModel(os.fspath(path))
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int32)
    return np.asarray(mlmodel.predict({INPUT_NAME: ids})[OUTPUT_NAME], dtype=np.float32)
