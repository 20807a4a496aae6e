"""EDKMConfig through from_pretrained, palettization, and the save / load round trip."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import optimum_edkm
from optimum_edkm import (
    EDKMConfig,
    EDKMConv1D,
    EDKMEmbedding,
    EDKMLinear,
    PalettizedEmbedding,
    PalettizedLinear,
    palettize,
)
from optimum_edkm.clustering import packed_size

LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def load(directory, **config):
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=EDKMConfig(**config))


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------------------------- config
def test_config_round_trips_through_dict_and_json():
    config = EDKMConfig(
        bits=4,
        granularity="per_grouped_channel",
        group_size=8,
        enable_per_channel_scale=True,
        temperature=0.5,
        iterations=2,
        tolerance=1e-6,
        embedding_bits=8,
        seed=3,
        modules_to_not_convert=["lm_head"],
        uniquify=False,
        lut_dtype="float32",
        module_bits={"model.layers.0.mlp.down_proj": 4},
    )
    data = config.to_dict()
    assert config.quant_method == "edkm" and data["bits"] == 4 and data["group_size"] == 8
    # config.json names the fix where transformers prints it without optimum_edkm (see the load test below)
    assert data["quant_method"].startswith("edkm (pip install optimum-edkm, then import optimum_edkm")
    again = EDKMConfig.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data
    assert EDKMConfig.from_dict(EDKMConfig().to_dict()).to_dict() == EDKMConfig().to_dict()


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"bits": 9}, "EDKMConfig.bits must be an integer from 1 to 8"),
        ({"bits": 2.5}, "EDKMConfig.bits must be an integer from 1 to 8"),
        ({"embedding_bits": 0}, "EDKMConfig.embedding_bits must be an integer from 1 to 8"),
        ({"granularity": "per_channel"}, "granularity must be one of"),
        ({"granularity": "per_grouped_channel"}, "group_size must be a positive integer"),
        ({"group_size": 16}, "group_size is only used with granularity='per_grouped_channel'"),
        ({"temperature": 0}, "temperature must be a finite number > 0"),
        ({"iterations": 0}, "iterations must be an integer >= 1"),
        ({"tolerance": -1}, "tolerance must be a finite number >= 0"),
        ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert must be a list"),
        ({"uniquify": "yes"}, "uniquify must be True or False"),
        ({"lut_dtype": "int8"}, "lut_dtype must be one of"),
        ({"bitz": 3}, "unknown EDKMConfig field.*bitz.*valid fields are bits"),
        ({"quant_method": "gptq"}, "quant_method 'edkm', got 'gptq'"),
    ],
)
def test_config_rejects_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        EDKMConfig(**fields)


# -------------------------------------------------------------------------------------- from_pretrained
def test_from_pretrained_wraps_linears_and_skips_the_tied_head(tiny_llama_dir):
    model = load(tiny_llama_dir, bits=3)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, EDKMLinear)}
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == LLAMA_LINEARS
    assert len(wrapped) == 2 * len(LLAMA_LINEARS)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.is_quantized and model.hf_quantizer.is_trainable and model.hf_quantizer.is_qat_trainable
    assert sorted(model.config.quantization_config.modules_to_not_convert) == ["lm_head", "model.embed_tokens"]
    for module in model.modules():
        if isinstance(module, EDKMLinear):
            assert module.weight.requires_grad and isinstance(module.weight, nn.Parameter)
            assert module.weight_centroids.shape == (1, 8)
            assert bool((module.weight_centroids[0, 1:] > module.weight_centroids[0, :-1]).all())
            assert float(module.weight_temperature) > 0


def test_modules_to_not_convert_and_embedding_bits(tiny_llama_untied_dir):
    model = load(tiny_llama_untied_dir, bits=2, embedding_bits=8, modules_to_not_convert=["down_proj"])
    assert isinstance(model.model.embed_tokens, EDKMEmbedding) and model.model.embed_tokens.bits == 8
    assert isinstance(model.lm_head, EDKMLinear)  # the user's list replaces the default skips
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.up_proj, EDKMLinear)


def test_a_tied_embedding_is_clustered_once_and_the_head_reads_its_palette(tiny_llama_dir, tmp_path, input_ids):
    model = load(tiny_llama_dir, bits=3, embedding_bits=4)
    embedding, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embedding, EDKMEmbedding) and embedding.bits == 4
    assert isinstance(head, optimum_edkm.EDKMTiedLinear) and head.weight is embedding.weight
    assert "model.embed_tokens" not in model.config.quantization_config.modules_to_not_convert
    # training: one clustering per forward serves both uses, gradients of both reach the one weight
    model.train()
    centroids = embedding.weight_centroids.clone()
    model(input_ids, labels=input_ids).loss.backward()
    assert embedding.weight.grad is not None and float(embedding.weight.grad.abs().sum()) > 0
    assert not torch.equal(embedding.weight_centroids, centroids)
    # eval: the head computes with the snapped embedding (an independent decode of the same palette)
    expected = logits(model, input_ids)
    hidden = model.model(input_ids).last_hidden_state
    assert torch.allclose(expected, hidden @ embedding.snapped_weight().t(), atol=1e-5)
    palettize(model)
    assert isinstance(model.model.embed_tokens, PalettizedEmbedding)
    assert isinstance(model.lm_head, optimum_edkm.PalettizedTiedLinear)
    # the fused LUT kernel sums in another order than F.linear on the decoded weight
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-6)
    expected = logits(model, input_ids)
    report = optimum_edkm.size_report(model)
    vocab, hidden_size = 128, 32
    assert report["clustered_weights"] == vocab * hidden_size + sum(
        m.out_channels * m.in_channels for m in model.modules() if isinstance(m, PalettizedLinear)
    )
    directory = optimum_edkm.save_pretrained(model, str(tmp_path / "tied"))
    with safe_open(os.path.join(directory, "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.embed_tokens.weight_lut" in keys and not any(k.startswith("lm_head") for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    assert isinstance(reloaded.lm_head, optimum_edkm.PalettizedTiedLinear)
    assert torch.equal(logits(reloaded, input_ids), expected)
    reloaded.dequantize()
    assert type(reloaded.lm_head) is nn.Linear and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.allclose(logits(reloaded, input_ids), expected, atol=1e-6)


def test_group_size_must_divide_every_layer_before_loading(tiny_llama_dir):
    with pytest.raises(
        ValueError,
        match=r"group_size=12 does not divide the 32 output channels of "
        r"'model.layers.0.self_attn.q_proj'.*\[1, 2, 4, 8, 16\]",
    ):
        load(tiny_llama_dir, bits=3, granularity="per_grouped_channel", group_size=12)


def test_backward_reaches_the_float_weights_and_trainer_and_peft_accept_the_model(tiny_llama_dir, input_ids, tmp_path):
    model = load(tiny_llama_dir, bits=3)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    grads = [m.weight.grad for m in model.modules() if isinstance(m, EDKMLinear)]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)

    from transformers import Trainer, TrainingArguments

    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load(tiny_llama_dir, bits=3), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora_q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(lora_q.base_layer, EDKMLinear) and not lora_q.base_layer.weight.requires_grad
    peft_model.train()
    peft_model(input_ids, labels=input_ids).loss.backward()
    assert lora_q.lora_B["default"].weight.grad is not None


def test_training_forward_is_soft_clustering_and_eval_is_the_snapped_weight(tiny_llama_dir):
    model = load(tiny_llama_dir, bits=2)
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 32)
    layer.eval()
    snapped = layer.snapped_weight()
    assert snapped.unique().numel() <= 4
    with torch.no_grad():
        assert torch.equal(layer(x), nn.functional.linear(x, snapped))
    layer.train()
    centroids_before = layer.weight_centroids.clone()
    soft = layer.clustered_weight()
    assert soft.requires_grad and soft.detach().unique().numel() > 4  # soft assignments mix centroids
    assert not torch.equal(centroids_before, layer.weight_centroids)  # warm start for the next step


# ------------------------------------------------------------------------------------------ palettize
@pytest.mark.parametrize(
    "extra", [{}, {"granularity": "per_grouped_channel", "group_size": 8}, {"enable_per_channel_scale": True}]
)
def test_post_training_palettize_snaps_every_weight_to_its_nearest_lut_entry(tiny_llama_dir, extra):
    model = load(tiny_llama_dir, bits=3, **extra)
    originals = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, EDKMLinear)}
    palettize(model)
    assert model.config.quantization_config.palettized and not model.hf_quantizer.is_qat_trainable
    for name, original in originals.items():
        module = model.get_submodule(name)
        assert isinstance(module, PalettizedLinear) and module.weight.dtype == torch.uint8
        dense = module.dense_weight()
        lut = module.weight_lut.float()  # [groups, 8]
        groups = lut.shape[0]
        scale = (
            module.weight_scale.float().unsqueeze(1)
            if module.weight_scale is not None
            else torch.ones(original.shape[0], 1)
        )
        rows_per_group = original.shape[0] // groups
        for row in range(original.shape[0]):
            entries = lut[row // rows_per_group]
            # the value eDKM clusters: the weight (divided by its channel scale) in bf16
            value = (original[row].double() / scale[row].double()).to(torch.bfloat16).double()
            nearest = entries.double()[(value.unsqueeze(1) - entries.double()).abs().argmin(1)]
            assert torch.equal(dense[row], (nearest.float() * scale[row]))


def test_palettize_save_load_in_a_fresh_process_gives_identical_logits_and_generation(
    tiny_llama_dir, tmp_path, input_ids
):
    # float parts kept in float32: the comparison below is about the palettized layers alone
    model = load(
        tiny_llama_dir,
        bits=3,
        granularity="per_grouped_channel",
        group_size=16,
        enable_per_channel_scale=True,
        float_dtype="float32",
    )
    before = logits(model, input_ids)
    palettize(model)
    after = logits(model, input_ids)
    # eval-mode clustered model (F.linear on the snapped weight) == palettized model (the fused LUT op sums in
    # another order)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    generated = model.generate(input_ids[:1], max_new_tokens=6, do_sample=False)
    saved = str(tmp_path / "palettized")
    optimum_edkm.save_pretrained(model, saved)
    torch.save({"ids": input_ids, "logits": after, "generated": generated}, tmp_path / "reference.pt")
    script = textwrap.dedent(f"""
        import torch, optimum_edkm
        from transformers import AutoModelForCausalLM
        from optimum_edkm import EDKMLinear, PalettizedLinear
        def refuse(*args, **kwargs):
            raise AssertionError("a float train-time module was built while loading a palettized checkpoint")
        EDKMLinear.__init__ = refuse
        model = AutoModelForCausalLM.from_pretrained({saved!r})
        ref = torch.load({str(tmp_path / "reference.pt")!r})
        assert isinstance(model.model.layers[0].self_attn.q_proj, PalettizedLinear)
        with torch.no_grad():
            out = model(ref["ids"]).logits
        assert torch.equal(out, ref["logits"]), float((out - ref["logits"]).abs().max())
        gen = model.generate(ref["ids"][:1], max_new_tokens=6, do_sample=False)
        assert torch.equal(gen, ref["generated"])
        print("IDENTICAL")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "IDENTICAL" in done.stdout, done.stderr[-2000:]


def test_gpt2_conv1d_and_embedding_round_trip(tiny_gpt2_dir, tmp_path, input_ids):
    model = load(
        tiny_gpt2_dir,
        bits=4,
        embedding_bits=8,
        modules_to_not_convert=["lm_head", "transformer.wte"],
        float_dtype="float32",  # the comparisons below are about the palettized modules alone
    )
    assert isinstance(model.transformer.h[0].attn.c_attn, EDKMConv1D)
    assert isinstance(model.transformer.wpe, EDKMEmbedding)
    before = logits(model, input_ids)
    palettize(model)
    assert isinstance(model.transformer.wpe, PalettizedEmbedding)
    palettized = logits(model, input_ids)
    torch.testing.assert_close(palettized, before, rtol=1e-5, atol=1e-6)  # fused LUT op vs F.linear
    optimum_edkm.save_pretrained(model, str(tmp_path / "gpt2"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gpt2"))
    assert torch.equal(logits(reloaded, input_ids), palettized)
    reloaded.dequantize()
    conv = reloaded.transformer.h[0].attn.c_attn
    assert type(conv) is Conv1D and conv.weight.shape == (32, 96)
    torch.testing.assert_close(logits(reloaded, input_ids), before, rtol=1e-5, atol=1e-6)


def test_train_format_checkpoint_reloads_with_its_centroids(tiny_llama_dir, tmp_path, input_ids):
    model = load(tiny_llama_dir, bits=3)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()  # moves the centroids (warm start)
    expected = logits(model, input_ids)
    optimum_edkm.save_pretrained(model, str(tmp_path / "train-format"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "train-format"))
    layer, original = reloaded.model.layers[1].mlp.gate_proj, model.model.layers[1].mlp.gate_proj
    assert isinstance(layer, EDKMLinear)
    assert torch.equal(layer.weight_centroids, original.weight_centroids)
    assert torch.equal(logits(reloaded, input_ids), expected)


def test_bf16_model_round_trip(tiny_llama_dir, tmp_path, input_ids):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.bfloat16, quantization_config=EDKMConfig(bits=4)
    )
    before = logits(model, input_ids)
    palettize(model)
    optimum_edkm.save_pretrained(model, str(tmp_path / "bf16"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(logits(reloaded, input_ids), before)


def test_prepare_in_memory_matches_from_pretrained(tiny_llama_dir, input_ids):
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    parameter = plain.model.layers[0].self_attn.q_proj.weight
    prepared = optimum_edkm.prepare(plain, EDKMConfig(bits=3))
    assert prepared.model.layers[0].self_attn.q_proj.weight is parameter  # reused, not copied
    assert torch.equal(logits(prepared, input_ids), logits(load(tiny_llama_dir, bits=3), input_ids))
    with pytest.raises(ValueError, match="already quantized"):
        optimum_edkm.prepare(prepared, EDKMConfig(bits=3))


# ----------------------------------------------------------------------------------------------- size
def test_checkpoint_is_within_2_percent_of_the_theoretical_n_bit_size(tiny_llama_untied_dir, tmp_path):
    float_model = AutoModelForCausalLM.from_pretrained(tiny_llama_untied_dir)
    bits, group = 3, 8
    expected = 0
    for name, tensor in float_model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if module_name.rsplit(".", 1)[-1] in LLAMA_LINEARS and leaf == "weight":
            rows, cols = tensor.shape
            expected += packed_size(rows * cols, bits) + (rows // group) * 2**bits * 2 + rows * 2  # LUT+scale
        else:
            expected += tensor.numel() * 2  # float parts in float16 (EDKMConfig.float_dtype)
    model = load(
        tiny_llama_untied_dir,
        bits=bits,
        granularity="per_grouped_channel",
        group_size=group,
        enable_per_channel_scale=True,
    )
    palettize(model)
    directory = optimum_edkm.save_pretrained(model, str(tmp_path / "sized"))
    on_disk = optimum_edkm.checkpoint_bytes(directory)
    assert abs(on_disk["tensor_bytes"] - expected) <= 0.02 * expected
    report = optimum_edkm.size_report(model)
    assert report["theoretical_bytes"] == expected
    assert abs(model.get_memory_footprint() - expected) <= 0.02 * expected
    assert "| bits per index | 3 |" in open(os.path.join(directory, "README.md")).read()


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def palettized_dir(tiny_llama_dir, tmp_path):
    model = load(tiny_llama_dir, bits=3)
    palettize(model)
    return optimum_edkm.save_pretrained(model, str(tmp_path / "palettized"))


def _rewrite_checkpoint(directory, change):
    """Edit the tensors of a saved checkpoint, keeping its header metadata (the commit record)."""
    path = os.path.join(directory, "model.safetensors")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def test_missing_packed_tensor_is_reported_by_name(palettized_dir):
    _rewrite_checkpoint(palettized_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_lut"))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight_lut'"):
        AutoModelForCausalLM.from_pretrained(palettized_dir)


def test_misshaped_packed_tensor_is_reported_by_name(palettized_dir):
    def truncate(tensors):
        key = "model.layers.0.self_attn.o_proj.weight"
        tensors[key] = tensors[key][:-5].clone()

    _rewrite_checkpoint(palettized_dir, truncate)
    with pytest.raises(
        ValueError,
        match=r"'model.layers.0.self_attn.o_proj.weight' has shape \(379,\) in the "
        r"checkpoint but the model expects \(384,\)",
    ):
        AutoModelForCausalLM.from_pretrained(palettized_dir)


def test_bits_in_the_file_not_matching_the_config_is_reported(palettized_dir):
    config_path = os.path.join(palettized_dir, "config.json")
    config = json.load(open(config_path))
    config["quantization_config"]["bits"] = 4
    json.dump(config, open(config_path, "w"))
    with pytest.raises(
        ValueError,
        match=r"config.json's quantization_config differs from the one these weights were "
        r"saved with \(bits: saved 3, config.json 4\)",
    ):
        AutoModelForCausalLM.from_pretrained(palettized_dir)


def test_loading_without_the_package_fails_loudly_instead_of_reinitialising(palettized_dir):
    with safe_open(os.path.join(palettized_dir, "model.safetensors"), framework="pt") as handle:
        packed = handle.get_slice("model.layers.0.self_attn.q_proj.weight")
        assert packed.get_dtype() == "U8" and packed.get_shape() == [packed_size(32 * 32, 3)]
    script = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({palettized_dir!r})
        except Exception as error:
            print("REFUSED", type(error).__name__)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "REFUSED" in done.stdout, done.stdout[-1000:] + done.stderr[-2000:]
    # transformers' own warning, printed before its size-mismatch table, names the fix
    assert "pip install optimum-edkm, then import optimum_edkm before from_pretrained" in done.stderr


@pytest.mark.parametrize(
    "build",
    [
        lambda: EDKMConfig(offload={"min_bytes": 1}),
        lambda: EDKMConfig.from_dict({"quant_method": "edkm", "bits": 3, "offload": {"min_bytes": 1}}),
    ],
)
def test_the_offload_field_of_0_1_configs_is_ignored_with_a_warning_that_says_where_it_went(build):
    with pytest.warns(FutureWarning, match=r"offload is no longer part.*EDKMTrainingArguments\(offload_saved_tensors"):
        config = build()
    assert "offload" not in config.to_dict() and config.bits == 3


def test_prepare_says_what_it_supports_for_a_module_that_is_not_a_transformers_model():
    with pytest.raises(
        TypeError, match="prepare\\(\\) takes a transformers model.*got torch.nn.modules.container.Sequential"
    ):
        optimum_edkm.prepare(nn.Sequential(nn.Linear(4, 4)), EDKMConfig(bits=3))


def test_unsupported_modules_are_rejected():
    from conftest import tiny_llama_config
    from transformers import AutoModelForCausalLM as Auto

    model = Auto.from_config(tiny_llama_config())
    with pytest.raises(ValueError, match="no module to cluster"):
        optimum_edkm.prepare(model, EDKMConfig(bits=3, modules_to_not_convert=["model", "lm_head"]))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # nothing was changed
    with pytest.raises(ValueError, match="was not prepared for eDKM"):
        palettize(Auto.from_config(tiny_llama_config()))


def test_interrupted_save_leaves_the_previous_model_intact(tiny_llama_dir, tmp_path, input_ids, monkeypatch):
    model = load(tiny_llama_dir, bits=3)
    palettize(model)
    target = str(tmp_path / "model")
    optimum_edkm.save_pretrained(model, target)
    before = sorted(os.listdir(target))
    expected = logits(AutoModelForCausalLM.from_pretrained(target), input_ids)

    def crash(self, directory, **kwargs):
        with open(os.path.join(directory, "model.safetensors"), "wb") as handle:
            handle.write(b"half a model")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        optimum_edkm.save_pretrained(model, target)
    assert sorted(os.listdir(target)) == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".edkm-")]
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(target), input_ids), expected)


def test_push_to_hub_uploads_the_saved_files_and_model_card(tiny_llama_dir, monkeypatch):
    model = load(tiny_llama_dir, bits=3)
    palettize(model)
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploaded["files"] = sorted(os.listdir(folder_path))
            uploaded["card"] = open(os.path.join(folder_path, "README.md")).read()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    optimum_edkm.push_to_hub(model, "someone/tiny-3bit")
    assert uploaded["repo"] == "someone/tiny-3bit"
    assert {"config.json", "model.safetensors", "README.md"} <= set(uploaded["files"])
    assert "## Palettization (optimum-edkm)" in uploaded["card"] and "| bits per index | 3 |" in uploaded["card"]


def test_dequantize_gives_a_plain_model_that_loads_without_the_package(tiny_llama_dir, tmp_path, input_ids):
    model = load(tiny_llama_dir, bits=3)
    palettize(model)
    expected = logits(model, input_ids)
    model.dequantize()
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-6)  # F.linear vs LUT op
    expected = logits(model, input_ids)
    model.save_pretrained(str(tmp_path / "plain"))
    assert "quantization_config" not in json.load(open(tmp_path / "plain" / "config.json"))
