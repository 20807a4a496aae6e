"""``EDKMConfig``: the quantization config users pass to ``from_pretrained``."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

from transformers.utils.quantization_config import QuantizationConfigMixin

from .clustering import ClusteringSpec
from .clustering.spec import check_bits

QUANT_METHOD = "edkm"
GRANULARITIES = ("per_tensor", "per_grouped_channel")
LUT_DTYPE_NAMES = ("float16", "float32")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class EDKMConfig(QuantizationConfigMixin):
    """Train-time weight clustering (eDKM palettization).

    Args:
        bits: index width of the Linear layers (1-8); each LUT has ``2**bits`` entries.
        granularity: ``"per_tensor"`` (one LUT per weight) or ``"per_grouped_channel"`` (one LUT per
            ``group_size`` consecutive output channels).
        group_size: output channels per LUT; required with ``per_grouped_channel``, must be ``None`` otherwise.
        enable_per_channel_scale: divide each output channel by half its range before clustering (the scale is
            stored, in fp16, next to the LUT).
        temperature: softmax temperature of the soft assignment, *relative* to the squared mean spacing of
            neighbouring centroids at initialisation (so it means the same at any weight scale and bit
            width). Small values approach hard assignment. The default 0.01 fine-tuned SmolLM2-135M to 3 bits
            best of 0.25 / 0.05 / 0.01 (docs/transformers.md): with a soft map the snapped model drifts from
            the soft one the network trains against.
        iterations: differentiable centroid updates per forward pass.
        tolerance: stop the updates early once no centroid moves by more than this (absolute, in units of the
            clustered values); ``0`` always runs ``iterations`` updates.
        embedding_bits: bits of the input embedding (the eDKM paper keeps embeddings at 8 bits); ``None``
            leaves embeddings in floating point. Not allowed when the embedding is tied to ``lm_head``.
        modules_to_not_convert: module names (prefixes, suffixes or regexes, as transformers matches them) kept in
            floating point. ``None``: transformers' defaults (``lm_head`` and any tied output embedding).
        seed: seed of the k-means initialisation (identical on every process).
        uniquify: cluster over distinct 16-bit values (eDKM). ``False`` runs plain DKM (large memory).
        shard: split tensors saved for backward across data-parallel processes.
        offload: move tensors saved for backward to the CPU (``True``) or pass marshaling options as a dict.
        lut_dtype: dtype the LUT and scale are stored in: ``"float16"`` (what Core ML takes) or ``"float32"``.
        palettized: set by ``optimum_edkm.palettize``: the checkpoint holds LUTs and packed indices.
    """

    def __init__(
        self,
        bits: int = 3,
        granularity: str = "per_tensor",
        group_size: Optional[int] = None,
        enable_per_channel_scale: bool = False,
        temperature: float = 0.01,
        iterations: int = 3,
        tolerance: float = 0.0,
        embedding_bits: Optional[int] = None,
        modules_to_not_convert: Optional[list] = None,
        seed: int = 0,
        uniquify: bool = True,
        shard: bool = False,
        offload: Union[bool, dict] = False,
        lut_dtype: str = "float16",
        palettized: bool = False,
        **kwargs: Any,
    ):
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"EDKMConfig has quant_method '{QUANT_METHOD}', got '{quant_method}'")
        self.edkm_version = kwargs.pop("edkm_version", None)
        if kwargs:
            raise ValueError(
                f"unknown EDKMConfig field(s): {', '.join(sorted(kwargs))}; valid fields are "
                f"{', '.join(self.valid_fields())}"
            )
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.granularity = granularity
        self.group_size = group_size
        self.enable_per_channel_scale = enable_per_channel_scale
        self.temperature = temperature
        self.iterations = iterations
        self.tolerance = tolerance
        self.embedding_bits = embedding_bits
        self.modules_to_not_convert = modules_to_not_convert
        self.seed = seed
        self.uniquify = uniquify
        self.shard = shard
        self.offload = offload
        self.lut_dtype = lut_dtype
        self.palettized = palettized
        if self.edkm_version is None:
            from . import __version__
            self.edkm_version = __version__
        self.post_init()

    @staticmethod
    def valid_fields() -> list:
        return ["bits", "granularity", "group_size", "enable_per_channel_scale", "temperature", "iterations",
                "tolerance", "embedding_bits", "modules_to_not_convert", "seed", "uniquify", "shard", "offload",
                "lut_dtype", "palettized"]

    def post_init(self):
        check_bits(self.bits, "EDKMConfig.bits")
        if self.embedding_bits is not None:
            check_bits(self.embedding_bits, "EDKMConfig.embedding_bits")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"EDKMConfig.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "per_grouped_channel":
            if not _is_int(self.group_size) or self.group_size < 1:
                raise ValueError(
                    f"EDKMConfig.group_size must be a positive integer with granularity='per_grouped_channel' "
                    f"(output channels per LUT, e.g. 16), got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                "EDKMConfig.group_size is only used with granularity='per_grouped_channel'; set that "
                f"granularity or leave group_size=None (got group_size={self.group_size!r})"
            )
        for field in ("enable_per_channel_scale", "uniquify", "shard", "palettized"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"EDKMConfig.{field} must be True or False, got {getattr(self, field)!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"EDKMConfig.temperature must be a finite number > 0, got {self.temperature!r}")
        if not _is_int(self.iterations) or self.iterations < 1:
            raise ValueError(f"EDKMConfig.iterations must be an integer >= 1, got {self.iterations!r}")
        if not isinstance(self.tolerance, (int, float)) or isinstance(self.tolerance, bool) \
                or not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise ValueError(f"EDKMConfig.tolerance must be a finite number >= 0, got {self.tolerance!r}")
        if self.modules_to_not_convert is not None and (
                not isinstance(self.modules_to_not_convert, (list, tuple))
                or not all(isinstance(name, str) for name in self.modules_to_not_convert)):
            raise ValueError(
                f"EDKMConfig.modules_to_not_convert must be a list of module names, got "
                f"{self.modules_to_not_convert!r}"
            )
        if self.modules_to_not_convert is not None:
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        if not _is_int(self.seed):
            raise ValueError(f"EDKMConfig.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.offload, (bool, dict)):
            raise ValueError(f"EDKMConfig.offload must be True, False or a dict of marshaling options, got "
                             f"{self.offload!r}")
        from .marshal import MarshalPolicy
        try:
            MarshalPolicy.from_config(self.offload)
        except (TypeError, ValueError) as error:
            raise ValueError(f"EDKMConfig.offload: {error}") from None
        if self.lut_dtype not in LUT_DTYPE_NAMES:
            raise ValueError(f"EDKMConfig.lut_dtype must be one of {LUT_DTYPE_NAMES}, got {self.lut_dtype!r}")

    def clustering_spec(self, embedding: bool = False) -> ClusteringSpec:
        """The engine spec for Linear layers (or the embedding); the absolute temperature is set per module."""
        return ClusteringSpec(
            bits=self.embedding_bits if embedding else self.bits,
            group_size=self.group_size,
            iterations=self.iterations,
            tolerance=float(self.tolerance),
        )
