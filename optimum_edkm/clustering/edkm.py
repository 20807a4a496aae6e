"""eDKM: DKM over distinct values, with an exact backward pass in the same small domain.

Forward: the weights (16-bit, or rounded to 16 bits) are reduced to their distinct values per group with
counts (:mod:`.uniquify`); the centroid iterations run on those values weighted by their counts, giving a
table with one soft-clustered value per distinct value, which is gathered back per weight. Nothing of size
|W| x k is ever built.

Backward: the gradient of weight ``i`` (value ``u = u[idx_i]``) has two parts,

* the local part ``g_i * D[idx_i]`` with ``D = d table[u] / d u`` at fixed centroids (closed form), and
* the centroid part ``E[idx_i]``: every weight with the same value moves the centroids the same way, so the
  autograd gradient of ``sum_m G_m * table_m`` with respect to the value ``u_m`` (entering through the centroid
  updates only), divided by the count of ``u_m``, is that per-weight term; ``G_m`` is the output gradient
  summed over the weights holding ``u_m``.

Only the input weight (already held by the model), the starting centroids and the per-channel scale are
saved for backward; the distinct values and the per-weight index are recomputed from the weight itself.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .layout import (check_centroids, check_scale, check_weight, cluster_values, compute_dtype, num_groups,
                     row_view_shape)
from .reference import ClusterOutput, update_centroids
from .spec import ClusteringSpec
from .uniquify import UniqueValues, uniquify


class _PairDKM(NamedTuple):
    table: torch.Tensor          # (P,) soft-clustered value of each distinct (group, value) pair
    attention: torch.Tensor      # (k, P) last attention, computed with `previous`
    previous: torch.Tensor       # (G, k) centroids the last attention was computed with
    centroids: torch.Tensor      # (G, k) centroids after the last update
    iterations: int

# Pair tensors are laid out (k, P): a softmax over k is then a reduction across k contiguous rows, which CPUs
# vectorise along P; over a last dimension of k <= 256 it is several times slower.


def _per_pair(centroids: torch.Tensor, uv: UniqueValues) -> torch.Tensor:
    """(k, P) centroids of each pair's group, or (k, 1) for a single group (broadcast)."""
    return centroids.t() if centroids.shape[0] == 1 else centroids.t()[:, uv.group]


def _group_sum(group: torch.Tensor, pairs: torch.Tensor, groups: int) -> torch.Tensor:
    """(G, k) sums over the pairs of each group of a (k, P) tensor."""
    if groups == 1:
        return pairs.sum(1).unsqueeze(0)
    return torch.zeros(pairs.shape[0], groups, dtype=pairs.dtype, device=pairs.device).index_add(
        1, group, pairs).t()


def _attention(values: torch.Tensor, centroids_per_pair: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(-(values.unsqueeze(0) - centroids_per_pair).pow(2) / temperature, dim=0)


def _pair_dkm(assign_values: torch.Tensor, update_values: torch.Tensor, uv: UniqueValues,
              centroids: torch.Tensor, spec: ClusteringSpec, iterations: Optional[int] = None) -> _PairDKM:
    """DKM on distinct values. ``update_values`` feed the centroid updates, ``assign_values`` the final
    attention of the output table (they are the same numbers; separating them lets the backward pass
    differentiate the centroid path alone). ``iterations`` replays a forward pass exactly."""
    groups = centroids.shape[0]
    counts = uv.counts.unsqueeze(0)
    c = centroids
    ran = 0
    for _ in range(iterations if iterations is not None else spec.iterations):
        attention = _attention(update_values, _per_pair(c, uv), spec.temperature) * counts
        mass = _group_sum(uv.group, attention, groups)
        weighted_sum = _group_sum(uv.group, attention * update_values.unsqueeze(0), groups)
        previous, c = c, update_centroids(mass, weighted_sum, c)
        ran += 1
        if iterations is None and float((c - previous).detach().abs().max()) <= spec.tolerance:
            break
    attention = _attention(assign_values, _per_pair(previous, uv), spec.temperature)
    table = (attention * _per_pair(c, uv)).sum(0)
    return _PairDKM(table, attention, previous, c, ran)


def _local_derivative(values: torch.Tensor, uv: UniqueValues, dkm: _PairDKM, spec: ClusteringSpec):
    """``d table / d u`` with the centroids held fixed: the attention-weighted covariance of the softmax
    logits' slope ``-2 (u - c_prev) / tau`` and the centroids (centred form, for accuracy)."""
    slope = -2.0 * (values.unsqueeze(0) - _per_pair(dkm.previous, uv)) / spec.temperature
    slope = slope - (dkm.attention * slope).sum(0, keepdim=True)
    return (dkm.attention * slope * (_per_pair(dkm.centroids, uv) - dkm.table.unsqueeze(0))).sum(0)


class _EDKMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, centroids, scale, spec, info):
        groups = centroids.shape[0]
        cdt = compute_dtype(weight)
        uv = uniquify(cluster_values(weight, scale, spec, groups), cdt)
        # a private copy: the caller may update its centroids in place before this backward runs
        start = centroids.detach().to(cdt, copy=True)
        dkm = _pair_dkm(uv.values, uv.values, uv, start, spec)
        clustered = dkm.table[uv.index].view(weight.shape)
        if scale is not None:
            clustered = clustered * scale.to(cdt).view(row_view_shape(weight))
        ctx.spec = spec
        ctx.iterations = info["iterations"] = dkm.iterations
        ctx.save_for_backward(weight, start, scale)
        new_centroids = dkm.centroids.to(centroids.dtype)
        ctx.mark_non_differentiable(new_centroids)
        return clustered.to(weight.dtype), new_centroids

    @staticmethod
    def backward(ctx, grad_output, _grad_centroids):
        weight, start, scale = ctx.saved_tensors
        spec = ctx.spec
        cdt = start.dtype
        uv = uniquify(cluster_values(weight, scale, spec, start.shape[0]), cdt)
        grad = grad_output.to(cdt)
        if scale is not None:
            grad = grad * scale.to(cdt).view(row_view_shape(weight))
        grad = grad.reshape(-1)
        pair_grad = torch.zeros(uv.num_pairs, dtype=cdt, device=grad.device).index_add_(0, uv.index, grad)
        with torch.enable_grad():
            update_values = uv.values.detach().requires_grad_(True)
            dkm = _pair_dkm(uv.values, update_values, uv, start, spec, iterations=ctx.iterations)
            (centroid_path,) = torch.autograd.grad(dkm.table, update_values, pair_grad)
        with torch.no_grad():
            fixed = _PairDKM(dkm.table.detach(), dkm.attention.detach(), dkm.previous.detach(),
                             dkm.centroids.detach(), dkm.iterations)
            local = _local_derivative(uv.values, uv, fixed, spec)
            per_weight = centroid_path / uv.counts
            grad_values = local[uv.index].mul_(grad).add_(per_weight[uv.index]).view(weight.shape)
            if scale is not None:
                grad_values = grad_values / scale.to(cdt).view(row_view_shape(weight))
        return grad_values.to(weight.dtype), None, None, None, None


def edkm_cluster(weight: torch.Tensor, centroids: torch.Tensor, spec: ClusteringSpec,
                 scale: Optional[torch.Tensor] = None, name: str = "weight") -> ClusterOutput:
    """Differentiable k-means of ``weight`` with eDKM's uniquified forward and exact backward.

    Same contract as :func:`~optimum_edkm.clustering.dkm_reference` (same math, same outputs and gradients
    when both see the same values), but memory is O(distinct values x k) instead of O(|W| x k), and only
    the weight itself (no copy) and O(groups x k) numbers are kept for backward.
    """
    check_weight(weight, name)
    groups = num_groups(weight, spec.group_size, name)
    check_centroids(centroids, groups, spec, name)
    check_scale(scale, weight, name)
    info = {}
    clustered, new_centroids = _EDKMFunction.apply(weight, centroids, scale, spec, info)
    return ClusterOutput(clustered, new_centroids, info["iterations"])
