"""Measuring compressed models the same way for every method.

* :func:`evaluate_perplexity` - token-weighted perplexity with a fixed context length and stride;
* :func:`effective_bits`, :class:`WeightStorage` - bits per weight including scales, zero points, LUTs and
  every uncompressed parameter (the size rule of :mod:`optimum_edkm.storage`, at a deployment precision);
  :func:`optimum_edkm.nn.palettized_storage` gives the :class:`WeightStorage` of every eDKM module of a model.

The quality benchmark that compares methods with these (argument parsing, the run loop, tables and plots)
lives outside the package, in ``benchmarks/quality.py``.
"""

from ..storage import ModelSize, WeightStorage
from .bits import effective_bits
from .perplexity import PerplexityResult, Window, evaluate_perplexity, perplexity_windows

__all__ = [
    "ModelSize",
    "PerplexityResult",
    "WeightStorage",
    "Window",
    "effective_bits",
    "evaluate_perplexity",
    "perplexity_windows",
]
