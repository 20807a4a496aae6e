"""The float parts of a palettized model (a float tied embedding / output head, norms, unconverted layers) are
stored in 16 bits by default (``EDKMConfig.float_dtype``), run with float32 accumulation, and load back exactly.
References: the same model with its float parts kept in float32, and the safetensors file's own header."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import optimum_edkm
from optimum_edkm import EDKMConfig, palettize
from optimum_edkm.nn.stored16 import Embedding16, Linear16


def _palettized(directory, **config):
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=EDKMConfig(bits=3, **config))
    return palettize(model).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _stored_dtypes(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as handle:
        return {key: handle.get_slice(key).get_dtype() for key in handle.keys()}


@pytest.mark.parametrize("float_dtype", ["float16", "bfloat16"])
def test_tied_embedding_and_norms_are_stored_in_16_bits_and_load_back_exactly(
    tiny_llama_dir, tmp_path, input_ids, float_dtype
):
    dtype = getattr(torch, float_dtype)
    wide = _palettized(tiny_llama_dir, float_dtype="float32")
    model = _palettized(tiny_llama_dir, float_dtype=float_dtype)
    embedding, head = model.get_input_embeddings(), model.lm_head
    assert isinstance(embedding, Embedding16) and isinstance(head, Linear16)
    assert embedding.weight.dtype == dtype and head.weight is embedding.weight  # still tied, stored once
    norm = model.model.norm.weight
    assert norm.dtype == torch.float32 and torch.equal(norm, norm.to(dtype).float())  # 16-bit values
    # only the float parts were rounded: the logits stay close to the float32 ones, in float32
    narrow, reference = _logits(model, input_ids), _logits(wide, input_ids)
    assert narrow.dtype == torch.float32
    assert float((narrow - reference).abs().max()) <= 0.02 * float(reference.abs().max())

    folder = optimum_edkm.save_pretrained(model, str(tmp_path / "narrow"))
    stored = _stored_dtypes(folder)
    assert stored["model.embed_tokens.weight"] == ("F16" if dtype == torch.float16 else "BF16")
    assert stored["model.norm.weight"] == stored["model.embed_tokens.weight"]
    assert "lm_head.weight" not in stored
    on_disk = optimum_edkm.checkpoint_bytes(folder)["tensor_bytes"]
    assert on_disk == optimum_edkm.size_report(model)["theoretical_bytes"]
    wide_folder = optimum_edkm.save_pretrained(wide, str(tmp_path / "wide"))
    embedding_bytes = embedding.weight.numel() * 2
    assert optimum_edkm.checkpoint_bytes(wide_folder)["tensor_bytes"] - on_disk >= embedding_bytes

    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(reloaded.lm_head, Linear16) and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert reloaded.model.embed_tokens.weight.dtype == dtype
    assert reloaded.model.norm.weight.dtype == torch.float32  # the model computes in float32
    assert reloaded.config.quantization_config.float_dtype == float_dtype
    assert torch.equal(_logits(reloaded, input_ids), narrow)
    generated = model.generate(input_ids[:1], max_new_tokens=8, do_sample=False)
    assert torch.equal(reloaded.generate(input_ids[:1], max_new_tokens=8, do_sample=False), generated)


def test_float32_keeps_the_float_parts_and_an_untied_head_gets_its_own_16_bit_weight(
    tiny_llama_untied_dir, tmp_path, input_ids
):
    wide = _palettized(tiny_llama_untied_dir, float_dtype="float32")
    assert type(wide.lm_head) is torch.nn.Linear and wide.lm_head.weight.dtype == torch.float32
    folder = optimum_edkm.save_pretrained(wide, str(tmp_path / "wide"))
    assert set(_stored_dtypes(folder).values()) <= {"F32", "F16", "U8"}  # LUTs in fp16, the rest float32
    assert _stored_dtypes(folder)["lm_head.weight"] == "F32"

    model = _palettized(tiny_llama_untied_dir)  # default: float16
    assert isinstance(model.lm_head, Linear16) and model.lm_head.weight is not model.model.embed_tokens.weight
    folder = optimum_edkm.save_pretrained(model, str(tmp_path / "narrow"))
    assert _stored_dtypes(folder)["lm_head.weight"] == "F16"
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(_logits(reloaded.eval(), input_ids), _logits(model, input_ids))


def test_gpt2_layer_norms_position_embedding_and_conv1d(tiny_gpt2_dir, tmp_path, input_ids):
    model = _palettized(tiny_gpt2_dir)
    assert isinstance(model.transformer.wpe, Embedding16)
    assert model.transformer.ln_f.weight.dtype == torch.float32  # rounded in place: LayerNorm needs x's dtype
    expected = _logits(model, input_ids)
    folder = optimum_edkm.save_pretrained(model, str(tmp_path / "gpt2"))
    assert _stored_dtypes(folder)["transformer.ln_f.weight"] == "F16"
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder).eval(), input_ids), expected)


def test_a_bfloat16_model_keeps_its_dtype(tiny_llama_dir, tmp_path, input_ids):
    """Only float32 parts are narrowed: a bfloat16 model is not rounded to float16 (that would lose range)."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.bfloat16, quantization_config=EDKMConfig(bits=3)
    )
    palettize(model)
    assert type(model.model.embed_tokens) is torch.nn.Embedding and model.dtype == torch.bfloat16
    folder = optimum_edkm.save_pretrained(model, str(tmp_path / "bf16"))
    assert _stored_dtypes(folder)["model.embed_tokens.weight"] == "BF16"


def test_casting_the_model_changes_the_compute_dtype_not_the_stored_one(tiny_llama_dir, input_ids):
    model = _palettized(tiny_llama_dir)
    weight = model.lm_head.weight
    model.to(torch.bfloat16)
    assert model.lm_head.weight is weight and weight.dtype == torch.float16  # tie and storage kept
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert _logits(model, input_ids).dtype == torch.bfloat16
    model.to(torch.float32)
    assert weight.dtype == torch.float16 and _logits(model, input_ids).dtype == torch.float32


def test_dequantize_gives_plain_tied_float_modules(tiny_llama_dir, input_ids):
    model = _palettized(tiny_llama_dir)
    expected = _logits(model, input_ids)
    model.dequantize()
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(_logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_saved_before_float_dtype_existed_loads_unchanged(tiny_llama_dir, tmp_path, input_ids):
    model = _palettized(tiny_llama_dir, float_dtype=None)  # as optimum-edkm saved float parts before the option
    assert type(model.lm_head) is torch.nn.Linear
    folder = optimum_edkm.save_pretrained(model, str(tmp_path / "old"))
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    del config["quantization_config"]["float_dtype"]
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert reloaded.config.quantization_config.float_dtype is None
    assert type(reloaded.lm_head) is torch.nn.Linear and reloaded.lm_head.weight.dtype == torch.float32
    assert torch.equal(_logits(reloaded, input_ids), _logits(model, input_ids))


def test_a_bad_float_dtype_names_the_choices():
    with pytest.raises(ValueError, match=r"float_dtype must be one of \('float16', 'bfloat16', 'float32'\)"):
        EDKMConfig(float_dtype="int8")


def test_the_core_ml_export_copy_is_float32_and_keeps_the_tie(tiny_llama_dir, input_ids):
    from optimum_edkm.export.common import export_copy

    model = _palettized(tiny_llama_dir)
    copy = export_copy(model)
    assert copy.lm_head.weight is copy.model.embed_tokens.weight  # stored once in the exported model too
    assert copy.lm_head.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float16  # the model itself is untouched
    torch.testing.assert_close(_logits(copy, input_ids), _logits(model, input_ids), rtol=1e-5, atol=1e-5)
