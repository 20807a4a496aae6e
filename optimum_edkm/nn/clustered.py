"""Train-time clustered modules: a float weight (the trainable parameter) used through its eDKM clustering.

Each class owns its conversions (as optimum-quanto's qmodules do):

* ``EDKMLinear.from_float(linear, palette, options)`` - wrap a float module, reusing its parameters;
* ``module.palettize()`` - snap every weight to its nearest centroid: the palettized module (LUT + indices);
* ``module.to_float()`` - a plain float module holding the snapped weights (``dequantize``, export);
* ``module.storage()`` - what the palettized form stores (:class:`~optimum_edkm.storage.WeightStorage`).

State dict keys: ``weight`` (float), ``bias``, ``weight_centroids`` (fp32 ``[groups, 2**bits]``),
``weight_temperature`` (fp32 scalar: the absolute softmax temperature), ``weight_scale`` (fp32 ``[out]``, only
with a per-channel scale). In a saved train-format checkpoint ``weight`` is stored with a leading dimension of 1
(:data:`CHECKPOINT_WEIGHT_DIM`), so transformers without optimum-edkm refuses the file (size mismatch) instead
of loading an unclustered float model; :meth:`ClusteredModule._load_from_state_dict` accepts both layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..clustering import (
    ClusteringSpec,
    decode,
    dkm_reference,
    edkm_cluster,
    hard_assign,
    init_centroids,
    per_channel_scale,
)
from ..storage import WeightStorage
from .formats import ClusteringOptions, Palette, PaletteFormat
from .palettized import (
    PalettizedConv1D,
    PalettizedEmbedding,
    PalettizedLinear,
    PalettizedTiedLinear,
    embedding_scale,
    float_linear,
    scale_rows,
)
from .registry import register_clustered_module

try:  # FSDP2 shards parameters as DTensors between forward passes
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without torch.distributed
    DTensor = ()

#: dimensions of a clustered weight in a saved train-format checkpoint (``[1, out, in]``)
CHECKPOINT_WEIGHT_DIM = 3
#: buffers that keep their dtype when the module is cast (``model.half()``): they are the clustering state
_STATE_BUFFERS = ("weight_centroids", "weight_temperature", "weight_scale")


def whole_tensor(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The whole tensor of an FSDP2-sharded parameter (a collective: every rank must call it), others as they
    are. Inside forward FSDP has already gathered the weight; this is for reads outside it (k-means, snapping,
    statistics, palettization)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class ClusteredModule:
    """Clustering state and behaviour shared by the train-time modules (a mixin before the torch class).

    ``rows()`` presents the weight with output channels on dim 0 (a transposed view for Conv1D).
    """

    edkm_role = "clustered"
    #: the palettized class this module snaps to
    palettized_class: type
    #: "linear" or "embedding": which of EDKMConfig's bit widths applies
    kind: str
    #: the float class this class clusters (set by ``register_clustered_module``)
    float_class: type

    def _init_clustering(self, palette: PaletteFormat, options: ClusteringOptions, out_channels: int, device):
        self.spec: ClusteringSpec = options.spec(palette)
        self.relative_temperature = float(options.relative_temperature)
        self.use_uniquify = bool(options.uniquify)
        self.lut_dtype = palette.lut_dtype
        self.clustering_enabled = True
        #: multiplies the stored temperature (annealing schedules set it every step)
        self.temperature_factor = 1.0
        #: wraps the engine call (saved-tensor offloading / sharding, see optimum_edkm.marshaling)
        self.saved_tensor_policy = None
        #: a tied output head reuses this module's clustered weight within one forward pass
        self.share_clustered_weight = False
        self.register_buffer(
            "weight_centroids", torch.zeros(palette.groups(out_channels), self.spec.num_clusters, device=device)
        )
        self.register_buffer("weight_temperature", torch.ones((), device=device))
        scale = torch.ones(out_channels, device=device) if palette.per_channel_scale else None
        self.register_buffer("weight_scale", scale)
        self._snap_cache = None
        self._soft_cache = None
        #: (key, indices) of a palettization given to start_from, kept while neither weight nor LUT changes:
        #: snapping re-derives indices by nearest entry, which near-duplicate LUT entries make ambiguous
        self._given_indices = None

    @staticmethod
    def _float_arguments(module: nn.Module) -> tuple[tuple, dict]:
        """The constructor's positional arguments before ``palette`` and its extra keyword arguments that
        describe ``module``'s shape."""
        raise NotImplementedError

    @classmethod
    def unsupported(cls, module: nn.Module) -> Optional[str]:
        """Why ``module`` (an instance of ``float_class`` or a subclass) cannot be clustered by this class:
        ``None`` if it can. A subclass whose ``forward`` computes something else (OPT's learned positional
        embedding, a custom Linear) would silently lose it."""
        if type(module).forward is not cls.float_class.forward:
            return (
                f"{type(module).__name__} overrides {cls.float_class.__name__}.forward, which {cls.__name__} "
                f"would not reproduce"
            )
        return None

    @classmethod
    def from_float(cls, module: nn.Module, palette: PaletteFormat, options: ClusteringOptions) -> "ClusteredModule":
        """Wrap ``module``; its ``weight`` and ``bias`` parameters are reused (not copied)."""
        args, kwargs = cls._float_arguments(module)
        with torch.device("meta"):
            clustered = cls(*args, palette, options, dtype=module.weight.dtype, **kwargs)
        return _adopt(clustered, module)

    # ------------------------------------------------------------------------------------------ description
    def rows(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight (or ``weight``) with output channels on dim 0; a sharded weight is gathered whole."""
        return whole_tensor(self.weight) if weight is None else weight

    def whole_bias(self) -> Optional[torch.Tensor]:
        return whole_tensor(getattr(self, "bias", None))

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def dense_shape(self) -> tuple:
        """``(out, in)``: the shape of the weight the palette stands for."""
        return tuple(self.rows().shape)

    @property
    def palette_format(self) -> PaletteFormat:
        return PaletteFormat(
            bits=self.spec.bits,
            group_size=self.spec.group_size,
            per_channel_scale=self.weight_scale is not None,
            lut_dtype=self.lut_dtype,
        )

    def storage(self) -> WeightStorage:
        """What the palettized form of this module stores."""
        return self.palette_format.storage(self.dense_shape)

    def engine_spec(self) -> ClusteringSpec:
        return dataclasses.replace(self.spec, temperature=float(self.weight_temperature) * self.temperature_factor)

    # ------------------------------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_clusters(self, seed: int = 0, name: str = "weight", sample_weight: Optional[torch.Tensor] = None) -> None:
        """k-means centroids (and per-channel scale) from the current weight; sets the absolute temperature to
        ``relative_temperature`` times the squared mean spacing of neighbouring centroids."""
        rows = self.rows().detach()
        if self.weight_scale is not None:
            self.weight_scale.copy_(per_channel_scale(rows, name=name))
        extra = {} if sample_weight is None else {"sample_weight": sample_weight}
        centroids = init_centroids(rows, self.spec, scale=self.weight_scale, seed=seed, name=name, **extra)
        self.weight_centroids.copy_(centroids)
        self.set_temperature_from_centroids()

    @torch.no_grad()
    def start_from(self, palette, name: str = "weight") -> int:
        """Start from a given palettization instead of k-means.

        ``palette`` is a :class:`~optimum_edkm.nn.Palette` (LUT, indices, scale: a post-training result, a
        palettized module's, :meth:`palette` of another train-time module) or a bare ``[groups, 2**bits]`` LUT
        tensor. The LUT becomes the centroids, the scale the per-channel scale, and with indices every weight takes
        its decoded value, and the given indices are kept while neither the weight nor the LUT changes, so that
        snapping (and :func:`optimum_edkm.palettize` before any training step) gives that palettization back
        exactly; with a bare LUT the weights keep their values. Returns the number of weights whose nearest LUT
        entry is not the given one (0 unless two LUT entries are closer than the 16-bit rounding of the clustered
        values): those keep their index here, but a training step may move them."""
        rows = self.rows()
        given = palette if isinstance(palette, Palette) else None
        lut = palette.lut if given is not None else palette
        expected = tuple(self.weight_centroids.shape)
        if not isinstance(lut, torch.Tensor) or tuple(lut.shape) != expected or not lut.is_floating_point():
            raise ValueError(
                f"the palette of '{name}' has a LUT of shape {tuple(getattr(lut, 'shape', ()))}, expected a float "
                f"tensor of shape {expected} (groups x 2**bits of this module's EDKMConfig)"
            )
        if not bool(torch.isfinite(lut).all()):
            raise ValueError(f"the palette of '{name}' has NaN or infinite LUT entries")
        scale = None if given is None else given.scale
        if given is not None and (scale is None) != (self.weight_scale is None):
            has = "has" if scale is not None else "has no"
            raise ValueError(
                f"the palette of '{name}' {has} a per-channel scale but the module is configured "
                f"{'without' if self.weight_scale is None else 'with'} one; use an EDKMConfig with "
                f"enable_per_channel_scale={scale is not None}"
            )
        if given is not None and tuple(given.shape) != tuple(rows.shape):
            raise ValueError(
                f"the palette of '{name}' is for a {tuple(given.shape)} weight, the module's is {tuple(rows.shape)}"
            )
        if given is not None and given.bits != self.spec.bits:
            raise ValueError(f"the palette of '{name}' has {given.bits}-bit indices, the module {self.spec.bits}")
        if scale is not None:
            self.weight_scale.copy_(scale)
        self.weight_centroids.copy_(lut.to(self.weight_centroids.dtype))
        mismatched = 0
        if given is not None:
            indices = given.indices().to(rows.device)
            rows.copy_(decode(indices, self.weight_centroids.to(self.lut_dtype), self.stored_scale(), dtype=rows.dtype))
            self._snap_cache = self._soft_cache = self._given_indices = None
            mismatched = int((self.nearest_indices() != indices).sum())
        self.set_temperature_from_centroids()
        if given is not None:
            self._given_indices = (self._snap_key(), indices.to(torch.uint8))
        return mismatched

    @torch.no_grad()
    def palette(self) -> Palette:
        """This module's palettization as :func:`optimum_edkm.palettize` would store it (snapped indices)."""
        indices, lut = self.snap()
        return Palette.from_indices(self.palette_format, indices, lut, self.weight_scale)

    @torch.no_grad()
    def set_temperature_from_centroids(self) -> None:
        """Absolute temperature := ``relative_temperature`` times the squared mean spacing of neighbouring
        centroids (centroids sorted per group, as k-means and post-training palettization leave them)."""
        centroids = self.weight_centroids
        spacing = (centroids.amax(1) - centroids.amin(1)) / max(self.spec.num_clusters - 1, 1)
        tau = self.relative_temperature * float(spacing.pow(2).mean())
        self.weight_temperature.fill_(max(tau, torch.finfo(torch.float32).tiny))
        self._snap_cache = self._soft_cache = None

    # ---------------------------------------------------------------------------------------------- forward
    def clustered_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (in the module's own layout)."""
        if not self.clustering_enabled:
            return self.weight
        if not self.training:
            return self.snapped_weight()
        if self.share_clustered_weight and self._soft_cache is not None and self._soft_cache[0] == self._soft_key():
            return self._soft_cache[1]
        engine = edkm_cluster if self.use_uniquify else dkm_reference

        def cluster():
            return engine(self.rows(), self.weight_centroids, self.engine_spec(), scale=self.weight_scale)

        out = self.saved_tensor_policy(cluster) if self.saved_tensor_policy is not None else cluster()
        # in place, so that DDP's buffer synchronisation keeps tracking this tensor; the engines keep their own
        # copy of the starting centroids for backward
        with torch.no_grad():
            self.weight_centroids.copy_(out.centroids)
        self._snap_cache = None
        weight = self.rows(out.weight)
        self._soft_cache = (self._soft_key(), weight) if self.share_clustered_weight else None
        return weight

    def _soft_key(self) -> tuple:
        return (self.weight._version, self.weight.data_ptr(), self.weight_centroids._version, torch.is_grad_enabled())

    @torch.no_grad()
    def _snap_key(self) -> tuple:
        return (self.weight._version, self.weight.data_ptr(), id(self.weight_centroids), self.weight_centroids._version)

    def snap(self):
        """Indices (uint8, ``[out, in]``) and the LUT as it will be stored: the indices given to :meth:`start_from`
        while weight and LUT are still as it left them, else :meth:`nearest_indices`."""
        lut = self.weight_centroids.to(self.lut_dtype)
        if self._given_indices is not None and self._given_indices[0] == self._snap_key():
            return self._given_indices[1], lut
        return self.nearest_indices(), lut

    def nearest_indices(self) -> torch.Tensor:
        """Each weight's nearest entry of the LUT as it will be stored (uint8, ``[out, in]``)."""
        lut = self.weight_centroids.to(self.lut_dtype).to(self.weight_centroids.dtype)
        return hard_assign(self.rows().detach(), lut, self.spec, scale=self.weight_scale).indices

    def stored_scale(self) -> Optional[torch.Tensor]:
        return None if self.weight_scale is None else self.weight_scale.to(self.lut_dtype)

    def snapped_weight(self) -> torch.Tensor:
        """Dense weight after snapping, exactly what the palettized module computes; cached until the weight or
        the centroids change."""
        key = self._snap_key()
        if self._snap_cache is None or self._snap_cache[0] != key:
            indices, lut = self.snap()
            dense = decode(indices, lut, self.stored_scale(), dtype=self.weight.dtype)
            self._snap_cache = (key, self.rows(dense))
        return self._snap_cache[1]

    # ----------------------------------------------------------------------------------------- conversions
    @torch.no_grad()
    def palettize(self) -> nn.Module:
        """The palettized module: every weight snapped to its nearest centroid (LUT + packed indices)."""
        indices, lut = self.snap()
        palettized = self.palettized_class.from_snapped(self, indices, lut, self.stored_scale())
        palettized.train(self.training)
        return palettized

    @torch.no_grad()
    def to_float(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """A plain float module holding the snapped weights (loads without optimum-edkm)."""
        return self.palettized_class.float_module_from_rows(self, self.rows(self.snapped_weight()).detach(), dtype)

    # ------------------------------------------------------------------------------------------ statistics
    @torch.no_grad()
    def assignment_sample(self, positions: torch.Tensor):
        """Nearest-centroid labels and soft-assignment entropy (nats) of the weights at flat ``positions``
        (row-major over ``[out, in]``), at the current temperature."""
        rows = self.rows().detach()
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
                larger = [c for c in row[j + 1 :] if c - row[j] > limit]
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
            self._snap_cache = self._soft_cache = None
        return moved

    def clustering_repr(self) -> str:
        granularity = (
            "per_tensor" if self.spec.group_size is None else f"per_grouped_channel(group_size={self.spec.group_size})"
        )
        scale = ", per_channel_scale" if self.weight_scale is not None else ""
        return f"bits={self.spec.bits}, {granularity}{scale}"

    # --------------------------------------------------------------------------------------- torch plumbing
    def _apply(self, fn, recurse=True):
        # ``model.half()`` casts the float weight (the user's intent) but not the clustering state: fp32
        # centroids, temperature and scale keep their exact values; device moves still apply to them.
        kept = {name: getattr(self, name) for name in _STATE_BUFFERS if getattr(self, name, None) is not None}
        result = super()._apply(fn, recurse)
        for name, before in kept.items():
            moved = getattr(self, name)
            if moved.dtype != before.dtype:
                self._buffers[name] = before.to(device=moved.device)
        self._snap_cache = self._soft_cache = None
        return result

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        stored = state_dict.get(key)
        if (
            isinstance(stored, torch.Tensor)
            and stored.dim() == CHECKPOINT_WEIGHT_DIM
            and stored.shape[0] == 1
            and stored.dim() == self.weight.dim() + 1
        ):
            state_dict = dict(state_dict)
            state_dict[key] = stored[0]
        self._snap_cache = self._soft_cache = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def is_clustered(module: nn.Module) -> bool:
    """A train-time module with a float weight and centroids."""
    return isinstance(module, ClusteredModule)


def _meta_or(device, module):
    return module.weight.device if device is None else device


@register_clustered_module(nn.Linear)
class EDKMLinear(ClusteredModule, nn.Linear):
    """``nn.Linear`` whose forward uses the eDKM-clustered weight (a subclass, so PEFT and optimizers see an
    ordinary Linear with a trainable float ``weight``)."""

    palettized_class = PalettizedLinear
    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        palette: PaletteFormat,
        options: ClusteringOptions = ClusteringOptions(),
        device=None,
        dtype=None,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_clustering(palette, options, out_features, device)

    @staticmethod
    def _float_arguments(module: nn.Linear) -> tuple[tuple, dict]:
        return (module.in_features, module.out_features, module.bias is not None), {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.clustered_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.clustering_repr()}"


@register_clustered_module(Conv1D)
class EDKMConv1D(ClusteredModule, Conv1D):
    """transformers' ``Conv1D`` (GPT-2 style, weight ``[in, out]``) with an eDKM-clustered weight; output
    channels are its columns."""

    palettized_class = PalettizedConv1D
    kind = "linear"

    def __init__(
        self,
        nf: int,
        nx: int,
        palette: PaletteFormat,
        options: ClusteringOptions = ClusteringOptions(),
        device=None,
        dtype=None,
    ):
        nn.Module.__init__(self)
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        self._init_clustering(palette, options, nf, device)

    @staticmethod
    def _float_arguments(module: Conv1D) -> tuple[tuple, dict]:
        return (module.nf, module.nx), {}

    def rows(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return (whole_tensor(self.weight) if weight is None else weight).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rows(self.clustered_weight()).to(x.dtype), self.bias)

    def __repr__(self) -> str:
        return f"EDKMConv1D(nf={self.nf}, nx={self.nx}, {self.clustering_repr()})"


@register_clustered_module(nn.Embedding)
class EDKMEmbedding(ClusteredModule, nn.Embedding):
    """``nn.Embedding`` whose lookup table is eDKM-clustered (rows = tokens are the output channels). A scaled
    word embedding (Gemma's) keeps its factor as ``embed_scale``: the rows are multiplied by it, the clustered
    table (which a tied output head reads) is not."""

    palettized_class = PalettizedEmbedding
    kind = "embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        palette: PaletteFormat,
        options: ClusteringOptions = ClusteringOptions(),
        padding_idx: Optional[int] = None,
        embed_scale: Optional[float] = None,
        device=None,
        dtype=None,
    ):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)
        self.embed_scale = embed_scale
        self._init_clustering(palette, options, num_embeddings, device)

    @staticmethod
    def _float_arguments(module: nn.Embedding) -> tuple[tuple, dict]:
        arguments = {"padding_idx": module.padding_idx, "embed_scale": embedding_scale(module)}
        return (module.num_embeddings, module.embedding_dim), arguments

    @classmethod
    def unsupported(cls, module: nn.Module) -> Optional[str]:
        if type(module).__name__.endswith("ScaledWordEmbedding") and embedding_scale(module) is not None:
            return None  # transformers' scaled word embeddings compute lookup * embed_scale, which this class does
        return super().unsupported(module)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(
            input_ids,
            self.clustered_weight(),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
        return scale_rows(rows, self.embed_scale)

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else f", embed_scale={self.embed_scale}"
        return f"{nn.Embedding.extra_repr(self)}, {self.clustering_repr()}{scale}"


class EDKMTiedLinear(nn.Linear):
    """The output head of a model whose input embedding is clustered and tied to it: it computes logits with
    the embedding's clustered weight (one set of centroids serves both uses) and has no clustering state of its
    own. Its ``weight`` is the embedding's parameter, as transformers ties them."""

    edkm_role = "tied-head"

    def __init__(self, embedding: EDKMEmbedding, bias: Optional[torch.Tensor] = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.__dict__["tied_embedding"] = embedding  # a reference, not a submodule (no state twice)
        self.weight = embedding.weight
        self.bias = bias
        embedding.share_clustered_weight = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.tied_embedding.clustered_weight().to(x.dtype), self.bias)

    def retie(self) -> None:
        """Point ``weight`` at the embedding's current parameter (after it was replaced, e.g. on loading)."""
        self.weight = self.tied_embedding.weight

    @torch.no_grad()
    def palettize(self, embedding: PalettizedEmbedding) -> nn.Module:
        return PalettizedTiedLinear(embedding, bias=self.bias)

    @torch.no_grad()
    def to_float(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        return float_linear(self.tied_embedding.snapped_weight().detach(), self.bias, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the clustered embedding"


def _adopt(clustered: nn.Module, module: nn.Module) -> nn.Module:
    """Give ``clustered`` (built on the meta device, so no weight memory is allocated twice) the float module's
    own parameters, and its clustering buffers on the weight's device (placeholders until ``init_clusters``)."""
    device = module.weight.device
    clustered.weight = module.weight
    if getattr(module, "bias", None) is not None:
        clustered.bias = module.bias
    for name, buffer in list(clustered._buffers.items()):
        if buffer is not None:
            filler = 1.0 if name in ("weight_temperature", "weight_scale") else 0.0
            clustered._buffers[name] = torch.full(buffer.shape, filler, dtype=buffer.dtype, device=device)
    # a module built fresh is in training mode: take the float module's mode, or an eval-mode model would run
    # soft clustering (and move its centroids) in inference
    clustered.train(module.training)
    return clustered
