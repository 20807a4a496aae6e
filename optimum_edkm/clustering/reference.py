"""Plain DKM, exactly as published: the full |W| x k attention map, differentiated by autograd.

This is the oracle of the tests and the "DKM" row of the benchmarks. It is deliberately naive: every
iteration materialises (and autograd keeps) several |W| x k tensors in the weight's own dtype.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .layout import (
    check_inputs,
    check_temperature,
    row_view_shape,
)
from .spec import ClusteringSpec


class ClusterOutput(NamedTuple):
    """Result of one clustering forward pass.

    weight: the soft-clustered weight ``w_hat = A @ c`` (differentiable w.r.t. the input weight).
    centroids: ``[groups, 2**bits]`` centroids after the last update (detached), to warm-start the next step.
    iterations: number of centroid updates that ran (early stop on ``spec.tolerance``).
    """

    weight: torch.Tensor
    centroids: torch.Tensor
    iterations: int


def update_centroids(mass: torch.Tensor, weighted_sum: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``c = sum(a*w) / sum(a)``; a cluster with no attention mass at all keeps its previous centroid."""
    has_mass = mass > 0
    return torch.where(has_mass, weighted_sum / torch.where(has_mass, mass, torch.ones_like(mass)), previous)


def dkm_reference(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    spec: ClusteringSpec,
    scale: Optional[torch.Tensor] = None,
    name: str = "weight",
) -> ClusterOutput:
    """Differentiable k-means of ``weight`` (any shape, output channels on dim 0), computed the slow way.

    For each group of output channels, with ``c`` starting at ``centroids`` (treated as constants):
    ``A = softmax(-(w - c)^2 / tau)``, ``c = A^T w / colsum(A)``, repeated up to ``spec.iterations`` times;
    the output is ``A @ c`` with the last ``A`` and ``c``. With a per-channel ``scale`` the rows are divided
    by it before clustering and multiplied back afterwards. Computed in the weight's dtype.
    """
    groups = check_inputs(weight, centroids, spec, scale, name)

    values = weight
    if scale is not None:
        values = values / scale.to(weight.dtype).view(row_view_shape(weight))
    x = values.reshape(groups, -1, 1)  # [G, n, 1]
    c = centroids.detach().to(weight.dtype, copy=True)  # [G, k]
    check_temperature(spec.temperature, x.detach(), c, name)
    iterations = 0
    for _ in range(spec.iterations):
        attention = torch.softmax(-(x - c.unsqueeze(1)).pow(2) / spec.temperature, dim=-1)  # [G, n, k]
        mass = attention.sum(1)  # [G, k]
        weighted_sum = (attention.transpose(1, 2) @ x).squeeze(-1)  # [G, k]
        previous, c = c, update_centroids(mass, weighted_sum, c)
        iterations += 1
        if float((c - previous).detach().abs().max()) <= spec.tolerance:
            break
    clustered = (attention @ c.unsqueeze(-1)).reshape(weight.shape)
    if scale is not None:
        clustered = clustered * scale.to(weight.dtype).view(row_view_shape(weight))
    return ClusterOutput(clustered, c.detach(), iterations)
