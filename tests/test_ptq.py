"""Post-training palettization (GPTQ onto LUTs): exactly palettizable, better than nearest rounding in the layer's
output, nearest rounding when no error can be fed back, least-squares refits against explicit float64 solves."""

import pytest
import torch
from conftest import round_float_parts, tiny_llama_config
from transformers import AutoModelForCausalLM

import optimum_edkm
from optimum_edkm import EDKMConfig
from optimum_edkm.clustering import ClusteringSpec, hard_assign, init_centroids, per_channel_scale
from optimum_edkm.nn import is_clustered, is_palettized
from optimum_edkm.ptq import gptq_lut_round, output_error, palettize_post_training, refit_lut, refit_scale


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config(tie=True)).eval()


def correlated_inputs(tokens, columns, seed=0):
    """Calibration inputs whose features are strongly correlated (where error feedback pays) and of unequal size."""
    generator = torch.Generator().manual_seed(seed)
    rank = max(columns // 4, 1)
    shared = torch.randn(tokens, rank, generator=generator) @ torch.randn(rank, columns, generator=generator)
    own = 0.3 * torch.randn(tokens, columns, generator=generator)
    return (shared + own) * torch.linspace(0.2, 3.0, columns)


def nearest_reference(weight, lut, scale=None, group_size=None):
    """Nearest LUT entry of every weight, recomputed in float64 from the definition: value = bf16(w / scale)
    (fp32 weights are clustered through their bf16 rounding), first entry on ties; returns (indices, decoded)."""
    rows = weight.shape[0]
    values = weight.double()
    if scale is not None:
        values = (weight.float() / scale.float().unsqueeze(1)).double()
    values = values.to(torch.bfloat16).double()
    group = torch.zeros(rows, dtype=torch.long) if group_size is None else torch.arange(rows) // group_size
    table = lut.double()[group]  # [rows, k]
    distance = (values.unsqueeze(-1) - table.unsqueeze(1)).abs()
    indices = distance.argmin(-1)
    decoded = table.gather(1, indices)
    if scale is not None:
        decoded = decoded * scale.to(torch.float16).double().unsqueeze(1)
    return indices, decoded


# --------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(
    "options",
    [
        dict(config=dict(), ptq=dict(refits=0)),
        dict(config=dict(enable_per_channel_scale=True), ptq=dict(refits=2, refit_scales=True)),
        dict(
            config=dict(granularity="per_grouped_channel", group_size=16, enable_per_channel_scale=True),
            ptq=dict(refits=1, importance="obs", act_order=True),
        ),
        dict(config=dict(granularity="per_grouped_channel", group_size=1), ptq=dict(refits=1, importance="none")),
    ],
)
def test_result_is_exactly_what_palettize_stores(options):
    model = tiny_llama()
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    result = palettize_post_training(
        model, ids, EDKMConfig(bits=3, **options["config"]), progress=False, **options["ptq"]
    )
    clustered = {name: m for name, m in model.named_modules() if is_clustered(m)}
    assert set(result.storage) == set(clustered) and len(clustered) == 14
    assert all(d["mismatched"] == 0 for d in result.details.values())
    # the train-time weight eDKM would fine-tune is the decoded palettized weight itself
    trained_weights = {name: m.weight.detach().clone() for name, m in clustered.items()}
    round_float_parts(model)  # palettize stores the float parts (embedding, norms) in float16
    with torch.no_grad():
        before = model(ids).logits
        optimum_edkm.palettize(model)
        after = model(ids).logits
    assert torch.equal(before, after)
    for name, module in model.named_modules():
        if is_palettized(module):
            assert torch.equal(module.dense_weight(torch.float32), trained_weights[name]), name


def test_fine_tuning_can_start_from_the_result():
    model = tiny_llama()
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    palettize_post_training(model, ids, EDKMConfig(bits=2, enable_per_channel_scale=True), progress=False)
    module = model.model.layers[0].mlp.down_proj
    # weights sit on their centroids, so the soft (training) weight is close to the snapped one
    model.train()
    soft = module.clustered_weight().detach()
    model.eval()
    snapped = module.clustered_weight().detach()
    assert (soft - snapped).abs().max() <= 1e-2 * snapped.abs().max()
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert module.weight.grad is not None and torch.isfinite(module.weight.grad).all()


# ------------------------------------------------------------------------------------- one layer, references
@pytest.mark.parametrize("group_size, with_scale", [(None, True), (4, False), (1, True)])
def test_error_feedback_lowers_the_layer_output_error_below_nearest_rounding(group_size, with_scale):
    torch.manual_seed(0)
    rows, columns = 16, 48
    weight = torch.randn(rows, columns) * torch.linspace(0.5, 2.0, rows).unsqueeze(1)
    inputs = correlated_inputs(512, columns)
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]
    spec = ClusteringSpec(bits=3, group_size=group_size)
    scale = per_channel_scale(weight) if with_scale else None
    lut = init_centroids(weight, spec, scale=scale).to(torch.float16)
    _, nearest = nearest_reference(weight, lut, scale, group_size)
    result = gptq_lut_round(weight, hessian, lut, spec, scale, block_size=16)

    def layer_error(dense):  # the layer's output error on the calibration inputs, in float64
        return float((inputs.double() @ (weight.double() - dense.double()).T).pow(2).sum())

    assert layer_error(result.dense) < 0.8 * layer_error(nearest)
    # output_error is 2/N times that squared error
    assert output_error(weight, result.dense, hessian) == pytest.approx(2 * layer_error(result.dense) / 512, rel=1e-4)
    # every rounded weight was snapped to its nearest entry: hard assignment of what was rounded reproduces it
    indices, decoded = nearest_reference(result.rounded_from, lut, scale, group_size)
    assert torch.equal(indices.to(torch.uint8), result.indices)
    assert torch.equal(decoded.float(), result.dense)
    assert torch.equal(hard_assign(result.rounded_from, lut.float(), spec, scale).indices, result.indices)


@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_or_one_column_is_nearest_rounding(act_order):
    torch.manual_seed(1)
    spec = ClusteringSpec(bits=2, group_size=2)
    weight = torch.randn(6, 20)
    scale = per_channel_scale(weight)
    lut = init_centroids(weight, spec, scale=scale).to(torch.float16)
    indices, decoded = nearest_reference(weight, lut, scale, 2)
    # identity Hessian: no correlation between columns, nothing to feed back
    result = gptq_lut_round(weight, torch.eye(20), lut, spec, scale, block_size=7, act_order=act_order)
    assert torch.equal(result.indices, indices.to(torch.uint8))
    assert torch.equal(result.dense, decoded.float())
    # one column: whatever its Hessian, nothing follows it
    column = weight[:, :1]
    column_lut = init_centroids(column, spec).to(torch.float16)
    result = gptq_lut_round(column, torch.tensor([[3.7]]), column_lut, spec, act_order=act_order)
    indices, decoded = nearest_reference(column, column_lut, None, 2)
    assert torch.equal(result.indices, indices.to(torch.uint8))
    assert torch.equal(result.dense, decoded.float())


def explicit_least_squares(weight, hessian, indices, scale, group_size, k):
    """The LUT minimising tr((W - Q) H (W - Q)^T) by an explicit float64 least-squares solve: with H = L L^T the
    objective is ||(W - Q) L||^2 and Q is linear in the entries (one column of the design matrix per entry)."""
    rows = weight.shape[0]
    groups = 1 if group_size is None else rows // group_size
    L = torch.linalg.cholesky(hessian.double())
    s = torch.ones(rows, dtype=torch.float64) if scale is None else scale.double()
    group = torch.zeros(rows, dtype=torch.long) if group_size is None else torch.arange(rows) // group_size
    design = []
    for g in range(groups):
        for a in range(k):
            basis = ((indices.long() == a) & (group.unsqueeze(1) == g)).double() * s.unsqueeze(1)
            design.append((basis @ L).reshape(-1))
    design = torch.stack(design, 1)
    target = (weight.double() @ L).reshape(-1)
    return torch.linalg.lstsq(design, target.unsqueeze(1)).solution.view(groups, k)


@pytest.mark.parametrize("group_size, with_scale", [(None, True), (3, False)])
def test_lut_refit_is_the_least_squares_optimum(group_size, with_scale):
    torch.manual_seed(2)
    rows, columns, k = 6, 10, 4
    weight = torch.randn(rows, columns)
    inputs = correlated_inputs(200, columns, seed=3)
    hessian = 2 * inputs.T @ inputs / 200
    scale = per_channel_scale(weight) if with_scale else None
    indices = torch.arange(rows * columns).view(rows, columns) % k  # every entry used in every group
    indices = indices[torch.randperm(rows)][:, torch.randperm(columns)].to(torch.uint8)
    spec = ClusteringSpec(bits=2, group_size=group_size)
    groups = 1 if group_size is None else rows // group_size
    fitted = refit_lut(weight, hessian, indices, torch.zeros(groups, k), spec, scale)
    expected = explicit_least_squares(weight, hessian, indices, scale, group_size, k)
    assert torch.allclose(fitted, expected, rtol=1e-4, atol=1e-5)


def test_unused_entries_keep_their_value_and_scale_refit_is_per_row_optimum():
    torch.manual_seed(4)
    weight = torch.randn(4, 8)
    inputs = correlated_inputs(100, 8, seed=5)
    hessian = 2 * inputs.T @ inputs / 100
    spec = ClusteringSpec(bits=2)
    indices = (torch.arange(32).view(4, 8) % 3).to(torch.uint8)  # entry 3 unused
    lut = torch.tensor([[-1.0, 0.0, 1.0, 7.0]])
    fitted = refit_lut(weight, hessian, indices, lut, spec)
    assert float(fitted[0, 3]) == pytest.approx(7.0, abs=1e-6)
    scale = torch.full((4,), 0.5)
    new_scale = refit_scale(weight, hessian, indices, lut, spec, scale)
    L = torch.linalg.cholesky(hessian.double())
    for row in range(4):
        u = lut.double()[0][indices[row].long()]
        # one unknown: min_s ||(w - s u) L||^2
        design, target = (u @ L).unsqueeze(1), (weight[row].double() @ L).unsqueeze(1)
        expected = torch.linalg.lstsq(design, target).solution.item()
        if expected > 0:
            assert float(new_scale[row]) == pytest.approx(expected, rel=1e-6)
        else:
            assert float(new_scale[row]) == 0.5


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_any_change():
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 16))
    with pytest.raises(ValueError, match="not prepared for eDKM"):
        palettize_post_training(model, ids)
    with pytest.raises(ValueError, match="needs fisher"):
        palettize_post_training(model, ids, EDKMConfig(bits=3), importance="fisher")
    with pytest.raises(ValueError, match="importance must be one of"):
        palettize_post_training(model, ids, importance="gradient")
    with pytest.raises(ValueError, match="calibration input_ids"):
        palettize_post_training(model, ids[0], EDKMConfig(bits=3))
    assert not any(is_clustered(m) for m in model.modules())  # nothing was prepared
    optimum_edkm.prepare(model, EDKMConfig(bits=3))
    optimum_edkm.palettize(model)
    with pytest.raises(ValueError, match="palettized already"):
        palettize_post_training(model, ids)
    spec = ClusteringSpec(bits=2)
    with pytest.raises(ValueError, match="LUT has shape"):
        gptq_lut_round(torch.randn(4, 4), torch.eye(4), torch.zeros(2, 4), spec)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_lut_round(torch.randn(4, 4), torch.eye(3), torch.zeros(1, 4), spec)
    with pytest.raises(ValueError, match="damp must be"):
        gptq_lut_round(torch.randn(4, 4), torch.eye(4), torch.zeros(1, 4), spec, damp=0)
