"""The CUDA path of the palettized linear layer: a Triton kernel on the checkpoint's packed format.

``y = x @ decode(indices, lut, scale)^T + bias`` for few rows of ``x`` (decoding): each program takes a tile of
``BLOCK_N`` output rows and ``BLOCK_M`` rows of ``x``, reads the tile's n-bit indices straight from the LSB-first
stream (two bytes per index, shifted and masked: an index may straddle a byte), looks them up in the rows' LUTs,
and accumulates ``x @ w^T`` in IEEE float32 whatever ``x``'s dtype (a few rows of ``x``: the loads bound the time,
not the arithmetic); the row scale is applied once per dot product and the bias at the end, as on CPU.

Many rows of ``x`` (prefill) keep the dense path (decode the weight, cuBLAS), which is compute-bound anyway.
Without Triton (not installed, or ``OPTIMUM_EDKM_DISABLE_KERNELS=1``) the dense path serves every call.

Tested on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, tests/test_kernels.py); **its speed on a GPU
has not been measured** (no GPU in this project's environment), nor have its block sizes been tuned.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch

from ..extensions import kernels_disabled

#: rows of ``x`` up to which CUDA calls take the Triton kernel (decoding); more rows decode the weight for cuBLAS
MAX_ROWS = 16


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the Triton kernel can run: Triton installed and kernels not disabled."""
    return not kernels_disabled() and importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def lut_linear_kernel(
        x_ptr,
        packed_ptr,
        lut_ptr,
        scale_ptr,
        bias_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_ym,
        rows_per_group,
        total_bytes,
        BITS: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rm < M, rn < N
        group = rn // rows_per_group
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            mask_x = mask_m[:, None] & mask_k[None, :]
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_x, other=0.0)
            # index (n, k) occupies bits [(n * K + k) * BITS, ... + BITS) of the stream
            bit = (rn[:, None].to(tl.int64) * K + rk[None, :]) * BITS
            byte = bit >> 3
            mask_w = mask_n[:, None] & mask_k[None, :]
            low = tl.load(packed_ptr + byte, mask=mask_w, other=0).to(tl.int32)
            high = tl.load(packed_ptr + byte + 1, mask=mask_w & (byte + 1 < total_bytes), other=0).to(tl.int32)
            index = ((low | (high << 8)) >> (bit & 7).to(tl.int32)) & ((1 << BITS) - 1)
            w = tl.load(lut_ptr + group[:, None] * (1 << BITS) + index, mask=mask_w, other=0.0)
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + rn, mask=mask_n, other=1.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + rm[:, None] * stride_ym + rn[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )

    return lut_linear_kernel


def triton_lut_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    lut: torch.Tensor,
    scale: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    in_features: int,
    out_features: int,
    bits: int,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """``x @ decode(packed, lut, scale)^T + bias`` with the Triton kernel (``x`` on the device of the palette;
    on CPU only under ``TRITON_INTERPRET=1``). Same arguments and result as
    :func:`optimum_edkm.kernels.lut_linear`."""
    import triton

    x2d = x.reshape(-1, in_features).contiguous()
    rows = x2d.shape[0]
    y = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    block_m = 16  # tl.dot's smallest tile
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _kernel()[grid](
        x2d,
        packed,
        lut.contiguous(),
        scale if scale is not None else lut,  # a valid pointer the kernel never reads
        bias if bias is not None else lut,
        y,
        rows,
        out_features,
        in_features,
        x2d.stride(0),
        y.stride(0),
        out_features // lut.shape[0],
        packed.numel(),
        BITS=bits,
        HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return y.view(*x.shape[:-1], out_features)
