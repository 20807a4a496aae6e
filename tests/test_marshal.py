"""Cross-device tensor marshaling: dedup of views and copies, bit-exact gradients, pass-through, nesting,
sharding across two gloo processes, and the same on CUDA where there is one."""

import contextlib
import datetime
import gc
import os
import socket
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optimum_edkm.clustering import ClusteringSpec, dkm_reference, edkm_cluster, init_centroids
from optimum_edkm.marshaling import MarshalCounters, MarshalPolicy, TensorMarshal, marshal

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (none on this machine)")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]


def force_copies(device: str) -> dict:
    """Policy fields that make every marshalled tensor really get copied: to the CPU from CUDA; on a
    CPU-only machine the target is the compute device, so the copy has to be asked for."""
    return {"copy_same_device": True} if device == "cpu" else {}


def clustering_case(device, dtype=torch.bfloat16, shape=(64, 48), group_size=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=generator) * 0.02).to(device=device, dtype=dtype)
    weight.requires_grad_(True)
    spec = ClusteringSpec(bits=3, group_size=group_size)
    centroids = init_centroids(weight.detach(), spec)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    upstream = upstream.to(device=device, dtype=dtype)
    return weight, centroids, spec, upstream


def weight_gradient(engine, weight, centroids, spec, upstream, context=None):
    weight.grad = None
    if context is None:
        out = engine(weight, centroids, spec)
    else:
        with context:
            out = engine(weight, centroids, spec)
    out.weight.backward(upstream)
    return out.weight.detach().clone(), weight.grad.clone()


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def deterministic_cuda():
    """eDKM's per-group sums use index_add, whose CUDA kernel adds with atomics in no fixed order unless
    deterministic algorithms are on (warn_only: bincount has no deterministic CUDA kernel, and needs none:
    its integer counts are exact)."""
    previous, previous_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def nbytes(tensor):
    return tensor.numel() * tensor.element_size()


# --------------------------------------------------------------------------------------------- policy
@pytest.mark.parametrize(
    "fields,error,words",
    [
        ({"device": "nonsense"}, ValueError, "device must name a torch device"),
        ({"device": 3}, TypeError, "device must be a str or torch.device"),
        ({"device": "meta"}, ValueError, "holds no data"),
        ({"min_bytes": -1}, ValueError, "min_bytes must be an integer >= 0"),
        ({"min_bytes": 1.5}, ValueError, "min_bytes"),
        ({"memory_threshold": 1.5}, ValueError, "fraction from 0 to 1"),
        ({"memory_threshold": True}, ValueError, "memory_threshold"),
        ({"max_view_hops": -1}, ValueError, "max_view_hops must be an integer from 0"),
        ({"max_view_hops": 1000}, ValueError, "max_view_hops"),
        ({"deduplicate": "yes"}, TypeError, "deduplicate must be True or False"),
        ({"pin_memory": "auto"}, TypeError, "pin_memory must be True, False or None"),
        ({"verify_replicated": True}, ValueError, "needs shard=True"),
    ],
)
def test_bad_policy_fields_raise_errors_naming_the_field_and_the_fix(fields, error, words):
    with pytest.raises(error, match=words):
        MarshalPolicy(**fields)


def test_unknown_fields_and_config_values_are_rejected_with_the_valid_names():
    with pytest.raises(TypeError, match="unknown MarshalPolicy field.*min_byte.*valid:.*min_bytes"):
        TensorMarshal(min_byte=10)
    with pytest.raises(TypeError, match="unknown MarshalPolicy field"):
        MarshalPolicy.from_config({"offload_to": "cpu"})
    with pytest.raises(TypeError, match="offload must be None, a bool, a device"):
        MarshalPolicy.from_config(3)
    with pytest.raises(TypeError, match="resident\\[1\\] must be a torch.Tensor"):
        TensorMarshal(resident=[torch.zeros(1), "weight"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_pinning_without_an_accelerator_is_refused_up_front():
    with pytest.raises(ValueError, match="pin_memory=True needs an accelerator"):
        MarshalPolicy(pin_memory=True)


def test_config_values_map_to_policies():
    assert MarshalPolicy.from_config(None) is None and MarshalPolicy.from_config(False) is None
    assert MarshalPolicy.from_config(True) == MarshalPolicy()
    assert MarshalPolicy.from_config("cpu").device == torch.device("cpu")
    policy = MarshalPolicy.from_config({"min_bytes": 0, "max_view_hops": 2})
    assert (policy.min_bytes, policy.max_view_hops) == (0, 2)
    assert MarshalPolicy.from_config(policy) is policy


# ----------------------------------------------------------------------------------------------- dedup
def save_views_and_copies_of_one_tensor(x, w):
    """Saves one softmax output six ways: itself, a transpose, a view and a reshape (views of its storage),
    a transposed contiguous copy (2 hops up the graph: Clone, Transpose) and a reshape that has to copy
    (3 hops: UnsafeView, Clone, Transpose)."""
    a = torch.softmax(x, -1)  # saves a
    b = torch.bmm(a.transpose(1, 2), w)  # saves a.transpose(1, 2) (and w, a leaf)
    c = a.view(-1).sin()  # saves a.view(-1)
    d = a.reshape(a.shape[0], -1).cos()  # saves a.reshape(...), a view
    e = a.transpose(1, 2).contiguous().sin()  # saves a transposed copy
    f = a.transpose(1, 2).reshape(-1).cos()  # saves a transposed, flattened copy
    return b.sum() + c.sum() + d.sum() + e.sum() + f.sum()


@pytest.mark.parametrize("device", DEVICES)
def test_views_transposes_and_reshapes_of_one_tensor_are_offloaded_once(device):
    x = torch.randn(4, 32, 16, device=device, requires_grad=True)
    w = torch.randn(4, 32, 8, device=device, requires_grad=True)
    a_bytes = 4 * 32 * 16 * 4

    def run(**fields):
        with TensorMarshal(min_bytes=a_bytes, **force_copies(device), **fields) as m:
            loss = save_views_and_copies_of_one_tensor(x, w)
        loss.backward()
        return m

    m = run()
    assert m.tensors_saved == 7
    assert m.copies == 1  # six saves of a's values, one copy
    assert m.copies_back == (1 if device == "cuda" else 0)  # and one transfer back for all six
    assert m.tensors_deduplicated == 5
    assert m.bytes_offloaded == a_bytes
    assert m.bytes_deduplicated == 5 * a_bytes
    assert m.bytes_resident == nbytes(w)  # the leaf is kept by reference, not copied

    naive = run(deduplicate=False)  # every save copied on its own
    assert naive.copies == 6 and naive.bytes_offloaded == 6 * a_bytes and naive.bytes_deduplicated == 0
    no_graph_walk = run(max_view_hops=0)  # storage dedup only: the two copies are copied again
    assert no_graph_walk.copies == 3 and no_graph_walk.tensors_deduplicated == 3
    too_short = run(max_view_hops=2)  # the reshape-copy is 3 hops away from `a`
    assert too_short.copies == 2 and too_short.tensors_deduplicated == 4


@pytest.mark.parametrize("device", DEVICES)
def test_dedup_and_graph_walk_give_bit_identical_gradients(device):
    x = torch.randn(4, 32, 16, device=device, requires_grad=True)
    w = torch.randn(4, 32, 8, device=device, requires_grad=True)

    def grads(context=None):
        x.grad = w.grad = None
        if context is None:
            loss = save_views_and_copies_of_one_tensor(x, w)
        else:
            with context:
                loss = save_views_and_copies_of_one_tensor(x, w)
        loss.backward()
        return x.grad.clone(), w.grad.clone()

    expected = grads()
    for fields in ({}, {"deduplicate": False}, {"max_view_hops": 0}, {"keep_leaves": False}):
        context = TensorMarshal(min_bytes=0, **force_copies(device), **fields)
        actual = grads(context)
        assert context.tensors_deduplicated > 0 or fields == {"deduplicate": False}
        for got, want in zip(actual, expected):
            assert got.device == want.device and torch.equal(got, want), fields


def test_on_cpu_the_offload_target_is_the_compute_device_so_nothing_is_copied_but_dedup_is_counted():
    x = torch.randn(4, 32, 16, requires_grad=True)
    w = torch.randn(4, 32, 8, requires_grad=True)
    with TensorMarshal(min_bytes=0) as m:
        loss = save_views_and_copies_of_one_tensor(x, w)
    loss.backward()
    assert m.copies == 0
    assert m.bytes_offloaded == 4 * 32 * 16 * 4  # a's storage, held by reference
    assert m.tensors_deduplicated == 5  # the copies are dropped and recomputed


def test_a_tensor_modified_in_place_between_two_saves_is_not_deduplicated_with_its_old_bytes():
    x = torch.randn(64, 64, requires_grad=True)
    w1 = torch.randn(64, 64, requires_grad=True)
    w2 = torch.randn(64, 64, requires_grad=True)
    with TensorMarshal(min_bytes=0, copy_same_device=True) as m:
        a = x.exp()  # saves a (version 0): copied
        y1 = a * w1  # saves a (version 0) again: deduplicated
        with torch.no_grad():
            a.add_(1.0)  # version 1: same storage, new values
        y2 = a * w2  # saves a again: must be copied again
    (grad_w2,) = torch.autograd.grad(y2.sum(), w2, retain_graph=True)
    (grad_w1,) = torch.autograd.grad(y1.sum(), w1)
    assert m.copies == 2 and m.tensors_deduplicated == 1
    assert torch.equal(grad_w2, x.detach().exp() + 1.0)
    assert torch.equal(grad_w1, x.detach().exp())  # the value saved at the time (a snapshot)


@pytest.mark.parametrize("copy", [False, True])
def test_a_copy_is_not_rebuilt_from_a_tensor_modified_in_place_around_it(copy):
    """An in-place change under no_grad leaves the autograd graph as it was, so the graph walk alone cannot
    tell whether a copy was taken before or after it: such bases are not used."""
    x = torch.randn(32, 64, requires_grad=True)
    with TensorMarshal(min_bytes=0, copy_same_device=copy) as before_save:
        a = x * 2  # saves nothing
        b = a.t().contiguous()  # a copy of a at version 0
        with torch.no_grad():
            a.add_(1)
        z = a.sin()  # saves a at version 1
        y = b.cos()  # saves b: a's bytes now hold other values
    assert torch.equal(y.grad_fn._saved_self, b) and before_save.tensors_deduplicated == 0
    with TensorMarshal(min_bytes=0, copy_same_device=copy) as after_save:
        a = x * 2
        z = a.sin()  # saves a at version 0
        with torch.no_grad():
            a.add_(1)
        b = a.t().contiguous()  # a copy of a at version 1
        y = b.cos()
    assert torch.equal(y.grad_fn._saved_self, b) and after_save.tensors_deduplicated == 0
    with TensorMarshal(min_bytes=0, copy_same_device=copy) as copy_of_a_copy:
        a = x * 2
        z = a.sin()  # saves a at version 0, never modified
        first = a.t().contiguous()
        with torch.no_grad():
            first.add_(1)  # the intermediate copy changes...
        b = first.clone()  # ...and b, at version 0, copies it
        y = b.cos()
    assert torch.equal(y.grad_fn._saved_self, b) and copy_of_a_copy.tensors_deduplicated == 0
    with TensorMarshal(min_bytes=0, copy_same_device=copy) as modified_copy:
        a = x * 2
        z = a.sin()
        b = a.t().contiguous()
        with torch.no_grad():
            b.mul_(3)  # the copy itself changes after it was taken
        y = b.cos()
    assert torch.equal(y.grad_fn._saved_self, b) and modified_copy.tensors_deduplicated == 0
    del z


def test_a_tensor_kept_by_reference_and_modified_in_place_fails_backward_like_autograd_does():
    x = torch.randn(8, 8, requires_grad=True)
    a = x.exp()  # exp saves its output
    with torch.no_grad():
        a.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        a.sum().backward()  # plain autograd refuses
    with TensorMarshal(min_bytes=1 << 20):  # small: kept by reference
        a = x.exp()
    with torch.no_grad():
        a.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        a.sum().backward()  # so does the marshal (hooks turn autograd's check off)


# --------------------------------------------------------------------------------- bit-exact clustering
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("engine", [dkm_reference, edkm_cluster], ids=["dkm_reference", "edkm_cluster"])
@pytest.mark.parametrize("dtype,group_size", [(torch.bfloat16, None), (torch.float32, 16)])
def test_clustering_gradients_are_bit_identical_with_and_without_marshaling(
    device, engine, dtype, group_size, deterministic_cuda
):
    weight, centroids, spec, upstream = clustering_case(device, dtype, group_size=group_size)
    out_plain, grad_plain = weight_gradient(engine, weight, centroids, spec, upstream)
    out_again, grad_again = weight_gradient(engine, weight, centroids, spec, upstream)
    assert torch.equal(out_again, out_plain) and torch.equal(grad_again, grad_plain), (
        "the engine itself is not deterministic here: bit-identity with marshaling cannot be tested"
    )
    policies = [
        {},
        {"min_bytes": 0},
        {"min_bytes": 0, "deduplicate": False},
        {"min_bytes": 0, "max_view_hops": 0},
        {"min_bytes": 0, "keep_leaves": False},
    ]
    for fields in policies:
        context = TensorMarshal(**{**force_copies(device), **fields})
        out, grad = weight_gradient(engine, weight, centroids, spec, upstream, context)
        assert torch.equal(out, out_plain) and torch.equal(grad, grad_plain), fields
        assert context.tensors_saved > 0
        if fields.get("min_bytes") == 0:
            assert context.copies > 0  # something really went through the copy path


@pytest.mark.parametrize("device", DEVICES)
def test_reference_dkm_saves_each_attention_map_once_and_keeps_the_weight_by_reference(device):
    weight, centroids, spec, upstream = clustering_case(device, shape=(128, 128))
    maps = weight.numel() * spec.num_clusters * weight.element_size()
    with TensorMarshal(**force_copies(device)) as m:
        out = dkm_reference(weight, centroids, spec)
    out.weight.backward(upstream)
    # per iteration: the difference map and the attention map; the transposed attention (for the
    # centroid update) and the final product's attention reuse the attention map's bytes
    assert m.bytes_offloaded == 2 * spec.iterations * maps
    assert m.bytes_deduplicated == (spec.iterations + 1) * maps
    assert m.copies == 2 * spec.iterations
    assert m.bytes_resident == nbytes(weight)
    assert m.bytes_on_device < 1024  # only centroid-sized tensors and masks


def test_edkm_saves_only_the_resident_weight_and_tiny_centroids():
    weight, centroids, spec, upstream = clustering_case("cpu", shape=(256, 256))
    with TensorMarshal() as m:
        out = edkm_cluster(weight, centroids, spec)
    out.weight.backward(upstream)
    assert m.bytes_resident == nbytes(weight)
    assert m.bytes_offloaded == 0 and m.copies == 0
    # nothing per weight: the starting centroids and, with the compiled kernel, each iteration's centroids and
    # masses (float64 at most), O(iterations x groups x k)
    per_centroids = centroids.numel() * 8
    assert nbytes(centroids.float()) <= m.bytes_on_device <= (2 * spec.iterations + 1) * per_centroids


def test_double_backward_through_marshalled_tensors_is_exact():
    x = torch.randn(32, 64, dtype=torch.float64, requires_grad=True)

    def second_derivative(context=None):
        def f():
            a = torch.softmax(x, -1)
            return (a.t().contiguous() ** 3).sum()

        if context is None:
            y = f()
        else:
            with context:
                y = f()
        (g,) = torch.autograd.grad(y, x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sin().sum(), x)
        return g.detach(), gg

    plain = second_derivative()
    context = TensorMarshal(min_bytes=0, copy_same_device=True)
    marshalled = second_derivative(context)
    assert context.copies > 0 and context.tensors_deduplicated > 0
    assert all(torch.equal(a, b) for a, b in zip(plain, marshalled))


def test_offloaded_bytes_live_as_long_as_the_graph_not_as_long_as_the_context(monkeypatch):
    copied = []
    original = TensorMarshal._copy
    monkeypatch.setattr(TensorMarshal, "_copy", lambda self, *args: copied.append(original(self, *args)) or copied[-1])
    weight, centroids, spec, upstream = clustering_case("cpu", shape=(128, 128))
    m = TensorMarshal(copy_same_device=True)
    with m:
        out = dkm_reference(weight, centroids, spec)
    alive = [weakref.ref(span) for span in copied]
    copied.clear()
    assert len(alive) == m.copies > 0 and all(ref() is not None for ref in alive)
    out.weight.backward(upstream)  # frees the graph's saved tensors
    gc.collect()
    assert all(ref() is None for ref in alive)  # though `m` is still here


# --------------------------------------------------------------------------------------- pass-through
@pytest.mark.parametrize("device", DEVICES)
def test_non_float_small_and_leaf_tensors_pass_through_untouched(device):
    x = torch.randn(64, 64, device=device, requires_grad=True)
    index = torch.randint(0, 64, (64, 8), device=device)
    small = torch.randn(4, device=device).exp().requires_grad_(True)  # a leaf
    with TensorMarshal(min_bytes=64 * 64 * 4, **force_copies(device)) as m:
        gathered = torch.gather(x.exp(), 1, index)  # saves the int64 index and exp's output (large)
        tiny = torch.ones(4, device=device, requires_grad=True) * 2
        product = tiny * small  # saves `small` (a leaf) and `tiny` (small)
    assert gathered.grad_fn._saved_index is index  # the non-float tensor: the very same object
    assert product.grad_fn._saved_other.data_ptr() == small.data_ptr()  # the leaf: kept by reference
    assert product.grad_fn._saved_self.data_ptr() == tiny.data_ptr()  # small: not copied
    assert m.copies == 1  # only exp's output
    assert m.bytes_on_device == nbytes(index) + nbytes(tiny)
    assert m.bytes_resident == nbytes(small)
    (gathered.sum() + product.sum()).backward()
    expected = torch.zeros(64, 64, device=device).scatter_add_(1, index, torch.ones(64, 8, device=device))
    assert torch.equal(x.grad, expected * x.detach().exp())


def test_explicitly_resident_tensors_are_not_copied():
    weight = torch.randn(128, 128)
    x = torch.randn(128, 128, requires_grad=True)
    with TensorMarshal(min_bytes=0, copy_same_device=True, resident=[weight]) as m:
        y = x * weight.t()  # saves a view of the resident weight
    y.sum().backward()
    assert m.copies == 0 and m.bytes_resident == nbytes(weight)
    assert torch.equal(x.grad, weight.t())


# ---------------------------------------------------------------------------------- nesting, cleanup
def hooks_installed() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        pytest.skip("this torch has no way to read the saved-tensor hook stack")
    return top(False) is not None


def test_contexts_nest_and_the_innermost_one_handles_what_is_saved_inside_it():
    x = torch.randn(64, 64, requires_grad=True)

    def loss(outer=contextlib.nullcontext(), inner=contextlib.nullcontext()):
        with outer:
            a = x.exp()  # outer: 1 saved
            with inner:
                b = x.sin()  # inner: saves x (a leaf)
                c = b.exp()  # inner: saves c, copied
            d = c.tanh()  # outer again
        return a.sum() + d.sum()

    loss().backward()
    expected, x.grad = x.grad, None
    outer, inner = TensorMarshal(min_bytes=0), TensorMarshal(min_bytes=0, copy_same_device=True)
    loss(outer, inner).backward()
    assert (outer.tensors_saved, inner.tensors_saved) == (2, 2)
    assert inner.copies == 1 and outer.copies == 0
    assert not hooks_installed()
    assert torch.equal(x.grad, expected)


def test_the_same_context_can_be_re_entered_and_counters_accumulate_until_reset():
    x = torch.randn(64, 64, requires_grad=True)
    m = marshal(min_bytes=0)
    with m:
        with m:
            x.exp()
        x.exp()
    assert m.tensors_saved == 2 and not hooks_installed()
    assert m.as_dict()["marshal/tensors_saved"] == 2
    assert set(m.as_dict(prefix="")) == set(MarshalCounters().as_dict())
    m.reset()
    assert m.counters == MarshalCounters()


def test_hooks_are_removed_when_the_code_inside_raises():
    x = torch.randn(64, 64, requires_grad=True)
    outer, inner = TensorMarshal(), TensorMarshal()
    with pytest.raises(ZeroDivisionError):
        with outer:
            with inner:
                x.exp()
                raise ZeroDivisionError("boom")
    assert not hooks_installed()
    saved = (outer.tensors_saved, inner.tensors_saved)
    x.exp().sum().backward()  # runs with no marshal at all
    assert (outer.tensors_saved, inner.tensors_saved) == saved == (0, 1)
    with outer:  # and both can be used again
        x.exp()
    assert outer.tensors_saved == 1


def test_exiting_out_of_order_is_refused():
    first, second = TensorMarshal(), TensorMarshal()
    first.__enter__()
    second.__enter__()
    with pytest.raises(RuntimeError, match="reverse order"):
        first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    first.__exit__(None, None, None)
    assert not hooks_installed()


def test_shard_without_a_process_group_is_a_no_op():
    assert not (dist.is_available() and dist.is_initialized())
    weight, centroids, spec, upstream = clustering_case("cpu")
    _, plain = weight_gradient(dkm_reference, weight, centroids, spec, upstream)
    context = TensorMarshal(shard=True, min_bytes=0)
    _, sharded = weight_gradient(dkm_reference, weight, centroids, spec, upstream, context)
    assert not context.sharding and context.world_size == 1
    assert context.bytes_on_other_ranks == 0 and context.all_gathers == 0
    assert torch.equal(plain, sharded)


# ----------------------------------------------------------------------------------------- CUDA only
@pytest.mark.gpu
@needs_cuda
def test_cuda_offload_frees_device_memory_and_restores_on_the_device():
    weight, centroids, spec, upstream = clustering_case("cuda", shape=(512, 512))
    maps = weight.numel() * spec.num_clusters * weight.element_size()

    def allocated_by_forward(context):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with context:
            out = dkm_reference(weight, centroids, spec)
        torch.cuda.synchronize()
        return out, torch.cuda.memory_allocated() - before

    plain_out, plain_bytes = allocated_by_forward(contextlib.nullcontext())
    plain_out.weight.backward(upstream)
    plain_grad, weight.grad = weight.grad, None
    del plain_out
    m = TensorMarshal()
    out, marshalled_bytes = allocated_by_forward(m)
    assert plain_bytes >= 2 * spec.iterations * maps  # the six maps stay on the GPU without it
    assert marshalled_bytes <= plain_bytes - 2 * spec.iterations * maps + 4096  # and leave it with it
    assert m.bytes_offloaded == 2 * spec.iterations * maps and m.bytes_on_device < 1024
    out.weight.backward(upstream)
    assert weight.grad.device.type == "cuda" and torch.equal(weight.grad, plain_grad)
    assert m.copies_back == m.copies  # each offloaded map comes back once, not once per view


@pytest.mark.gpu
@needs_cuda
def test_cuda_memory_threshold_keeps_tensors_on_the_device_until_it_is_reached():
    weight, centroids, spec, upstream = clustering_case("cuda", shape=(256, 256))
    _, plain = weight_gradient(dkm_reference, weight, centroids, spec, upstream)
    never = TensorMarshal(memory_threshold=1.0)  # 100% in use: not reached
    _, grad = weight_gradient(dkm_reference, weight, centroids, spec, upstream, never)
    assert never.copies == 0 and never.bytes_offloaded == 0 and never.bytes_on_device > 0
    assert torch.equal(grad, plain)
    always = TensorMarshal(memory_threshold=0.0)
    _, grad = weight_gradient(dkm_reference, weight, centroids, spec, upstream, always)
    assert always.copies > 0 and always.bytes_offloaded > 0 and always.bytes_on_device < 1024
    assert torch.equal(grad, plain)


@pytest.mark.gpu
@needs_cuda
def test_cuda_offloads_into_pinned_host_memory_and_unpacks_on_the_gpu(monkeypatch):
    copied = []
    original = TensorMarshal._copy

    def spy(self, *args):
        copied.append(original(self, *args))
        return copied[-1]

    monkeypatch.setattr(TensorMarshal, "_copy", spy)
    x = torch.randn(256, 256, device="cuda", requires_grad=True)
    with TensorMarshal(min_bytes=0) as m:
        y = x.exp()
    assert m.copies == 1 and len(copied) == 1
    assert copied[0].data.device.type == "cpu" and copied[0].data.is_pinned()
    restored = y.grad_fn._saved_result
    assert restored.device == y.device and restored.stride() == y.stride() and torch.equal(restored, y)
    unpinned = TensorMarshal(min_bytes=0, pin_memory=False)
    with unpinned:
        x.exp()
    assert not copied[-1].data.is_pinned()


# --------------------------------------------------------------------------------- 2-process sharding
def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def sharded_clustering(rank, world, port, device, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name, engine in (("dkm", dkm_reference), ("edkm", edkm_cluster)):
            weight, centroids, spec, upstream = clustering_case(device, shape=(96, 64))
            context = TensorMarshal(shard=True, verify_replicated=True)
            _, grad = weight_gradient(engine, weight, centroids, spec, upstream, context)
            results[name] = (grad.cpu(), context.counters.as_dict(), context.sharding)
        # a tensor that differs between ranks (an activation) must be refused, not silently mixed
        x = torch.full((128, 128), float(rank), device=device, requires_grad=True) * 1.0
        try:
            with TensorMarshal(shard=True, verify_replicated=True):
                x.exp()
            results["refused"] = False
        except RuntimeError as error:
            results["refused"] = "differs between ranks" in str(error)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device", DEVICES)
def test_sharding_over_two_gloo_processes_halves_kept_bytes_with_bit_identical_gradients(device, tmp_path):
    expected = {}
    for name, engine in (("dkm", dkm_reference), ("edkm", edkm_cluster)):
        weight, centroids, spec, upstream = clustering_case(device, shape=(96, 64))
        context = TensorMarshal()
        _, grad = weight_gradient(engine, weight, centroids, spec, upstream, context)
        expected[name] = (grad.cpu(), context.counters.as_dict())
    mp.spawn(sharded_clustering, args=(2, free_port(), device, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert results["refused"]
        for name in ("dkm", "edkm"):
            grad, counters, sharding = results[name]
            single_grad, single = expected[name]
            assert sharding
            assert torch.equal(grad, single_grad), (rank, name)
            kept = counters["bytes_on_device"] + counters["bytes_offloaded"]
            single_kept = single["bytes_on_device"] + single["bytes_offloaded"]
            if name == "dkm":
                # one all-gather per sharded copy, however many saved tensors (views, copies) read it
                assert counters["all_gathers"] == counters["copies"] > 0
                assert abs(kept / single_kept - 0.5) < 0.05, (kept, single_kept)
                assert counters["bytes_on_other_ranks"] == pytest.approx(single_kept / 2, rel=0.1)
            else:  # eDKM saves nothing large: nothing to shard
                assert kept == single_kept and counters["all_gathers"] == 0
