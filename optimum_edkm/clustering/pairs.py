"""DKM on the values of each group, in torch: the reference of the compiled kernels, and the path on any device.

The values are laid out per group, padded: ``values`` and ``counts`` are ``[G, D]``, either each group's distinct
values with how many weights hold them (padding: count 0, a finite value), or every weight of the group with
``counts=None`` (each counts once). Attention tensors are ``[G, k, D]``: the softmax over ``k`` reduces across
rows, which CPUs vectorise along ``D``, and the sums per cluster are plain reductions (no scatter), so the cost per
value is the same for one group or one per output channel.

Backward (:func:`dkm_backward`): per value, the local derivative ``d table / d u`` at fixed centroids (closed
form) and the centroid term (autograd on a replay of the iterations with the values entering the centroid updates
only), divided by the count: the gradient of weight ``i`` holding value ``u`` is ``local[u] * g_i + term[u]``.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from .reference import update_centroids
from .spec import ClusteringSpec


class DKMState(NamedTuple):
    table: torch.Tensor  # [G, D] soft-clustered value of each entry
    attention: torch.Tensor  # [G, k, D] last attention, computed with `previous`
    previous: torch.Tensor  # [G, k] centroids the last attention was computed with
    centroids: torch.Tensor  # [G, k] centroids after the last update
    history: List[torch.Tensor]  # c_0 .. c_T, [G, k] each


def _attention(values: torch.Tensor, centroids: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(-(values.unsqueeze(1) - centroids.unsqueeze(2)).pow(2) / temperature, dim=1)


def dkm(
    assign_values: torch.Tensor,
    update_values: torch.Tensor,
    counts: Optional[torch.Tensor],
    centroids: torch.Tensor,
    spec: ClusteringSpec,
    iterations: Optional[int] = None,
) -> DKMState:
    """DKM on ``[G, D]`` values. ``update_values`` feed the centroid updates, ``assign_values`` the final
    attention of the output table (the same numbers; separating them lets the backward pass differentiate the
    centroid path alone). ``iterations``: run exactly that many (a replay, or one chunk of groups whose early stop
    is decided over all of them by the caller); ``None``: up to ``spec.iterations``, stopping on the tolerance."""
    weights = None if counts is None else counts.unsqueeze(1)
    c = centroids
    history = [c]
    for _ in range(iterations if iterations is not None else spec.iterations):
        attention = _attention(update_values, c, spec.temperature)
        if weights is not None:
            attention = attention * weights
        mass = attention.sum(2)
        weighted_sum = (attention * update_values.unsqueeze(1)).sum(2)
        previous, c = c, update_centroids(mass, weighted_sum, c)
        history.append(c)
        if iterations is None and float((c - previous).detach().abs().max()) <= spec.tolerance:
            break
    attention = _attention(assign_values, previous, spec.temperature)
    table = (attention * c.unsqueeze(2)).sum(1)
    return DKMState(table, attention, previous, c, history)


def _local_derivative(values: torch.Tensor, state: DKMState, spec: ClusteringSpec) -> torch.Tensor:
    """``d table / d u`` with the centroids held fixed: the attention-weighted covariance of the softmax logits'
    slope ``-2 (u - c_prev) / tau`` and the centroids (centred form, for accuracy)."""
    slope = -2.0 * (values.unsqueeze(1) - state.previous.unsqueeze(2)) / spec.temperature
    slope = slope - (state.attention * slope).sum(1, keepdim=True)
    return (state.attention * slope * (state.centroids.unsqueeze(2) - state.table.unsqueeze(1))).sum(1)


def dkm_backward(
    values: torch.Tensor,
    counts: Optional[torch.Tensor],
    start: torch.Tensor,
    spec: ClusteringSpec,
    iterations: int,
    grad: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per entry: the local derivative and the centroid term per weight, for ``grad`` (the output gradient summed
    over the weights of each entry), by replaying the ``iterations`` of the forward pass under autograd."""
    with torch.enable_grad():
        update_values = values.detach().requires_grad_(True)
        state = dkm(values, update_values, counts, start, spec, iterations=iterations)
        (centroid_path,) = torch.autograd.grad(state.table, update_values, grad)
    with torch.no_grad():
        fixed = DKMState(*(t.detach() for t in state[:4]), [])
        local = _local_derivative(values, fixed, spec)
        if counts is not None:
            centroid_path = centroid_path / torch.where(counts > 0, counts, torch.ones_like(counts))
        return local, centroid_path


def iterations_run(history: List[torch.Tensor], tolerance: float) -> int:
    """How many updates the early stop lets run, from the centroids ``c_0 .. c_T`` of every group (the stop looks
    at all groups at once)."""
    moved = torch.stack([(after - before).abs().amax() for before, after in zip(history, history[1:])])
    stopped = (moved <= tolerance).nonzero()
    return int(stopped[0]) + 1 if stopped.numel() else len(history) - 1


# ------------------------------------------------------------------------------------- pairs <-> padded groups
class PaddedPairs(NamedTuple):
    """Distinct (group, value) pairs (sorted by group) as ``[G, D]`` tensors, and where each pair sits."""

    values: torch.Tensor  # [G, D]
    counts: torch.Tensor  # [G, D], 0 on padding
    group: torch.Tensor  # (P,) int64
    position: torch.Tensor  # (P,) int64 column of each pair in its group's row


def pad_pairs(values: torch.Tensor, counts: torch.Tensor, group: torch.Tensor, groups: int) -> PaddedPairs:
    """``values``/``counts`` of pairs sorted by ``group`` -> one row per group (padding: the group's first value,
    count 0, so that every number stays finite)."""
    if groups == 1:
        position = torch.arange(values.numel(), device=values.device)
        return PaddedPairs(values.unsqueeze(0), counts.unsqueeze(0), group, position)
    per_group = torch.bincount(group, minlength=groups)
    starts = per_group.cumsum(0) - per_group
    position = torch.arange(values.numel(), device=values.device) - starts[group]
    width = max(int(per_group.max()), 1)
    first = values.index_select(0, starts.clamp_max(values.numel() - 1))
    padded_values = first.unsqueeze(1).expand(groups, width).clone()
    padded_counts = torch.zeros(groups, width, dtype=counts.dtype, device=counts.device)
    padded_values[group, position] = values
    padded_counts[group, position] = counts
    return PaddedPairs(padded_values, padded_counts, group, position)


def unpad(padded: PaddedPairs, table: torch.Tensor) -> torch.Tensor:
    """(P,) entries of a ``[G, D]`` per-entry table, in pair order."""
    return table[padded.group, padded.position]
