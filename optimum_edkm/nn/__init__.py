"""Module classes: train-time clustered modules and the palettized modules they snap to.

``nn.Linear -> EDKMLinear -> PalettizedLinear``, ``Conv1D -> EDKMConv1D -> PalettizedConv1D``,
``nn.Embedding -> EDKMEmbedding -> PalettizedEmbedding`` (one table, :mod:`.registry`); a tied output head
becomes :class:`EDKMTiedLinear` / :class:`PalettizedTiedLinear`, which read the embedding's palette.
"""

from .clustered import (
    CHECKPOINT_WEIGHT_DIM,
    ClusteredModule,
    EDKMConv1D,
    EDKMEmbedding,
    EDKMLinear,
    EDKMTiedLinear,
    is_clustered,
)
from .formats import LUT_DTYPES, ClusteringOptions, Palette, PaletteFormat
from .palettized import (
    PalettizedConv1D,
    PalettizedEmbedding,
    PalettizedLinear,
    PalettizedModule,
    PalettizedTiedLinear,
    ScaledEmbedding,
    embedding_scale,
    is_palettized,
)
from .registry import clustered_class_for, palettized_storage, register_clustered_module

__all__ = [
    "CHECKPOINT_WEIGHT_DIM",
    "ClusteredModule",
    "ClusteringOptions",
    "EDKMConv1D",
    "EDKMEmbedding",
    "EDKMLinear",
    "EDKMTiedLinear",
    "LUT_DTYPES",
    "Palette",
    "PaletteFormat",
    "PalettizedConv1D",
    "PalettizedEmbedding",
    "PalettizedLinear",
    "PalettizedModule",
    "PalettizedTiedLinear",
    "ScaledEmbedding",
    "clustered_class_for",
    "embedding_scale",
    "is_clustered",
    "is_palettized",
    "palettized_storage",
    "register_clustered_module",
]
