"""eDKM: DKM over distinct values, with an exact backward pass in the same small domain.

Forward: the weights (16-bit, or rounded to 16 bits) are reduced to their distinct values per group with
counts; the centroid iterations run on those values weighted by their counts, giving a table with one
soft-clustered value per distinct value, which is gathered back per weight. Nothing of size |W| x k is ever
built.

Backward: the gradient of weight ``i`` (value ``u = u[idx_i]``) has two parts,

* the local part ``g_i * D[idx_i]`` with ``D = d table[u] / d u`` at fixed centroids (closed form), and
* the centroid part ``E[idx_i]``: every weight with the same value moves the centroids the same way, so the
  autograd gradient of ``sum_m G_m * table_m`` with respect to the value ``u_m`` (entering through the centroid
  updates only), divided by the count of ``u_m``, is that per-weight term; ``G_m`` is the output gradient
  summed over the weights holding ``u_m``.

Only the input weight (already held by the model), the starting centroids and the per-channel scale are
saved for backward (plus O(iterations x groups x k) centroids with the compiled kernel); the distinct values
are recomputed from the weight itself.

How the per-weight passes run (see :mod:`.patterns`): with 16-bit clustered values and at most
``MAX_DENSE_KEYS / 65536`` groups, each weight is keyed by its 16-bit pattern and the passes are one count and
one gather in forward, one per-key sum and one write in backward (a compiled CPU kernel, or the torch
reference); otherwise (``unique_dtype=None``, or very many groups) the distinct values come from
:func:`~.uniquify.uniquify` with a per-weight index. The DKM on the distinct pairs runs in the compiled kernel
(``edkm_pairs.cpp``, its reverse pass written out) or in torch with autograd (the reference).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .layout import (
    check_inputs,
    check_temperature,
    check_weight,
    cluster_values,
    compute_dtype,
    row_view_shape,
    value_dtype,
)
from .patterns import MAX_DENSE_KEYS, TorchPatternOps, compiled_ops, pattern_kind
from .reference import ClusterOutput, update_centroids
from .spec import UNIQUE_DTYPES, ClusteringSpec
from .uniquify import PATTERNS, UniqueValues, pattern_values, uniquify

_PATTERN_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------- DKM on pairs, torch
class _PairDKM(NamedTuple):
    table: torch.Tensor  # (P,) soft-clustered value of each distinct (group, value) pair
    attention: torch.Tensor  # (k, P) last attention, computed with `previous`
    previous: torch.Tensor  # (G, k) centroids the last attention was computed with
    centroids: torch.Tensor  # (G, k) centroids after the last update
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
    return torch.zeros(pairs.shape[0], groups, dtype=pairs.dtype, device=pairs.device).index_add(1, group, pairs).t()


def _attention(values: torch.Tensor, centroids_per_pair: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(-(values.unsqueeze(0) - centroids_per_pair).pow(2) / temperature, dim=0)


def _pair_dkm(
    assign_values: torch.Tensor,
    update_values: torch.Tensor,
    uv: UniqueValues,
    centroids: torch.Tensor,
    spec: ClusteringSpec,
    iterations: Optional[int] = None,
) -> _PairDKM:
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


def _torch_pair_backward(uv, pair_grad: torch.Tensor, start: torch.Tensor, spec: ClusteringSpec, iterations: int):
    """Per distinct pair: the local derivative ``D`` and the centroid term per weight ``E / count``, by
    replaying the forward iterations under autograd."""
    with torch.enable_grad():
        update_values = uv.values.detach().requires_grad_(True)
        dkm = _pair_dkm(uv.values, update_values, uv, start, spec, iterations=iterations)
        (centroid_path,) = torch.autograd.grad(dkm.table, update_values, pair_grad)
    with torch.no_grad():
        fixed = _PairDKM(
            dkm.table.detach(), dkm.attention.detach(), dkm.previous.detach(), dkm.centroids.detach(), dkm.iterations
        )
        local = _local_derivative(uv.values, uv, fixed, spec)
        return local, centroid_path / uv.counts


# --------------------------------------------------------------------------------- distinct pairs by key
class _Pairs(NamedTuple):
    """Distinct (group, value) pairs found by counting keys (the fields ``_pair_dkm`` reads, and the keys)."""

    values: torch.Tensor  # (P,) value of each pair, compute dtype
    counts: torch.Tensor  # (P,) weights holding it, compute dtype
    group: torch.Tensor  # (P,) int64 group of each pair
    keys: torch.Tensor  # (P,) int64 key ``group * 65536 + pattern``, increasing

    @property
    def num_pairs(self) -> int:
        return self.values.numel()


def _pairs_from_keys(
    keys: torch.Tensor, counts: torch.Tensor, pattern_dtype: torch.dtype, compute: torch.dtype
) -> _Pairs:
    # index_select, not [...]: advanced indexing enters a parallel region even for a few thousand elements,
    # which costs milliseconds on a busy machine
    values = pattern_values(pattern_dtype, keys.device, compute).index_select(0, keys.bitwise_and(PATTERNS - 1))
    return _Pairs(values, counts.to(compute), keys.bitwise_right_shift(16), keys)


def _group_offsets(uv, groups: int) -> torch.Tensor:
    """(groups + 1,) int64: pairs ``offsets[g]:offsets[g + 1]`` belong to group ``g`` (pairs are sorted by group)."""
    if groups == 1:
        return torch.tensor([0, uv.num_pairs], dtype=torch.int64)
    per_group = torch.bincount(uv.group, minlength=groups)
    return torch.cat([per_group.new_zeros(1), per_group.cumsum(0)])


# ------------------------------------------------------------------------------------------ the plan
class _Plan(NamedTuple):
    """How one call runs: pattern keys (``dense``) or the sorted index, and which parts are compiled."""

    dense: bool
    weight_ops: object  # TorchPatternOps or the compiled module (dense only)
    pair_kernel: object  # the compiled module, or None for the torch DKM
    kind: int  # pattern kind (dense only)
    pattern_dtype: torch.dtype  # dtype the clustered values are rounded to


def _plan(weight: torch.Tensor, spec: ClusteringSpec, groups: int, kernel: Optional[bool]) -> _Plan:
    target = value_dtype(weight, spec)
    dense = target in UNIQUE_DTYPES and groups * PATTERNS <= MAX_DENSE_KEYS
    on_cpu = weight.device.type == "cpu"
    compiled = compiled_ops() if kernel is not False and on_cpu else None
    if kernel:
        problem = None
        if compiled is None:
            problem = (
                "the kernel could not be built (see the warning above)"
                if on_cpu
                else f"it runs on CPU tensors only (got {weight.device})"
            )
        elif not dense:
            problem = (
                f"it needs 16-bit clustered values and at most {MAX_DENSE_KEYS // PATTERNS} groups (got "
                f"{groups} groups, unique_dtype={spec.unique_dtype})"
            )
        elif weight.dtype not in _PATTERN_KERNEL_DTYPES:
            problem = f"it handles float32/bfloat16/float16 weights (got {weight.dtype})"
        if problem:
            raise RuntimeError(
                f"edkm_cluster(kernel=True): the compiled eDKM kernel cannot run here: {problem}; "
                f"pass kernel=None to use it where it can, or kernel=False for the torch path"
            )
    weight_ops = compiled if compiled is not None and weight.dtype in _PATTERN_KERNEL_DTYPES else TorchPatternOps
    return _Plan(dense, weight_ops, compiled, pattern_kind(target) if dense else -1, target)


def _as_rows(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the passes read it: contiguous (a transposed Conv1D view is copied)."""
    return weight.detach().contiguous()


def _check_nonfinite(nonfinite: int, weight: torch.Tensor, plan: _Plan, name: str) -> None:
    """Non-finite weights (or values beyond the 16-bit range) land on NaN/Inf patterns: the counting pass
    reports them, which replaces a pass over the weight."""
    if nonfinite:
        check_weight(weight, name)  # raises, naming the NaN and Inf counts
        raise ValueError(
            f"'{name}' has values that overflow {plan.pattern_dtype} once divided by their channel's scale "
            f"(largest magnitude {float(weight.detach().abs().max()):.3g}); clustering rounds the values to "
            f"{plan.pattern_dtype}: use a per-channel scale, or unique_dtype=torch.bfloat16"
        )


# ------------------------------------------------------------------------------------- autograd function
class _EDKMFunction(torch.autograd.Function):
    @staticmethod
    @torch.profiler.record_function("edkm::forward")
    def forward(ctx, weight, centroids, scale, spec, info, kernel, name):
        groups = centroids.shape[0]
        cdt = compute_dtype(weight)
        plan = _plan(weight, spec, groups, kernel)
        # a private copy: the caller may update its centroids in place before this backward runs
        start = centroids.detach().to(cdt, copy=True).contiguous()
        scale_c = None if scale is None else scale.detach().to(cdt).contiguous()
        if plan.dense:
            rows = _as_rows(weight)
            keys, counts, nonfinite = plan.weight_ops.count_pairs(rows, scale_c, groups, plan.kind)
            _check_nonfinite(nonfinite, weight, plan, name)
            uv = _pairs_from_keys(keys, counts, plan.pattern_dtype, cdt)
        else:
            check_weight(weight, name)
            uv = uniquify(cluster_values(weight, scale, spec, groups), cdt, name)
        check_temperature(spec.temperature, uv.values, start, name)
        if plan.pair_kernel is not None:
            table, history, masses = plan.pair_kernel.pairs_forward(
                uv.values,
                uv.counts,
                _group_offsets(uv, groups),
                start,
                spec.temperature,
                spec.iterations,
                spec.tolerance,
                False,
            )
            iterations, new_centroids = masses.shape[0], history[-1]
            ctx.pair_state = (history, masses)  # O(iterations x groups x k)
        else:
            dkm = _pair_dkm(uv.values, uv.values, uv, start, spec)
            table, iterations, new_centroids = dkm.table, dkm.iterations, dkm.centroids
        if plan.dense:
            clustered = plan.weight_ops.gather_pairs(rows, scale_c, groups, plan.kind, uv.keys, table)
        else:
            clustered = table[uv.index].view(weight.shape)
            if scale is not None:
                clustered = clustered * scale_c.view(row_view_shape(weight))
            clustered = clustered.to(weight.dtype)
        ctx.spec, ctx.plan, ctx.name = spec, plan, name
        ctx.iterations = info["iterations"] = iterations
        ctx.save_for_backward(weight, start, scale)
        new_centroids = new_centroids.to(centroids.dtype)
        ctx.mark_non_differentiable(new_centroids)
        return clustered, new_centroids

    @staticmethod
    @torch.profiler.record_function("edkm::backward")
    def backward(ctx, grad_output, _grad_centroids):
        weight, start, scale = ctx.saved_tensors
        spec, plan = ctx.spec, ctx.plan
        cdt = start.dtype
        groups = start.shape[0]
        scale_c = None if scale is None else scale.detach().to(cdt).contiguous()
        if plan.dense:
            rows = _as_rows(weight)
            grad_rows = grad_output.to(weight.dtype).contiguous()
            keys, counts, sums = plan.weight_ops.sum_pairs(rows, scale_c, groups, plan.kind, grad_rows)
            uv = _pairs_from_keys(keys, counts, plan.pattern_dtype, cdt)
            pair_grad = sums.to(cdt)
        else:
            uv = uniquify(cluster_values(weight, scale, spec, groups), cdt, ctx.name)
            grad = grad_output.to(cdt)
            if scale is not None:
                grad = grad * scale_c.view(row_view_shape(weight))
            grad = grad.reshape(-1)
            pair_grad = torch.zeros(uv.num_pairs, dtype=cdt, device=grad.device).index_add_(0, uv.index, grad)
        if plan.pair_kernel is not None:
            history, masses = ctx.pair_state
            local, per_weight = plan.pair_kernel.pairs_backward(
                uv.values, uv.counts, _group_offsets(uv, groups), history, masses, pair_grad, spec.temperature
            )
        else:
            local, per_weight = _torch_pair_backward(uv, pair_grad, start, spec, ctx.iterations)
        if plan.dense:
            grad_values = plan.weight_ops.weight_grad_pairs(
                rows, scale_c, groups, plan.kind, grad_rows, uv.keys, local, per_weight
            )
        else:
            grad_values = local[uv.index].mul_(grad).add_(per_weight[uv.index]).view(weight.shape)
            if scale is not None:
                grad_values = grad_values / scale_c.view(row_view_shape(weight))
            grad_values = grad_values.to(weight.dtype)
        return grad_values.view(weight.shape), None, None, None, None, None, None


def edkm_cluster(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    spec: ClusteringSpec,
    scale: Optional[torch.Tensor] = None,
    name: str = "weight",
    kernel: Optional[bool] = None,
) -> ClusterOutput:
    """Differentiable k-means of ``weight`` with eDKM's uniquified forward and exact backward.

    Same contract as :func:`~optimum_edkm.clustering.dkm_reference` (same math, same outputs and gradients
    when both see the same values), but memory is O(distinct values x k) instead of O(|W| x k), and only
    the weight itself (no copy) and O(groups x k) numbers are kept for backward.

    ``kernel``: ``None`` (default) runs the compiled CPU kernels where they apply (they are built on first use;
    if the build fails, a warning is issued once and the torch path is used); ``False`` runs the pure-torch
    reference path; ``True`` requires the kernels and raises where they cannot run. Both paths compute the same
    function (forward outputs agree bit for bit on the per-weight side; sums differ in rounding order only).
    """
    check_inputs(weight, centroids, spec, scale, name, finite=False)  # finiteness: on the forward's counts
    info = {}
    clustered, new_centroids = _EDKMFunction.apply(weight, centroids, scale, spec, info, kernel, name)
    return ClusterOutput(clustered, new_centroids, info["iterations"])
