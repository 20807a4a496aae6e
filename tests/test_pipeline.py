"""``optimum_edkm.compress``: the main job as one call, against the same stages run by hand; block-wise
reconstruction and LUT tuning against their definitions; bad input refused before any work."""

import copy

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM

import optimum_edkm
from optimum_edkm import EDKMConfig
from optimum_edkm.calibration import decoder_layers
from optimum_edkm.nn import is_clustered, is_palettized
from optimum_edkm.pipeline import DEFAULT_RECIPE, CompressionData, Recipe, calibration_rows, compress, recipe_with
from optimum_edkm.ptq import palettize_post_training
from optimum_edkm.reconstruction import ReconstructionOptions, frozen_assignments, reconstruct_blocks

PER_CHANNEL = dict(bits=3, granularity="per_grouped_channel", group_size=1)


class Tokenizer:
    all_special_ids = [0, 1, 2]

    def __len__(self):
        return 128


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config(tie=True)).eval()


def data(evaluation=True, tokens=600):
    stream = torch.randint(3, 128, (tokens,), generator=torch.Generator().manual_seed(7))
    held_out = {"a": torch.randint(3, 128, (96,), generator=torch.Generator().manual_seed(8))} if evaluation else {}
    return CompressionData(train_ids=stream, tokenizer=Tokenizer(), evaluation=held_out, context_length=32)


def packed(model) -> dict:
    return {n: (m.weight.clone(), m.weight_lut.clone()) for n, m in model.named_modules() if is_palettized(m)}


def test_the_post_training_job_equals_its_stages_run_by_hand(tmp_path):
    recipe = Recipe(calibration_samples=4, calibration_seq_len=32, teacher_share=0.5, refits=1)
    given = data()
    given.cache_dir = str(tmp_path)
    model = tiny_llama()
    report = compress(model, EDKMConfig(**PER_CHANNEL), recipe, given, progress=False)
    assert [row.label for row in report.rows] == ["float model", "post-training start, 3-bit"]
    assert set(report.stages) == {"float model and teacher text", "start", "palettize and measure"}
    assert report.stages["float model and teacher text"]["teacher_sequences"] == 2

    # by hand: the same calibration rows (2 of teacher text, 2 windows of the text), GPTQ onto LUTs, palettize
    from optimum_edkm.distillation import GenerationSettings, cached_teacher_data

    teacher_text = cached_teacher_data(tiny_llama(), Tokenizer(), GenerationSettings(32, 32, seed=0), str(tmp_path))
    rows = calibration_rows(given, teacher_text[:2], recipe)
    assert rows.shape == (4, 32) and {tuple(r) for r in teacher_text[:2].tolist()} <= {tuple(r) for r in rows.tolist()}
    by_hand = tiny_llama()
    palettize_post_training(
        by_hand, rows, EDKMConfig(**PER_CHANNEL), refits=1, act_order=True, batch_size=4, progress=False
    )
    optimum_edkm.palettize(by_hand)
    expected, got = packed(by_hand), packed(model)
    assert expected.keys() == got.keys() and got
    for name in expected:
        assert torch.equal(got[name][0], expected[name][0]) and torch.equal(got[name][1], expected[name][1]), name
    float_ppl = optimum_edkm.evaluation.evaluate_perplexity(tiny_llama(), given.evaluation["a"], 32, progress=False)
    assert report.rows[0].perplexity["a"] == pytest.approx(float_ppl.perplexity)
    assert report.ratios()["a"] == pytest.approx(report.rows[1].perplexity["a"] / float_ppl.perplexity)
    assert report.size["bits_per_clustered_weight"] > 3 and "| float model |" in report.table()


def test_training_stages_run_in_order_and_a_given_start_is_kept(tmp_path):
    source = tiny_llama()
    recipe0 = Recipe(calibration_samples=4, calibration_seq_len=32, teacher_share=0.0)
    compress(source, EDKMConfig(**PER_CHANNEL), recipe0, data(evaluation=False), progress=False)
    palettes = optimum_edkm.palettes_of(source)

    recipe = Recipe(
        calibration_samples=4,
        calibration_seq_len=32,
        teacher_share=0.5,
        block_epochs=1,
        block_learning_rate=1e-3,
        steps=2,
        batch_size=2,
        seq_len=16,
        learning_rate=1e-3,
        e2e_train="lut",
    )
    given = data()
    given.cache_dir = str(tmp_path)
    model = tiny_llama()
    report = compress(model, EDKMConfig(**PER_CHANNEL), recipe, given, palettes=palettes, progress=False)
    assert [row.label for row in report.rows] == ["float model", "given start, 3-bit", "trained, 3-bit"]
    assert list(report.stages) == [
        "float model and teacher text",
        "start",
        "block-wise reconstruction",
        "end-to-end distillation",
        "palettize and measure",
    ]
    assert report.stages["start"]["kind"] == "given palettes"
    assert report.stages["end-to-end distillation"]["steps"] == 2
    assert all(is_palettized(m) or not is_clustered(m) for m in model.modules())
    # the given start was really where training began: the start row is the given model's perplexity (up to
    # the 16-bit rounding of the float parts, which palettize applies to ``source`` and not yet to the start row)
    start_ppl = optimum_edkm.evaluation.evaluate_perplexity(source, given.evaluation["a"], 32, progress=False)
    assert report.rows[1].perplexity["a"] == pytest.approx(start_ppl.perplexity, rel=1e-4)


def test_frozen_assignments_train_only_the_lut_and_write_it_back_exactly():
    model = optimum_edkm.prepare(tiny_llama(), EDKMConfig(**PER_CHANNEL))
    module = model.get_submodule("model.layers.0.mlp.up_proj")
    indices_before = module.snap()[0].clone()
    weight_before = module.weight.detach().clone()
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    with frozen_assignments([module]) as luts:
        lut = luts[module]
        dense = lut[torch.arange(lut.shape[0])].gather(1, indices_before.long())
        assert torch.equal(module.clustered_weight(), dense)  # the definition: lut[row, index]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert module.weight.grad is None and lut.grad is not None and lut.grad.abs().sum() > 0
        with torch.no_grad():
            lut.add_(1e-3 * torch.sign(lut.grad))
        trained = lut.detach().clone()
    model.eval()
    assert torch.equal(module.snap()[0], indices_before)  # every weight kept its entry
    assert torch.equal(module.weight_centroids, trained.to(torch.float16).float())
    assert not torch.equal(module.weight, weight_before)  # weights now sit on the trained entries
    assert not hasattr(module, "frozen_assignment")


def reconstruction_case():
    """(float teacher, its 2-bit k-means clustered copy, calibration ids) for block-wise reconstruction."""
    teacher = tiny_llama()
    model = optimum_edkm.prepare(copy.deepcopy(teacher), EDKMConfig(**{**PER_CHANNEL, "bits": 2}))
    return teacher, model, torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def test_block_wise_reconstruction_lowers_each_layers_error_against_the_float_layer():
    teacher, model, ids = reconstruction_case()
    for train in ("edkm", "lut"):
        trial = copy.deepcopy(model)
        history = reconstruct_blocks(
            trial, teacher, ids, ReconstructionOptions(epochs=4, learning_rate=3e-3, train=train), progress=False
        )
        assert len(history) == len(decoder_layers(teacher))
        # the error is recomputed independently here for the first layer: float layer vs the trained layer
        assert history[0]["error_after"] < history[0]["error_before"], train
        assert all(h["error_after"] <= h["error_before"] for h in history), train


def test_a_layer_that_training_makes_worse_is_put_back_exactly():
    teacher, model, ids = reconstruction_case()
    for train in ("edkm", "lut"):
        trial = copy.deepcopy(model)
        start = optimum_edkm.palettes_of(trial)
        state = {k: v.clone() for k, v in trial.state_dict().items()}
        # a learning rate far too high: every layer ends worse than it started and must be restored
        options = ReconstructionOptions(epochs=2, learning_rate=10.0, train=train)
        history = reconstruct_blocks(trial, teacher, ids, options, progress=False)
        assert not any(h["trained_kept"] for h in history), train
        assert all(h["error_after"] == h["error_before"] for h in history), train
        after = optimum_edkm.palettes_of(trial)
        assert all(torch.equal(after[n].indices(), start[n].indices()) for n in start), train
        assert all(torch.equal(after[n].lut, start[n].lut) for n in start), train
        assert all(torch.equal(v, state[k]) for k, v in trial.state_dict().items()), train


def test_bad_input_is_refused_before_any_work():
    model = tiny_llama()
    untouched = copy.deepcopy(model.state_dict())
    short = CompressionData(train_ids=torch.randint(3, 128, (20,)), tokenizer=Tokenizer())
    with pytest.raises(ValueError, match="fewer than one window of 32"):
        compress(model, EDKMConfig(**PER_CHANNEL), Recipe(calibration_seq_len=32), short, progress=False)
    beyond = data()
    beyond.evaluation = {"a": torch.tensor([5, 6, 500])}
    with pytest.raises(ValueError, match="500"):
        compress(model, EDKMConfig(**PER_CHANNEL), Recipe(calibration_seq_len=32), beyond, progress=False)
    assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items())
    assert not any(is_clustered(m) for m in model.modules())
    with pytest.raises(ValueError, match="Recipe.start"):
        Recipe(start="gptq")
    with pytest.raises(ValueError, match="Recipe.teacher_share"):
        Recipe(teacher_share=1.5)
    with pytest.raises(ValueError, match="compress needs data"):
        compress(model, EDKMConfig(**PER_CHANNEL))


def test_recipe_with_changes_given_fields_and_steps_zero_alone_means_no_training():
    base = Recipe(block_epochs=2, steps=5, learning_rate=3e-5)
    assert recipe_with({"steps": None, "learning_rate": 1e-4}, base) == Recipe(
        block_epochs=2, steps=5, learning_rate=1e-4
    )
    untrained = recipe_with({"steps": 0}, base)
    assert (untrained.steps, untrained.block_epochs) == (0, 0) and not untrained.needs_teacher
    assert recipe_with({"steps": 0, "block_epochs": 1}, base).block_epochs == 1
    assert recipe_with({}) == DEFAULT_RECIPE
    with pytest.raises(ValueError, match="Recipe.block_train"):
        recipe_with({"block_train": "weights"}, base)
