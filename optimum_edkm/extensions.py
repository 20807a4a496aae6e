"""Just-in-time build of the package's C++ sources (``optimum_edkm/kernels/csrc/``).

A layer-0 module: the clustering engine (``clustering.patterns``) and the LUT kernel (``kernels.lut``) both load
their extensions through it, so neither imports the other.

The extension is compiled once per machine (``torch.utils.cpp_extension.load``, cached under
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) with ``-march=native``; the CPU's feature flags are
part of the extension's name, so a cache shared between machines never runs code built for another CPU.
``OPTIMUM_EDKM_DISABLE_KERNELS=1`` forces the pure-torch paths (useful to compare them).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import warnings
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "csrc")
DISABLE_ENV = "OPTIMUM_EDKM_DISABLE_KERNELS"


def kernels_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes")


def _cpu_fingerprint() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{flags}".encode()).hexdigest()[:10]


def _source_digest(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()[:10]


@functools.lru_cache(maxsize=None)
def load_extension(name: str, sources: tuple, extra_cflags: tuple = ()) -> Optional[object]:
    """Build (once) and import the extension made of ``sources`` (file names under ``csrc/``).

    Returns the extension module, or ``None`` when kernels are disabled or the build fails (no compiler, no
    ninja, ...); the failure is reported once as a ``RuntimeWarning`` naming the cause and the fix.
    """
    if kernels_disabled():
        return None
    paths = [os.path.join(CSRC, source) for source in sources]
    try:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-march=native", "-fopenmp", *extra_cflags]
        module_name = f"optimum_edkm_{name}_{_cpu_fingerprint()}_{_source_digest(paths)}"
        logger.info("building the C++ kernel %s (once per machine)", name)
        return load(name=module_name, sources=paths, extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # any build problem falls back to the reference path
        warnings.warn(
            f"optimum-edkm: the C++ kernel {name!r} could not be built ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[-1] if str(error).strip() else error}); the pure-torch path is used "
            f"instead and is slower. Install a C++ compiler and ninja (`pip install ninja`) to enable it, or set "
            f"{DISABLE_ENV}=1 to silence this warning.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
