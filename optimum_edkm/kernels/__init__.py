"""Compiled kernels (C++ built just in time with ``torch.utils.cpp_extension``).

Every kernel has a pure-torch reference path in the library; the compiled one is used when it builds, and the
reference is used (with one warning) when it does not.
"""

from .build import kernels_disabled, load_extension

__all__ = ["kernels_disabled", "load_extension"]
