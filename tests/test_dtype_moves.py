"""dtype and device moves of eDKM models, tested as transformers tests its own quantizers (issue 17 item 3):
LUTs, scales and centroids keep their stored values through ``.half()`` / ``.to(torch.bfloat16)``; the
footprint is the packed one; ``dequantize()`` then ``generate``; save / reload without passing the config."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import optimum_edkm
from optimum_edkm import EDKMConfig, PalettizedLinear, palettize


@pytest.fixture
def palettized(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=EDKMConfig(bits=3, enable_per_channel_scale=True, embedding_bits=4)
    )
    return palettize(model)


def _palettes(model):
    return {
        name: tensor.clone()
        for name, tensor in model.state_dict().items()
        if name.endswith(("weight_lut", "weight_scale")) or (name.endswith(".weight") and tensor.dtype == torch.uint8)
    }


@pytest.mark.parametrize(
    "cast",
    [
        lambda m: m.to(torch.bfloat16),
        lambda m: m.to(dtype=torch.float16),
        lambda m: m.to("cpu", torch.float16).to(torch.float32),
    ],
)
def test_casting_a_palettized_model_keeps_the_stored_palettes(palettized, input_ids, cast):
    before = _palettes(palettized)
    palettized.eval()
    with torch.no_grad():
        reference = palettized(input_ids).logits
    cast(palettized)
    after = _palettes(palettized)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    dtype = palettized.model.norm.weight.dtype
    assert palettized.model.embed_tokens(input_ids).dtype == dtype  # outputs follow the cast
    with torch.no_grad():
        logits = palettized(input_ids).logits
    assert logits.dtype == dtype
    # the same palettes computed in a lower precision: close to the float32 result, not equal by construction
    tolerance = 0 if dtype == torch.float32 else 0.1
    assert torch.allclose(logits.float(), reference, atol=tolerance, rtol=0.05)


def test_half_and_float_are_refused_by_transformers_with_a_clear_message(palettized):
    with pytest.raises(ValueError, match="not supported for quantized model"):
        palettized.half()
    with pytest.raises(ValueError, match="not supported for quantized model"):
        palettized.float()


def test_casting_a_train_time_model_keeps_the_clustering_state(tiny_llama_dir, input_ids):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=EDKMConfig(bits=3, enable_per_channel_scale=True)
    )
    layer = model.model.layers[0].mlp.up_proj
    state = {name: getattr(layer, name).clone() for name in ("weight_centroids", "weight_temperature", "weight_scale")}
    model.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    for name, tensor in state.items():
        assert getattr(layer, name).dtype == torch.float32 and torch.equal(getattr(layer, name), tensor), name
    model.train()
    model(input_ids, labels=input_ids).loss.backward()  # bf16 eDKM still trains
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.bfloat16


def test_device_moves_keep_every_tensor_and_work(palettized, input_ids):
    palettized.to("cpu")
    palettized.to(torch.device("cpu"), torch.float32)
    with torch.no_grad():
        logits = palettized(input_ids).logits
    assert logits.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (none on this machine)")
def test_moving_a_palettized_model_to_cuda_and_back(palettized, input_ids):
    before = _palettes(palettized)
    with torch.no_grad():
        reference = palettized(input_ids).logits
    palettized.to("cuda")
    with torch.no_grad():
        logits = palettized(input_ids.cuda()).logits.cpu()
    assert torch.allclose(logits, reference, atol=1e-4)
    palettized.to("cpu")
    for name, tensor in before.items():
        assert torch.equal(palettized.state_dict()[name], tensor), name


def test_footprint_is_the_packed_one(tiny_llama_dir):
    float_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    # float parts kept in float32: only the palettized linears change (tests/test_float_dtype.py: in 16 bits)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=EDKMConfig(bits=3, float_dtype="float32")
    )
    palettize(model)
    report = optimum_edkm.size_report(model)
    assert model.get_memory_footprint() == pytest.approx(report["theoretical_bytes"], rel=0.02)
    linears = sum(m.out_channels * m.in_channels for m in model.modules() if isinstance(m, PalettizedLinear))
    saved = linears * 4 - (linears * 3 + 7) // 8  # fp32 weights -> 3-bit indices
    assert float_model.get_memory_footprint() - model.get_memory_footprint() == pytest.approx(saved, rel=0.02)


def test_dequantize_then_generate_and_reload_without_passing_the_config(palettized, tmp_path, input_ids):
    palettized.eval()
    with torch.no_grad():
        reference = palettized(input_ids).logits
    generated = palettized.generate(input_ids[:1], max_new_tokens=5, do_sample=False)
    directory = optimum_edkm.save_pretrained(palettized, str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(directory)  # no quantization_config passed
    assert reloaded.config.quantization_config.palettized
    assert torch.equal(reloaded.generate(input_ids[:1], max_new_tokens=5, do_sample=False), generated)
    reloaded.dequantize()
    assert not getattr(reloaded, "is_quantized", False)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids).logits, reference, atol=1e-5)
    assert torch.equal(reloaded.generate(input_ids[:1], max_new_tokens=5, do_sample=False), generated)
