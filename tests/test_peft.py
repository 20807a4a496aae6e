"""LoRA (peft 0.21, real library) on a palettized base: peft's own LoraConfig as its users write it (and
optimum_edkm.peft.lora_config), training with Trainer, decode-in-backward, and merging that is defined (refused,
exact after dequantize, or re-palettized with its error reported) instead of silent."""

import pytest
import torch
from conftest import train_steps

peft = pytest.importorskip("peft", reason="peft is not installed (pip install optimum-edkm[dev])")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

import optimum_edkm  # noqa: E402
from optimum_edkm import EDKMConfig, EDKMLinear, PalettizedLinear  # noqa: E402
from optimum_edkm.peft import EDKMLoraLinear, PalettizedMergeError, load_adapter, lora_config, merge_and_repalettize  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def palettized_dir(tiny_llama_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=EDKMConfig(bits=3, enable_per_channel_scale=True)
    )
    optimum_edkm.palettize(model)
    return optimum_edkm.save_pretrained(model, str(tmp_path_factory.mktemp("palettized")))


def load_palettized(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model.model.layers[0].self_attn.q_proj, PalettizedLinear)
    return model


def with_lora(model, seed=0, **overrides):
    values = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    values.update(overrides)
    peft_model = peft.get_peft_model(model, lora_config(**values))
    generator = torch.Generator().manual_seed(seed)
    for module in peft_model.modules():  # a trained-looking adapter: B is zero after init
        if isinstance(module, EDKMLoraLinear):
            weight = module.lora_B["default"].weight
            weight.data.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    return peft_model


def packed_state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if "lora_" not in name}


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, EDKMLoraLinear)}


def test_lora_on_a_palettized_base_trains_only_the_adapters_with_trainer(palettized_dir, tmp_path):
    model = load_palettized(palettized_dir)
    peft_model = peft.get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    layers = lora_layers(peft_model)
    assert len(layers) == 2 * len(TARGETS) and all(
        isinstance(m.get_base_layer(), PalettizedLinear) for m in layers.values()
    )
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(trainable) == {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert sum(trainable.values()) == sum(4 * (m.in_features + m.out_features) for m in layers.values())
    before = packed_state(peft_model)
    adapters_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    sequences = [[(i * 7 + j * 3) % 120 + 3 for j in range(16)] for i in range(32)]
    dataset = Dataset.from_dict({"input_ids": sequences, "labels": sequences})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset)
    trainer.train()
    after = packed_state(peft_model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(
        not torch.equal(adapters_before[n], p)
        for n, p in peft_model.named_parameters()
        if p.requires_grad and "lora_B" in n
    )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]


def test_forward_is_the_palettized_output_plus_the_low_rank_update(palettized_dir):
    peft_model = with_lora(load_palettized(palettized_dir))
    layer = lora_layers(peft_model)["base_model.model.model.layers.0.self_attn.q_proj"]
    base = layer.get_base_layer()
    x = torch.randn(3, 5, base.in_features, generator=torch.Generator().manual_seed(1))
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    reference = x.double() @ base.dense_weight(torch.float64).T + (x.double() @ a.T @ b.T) * layer.scaling["default"]
    if base.bias is not None:
        reference = reference + base.bias.double()
    assert torch.allclose(layer(x).double(), reference, atol=1e-5)


def test_decoding_again_in_backward_gives_the_same_gradients_and_keeps_no_dense_weight(palettized_dir):
    peft_model = with_lora(load_palettized(palettized_dir))
    layer = lora_layers(peft_model)["base_model.model.model.layers.1.self_attn.v_proj"]
    dense_shape = (layer.out_features, layer.in_features)
    results = {}
    for decode_in_backward in (True, False):
        layer.decode_in_backward = decode_in_backward
        x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(2), requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = layer(x)
        out.pow(2).sum().backward()
        results[decode_in_backward] = (x.grad.clone(), layer.lora_A["default"].weight.grad.clone(), saved)
        layer.lora_A["default"].weight.grad = None
        layer.lora_B["default"].weight.grad = None
    recomputed, kept = results[True], results[False]
    assert torch.allclose(recomputed[0], kept[0], atol=1e-6) and torch.allclose(recomputed[1], kept[1], atol=1e-6)
    dense_shapes = {dense_shape, dense_shape[::-1]}  # autograd may keep the weight or its transpose
    assert dense_shapes & set(kept[2]) and not dense_shapes & set(recomputed[2])


def test_merge_and_unload_is_refused_with_both_ways_out_and_changes_nothing(palettized_dir):
    peft_model = with_lora(load_palettized(palettized_dir))
    before = packed_state(peft_model)
    with pytest.raises(PalettizedMergeError, match="dequantize") as error:
        peft_model.merge_and_unload()
    assert "merge_and_repalettize" in str(error.value)
    after = packed_state(peft_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(lora_layers(peft_model)) == 2 * len(TARGETS)


def test_dequantize_then_merge_is_exact(palettized_dir):
    peft_model = with_lora(load_palettized(palettized_dir))
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.get_base_model().dequantize()
    merged = peft_model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)


def test_merge_and_repalettize_snaps_w_plus_ba_to_the_lut_and_reports_its_error(palettized_dir, tmp_path):
    peft_model = with_lora(load_palettized(palettized_dir))
    layers = lora_layers(peft_model)
    expected = {}
    for name, layer in layers.items():
        base = layer.get_base_layer()
        delta = (layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()) * layer.scaling[
            "default"
        ]
        expected[name] = (
            (base.dense_weight(torch.float64) + delta).detach(),
            delta.detach(),
            base.weight_lut.clone(),
            base.weight_scale.clone(),
        )
    model, report = merge_and_repalettize(peft_model)
    assert not lora_layers(model) and set(report) == set(layers)
    modules = dict(model.named_modules())
    for name, (target, delta, lut, scale) in expected.items():
        module = modules[name.removeprefix("base_model.model.")]
        assert isinstance(module, PalettizedLinear)
        assert torch.equal(module.weight_lut, lut) and torch.equal(module.weight_scale, scale)  # format unchanged
        stored = module.dense_weight(torch.float64)
        # every weight sits on a nearest LUT entry of W + BA, up to the bf16 rounding (relative 2^-8) of the values
        # the snapping compares, which can flip a near-tie: twice that much slack
        candidates = lut.double()[0][None, None, :] * scale.double()[:, None, None]
        distance = (candidates - target[:, :, None]).abs()
        chosen = (stored - target).abs()
        slack = 2**-7 * target.abs() + 1e-12
        bad = chosen > distance.min(-1).values + slack
        assert not bad.any(), (name, int(bad.sum()))
        error = float((stored - target).norm().detach())
        assert report[name]["error_norm"] == pytest.approx(error, rel=1e-4)
        assert report[name]["delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-4)
        assert 0 < report[name]["error_vs_delta"] == pytest.approx(error / float(delta.norm()), rel=1e-4)
        assert 0 < report[name]["changed_indices"] < 1
    saved = optimum_edkm.save_pretrained(model, str(tmp_path / "merged"))
    reloaded = load_palettized(saved)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_train_time_eDKM_base_gets_the_same_refusals_until_it_is_palettized(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=EDKMConfig(bits=3))
    peft_model = with_lora(model)
    layer = next(iter(lora_layers(peft_model).values()))
    assert isinstance(layer.get_base_layer(), EDKMLinear)
    weight = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(PalettizedMergeError, match="re-clusters"):
        peft_model.merge_and_unload()
    with pytest.raises(PalettizedMergeError, match="palettize"):
        merge_and_repalettize(peft_model)
    assert torch.equal(layer.get_base_layer().weight, weight)
    optimum_edkm.palettize(peft_model.get_base_model())
    assert isinstance(layer.get_base_layer(), PalettizedLinear)
    merged, report = merge_and_repalettize(peft_model)
    assert len(report) == 2 * len(TARGETS) and not lora_layers(merged)


def test_a_saved_adapter_loads_back_with_peft_and_with_load_adapter(palettized_dir, tmp_path):
    peft_model = with_lora(load_palettized(palettized_dir))
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    for reloaded in (
        peft.PeftModel.from_pretrained(load_palettized(palettized_dir), str(tmp_path / "adapter")),
        load_adapter(load_palettized(palettized_dir), str(tmp_path / "adapter")),
    ):
        assert len(lora_layers(reloaded)) == 2 * len(TARGETS)
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, expected)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_peft_s_own_lora_config_trains_a_palettized_base_and_refuses_to_merge(palettized_dir, targets):
    """As a peft user writes it (QLoRA tutorials): from_pretrained, get_peft_model(model, LoraConfig(...)), a few
    optimizer steps; the adapters learn, the packed indices, LUTs and scales do not change, merging is refused."""
    model = AutoModelForCausalLM.from_pretrained(palettized_dir)
    palettized = [n for n, m in model.named_modules() if isinstance(m, PalettizedLinear)]
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    adapted = {n.removeprefix("base_model.model.") for n in lora_layers(peft_model)}
    expected = {n for n in palettized if targets == "all-linear" or n.rsplit(".", 1)[-1] in targets}
    assert adapted == expected and len(expected) == (14 if targets == "all-linear" else 4)
    before = packed_state(peft_model)
    ids = torch.tensor([[(i * 7 + j * 3) % 120 + 3 for j in range(16)] for i in range(8)])
    losses = train_steps(peft_model, ids, steps=6)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    after = packed_state(peft_model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for merge in (peft_model.merge_and_unload, peft_model.merge_adapter):
        with pytest.raises(PalettizedMergeError, match="dequantize"):
            merge()
    assert all(torch.equal(before[k], v) for k, v in packed_state(peft_model).items())


def test_peft_s_own_layers_still_serve_float_models(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer) is peft.tuners.lora.Linear and type(layer.get_base_layer()) is torch.nn.Linear


@pytest.mark.parametrize("option, words", [({"use_dora": True}, "DoRA"), ({"init_lora_weights": "pissa"}, "pissa")])
def test_lora_options_that_need_the_dense_base_weight_are_refused(palettized_dir, option, words):
    with pytest.raises(ValueError, match=words):
        peft.get_peft_model(load_palettized(palettized_dir), lora_config(r=2, target_modules=TARGETS, **option))


def test_layers_lora_does_not_target_decode_in_backward_unless_told_to_keep_the_weight(palettized_dir):
    import copy

    from optimum_edkm.peft import decode_in_backward

    peft_model = with_lora(load_palettized(palettized_dir))
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(6))
    palettized = {id(m): m for m in peft_model.modules() if isinstance(m, PalettizedLinear)}
    dense_shapes = {s for m in palettized.values() for s in (m.dense_shape, m.dense_shape[::-1])}

    def saved_shapes_and_grads():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
        peft_model.zero_grad(set_to_none=True)
        return set(saved), grads, float(loss)

    recomputed, reference, loss = saved_shapes_and_grads()  # default: every layer decodes again
    assert not recomputed & dense_shapes
    assert decode_in_backward(peft_model, enabled=False) == len(palettized)
    kept, grads, same_loss = saved_shapes_and_grads()
    assert kept & dense_shapes
    assert same_loss == pytest.approx(loss, rel=1e-6) and grads.keys() == reference.keys()
    assert all(torch.allclose(grads[n], reference[n], atol=1e-6) for n in grads)
    clone = copy.deepcopy(peft_model)
    layer = next(m for m in clone.modules() if isinstance(m, PalettizedLinear))
    assert layer.forward.__self__ is layer  # bound to the copy, not to the original
    assert decode_in_backward(peft_model) == len(palettized)
    assert not saved_shapes_and_grads()[0] & dense_shapes
