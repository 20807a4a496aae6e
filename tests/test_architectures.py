"""Every decoder-only architecture family, on tiny random models built from configs (seconds each): Llama,
Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 (soft-capped logits, sandwich norms, tied and scaled embedding,
sliding-window layers), Phi-3 (fused qkv / gate_up), GPT-2 (``Conv1D``), GPT-NeoX and OPT.

Each one goes through prepare -> one training step -> post-training palettization -> palettize -> save -> load ->
generate, with LoRA (peft's own ``LoraConfig``) and perplexity on the loaded model. The references are
independent of the palettized modules: the same transformers float class holding the decoded weights (exact),
and the float model holding the trained float weights (within a stated tolerance).
"""

import copy

import pytest
import torch
import transformers
from conftest import TINY_DECODER, round_float_parts, train_steps
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import optimum_edkm
from optimum_edkm import EDKMConfig
from optimum_edkm.baselines import awq, gptq, rtn
from optimum_edkm.calibration import decoder_layers, layer_by_layer, layer_output
from optimum_edkm.evaluation import evaluate_perplexity
from optimum_edkm.nn import ScaledEmbedding, is_clustered, is_palettized
from optimum_edkm.ptq import palettize_post_training

LLAMA_LIKE = TINY_DECODER
VOCAB, WINDOW, SEQ = LLAMA_LIKE["vocab_size"], 4, 16
MIXED = ["sliding_attention", "full_attention"]
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA_LIKE),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_LIKE, sliding_window=WINDOW),
    "qwen2": lambda: transformers.Qwen2Config(
        **LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "qwen3": lambda: transformers.Qwen3Config(**LLAMA_LIKE, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**LLAMA_LIKE, head_dim=8, sliding_window=WINDOW, layer_types=MIXED),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **LLAMA_LIKE, head_dim=8, sliding_window=WINDOW, layer_types=MIXED, final_logit_softcapping=30.0
    ),
    "phi3": lambda: transformers.Phi3Config(**LLAMA_LIKE),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
}
#: the sliding-window models: their decoder layers mix attention types (or all use a window shorter than SEQ)
SLIDING = ["mistral", "qwen2", "gemma2", "gemma3"]
#: bits of the life-cycle test and the stated tolerance of its logits against the float model's: the relative
#: Frobenius error ||palettized - float|| / ||float|| of the logits (6-bit linears and embeddings; measured
#: 0.023 (Llama) to 0.058 (Gemma 2) on these models)
BITS, FLOAT_TOLERANCE = 6, 0.1


def float_model(name, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


def token_ids(rows, length=SEQ, seed=0):
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def with_weights_of(reference, model):
    """A copy of the float model ``reference`` holding ``model``'s trained float parameters and, for every
    palettized module, its decoded weight: what the palettized model computes, through transformers' own float
    classes (scaled embedding, ``Conv1D``, tied head)."""
    expected = copy.deepcopy(reference)
    own = expected.state_dict()
    state = {k: v for k, v in model.state_dict().items() if k in own and v.shape == own[k].shape}
    expected.load_state_dict(state, strict=False)
    with torch.no_grad():
        for name, module in model.named_modules():
            if is_palettized(module):
                target = expected.get_submodule(name)
                dense = module.dense_weight(torch.float32)
                target.weight.copy_(dense.t() if isinstance(target, Conv1D) else dense)
    return expected


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def relative_error(value, reference):
    return float((value - reference).norm() / reference.norm())


def packed_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prepare_train_post_training_palettize_save_load_generate_lora_and_perplexity(name, tmp_path):
    import peft

    reference = float_model(name)
    ids, calibration = token_ids(2), token_ids(4, seed=1)
    model = copy.deepcopy(reference)
    optimum_edkm.prepare(model, EDKMConfig(bits=BITS, embedding_bits=BITS))
    clustered = {n for n, m in model.named_modules() if is_clustered(m)}
    assert clustered, name

    # one eDKM training step: gradients reach every clustered weight through the differentiable clustering
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    for module_name in clustered:
        grad = model.get_submodule(module_name).weight.grad
        assert grad is not None and bool(grad.abs().sum() > 0), module_name
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= 1e-3 * parameter.grad
                parameter.grad = None
    model.eval()
    trained_float = with_weights_of(reference, model)  # the float model with the trained float weights

    # post-training palettization of every linear of the decoder layers, exactly what palettize stores
    result = palettize_post_training(model, calibration, progress=False)
    layers = decoder_layers(model)
    in_layers = {n for n in clustered if any(model.get_submodule(n) is m for layer in layers for m in layer.modules())}
    assert set(result.storage) == in_layers and len(in_layers) >= 8
    assert all(detail["mismatched"] == 0 for detail in result.details.values())
    round_float_parts(model)  # palettize stores the float parts (norms) in float16
    train_time = logits(model, ids)
    optimum_edkm.palettize(model)
    palettized = logits(model, ids)
    torch.testing.assert_close(palettized, train_time, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(palettized, logits(with_weights_of(reference, model), ids), atol=1e-5, rtol=1e-5)
    error = relative_error(palettized, logits(trained_float, ids))
    assert error < FLOAT_TOLERANCE, (name, error)
    print(f"{name}: relative logit error against the float model at {BITS} bits: {error:.4f}")  # pytest -s

    # the LUT kernel and the decoded-weight path compute the same logits
    for module in model.modules():
        if is_palettized(module):
            module.cache_dense_weight = True
    torch.testing.assert_close(logits(model, ids), palettized, atol=1e-5, rtol=1e-5)
    for module in model.modules():
        if is_palettized(module):
            module.cache_dense_weight = False

    # dequantize: plain float modules (a scaled embedding keeps its scale) computing the same logits
    dequantized = copy.deepcopy(model).dequantize()
    assert not any(is_palettized(m) or is_clustered(m) for m in dequantized.modules())
    if name.startswith("gemma"):
        assert isinstance(dequantized.get_input_embeddings(), ScaledEmbedding)
    torch.testing.assert_close(logits(dequantized, ids), palettized, atol=1e-5, rtol=1e-5)

    # save -> load (transformers' from_pretrained) -> the same logits and the same greedy generation
    folder = optimum_edkm.save_pretrained(model, str(tmp_path / name))
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert {n for n, m in loaded.named_modules() if is_palettized(m)} == {
        n for n, m in model.named_modules() if is_palettized(m)
    }
    assert torch.equal(logits(loaded, ids), palettized)
    prompt = ids[:1, :5]
    generated = loaded.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert generated.shape[1] > prompt.shape[1]

    # perplexity of the loaded model = exp(mean next-token cross-entropy) recomputed from its logits
    stream = token_ids(1, 48, seed=2)[0]
    measured = evaluate_perplexity(loaded, stream, context_length=SEQ, progress=False)
    windows = stream.view(-1, SEQ)
    by_hand = torch.nn.functional.cross_entropy(
        logits(loaded, windows)[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1)
    )
    assert measured.perplexity == pytest.approx(float(torch.exp(by_hand)), rel=1e-5)

    # LoRA with peft's own config on every linear: the adapters learn, the palettized base does not change
    before = packed_state(loaded)
    lora = peft.get_peft_model(loaded, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    losses = train_steps(lora, calibration, steps=4)
    assert losses[-1] < losses[0], losses
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in packed_state(lora).items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(optimum_edkm.peft.PalettizedMergeError, match="dequantize"):
        lora.merge_and_unload()


@pytest.mark.parametrize("name", SLIDING)
def test_each_decoder_layer_is_replayed_with_its_own_mask_and_position_embeddings(name):
    model = float_model(name)
    ids = token_ids(3, seed=3)
    layers = decoder_layers(model)
    inputs, outputs = {}, {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, args, i=i: inputs.setdefault(i, args[0])))
        hooks.append(layer.register_forward_hook(lambda m, args, out, i=i: outputs.setdefault(i, layer_output(out))))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    steps = list(layer_by_layer(model, ids, batch_size=3))
    assert [step.index for step in steps] == list(range(len(layers)))
    for step in steps:  # the replayed inputs are the ones the model's own forward gives each layer
        (call,) = step.calls
        torch.testing.assert_close(call.hidden_states, inputs[step.index], atol=1e-6, rtol=1e-6)
        with torch.no_grad():
            replayed = layer_output(step.layer(*call.args, **call.kwargs))
        torch.testing.assert_close(replayed, outputs[step.index], atol=1e-6, rtol=1e-6)
    if len(set(getattr(model.config, "layer_types", None) or ())) > 1:
        # replaying the first layer's arguments for every layer (what the driver did before) is wrong here
        first, last = steps[0].calls[0], steps[-1].calls[0]
        with torch.no_grad():
            wrong = layer_output(steps[-1].layer(last.hidden_states, **first.kwargs))
        assert not torch.allclose(wrong, outputs[len(layers) - 1], atol=1e-4)


def hidden_error(model, reference, ids):
    with torch.no_grad():
        ours = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        theirs = reference(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return float((ours - theirs).pow(2).mean())


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "qwen2", "phi3", "opt", "gpt2"])
def test_gptq_and_awq_run_and_beat_rtn_where_their_layers_are_known(name):
    reference = float_model(name, seed=4)
    with torch.no_grad():  # outlier input channels, where calibration pays
        reference.get_input_embeddings().weight[:, [3, 17]] *= 20
    calibration, held_out = token_ids(8, seed=5), token_ids(4, seed=6)
    errors = {}
    for method, run in {
        "rtn": lambda m: rtn(m, 3, 16),
        "gptq": lambda m: gptq(m, calibration, 3, 16, batch_size=4, progress=False),
        "awq": lambda m: awq(m, calibration, 3, 16, batch_size=4, progress=False),
    }.items():
        model = copy.deepcopy(reference)
        if method == "awq" and name == "gpt2":
            state = {k: v.clone() for k, v in model.state_dict().items()}
            with pytest.raises(ValueError, match="GPT2Block of GPT2LMHeadModel is none of them"):
                run(model)
            assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # refused before any work
            continue
        report = run(model)
        assert len(report.storage) == sum(len(layer_linears(layer)) for layer in decoder_layers(model))
        errors[method] = hidden_error(model, reference, held_out)
    assert errors["gptq"] < errors["rtn"], errors
    if "awq" in errors:
        assert errors["awq"] < errors["rtn"], errors


def layer_linears(layer):
    return [m for m in layer.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def test_an_architecture_that_cannot_be_driven_is_refused_by_name_before_any_work():
    t5 = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0
    )
    model = transformers.T5ForConditionalGeneration(t5).eval()
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        palettize_post_training(model, token_ids(2), EDKMConfig(bits=3))
    assert not any(is_clustered(m) for m in model.modules())  # not even prepared
    gpt_neox = float_model("gpt_neox")
    with pytest.raises(ValueError, match="GPTNeoXLayer of GPTNeoXForCausalLM is none of them: use gptq"):
        awq(gpt_neox, token_ids(2), 3)


def test_modules_eDKM_cannot_reproduce_stay_float_and_are_refused_by_name(caplog):
    model = float_model("opt")
    with pytest.raises(ValueError, match="model.decoder.embed_positions.*OPTLearnedPositionalEmbedding overrides"):
        optimum_edkm.prepare(model, EDKMConfig(bits=3, module_bits={"model.decoder.embed_positions": 4}))
    assert not any(is_clustered(m) for m in model.modules())
    with caplog.at_level("WARNING"):
        optimum_edkm.prepare(model, EDKMConfig(bits=3, embedding_bits=4))
    assert "model.decoder.embed_positions (OPTLearnedPositionalEmbedding" in caplog.text
    assert is_clustered(model.model.decoder.embed_tokens) and not is_clustered(model.model.decoder.embed_positions)
    assert "model.decoder.embed_positions" in model.config.quantization_config.modules_to_not_convert


def test_the_size_report_shows_the_share_of_a_large_float_embedding():
    """A Gemma 3 shape whose tied embedding is most of the parameters (262,144 x 640 in Gemma 3 270M; 4,096 x 32
    here): left in float it sets the size, and the report says how much stayed float."""
    torch.manual_seed(0)
    config = CONFIGS["gemma3"]()
    config.vocab_size = 4096
    base = AutoModelForCausalLM.from_config(config).eval()
    embedding = base.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in base.parameters())  # the tied head counted once
    shares = {}
    for embedding_bits in (None, 4):
        model = copy.deepcopy(base)
        optimum_edkm.prepare(model, EDKMConfig(bits=4, embedding_bits=embedding_bits))
        report = optimum_edkm.size_report(model)
        clustered = sum(m.rows().numel() for m in model.modules() if is_clustered(m))
        assert report["clustered_weights"] == clustered
        assert report["float_parameters"] == total - clustered
        assert report["float_parameter_share"] == pytest.approx((total - clustered) / total)
        assert report["float_byte_share"] == pytest.approx(report["other_bytes"] / report["theoretical_bytes"])
        shares[embedding_bits] = report["float_parameter_share"]
        assert "parameters in floating point" in optimum_edkm.model_card_section(model)
    assert shares[None] > embedding / total > 0.8 and shares[4] < 0.05


@pytest.mark.parametrize("name", ["gemma3", "phi3"])
def test_core_ml_export_of_a_sliding_window_gemma_and_a_fused_phi3(name, tmp_path):
    """Gemma 3: sliding-window and full-attention layers (the fixed-window graph gets each type's mask), a tied,
    scaled and palettized embedding read by the gather and the LM head; Phi-3: fused qkv / gate_up."""
    pytest.importorskip("coremltools", reason='coremltools is not installed (pip install "optimum-edkm[coreml]")')
    from optimum_edkm.export import to_coreml

    model = float_model(name)
    optimum_edkm.prepare(model, EDKMConfig(bits=4, embedding_bits=4))
    optimum_edkm.palettize(model)
    with torch.no_grad():  # norms of ones (or zeros in Gemma) would be folded away by the converter
        for parameter_name, parameter in model.named_parameters():
            if "norm" in parameter_name:
                parameter.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(parameter_name)))
    result = to_coreml(model, str(tmp_path / "model.mlpackage"), seq_len=2 * WINDOW)
    report = result.verification
    palettized = [n for n, m in model.named_modules() if is_palettized(m)]
    assert not report.failures and result.op_counts["constexpr_lut_to_dense"] == len(palettized)
    assert report.logits_max_abs_diff <= report.logits_tolerance
    embedding = next(m for m in report.modules if m.kind == "embedding")
    if name == "gemma3":  # one LUT op read by the embedding's gather and the tied head's linear
        assert embedding.consumers == ["gather.x", "linear.weight"]
        assert report.tied_embedding["palettized"] and report.tied_embedding["stored"] == 1
    else:
        assert embedding.consumers == ["gather.x"]
