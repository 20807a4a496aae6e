"""Measuring compressed models the same way for every method.

* :func:`evaluate_perplexity` - token-weighted perplexity with a fixed context length and stride;
* :func:`effective_bits`, :class:`WeightStorage` - bits per weight including scales, zero points, LUTs and
  every uncompressed parameter;
* :class:`QuantizationReport` - what a compression method returns to the benchmark
  (``optimum_edkm.evaluation.quality`` is the benchmark harness itself).
"""

from .bits import BitsReport, QuantizationReport, WeightStorage, effective_bits
from .perplexity import PerplexityResult, Window, evaluate_perplexity, perplexity_windows

__all__ = [
    "BitsReport",
    "PerplexityResult",
    "QuantizationReport",
    "WeightStorage",
    "Window",
    "effective_bits",
    "evaluate_perplexity",
    "perplexity_windows",
]
