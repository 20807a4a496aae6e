"""Input checks, grouping of output channels, per-channel scale and the clustered value domain."""

from __future__ import annotations

from typing import Optional

import torch

from .spec import ClusteringSpec


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (used by the exactness tests); every other float dtype is computed in fp32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def check_weight(weight, name: str = "weight", finite: bool = True) -> None:
    """Type, dtype and size of ``weight``; with ``finite`` also no NaN/Inf (a pass over the weight: eDKM's
    forward skips it and finds non-finite values in its pattern counts instead)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(
            f"'{name}' has dtype {weight.dtype}; clustering needs floating-point weights "
            f"(float32, bfloat16, float16 or float64). Dequantize it first."
        )
    if weight.dim() == 0:
        raise ValueError(
            f"'{name}' is a 0-dim tensor (a scalar, value {float(weight):.4g}); clustering needs a "
            f"weight with output channels on dim 0 (reshape it, e.g. weight.reshape(1, -1))"
        )
    if weight.numel() == 0:
        raise ValueError(f"'{name}' is empty (shape {tuple(weight.shape)}): there is nothing to cluster")
    if not finite:
        return
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(weight).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ValueError(
            f"'{name}' contains {n_nan} NaN and {n_inf} infinite values (shape {tuple(weight.shape)}); "
            f"clustering needs finite weights. Check the checkpoint, or lower the learning rate if training "
            f"diverged."
        )


def num_groups(weight: torch.Tensor, group_size: Optional[int], name: str = "weight") -> int:
    """Number of LUTs: 1 per tensor, or one per ``group_size`` consecutive output channels (dim 0)."""
    if group_size is None:
        return 1
    out_channels = weight.shape[0]
    if out_channels % group_size != 0:
        divisors = [d for d in range(1, out_channels + 1) if out_channels % d == 0]
        shown = ", ".join(map(str, divisors[:12])) + (", ..." if len(divisors) > 12 else "")
        raise ValueError(
            f"group_size={group_size} does not divide the {out_channels} output channels of '{name}' "
            f"(shape {tuple(weight.shape)}); use a divisor of {out_channels} ({shown}) or per-tensor clustering"
        )
    return out_channels // group_size


def check_centroids(centroids, groups: int, spec: ClusteringSpec, name: str = "weight") -> None:
    if not isinstance(centroids, torch.Tensor) or not centroids.is_floating_point():
        raise TypeError(f"centroids of '{name}' must be a floating-point tensor")
    expected = (groups, spec.num_clusters)
    if tuple(centroids.shape) != expected:
        raise ValueError(
            f"centroids of '{name}' have shape {tuple(centroids.shape)}, expected {expected} "
            f"(groups x 2**bits); initialise them with init_centroids(weight, spec)"
        )
    if not bool(torch.isfinite(centroids).all()):
        raise ValueError(f"centroids of '{name}' contain NaN or infinite values; re-initialise them")


def check_scale(scale, weight: torch.Tensor, name: str = "weight") -> None:
    if scale is None:
        return
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError(f"per-channel scale of '{name}' must be a floating-point tensor")
    if tuple(scale.shape) != (weight.shape[0],):
        raise ValueError(
            f"per-channel scale of '{name}' has shape {tuple(scale.shape)}, expected ({weight.shape[0]},) "
            f"(one value per output channel)"
        )
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(f"per-channel scale of '{name}' must be finite and > 0")


def check_inputs(weight, centroids, spec: ClusteringSpec, scale=None, name: str = "weight", finite: bool = True) -> int:
    """The checks every clustering entry point makes on its inputs (weight, centroids, optional per-channel
    scale); returns the number of LUT groups."""
    check_weight(weight, name, finite=finite)
    groups = num_groups(weight, spec.group_size, name)
    check_centroids(centroids, groups, spec, name)
    check_scale(scale, weight, name)
    return groups


@torch.no_grad()
def check_temperature(temperature: float, values: torch.Tensor, centroids: torch.Tensor, name: str = "weight") -> None:
    """Refuse a temperature so small that the soft assignment overflows the compute dtype.

    The logits ``-(w - c)^2 / tau`` and their slope ``2 |w - c| / tau`` are bounded by the spread of the
    clustered values and centroids; past the dtype's largest value a whole softmax row becomes ``-inf`` (NaN
    output) and the backward multiplies ``inf`` by 0 (NaN gradients). ``values``: the clustered (distinct)
    values, any shape.
    """
    # one device-to-host copy per call (this runs in every eDKM forward)
    v_min, v_max, c_min, c_max = torch.stack(
        [values.min().double(), values.max().double(), centroids.min().double(), centroids.max().double()]
    ).tolist()
    low = min(v_min, c_min)
    spread = max(v_max, c_max) - low
    worst = max(spread * spread, 2.0 * spread)
    largest = torch.finfo(values.dtype).max / 4  # room for sums of a few such terms
    if worst / temperature > largest:
        raise ValueError(
            f"temperature {temperature:.3g} is too small for '{name}' (clustered values and centroids spread over "
            f"{spread:.3g}): the softmax logits -(w - c)^2 / temperature overflow {values.dtype} and the outputs "
            f"and gradients would be NaN. Use a temperature of at least {worst / largest:.3g} (modules set it as "
            f"relative_temperature x the squared centroid spacing)"
        )


@torch.no_grad()
def per_channel_scale(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Half the value range of each output channel, rounded to fp16 so that it exports without change.

    Dividing each row by it maps the row into [-1, 1] around its midpoint scale, so rows of very different
    magnitude can share one LUT. Constant rows get the scale of their absolute value (or 1 for zero rows).
    """
    check_weight(weight, name)
    rows = weight.detach().reshape(weight.shape[0], -1).to(compute_dtype(weight))
    half_range = (rows.amax(1) - rows.amin(1)) / 2
    fallback = rows.abs().amax(1)
    scale = torch.where(half_range > 0, half_range, torch.where(fallback > 0, fallback, torch.ones_like(fallback)))
    fp16 = torch.finfo(torch.float16)
    return scale.clamp(fp16.tiny, fp16.max).to(torch.float16).to(scale.dtype)


def cluster_values(
    weight: torch.Tensor, scale: Optional[torch.Tensor], spec: ClusteringSpec, groups: int
) -> torch.Tensor:
    """The values that are clustered, as a ``[groups, values_per_group]`` tensor (no autograd).

    16-bit weights are clustered as they are; fp32/fp64 weights through their rounding to
    ``spec.unique_dtype`` (so that at most 65,536 distinct values exist); with a per-channel scale, the
    scaled weights are rounded the same way. With ``unique_dtype=None`` the exact values are kept.
    """
    values = weight.detach()
    if scale is not None:
        shape = (-1,) + (1,) * (weight.dim() - 1)
        values = values.to(compute_dtype(weight)) / scale.to(compute_dtype(weight)).view(shape)
    target = value_dtype(weight, spec)
    if values.dtype != target:
        values = values.to(target)
    return values.reshape(groups, -1)


def value_dtype(weight: torch.Tensor, spec: ClusteringSpec) -> torch.dtype:
    """dtype of the clustered values: the weight's own 16-bit dtype, else ``spec.unique_dtype`` (or exact)."""
    if spec.unique_dtype is None:
        return compute_dtype(weight)
    if weight.dtype in (torch.bfloat16, torch.float16):
        return weight.dtype
    return spec.unique_dtype


def row_view_shape(weight: torch.Tensor) -> tuple:
    return (-1,) + (1,) * (weight.dim() - 1)
