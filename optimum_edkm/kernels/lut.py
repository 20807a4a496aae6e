"""Fused LUT linear: ``y = x @ decode(indices, lut, scale)^T + bias`` on the packed checkpoint format.

:func:`lut_linear` is what :class:`~optimum_edkm.PalettizedLinear` calls. On CPU it runs the C++ kernel
(``csrc/lut_linear.cpp``, registered as the torch operator ``torch.ops.optimum_edkm.lut_linear`` with a fake
implementation, so ``torch.compile`` sees it as one opaque node); on CUDA, for a few rows of ``x``, the Triton
kernel of :mod:`.triton_lut` when Triton is installed; everywhere else, and when the kernel cannot be built or
the rows are not byte-aligned, it runs :func:`reference_lut_linear`: the pure-torch ``unpack_indices`` +
``decode`` + ``F.linear``.

The kernel reads the packed stream in place (no second copy of the weight): for a few rows of ``x`` (decoding
tokens) it expands each chunk of indices in registers and never materialises the dense weight; from
:data:`GEMM_MIN_ROWS` rows on (prefill) it decodes tiles of at most :data:`GEMM_TILE_BYTES` and multiplies them
with torch's GEMM.
"""

from __future__ import annotations

import logging
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..clustering import decode, unpack_indices
from ..extensions import load_extension
from . import triton_lut

logger = logging.getLogger(__name__)

#: rows of ``x`` from which the weight is decoded in tiles and multiplied with torch's GEMM instead of the fused
#: kernel; 0 = the kernel's per-instruction-set default (measured with ``benchmarks/inference.py --kernel-sweep``)
GEMM_MIN_ROWS = 0
#: largest float32 tile of decoded weight rows on the GEMM path (bounds the extra memory of a big lm_head)
GEMM_TILE_BYTES = 8 << 20

_SOURCES = ("lut_linear.cpp", "lut_scalar.cpp", "lut_avx2.cpp", "lut_avx512.cpp")
#: rows of ``x`` from which :func:`linear16` converts tiles of the 16-bit weight and uses torch's GEMM; 0 = default
LINEAR16_GEMM_MIN_ROWS = 0

_state = {"resolved": False, "extension": None, "linear": None, "decode": None, "linear16": None, "direct": {}}


def _resolve():
    """Build/load the extension once per process and register the fake (meta) implementations of its ops."""
    if not _state["resolved"]:
        _state["resolved"] = True
        extension = load_extension("lut_linear", _SOURCES)
        if extension is not None:
            _register_fakes()
            _state["linear"] = torch.ops.optimum_edkm.lut_linear.default
            _state["decode"] = torch.ops.optimum_edkm.lut_decode.default
            _state["linear16"] = torch.ops.optimum_edkm.linear16.default
            _state["direct"] = {"linear": extension.lut_linear, "linear16": extension.linear16}
            logger.info("LUT kernel loaded (instruction set: %s)", extension.current_isa())
        _state["extension"] = extension
    return _state["extension"]


def _register_fakes() -> None:
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("optimum_edkm::lut_linear")
    def _lut_linear_fake(x, packed, lut, scale, bias, in_features, out_features, bits, gemm_min_rows, gemm_tile_bytes):
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("optimum_edkm::linear16")
    def _linear16_fake(x, weight, bias, gemm_min_rows, gemm_tile_bytes):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("optimum_edkm::lut_decode")
    def _lut_decode_fake(packed, lut, scale, in_features, out_features, bits, dtype):
        return packed.new_empty((out_features, in_features), dtype=dtype)

    _register_fakes.done = True


@torch.compiler.assume_constant_result
def kernel_available() -> bool:
    """Whether the compiled CPU kernel is in use (built and not disabled by ``OPTIMUM_EDKM_DISABLE_KERNELS``)."""
    return _resolve() is not None


def kernel_isa() -> Optional[str]:
    """The instruction set the CPU kernel runs (``avx512``, ``avx2`` or ``scalar``), ``None`` without kernel."""
    extension = _resolve()
    return None if extension is None else extension.current_isa()


def supported_isas() -> List[str]:
    """Instruction sets this CPU and build can run, lowest first (empty without kernel)."""
    extension = _resolve()
    return [] if extension is None else list(extension.supported_isas())


def set_kernel_isa(name: str) -> str:
    """Force the CPU kernel onto ``name`` (``best``, ``avx512``, ``avx2``, ``scalar``): for tests and benchmarks.
    Returns the instruction set now in use."""
    extension = _resolve()
    if extension is None:
        raise RuntimeError("the LUT kernel is not available (disabled or not built); nothing to configure")
    extension.set_isa(name)
    return extension.current_isa()


def reference_lut_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    lut: torch.Tensor,
    scale: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    in_features: int,
    out_features: int,
    bits: int,
    group_size: Optional[int] = None,
) -> torch.Tensor:
    """Pure-torch path: unpack, decode the dense weight in fp32, cast it to ``x``'s dtype, ``F.linear``."""
    indices = unpack_indices(packed, bits, out_features * in_features).view(out_features, in_features)
    return F.linear(x, decode(indices, lut, scale, dtype=x.dtype), bias)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_applies(x: torch.Tensor, in_features: int, bits: int) -> bool:
    # packed/lut on another device than x is a user error that the op reports
    return x.is_cpu and x.dtype in _KERNEL_DTYPES and (in_features * bits) % 8 == 0 and kernel_available()


def lut_decode(
    packed: torch.Tensor,
    lut: torch.Tensor,
    scale: Optional[torch.Tensor],
    in_features: int,
    out_features: int,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense ``[out, in]`` weight ``scale[row] * lut[group(row), index]`` (computed in fp32, then cast):
    the C++ decode on CPU when it applies, else the pure-torch ``decode``."""
    if packed.is_cpu and (in_features * bits) % 8 == 0 and kernel_available():
        return _state["decode"](packed, lut, scale, in_features, out_features, bits, dtype)
    indices = unpack_indices(packed, bits, out_features * in_features).view(out_features, in_features)
    return decode(indices, lut, scale, dtype=dtype)


def _kernel(name: str):
    """The compiled function ``name``: the torch operator while ``torch.compile`` traces (one opaque node), else
    the same C++ function called directly (the dispatcher costs several microseconds a call, and decoding a token
    makes ~200 calls)."""
    if torch.compiler.is_compiling():
        return _state[name]
    return _state["direct"][name]


def _forward(x, packed, lut, scale, bias, in_features, out_features, bits):
    if _kernel_applies(x, in_features, bits):
        return _kernel("linear")(
            x, packed, lut, scale, bias, in_features, out_features, bits, GEMM_MIN_ROWS, GEMM_TILE_BYTES
        )
    if x.is_cuda and x.numel() <= triton_lut.MAX_ROWS * in_features and triton_lut.triton_available():
        return triton_lut.triton_lut_linear(x, packed, lut, scale, bias, in_features, out_features, bits)
    return reference_lut_linear(x, packed, lut, scale, bias, in_features, out_features, bits)


class _LutLinearFunction(torch.autograd.Function):
    """The forward (kernel or reference) with gradients for ``x`` and ``bias`` (the palette itself is frozen).
    Only the packed indices, LUT and scale are kept for backward: the dense weight is decoded again there (as
    bitsandbytes does for QLoRA), so a palettized layer under a graph costs no dense weight of memory."""

    @staticmethod
    def forward(ctx, x, packed, lut, scale, bias, in_features, out_features, bits):
        ctx.save_for_backward(packed, lut, scale)
        ctx.shape = (in_features, out_features, bits)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _forward(x, packed, lut, scale, bias, in_features, out_features, bits)

    @staticmethod
    def backward(ctx, grad):
        packed, lut, scale = ctx.saved_tensors
        in_features, out_features, bits = ctx.shape
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ lut_decode(packed, lut, scale, in_features, out_features, bits, grad.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            grad_bias = grad.reshape(-1, out_features).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, None, grad_bias, None, None, None


def lut_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    lut: torch.Tensor,
    scale: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    in_features: int,
    out_features: int,
    bits: int,
    group_size: Optional[int] = None,
) -> torch.Tensor:
    """``x @ decode(packed, lut, scale)^T + bias`` for a palettized ``[out_features, in_features]`` weight.

    ``packed``: the n-bit indices as stored in a checkpoint (flat uint8, LSB-first, row-major over
    ``[out, in]``); ``lut``: ``[groups, 2**bits]`` (groups of ``group_size`` consecutive output rows, one group
    when ``None``); ``scale``: optional per-output-row ``[out]``; ``bias``: optional ``[out]``. The result has
    ``x``'s dtype and shape ``x.shape[:-1] + (out_features,)``. Differentiable with respect to ``x`` and
    ``bias``; backward decodes the weight again instead of keeping it (kernel and pure-torch path alike).
    """
    if group_size is not None and lut.shape[0] * group_size != out_features:
        raise ValueError(
            f"lut_linear: a LUT of {lut.shape[0]} groups of {group_size} rows does not cover "
            f"{out_features} output rows; pass the group_size the weight was palettized with"
        )
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _LutLinearFunction.apply(x, packed, lut, scale, bias, in_features, out_features, bits)
    return _forward(x, packed, lut, scale, bias, in_features, out_features, bits)


# ------------------------------------------------------------------------------------------------ 16-bit weights
_WEIGHT16_DTYPES = (torch.float16, torch.bfloat16)


def reference_linear16(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-torch path of :func:`linear16`: the weight (and bias) cast to ``x``'s dtype, ``F.linear``."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def linear16(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight^T + bias`` for a weight stored in float16 / bfloat16 (``[out, in]``), computed in float32
    whatever the weight's dtype, returned in ``x``'s dtype. On CPU a fused GEMV reads the 16-bit rows once per up
    to 8 rows of ``x`` (decoding); many rows of ``x`` convert tiles of the weight for torch's GEMM. Elsewhere, and
    for gradients, :func:`reference_linear16`."""
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if (
        not needs_grad
        and x.is_cpu
        and x.dtype in _KERNEL_DTYPES
        and weight.dtype in _WEIGHT16_DTYPES
        and weight.is_contiguous()
        and kernel_available()
    ):
        return _kernel("linear16")(x, weight, bias, LINEAR16_GEMM_MIN_ROWS, GEMM_TILE_BYTES)
    return reference_linear16(x, weight, bias)
