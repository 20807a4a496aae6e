"""Where eDKM starts: ``prepare(model, config, palettes=...)`` continues from a given palettization (a post-training
result, a palettized model) and gives it back exactly before any training step; ``importance=`` weights the
k-means (run once); names that match no clustered module are refused before anything changes."""

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM

import optimum_edkm
from optimum_edkm import EDKMConfig, Palette, palettes_of, prepare
from optimum_edkm.clustering import ClusteringSpec, init_centroids
from optimum_edkm.nn import EDKMLinear, is_clustered, is_palettized
from optimum_edkm.ptq import palettize_post_training

CONFIGS = [
    dict(granularity="per_grouped_channel", group_size=1),
    dict(enable_per_channel_scale=True),
    dict(granularity="per_grouped_channel", group_size=16, enable_per_channel_scale=True),
]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config(tie=True)).eval()


def packed_state(model) -> dict:
    return {
        name: (
            module.weight.clone(),
            module.weight_lut.clone(),
            None if module.weight_scale is None else module.weight_scale.clone(),
        )
        for name, module in model.named_modules()
        if is_palettized(module)
    }


@pytest.mark.parametrize("options", CONFIGS)
def test_zero_steps_from_a_post_training_model_give_it_back_exactly(options):
    config = EDKMConfig(bits=3, **options)
    calibration = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    post = tiny_llama()
    palettize_post_training(post, calibration, config, refits=1, progress=False)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    expected_logits = post(input_ids=ids).logits  # the train-time model in eval mode computes the snapped weights
    optimum_edkm.palettize(post)
    expected = packed_state(post)

    fresh = prepare(tiny_llama(), EDKMConfig(bits=3, **options), palettes=palettes_of(post))
    assert torch.equal(fresh(input_ids=ids).logits, expected_logits)
    optimum_edkm.palettize(fresh)
    got = packed_state(fresh)
    assert got.keys() == expected.keys() and got
    for name, (packed, lut, scale) in expected.items():
        assert torch.equal(got[name][0], packed), name
        assert torch.equal(got[name][1], lut), name
        assert (scale is None and got[name][2] is None) or torch.equal(got[name][2], scale), name


def test_start_from_a_train_time_model_and_lut_only_palettes():
    config = EDKMConfig(bits=2, granularity="per_grouped_channel", group_size=1)
    source = prepare(tiny_llama(), config)
    palettes = palettes_of(source)
    name = "model.layers.0.mlp.down_proj"
    assert (
        isinstance(palettes[name], Palette) and palettes[name].indices.shape == source.get_submodule(name).weight.shape
    )
    # LUT only: the weights keep their float values and snap to the nearest entry of the given LUT
    lut_only = {n: Palette(p.lut) for n, p in palettes.items()}
    target = prepare(
        tiny_llama(), EDKMConfig(bits=2, granularity="per_grouped_channel", group_size=1), palettes=lut_only
    )
    module, reference = target.get_submodule(name), source.get_submodule(name)
    assert torch.equal(module.weight, reference.weight)  # same float weights (same seed), not overwritten
    assert torch.equal(module.weight_centroids, reference.weight_centroids.to(torch.float16).float())
    assert torch.equal(module.snap()[0], reference.snap()[0])


def test_importance_weights_a_single_k_means_and_bad_names_are_refused_before_any_change(monkeypatch):
    config = EDKMConfig(bits=2, enable_per_channel_scale=True)
    name = "model.layers.1.self_attn.q_proj"
    model = tiny_llama()
    weight = model.get_submodule(name).weight.detach().clone()
    importance = {name: torch.rand(weight.shape, generator=torch.Generator().manual_seed(3))}
    calls = []
    original = EDKMLinear.init_clusters

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("sample_weight") is not None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EDKMLinear, "init_clusters", counting)
    prepare(model, config, importance=importance)
    clustered = [m for m in model.modules() if isinstance(m, EDKMLinear)]
    assert len(calls) == len(clustered) and sum(calls) == 1  # one k-means per module, one of them weighted
    module = model.get_submodule(name)
    expected = init_centroids(
        weight, module.spec, scale=module.weight_scale, seed=config.seed, sample_weight=importance[name]
    )
    assert torch.equal(module.weight_centroids, expected)

    untouched = tiny_llama()
    with pytest.raises(ValueError, match="not clustered with this EDKMConfig: model.layers.1.self_attn.qproj"):
        prepare(untouched, config, importance={"model.layers.1.self_attn.qproj": importance[name]})
    assert not any(is_clustered(m) for m in untouched.modules())  # refused before any module was swapped


def test_a_palette_that_does_not_fit_the_module_is_refused_by_name():
    config = EDKMConfig(bits=3, granularity="per_grouped_channel", group_size=1)
    name = "model.layers.0.self_attn.o_proj"
    rows = tiny_llama().get_submodule(name).weight.shape[0]
    with pytest.raises(ValueError, match=rf"{name}.weight' has a LUT of shape \(1, 8\), expected .*\({rows}, 8\)"):
        prepare(tiny_llama(), config, palettes={name: Palette(torch.zeros(1, 8))})
    with pytest.raises(ValueError, match="has a per-channel scale but the module is configured without one"):
        prepare(tiny_llama(), config, palettes={name: Palette(torch.zeros(rows, 8), scale=torch.ones(rows))})
    spec = ClusteringSpec(bits=3, group_size=1)
    lut = init_centroids(tiny_llama().get_submodule(name).weight, spec)
    bad = torch.full(tiny_llama().get_submodule(name).weight.shape, 8)
    with pytest.raises(ValueError, match="indices outside 0..7"):
        prepare(tiny_llama(), config, palettes={name: Palette(lut, bad)})
