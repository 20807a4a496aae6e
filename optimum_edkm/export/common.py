"""What the Core ML export, its verifier and its manifest share: graph names, output paths, and the one place
where the export reads optimum-edkm's palettized modules.

Every access to the library's module classes (which types are palettized, embedding or linear, the packed
indices, the decoded weight, the Conv1D origin) goes through :func:`palette_records`; the rest of
``optimum_edkm.export`` only sees :class:`PaletteRecord` objects, so a change to the module classes
(:mod:`optimum_edkm.nn`) is adapted here and nowhere else.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ..nn import (
    Palette,
    PalettizedConv1D,
    PalettizedEmbedding,
    PalettizedTiedLinear,
    ScaledEmbedding,
    embedding_scale,
    is_palettized,
)
from ..storage import WeightStorage
from .errors import ExactnessError

#: attribute under which the export wrappers hold the model; converted op names start with it ("lm_model_...")
WRAPPER_ATTRIBUTE = "lm"
INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"
#: the generation package's additive causal mask input ``[batch, 1, new tokens, cached + new tokens]``
MASK_NAME = "causal_mask"
#: the generation package's KV-cache states ``[layers, batch, kv_heads, context_length, head_dim]``
KEY_CACHE = "key_cache"
VALUE_CACHE = "value_cache"
METADATA_PREFIX = "optimum_edkm."
CAPTURES = ("trace", "export")


# ------------------------------------------------------------------------------------------------- paths
def package_stem(path: str) -> str:
    return path[: -len(".mlpackage")] if path.endswith(".mlpackage") else path


def manifest_path_for(path: str) -> str:
    """``out/model.mlpackage`` -> ``out/model.manifest.json``."""
    return package_stem(path) + ".manifest.json"


def tensors_path_for(path: str) -> str:
    """``out/model.mlpackage`` -> ``out/model.palettized.safetensors``."""
    return package_stem(path) + ".palettized.safetensors"


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


# ---------------------------------------------------------------------------------------- palettized weights
@dataclass
class PaletteRecord:
    """A palettized module as the export sees it: its stored weight (the module's own :class:`Palette`,
    ``dense[r, c] = scale[r] * lut[r // group_size, index[r, c]]``) and where it sits in the graph.

    ``tied_to`` names the other modules that use the very same stored tensors (a palettized tied embedding and
    LM head): Core ML must then hold them once, in one LUT op read by both the ``gather`` and the ``linear``.
    """

    name: str
    kind: str  # "linear" or "embedding"
    palette: Palette
    bias: Optional[torch.Tensor] = None
    padding_idx: Optional[int] = None
    from_conv1d: bool = False  # a transformers Conv1D originally (weight stored [in, out] in float)
    tied_to: tuple = ()
    storage_name: str = ""  # the module whose keys name the stored tensors (first of a tie)
    module: nn.Module = field(default=None, repr=False)

    def storage(self) -> WeightStorage:
        """The palette's storage with fp16 LUTs and scales (what a Core ML package holds)."""
        return dataclasses.replace(self.palette.storage(), lut_entry_bits=16, scale_bits=16)

    @property
    def numel(self) -> int:
        """Elements of the dense weight."""
        return self.palette.numel

    @property
    def consumer(self) -> str:
        """The Core ML op input that reads this weight."""
        return "gather.x" if self.kind == "embedding" else "linear.weight"

    def indices(self) -> torch.Tensor:
        """Unpacked uint8 indices ``[out, in]``."""
        return self.module.indices()

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded ``[out, in]`` weight, rounded once to ``dtype``."""
        return self.module.dense_weight(dtype)

    def tensors(self) -> dict:
        """``{role: (state-dict key, tensor)}`` as in an optimum-edkm checkpoint (a tied weight under the keys of
        its first module)."""
        owner, palette = self.storage_name or self.name, self.palette
        tensors = {"indices": (f"{owner}.weight", palette.packed), "lut": (f"{owner}.weight_lut", palette.lut)}
        if palette.scale is not None:
            tensors["scale"] = (f"{owner}.weight_scale", palette.scale)
        return tensors


def _record(name: str, module: nn.Module) -> PaletteRecord:
    # an output head that reads its tied embedding's palette: a linear over the very same stored tensors
    source = module.tied_embedding if isinstance(module, PalettizedTiedLinear) else module
    embedding = isinstance(module, PalettizedEmbedding)
    return PaletteRecord(
        name=name,
        kind="embedding" if embedding else "linear",
        palette=source.palette(),
        bias=None if embedding else module.bias,
        padding_idx=module.padding_idx if embedding else None,
        from_conv1d=isinstance(module, PalettizedConv1D),
        module=source,
    )


def palette_records(model: nn.Module) -> dict:
    """``{module name: PaletteRecord}`` of the palettized modules, in model order (each module once, under its
    first name). Modules whose packed tensor is the same object are recorded as tied to each other."""
    records = {}
    for name, module in model.named_modules():
        if is_palettized(module) or isinstance(module, PalettizedTiedLinear):
            records[name] = _record(name, module)
    owners = {}
    for name, record in records.items():
        owners.setdefault(id(record.palette.packed), []).append(name)
    for names in owners.values():
        for name in names:
            records[name].tied_to = tuple(other for other in names if other != name)
            records[name].storage_name = names[0]
    return records


def storage_groups(records: dict) -> list:
    """The palettized weights as stored: one list of module names per distinct packed tensor, in model order."""
    groups, seen = [], set()
    for name, record in records.items():
        if name not in seen:
            members = [name, *record.tied_to]
            seen.update(members)
            groups.append(members)
    return groups


def palettized_tensor_ids(records: dict) -> set:
    """``id()`` of every tensor a palettized module stores (indices, LUTs, scales)."""
    return {
        id(t) for r in records.values() for t in (r.palette.packed, r.palette.lut, r.palette.scale) if t is not None
    }


# ------------------------------------------------------------------------------------------ exactness
def check_representable(record: PaletteRecord) -> None:
    """The LUT and scale must be finite fp16 values (Core ML stores them in fp16), the scale non-zero (the
    converter divides by it)."""
    name, palette = record.name, record.palette
    for label, tensor in (("weight_lut", palette.lut), ("weight_scale", palette.scale)):
        if tensor is None:
            continue
        values = tensor.detach().float()
        if not bool(torch.isfinite(values).all()):
            raise ExactnessError(f"'{name}.{label}' holds non-finite values; Core ML cannot store them")
        if not torch.equal(values.half().float(), values):
            raise ExactnessError(
                f"'{name}.{label}' holds values that float16 cannot represent exactly ({tensor.dtype} LUT); the "
                f"Core ML package stores float16, which would re-approximate the clustered weights. Palettize "
                f"with EDKMConfig(lut_dtype='float16')"
            )
    if palette.scale is not None and bool((palette.scale == 0).any()):
        row = int((palette.scale == 0).nonzero()[0])
        raise ExactnessError(
            f"'{name}.weight_scale' is 0 for output channel {row}; the converter divides the "
            f"weight by it, so the channel cannot be exported exactly"
        )


@torch.no_grad()
def check_on_lut(record: PaletteRecord, weight: torch.Tensor) -> None:
    """Prove that the float ``weight`` handed to the converter lies exactly on the LUT entry of the module's
    own index, after the division by the per-channel scale that the converter performs. The converter picks
    the nearest entry, so an exact hit means it picks this entry or an identical one: no re-approximation."""
    name, palette = record.name, record.palette
    indices = record.indices().long()
    rows = indices.shape[0]
    if tuple(weight.shape) != tuple(indices.shape):
        raise ExactnessError(
            f"'{name}.weight': exported weight has shape {tuple(weight.shape)}, the palettized "
            f"module has {tuple(indices.shape)}"
        )
    values = weight.float()
    if palette.scale is not None:
        values = values / palette.scale.float().view(-1, 1)
    lut = palette.lut.float()
    rows_per_group = rows // lut.shape[0]
    group = (torch.arange(rows) // rows_per_group).view(-1, 1).expand_as(indices)
    expected = lut[group, indices]
    off = values != expected
    if bool(off.any()):
        row, column = (int(i) for i in off.nonzero()[0])
        raise ExactnessError(
            f"'{name}.weight' is not exactly on its LUT: {int(off.sum())} of {off.numel()} exported weights differ "
            f"from lut[group, index]{' (after dividing by weight_scale)' if palette.scale is not None else ''}, "
            f"first at [{row}, {column}]: {float(values[row, column])!r} vs lut[{int(group[row, column])}, "
            f"{int(indices[row, column])}] = {float(expected[row, column])!r}. The converter would silently re-snap "
            f"it to the nearest entry; export the palettized module unchanged"
        )


# ------------------------------------------------------------------------------------------ export copy
def float_module(record: PaletteRecord, weight: Optional[nn.Parameter] = None) -> nn.Module:
    """The float module the converter sees in place of a palettized one: the decoded fp32 weight (or ``weight``,
    shared with a tied module) plus coremltools' compression-info buffers, from which it emits a
    ``constexpr_lut_to_dense`` op with our LUT."""
    palette = record.palette
    if weight is None:
        weight = nn.Parameter(record.dense(torch.float32), requires_grad=False)
    if record.kind == "embedding":
        scale = embedding_scale(record.module)  # a scaled word embedding (Gemma's) multiplies its rows
        plain = (
            nn.Embedding(palette.out_channels, palette.in_channels, padding_idx=record.padding_idx)
            if scale is None
            else ScaledEmbedding(palette.out_channels, palette.in_channels, scale, padding_idx=record.padding_idx)
        )
    else:
        plain = nn.Linear(palette.in_channels, palette.out_channels, bias=record.bias is not None)
        if record.bias is not None:
            plain.bias = nn.Parameter(record.bias.detach().float(), requires_grad=False)
    plain.weight = weight
    # compression-info protocol v1: the LUT has the weight's rank + 2: (groups along out, along in, 2**bits, 1)
    plain.register_buffer("_COREML_/weight/compression_type", torch.tensor([2]))
    plain.register_buffer(
        "_COREML_/weight/lut", palette.lut.detach().float().reshape(palette.groups, 1, palette.entries, 1)
    )
    if palette.scale is not None:
        plain.register_buffer("_COREML_/weight/palettization_scale", palette.scale.detach().float().reshape(-1, 1))
    return plain


@torch.no_grad()
def export_copy(model: nn.Module, records: Optional[dict] = None) -> nn.Module:
    """A float32 copy of ``model`` for conversion: palettized modules become float modules with Core ML
    compression info, checked to lie exactly on their LUTs; tied palettized modules share one float weight.
    fp32 tensors are shared with ``model``, not copied."""
    records = palette_records(model) if records is None else records
    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if t.dtype == torch.float32}
    shared.update({id(t): t for record in records.values() for t in record.module.buffers()})
    clone = copy.deepcopy(model, memo=dict(shared))
    for members in storage_groups(records):
        weight = None
        for name in members:
            plain = float_module(records[name], weight)
            if weight is None:
                check_on_lut(records[name], plain.weight)
                weight = plain.weight
            clone.set_submodule(name, plain)
    # deep-copied (non-fp32) tensors are the copy's own, so converting them leaves ``model`` untouched; a weight
    # shared by two modules (a tied 16-bit embedding / lm_head) stays shared
    upcast = {}
    for submodule in clone.modules():
        for key, tensor in list(submodule._parameters.items()):
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32:
                if id(tensor) not in upcast:
                    upcast[id(tensor)] = nn.Parameter(tensor.detach().float(), requires_grad=False)
                submodule._parameters[key] = upcast[id(tensor)]
        for key, tensor in list(submodule._buffers.items()):
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32:
                submodule._buffers[key] = tensor.float()
    clone.register_buffer("_COREML_/metadata_version", torch.tensor(1))
    return clone.eval()


def float_dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def reference_input_ids(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
