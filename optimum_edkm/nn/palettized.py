"""Palettized modules: a LUT and packed n-bit indices per weight, what a device stores and runs.

State dict keys: ``weight`` (uint8, the packed n-bit indices, row-major over ``[out, in]``), ``weight_lut``
(``[groups, 2**bits]``, fp16 by default), ``weight_scale`` (fp16 ``[out]``, optional), ``bias``. Keeping the
packed indices under the name ``weight`` makes a load without optimum-edkm fail loudly (shape mismatch) instead
of silently re-initialising the layer.

Each class owns its conversions: ``empty_for(float_module, palette)`` (the module a checkpoint is loaded into,
built on the meta device with the exact packed shapes), ``from_snapped`` (from a clustered module),
``to_float()``, ``storage()`` and ``palette()`` (the stored weight as one :class:`~.formats.Palette` record).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..clustering import decode, pack_indices, packed_size, unpack_indices
from ..kernels import lut_linear
from ..storage import WeightStorage
from .formats import Palette, PaletteFormat

#: the buffers that hold a palette's values: they keep their stored dtype when the module is cast
PALETTE_BUFFERS = ("weight_lut", "weight_scale")


class PalettizedModule:
    """LUT + packed indices; the dense weight is decoded on demand (optionally cached). A mixin before the
    torch class."""

    edkm_role = "palettized"

    def _init_palette(self, out_channels: int, in_channels: int, palette: PaletteFormat, device):
        if palette.group_size is not None and out_channels % palette.group_size != 0:
            raise ValueError(f"group_size={palette.group_size} does not divide {out_channels} output channels")
        self.out_channels, self.in_channels = out_channels, in_channels
        self.bits = palette.bits
        self.group_size = palette.group_size
        self.register_buffer(
            "weight",
            torch.zeros(packed_size(out_channels * in_channels, palette.bits), dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "weight_lut",
            torch.zeros(palette.groups(out_channels), 2**palette.bits, dtype=palette.lut_dtype, device=device),
        )
        scale = torch.ones(out_channels, dtype=palette.lut_dtype, device=device) if palette.per_channel_scale else None
        self.register_buffer("weight_scale", scale)
        #: keep the decoded dense weight between calls (faster, but costs the dense weight's memory)
        self.cache_dense_weight = False
        self._dense_cache = None

    # ------------------------------------------------------------------------------------------ description
    @property
    def dense_shape(self) -> tuple:
        """``(out, in)``: the shape of the weight the packed indices stand for."""
        return (self.out_channels, self.in_channels)

    @property
    def palette_format(self) -> PaletteFormat:
        return PaletteFormat(
            bits=self.bits,
            group_size=self.group_size,
            per_channel_scale=self.weight_scale is not None,
            lut_dtype=self.weight_lut.dtype,
        )

    def palette(self) -> Palette:
        """The stored weight as one record (its tensors are this module's buffers)."""
        return Palette(self.palette_format, self.dense_shape, self.weight, self.weight_lut, self.weight_scale)

    def storage(self) -> WeightStorage:
        """What this module stores for its weight (indices, LUTs, scales)."""
        return self.palette_format.storage(self.dense_shape)

    def indices(self) -> torch.Tensor:
        """Unpacked uint8 indices, ``[out, in]``."""
        return unpack_indices(self.weight, self.bits, self.out_channels * self.in_channels).view(
            self.out_channels, self.in_channels
        )

    def dense_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The decoded ``[out, in]`` weight: ``scale[row] * lut[group(row), index]``, computed in fp32."""
        dtype = dtype or torch.float32
        key = (self.weight._version, self.weight_lut._version, dtype)
        if self._dense_cache is not None and self._dense_cache[0] == key:
            return self._dense_cache[1]
        dense = decode(self.indices(), self.weight_lut, self.weight_scale, dtype=dtype)
        if self.cache_dense_weight:
            self._dense_cache = (key, dense)
        return dense

    def palette_repr(self) -> str:
        granularity = "per_tensor" if self.group_size is None else f"per_grouped_channel(group_size={self.group_size})"
        scale = ", per_channel_scale" if self.weight_scale is not None else ""
        return f"bits={self.bits}, {granularity}{scale}, lut_dtype={self.weight_lut.dtype}"

    # ----------------------------------------------------------------------------------------- conversions
    @classmethod
    def _shaped(cls, out_channels: int, in_channels: int, source: nn.Module, palette: PaletteFormat, **factory):
        """A module for an ``[out_channels, in_channels]`` weight with ``source``'s options (bias, padding index;
        ``source`` is a float or clustered module); ``factory``: ``device`` and ``dtype``."""
        raise NotImplementedError

    @classmethod
    def from_snapped(
        cls, clustered, indices: torch.Tensor, lut: torch.Tensor, scale: Optional[torch.Tensor]
    ) -> "PalettizedModule":
        """The palettized form of ``clustered`` (a clustered module): its snapped weight as ``indices`` into
        ``lut`` (times ``scale``), and its bias."""
        palettized = cls._shaped(
            *clustered.dense_shape,
            clustered,
            clustered.palette_format,
            device=clustered.weight.device,
            dtype=clustered.weight.dtype,
        )
        with torch.no_grad():
            if getattr(palettized, "bias", None) is not None:
                palettized.bias.copy_(clustered.whole_bias())
            palettized.weight.copy_(pack_indices(indices, palettized.bits))
            palettized.weight_lut.copy_(lut)
            if scale is not None:
                palettized.weight_scale.copy_(scale)
        return palettized

    def to_float(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """A plain float module holding the decoded weight (loads without optimum-edkm)."""
        dtype = dtype or self.output_dtype
        return self.float_module_from_rows(self, self.dense_weight(dtype), dtype)

    # --------------------------------------------------------------------------------------- torch plumbing
    def _apply(self, fn, recurse=True):
        # ``model.half()`` / ``.to(torch.bfloat16)`` must not round the stored LUT and scale (fp16 -> bf16 loses
        # bits): they keep their dtype and values, device moves still apply, and the module's output dtype
        # follows the cast.
        kept = {name: getattr(self, name) for name in PALETTE_BUFFERS if getattr(self, name, None) is not None}
        probe = fn(torch.zeros((), dtype=self.output_dtype, device=self.weight.device))
        result = super()._apply(fn, recurse)
        for name, before in kept.items():
            moved = getattr(self, name)
            if moved.dtype != before.dtype:
                self._buffers[name] = before.to(device=moved.device)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.output_dtype = probe.dtype
        self._dense_cache = None
        return result


def is_palettized(module: nn.Module) -> bool:
    """A module that stores a LUT and packed indices."""
    return isinstance(module, PalettizedModule)


def _palettized_linear(
    x: torch.Tensor, palettized: PalettizedModule, bias: Optional[torch.Tensor], in_features: int, out_features: int
) -> torch.Tensor:
    """``x @ W^T + bias`` with ``W`` the ``[out_features, in_features]`` palettized weight of ``palettized``: the
    cached dense weight when it is kept, else the fused LUT kernel on the packed indices (pure-torch decode +
    ``F.linear`` where it does not apply)."""
    if palettized.cache_dense_weight:
        return F.linear(x, palettized.dense_weight(x.dtype), bias)
    # the buffers straight from their dict: module attribute lookups cost ~0.5 us each, ~200 calls a token
    buffers = palettized._buffers
    return lut_linear(
        x,
        buffers["weight"],
        buffers["weight_lut"],
        buffers["weight_scale"],
        bias,
        in_features,
        out_features,
        palettized.bits,
        palettized.group_size,
    )


def float_linear(rows: torch.Tensor, bias: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """A float ``nn.Linear`` (on the rows' device, ``dtype`` or the rows' dtype) holding copies of the
    ``[out_features, in_features]`` weight ``rows`` and of ``bias``."""
    out_channels, in_channels = rows.shape
    linear = nn.Linear(in_channels, out_channels, bias=bias is not None, device=rows.device, dtype=dtype or rows.dtype)
    with torch.no_grad():
        linear.weight.copy_(rows)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class PalettizedLinear(PalettizedModule, nn.Linear):
    """A Linear layer stored as a LUT and packed n-bit indices.

    An ``nn.Linear`` subclass (as bitsandbytes' ``Linear4bit``), so that code which looks for linear layers finds
    it: peft's default LoRA dispatch and ``target_modules="all-linear"``, ``isinstance`` checks. Its ``weight`` is
    the packed uint8 index stream, not a float matrix; :meth:`dense_weight` decodes it.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, palette: PaletteFormat, *, device=None, dtype=None
    ):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.output_dtype = dtype or torch.get_default_dtype()
        self._init_palette(out_features, in_features, palette, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def reset_parameters(self) -> None:
        """Nothing to draw: the packed indices and LUT are loaded or computed, never randomly initialised."""

    @classmethod
    def empty_for(cls, module: nn.Module, palette: PaletteFormat) -> "PalettizedLinear":
        """The palettized module a checkpoint of ``module`` (an ``nn.Linear``) is loaded into (meta device)."""
        with torch.device("meta"):
            return cls(
                module.in_features, module.out_features, module.bias is not None, palette, dtype=module.weight.dtype
            )

    @classmethod
    def _shaped(cls, out_channels, in_channels, source, palette, **factory) -> "PalettizedLinear":
        return cls(in_channels, out_channels, source.bias is not None, palette, **factory)

    @staticmethod
    def float_module_from_rows(module, rows: torch.Tensor, dtype: Optional[torch.dtype]) -> nn.Module:
        return float_linear(rows, module.bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _palettized_linear(x, self, self.bias, self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self.palette_repr()}"
        )


class PalettizedConv1D(PalettizedLinear):
    """The palettized form of transformers' ``Conv1D`` (GPT-2): computes like a Linear over ``[out, in]``
    rows; converts back to a ``Conv1D`` (weight ``[in, out]``)."""

    @classmethod
    def empty_for(cls, module: nn.Module, palette: PaletteFormat) -> "PalettizedConv1D":
        with torch.device("meta"):
            return cls(module.nx, module.nf, True, palette, dtype=module.weight.dtype)

    @staticmethod
    def float_module_from_rows(module, rows: torch.Tensor, dtype: Optional[torch.dtype]) -> nn.Module:
        out_channels, in_channels = rows.shape
        conv = Conv1D(out_channels, in_channels).to(device=rows.device, dtype=dtype or rows.dtype)
        with torch.no_grad():
            conv.weight.copy_(rows.t())
            conv.bias.copy_(module.bias)
        return conv


def embedding_scale(module: nn.Module) -> Optional[float]:
    """The factor a scaled word embedding multiplies its rows by (transformers' ``*ScaledWordEmbedding``, e.g.
    Gemma's ``sqrt(hidden_size)``: ``lookup * embed_scale``; this package's embeddings keep it as
    ``embed_scale``); ``None`` for a plain ``nn.Embedding`` or when the factor is not readable (meta device)."""
    scale = getattr(module, "scalar_embed_scale", None)  # transformers' scaled embeddings keep the float too
    if scale is None:
        scale = getattr(module, "embed_scale", None)
    if isinstance(scale, torch.Tensor):
        scale = None if scale.is_meta or scale.numel() != 1 else float(scale)
    return None if scale is None else float(scale)


def scale_rows(rows: torch.Tensor, embed_scale: Optional[float]) -> torch.Tensor:
    """Looked-up embedding rows times ``embed_scale`` taken in the rows' dtype (as Gemma's scaled embedding
    computes it); unchanged for ``None``."""
    if embed_scale is None:
        return rows
    return rows * torch.tensor(embed_scale, dtype=rows.dtype, device=rows.device)


class ScaledEmbedding(nn.Embedding):
    """``nn.Embedding`` whose rows are multiplied by ``embed_scale``: the float form of a clustered or palettized
    scaled word embedding (Gemma's), so ``dequantize()`` keeps what the model computes."""

    def __init__(self, num_embeddings: int, embedding_dim: int, embed_scale: float, **kwargs):
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.embed_scale = float(embed_scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return scale_rows(super().forward(input_ids), self.embed_scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, embed_scale={self.embed_scale}"


def float_embedding(
    rows: torch.Tensor, padding_idx: Optional[int], embed_scale: Optional[float], dtype: Optional[torch.dtype] = None
) -> nn.Embedding:
    """A float embedding (``ScaledEmbedding`` when ``embed_scale`` is set) holding a copy of ``rows``."""
    out_channels, in_channels = rows.shape
    factory = dict(padding_idx=padding_idx, device=rows.device, dtype=dtype or rows.dtype)
    if embed_scale is None:
        embedding = nn.Embedding(out_channels, in_channels, **factory)
    else:
        embedding = ScaledEmbedding(out_channels, in_channels, embed_scale, **factory)
    with torch.no_grad():
        embedding.weight.copy_(rows)
    return embedding


class PalettizedEmbedding(PalettizedModule, nn.Module):
    """An Embedding stored as a LUT and packed n-bit indices; only the looked-up rows are decoded when the
    rows are byte-aligned in the packed stream. ``embed_scale`` (a scaled word embedding's factor, not stored
    in the checkpoint: it comes from the model's config) multiplies the rows."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        palette: PaletteFormat,
        *,
        padding_idx: Optional[int] = None,
        embed_scale: Optional[float] = None,
        device=None,
        dtype=None,
    ):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale
        self.output_dtype = dtype or torch.get_default_dtype()
        self._init_palette(num_embeddings, embedding_dim, palette, device)

    @classmethod
    def empty_for(cls, module: nn.Module, palette: PaletteFormat) -> "PalettizedEmbedding":
        with torch.device("meta"):
            return cls(
                module.num_embeddings,
                module.embedding_dim,
                palette,
                padding_idx=module.padding_idx,
                embed_scale=embedding_scale(module),
                dtype=module.weight.dtype,
            )

    @classmethod
    def _shaped(cls, out_channels, in_channels, source, palette, **factory) -> "PalettizedEmbedding":
        return cls(
            out_channels,
            in_channels,
            palette,
            padding_idx=source.padding_idx,
            embed_scale=embedding_scale(source),
            **factory,
        )

    @staticmethod
    def float_module_from_rows(module, rows: torch.Tensor, dtype: Optional[torch.dtype]) -> nn.Module:
        return float_embedding(rows, module.padding_idx, embedding_scale(module), dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return scale_rows(self._lookup(input_ids), self.embed_scale)

    def _lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        row_bits = self.embedding_dim * self.bits
        if self.cache_dense_weight or row_bits % 8 != 0:
            return F.embedding(input_ids, self.dense_weight(self.output_dtype), self.padding_idx)
        rows = input_ids.reshape(-1).long()
        packed_rows = self.weight.view(self.num_embeddings, row_bits // 8)[rows].reshape(-1)
        indices = unpack_indices(packed_rows, self.bits, rows.numel() * self.embedding_dim).long()
        indices = indices.view(rows.numel(), self.embedding_dim)
        groups = rows // self.group_size if self.group_size is not None else torch.zeros_like(rows)
        # only the looked-up rows' LUTs and scales are widened (the whole table would cost a copy per token)
        dense = torch.gather(self.weight_lut[groups].float(), 1, indices)
        if self.weight_scale is not None:
            dense = dense * self.weight_scale[rows].float().unsqueeze(1)
        return dense.to(self.output_dtype).view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else f", embed_scale={self.embed_scale}"
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.palette_repr()}{scale}"


class PalettizedTiedLinear(nn.Module):
    """The output head of a model whose palettized input embedding is tied to it: logits are computed from the
    embedding's LUT and indices (stored once). Holds no tensors of its own except an optional bias."""

    edkm_role = "tied-head"

    def __init__(self, embedding: PalettizedEmbedding, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.__dict__["tied_embedding"] = embedding  # a reference, not a submodule (no state twice)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _palettized_linear(x, self.tied_embedding, self.bias, self.in_features, self.out_features)

    def to_float(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        embedding = self.tied_embedding
        return float_linear(embedding.dense_weight(dtype or embedding.output_dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the palettized embedding"
