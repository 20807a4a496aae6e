"""Measuring compressed models the same way for every method.

* :func:`evaluate_perplexity` - token-weighted perplexity with a fixed context length and stride;
* :func:`effective_bits`, :class:`WeightStorage` - bits per weight including scales, zero points, LUTs and
  every uncompressed parameter;
* :func:`palettized_storage` - the :class:`WeightStorage` of every palettized module of a model.

The quality benchmark that compares methods with these (argument parsing, the run loop, tables and plots)
lives outside the package, in ``benchmarks/quality.py``.
"""

from .bits import BitsReport, WeightStorage, effective_bits, palettized_storage
from .perplexity import PerplexityResult, Window, evaluate_perplexity, perplexity_windows

__all__ = [
    "BitsReport",
    "PerplexityResult",
    "WeightStorage",
    "Window",
    "effective_bits",
    "evaluate_perplexity",
    "palettized_storage",
    "perplexity_windows",
]
