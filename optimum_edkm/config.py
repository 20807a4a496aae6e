"""``EDKMConfig``: the quantization config users pass to ``from_pretrained``, stored in ``config.json``.

It describes the checkpoint (the stored layout: bits per module, LUT granularity, scales, LUT dtype, which
modules stay in floating point) and the clustering hyper-parameters that define the train-time modules.
How training keeps tensors for backward (offloading, sharding) is a training-time option
(:func:`optimum_edkm.marshaling.saved_tensor_policy`, ``EDKMTrainingArguments``) and never reaches the checkpoint.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .clustering import ClusteringSpec
from .clustering.spec import check_bits
from .nn.formats import LUT_DTYPES, ClusteringOptions, PaletteFormat
from .validation import check_bool, check_int
from .version import __version__

QUANT_METHOD = "edkm"
#: ``quant_method`` as written to ``config.json``. Loading a palettized checkpoint without ``import optimum_edkm``
#: makes transformers warn "Unknown quantization type, got <quant_method> - supported types are: ..." before its
#: size-mismatch table: the one field of ours it prints, so it names the fix. Both forms load.
SAVED_QUANT_METHOD = "edkm (pip install optimum-edkm, then import optimum_edkm before from_pretrained)"
GRANULARITIES = ("per_tensor", "per_grouped_channel")
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
#: fields of optimum-edkm 0.1 configs that are now training-time options (accepted when loading old checkpoints)
_TRAINING_TIME_FIELDS = ("shard", "offload")


class EDKMConfig(QuantizationConfigMixin):
    """Train-time weight clustering (eDKM palettization).

    Args:
        bits: index width of the Linear layers (1-8); each LUT has ``2**bits`` entries.
        granularity: ``"per_tensor"`` (one LUT per weight) or ``"per_grouped_channel"`` (one LUT per
            ``group_size`` consecutive output channels).
        group_size: output channels per LUT; required with ``per_grouped_channel``, must be ``None`` otherwise.
        enable_per_channel_scale: divide each output channel by half its range before clustering (the scale is
            stored, in the LUT dtype, next to the LUT).
        temperature: softmax temperature of the soft assignment, *relative* to the squared mean spacing of
            neighbouring centroids at initialisation (so it means the same at any weight scale and bit width).
            Small values approach hard assignment.
        iterations: differentiable centroid updates per forward pass.
        tolerance: stop the updates early once no centroid moves by more than this (absolute, in units of the
            clustered values); ``0`` always runs ``iterations`` updates.
        embedding_bits: bits of the input embedding; ``None`` leaves embeddings in floating point. A tied
            embedding is palettized once: the output head reads the same LUT and indices.
        module_bits: bits of individual modules by exact name (e.g. from a sensitivity-based allocation),
            overriding ``bits`` / ``embedding_bits``.
        modules_to_not_convert: module names (prefixes, suffixes or regexes, as transformers matches them) kept in
            floating point. ``None``: transformers' defaults (``lm_head``; a tied embedding unless
            ``embedding_bits`` is set).
        seed: seed of the k-means initialisation (identical on every process).
        uniquify: cluster over distinct 16-bit values (eDKM). ``False`` runs plain DKM (large memory).
        lut_dtype: dtype the LUT and scale are stored in: ``"float16"`` (what Core ML takes) or ``"float32"``.
        float_dtype: dtype the float32 float parts of the palettized model are stored in (what is not
            palettized: a tied embedding / output head kept in floating point, norms, ``modules_to_not_convert``):
            ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``; parts already in 16 bits keep their dtype.
            In 16 bits, Linear / Embedding weights stay in 16 bits in memory and are computed with float32
            accumulation (:mod:`optimum_edkm.nn.stored16`), and the model still computes in float32. ``None``: as
            the model holds them (checkpoints saved before this option).
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
        module_bits: Optional[dict] = None,
        modules_to_not_convert: Optional[list] = None,
        seed: int = 0,
        uniquify: bool = True,
        lut_dtype: str = "float16",
        float_dtype: Optional[str] = "float16",
        palettized: bool = False,
        **kwargs: Any,
    ):
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method not in (QUANT_METHOD, SAVED_QUANT_METHOD):
            raise ValueError(f"EDKMConfig has quant_method '{QUANT_METHOD}', got '{quant_method}'")
        self.edkm_version = kwargs.pop("edkm_version", None) or __version__
        for name in _TRAINING_TIME_FIELDS:
            if name in kwargs and kwargs.pop(name) not in (False, None):
                warnings.warn(
                    f"EDKMConfig.{name} is no longer part of the checkpoint config: saving tensors for backward is "
                    f"a training-time option now (EDKMTrainingArguments(offload_saved_tensors=..., "
                    f"shard_saved_tensors=...) or optimum_edkm.marshaling.saved_tensor_policy); ignored",
                    FutureWarning,
                    stacklevel=2,
                )
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
        self.module_bits = module_bits
        self.modules_to_not_convert = modules_to_not_convert
        self.seed = seed
        self.uniquify = uniquify
        self.lut_dtype = lut_dtype
        self.float_dtype = float_dtype
        self.palettized = palettized
        self.post_init()

    def to_dict(self) -> dict:
        """The fields as ``config.json`` stores them (``quant_method`` in its saved form,
        :data:`SAVED_QUANT_METHOD`)."""
        data = super().to_dict()
        data["quant_method"] = SAVED_QUANT_METHOD
        return data

    @staticmethod
    def valid_fields() -> list:
        return [
            "bits",
            "granularity",
            "group_size",
            "enable_per_channel_scale",
            "temperature",
            "iterations",
            "tolerance",
            "embedding_bits",
            "module_bits",
            "modules_to_not_convert",
            "seed",
            "uniquify",
            "lut_dtype",
            "float_dtype",
            "palettized",
        ]

    def post_init(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"EDKMConfig.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "per_grouped_channel":
            if self.group_size is None:
                raise ValueError(
                    "EDKMConfig.group_size must be a positive integer with granularity='per_grouped_channel' "
                    "(output channels per LUT, e.g. 16), got None"
                )
        elif self.group_size is not None:
            raise ValueError(
                "EDKMConfig.group_size is only used with granularity='per_grouped_channel'; set that "
                f"granularity or leave group_size=None (got group_size={self.group_size!r})"
            )
        # the engine's own spec validates the clustering fields (one set of rules for every entry point)
        try:
            ClusteringSpec(
                bits=self.bits,
                group_size=self.group_size,
                temperature=self.temperature,
                iterations=self.iterations,
                tolerance=self.tolerance,
            )
        except ValueError as error:
            raise ValueError(f"EDKMConfig.{error}") from None
        if self.embedding_bits is not None:
            check_bits(self.embedding_bits, "EDKMConfig.embedding_bits")
        if self.module_bits is not None:
            if not isinstance(self.module_bits, dict) or not all(isinstance(k, str) for k in self.module_bits):
                raise ValueError(
                    f"EDKMConfig.module_bits must be a dict of module name -> bits, got {self.module_bits!r}"
                )
            for name, value in self.module_bits.items():
                check_bits(value, f"EDKMConfig.module_bits[{name!r}]")
            self.module_bits = dict(sorted(self.module_bits.items()))
        for field in ("enable_per_channel_scale", "uniquify", "palettized"):
            check_bool(getattr(self, field), f"EDKMConfig.{field}")
        if self.modules_to_not_convert is not None and (
            not isinstance(self.modules_to_not_convert, (list, tuple))
            or not all(isinstance(name, str) for name in self.modules_to_not_convert)
        ):
            raise ValueError(
                f"EDKMConfig.modules_to_not_convert must be a list of module names, got {self.modules_to_not_convert!r}"
            )
        if self.modules_to_not_convert is not None:
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        check_int(self.seed, "EDKMConfig.seed")
        if self.lut_dtype not in LUT_DTYPES:
            raise ValueError(f"EDKMConfig.lut_dtype must be one of {tuple(LUT_DTYPES)}, got {self.lut_dtype!r}")
        if self.float_dtype is not None and self.float_dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"EDKMConfig.float_dtype must be one of {FLOAT_DTYPES} (or None: keep the model's dtype), got "
                f"{self.float_dtype!r}"
            )

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        # a config saved before float_dtype existed describes float parts stored in the model's own dtype
        if "float_dtype" not in config_dict:
            config_dict = {**config_dict, "float_dtype": None}
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def float_dtype_16bit(self) -> Optional[torch.dtype]:
        """The 16-bit torch dtype of the float parts, ``None`` when they are not stored in 16 bits."""
        return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.float_dtype)

    # ------------------------------------------------------------------------------------------ per module
    def bits_for(self, name: str, kind: str) -> Optional[int]:
        """Index width of module ``name`` (``kind`` "linear" or "embedding"); ``None``: not clustered."""
        if self.module_bits is not None and name in self.module_bits:
            return self.module_bits[name]
        return self.embedding_bits if kind == "embedding" else self.bits

    def palette_format(self, name: str, kind: str) -> PaletteFormat:
        """How module ``name`` is stored once palettized."""
        bits = self.bits_for(name, kind)
        if bits is None:
            raise ValueError(f"module {name!r} ({kind}) is not clustered by this config")
        return PaletteFormat(
            bits=bits,
            group_size=self.group_size,
            per_channel_scale=self.enable_per_channel_scale,
            lut_dtype=LUT_DTYPES[self.lut_dtype],
        )

    def clustering_options(self) -> ClusteringOptions:
        return ClusteringOptions(
            relative_temperature=float(self.temperature),
            iterations=self.iterations,
            tolerance=float(self.tolerance),
            uniquify=self.uniquify,
        )
