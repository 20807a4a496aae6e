"""RTN, GPTQ and AWQ weight quantization baselines in pure torch, applied in place as fake quantization.

Every function quantizes the linears (``nn.Linear``, ``Conv1D``) of the decoder layers (embeddings and the LM head stay
in float), writes the de-quantized weights back, and returns a :class:`BaselineResult`: what it stored per
weight (``storage``, which feeds :func:`~optimum_edkm.evaluation.effective_bits`), its settings and diagnostics.
All three use the same number format (:mod:`optimum_edkm.baselines.quantizer`), so they differ only in how the
weights are chosen.
"""

from .awq import awq, search_clip, search_scale
from .gptq import GPTQResult, gptq, gptq_quantize_weight
from .quantizer import QuantParams, fake_quantize, minmax_params, quantize_groupwise
from .result import BaselineResult
from .rtn import rtn

__all__ = [
    "BaselineResult",
    "GPTQResult",
    "QuantParams",
    "awq",
    "fake_quantize",
    "gptq",
    "gptq_quantize_weight",
    "minmax_params",
    "quantize_groupwise",
    "rtn",
    "search_clip",
    "search_scale",
]
