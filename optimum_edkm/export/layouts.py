"""How a saved ML program stores a palettized weight, and one reader per storage layout (numpy only).

A palettized weight is a chain of ``constexpr_*`` ops feeding its ``linear`` / ``gather``
(:func:`weight_chains`). Depending on the target and on the per-channel scale, the converter writes one of four
layouts; each reader checks the op's tensors against the torch module's :class:`~optimum_edkm.nn.Palette` and
decodes them into a :class:`StoredPalette`:

* iOS16/17 (:func:`read_packed_stream_palette`): one per-tensor 1-D LUT, the indices a packed uint8 stream;
* iOS18 without scale (:func:`read_grouped_palette`): ``uint{bits}`` indices, LUTs ``(groups, 1, 2**bits, 1)``;
* iOS18 with scale (:func:`read_row_scaled_palette`): the scale folded into a LUT tiled per output row
  (``constexpr_blockwise_shift_scale -> constexpr_lut_to_dense``);
* iOS26 with scale (:func:`read_lut_then_scale_palette`): ``constexpr_lut_to_dense ->
  constexpr_blockwise_shift_scale``.

The byte-level format these tensors are read from is :mod:`.mil`'s.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..nn import Palette
from .common import WRAPPER_ATTRIBUTE
from .mil import INDEX_BITS, MilOp, MilPackage, unpack_bits

UINT8 = 31  # MIL dtype
# "lm_model_layers_0_mlp_up_proj_weight_1_cast_fp16" -> "model_layers_0_mlp_up_proj_weight"; torch.export adds
# "p_" (parameters) or "b_" (buffers)
_OP_NAME = re.compile(rf"^(?:[pb]_)?{WRAPPER_ATTRIBUTE}_(?P<key>.+?)(?:_\d+)?(?:_cast_fp16|_to_fp16|_to_fp32)?$")


def flat_key(op_name: str) -> Optional[str]:
    """The model's state-dict key (dots as underscores) an op holding a model tensor is named after."""
    match = _OP_NAME.match(op_name)
    return match.group("key") if match else None


@dataclass
class WeightChain:
    """A constant weight: a ``constexpr_*`` op read by non-constexpr ops, and the constexpr ops it is made of."""

    head: MilOp  # consumed by a non-constexpr op
    ops: list  # head and its constexpr producers
    consumers: list  # [(op, param)]

    def of_type(self, op_type: str) -> list:
        return [op for op in self.ops if op.type == op_type]


def weight_chains(package: MilPackage) -> list:
    """Every :class:`WeightChain` of the program."""
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
        chains.append(WeightChain(op, members, consumers))
    return chains


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


def rows_of(table: np.ndarray, rows: int) -> np.ndarray:
    """Per-row view of a LUT-like table (leading axis = blocks of consecutive rows)."""
    return table[np.arange(rows) // (rows // table.shape[0])]


def read_packed_stream_palette(
    package: MilPackage, lut_op: MilOp, chain: WeightChain, palette: Palette
) -> StoredPalette:
    """iOS16/17 op: one per-tensor 1-D LUT, the indices as a packed uint8 stream plus the dense shape."""
    (rows, columns), bits = palette.shape, palette.bits
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


def _typed_indices(package: MilPackage, lut_op: MilOp, palette: Palette):
    tensor = package.param(lut_op, "indices")
    if INDEX_BITS.get(tensor.mil_dtype) != palette.bits or tensor.array.shape != tuple(palette.shape):
        raise LayoutError(
            f"indices {tensor.dtype_name}{list(tensor.array.shape)}, expected uint{palette.bits}{list(palette.shape)}"
        )
    return tensor


def _lut_table(lut_tensor, palette: Palette) -> np.ndarray:
    table = lut_tensor.array
    if table.ndim != 4 or table.shape[1:] != (1, palette.entries, 1) or palette.out_channels % table.shape[0]:
        raise LayoutError(f"LUT of shape {table.shape}, expected (groups, 1, {palette.entries}, 1)")
    return table


def _scale_of(scale_tensor, shape: tuple) -> np.ndarray:
    if scale_tensor.array.shape != shape:
        raise LayoutError(f"scale of shape {scale_tensor.array.shape}, expected {shape}")
    return scale_tensor.array.reshape(-1)


def _grouped(package, lut_op, palette: Palette, lut_tensor, layout: str, **scaled) -> StoredPalette:
    indices = _typed_indices(package, lut_op, palette)
    table = _lut_table(lut_tensor, palette)
    return StoredPalette(
        layout=layout,
        indices=indices.array,
        lut_rows=rows_of(table[:, 0, :, 0], palette.out_channels),
        lut_shape=tuple(table.shape),
        lut_bytes=lut_tensor.stored_bytes or lut_tensor.array.nbytes,
        index_bytes=palette.storage().index_bytes,
        indices_dtype=indices.dtype_name,
        **scaled,
    )


def read_grouped_palette(package: MilPackage, lut_op: MilOp, chain: WeightChain, palette: Palette) -> StoredPalette:
    """iOS18 op without scale: ``uint{bits}`` indices ``[out, in]``, LUTs ``(groups, 1, 2**bits, 1)``."""
    lut_tensor = package.param(lut_op, "lut")
    layout = "per-tensor LUT" if lut_tensor.array.shape[:1] == (1,) else "grouped LUT"
    return _grouped(package, lut_op, palette, lut_tensor, layout)


def read_row_scaled_palette(package: MilPackage, lut_op: MilOp, chain: WeightChain, palette: Palette) -> StoredPalette:
    """iOS18 with a per-channel scale: the converter folds the scale into a LUT tiled per output row,
    ``constexpr_blockwise_shift_scale(data = LUT per row, scale) -> constexpr_lut_to_dense``."""
    producer = package.producer(lut_op, "lut")
    scale_tensor = package.param(producer, "scale")
    return _grouped(
        package,
        lut_op,
        palette,
        package.param(producer, "data"),
        "per-row LUT, per-channel scale folded into it (shift_scale -> lut_to_dense)",
        scale=_scale_of(scale_tensor, (palette.out_channels, 1, 1, 1)),
        scale_bytes=scale_tensor.stored_bytes or scale_tensor.array.nbytes,
        scale_op=producer.name,
    )


def read_lut_then_scale_palette(
    package: MilPackage, lut_op: MilOp, chain: WeightChain, palette: Palette
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
        palette,
        lut_tensor,
        layout,
        scale=_scale_of(scale_tensor, (palette.out_channels, 1)),
        scale_bytes=scale_tensor.stored_bytes or scale_tensor.array.nbytes,
        scale_op=chain.head.name,
    )


def read_palette(package: MilPackage, chain: WeightChain, palette: Palette) -> StoredPalette:
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
    return reader(package, lut_op, chain, palette)
