"""The fused LUT linear kernel against independent references: a float64 recomputation of
``x @ decode(indices, lut, scale)^T + bias`` and the pure-torch ``unpack_indices`` + ``decode`` path.

The first test in a fresh machine builds the C++ extension (20-60 s, once; cached afterwards).
"""

import importlib.util
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from optimum_edkm.clustering import decode, pack_indices
from optimum_edkm.kernels import (
    kernel_available,
    linear16,
    lut_decode,
    lut_linear,
    reference_linear16,
    reference_lut_linear,
    set_kernel_isa,
    supported_isas,
)
from optimum_edkm.kernels import lut as lut_module
from optimum_edkm.nn import PaletteFormat, PalettizedLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORCE_FUSED, FORCE_GEMM = 1 << 30, 1


def isas():
    """Every loop variant this CPU runs: each instruction set, and with AVX-512 also its 16-lane loops for one row of
    x (by default one row of a <= 3-bit LUT or 16-bit weight runs the 8-lane loops there)."""
    names = supported_isas() if kernel_available() else []
    return names + ["avx512-wide"] * ("avx512" in names)


def use_isa(name):
    """Run the kernels on loop variant ``name`` (of :func:`isas`); returns the function that restores the default."""
    isa, _, wide = name.partition("-")
    set_kernel_isa(isa)
    previous = lut_module._state["extension"].set_narrow_one_row(not wide)

    def restore():
        lut_module._state["extension"].set_narrow_one_row(previous)
        set_kernel_isa("best")

    return restore


needs_kernel = pytest.mark.skipif("not kernel_available()", reason="the C++ LUT kernel could not be built here")


@pytest.fixture
def isa(request):
    restore = use_isa(request.param)
    yield request.param
    restore()


def make_palette(out_f, in_f, bits, groups=1, scale=True, bias=False, lut_dtype=torch.float16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 2**bits, (out_f, in_f), dtype=torch.uint8, generator=generator)
    lut = torch.randn(groups, 2**bits, generator=generator).to(lut_dtype)
    row_scale = (torch.rand(out_f, generator=generator) + 0.5).to(lut_dtype) if scale else None
    row_bias = torch.randn(out_f, generator=generator) if bias else None
    return indices, pack_indices(indices, bits), lut, row_scale, row_bias


def check_against_float64(y, x, indices, lut, scale, bias):
    """|y - exact| <= tol * (|x| @ |W|^T + |bias|): fp32 accumulation for float32 inputs; for 16-bit inputs the
    output (and, on the GEMM path, the weight) is rounded to the input's precision."""
    weight = decode(indices, lut, scale, dtype=torch.float64)
    exact = x.double() @ weight.t()
    magnitude = x.double().abs() @ weight.abs().t()
    if bias is not None:
        exact = exact + bias.to(x.dtype).double()
        magnitude = magnitude + bias.double().abs()
    tol = 2e-6 * x.shape[-1] ** 0.5 if x.dtype == torch.float32 else 2 * torch.finfo(x.dtype).eps
    assert y.dtype == x.dtype and y.shape == exact.shape
    error = (y.double() - exact).abs()
    assert bool((error <= tol * magnitude + 1e-30).all()), f"max error {float((error / magnitude).max()):.3g}"


def call_op(x, packed, lut, scale, bias, in_f, out_f, bits, gemm_min_rows, tile_bytes=8 << 20):
    return torch.ops.optimum_edkm.lut_linear(x, packed, lut, scale, bias, in_f, out_f, bits, gemm_min_rows, tile_bytes)


# ------------------------------------------------------------------------------------------------ kernel
@needs_kernel
@pytest.mark.parametrize("isa", isas(), indirect=True)
@pytest.mark.parametrize("bits", range(1, 9))
def test_fused_kernel_matches_float64_for_every_bit_width(isa, bits):
    # in_features: a multiple of 16, of 8 only, and neither (tails of the AVX-512 / AVX2 / scalar loops)
    # groups: one LUT, one per 4 rows, one per row (the main job's layout); LUTs in fp16, fp32 and bf16
    for in_f, groups, scale, bias, rows in itertools.product(
        [48, 40, 24 + 4 * (bits % 2 == 0)], [1, 3, 12], [False, True], [False, True], [1, 3, 17]
    ):
        if (in_f * bits) % 8:
            continue
        lut_dtype = (torch.float16, torch.float32, torch.bfloat16)[(in_f + groups + rows) % 3]
        indices, packed, lut, row_scale, row_bias = make_palette(12, in_f, bits, groups, scale, bias, lut_dtype)
        x = torch.randn(rows, in_f)
        y = call_op(x, packed, lut, row_scale, row_bias, in_f, 12, bits, FORCE_FUSED)
        check_against_float64(y, x, indices, lut, row_scale, row_bias)


@needs_kernel
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_scalar_table_kernel_matches_float64(bits):
    """The portable path for one row of x (tables of partial dot products over groups of indices): used when the
    layer has enough rows to pay for the tables, i.e. 512 rows here."""
    set_kernel_isa("scalar")
    try:
        for in_f, groups, scale, bias in itertools.product([48, 44], [1, 2], [False, True], [False, True]):
            if (in_f * bits) % 8:
                continue
            indices, packed, lut, row_scale, row_bias = make_palette(512, in_f, bits, groups, scale, bias)
            x = torch.randn(1, in_f)
            y = call_op(x, packed, lut, row_scale, row_bias, in_f, 512, bits, 0)
            check_against_float64(y, x, indices, lut, row_scale, row_bias)
    finally:
        set_kernel_isa("best")


@needs_kernel
@pytest.mark.parametrize("isa", isas(), indirect=True)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_gemm_path_matches_float64_and_tiles(isa, bits):
    indices, packed, lut, row_scale, row_bias = make_palette(40, 40, bits, groups=4, bias=True)
    x = torch.randn(600, 40)
    for tile_bytes in (8 << 20, 7 * 40 * 4):  # whole weight, or tiles of 7 rows (the last one shorter)
        for bias in (row_bias, None):
            y = call_op(x, packed, lut, row_scale, bias, 40, 40, bits, FORCE_GEMM, tile_bytes)
            check_against_float64(y, x, indices, lut, row_scale, bias)


@needs_kernel
@pytest.mark.parametrize("isa", isas(), indirect=True)
def test_decode_is_bit_identical_to_the_reference(isa):
    for bits, groups, scale, lut_dtype in itertools.product(
        range(1, 9), [1, 2], [False, True], [torch.float16, torch.float32, torch.bfloat16]
    ):
        indices, packed, lut, row_scale, _ = make_palette(8, 56, bits, groups, scale, lut_dtype=lut_dtype)
        expected = decode(indices, lut, row_scale, dtype=torch.float32)
        assert torch.equal(lut_decode(packed, lut, row_scale, 56, 8, bits), expected)
        assert torch.equal(lut_decode(packed, lut, row_scale, 56, 8, bits, torch.bfloat16), expected.to(torch.bfloat16))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 17, 600])
def test_lut_linear_input_dtypes_shapes_and_strides(dtype, rows):
    indices, packed, lut, row_scale, row_bias = make_palette(24, 64, 3, groups=2, bias=True)
    wide = torch.randn(2, rows, 128).to(dtype)
    x = wide[..., ::2]  # non-contiguous, 3-D
    assert not x.is_contiguous()
    y = lut_linear(x, packed, lut, row_scale, row_bias.to(dtype), 64, 24, 3, group_size=12)
    assert y.shape == (2, rows, 24)
    check_against_float64(y.reshape(-1, 24), x.reshape(-1, 64), indices, lut, row_scale, row_bias.to(dtype))
    reference = reference_lut_linear(x, packed, lut, row_scale, row_bias.to(dtype), 64, 24, 3)
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(y, reference, rtol=tol, atol=tol * float(reference.abs().max()))


@needs_kernel
@pytest.mark.parametrize("isa", isas(), indirect=True)
def test_two_threads_share_output_rows(isa):
    """Rows handed out in chunks to two threads: fused path (one and two rows of x; one row on the portable path
    uses the shared partial-sum tables) and the decode + GEMM path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for bits, groups, rows, gemm_min_rows in [
            (3, 1, 1, 0),
            (3, 2, 1, 0),
            (3, 1024, 1, 0),  # one LUT per row
            (3, 1024, 8, FORCE_FUSED),
            (4, 1, 2, FORCE_FUSED),
            (2, 4, 5, FORCE_GEMM),
        ]:
            indices, packed, lut, row_scale, row_bias = make_palette(1024, 576, bits, groups, bias=True)
            x = torch.randn(rows, 576)
            y = call_op(x, packed, lut, row_scale, row_bias, 576, 1024, bits, gemm_min_rows)
            check_against_float64(y, x, indices, lut, row_scale, row_bias)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_tied_lm_head_shape_at_4_bits():
    """The 49152 x 576 4-bit lm_head of SmolLM2, as one token's logits and as a prefill (tiled GEMM path)."""
    indices, packed, lut, row_scale, _ = make_palette(49152, 576, 4)
    x = torch.randn(1, 576)
    check_against_float64(lut_linear(x, packed, lut, row_scale, None, 576, 49152, 4), x, indices, lut, row_scale, None)
    x = torch.randn(70, 576)
    y = lut_linear(x, packed, lut, row_scale, None, 576, 49152, 4)  # 70 rows: tiles of 8 MiB + GEMM
    exact = x.double() @ decode(indices, lut, row_scale, dtype=torch.float64).t()
    assert float((y.double() - exact).abs().max()) <= 1e-4 * float(exact.abs().max())


@needs_kernel
@pytest.mark.parametrize("isa", isas(), indirect=True)
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16])
def test_linear16_matches_float64(isa, weight_dtype):
    """Fused GEMV on 16-bit weights (1-17 rows of x, in_features a multiple of 16, of 8 only, and neither) and the
    tiled GEMM path (600 rows, whole weight or tiles of 7 rows), against float64 on the 16-bit values."""
    generator = torch.Generator().manual_seed(0)
    cases = list(itertools.product([48, 40, 37], [1, 3, 8, 17], [False, True], [0], [8 << 20]))
    cases += [(40, 600, True, 1, 8 << 20), (40, 600, False, 1, 7 * 40 * 4)]
    for in_f, rows, bias, gemm_min_rows, tile_bytes in cases:
        weight = torch.randn(21, in_f, generator=generator).to(weight_dtype)
        row_bias = torch.randn(21, generator=generator).to(weight_dtype) if bias else None
        x = torch.randn(rows, in_f, generator=generator)
        y = torch.ops.optimum_edkm.linear16(x, weight, row_bias, gemm_min_rows, tile_bytes)
        exact = x.double() @ weight.double().t() + (0 if row_bias is None else row_bias.double())
        magnitude = x.double().abs() @ weight.double().abs().t() + (0 if row_bias is None else row_bias.double().abs())
        assert y.dtype == x.dtype and y.shape == exact.shape
        assert bool(((y.double() - exact).abs() <= 2e-6 * in_f**0.5 * magnitude + 1e-30).all())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear16_input_dtypes_and_the_reference_path(dtype):
    weight, bias = torch.randn(24, 64).half(), torch.randn(24).half()
    x = torch.randn(2, 5, 64).to(dtype)
    y = linear16(x, weight, bias)
    reference = reference_linear16(x, weight, bias)
    assert y.dtype == dtype and y.shape == (2, 5, 24)
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(y, reference, rtol=tol, atol=tol * float(reference.abs().max()))
    # float64 inputs and gradients take the pure-torch path
    assert torch.equal(linear16(x.double(), weight, bias), reference_linear16(x.double(), weight, bias))
    leaf = x.float().requires_grad_(True)
    linear16(leaf, weight, bias).sum().backward()
    torch.testing.assert_close(leaf.grad, weight.float().sum(0).expand_as(leaf))


@needs_kernel
def test_linear16_bad_inputs_name_the_problem():
    with pytest.raises(RuntimeError, match="float16/bfloat16"):
        torch.ops.optimum_edkm.linear16(torch.randn(1, 8), torch.randn(4, 8), None, 0, 8 << 20)
    with pytest.raises(RuntimeError, match="last dimension must be in_features=8"):
        torch.ops.optimum_edkm.linear16(torch.randn(1, 9), torch.randn(4, 8).half(), None, 0, 8 << 20)
    with pytest.raises(RuntimeError, match=r"bias must be a contiguous float \[4\]"):
        torch.ops.optimum_edkm.linear16(torch.randn(1, 8), torch.randn(4, 8).half(), torch.randn(5), 0, 8 << 20)


def test_rows_not_byte_aligned_fall_back_to_the_reference():
    indices, packed, lut, row_scale, row_bias = make_palette(6, 13, 3, bias=True)  # 39 bits per row
    x = torch.randn(5, 13)
    y = lut_linear(x, packed, lut, row_scale, row_bias, 13, 6, 3)
    assert torch.equal(y, reference_lut_linear(x, packed, lut, row_scale, row_bias, 13, 6, 3))
    check_against_float64(y, x, indices, lut, row_scale, row_bias)


def test_float64_inputs_fall_back_to_the_reference():
    indices, packed, lut, row_scale, row_bias = make_palette(8, 16, 3, bias=True)
    x = torch.randn(3, 16, dtype=torch.float64)
    y = lut_linear(x, packed, lut, row_scale, row_bias.double(), 16, 8, 3)
    assert torch.equal(y, reference_lut_linear(x, packed, lut, row_scale, row_bias.double(), 16, 8, 3))


@needs_kernel
def test_gradients_for_input_and_bias_match_the_reference():
    _, packed, lut, row_scale, row_bias = make_palette(24, 40, 3, bias=True)
    results = []
    for function in (lut_linear, reference_lut_linear):
        x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1), requires_grad=True)
        bias = row_bias.clone().requires_grad_(True)
        function(x, packed, lut, row_scale, bias, 40, 24, 3).pow(2).sum().backward()
        results.append((x.grad, bias.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


@needs_kernel
def test_bad_inputs_name_the_problem():
    _, packed, lut, row_scale, _ = make_palette(8, 16, 3)
    x = torch.randn(1, 16)
    with pytest.raises(RuntimeError, match="packed bytes"):
        call_op(x, packed[:-1], lut, row_scale, None, 16, 8, 3, 0)
    with pytest.raises(RuntimeError, match="last dimension must be in_features=16"):
        call_op(torch.randn(1, 15), packed, lut, row_scale, None, 16, 8, 3, 0)
    with pytest.raises(RuntimeError, match=r"\[groups, 8\]"):
        call_op(x, packed, lut[:, :4], row_scale, None, 16, 8, 3, 0)
    with pytest.raises(RuntimeError, match="cannot describe 8 output rows"):
        call_op(x, packed, torch.randn(3, 8), row_scale, None, 16, 8, 3, 0)
    with pytest.raises(ValueError, match="group_size"):
        lut_linear(x, packed, lut, row_scale, None, 16, 8, 3, group_size=3)


def test_disabled_kernels_use_the_reference_path():
    script = textwrap.dedent("""
        import warnings
        warnings.simplefilter("error")           # disabling must not warn
        import torch
        from optimum_edkm.clustering import pack_indices
        from optimum_edkm.kernels import kernel_available, lut_linear, reference_lut_linear
        assert not kernel_available()
        packed = pack_indices(torch.randint(0, 8, (24, 64), dtype=torch.uint8), 3)
        lut, x = torch.randn(1, 8).half(), torch.randn(2, 64)
        assert torch.equal(lut_linear(x, packed, lut, None, None, 64, 24, 3),
                           reference_lut_linear(x, packed, lut, None, None, 64, 24, 3))
        print("reference path")
    """)
    env = dict(os.environ, OPTIMUM_EDKM_DISABLE_KERNELS="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reference path" in done.stdout


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Triton is not installed here (pip install triton==3.9.0 runs next to torch 2.13 CPU, ~1 GB); the "
    "CUDA path's kernel is then tested through its interpreter",
)
def test_triton_kernel_matches_float64_in_the_interpreter():
    """The CUDA kernel (optimum_edkm/kernels/triton_lut.py) run by Triton's interpreter on CPU tensors: every bit
    width, one LUT and one per row, scale and bias or neither, float32 and bfloat16 x, K and N not multiples of
    the tiles."""
    script = textwrap.dedent("""
        import itertools, torch
        from optimum_edkm.clustering import decode, pack_indices
        from optimum_edkm.kernels.triton_lut import triton_lut_linear
        for bits, groups, extras, dtype in itertools.product(
            range(1, 9), [1, 20], [False, True], [torch.float32, torch.bfloat16]
        ):
            g = torch.Generator().manual_seed(bits)
            idx = torch.randint(0, 2**bits, (20, 40), dtype=torch.uint8, generator=g)
            lut = torch.randn(groups, 2**bits, generator=g).half()
            scale = (torch.rand(20, generator=g) + 0.5).half() if extras else None
            bias = torch.randn(20, generator=g) if extras else None
            x = torch.randn(3, 40, generator=g).to(dtype)
            y = triton_lut_linear(x, pack_indices(idx, bits), lut, scale, bias, 40, 20, bits, block_n=16, block_k=16)
            exact = x.double() @ decode(idx, lut, scale, dtype=torch.float64).t()
            exact = exact + (0 if bias is None else bias.double())
            tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps  # y rounded to x's dtype
            assert y.dtype == dtype and y.shape == (3, 20)
            assert float((y.double() - exact).abs().max()) <= tol * float(exact.abs().max()), (bits, groups, dtype)
        print("TRITON OK")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert "TRITON OK" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none in this environment)")
def test_cuda_uses_decode_and_matmul():
    indices, packed, lut, row_scale, row_bias = make_palette(24, 64, 3, bias=True)
    x = torch.randn(5, 64)
    y = lut_linear(x.cuda(), packed.cuda(), lut.cuda(), row_scale.cuda(), row_bias.cuda(), 64, 24, 3)
    check_against_float64(y.cpu(), x, indices, lut, row_scale, row_bias)


# ------------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def palettized_llama():
    from conftest import tiny_llama_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(tie=True)).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            bits = 3 if "mlp" in name else 4
            layer = PalettizedLinear(
                module.in_features, module.out_features, False, PaletteFormat(bits=bits, per_channel_scale=True)
            )
            indices, packed, lut, row_scale, _ = make_palette(
                module.out_features, module.in_features, bits, seed=len(name)
            )
            layer.weight.copy_(packed)
            layer.weight_lut.copy_(lut * 0.05)
            layer.weight_scale.copy_(row_scale)
            model.set_submodule(name, layer)
    return model


@needs_kernel
def test_palettized_llama_logits_equal_with_and_without_kernel(palettized_llama, input_ids, monkeypatch):
    calls = []
    fused = lut_module._state["direct"]["linear"]
    monkeypatch.setitem(lut_module._state["direct"], "linear", lambda *args: calls.append(args[7]) or fused(*args))
    with torch.no_grad():
        fused = palettized_llama(input_ids).logits
        assert sorted(set(calls)) == [3, 4] and len(calls) == 14  # every palettized projection, both widths
        monkeypatch.setattr(lut_module, "kernel_available", lambda: False)
        reference = palettized_llama(input_ids).logits
    assert len(calls) == 14
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_matches_eager(palettized_llama, input_ids, backend):
    from torch._dynamo.backends.registry import lookup_backend

    graph_ops = []

    def recording_backend(graph_module, example_inputs):
        graph_ops.extend(str(node.target) for node in graph_module.graph.nodes)
        return lookup_backend(backend)(graph_module, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        eager = palettized_llama(input_ids).logits
        compiled = torch.compile(palettized_llama, backend=recording_backend, fullgraph=True)
        torch.testing.assert_close(compiled(input_ids).logits, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    assert graph_ops.count("optimum_edkm.lut_linear.default") == 14  # one opaque node per palettized linear


@needs_kernel
def test_generate_compiles_a_palettized_model_with_a_static_cache(tiny_llama_dir):
    """is_compileable: transformers compiles the decoding step (fullgraph) and generates the eager tokens."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM, CompileConfig

    import optimum_edkm
    from optimum_edkm import EDKMConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    optimum_edkm.prepare(model, EDKMConfig(bits=3, enable_per_channel_scale=True))
    assert not model.hf_quantizer.is_compileable  # train-time modules: not claimed
    optimum_edkm.palettize(model)
    assert model.hf_quantizer.is_compileable
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    eager = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    config = CompileConfig(backend="aot_eager", fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on CPU only when asked
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(
        ids, max_new_tokens=6, do_sample=False, cache_implementation="static", compile_config=config
    )
    assert counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()
    assert torch.equal(compiled, eager)


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_is_kept(tmp_path):
    """torch waits forever on a lock file a killed build left behind; the loader clears only a stale one."""
    import time

    from optimum_edkm import extensions

    lock = tmp_path / "lock"
    lock.write_text("")
    assert not extensions._remove_stale_lock(str(tmp_path)) and lock.exists()  # a build may be running
    old = time.time() - extensions.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="interrupted build"):
        assert extensions._remove_stale_lock(str(tmp_path))
    assert not lock.exists()
    assert not extensions._remove_stale_lock(str(tmp_path))  # nothing left to remove


def test_two_checkouts_get_their_own_build_folder(tmp_path):
    from optimum_edkm import extensions

    source = os.path.join(extensions.CSRC, "lut_linear.cpp")
    copy = tmp_path / "lut_linear.cpp"
    copy.write_bytes(open(source, "rb").read())
    assert extensions._source_digest([source]) != extensions._source_digest([str(copy)])


def palettized_tiny_llama(embedding_bits=None, seed=0):
    """A tiny tied Llama in the main job's layout (3-bit linears, one LUT per output row, no scale) with random
    palettes, its float parts in 16 bits (``EDKMConfig.float_dtype`` default); ``embedding_bits``: the tied
    embedding / output head palettized too (one LUT per row)."""
    from conftest import tiny_llama_config
    from transformers import AutoModelForCausalLM

    from optimum_edkm.nn import PalettizedEmbedding, PalettizedTiedLinear
    from optimum_edkm.nn.stored16 import store_float_parts_16bit

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(tie=True, max_position_embeddings=128)).eval()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    if embedding_bits is not None:
        targets.append(("model.embed_tokens", model.model.embed_tokens))
    for index, (name, module) in enumerate(targets):
        embedding = isinstance(module, torch.nn.Embedding)
        out_f, in_f = module.weight.shape
        bits = embedding_bits if embedding else 3
        palette = PaletteFormat(bits=bits, group_size=1)
        layer = (
            PalettizedEmbedding(out_f, in_f, palette) if embedding else PalettizedLinear(in_f, out_f, False, palette)
        )
        _, packed, lut, _, _ = make_palette(out_f, in_f, bits, groups=out_f, scale=False, seed=seed + index)
        layer.weight.copy_(packed)
        layer.weight_lut.copy_(lut * (1.0 if embedding else 0.2))
        model.set_submodule(name, layer)
        if embedding:
            model.lm_head = PalettizedTiedLinear(layer)
    store_float_parts_16bit(model, torch.float16)
    return model


@needs_kernel
@pytest.mark.parametrize("embedding_bits", [None, 4])
def test_greedy_generation_equals_the_reference_path_on_every_instruction_set(embedding_bits, monkeypatch):
    """64 greedy tokens at batch 1 and batch 8 (rows of x through the one-, two-, four- and eight-row loops while
    prompts are read and tokens decoded) match the pure-torch path token for token on every instruction set."""
    from optimum_edkm.nn.stored16 import Embedding16, Linear16

    model = palettized_tiny_llama(embedding_bits)
    if embedding_bits is None:
        assert isinstance(model.model.embed_tokens, Embedding16) and isinstance(model.lm_head, Linear16)
        assert model.lm_head.weight.dtype == torch.float16
    prompts = {1: torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(1))}
    prompts[8] = torch.randint(3, 128, (8, 5), generator=torch.Generator().manual_seed(2))

    def generate(ids):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)

    with monkeypatch.context() as patch:
        patch.setattr(lut_module, "kernel_available", lambda: False)
        reference = {batch: generate(ids) for batch, ids in prompts.items()}
    calls = []
    for name in ("linear", "linear16"):
        compiled = lut_module._state["direct"][name]
        monkeypatch.setitem(lut_module._state["direct"], name, lambda *a, f=compiled, n=name: calls.append(n) or f(*a))
    for isa in isas():
        restore = use_isa(isa)
        try:
            for batch, ids in prompts.items():
                assert torch.equal(generate(ids), reference[batch]), (isa, batch)
        finally:
            restore()
    assert "linear" in calls and ("linear16" in calls) == (embedding_bits is None)
