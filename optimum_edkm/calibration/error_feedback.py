"""GPTQ's error feedback (Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023), the part shared by the uniform-grid
GPTQ baseline and post-training palettization onto LUTs: rounding a ``[rows, columns]`` weight one input column
at a time and pushing each column's rounding error onto the columns not rounded yet, weighted by the inverse
Hessian of the layer's output error. What a column is rounded *to* (a min-max grid, a LUT) is the caller's.

1. ``H = 2/N X^T X`` of the layer's calibration inputs (:func:`optimum_edkm.calibration.input_hessians`). Inputs
   that are always zero ("dead" columns): ``H_ii = 1``, ``W[:, i] = 0`` (:func:`working_copies`). Damping:
   ``H += damp * mean(diag H) * I`` (:func:`dampen`).
2. The upper Cholesky factor ``U`` of ``H^-1`` (:func:`upper_cholesky_of_inverse`). Row ``j`` of ``U`` is, up to
   the factor ``1/U_jj``, row ``j`` of the inverse Hessian of the columns not yet rounded, so the optimal update
   after rounding column ``j`` is ``W[:, j:] -= (w_j - q_j) / U_jj * U[j, j:]`` - no matrix is re-inverted.
3. Columns are processed in blocks of ``block_size`` ("lazy batch updates", :func:`error_feedback`): updates
   inside a block are applied at once, the rest of the matrix is updated once per block.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def working_copies(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the weight and the Hessian in the working dtype (fp64 for an fp64 weight, else fp32) on the
    weight's device. Dead inputs (zero Hessian diagonal) get ``H_jj = 1`` and zero weight."""
    dtype = _working_dtype(weight.dtype)
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(dtype=dtype, device=W.device).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def dampen(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Adds ``damp * mean(diag H)`` to the diagonal of ``H`` in place; returns ``H``."""
    diagonal = torch.arange(H.shape[0], device=H.device)
    H[diagonal, diagonal] += damp * torch.mean(torch.diag(H))
    return H


def check_block_and_damp(block_size, damp) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not damp > 0:
        raise ValueError(f"damp must be > 0 (fraction of the mean Hessian diagonal added to it), got {damp!r}")


def upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        L, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise ValueError(
            "the damped Hessian is not positive definite (too few or degenerate calibration tokens for this "
            "layer); increase damp or use more calibration data"
        )
    return L


@contextlib.contextmanager
def single_cpu_thread(device: torch.device):
    """The column loop is thousands of tiny operations plus small factorizations; on a CPU whose cores are busy
    with other work, OpenMP threads waiting for a core made them 10-50x slower than one thread (measured on 2
    shared cores), and on an idle CPU a second thread gains little here."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def error_feedback(
    W: torch.Tensor,
    U: torch.Tensor,
    round_column: Callable[[int, int, torch.Tensor], torch.Tensor],
    block_size: int,
    group_size: Optional[int] = None,
) -> Iterator[torch.Tensor]:
    """GPTQ's column-by-column rounding with error feedback and lazy batch updates, on ``W`` in place.

    ``U`` is the upper Cholesky factor of the damped inverse Hessian (:func:`upper_cholesky_of_inverse`).
    ``round_column(column, i, W1)`` returns the rounded column ``W1[:, i]`` (``W1``: the working copy of the
    block, ``i``: the column's place in it, ``column``: its index in ``W``). Blocks hold ``block_size`` columns,
    cut so that a group of ``group_size`` columns starting inside a block also ends inside it. Yields the
    ``[rows, block]`` scaled errors ``(w - q) / U_jj`` of each block once it and the rest of ``W`` are updated.
    """
    columns = W.shape[1]
    i1 = 0
    while i1 < columns:
        i2 = _block_end(i1, block_size, columns, group_size)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = U1[i, i]
            q = round_column(i1 + i, i, W1)
            error = (w - q) / d
            W1[:, i:] -= error.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = error
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        yield Err1
        i1 = i2


def _block_end(i1: int, block_size: int, columns: int, group_size: Optional[int]) -> int:
    i2 = min(i1 + block_size, columns)
    if group_size is not None:
        last_start = ((i2 - 1) // group_size) * group_size
        if last_start > i1 and min(last_start + group_size, columns) > i2:
            i2 = last_start  # end the block where the straddling group starts
    return i2
