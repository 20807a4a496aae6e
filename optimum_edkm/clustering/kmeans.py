"""Centroid initialisation (weighted k-means++ then Lloyd, on distinct values) and hard assignment."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .layout import (
    check_inputs,
    check_scale,
    check_weight,
    cluster_values,
    compute_dtype,
    num_groups,
    row_view_shape,
)
from .spec import ClusteringSpec
from .uniquify import UniqueValues, uniquify


def _sample_per_group(
    weights: torch.Tensor, uv: UniqueValues, starts: torch.Tensor, ends: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """One pair index per group, drawn with probability proportional to ``weights`` within the group.
    A group whose weights are all zero (every distinct value already chosen) gets its first pair."""
    groups = starts.numel()
    cumulative = weights.to(torch.float64).cumsum(0)
    before = torch.where(starts > 0, cumulative[(starts - 1).clamp_min(0)], torch.zeros_like(cumulative[:1]))
    totals = cumulative[ends - 1] - before
    draws = torch.rand(groups, generator=generator, dtype=torch.float64).to(weights.device)
    targets = before + draws * totals
    picked = torch.searchsorted(cumulative, targets, right=True)
    picked = torch.minimum(torch.maximum(picked, starts), ends - 1)
    return torch.where(totals > 0, picked, starts)


def _nearest(values: torch.Tensor, group: torch.Tensor, centroids: torch.Tensor):
    distance = (values.unsqueeze(1) - centroids[group]).pow(2)
    best, label = distance.min(1)
    return best, label


def _padded_groups(
    uv: UniqueValues, groups: int, starts: torch.Tensor, pair_counts: torch.Tensor, masses: torch.Tensor
):
    """Distinct values as a ``[groups, widest group]`` matrix with their ``masses`` (counts, or summed sample
    weights); padding has mass 0 (and a finite value, so that ``0 * value`` stays 0)."""
    width = int(pair_counts.max())
    position = torch.arange(uv.num_pairs, device=uv.values.device) - starts[uv.group]
    pad_value = torch.finfo(uv.values.dtype).max / 4
    values = torch.full((groups, width), pad_value, dtype=uv.values.dtype, device=uv.values.device)
    counts = torch.zeros((groups, width), dtype=masses.dtype, device=uv.values.device)
    values[uv.group, position] = uv.values
    counts[uv.group, position] = masses
    return values, counts


def _lloyd(values: torch.Tensor, counts: torch.Tensor, centroids: torch.Tensor, max_iter: int):
    """Weighted 1-D Lloyd on padded groups of *sorted* values.

    With sorted values and sorted centroids every cluster is a contiguous run of values, bounded by the
    midpoints between neighbouring centroids; its mass and sum are differences of prefix sums. One iteration
    is a binary search of the k-1 midpoints per group, whatever the number of values.
    """
    zeros = torch.zeros(values.shape[0], 1, dtype=torch.float64, device=values.device)
    weights = counts.double()
    prefix_mass = torch.cat([zeros, weights.cumsum(1)], 1)
    prefix_sum = torch.cat([zeros, (weights * values.double()).cumsum(1)], 1)
    prefix_square = torch.cat([zeros, (weights * values.double().pow(2)).cumsum(1)], 1)
    real = counts > 0
    spread = torch.where(real, values, -torch.inf).amax(1) - torch.where(real, values, torch.inf).amin(1)
    spread = spread.double().clamp_min(torch.finfo(torch.float64).tiny) / max(centroids.shape[1] - 1, 1)

    def cluster_sums(c):
        # a value equal to a midpoint belongs to the lower cluster (as with argmin's first index)
        bounds = torch.searchsorted(values, ((c[:, 1:] + c[:, :-1]) / 2).to(values.dtype).contiguous(), right=True)
        edges = torch.cat([torch.zeros_like(bounds[:, :1]), bounds, torch.full_like(bounds[:, :1], values.shape[1])], 1)
        take = lambda prefix: prefix.gather(1, edges[:, 1:]) - prefix.gather(1, edges[:, :-1])  # noqa: E731
        return take(prefix_mass), take(prefix_sum), take(prefix_square)

    c = centroids.double().sort(1).values
    for _ in range(max_iter):
        mass, total, _ = cluster_sums(c)
        updated = torch.where(mass > 0, total / torch.where(mass > 0, mass, torch.ones_like(mass)), c)
        updated = updated.sort(1).values
        moved = (updated - c).abs().amax(1)
        c = updated
        # the last iterations only shuffle the last digits: stop at 1e-4 of each group's mean spacing
        if bool((moved <= 1e-4 * spread).all()):
            break
    mass, total, square = cluster_sums(c)
    inertia = (square - 2 * c * total + c.pow(2) * mass).sum(1)
    return c.to(centroids.dtype), inertia


def value_masses(
    uv: UniqueValues,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor],
    sample_weight: Optional[torch.Tensor],
    name: str = "weight",
) -> torch.Tensor:
    """The k-means mass of each distinct (group, value) pair: its count, or with ``sample_weight`` (the
    importance of each weight's squared error, the weight's shape) the sum of its weights' importances. With a
    per-channel scale a clustered value's error is ``scale[row]`` times the weight's, so importances are
    multiplied by ``scale[row] ** 2``. A tiny floor (1e-6 of the mean importance) keeps every value in play."""
    if sample_weight is None:
        return uv.counts
    if tuple(sample_weight.shape) != tuple(weight.shape):
        raise ValueError(
            f"{name}: sample_weight has shape {tuple(sample_weight.shape)}, the weight "
            f"{tuple(weight.shape)}; pass one importance per weight"
        )
    importance = sample_weight.detach().to(device=uv.values.device, dtype=torch.float64)
    if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
        raise ValueError(f"{name}: sample_weight must be finite and >= 0 (e.g. squared gradients)")
    if scale is not None:
        importance = importance * scale.detach().double().view((-1,) + (1,) * (weight.dim() - 1)).pow(2)
    importance = importance.reshape(-1)
    importance = importance + 1e-6 * importance.mean().clamp_min(torch.finfo(torch.float64).tiny)
    masses = torch.zeros(uv.num_pairs, dtype=torch.float64, device=uv.values.device)
    return masses.index_add_(0, uv.index.long(), importance).to(uv.counts.dtype)


@torch.no_grad()
def init_centroids(
    weight: torch.Tensor,
    spec: ClusteringSpec,
    scale: Optional[torch.Tensor] = None,
    seed: int = 0,
    restarts: int = 3,
    max_iter: int = 50,
    name: str = "weight",
    sample_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Deterministic k-means centroids, ``[groups, 2**bits]``, sorted ascending within each group.

    Weighted k-means++ seeding on the distinct values of each group (weights = counts), refined by Lloyd
    iterations, best of ``restarts`` by inertia; all groups are processed together. The same ``seed`` and
    weights give the same centroids on every device and process. A group with fewer distinct values than
    clusters gets its distinct values, padded by repeating one of them.

    ``sample_weight`` (the weight's shape, >= 0) makes it a sensitivity-weighted k-means (SqueezeLLM,
    coremltools' SKMPalettizer): each weight counts with its importance, e.g. the Fisher diagonal (squared
    gradients), instead of 1; a distinct value's mass is the sum of its weights' importances
    (:func:`value_masses`).
    """
    check_weight(weight, name)
    groups = num_groups(weight, spec.group_size, name)
    check_scale(scale, weight, name)
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    cdt = compute_dtype(weight)
    uv = uniquify(cluster_values(weight, scale, spec, groups), cdt, name)
    masses = value_masses(uv, weight, scale, sample_weight, name)
    k = spec.num_clusters
    pair_counts = torch.bincount(uv.group, minlength=groups)
    ends = pair_counts.cumsum(0)
    starts = ends - pair_counts
    generator = torch.Generator().manual_seed(int(seed))
    padded_values, padded_counts = _padded_groups(uv, groups, starts, pair_counts, masses)
    order = padded_values.argsort(1)
    padded_values, padded_counts = padded_values.gather(1, order), padded_counts.gather(1, order)

    best_centroids, best_inertia = None, None
    for _ in range(restarts):
        chosen = [_sample_per_group(masses, uv, starts, ends, generator)]
        nearest = (uv.values - uv.values[chosen[0]][uv.group]).pow(2)
        for _ in range(1, k):
            pick = _sample_per_group(masses * nearest, uv, starts, ends, generator)
            chosen.append(pick)
            nearest = torch.minimum(nearest, (uv.values - uv.values[pick][uv.group]).pow(2))
        centroids = uv.values[torch.stack(chosen, 1)]  # [G, k]
        centroids, inertia = _lloyd(padded_values, padded_counts, centroids, max_iter)
        if best_centroids is None:
            best_centroids, best_inertia = centroids, inertia
        else:
            better = inertia < best_inertia
            best_centroids = torch.where(better.unsqueeze(1), centroids, best_centroids)
            best_inertia = torch.minimum(inertia, best_inertia)
    return best_centroids


class HardAssignment(NamedTuple):
    """Nearest-centroid snapping: ``indices`` (uint8, the weight's shape) into ``lut`` (``[groups, 2**bits]``)."""

    indices: torch.Tensor
    lut: torch.Tensor


@torch.no_grad()
def hard_assign(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    spec: ClusteringSpec,
    scale: Optional[torch.Tensor] = None,
    name: str = "weight",
) -> HardAssignment:
    """Index of the nearest centroid (lowest index on ties) for every weight, computed on distinct values."""
    groups = check_inputs(weight, centroids, spec, scale, name)
    cdt = compute_dtype(weight)
    uv = uniquify(cluster_values(weight, scale, spec, groups), cdt, name)
    _, label = _nearest(uv.values, uv.group, centroids.to(cdt))
    indices = label.to(torch.uint8)[uv.index].view(weight.shape)
    return HardAssignment(indices, centroids.detach().clone())


def decode(
    indices: torch.Tensor, lut: torch.Tensor, scale: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Dense weight ``scale[row] * lut[group(row), indices]``; groups are consecutive rows (dim 0)."""
    if indices.dtype != torch.uint8 or lut.dim() != 2:
        raise TypeError("decode expects uint8 indices and a [groups, 2**bits] LUT")
    groups, k = lut.shape
    rows = indices.shape[0]
    if rows % groups != 0:
        raise ValueError(f"a LUT with {groups} groups cannot describe {rows} output channels")
    flat = indices.reshape(groups, -1).long()
    if int(flat.max()) >= k:
        raise ValueError(f"indices reach {int(flat.max())} but the LUT has only {k} entries")
    work = torch.promote_types(lut.dtype, torch.float32)
    dense = torch.gather(lut.to(work), 1, flat).view(indices.shape)
    if scale is not None:
        dense = dense * scale.to(work).view(row_view_shape(indices))
    return dense if dtype is None else dense.to(dtype)
