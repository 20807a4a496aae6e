"""eDKM's per-weight passes, keyed by 16-bit bit patterns: no per-weight index is ever stored.

Every weight maps to a *key* ``group * 65536 + pattern``, the 16-bit pattern of its clustered value (the weight,
divided by its row's scale, rounded to bf16/fp16). Tables indexed by key (``groups * 65536`` entries) replace
the compacted distinct-value index of :func:`~optimum_edkm.clustering.uniquify`: the forward pass counts keys
and gathers the clustered value of each weight from a table; the backward pass sums the output gradient per
key and writes each weight's gradient from two tables. The key is recomputed from the weight each time, which
is cheaper than storing (and re-reading) a per-weight index.

Two implementations with the same results:

* :class:`TorchPatternOps` - pure torch, any device and dtype (the reference; fp64 weights always use it);
* the compiled CPU kernel ``optimum_edkm/kernels/csrc/edkm_patterns.cpp`` (fused single passes, no per-weight
  temporaries; fp32/bf16/fp16 weights, fp32 compute), used when it builds (:func:`compiled_ops`).

Forward results agree bit for bit; the per-key gradient sums differ in summation order only (the kernel sums in
float64).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .uniquify import PATTERNS, bit_patterns

#: tables indexed by key are ``groups * 65536`` long; above this many entries the sorted path is used instead
MAX_DENSE_KEYS = 1 << 25
_KIND = {torch.bfloat16: 0, torch.float16: 1}


class TorchPatternOps:
    """Pure-torch reference of the pattern-keyed passes (same signatures as the compiled kernel)."""

    @staticmethod
    def keys(weight: torch.Tensor, scale: Optional[torch.Tensor], groups: int, kind: int) -> torch.Tensor:
        """int32 key of every weight, row-major."""
        rows = weight.shape[0]
        values = weight.reshape(rows, -1)
        if scale is not None:
            values = values.to(scale.dtype) / scale.unsqueeze(1)
        target = torch.bfloat16 if kind == 0 else torch.float16
        patterns = bit_patterns(values.to(target))
        if groups > 1:
            offsets = torch.arange(groups, dtype=torch.int32, device=weight.device) * PATTERNS
            patterns = patterns.view(groups, -1).add_(offsets.unsqueeze(1))
        return patterns.reshape(-1)

    @classmethod
    def count_patterns(cls, weight, scale, groups: int, kind: int) -> torch.Tensor:
        keys = cls.keys(weight, scale, groups, kind)
        return torch.bincount(keys, minlength=groups * PATTERNS)

    @classmethod
    def gather_table(cls, weight, scale, groups: int, kind: int, table: torch.Tensor) -> torch.Tensor:
        out = table[cls.keys(weight, scale, groups, kind)].view(weight.shape[0], -1)
        if scale is not None:
            out = out * scale.unsqueeze(1)
        return out.view(weight.shape).to(weight.dtype)

    @classmethod
    def pattern_sums(cls, weight, scale, groups: int, kind: int, grad) -> Tuple[torch.Tensor, torch.Tensor]:
        keys = cls.keys(weight, scale, groups, kind)
        grad = grad.reshape(weight.shape[0], -1).to(table_dtype(weight))
        if scale is not None:
            grad = grad * scale.unsqueeze(1)
        counts = torch.bincount(keys, minlength=groups * PATTERNS)
        sums = torch.bincount(keys, weights=grad.reshape(-1), minlength=groups * PATTERNS)
        return counts, sums

    @classmethod
    def weight_grad(cls, weight, scale, groups: int, kind: int, grad, local, shift) -> torch.Tensor:
        keys = cls.keys(weight, scale, groups, kind)
        grad = grad.reshape(weight.shape[0], -1).to(local.dtype)
        if scale is not None:
            grad = grad * scale.unsqueeze(1)
        out = local[keys].view_as(grad).mul_(grad).add_(shift[keys].view_as(grad))
        if scale is not None:
            out = out / scale.unsqueeze(1)
        return out.view(weight.shape).to(weight.dtype)


def table_dtype(weight: torch.Tensor) -> torch.dtype:
    """dtype of the key-indexed tables and of the per-weight arithmetic: fp64 for fp64 weights, else fp32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def pattern_kind(dtype: torch.dtype) -> int:
    return _KIND[dtype]


def compiled_ops():
    """The compiled CPU kernels of the engine (per-weight passes and the DKM on pairs), or ``None`` when they
    cannot be built (or kernels are disabled with ``OPTIMUM_EDKM_DISABLE_KERNELS=1``)."""
    # the kernel loader imports nothing but torch: no dependency of the engine on the layers above it
    from ..kernels.build import load_extension

    return load_extension("edkm", ("edkm_patterns.cpp", "edkm_pairs.cpp", "edkm_bindings.cpp"),
                          ("-ffp-contract=off",))
