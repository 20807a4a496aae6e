"""Just-in-time build of the package's C++ sources (``optimum_edkm/kernels/csrc/``).

A layer-0 module: the clustering engine (``clustering.patterns``) and the LUT kernel (``kernels.lut``) both load
their extensions through it, so neither imports the other.

The extension is compiled once per machine and checkout (``torch.utils.cpp_extension.load``, cached under
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) with ``-march=native``. The CPU's feature flags, the
torch version and the sources (their contents and where they are) are part of the extension's name, so a cache
shared between machines never runs code built for another CPU, and two checkouts of the package do not rebuild
each other's build folder in turn. A build interrupted by a killed process leaves torch's lock file behind, on
which every later build would wait forever: a lock older than :data:`STALE_LOCK_SECONDS` is removed with a
warning. ``OPTIMUM_EDKM_DISABLE_KERNELS=1`` forces the pure-torch paths (useful to compare them).
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
#: a build lock older than this is taken to be left by a killed build (a build takes 1-3 minutes on 2 cores)
STALE_LOCK_SECONDS = 20 * 60


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
    import torch

    digest = hashlib.sha256(torch.__version__.encode())
    for path in paths:
        digest.update(os.path.abspath(path).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()[:10]


def _build_directory(module_name: str) -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions", "optimum_edkm"
    )
    return os.path.join(root, module_name)


def _remove_stale_lock(build_directory: str, now: Optional[float] = None) -> bool:
    """Remove torch's build lock when it is older than :data:`STALE_LOCK_SECONDS`; returns whether it did."""
    import time

    lock = os.path.join(build_directory, "lock")
    try:
        age = (time.time() if now is None else now) - os.path.getmtime(lock)
    except OSError:
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    warnings.warn(
        f"optimum-edkm: removing a build lock left {age / 60:.0f} minutes ago by an interrupted build ({lock})",
        RuntimeWarning,
        stacklevel=3,
    )
    try:
        os.remove(lock)
    except FileNotFoundError:
        pass
    return True


@functools.lru_cache(maxsize=None)
def load_extension(name: str, sources: tuple, extra_cflags: tuple = (), headers: tuple = ()) -> Optional[object]:
    """Build (once) and import the extension made of ``sources`` (file names under ``csrc/``); ``headers``: the
    files under ``csrc/`` they include (part of the build's name, so that editing one rebuilds).

    Returns the extension module, or ``None`` when kernels are disabled or the build fails (no compiler, no
    ninja, ...); the failure is reported once as a ``RuntimeWarning`` naming the cause and the fix.
    """
    if kernels_disabled():
        return None
    paths = [os.path.join(CSRC, source) for source in sources]
    try:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-march=native", "-fopenmp", *extra_cflags]
        digest = _source_digest(paths + [os.path.join(CSRC, header) for header in headers])
        module_name = f"optimum_edkm_{name}_{_cpu_fingerprint()}_{digest}"
        build_directory = _build_directory(module_name)
        os.makedirs(build_directory, exist_ok=True)
        _remove_stale_lock(build_directory)
        logger.info("loading the C++ kernel %s (built once per machine and checkout)", name)
        return load(
            name=module_name,
            sources=paths,
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=build_directory,
            verbose=False,
        )
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
