"""eDKM: DKM over distinct values, with an exact backward pass in the same small domain.

Forward: the weights (16-bit, or rounded to 16 bits) are reduced to their distinct values per group with
counts; the centroid iterations run on those values weighted by their counts, giving a table with one
soft-clustered value per distinct value, which is gathered back per weight. Nothing of size |W| x k is ever
built (the torch path for many small groups builds it for one chunk of groups at a time, never for backward).

Backward: the gradient of weight ``i`` (value ``u = u[idx_i]``) has two parts,

* the local part ``g_i * D[idx_i]`` with ``D = d table[u] / d u`` at fixed centroids (closed form), and
* the centroid part ``E[idx_i]``: every weight with the same value moves the centroids the same way, so the
  autograd gradient of ``sum_m G_m * table_m`` with respect to the value ``u_m`` (entering through the centroid
  updates only), divided by the count of ``u_m``, is that per-weight term; ``G_m`` is the output gradient
  summed over the weights holding ``u_m``.

Only the input weight (already held by the model), the starting centroids and the per-channel scale are
saved for backward (plus the centroids and masses of every iteration, O(iterations x groups x k), with the
compiled kernel); the distinct values are recomputed from the weight itself.

How a call runs (:func:`_plan`; every path computes the same function, and a weight costs the same whatever the
number of LUT groups):

* ``"groups"`` - the compiled CPU kernel (``csrc/edkm_groups.cpp``): the whole of eDKM per group, in tables of the
  group's patterns (one thread per group when there are many, all threads on one group when there are few);
* ``"patterns"`` - torch, few large groups (one LUT per tensor): each weight is keyed by ``group * 65536 + pattern``
  (:mod:`.patterns`), one count and one gather in forward, one per-key sum and one write in backward; the DKM runs
  on the distinct pairs (:mod:`.pairs`);
* ``"direct"`` - torch, many small groups (CUDA, or no compiler): the DKM of :mod:`.pairs` on every weight (count
  1), a chunk of groups at a time, recomputed in backward;
* ``"sorted"`` - exact values (``unique_dtype=None``): :func:`~.uniquify.uniquify` with a per-weight index.
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
from .pairs import dkm, dkm_backward, iterations_run, pad_pairs, unpad
from .patterns import MAX_DENSE_KEYS, TorchPatternOps, compiled_ops, pattern_kind
from .reference import ClusterOutput
from .spec import UNIQUE_DTYPES, ClusteringSpec
from .uniquify import PATTERNS, check_rounded, pattern_values, uniquify

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: the "direct" torch path handles groups in chunks of about this many weights x clusters
DIRECT_CHUNK_ELEMENTS = 1 << 23


# --------------------------------------------------------------------------------------------- the plan
class _Plan(NamedTuple):
    """How one call runs (see the module docstring)."""

    path: str  # "groups", "patterns", "direct" or "sorted"
    weight_ops: object  # "patterns": the per-weight passes (TorchPatternOps)
    kernel: object  # "groups": the compiled module
    kind: int  # pattern kind (16-bit clustered values)
    pattern_dtype: torch.dtype  # dtype the clustered values are rounded to


def _plan(weight: torch.Tensor, spec: ClusteringSpec, groups: int, kernel: Optional[bool]) -> _Plan:
    target = value_dtype(weight, spec)
    sixteen = target in UNIQUE_DTYPES
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
        elif not sixteen:
            problem = f"it needs 16-bit clustered values (got unique_dtype={spec.unique_dtype})"
        elif weight.dtype not in _KERNEL_DTYPES:
            problem = f"it handles float32/bfloat16/float16/float64 weights (got {weight.dtype})"
        if problem:
            raise RuntimeError(
                f"edkm_cluster(kernel=True): the compiled eDKM kernel cannot run here: {problem}; "
                f"pass kernel=None to use it where it can, or kernel=False for the torch path"
            )
    kind = pattern_kind(target) if sixteen else -1
    if not sixteen:
        return _Plan("sorted", None, None, kind, target)
    if compiled is not None and weight.dtype in _KERNEL_DTYPES:
        return _Plan("groups", None, compiled, kind, target)
    # torch: key tables while they are no larger than the weight (or there is one group), else every weight
    if groups * PATTERNS <= MAX_DENSE_KEYS and (groups == 1 or groups * PATTERNS <= weight.numel()):
        return _Plan("patterns", TorchPatternOps, None, kind, target)
    return _Plan("direct", None, None, kind, target)


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


# --------------------------------------------------------------------------------- distinct pairs by key
class _Pairs(NamedTuple):
    """Distinct (group, value) pairs: found by counting keys (``keys``), or by sorting (``index``, per weight)."""

    values: torch.Tensor  # (P,) value of each pair, compute dtype
    counts: torch.Tensor  # (P,) weights holding it, compute dtype
    group: torch.Tensor  # (P,) int64 group of each pair
    keys: Optional[torch.Tensor] = None  # (P,) int64 key ``group * 65536 + pattern``, increasing
    index: Optional[torch.Tensor] = None  # pair of each weight (``"sorted"``)


def _pairs_from_keys(keys: torch.Tensor, counts: torch.Tensor, plan: _Plan, compute: torch.dtype) -> _Pairs:
    # index_select, not [...]: advanced indexing enters a parallel region even for a few thousand elements,
    # which costs milliseconds on a busy machine
    table = pattern_values(plan.pattern_dtype, keys.device, compute)
    values = table.index_select(0, keys.bitwise_and(PATTERNS - 1))
    return _Pairs(values, counts.to(compute), keys.bitwise_right_shift(16), keys)


def _find_pairs(ctx, weight, rows, scale, scale_c, groups, cdt, grad=None):
    """The distinct pairs of the weight, and with ``grad`` the output gradient summed per pair."""
    plan = ctx.plan
    if plan.path == "patterns":
        if grad is None:
            keys, counts, nonfinite = plan.weight_ops.count_pairs(rows, scale_c, groups, plan.kind)
            _check_nonfinite(nonfinite, weight, plan, ctx.name)
            return _pairs_from_keys(keys, counts, plan, cdt), None
        keys, counts, sums = plan.weight_ops.sum_pairs(rows, scale_c, groups, plan.kind, grad)
        return _pairs_from_keys(keys, counts, plan, cdt), sums.to(cdt)
    if grad is None:
        check_weight(weight, ctx.name)
    uv = uniquify(cluster_values(weight, scale, ctx.spec, groups), cdt, ctx.name)
    pairs = _Pairs(uv.values, uv.counts, uv.group, index=uv.index)
    if grad is None:
        return pairs, None
    grad = grad.to(cdt)
    if scale is not None:
        grad = grad * scale_c.view(row_view_shape(weight))
    return pairs, torch.zeros(uv.num_pairs, dtype=cdt, device=grad.device).index_add_(0, uv.index, grad.reshape(-1))


# ------------------------------------------------------------------------------------------- the paths
def _pairs_forward(ctx, weight, start, scale, scale_c, groups, cdt):
    """``"patterns"`` and ``"sorted"``: distinct pairs, DKM on them, the table gathered back per weight."""
    plan, spec = ctx.plan, ctx.spec
    rows = _as_rows(weight)
    pairs, _ = _find_pairs(ctx, weight, rows, scale, scale_c, groups, cdt)
    check_temperature(spec.temperature, pairs.values, start, ctx.name)
    padded = pad_pairs(pairs.values, pairs.counts, pairs.group, groups)
    result = dkm(padded.values, padded.values, padded.counts, start, spec)
    table = unpad(padded, result.table)
    if pairs.keys is not None:
        clustered = plan.weight_ops.gather_pairs(rows, scale_c, groups, plan.kind, pairs.keys, table)
    else:
        clustered = table[pairs.index].view(weight.shape)
        if scale is not None:
            clustered = clustered * scale_c.view(row_view_shape(weight))
        clustered = clustered.to(weight.dtype)
    return clustered, result.centroids, (len(result.history) - 1, ())


def _pairs_backward(ctx, grad_output, weight, start, scale, scale_c, groups, cdt):
    plan, spec = ctx.plan, ctx.spec
    rows = _as_rows(weight)
    grad_rows = grad_output.to(weight.dtype).contiguous()
    pairs, pair_grad = _find_pairs(ctx, weight, rows, scale, scale_c, groups, cdt, grad=grad_rows)
    padded = pad_pairs(pairs.values, pairs.counts, pairs.group, groups)
    grad = pad_pairs(pair_grad, pairs.counts, pairs.group, groups).values * (padded.counts > 0)
    local, per_weight = dkm_backward(padded.values, padded.counts, start, spec, ctx.iterations, grad)
    local, per_weight = unpad(padded, local), unpad(padded, per_weight)
    if pairs.keys is not None:
        return plan.weight_ops.weight_grad_pairs(
            rows, scale_c, groups, plan.kind, grad_rows, pairs.keys, local, per_weight
        )
    grad = grad_output.to(cdt).reshape(weight.shape[0], -1)
    if scale is not None:
        grad = grad * scale_c.unsqueeze(1)
    grad_values = local[pairs.index].view_as(grad).mul_(grad).add_(per_weight[pairs.index].view_as(grad))
    if scale is not None:
        grad_values = grad_values / scale_c.unsqueeze(1)
    return grad_values.view(weight.shape).to(weight.dtype)


def _groups_forward(ctx, weight, start, scale_c, cdt):
    """``"groups"``: the compiled kernel, replayed with fewer iterations where the tolerance stops them."""
    spec = ctx.spec
    rows = _as_rows(weight)
    iterations = spec.iterations
    while True:
        out, history, masses, nonfinite, ranges = ctx.plan.kernel.groups_forward(
            rows, scale_c, ctx.plan.kind, start, spec.temperature, iterations
        )
        _check_nonfinite(nonfinite, weight, ctx.plan, ctx.name)
        check_temperature(spec.temperature, ranges, start, ctx.name)
        ran = iterations_run(list(history), spec.tolerance) if iterations == spec.iterations else iterations
        if ran == iterations:
            return out, history[-1], (iterations, (history, masses))
        iterations = ran


def _direct_chunks(groups: int, per_group: int, k: int):
    step = max(1, DIRECT_CHUNK_ELEMENTS // max(per_group * k, 1))
    return [(first, min(first + step, groups)) for first in range(0, groups, step)]


def _direct_forward(ctx, weight, start, scale, scale_c, groups, cdt):
    """``"direct"``: DKM on every weight (count 1), a chunk of groups at a time."""
    spec = ctx.spec
    check_weight(weight, ctx.name)
    values = cluster_values(weight, scale, spec, groups)
    check_rounded(values, ctx.name)
    values = values.to(cdt)
    check_temperature(spec.temperature, values, start, ctx.name)
    chunks = _direct_chunks(groups, values.shape[1], start.shape[1])

    def run(iterations):
        results = [dkm(values[a:b], values[a:b], None, start[a:b], spec, iterations=iterations) for a, b in chunks]
        history = [torch.cat(parts) for parts in zip(*(result.history for result in results))]
        return torch.cat([result.table for result in results]), history

    table, history = run(spec.iterations)
    iterations = iterations_run(history, spec.tolerance)
    if iterations < spec.iterations:
        table, history = run(iterations)
    clustered = table.view(weight.shape)
    if scale is not None:
        clustered = clustered * scale_c.view(row_view_shape(weight))
    return clustered.to(weight.dtype), history[-1], (iterations, ())


def _direct_backward(ctx, grad_output, weight, start, scale, scale_c, groups, cdt):
    values = cluster_values(weight, scale, ctx.spec, groups).to(cdt)
    grad = grad_output.to(cdt).reshape(weight.shape[0], -1)
    if scale is not None:
        grad = grad * scale_c.unsqueeze(1)
    grad = grad.reshape(groups, -1)
    parts = []
    for a, b in _direct_chunks(groups, values.shape[1], start.shape[1]):
        local, per_weight = dkm_backward(values[a:b], None, start[a:b], ctx.spec, ctx.iterations, grad[a:b])
        parts.append(local * grad[a:b] + per_weight)
    grad_values = torch.cat(parts).view(weight.shape[0], -1)
    if scale is not None:
        grad_values = grad_values / scale_c.unsqueeze(1)
    return grad_values.view(weight.shape).to(weight.dtype)


# ------------------------------------------------------------------------------------- autograd function
class _EDKMFunction(torch.autograd.Function):
    @staticmethod
    @torch.profiler.record_function("edkm::forward")
    def forward(ctx, weight, centroids, scale, spec, info, kernel, name):
        groups = centroids.shape[0]
        cdt = compute_dtype(weight)
        ctx.spec, ctx.name = spec, name
        ctx.plan = plan = _plan(weight, spec, groups, kernel)
        # a private copy: the caller may update its centroids in place before this backward runs
        start = centroids.detach().to(cdt, copy=True).contiguous()
        scale_c = None if scale is None else scale.detach().to(cdt).contiguous()
        if plan.path == "groups":
            clustered, new_centroids, (iterations, state) = _groups_forward(ctx, weight, start, scale_c, cdt)
        elif plan.path == "direct":
            clustered, new_centroids, (iterations, state) = _direct_forward(
                ctx, weight, start, scale, scale_c, groups, cdt
            )
        else:
            clustered, new_centroids, (iterations, state) = _pairs_forward(
                ctx, weight, start, scale, scale_c, groups, cdt
            )
        ctx.iterations = info["iterations"] = iterations
        # the per-iteration centroids and masses of the compiled kernel (O(iterations x groups x k)) are saved
        # like the rest, so that memory meters and saved-tensor policies see them
        ctx.save_for_backward(weight, start, scale, *state)
        new_centroids = new_centroids.to(centroids.dtype)
        ctx.mark_non_differentiable(new_centroids)
        return clustered, new_centroids

    @staticmethod
    @torch.profiler.record_function("edkm::backward")
    def backward(ctx, grad_output, _grad_centroids):
        weight, start, scale, *state = ctx.saved_tensors
        plan = ctx.plan
        cdt = start.dtype
        groups = start.shape[0]
        scale_c = None if scale is None else scale.detach().to(cdt).contiguous()
        if plan.path == "groups":
            history, masses = state
            grad_values = plan.kernel.groups_backward(
                _as_rows(weight), scale_c, plan.kind, grad_output.to(weight.dtype).contiguous(), history, masses,
                ctx.spec.temperature,
            )  # fmt: skip
        elif plan.path == "direct":
            grad_values = _direct_backward(ctx, grad_output, weight, start, scale, scale_c, groups, cdt)
        else:
            grad_values = _pairs_backward(ctx, grad_output, weight, start, scale, scale_c, groups, cdt)
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

    ``kernel``: ``None`` (default) runs the compiled CPU kernel where it applies (it is built on first use; if the
    build fails, a warning is issued once and the torch path is used); ``False`` runs the pure-torch reference
    path; ``True`` requires the kernel and raises where it cannot run. Both compute the same function (sums differ
    in rounding order; the kernel flushes attention weights below float32's normal range, 1.2e-38, to 0).
    """
    check_inputs(weight, centroids, spec, scale, name, finite=False)  # finiteness: on the forward's counts
    info = {}
    clustered, new_centroids = _EDKMFunction.apply(weight, centroids, scale, spec, info, kernel, name)
    return ClusterOutput(clustered, new_centroids, info["iterations"])
