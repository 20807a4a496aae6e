"""Compiled kernels (C++ built just in time with ``torch.utils.cpp_extension``).

Every kernel has a pure-torch reference path in the library; the compiled one is used when it builds, and the
reference is used (with one warning) when it does not. Extensions are built by :mod:`optimum_edkm.extensions`
(which also builds the clustering engine's ops from ``csrc/``).

* :func:`lut_linear` - the palettized linear layer (fused LUT GEMV on CPU, decode + GEMM for many rows);
* :func:`lut_decode` - the dense weight of a palettized layer;
* :func:`reference_lut_linear` - the pure-torch path both are checked against;
* :func:`linear16` - a linear layer on a float16 / bfloat16 weight with float32 accumulation (the float parts of a
  palettized model), and its pure-torch path :func:`reference_linear16`.
"""

from .lut import (
    kernel_available,
    kernel_isa,
    linear16,
    lut_decode,
    lut_linear,
    reference_linear16,
    reference_lut_linear,
    set_kernel_isa,
    supported_isas,
)

__all__ = [
    "kernel_available",
    "kernel_isa",
    "linear16",
    "lut_decode",
    "lut_linear",
    "reference_linear16",
    "reference_lut_linear",
    "set_kernel_isa",
    "supported_isas",
]
