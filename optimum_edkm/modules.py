"""Clustered modules: train-time (float weight + centroids) and palettized (LUT + packed n-bit indices).

Train-time modules keep their float ``weight`` as the trainable parameter and use its eDKM-clustered
version in forward (soft assignment while training, nearest centroid in eval). :func:`palettize_module`
turns one into a palettized module that stores only what a device needs.

State dict keys (what a checkpoint holds):

* train format - ``weight`` (float), ``bias``, ``weight_centroids`` (fp32 ``[groups, 2**bits]``),
  ``weight_temperature`` (fp32 scalar: the absolute softmax temperature), ``weight_scale`` (fp32 ``[out]``,
  only with a per-channel scale);
* palettized format - ``weight`` (uint8, the packed n-bit indices, row-major over ``[out, in]``),
  ``weight_lut`` (``[groups, 2**bits]``, fp16 by default), ``weight_scale`` (fp16 ``[out]``, optional),
  ``bias``. Keeping the packed indices under the name ``weight`` makes a load without optimum-edkm fail
  loudly (shape mismatch) instead of silently re-initialising the layer.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from .clustering import (ClusteringSpec, decode, dkm_reference, edkm_cluster, hard_assign, init_centroids,
                         pack_indices, packed_size, per_channel_scale, unpack_indices)
from .kernels import lut_linear

LUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class ClusteredWeightMixin:
    """Clustering state and behaviour shared by the train-time modules.

    ``_rows()`` presents the weight with output channels on dim 0 (a view for Conv1D's [in, out] layout).
    """

    spec: ClusteringSpec
    relative_temperature: float
    use_uniquify: bool
    lut_dtype: torch.dtype

    def _init_clustering(self, spec: ClusteringSpec, relative_temperature: float, per_channel_scale: bool,
                         uniquify: bool, lut_dtype: torch.dtype, out_channels: int, device, groups: int):
        self.spec = spec
        self.relative_temperature = float(relative_temperature)
        self.use_uniquify = bool(uniquify)
        self.lut_dtype = lut_dtype
        self.clustering_enabled = True
        #: multiplies the stored temperature (annealing schedules set it every step)
        self.temperature_factor = 1.0
        #: wraps the engine call (saved-tensor marshaling / sharding); set by the integration layer
        self.saved_tensor_policy = None
        self.register_buffer("weight_centroids", torch.zeros(groups, spec.num_clusters, device=device))
        self.register_buffer("weight_temperature", torch.ones((), device=device))
        scale = torch.ones(out_channels, device=device) if per_channel_scale else None
        self.register_buffer("weight_scale", scale)
        self._snap_cache = None

    # ------------------------------------------------------------------------------------------ state
    def _rows(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.weight if weight is None else weight

    @property
    def bits(self) -> int:
        return self.spec.bits

    def engine_spec(self) -> ClusteringSpec:
        return dataclasses.replace(self.spec, temperature=float(self.weight_temperature) * self.temperature_factor)

    @torch.no_grad()
    def init_clusters(self, seed: int = 0, name: str = "weight") -> None:
        """k-means centroids (and per-channel scale) from the current weight; sets the absolute temperature
        to ``relative_temperature`` times the squared mean spacing of neighbouring centroids."""
        rows = self._rows().detach()
        if self.weight_scale is not None:
            self.weight_scale.copy_(per_channel_scale(rows, name=name))
        centroids = init_centroids(rows, self.spec, scale=self.weight_scale, seed=seed, name=name)
        self.weight_centroids.copy_(centroids)
        k = self.spec.num_clusters
        spacing = (centroids[:, -1] - centroids[:, 0]) / max(k - 1, 1)
        tau = self.relative_temperature * float(spacing.pow(2).mean())
        self.weight_temperature.fill_(max(tau, torch.finfo(torch.float32).tiny))
        self._snap_cache = None

    # ---------------------------------------------------------------------------------------- forward
    def clustered_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (in the module's own layout)."""
        if not self.clustering_enabled:
            return self.weight
        if self.training:
            engine = edkm_cluster if self.use_uniquify else dkm_reference
            call = lambda: engine(self._rows(), self.weight_centroids, self.engine_spec(),  # noqa: E731
                                  scale=self.weight_scale)
            out = self.saved_tensor_policy(call) if self.saved_tensor_policy is not None else call()
            # in place, so that DDP's buffer synchronisation keeps tracking this tensor; the engines keep
            # their own copy of the starting centroids for backward
            with torch.no_grad():
                self.weight_centroids.copy_(out.centroids)
            self._snap_cache = None
            return self._rows(out.weight)
        return self.snapped_weight()

    @torch.no_grad()
    def snap(self):
        """Nearest-LUT-entry indices (uint8, ``[out, in]``) and the LUT as it will be stored."""
        lut = self.weight_centroids.to(self.lut_dtype)
        assignment = hard_assign(self._rows().detach(), lut.to(self.weight_centroids.dtype), self.spec,
                                 scale=self.weight_scale)
        return assignment.indices, lut

    def snapped_weight(self) -> torch.Tensor:
        """Dense weight after snapping, exactly what the palettized module will compute; cached until the
        weight or the centroids change."""
        key = (self.weight._version, self.weight.data_ptr(), id(self.weight_centroids),
               self.weight_centroids._version)
        if self._snap_cache is None or self._snap_cache[0] != key:
            indices, lut = self.snap()
            scale = None if self.weight_scale is None else self.weight_scale.to(self.lut_dtype)
            dense = decode(indices, lut, scale, dtype=self.weight.dtype)
            self._snap_cache = (key, self._rows(dense))
        return self._snap_cache[1]

    @torch.no_grad()
    def assignment_sample(self, positions: torch.Tensor):
        """Nearest-centroid labels and soft-assignment entropy (nats) of the weights at flat ``positions``
        (row-major over ``[out, in]``), at the current temperature."""
        rows = self._rows().detach()
        in_channels = rows.shape[1] if rows.dim() > 1 else 1
        flat = rows.reshape(-1)[positions].float()
        row = positions // in_channels
        if self.weight_scale is not None:
            flat = flat / self.weight_scale[row]
        values = flat.to(torch.bfloat16 if rows.dtype == torch.float32 else rows.dtype).float()
        group = torch.zeros_like(row) if self.spec.group_size is None else row // self.spec.group_size
        centroids = self.weight_centroids[group]
        distance = (values.unsqueeze(1) - centroids).pow(2)
        soft = torch.softmax(-distance / self.engine_spec().temperature, dim=1)
        entropy = -(soft * soft.clamp_min(1e-30).log()).sum(1)
        return distance.argmin(1).to(torch.uint8), entropy

    @torch.no_grad()
    def repair_collapsed_centroids(self, tolerance: float) -> int:
        """Spread centroids that collapsed onto a neighbour (closer than ``tolerance`` times the group's mean
        spacing): each duplicate moves to the midpoint between itself and the next distinct centroid.
        Deterministic, so every process makes the same repair. Returns the number of centroids moved."""
        centroids = self.weight_centroids.sort(1).values
        k = centroids.shape[1]
        spacing = ((centroids[:, -1] - centroids[:, 0]) / max(k - 1, 1)).clamp_min(torch.finfo(torch.float32).tiny)
        moved = 0
        for group in torch.nonzero((centroids.diff(1) <= tolerance * spacing.unsqueeze(1)).any(1)).flatten():
            row = centroids[group].tolist()
            limit = tolerance * float(spacing[group])
            for j in range(1, k):
                if row[j] - row[j - 1] > limit:
                    continue
                larger = [c for c in row[j + 1:] if c - row[j] > limit]
                smaller = [c for c in row[:j] if row[j] - c > limit]
                if larger:
                    row[j] = (row[j] + larger[0]) / 2
                elif smaller:
                    row[j] = (row[j] + smaller[-1]) / 2
                else:
                    continue
                moved += 1
            centroids[group] = torch.tensor(sorted(row), dtype=centroids.dtype)
        if moved:
            self.weight_centroids.copy_(centroids)
            self._snap_cache = None
        return moved

    def clustering_repr(self) -> str:
        granularity = ("per_tensor" if self.spec.group_size is None
                       else f"per_grouped_channel(group_size={self.spec.group_size})")
        scale = ", per_channel_scale" if self.weight_scale is not None else ""
        return f"bits={self.spec.bits}, {granularity}{scale}"


class EDKMLinear(ClusteredWeightMixin, nn.Linear):
    """``nn.Linear`` whose forward uses the eDKM-clustered weight (a subclass, so PEFT and optimizers see
    an ordinary Linear with a trainable float ``weight``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: ClusteringSpec, *,
                 relative_temperature: float, per_channel_scale: bool = False, uniquify: bool = True,
                 lut_dtype: torch.dtype = torch.float16, device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        groups = 1 if spec.group_size is None else out_features // spec.group_size
        self._init_clustering(spec, relative_temperature, per_channel_scale, uniquify, lut_dtype,
                              out_features, device, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.clustered_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.clustering_repr()}"


class EDKMConv1D(ClusteredWeightMixin, Conv1D):
    """transformers' ``Conv1D`` (GPT-2 style, weight ``[in, out]``) with an eDKM-clustered weight; output
    channels are its columns."""

    def __init__(self, nf: int, nx: int, spec: ClusteringSpec, *, relative_temperature: float,
                 per_channel_scale: bool = False, uniquify: bool = True, lut_dtype: torch.dtype = torch.float16,
                 device=None, dtype=None):
        nn.Module.__init__(self)
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        groups = 1 if spec.group_size is None else nf // spec.group_size
        self._init_clustering(spec, relative_temperature, per_channel_scale, uniquify, lut_dtype, nf, device,
                              groups)

    def _rows(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return (self.weight if weight is None else weight).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._rows(self.clustered_weight()).to(x.dtype), self.bias)

    def __repr__(self) -> str:
        return f"EDKMConv1D(nf={self.nf}, nx={self.nx}, {self.clustering_repr()})"


class EDKMEmbedding(ClusteredWeightMixin, nn.Embedding):
    """``nn.Embedding`` whose lookup table is eDKM-clustered (rows = tokens are the output channels)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: ClusteringSpec, *,
                 relative_temperature: float, padding_idx: Optional[int] = None, per_channel_scale: bool = False,
                 uniquify: bool = True, lut_dtype: torch.dtype = torch.float16, device=None, dtype=None):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, padding_idx=padding_idx, device=device,
                              dtype=dtype)
        groups = 1 if spec.group_size is None else num_embeddings // spec.group_size
        self._init_clustering(spec, relative_temperature, per_channel_scale, uniquify, lut_dtype,
                              num_embeddings, device, groups)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.clustered_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{nn.Embedding.extra_repr(self)}, {self.clustering_repr()}"


# ------------------------------------------------------------------------------------------ palettized
class PalettizedMixin:
    """LUT + packed indices; the dense weight is decoded on demand (optionally cached)."""

    def _init_palette(self, out_channels: int, in_channels: int, bits: int, group_size: Optional[int],
                      per_channel_scale: bool, lut_dtype: torch.dtype, device):
        if group_size is not None and out_channels % group_size != 0:
            raise ValueError(f"group_size={group_size} does not divide {out_channels} output channels")
        self.out_channels, self.in_channels = out_channels, in_channels
        self.bits = bits
        self.group_size = group_size
        groups = 1 if group_size is None else out_channels // group_size
        self.register_buffer("weight", torch.zeros(packed_size(out_channels * in_channels, bits),
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("weight_lut", torch.zeros(groups, 2 ** bits, dtype=lut_dtype, device=device))
        scale = torch.ones(out_channels, dtype=lut_dtype, device=device) if per_channel_scale else None
        self.register_buffer("weight_scale", scale)
        #: keep the decoded dense weight between calls (faster, but costs the dense weight's memory)
        self.cache_dense_weight = False
        self._dense_cache = None

    @property
    def dense_shape(self) -> tuple:
        """``(out, in)``: the shape of the weight the packed indices stand for."""
        return (self.out_channels, self.in_channels)

    def indices(self) -> torch.Tensor:
        """Unpacked uint8 indices, ``[out, in]``."""
        return unpack_indices(self.weight, self.bits, self.out_channels * self.in_channels).view(
            self.out_channels, self.in_channels)

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
        granularity = ("per_tensor" if self.group_size is None
                       else f"per_grouped_channel(group_size={self.group_size})")
        scale = ", per_channel_scale" if self.weight_scale is not None else ""
        return f"bits={self.bits}, {granularity}{scale}, lut_dtype={self.weight_lut.dtype}"


class PalettizedLinear(PalettizedMixin, nn.Module):
    """A Linear layer stored as a LUT and packed n-bit indices (also the palettized form of ``Conv1D``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, *,
                 group_size: Optional[int] = None, per_channel_scale: bool = False,
                 lut_dtype: torch.dtype = torch.float16, device=None, dtype=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.output_dtype = dtype or torch.get_default_dtype()
        #: stands for a transformers Conv1D (weight stored [in, out]); matters when converting back
        self.from_conv1d = False
        self._init_palette(out_features, in_features, bits, group_size, per_channel_scale, lut_dtype, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache_dense_weight:
            return F.linear(x, self.dense_weight(x.dtype), self.bias)
        # fused LUT kernel on the packed indices (pure-torch decode + F.linear where it does not apply)
        return lut_linear(x, self.weight, self.weight_lut, self.weight_scale, self.bias, self.in_features,
                          self.out_features, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.palette_repr()}")


class PalettizedEmbedding(PalettizedMixin, nn.Module):
    """An Embedding stored as a LUT and packed n-bit indices; only the looked-up rows are decoded when the
    rows are byte-aligned in the packed stream."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, *, padding_idx: Optional[int] = None,
                 group_size: Optional[int] = None, per_channel_scale: bool = False,
                 lut_dtype: torch.dtype = torch.float16, device=None, dtype=None):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.output_dtype = dtype or torch.get_default_dtype()
        self._init_palette(num_embeddings, embedding_dim, bits, group_size, per_channel_scale, lut_dtype, device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        row_bits = self.embedding_dim * self.bits
        if self.cache_dense_weight or row_bits % 8 != 0:
            return F.embedding(input_ids, self.dense_weight(self.output_dtype), self.padding_idx)
        rows = input_ids.reshape(-1).long()
        packed_rows = self.weight.view(self.num_embeddings, row_bits // 8)[rows].reshape(-1)
        indices = unpack_indices(packed_rows, self.bits, rows.numel() * self.embedding_dim).long()
        indices = indices.view(rows.numel(), self.embedding_dim)
        groups = rows if self.group_size is None else rows // self.group_size
        lut = self.weight_lut.float()[groups if self.group_size is not None else torch.zeros_like(rows)]
        dense = torch.gather(lut, 1, indices)
        if self.weight_scale is not None:
            dense = dense * self.weight_scale.float()[rows].unsqueeze(1)
        return dense.to(self.output_dtype).view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.palette_repr()}"


# ------------------------------------------------------------------------------------------ conversion
CLUSTERED_TYPES = (EDKMLinear, EDKMConv1D, EDKMEmbedding)
PALETTIZED_TYPES = (PalettizedLinear, PalettizedEmbedding)


@torch.no_grad()
def palettize_module(module: ClusteredWeightMixin) -> nn.Module:
    """Snap a train-time module to its nearest centroids and return the palettized module."""
    if not isinstance(module, CLUSTERED_TYPES):
        raise TypeError(f"cannot palettize {type(module).__name__}: expected one of "
                        f"{', '.join(t.__name__ for t in CLUSTERED_TYPES)}")
    indices, lut = module.snap()
    rows = module._rows()
    out_channels, in_channels = rows.shape
    common = dict(group_size=module.spec.group_size, per_channel_scale=module.weight_scale is not None,
                  lut_dtype=module.lut_dtype, device=rows.device)
    if isinstance(module, EDKMEmbedding):
        target = PalettizedEmbedding(out_channels, in_channels, module.spec.bits, padding_idx=module.padding_idx,
                                     dtype=module.weight.dtype, **common)
    else:
        target = PalettizedLinear(in_channels, out_channels, module.bias is not None, module.spec.bits,
                                  dtype=module.weight.dtype, **common)
        target.from_conv1d = isinstance(module, EDKMConv1D)
        if module.bias is not None:
            target.bias.copy_(module.bias)
    target.weight.copy_(pack_indices(indices, module.spec.bits))
    target.weight_lut.copy_(lut)
    if module.weight_scale is not None:
        target.weight_scale.copy_(module.weight_scale.to(module.lut_dtype))
    return target
