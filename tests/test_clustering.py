"""The clustering engine against independent references: plain DKM, float64 recomputation, brute force."""

import dataclasses
import importlib
import itertools
import math

import pytest
import torch

from optimum_edkm.clustering import (
    ClusteringSpec,
    SavedTensorMeter,
    decode,
    dkm_reference,
    edkm_cluster,
    hard_assign,
    init_centroids,
    pack_indices,
    packed_size,
    per_channel_scale,
    uniquify,
    unpack_indices,
)

uniquify_module = importlib.import_module("optimum_edkm.clustering.uniquify")
edkm_module = importlib.import_module("optimum_edkm.clustering.edkm")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bf16_representable(shape, std=0.02, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * std).to(torch.bfloat16).to(dtype)


def relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm())


def reference_on_rounded_domain(weight, centroids, spec, scale):
    """Independent oracle for eDKM with a per-channel scale: plain DKM on bf16(w / s), multiplied back,
    with the rounding treated as identity in backward (straight-through)."""
    rows = (-1,) + (1,) * (weight.dim() - 1)
    scaled = (weight.detach() / scale.view(rows)).to(torch.bfloat16).to(weight.dtype).requires_grad_(True)
    out = dkm_reference(scaled, centroids, spec)
    return out, scaled


#: how edkm_cluster can run (edkm._plan): compiled per group; torch keyed by pattern; torch per weight
PATHS = ["groups", "patterns", "direct"]


def use_path(monkeypatch, path):
    """Make every edkm_cluster call in the test take ``path`` (whatever the layout, dtype or device)."""
    from optimum_edkm.clustering.patterns import TorchPatternOps, compiled_ops

    ops = compiled_ops() if path == "groups" else None
    if path == "groups" and ops is None:
        pytest.skip("the compiled eDKM kernel could not be built here (no C++ compiler / ninja, or disabled)")
    original = edkm_module._plan

    def plan(weight, spec, groups, kernel):
        chosen = original(weight, spec, groups, kernel)
        weight_ops = TorchPatternOps if path == "patterns" else None
        return chosen._replace(path=path, weight_ops=weight_ops, kernel=ops)

    monkeypatch.setattr(edkm_module, "_plan", plan)


CASES = list(itertools.product(range(1, 9), [None, 1, 2], [False, True]))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits,group_size,with_scale", CASES)
def test_edkm_equals_reference_dkm_in_float64(bits, group_size, with_scale, path, monkeypatch):
    use_path(monkeypatch, path)
    kernel = None
    shape = (6, 37) if bits < 7 else (4, 5, 7)  # odd sizes; a conv-like 3-D weight too
    weight = bf16_representable(shape, seed=bits).requires_grad_(True)
    # scaled rows live in [-1, 1] instead of ~[-0.05, 0.05]: a temperature on the same relative footing
    temperature = 0.1 if with_scale else 1e-4
    spec = ClusteringSpec(bits=bits, group_size=group_size, temperature=temperature, iterations=3)
    scale = per_channel_scale(weight) if with_scale else None
    centroids = init_centroids(weight, spec, scale=scale, seed=bits)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(100 + bits), dtype=torch.float64)

    edkm = edkm_cluster(weight, centroids, spec, scale=scale, kernel=kernel)
    (grad_edkm,) = torch.autograd.grad(edkm.weight, weight, upstream)

    if with_scale:
        ref, scaled = reference_on_rounded_domain(weight, centroids, spec, scale)
        rows = (-1,) + (1,) * (weight.dim() - 1)
        expected = ref.weight * scale.view(rows)
        (grad_scaled,) = torch.autograd.grad(expected, scaled, upstream)
        grad_ref = grad_scaled / scale.view(rows)
    else:
        ref = dkm_reference(weight, centroids, spec)
        expected = ref.weight
        (grad_ref,) = torch.autograd.grad(expected, weight, upstream)

    assert edkm.iterations == ref.iterations == 3
    assert relative_error(edkm.weight, expected) < 1e-9
    assert relative_error(edkm.centroids, ref.centroids) < 1e-9
    assert relative_error(grad_edkm, grad_ref) < 1e-9
    assert float(grad_ref.abs().max()) > 0


def test_temperature_controls_softness_and_gradients_match_at_any_temperature():
    weight = bf16_representable((8, 16), seed=3).requires_grad_(True)
    for temperature in (1e-6, 1e-3):
        spec = ClusteringSpec(bits=2, temperature=temperature, iterations=2)
        centroids = init_centroids(weight, spec)
        upstream = torch.randn(weight.shape, dtype=torch.float64)
        ref = dkm_reference(weight, centroids, spec)
        edkm = edkm_cluster(weight, centroids, spec)
        (g_ref,) = torch.autograd.grad(ref.weight, weight, upstream)
        (g_edkm,) = torch.autograd.grad(edkm.weight, weight, upstream)
        assert relative_error(g_edkm, g_ref) < 1e-9
    # a cold softmax is nearly a hard assignment: the output has (almost) only 4 distinct values
    cold = edkm_cluster(
        weight,
        init_centroids(weight, ClusteringSpec(bits=2, temperature=1e-9)),
        ClusteringSpec(bits=2, temperature=1e-9),
    )
    assert cold.weight.detach().unique().numel() <= 4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("group_size,stop_tolerance", [(None, 3e-5), (1, 3e-4), (4, 3e-4)])
def test_early_stop_on_tolerance_is_the_same_in_both_engines(path, group_size, stop_tolerance, monkeypatch):
    use_path(monkeypatch, path)
    weight = bf16_representable((16, 16), seed=5).requires_grad_(True)
    loose = ClusteringSpec(bits=3, group_size=group_size, iterations=10, tolerance=1.0)  # every move is < 1.0
    centroids = init_centroids(weight, loose)
    assert dkm_reference(weight, centroids, loose).iterations == 1
    assert edkm_cluster(weight, centroids, loose).iterations == 1
    # a tolerance that stops the updates after a few iterations, on all groups at once
    moving = ClusteringSpec(bits=3, group_size=group_size, iterations=10, tolerance=stop_tolerance, temperature=3e-6)
    ref = dkm_reference(weight, centroids, moving)
    edkm = edkm_cluster(weight, centroids, moving)
    assert 1 < ref.iterations < 10 and edkm.iterations == ref.iterations
    assert relative_error(edkm.weight, ref.weight) < 1e-9 and relative_error(edkm.centroids, ref.centroids) < 1e-9
    strict = ClusteringSpec(bits=3, group_size=group_size, iterations=10, tolerance=0.0)
    ref = dkm_reference(weight, centroids, strict)
    edkm = edkm_cluster(weight, centroids, strict)
    assert ref.iterations == edkm.iterations
    upstream = torch.randn(weight.shape, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(ref.weight, weight, upstream)
    (g_edkm,) = torch.autograd.grad(edkm.weight, weight, upstream)
    assert relative_error(g_edkm, g_ref) < 1e-9


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("group_size", [None, 1])
def test_a_cluster_that_attracts_no_weight_keeps_its_centroid(path, dtype, group_size, monkeypatch):
    use_path(monkeypatch, path)
    weight = bf16_representable((8, 8), seed=6, dtype=dtype).requires_grad_(True)
    spec = ClusteringSpec(bits=2, group_size=group_size)
    groups = 1 if group_size is None else 8
    centroids = torch.tensor([[-0.01, 0.01, 5.0, 6.0]], dtype=dtype).repeat(groups, 1)  # two far from every weight
    ref = dkm_reference(weight.double(), centroids.double(), spec)
    edkm = edkm_cluster(weight, centroids, spec)
    assert (ref.centroids[:, 2:] == torch.tensor([5.0, 6.0])).all() and (
        edkm.centroids[:, 2:] == ref.centroids[:, 2:]
    ).all()
    upstream = torch.randn(weight.shape, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(ref.weight, weight, upstream)
    (g_edkm,) = torch.autograd.grad(edkm.weight, weight, upstream.to(dtype))
    tolerance = 1e-9 if dtype == torch.float64 else 1e-5
    assert bool(torch.isfinite(g_ref).all()) and relative_error(g_edkm, g_ref) < tolerance


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("group_size,with_scale", [(None, False), (1, False), (16, False), (8, False), (1, True)])
def test_every_layout_and_dtype_within_rounding_of_float64_oracle(dtype, group_size, with_scale, path, monkeypatch):
    """Per tensor, one LUT per channel, grouped channels, with a per-channel scale; 16-bit, fp32 and fp64 weights:
    eDKM (on every path) against plain DKM computed in float64 on the values eDKM clusters."""
    use_path(monkeypatch, path)
    weight = (torch.randn(32, 48, generator=torch.Generator().manual_seed(7)) * 0.02).to(dtype)
    weight.requires_grad_(True)
    spec = ClusteringSpec(bits=3, group_size=group_size, temperature=1e-4 if not with_scale else 0.02)
    scale = per_channel_scale(weight) if with_scale else None
    centroids = init_centroids(weight, spec, scale=scale)
    # eDKM clusters 16-bit weights as they are, fp32/fp64 weights through their bf16 rounding (after the scale)
    domain = torch.bfloat16 if dtype in (torch.float32, torch.float64) else dtype
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(8))
    if with_scale:
        rows = scale.double().unsqueeze(1)
        clustered = (weight.detach().to(scale.dtype) / scale.unsqueeze(1)).to(domain).double().requires_grad_(True)
        oracle = dkm_reference(clustered, centroids.double(), spec)
        (g_oracle,) = torch.autograd.grad(oracle.weight * rows, clustered, upstream.double())
        expected, g_expected = oracle.weight * rows, g_oracle / rows
    else:
        oracle_weight = weight.detach().to(domain).double().requires_grad_(True)
        oracle = dkm_reference(oracle_weight, centroids.double(), spec)
        (g_expected,) = torch.autograd.grad(oracle.weight, oracle_weight, upstream.double())
        expected = oracle.weight

    edkm = edkm_cluster(weight, centroids, spec, scale=scale)
    (g_edkm,) = torch.autograd.grad(edkm.weight, weight, upstream.to(dtype))
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-9}.get(dtype, 2 * torch.finfo(dtype).eps)
    assert edkm.weight.dtype == dtype and g_edkm.dtype == dtype
    assert relative_error(edkm.weight, expected) < tolerance
    assert relative_error(edkm.centroids, oracle.centroids) < max(tolerance, 1e-6)
    assert relative_error(g_edkm, g_expected) < tolerance
    assert float(g_expected.abs().max()) > 0
    if dtype != torch.float64 and not with_scale:
        # plain DKM computed in the same low precision is no closer to the oracle than eDKM
        ref = dkm_reference(weight, centroids, spec)
        assert relative_error(edkm.weight, expected) <= relative_error(ref.weight, expected) + tolerance


def test_saved_for_backward_is_100x_smaller_than_reference_dkm():
    weight = (torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    weight.requires_grad_(True)
    spec = ClusteringSpec(bits=3)
    centroids = init_centroids(weight, spec)
    with SavedTensorMeter(resident=[weight]) as dkm_meter:
        dkm_out = dkm_reference(weight, centroids, spec)
    with SavedTensorMeter(resident=[weight]) as edkm_meter:
        edkm_out = edkm_cluster(weight, centroids, spec)
    # plain DKM keeps several |W| x 8 maps per iteration
    assert dkm_meter.saved_bytes >= 3 * weight.numel() * 8 * weight.element_size()
    assert edkm_meter.saved_bytes * 100 <= dkm_meter.saved_bytes
    # even counting the weight itself, eDKM keeps at most 16 bits per weight plus a 65,536 x k table
    assert edkm_meter.saved_bytes + edkm_meter.resident_bytes <= 2 * weight.numel() + 65536 * 8 * 4
    # and both still backpropagate
    dkm_out.weight.float().sum().backward()
    edkm_out.weight.float().sum().backward()
    assert weight.grad is not None and bool(torch.isfinite(weight.grad).all())


@pytest.mark.parametrize("path", ["groups", "direct"])
def test_one_lut_per_channel_saves_no_per_weight_tensor_for_backward(path, monkeypatch):
    """Many LUT groups: backward keeps the weight (resident), the centroids and per-iteration centroids and masses
    (O(iterations x groups x k)), never anything per weight."""
    use_path(monkeypatch, path)
    weight = (torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02).requires_grad_(True)
    spec = ClusteringSpec(bits=3, group_size=1)
    centroids = init_centroids(weight, spec)
    scale = per_channel_scale(weight)
    with SavedTensorMeter(resident=[weight, scale]) as meter:
        out = edkm_cluster(weight, centroids, spec, scale=scale)
    groups_k = 256 * 8 * 4  # one float32 per group and cluster
    assert meter.saved_bytes <= (2 * spec.iterations + 2) * groups_k  # start, c_1..c_T, masses
    assert meter.saved_bytes < weight.numel()  # less than a byte per weight
    out.weight.sum().backward()
    assert bool(torch.isfinite(weight.grad).all())


def test_saved_tensor_meter_counts_views_once_and_separates_resident():
    base = torch.randn(64, 64, requires_grad=True)
    with SavedTensorMeter(resident=[base]) as meter:
        hidden = base.exp()  # saves its output (64*64*4 bytes)
        (hidden.t() * hidden.t()).sum()  # two saves of a view of the same storage
        (base * 2).sin()  # saves base*2 (new) ...
        (base.view(-1) * 3).sum()  # ... and multiplication by a constant saves nothing
    assert meter.saved_bytes == 2 * 64 * 64 * 4
    assert meter.resident_bytes == 0 or meter.resident_bytes == 64 * 64 * 4
    assert meter.saved_tensors >= 3


@pytest.mark.parametrize("device", DEVICES)
def test_edkm_runs_on_every_device(device):
    weight = (torch.randn(8, 40) * 0.02).to(device=device, dtype=torch.bfloat16).requires_grad_(True)
    spec = ClusteringSpec(bits=2, group_size=4)
    centroids = init_centroids(weight, spec)
    assert centroids.device.type == device
    out = edkm_cluster(weight, centroids, spec)
    out.weight.float().pow(2).sum().backward()
    assert out.weight.device.type == device and weight.grad.device.type == device


def test_fp32_master_weights_get_the_gradient_of_their_bf16_rounding():
    master = (torch.randn(16, 24, generator=torch.Generator().manual_seed(11)) * 0.02).requires_grad_(True)
    spec = ClusteringSpec(bits=3)
    centroids = init_centroids(master, spec)
    rounded = master.detach().to(torch.bfloat16).float().requires_grad_(True)
    upstream = torch.randn(master.shape)
    (g_master,) = torch.autograd.grad(edkm_cluster(master, centroids, spec).weight, master, upstream)
    (g_rounded,) = torch.autograd.grad(dkm_reference(rounded, centroids, spec).weight, rounded, upstream)
    assert relative_error(g_master, g_rounded) < 1e-4
    # with unique_dtype=None the exact fp32 values are clustered (torch.unique fallback)
    exact = ClusteringSpec(bits=3, unique_dtype=None)
    ref = dkm_reference(master, centroids, exact)
    (g_ref,) = torch.autograd.grad(ref.weight, master, upstream)
    out = edkm_cluster(master, centroids, exact)
    (g_exact,) = torch.autograd.grad(out.weight, master, upstream)
    assert relative_error(out.weight, ref.weight) < 1e-5
    assert relative_error(g_exact, g_ref) < 1e-4


# ------------------------------------------------------------------------- compiled kernels vs torch paths
@pytest.fixture(scope="module")
def compiled():
    from optimum_edkm.clustering.patterns import compiled_ops

    ops = compiled_ops()
    if ops is None:
        pytest.skip("the compiled eDKM kernels could not be built here (no C++ compiler / ninja, or disabled)")
    return ops


@pytest.mark.parametrize("torch_path", ["patterns", "direct"])
@pytest.mark.parametrize(
    "bits,group_size,iterations,tolerance",
    [(1, None, 1, 0.0), (3, 2, 3, 0.0), (6, None, 2, 0.0), (4, 3, 10, 1e-3), (3, 1, 3, 0.0), (8, 1, 2, 0.0)],
)
def test_compiled_reverse_pass_equals_autograd_in_float64(
    compiled, torch_path, bits, group_size, iterations, tolerance, monkeypatch
):
    """The compiled kernel (its reverse pass written out) against the torch paths (autograd replay), in float64."""
    weight = bf16_representable((6, 50), seed=bits).requires_grad_(True)
    spec = ClusteringSpec(
        bits=bits, group_size=group_size, temperature=3e-5, iterations=iterations, tolerance=tolerance
    )
    centroids = init_centroids(weight, spec, seed=bits)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    results = []
    for path in ("groups", torch_path):
        with monkeypatch.context() as patch:
            use_path(patch, path)
            out = edkm_cluster(weight, centroids, spec)
        results.append((out, *torch.autograd.grad(out.weight, weight, upstream)))
    (compiled_out, compiled_grad), (torch_out, torch_grad) = results
    assert compiled_out.iterations == torch_out.iterations
    assert relative_error(compiled_out.weight, torch_out.weight) < 1e-13
    assert relative_error(compiled_out.centroids, torch_out.centroids) < 1e-13
    assert relative_error(compiled_grad, torch_grad) < 1e-12
    assert float(torch_grad.abs().max()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size,with_scale", [(None, False), (8, True), (1, False), (1, True)])
def test_compiled_and_torch_paths_agree_in_low_precision(compiled, dtype, group_size, with_scale):
    weight = (torch.randn(32, 40, generator=torch.Generator().manual_seed(4)) * 0.02).to(dtype).requires_grad_(True)
    spec = ClusteringSpec(bits=3, group_size=group_size, temperature=1e-5 if not with_scale else 0.02)
    scale = per_channel_scale(weight) if with_scale else None
    centroids = init_centroids(weight, spec, scale=scale)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    compiled_out = edkm_cluster(weight, centroids, spec, scale=scale, kernel=True)
    torch_out = edkm_cluster(weight, centroids, spec, scale=scale, kernel=False)
    (compiled_grad,) = torch.autograd.grad(compiled_out.weight, weight, upstream)
    (torch_grad,) = torch.autograd.grad(torch_out.weight, weight, upstream)
    tolerance = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert compiled_out.weight.dtype == dtype
    assert relative_error(compiled_out.weight, torch_out.weight) < tolerance
    assert relative_error(compiled_out.centroids, torch_out.centroids) < 1e-5
    assert relative_error(compiled_grad, torch_grad) < tolerance


@pytest.mark.parametrize("path", PATHS)
def test_transposed_weight_view_like_conv1d(path, monkeypatch):
    """GPT-2's Conv1D presents its [in, out] weight transposed: a non-contiguous view with rows on dim 0."""
    use_path(monkeypatch, path)
    kernel = None
    stored = bf16_representable((40, 12), seed=8).requires_grad_(True)
    spec = ClusteringSpec(bits=2, group_size=4)
    centroids = init_centroids(stored.t(), spec)
    out = edkm_cluster(stored.t(), centroids, spec, kernel=kernel)
    ref = dkm_reference(stored.t(), centroids, spec)
    upstream = torch.randn(12, 40, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out.weight, stored, upstream)
    (grad_ref,) = torch.autograd.grad(ref.weight, stored, upstream)
    assert out.weight.shape == (12, 40)
    assert relative_error(out.weight, ref.weight) < 1e-9 and relative_error(grad, grad_ref) < 1e-9


def test_every_path_and_the_sorted_index_give_the_same_result(monkeypatch):
    """The paths chosen by the number of groups, and the sorted per-weight index of exact (unique_dtype=None)
    values, on values that are already 16-bit: the same function."""
    weight = bf16_representable((8, 30), seed=12).requires_grad_(True)
    spec = ClusteringSpec(bits=3, group_size=2)
    centroids = init_centroids(weight, spec)
    upstream = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for path in PATHS + ["sorted"]:
        with monkeypatch.context() as patch:
            if path == "sorted":
                out = edkm_cluster(weight, centroids, dataclasses.replace(spec, unique_dtype=None))
            else:
                use_path(patch, path)
                out = edkm_cluster(weight, centroids, spec)
        results.append((out.weight, *torch.autograd.grad(out.weight, weight, upstream)))
    for out, grad in results[1:]:
        assert relative_error(out, results[0][0]) < 1e-13 and relative_error(grad, results[0][1]) < 1e-12


def test_group_kernel_with_too_many_values_to_keep_their_attention(compiled, monkeypatch):
    """8 bits and more than 8,192 distinct values: the kernel recomputes the attention it would otherwise keep."""
    generator = torch.Generator().manual_seed(9)
    magnitude = torch.exp(torch.rand(200, 200, generator=generator) * -30)  # 43 binades: ~10,000 bf16 patterns
    weight = (magnitude * torch.randn(200, 200, generator=generator).sign()).requires_grad_(True)
    spec = ClusteringSpec(bits=8, temperature=1e-3)
    assert torch.unique(weight.detach().to(torch.bfloat16)).numel() > 8192
    centroids = init_centroids(weight, spec)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(10))
    results = []
    for path in ("groups", "patterns"):
        with monkeypatch.context() as patch:
            use_path(patch, path)
            out = edkm_cluster(weight, centroids, spec)
        results.append((out, *torch.autograd.grad(out.weight, weight, upstream)))
    (compiled_out, compiled_grad), (torch_out, torch_grad) = results
    assert relative_error(compiled_out.weight, torch_out.weight) < 1e-5
    assert relative_error(compiled_out.centroids, torch_out.centroids) < 1e-5
    assert relative_error(compiled_grad, torch_grad) < 1e-4


@pytest.mark.parametrize("with_scale", [False, True])
def test_direct_path_in_chunks_of_groups_equals_one_chunk(with_scale, monkeypatch):
    """Without the compiled kernels, many groups are clustered a chunk of groups at a time (bounded memory)."""
    use_path(monkeypatch, "direct")
    weight = bf16_representable((12, 20), seed=13).requires_grad_(True)
    spec = ClusteringSpec(
        bits=2, group_size=1, iterations=4, tolerance=1e-4, temperature=1e-4 if not with_scale else 0.05
    )
    scale = per_channel_scale(weight) if with_scale else None
    centroids = init_centroids(weight, spec, scale=scale)
    upstream = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for chunk in (1 << 23, 3 * 20 * 4):  # everything at once; 3 groups per chunk
        monkeypatch.setattr(edkm_module, "DIRECT_CHUNK_ELEMENTS", chunk)
        out = edkm_cluster(weight, centroids, spec, scale=scale)
        results.append((out, *torch.autograd.grad(out.weight, weight, upstream)))
    (whole, whole_grad), (chunked, chunked_grad) = results
    assert whole.iterations == chunked.iterations
    assert torch.equal(whole.weight, chunked.weight) and torch.equal(whole.centroids, chunked.centroids)
    assert relative_error(chunked_grad, whole_grad) < 1e-13


@pytest.mark.parametrize("group_size", [None, 384, 4])  # with 2 threads: all on one group; a thread a group
def test_group_kernel_results_do_not_depend_on_the_thread_count(compiled, group_size):
    """Few groups: every thread counts and writes rows of the same group (tables added up); many: a thread takes
    whole groups. Either way, the result is that of one thread."""
    weight = (torch.randn(768, 96, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    grad = torch.randn(768, 96, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    spec = ClusteringSpec(bits=3, group_size=group_size)
    start = init_centroids(weight, spec).float().contiguous()
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out, history, masses, nonfinite, ranges = compiled.groups_forward(weight, None, 0, start, 1e-5, 3)
        results.append((out, history, masses, compiled.groups_backward(weight, None, 0, grad, history, masses, 1e-5)))
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("group_size", [None, 1])
def test_non_finite_and_overflowing_values_are_found_in_the_counts(path, group_size, monkeypatch):
    use_path(monkeypatch, path)
    spec = ClusteringSpec(bits=2, group_size=group_size)
    groups = 1 if group_size is None else 4
    bad = torch.full((4, 4), 0.01)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="'up.weight' contains 1 NaN and 0 infinite values"):
        edkm_cluster(bad, torch.zeros(groups, 4), spec, name="up.weight")
    # finite in float32 but beyond float16: with unique_dtype=float16 it would be clustered as infinity
    large = torch.full((4, 4), 0.01)
    large[0, 0] = 1e6
    fp16 = dataclasses.replace(spec, unique_dtype=torch.float16)
    with pytest.raises(ValueError, match="overflow torch.float16"):
        edkm_cluster(large, torch.zeros(groups, 4), fp16)


def test_kernel_true_says_why_it_cannot_run(compiled):
    with pytest.raises(RuntimeError, match="16-bit clustered values"):
        edkm_cluster(torch.randn(4, 4), torch.zeros(1, 4), ClusteringSpec(bits=2, unique_dtype=None), kernel=True)
    # every float weight, per tensor or per channel, runs compiled
    for dtype, group_size in ((torch.float64, None), (torch.float64, 1), (torch.float16, 1)):
        spec = ClusteringSpec(bits=2, group_size=group_size)
        weight = torch.randn(4, 4).to(dtype)
        out = edkm_cluster(weight, init_centroids(weight, spec), spec, kernel=True)
        assert out.weight.dtype == dtype


# ----------------------------------------------------------------------------------------- uniquification
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("force_sort", [False, True])
def test_uniquify_reconstructs_values_and_counts(groups, force_sort, monkeypatch):
    if force_sort:
        monkeypatch.setattr(uniquify_module, "_MAX_DENSE_BINS", 0)
    values = (torch.randn(groups, 300) * 0.05).to(torch.bfloat16)
    values[0, :5] = 0.0
    values[0, 5] = -0.0
    uv = uniquify(values, torch.float64)
    assert torch.equal(uv.values[uv.index].view(groups, -1), values.double())
    assert torch.equal(uv.group[uv.index].view(groups, -1), torch.arange(groups).unsqueeze(1).expand(groups, 300))
    assert int(uv.counts.sum()) == values.numel()
    for g in range(groups):
        own = uv.values[uv.group == g]
        assert own.numel() == torch.unique(values[g].float().view(torch.int32)).numel()  # distinct bit patterns
    assert bool((uv.group[1:] >= uv.group[:-1]).all())


# ------------------------------------------------------------------------------- initialisation, snapping
def optimal_1d_kmeans_inertia(values, counts, k):
    """Exact weighted 1-D k-means by dynamic programming over sorted distinct values (O(k n^2))."""
    order = torch.argsort(values)
    x, w = values[order].tolist(), counts[order].tolist()
    n = len(x)
    pw, pwx, pwxx = [0.0], [0.0], [0.0]
    for xi, wi in zip(x, w):
        pw.append(pw[-1] + wi)
        pwx.append(pwx[-1] + wi * xi)
        pwxx.append(pwxx[-1] + wi * xi * xi)

    def cost(i, j):  # values i..j-1 in one cluster
        m = pw[j] - pw[i]
        s = pwx[j] - pwx[i]
        return pwxx[j] - pwxx[i] - s * s / m

    best = [math.inf] * (n + 1)
    best[0] = 0.0
    for _ in range(min(k, n)):
        nxt = [math.inf] * (n + 1)
        nxt[0] = 0.0
        for j in range(1, n + 1):
            nxt[j] = min(best[i] + cost(i, j) for i in range(j))
        best = nxt
    return best[n]


def test_init_centroids_close_to_optimal_1d_kmeans():
    weight = bf16_representable((4, 40), seed=2, std=0.05)
    spec = ClusteringSpec(bits=2)
    centroids = init_centroids(weight, spec, seed=0)
    values = weight.reshape(-1)
    inertia = float(((values.unsqueeze(1) - centroids[0]).pow(2).min(1).values).sum())
    uv = uniquify(weight.to(torch.bfloat16).reshape(1, -1), torch.float64)
    optimal = optimal_1d_kmeans_inertia(uv.values, uv.counts, 4)
    assert optimal <= inertia + 1e-15
    assert inertia <= optimal * 1.05


def test_init_centroids_is_deterministic_and_batched_groups_match_one_by_one():
    weight = bf16_representable((12, 50), seed=4)
    spec = ClusteringSpec(bits=3, group_size=4)
    first = init_centroids(weight, spec, seed=1)
    assert torch.equal(first, init_centroids(weight, spec, seed=1))
    assert bool((first[:, 1:] >= first[:, :-1]).all())
    for g in range(3):
        rows = weight[4 * g : 4 * g + 4].reshape(-1, 1)
        centroids = first[g]
        # a Lloyd fixed point: every centroid is the mean of the values nearest to it ...
        label = (rows - centroids).abs().argmin(1)
        for j in range(8):
            if bool((label == j).any()):
                assert float(rows[label == j].mean()) == pytest.approx(float(centroids[j]), abs=1e-12)
        # ... and close to the optimum of 1-D k-means for that group
        uv = uniquify(rows.reshape(1, -1).to(torch.bfloat16), torch.float64)
        inertia = float((rows - centroids).pow(2).min(1).values.sum())
        assert inertia <= 1.5 * optimal_1d_kmeans_inertia(uv.values, uv.counts, 8)


def test_fewer_distinct_values_than_clusters_gives_a_padded_lut_of_those_values():
    weight = torch.tensor([[0.5, -0.25, 0.5, 0.125], [0.125, 0.5, -0.25, -0.25]])
    spec = ClusteringSpec(bits=3)
    centroids = init_centroids(weight, spec)
    assert centroids.shape == (1, 8)
    assert set(centroids[0].tolist()) == {0.5, -0.25, 0.125}
    snapped = hard_assign(weight, centroids, spec)
    assert torch.equal(decode(snapped.indices, snapped.lut), weight)
    out = edkm_cluster(weight.requires_grad_(True), centroids, spec)
    assert bool(torch.isfinite(out.weight).all())


@pytest.mark.parametrize("group_size,with_scale", [(None, False), (2, False), (None, True), (4, True)])
def test_hard_assignment_is_the_nearest_lut_entry(group_size, with_scale):
    weight = bf16_representable((8, 33), seed=9, dtype=torch.float32)
    spec = ClusteringSpec(bits=3, group_size=group_size)
    scale = per_channel_scale(weight) if with_scale else None
    centroids = init_centroids(weight, spec, scale=scale)
    snapped = hard_assign(weight, centroids, spec, scale=scale)
    assert snapped.indices.dtype == torch.uint8 and snapped.indices.shape == weight.shape
    dense = decode(snapped.indices, snapped.lut, scale)
    groups = snapped.lut.shape[0]
    rows = weight.shape[0] // groups
    for g in range(groups):
        block = dense[g * rows : (g + 1) * rows]
        lut = snapped.lut[g]
        row_scale = scale[g * rows : (g + 1) * rows].unsqueeze(1) if with_scale else 1.0
        allowed = lut.view(1, 1, -1) * (row_scale.unsqueeze(-1) if with_scale else 1.0)  # fp32, as decoded
        assert bool((block.unsqueeze(-1) == allowed).any(-1).all()), "a value is not in its LUT"
        lut = lut.double()
        row_scale = row_scale.double() if with_scale else 1.0
        # brute force nearest in float64 on the clustered domain
        domain = weight[g * rows : (g + 1) * rows].double() / (row_scale if with_scale else 1.0)
        domain = domain.to(torch.bfloat16).double()
        nearest = (domain.unsqueeze(-1) - lut).abs().argmin(-1)
        assert torch.equal(snapped.indices[g * rows : (g + 1) * rows].long(), nearest)


def test_per_channel_scale_is_fp16_representable_half_range():
    weight = torch.tensor([[1.0, -3.0, 0.5], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    scale = per_channel_scale(weight)
    assert torch.equal(scale, torch.tensor([2.0, 2.0, 1.0]))
    odd = per_channel_scale(torch.tensor([[0.0, 0.1]]))
    assert torch.equal(odd, odd.to(torch.float16).float())


# ----------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
def test_packing_round_trips(bits, numel):
    indices = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(bits * numel))
    packed = pack_indices(indices, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(numel, bits) == math.ceil(numel * bits / 8)
    assert torch.equal(unpack_indices(packed, bits, numel), indices.to(torch.uint8))


@pytest.mark.parametrize("bits", [3, 6])
def test_packing_is_an_lsb_first_bit_stream(bits):
    indices = torch.randint(0, 2**bits, (13,), generator=torch.Generator().manual_seed(0))
    stream = [(int(i) >> b) & 1 for i in indices for b in range(bits)]  # LSB of each index first
    stream += [0] * ((-len(stream)) % 8)
    expected = [sum(stream[8 * j + b] << b for b in range(8)) for j in range(len(stream) // 8)]
    assert pack_indices(indices, bits).tolist() == expected


# -------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    weight = torch.randn(8, 8)
    for bits in (0, 9, 3.0, "3", True):
        with pytest.raises(ValueError, match="bits must be an integer from 1 to 8"):
            ClusteringSpec(bits=bits)
    with pytest.raises(ValueError, match="group_size=3 does not divide the 8 output channels of 'q_proj.weight'"):
        init_centroids(weight, ClusteringSpec(bits=2, group_size=3), name="q_proj.weight")
    with pytest.raises(ValueError, match="'w' is empty"):
        init_centroids(torch.empty(0, 4), ClusteringSpec(bits=2), name="w")
    bad = weight.clone()
    bad[0, 0] = float("nan")
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="'layers.3.up_proj.weight' contains 1 NaN and 1 infinite values"):
        edkm_cluster(bad, torch.zeros(1, 4), ClusteringSpec(bits=2), name="layers.3.up_proj.weight")
    with pytest.raises(TypeError, match="dtype torch.int8"):
        init_centroids(torch.ones(4, 4, dtype=torch.int8), ClusteringSpec(bits=2))
    with pytest.raises(ValueError, match=r"centroids of 'weight' have shape \(1, 3\), expected \(1, 4\)"):
        edkm_cluster(weight, torch.zeros(1, 3), ClusteringSpec(bits=2))
    with pytest.raises(ValueError, match=r"per-channel scale of 'weight' has shape \(4,\), expected \(8,\)"):
        dkm_reference(weight, torch.zeros(1, 4), ClusteringSpec(bits=2), scale=torch.ones(4))
    with pytest.raises(ValueError, match="must be finite and > 0"):
        edkm_cluster(weight, torch.zeros(1, 4), ClusteringSpec(bits=2), scale=-torch.ones(8))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ClusteringSpec(bits=2, temperature=0)
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        ClusteringSpec(bits=2, iterations=0)
    with pytest.raises(ValueError, match="unique_dtype"):
        ClusteringSpec(bits=2, unique_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 8\)"):
        pack_indices(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="truncated"):
        unpack_indices(torch.zeros(2, dtype=torch.uint8), 3, 8)
    with pytest.raises(TypeError, match="integer tensor"):
        pack_indices(torch.tensor([0.0, 1.0]), 3)


# ---------------------------------------------------------------------------------------------------------------
# inputs the engine cannot represent: raised, never computed silently


@pytest.mark.parametrize("entry", ["init_centroids", "hard_assign", *PATHS])
def test_a_finite_weight_that_overflows_the_16_bit_clustering_dtype_is_named(entry, monkeypatch):
    spec = ClusteringSpec(bits=3, unique_dtype=torch.float16)
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    centroids = init_centroids(weight, spec)
    weight[2, 3] = 1e6  # finite in fp32, beyond fp16's 65504
    with pytest.raises(ValueError, match=r"'layers.0.w'.*overflow torch.float16"):
        if entry == "init_centroids":
            init_centroids(weight, spec, name="layers.0.w")
        elif entry == "hard_assign":
            hard_assign(weight, centroids, spec, name="layers.0.w")
        else:
            use_path(monkeypatch, entry)
            edkm_cluster(weight, centroids, spec, name="layers.0.w")


@pytest.mark.parametrize("engine", ["reference", *PATHS])
@pytest.mark.parametrize("group_size", [None, 1])
def test_a_temperature_whose_softmax_overflows_is_refused_and_one_just_above_gives_finite_gradients(
    engine, group_size, monkeypatch
):
    if engine != "reference":
        use_path(monkeypatch, engine)
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    spec = ClusteringSpec(bits=3, group_size=group_size)
    centroids = init_centroids(weight.detach(), spec)
    run = (
        (lambda s: edkm_cluster(weight, centroids, s, name="w"))
        if engine != "reference"
        else (lambda s: dkm_reference(weight, centroids, s, name="w"))
    )
    with pytest.raises(ValueError, match="temperature 1e-40 is too small for 'w'"):
        run(dataclasses.replace(spec, temperature=1e-40))
    out = run(dataclasses.replace(spec, temperature=1e-30))
    (out.weight * torch.randn_like(out.weight)).sum().backward()
    assert torch.isfinite(out.weight).all() and torch.isfinite(weight.grad).all()


def test_a_0_dim_weight_is_called_a_scalar_not_empty():
    with pytest.raises(ValueError, match="0-dim tensor"):
        init_centroids(torch.tensor(0.5), ClusteringSpec(bits=2))
    with pytest.raises(ValueError, match="is empty"):
        init_centroids(torch.zeros(0, 4), ClusteringSpec(bits=2))
