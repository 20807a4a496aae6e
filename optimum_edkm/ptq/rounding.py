"""One weight onto look-up tables with GPTQ's error feedback: the LUT (importance-weighted k-means), the rounding
passes, the least-squares refits of the LUT and scales, and the choice of the best candidate (see
:mod:`optimum_edkm.ptq`)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..calibration import check_block_and_damp, dampen, error_feedback, upper_cholesky_of_inverse, working_copies
from ..clustering import ClusteringSpec, decode, hard_assign, init_centroids, per_channel_scale
from ..clustering.layout import compute_dtype, value_dtype

#: how the k-means that chooses a layer's LUT weighs each weight (see :mod:`optimum_edkm.ptq`)
IMPORTANCES = ("none", "hessian", "obs", "fisher")


class LutRoundingResult(NamedTuple):
    """One GPTQ pass onto fixed LUTs.

    Attributes:
        indices: uint8 ``[rows, columns]`` LUT index of every weight.
        rounded_from: ``[rows, columns]`` (the weight's dtype) what each weight was when its column was rounded
            (the float weight plus the error feedback it received); its hard assignment gives ``indices``.
        dense: ``[rows, columns]`` (the weight's dtype) the decoded weight ``scale[row] * lut[group, index]``.
        loss: GPTQ's estimate of the output error, ``sum (w - q)^2 / (2 U_jj^2)``.
    """

    indices: torch.Tensor
    rounded_from: torch.Tensor
    dense: torch.Tensor
    loss: float


def _check_palette(weight: torch.Tensor, lut: torch.Tensor, spec: ClusteringSpec, scale: Optional[torch.Tensor]):
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight [rows, columns], got {weight.dtype} {tuple(weight.shape)}")
    rows = weight.shape[0]
    groups = 1 if spec.group_size is None else rows // spec.group_size
    if spec.group_size is not None and rows % spec.group_size:
        raise ValueError(f"group_size={spec.group_size} does not divide the weight's {rows} rows")
    if tuple(lut.shape) != (groups, spec.num_clusters):
        raise ValueError(
            f"the LUT has shape {tuple(lut.shape)}, expected ({groups}, {spec.num_clusters}) (groups x 2**bits)"
        )
    if scale is not None and tuple(scale.shape) != (rows,):
        raise ValueError(f"the per-channel scale has shape {tuple(scale.shape)}, expected ({rows},)")


def _row_groups(rows: int, spec: ClusteringSpec, device) -> torch.Tensor:
    """The LUT (group) index of each of ``rows`` output rows."""
    if spec.group_size is None:
        return torch.zeros(rows, dtype=torch.long, device=device)
    return torch.arange(rows, device=device) // spec.group_size


class _NearestEntry:
    """Rounds weight columns to their row's nearest LUT entry with the arithmetic of
    :func:`~optimum_edkm.clustering.hard_assign` (values: the weight in its own dtype, divided by the scale in
    the compute dtype, rounded to the clustered 16-bit dtype; squared distances; first index on ties) and decodes
    them as :func:`~optimum_edkm.clustering.decode` does after :meth:`snap` (fp32, scale in the LUT's dtype)."""

    def __init__(self, weight: torch.Tensor, lut: torch.Tensor, spec: ClusteringSpec, scale: Optional[torch.Tensor]):
        rows = weight.shape[0]
        self.weight_dtype = weight.dtype
        self.compute = compute_dtype(weight)
        self.values = value_dtype(weight, spec)
        group = _row_groups(rows, spec, weight.device)
        work = torch.promote_types(lut.dtype, torch.float32)
        self.distance_lut = lut.to(self.compute)[group]  # [rows, k]
        self.decode_lut = lut.to(work)[group]  # [rows, k]
        self.divide = None if scale is None else scale.to(self.compute).unsqueeze(1)
        self.multiply = None if scale is None else scale.to(lut.dtype).to(work).unsqueeze(1)

    def indices(self, columns: torch.Tensor) -> torch.Tensor:
        """LUT indices (int64) of ``[rows, n]`` columns (any float dtype; taken in the weight's dtype)."""
        values = columns.to(self.weight_dtype).to(self.compute)
        if self.divide is not None:
            values = values / self.divide
        values = values.to(self.values).to(self.compute)
        distance = (values.unsqueeze(-1) - self.distance_lut.unsqueeze(1)).pow(2)
        return distance.min(-1).indices

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """The decoded weights (the weight's dtype) of ``[rows, n]`` indices."""
        dense = self.decode_lut.gather(1, indices)
        if self.multiply is not None:
            dense = dense * self.multiply
        return dense.to(self.weight_dtype)


@torch.no_grad()
def gptq_lut_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    lut: torch.Tensor,
    spec: ClusteringSpec,
    scale: Optional[torch.Tensor] = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> LutRoundingResult:
    """Round a ``[rows, columns]`` weight onto fixed LUTs with GPTQ's error feedback.

    Args:
        weight: the float weight, output channels on dim 0 (its dtype is the one hard assignment will see).
        hessian: ``[columns, columns]``, ``2/N X^T X`` of the layer's calibration inputs.
        lut: ``[groups, 2**bits]`` LUT as it will be stored (e.g. fp16).
        spec: bits and LUT grouping (``spec.group_size`` output rows per LUT, ``None``: one LUT).
        scale: optional per-output-channel scale (the module's buffer); weights are rounded as ``w / scale``.
        block_size: columns per lazy batch update (changes the speed, not the result).
        damp: dampening, a fraction of the mean Hessian diagonal.
        act_order: round columns by decreasing Hessian diagonal.
    """
    _check_palette(weight, lut, spec, scale)
    check_block_and_damp(block_size, damp)
    rows, columns = weight.shape
    if tuple(hessian.shape) != (columns, columns):
        raise ValueError(f"hessian must be [{columns}, {columns}], got {tuple(hessian.shape)}")
    W, H = working_copies(weight, hessian)
    damped = dampen(H, damp)
    rounding = _NearestEntry(weight, lut, spec, scale)
    permutation = None
    if act_order:
        permutation = torch.argsort(torch.diag(damped), descending=True)
        W, damped = W[:, permutation], damped[permutation][:, permutation]
    U = upper_cholesky_of_inverse(damped)
    indices = torch.zeros(rows, columns, dtype=torch.long, device=W.device)
    rounded_from = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=W.dtype, device=W.device)

    def round_column(column: int, i: int, W1: torch.Tensor) -> torch.Tensor:
        w = W1[:, i]
        index = rounding.indices(w.unsqueeze(1))
        q = rounding.decode(index).to(W.dtype).squeeze(1)
        indices[:, column] = index.squeeze(1)
        rounded_from[:, column] = w
        Q[:, column] = q
        return q

    for Err1 in error_feedback(W, U, round_column, block_size):
        loss += Err1.pow(2).sum() / 2
    if permutation is not None:
        inverse = torch.argsort(permutation)
        indices, rounded_from, Q = indices[:, inverse], rounded_from[:, inverse], Q[:, inverse]
    return LutRoundingResult(indices.to(torch.uint8), rounded_from.to(weight.dtype), Q.to(weight.dtype), float(loss))


def output_error(weight: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: with ``H = 2/N X^T X``, twice the mean squared error of the layer's outputs
    over the N calibration tokens (summed over output channels)."""
    error = weight.double() - dense.double()
    return float(((error @ hessian.double()) * error).sum())


@torch.no_grad()
def refit_lut(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    indices: torch.Tensor,
    lut: torch.Tensor,
    spec: ClusteringSpec,
    scale: Optional[torch.Tensor] = None,
    chunk_rows: int = 128,
) -> torch.Tensor:
    """The LUT entries minimising ``tr((W - Q) H (W - Q)^T)`` for fixed ``indices`` (one least-squares problem of
    ``2**bits`` unknowns per LUT), ``Q[r] = scale[r] * lut[group(r), indices[r]]``; returned in float64. An entry
    no weight uses keeps its value in ``lut`` (a tiny ridge towards it keeps every system well posed)."""
    _check_palette(weight, lut, spec, scale)
    rows, columns = weight.shape
    k = spec.num_clusters
    groups = lut.shape[0]
    H = hessian.to(torch.float32)
    W = weight.to(torch.float32)
    s = torch.ones(rows, dtype=torch.float64, device=W.device) if scale is None else scale.double()
    group = _row_groups(rows, spec, W.device)
    A = torch.zeros(groups, k, k, dtype=torch.float64, device=W.device)
    b = torch.zeros(groups, k, dtype=torch.float64, device=W.device)
    WH = W @ H
    for r1 in range(0, rows, chunk_rows):
        r2 = min(r1 + chunk_rows, rows)
        index = indices[r1:r2].long()
        onehot = torch.nn.functional.one_hot(index, k).to(torch.float32)  # [n, columns, k]
        # one large product H @ [columns, n*k] (a batched product with k-wide matrices is far slower)
        spread = (H @ onehot.permute(1, 0, 2).reshape(columns, -1)).view(columns, r2 - r1, k)
        block = torch.einsum("nia,inb->nab", onehot, spread)  # [n, k, k]
        rhs = torch.zeros(r2 - r1, k, dtype=torch.float32, device=W.device).scatter_add_(1, index, WH[r1:r2])
        weights = s[r1:r2]
        A.index_add_(0, group[r1:r2], block.double() * weights.pow(2).view(-1, 1, 1))
        b.index_add_(0, group[r1:r2], rhs.double() * weights.view(-1, 1))
    ridge = 1e-9 * A.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    eye = torch.eye(k, dtype=torch.float64, device=W.device)
    previous = lut.double()
    return torch.linalg.solve(A + ridge.view(-1, 1, 1) * eye, b + ridge.view(-1, 1) * previous)


@torch.no_grad()
def refit_scale(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    indices: torch.Tensor,
    lut: torch.Tensor,
    spec: ClusteringSpec,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Per-row scales minimising ``tr((W - Q) H (W - Q)^T)`` for fixed indices and LUT: row ``r`` with
    ``u = lut[group(r), indices[r]]`` gets ``(u H w^T) / (u H u^T)``; kept positive (a row whose fit is not keeps
    its ``scale``). Returned in float64."""
    _check_palette(weight, lut, spec, scale)
    rows = weight.shape[0]
    group = _row_groups(rows, spec, weight.device)
    u = lut.double()[group].gather(1, indices.long())
    uH = u @ hessian.double()
    numerator = (uH * weight.double()).sum(1)
    denominator = (uH * u).sum(1)
    fitted = numerator / denominator.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where((denominator > 0) & (fitted > 0), fitted, scale.double())


def _round_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    return values.clamp(-info.max, info.max).to(dtype)


def _sorted(lut: torch.Tensor, indices: torch.Tensor, spec: ClusteringSpec) -> tuple:
    """The LUT sorted ascending per group and the indices remapped so that the decoded weight is unchanged."""
    sorted_lut, order = lut.sort(1)
    rank = torch.argsort(order, 1)  # old entry -> new position
    rows = indices.shape[0]
    group = _row_groups(rows, spec, lut.device)
    return sorted_lut, rank[group].gather(1, indices.long()).to(torch.uint8)


def _importance(kind: str, hessian: torch.Tensor, rows: int, damp: float, fisher: Optional[torch.Tensor]):
    if kind == "none":
        return None
    if kind == "fisher":
        return fisher
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if kind == "hessian":
        column = torch.diag(H)
    else:  # "obs": 1 / [H^-1]_jj of the damped Hessian
        diagonal = torch.arange(H.shape[0], device=H.device)
        H[diagonal, diagonal] += damp * torch.mean(torch.diag(H))
        column = 1.0 / torch.diag(torch.cholesky_inverse(torch.linalg.cholesky(H)))
    return column.float().unsqueeze(0).expand(rows, -1)


class PaletteCandidate(NamedTuple):
    lut: torch.Tensor  # [groups, k] in the LUT's storage dtype
    scale: Optional[torch.Tensor]  # [rows] fp32 holding storage-dtype values, or None
    indices: torch.Tensor  # uint8 [rows, columns]
    rounded_from: Optional[torch.Tensor]  # what a GPTQ pass rounded (hard-assigns to indices), or None
    error: float  # output_error of the decoded weight
    origin: str


@torch.no_grad()
def palettize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: ClusteringSpec,
    lut_dtype: torch.dtype,
    channel_scale: bool,
    importance: str = "hessian",
    fisher: Optional[torch.Tensor] = None,
    refits: int = 1,
    refit_scales: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    seed: int = 0,
    name: str = "weight",
) -> tuple:
    """Post-training palettization of one ``[rows, columns]`` weight (see the module docstring).

    Returns ``(best, diagnostics)``: the :class:`PaletteCandidate` with the lowest :func:`output_error` among the
    GPTQ passes and the refits, and ``{origin: output error}`` of every candidate plus the plain nearest-entry
    rounding of the float weight onto the first LUT (``"nearest"``)."""
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if importance == "fisher" and fisher is None:
        raise ValueError(f"{name}: importance='fisher' needs the Fisher diagonal of this weight")
    if not isinstance(refits, int) or isinstance(refits, bool) or refits < 0:
        raise ValueError(f"refits must be an integer >= 0, got {refits!r}")
    rows = weight.shape[0]
    H = hessian.double()
    scale = per_channel_scale(weight, name=name) if channel_scale else None
    sample_weight = _importance(importance, hessian, rows, damp, fisher)
    centroids = init_centroids(weight, spec, scale=scale, seed=seed, name=name, sample_weight=sample_weight)
    lut = centroids.to(lut_dtype)
    nearest = hard_assign(weight, lut.to(centroids.dtype), spec, scale=scale, name=name).indices
    diagnostics = {"nearest": output_error(weight, decoded_palette(nearest, lut, scale, weight.dtype), H)}
    best: Optional[PaletteCandidate] = None

    def consider(candidate: PaletteCandidate):
        nonlocal best
        candidate = _as_snapped(candidate, weight, spec, H)
        diagnostics[candidate.origin] = candidate.error
        if best is None or candidate.error < best.error:
            best = candidate

    for round_ in range(refits + 1):
        passed = gptq_lut_round(weight, hessian, lut, spec, scale, block_size, damp, act_order)
        consider(
            PaletteCandidate(
                lut, scale, passed.indices, passed.rounded_from, output_error(weight, passed.dense, H), f"gptq{round_}"
            )
        )
        if round_ == refits:
            break
        indices = passed.indices
        fitted = _round_to(refit_lut(weight, hessian, indices, lut, spec, scale), lut_dtype)
        fitted, indices = _sorted(fitted, indices, spec)
        fitted_scale = scale
        if refit_scales and scale is not None:
            fitted_scale = refit_scale(weight, hessian, indices, fitted, spec, scale)
            fitted_scale = _round_to(fitted_scale, lut_dtype).to(scale.dtype)
            fitted = _round_to(refit_lut(weight, hessian, indices, fitted, spec, fitted_scale), lut_dtype)
            fitted, indices = _sorted(fitted, indices, spec)
        consider(
            PaletteCandidate(
                fitted,
                fitted_scale,
                indices,
                None,
                output_error(weight, decoded_palette(indices, fitted, fitted_scale, weight.dtype), H),
                f"refit{round_}",
            )
        )
        lut, scale = fitted, fitted_scale
    return best, diagnostics


def _as_snapped(
    candidate: PaletteCandidate, weight: torch.Tensor, spec: ClusteringSpec, hessian: torch.Tensor
) -> PaletteCandidate:
    """The candidate as snapping will store it. A refit LUT may hold two entries closer than the 16-bit rounding
    of the clustered values; a weight decoded from one of them then snaps to the other. Such weights take the
    entry snapping gives (repeated until stable), and the error is recomputed. A GPTQ pass's candidate is kept as
    it is: its indices are what each column was rounded to, and :func:`install_palette` installs them exactly
    (:meth:`~optimum_edkm.nn.ClusteredModule.start_from` keeps given indices)."""
    if candidate.rounded_from is not None:
        return candidate
    indices = candidate.indices
    for _ in range(spec.num_clusters):
        dense = decoded_palette(indices, candidate.lut, candidate.scale, weight.dtype)
        snapped = hard_assign(dense, candidate.lut.to(torch.float32), spec, scale=candidate.scale).indices
        if torch.equal(snapped, indices):
            break
        indices = snapped
    else:
        raise RuntimeError("snapping the decoded weight did not settle; please report this LUT")
    if indices is candidate.indices:
        return candidate
    return candidate._replace(indices=indices, error=output_error(weight, dense, hessian))


def decoded_palette(indices: torch.Tensor, lut: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype):
    """The dense weight a palettized module computes (scale in the LUT's dtype, as snapping stores it)."""
    return decode(indices, lut, None if scale is None else scale.to(lut.dtype), dtype=dtype)
