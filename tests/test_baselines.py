"""RTN, GPTQ and AWQ against hand-computed cases, an explicit slow re-computation and each other."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_edkm.baselines import (
    awq,
    fake_quantize,
    gptq,
    gptq_quantize_weight,
    minmax_params,
    quantize_groupwise,
    rtn,
)
from optimum_edkm.baselines.awq import search_clip
from optimum_edkm.calibration import capture_layer_calls, sequential_groups
from optimum_edkm.evaluation import WeightStorage, effective_bits

ROW = [-0.2, 0.0, 0.4, 0.9]


# ---------------------------------------------------------------------------------------------------------------
# RTN: the min-max grid of GPTQ's quant.py, worked out by hand


@pytest.mark.parametrize(
    "bits, group_size, symmetric, expected",
    [
        # asym, one group: xmin=-0.2, xmax=0.9, scale=1.1/3, zero=round(0.2/scale)=1; codes 0,1,2,3
        (2, None, False, [-1.1 / 3, 0.0, 1.1 / 3, 2.2 / 3]),
        # sym: xmax=0.9, scale=1.8/3=0.6, zero=2; 0.9/0.6=1.5 -> 2 -> code 4 clamps to 3
        (2, None, True, [0.0, 0.0, 0.6, 0.6]),
        # groups of 2: [-0.2, 0] has range [-0.2, 0] (scale 0.2/3, zero 3); [0.4, 0.9] has range [0, 0.9]
        (2, 2, False, [-0.2, 0.0, 0.3, 0.9]),
        # groups of 3, the last group short: [-0.2, 0, 0.4] -> scale 0.2, zero 1 (exact); [0.9] -> exact
        (2, 3, False, [-0.2, 0.0, 0.4, 0.9]),
    ],
)
def test_rtn_matches_hand_computed_grid(bits, group_size, symmetric, expected):
    weight = torch.tensor([ROW], dtype=torch.float64)
    result = quantize_groupwise(weight, bits, group_size, symmetric)
    assert torch.allclose(result[0], torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_symmetric_grid_has_one_more_negative_level():
    # codes 0..3 around zero point 2 are the levels -2, -1, 0, 1 times scale 0.6: -0.9/0.6 = -1.5 -> -2
    weight = torch.tensor([[0.2, 0.0, -0.4, -0.9]], dtype=torch.float64)
    expected = torch.tensor([[0.0, 0.0, -0.6, -1.2]], dtype=torch.float64)
    assert torch.allclose(quantize_groupwise(weight, 2, None, True), expected, atol=1e-12)


def test_rtn_all_zero_group_stays_zero_and_bad_arguments_are_rejected():
    weight = torch.zeros(2, 4)
    assert torch.equal(quantize_groupwise(weight, 3, 2, False), weight)
    with pytest.raises(ValueError, match="bits"):
        quantize_groupwise(weight, 0, 2, False)
    with pytest.raises(ValueError, match="group_size"):
        quantize_groupwise(weight, 3, 0, False)


# ---------------------------------------------------------------------------------------------------------------
# GPTQ on one matrix against the textbook column-by-column update with an explicitly inverted Hessian


def slow_gptq(weight, hessian, bits, group_size, symmetric, damp, act_order):
    """Quantize columns one at a time; after each, update the remaining columns with the exact inverse of the
    Hessian restricted to the not-yet-quantized columns (re-inverted every step, float64)."""
    W = weight.double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    columns = W.shape[1]
    order = torch.argsort(torch.diag(H), descending=True).tolist() if act_order else list(range(columns))
    Q = torch.zeros_like(W)
    for step, column in enumerate(order):
        if step == 0 and group_size is None:
            params = minmax_params(W, bits, symmetric)
        elif group_size is not None and step % group_size == 0:  # from the weights as updated so far
            params = minmax_params(W[:, order[step : step + group_size]], bits, symmetric)
        q = fake_quantize(W[:, [column]], params)[:, 0]
        remaining = order[step:]
        inverse = torch.linalg.inv(H[remaining][:, remaining])
        W[:, remaining] -= torch.outer((W[:, column] - q) / inverse[0, 0], inverse[0])
        Q[:, column] = q
    return Q


def correlated_inputs(tokens, columns, seed, outliers=()):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5 + torch.eye(columns)
    x = torch.randn(tokens, columns, generator=generator) @ mixing
    for channel in outliers:
        x[:, channel] *= 10
    return x


@pytest.mark.parametrize(
    "group_size, block_size, act_order",
    [(None, 128, False), (4, 128, False), (6, 4, False), (5, 3, True), (None, 7, True)],
)
def test_gptq_equals_explicit_column_by_column_update(group_size, block_size, act_order):
    rows, columns = 6, 20
    x = correlated_inputs(200, columns, seed=1).double()
    x[:, 3] = 0  # a dead input
    hessian = 2 * x.T @ x / x.shape[0]
    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = slow_gptq(weight, hessian, 3, group_size, False, 0.01, act_order)
    result = gptq_quantize_weight(weight, hessian, 3, group_size, False, block_size, 0.01, act_order)
    assert result.weight.dtype == torch.float64
    assert torch.allclose(result.weight, expected, atol=1e-9), (result.weight - expected).abs().max()
    assert torch.all(result.weight[:, 3] == 0)


def test_gptq_lowers_layer_output_error_below_rtn():
    x = correlated_inputs(512, 64, seed=3, outliers=(5, 40))
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(4)) * 0.02
    hessian = 2 * x.T @ x / x.shape[0]
    gptq_weight = gptq_quantize_weight(weight, hessian, 3, 16).weight
    rtn_weight = quantize_groupwise(weight, 3, 16, False)

    def output_error(quantized):
        return float(((x @ (weight - quantized).T) ** 2).mean())

    assert output_error(gptq_weight) < 0.8 * output_error(rtn_weight)
    assert_on_grid(gptq_weight, 3, 16)


def test_gptq_rejects_a_hessian_of_the_wrong_shape():
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize_weight(torch.randn(4, 8), torch.eye(7), 3)


# ---------------------------------------------------------------------------------------------------------------
# the model-level drivers on a tiny Llama with outlier channels


def tiny_llama(kv_heads=2, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [3, 17, 50]] *= 20  # outlier channels in every activation
    return model


def tokens(samples, length, seed):
    return torch.randint(0, 256, (samples, length), generator=torch.Generator().manual_seed(seed))


def assert_on_grid(weight, bits, group_size):
    """Every row-group holds at most 2**bits distinct values."""
    for group in weight.split(group_size, dim=1):
        for row in group:
            assert row.unique().numel() <= 2**bits


@torch.no_grad()
def output_error(model, reference, ids):
    return float(
        ((model.model(input_ids=ids).last_hidden_state - reference.model(input_ids=ids).last_hidden_state) ** 2).mean()
    )


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_gptq_and_awq_beat_rtn_on_a_tiny_models_reconstruction(kv_heads):
    reference = tiny_llama(kv_heads)
    calibration, held_out = tokens(16, 32, seed=1), tokens(8, 32, seed=2)
    errors, reports = {}, {}
    for name, method in {
        "rtn": lambda m: rtn(m, 3, 32),
        "gptq": lambda m: gptq(m, calibration, 3, 32, batch_size=4, progress=False),
        "awq": lambda m: awq(m, calibration, 3, 32, batch_size=4, progress=False),
    }.items():
        model = copy.deepcopy(reference)
        reports[name] = method(model)
        errors[name] = output_error(model, reference, held_out)
        linears = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        for linear in linears:
            assert_on_grid(linear.weight, 3, 32)
        assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
        assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
        assert len(reports[name].storage) == len(linears) == 14
    assert errors["gptq"] < 0.8 * errors["rtn"], errors
    assert errors["awq"] < 0.8 * errors["rtn"], errors
    awq_groups = reports["awq"].details["alpha"]
    assert any(key.endswith("self_attn.v_proj") for key in awq_groups) == (kv_heads == 4)  # v->o only without GQA
    bits = effective_bits(model, reports["awq"].storage)
    assert bits.linears == pytest.approx(3 + 32 / 32)  # fp16 scale + fp16 zero per 32 weights


def test_awq_with_only_alpha_zero_and_no_clipping_is_rtn():
    reference = tiny_llama()
    by_awq, by_rtn = copy.deepcopy(reference), copy.deepcopy(reference)
    awq(by_awq, tokens(4, 16, seed=1), 3, 32, n_grid=1, clip=False, progress=False)
    rtn(by_rtn, 3, 32)
    for (name, a), b in zip(by_awq.named_parameters(), by_rtn.parameters()):
        assert torch.allclose(a, b, atol=1e-7), name


def test_awq_clip_search_never_increases_any_groups_output_error():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    weight[:, 7] *= 8  # a few large weights make clipping worthwhile
    x = correlated_inputs(256, 64, seed=6)
    max_val = search_clip(weight, x, 3, 32, False)
    clipped = torch.maximum(torch.minimum(weight.view(16, 2, 32), max_val), -max_val).view(16, 64)

    def error(w):  # AWQ's objective: each group's own contribution to the outputs, per row
        difference = weight - quantize_groupwise(w, 3, 32, False)
        return torch.stack([((x[:, g] @ difference[:, g].T) ** 2).mean(0) for g in (slice(0, 32), slice(32, 64))])

    assert torch.all(error(clipped) <= error(weight) + 1e-6)
    assert torch.any(max_val < weight.view(16, 2, 32).abs().amax(-1, keepdim=True))


def test_true_sequential_groups_follow_execution_order():
    model = tiny_llama()
    call = capture_layer_calls(model, tokens(1, 8, seed=0), batch_size=1)[0][0]
    groups = sequential_groups(model.model.layers[0], call)
    assert [sorted(g) for g in groups] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_act_order_with_groups_pays_for_its_group_index():
    model = tiny_llama()
    report = gptq(model, tokens(4, 16, seed=1), 3, 32, act_order=True, progress=False)
    storage = report.storage["model.layers.0.mlp.down_proj"]
    plain = WeightStorage.uniform((64, 128), 3, 32, False)
    assert storage.total_bits == plain.total_bits + 128 * 32


def test_drivers_reject_models_without_decoder_layers_and_bad_calibration():
    with pytest.raises(ValueError, match="model.model.layers"):
        gptq(torch.nn.Linear(4, 4), tokens(2, 4, seed=0), 3)
    with pytest.raises(ValueError, match="n_samples, seq_len"):
        awq(tiny_llama(), torch.randn(2, 4), 3)
