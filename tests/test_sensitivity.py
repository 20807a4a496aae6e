"""Sensitivity-weighted k-means against a float64 brute force over every contiguous partition, and the Fisher
diagonal against per-sequence gradients recomputed with plain autograd."""

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_edkm import EDKMConfig, prepare
from optimum_edkm.clustering import ClusteringSpec, init_centroids
from optimum_edkm.nn import is_clustered
from optimum_edkm.sensitivity import fisher_diagonal, module_sensitivity


def brute_force_weighted_kmeans(values, weights, k):
    """Optimal 1-D weighted k-means in float64: optimal clusters are contiguous runs of the sorted values, so
    every way to cut the sorted distinct values into k runs is tried."""
    values, weights = torch.as_tensor(values, dtype=torch.float64), torch.as_tensor(weights, dtype=torch.float64)
    distinct = torch.unique(values)
    mass = torch.stack([weights[values == v].sum() for v in distinct])
    best = None
    for cuts in itertools.combinations(range(1, len(distinct)), k - 1):
        bounds = (0,) + cuts + (len(distinct),)
        centroids, inertia = [], 0.0
        for a, b in zip(bounds[:-1], bounds[1:]):
            m, v = mass[a:b], distinct[a:b]
            c = float((m * v).sum() / m.sum())
            centroids.append(c)
            inertia += float((m * (v - c) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, centroids)
    return torch.tensor(best[1], dtype=torch.float64)


def test_weighted_kmeans_finds_the_weighted_optimum_and_differs_from_plain():
    # two clumps and one value that matters a lot: weighting must pull a centroid towards it
    values = torch.tensor([[-1.0, -0.9, -0.8, 0.8, 0.9, 1.0, 0.3] * 2], dtype=torch.bfloat16)
    importance = torch.ones_like(values, dtype=torch.float32)
    importance[0, 6] = importance[0, 13] = 50.0
    spec = ClusteringSpec(bits=1)
    weighted = init_centroids(values, spec, seed=0, restarts=10, sample_weight=importance).double()
    expected = brute_force_weighted_kmeans(values.float().flatten(), importance.flatten(), 2)
    assert torch.allclose(weighted[0], expected, atol=1e-3)
    plain = init_centroids(values, spec, seed=0, restarts=10).double()
    assert torch.allclose(plain[0], brute_force_weighted_kmeans(values.float().flatten(), torch.ones(14), 2), atol=1e-3)
    assert not torch.allclose(plain, weighted, atol=1e-2)
    # equal importances are plain k-means
    uniform = init_centroids(values, spec, seed=0, restarts=10, sample_weight=torch.full(values.shape, 3.0))
    assert torch.allclose(uniform.double(), plain, atol=1e-6)


def test_weighted_kmeans_with_groups_and_scale_weights_errors_in_weight_units():
    torch.manual_seed(0)
    weight = torch.randn(4, 6) * torch.tensor([[1.0], [3.0], [0.5], [2.0]])
    scale = weight.abs().amax(1)
    importance = torch.rand(4, 6) + 0.1
    spec = ClusteringSpec(bits=1, group_size=2)
    got = init_centroids(weight, spec, scale=scale, seed=0, restarts=10, sample_weight=importance).double()
    clustered = (weight / scale.unsqueeze(1)).to(torch.bfloat16).double()  # what is clustered (bf16 values)
    for group in range(2):
        rows = slice(2 * group, 2 * group + 2)
        mass = importance[rows] * scale[rows].unsqueeze(1) ** 2  # an error of e in a value is scale * e in weight
        expected = brute_force_weighted_kmeans(clustered[rows].flatten(), mass.flatten(), 2)
        assert torch.allclose(got[group], expected, atol=1e-4)


def test_sample_weight_is_checked():
    spec = ClusteringSpec(bits=2)
    weight = torch.randn(4, 8)
    with pytest.raises(ValueError, match="shape"):
        init_centroids(weight, spec, sample_weight=torch.ones(8, 4))
    with pytest.raises(ValueError, match=">= 0"):
        init_centroids(weight, spec, sample_weight=-torch.ones(4, 8))


def test_fisher_diagonal_is_the_mean_squared_per_sequence_gradient(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    stream = torch.randint(3, 128, (200,))
    fisher = fisher_diagonal(model, stream, samples=3, seq_len=16, seed=0)
    assert set(fisher) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    from optimum_edkm.data import sample_windows

    name = "model.layers.1.mlp.down_proj"
    weight = model.get_submodule(name).weight
    expected = torch.zeros_like(weight, dtype=torch.float64)
    for window in sample_windows(stream, 3, 16, 0):
        model.zero_grad()
        model(input_ids=window[None], labels=window[None]).loss.backward()
        expected += weight.grad.double() ** 2
    assert torch.allclose(fisher[name].double(), expected / 3, rtol=1e-4, atol=1e-12)
    assert all(p.grad is None or True for p in model.parameters())
    scores = module_sensitivity(fisher, model, bits=3)
    assert set(scores) == set(fisher) and all(v >= 0 for v in scores.values())


def test_prepare_with_importance_uses_the_fisher_weights(tiny_llama_dir):
    float_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(1)
    fisher = fisher_diagonal(float_model, torch.randint(3, 128, (200,)), samples=2, seq_len=16)
    config = EDKMConfig(bits=2, enable_per_channel_scale=True)
    weighted = prepare(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config, importance=fisher)
    plain = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=EDKMConfig(bits=2, enable_per_channel_scale=True)
    )
    name = "model.layers.0.self_attn.q_proj"
    module = weighted.get_submodule(name)
    assert is_clustered(module)
    expected = init_centroids(
        module.weight.detach(), module.spec, scale=module.weight_scale, seed=config.seed, sample_weight=fisher[name]
    )
    assert torch.equal(module.weight_centroids, expected)
    assert not torch.equal(module.weight_centroids, plain.get_submodule(name).weight_centroids)


def test_allocate_bits_meets_the_budget_and_spends_it_where_it_pays():
    from optimum_edkm.sensitivity import allocate_bits

    sizes = {"a": 100, "b": 100, "c": 200}
    costs = {"a": {3: 10.0, 4: 1.0}, "b": {3: 2.0, 4: 1.9}, "c": {3: 8.0, 4: 2.0}}
    # budget 3.25 bits/weight over 400 weights = 100 extra bits: one upgrade of a 100-weight module
    assert allocate_bits(sizes, costs, 3.25) == {"a": 4, "b": 3, "c": 3}
    # 3.75 (300 extra bits): a and c (saving 9 + 6) beat a and b or b and c
    chosen = allocate_bits(sizes, costs, 3.75)
    assert chosen == {"a": 4, "b": 3, "c": 4}
    # the brute force over all 8 assignments agrees on the best feasible total cost
    import itertools

    best = min(
        (sum(costs[n][b] for n, b in zip(sizes, bits)), bits)
        for bits in itertools.product((3, 4), repeat=3)
        if sum(b * sizes[n] for n, b in zip(sizes, bits)) <= 3.75 * 400
    )
    assert tuple(chosen[n] for n in sizes) == best[1]
    assert allocate_bits(sizes, costs, 3.0) == {"a": 3, "b": 3, "c": 3}
    with pytest.raises(ValueError, match="exceeds the budget"):
        allocate_bits(sizes, costs, 2.5)
    with pytest.raises(ValueError, match="same modules"):
        allocate_bits({"a": 1}, costs, 3.0)
