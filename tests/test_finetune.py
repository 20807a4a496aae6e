"""End-to-end fine-tuning: training rows from a token stream and/or given sequences, what trains, the Recipe record."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_edkm import EDKMConfig
from optimum_edkm.finetune import finetune, token_windows, training_rows
from optimum_edkm.nn import is_clustered, is_palettized
from optimum_edkm.pipeline import Recipe


def test_training_rows_mix_windows_and_sequences():
    stream = torch.arange(20)
    windows = token_windows(stream, 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    extra = torch.full((3, 4), 99)
    rows = training_rows(stream, 4, extra, seed=1)
    assert rows.shape == (8, 4) and int((rows == 99).all(1).sum()) == 3
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, torch.cat([windows, extra]).tolist()))
    assert torch.equal(training_rows(None, 4, extra), extra)
    with pytest.raises(ValueError, match="nothing to train on"):
        training_rows(None, 4, None)
    with pytest.raises(ValueError, match="seq_len=4"):
        training_rows(stream, 4, torch.zeros(2, 5, dtype=torch.long))


def test_the_recipe_record_counts_tokens_and_says_what_it_needs():
    assert Recipe(steps=3, batch_size=2, seq_len=8).as_dict()["tokens_seen"] == 48
    assert not Recipe(steps=0, block_epochs=0).needs_teacher  # a post-training start alone keeps no teacher copy
    assert Recipe(steps=0, block_epochs=1).needs_teacher and Recipe(steps=2, distillation_weight=0.5).needs_teacher
    assert not Recipe(steps=2, block_epochs=0, distillation_weight=0.0).needs_teacher
    # teacher text covers its share of the calibration windows and of the training rows (2 rows per window here)
    assert Recipe(calibration_samples=8, teacher_share=0.5, steps=0).teacher_samples == 4
    assert (
        Recipe(
            calibration_samples=8, calibration_seq_len=32, teacher_share=0.5, steps=10, batch_size=4, seq_len=16
        ).teacher_samples
        == 10
    )
    assert Recipe(teacher_share=0.0, steps=10).teacher_samples == 0


def test_finetune_trains_on_teacher_sequences_only_with_distillation(tiny_llama_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    sequences = torch.randint(3, 128, (4, 16))
    trainer = finetune(
        model,
        None,
        EDKMConfig(bits=2),
        output_dir=str(tmp_path),
        steps=2,
        seq_len=16,
        batch_size=2,
        learning_rate=1e-3,
        progress=False,
        teacher_model=teacher,
        sequences=sequences,
        distillation_weight=1.0,
        logging_steps=1,
    )
    assert trainer.state.global_step == 2 and len(trainer.train_dataset) == 4
    assert all(h["loss"] >= 0 for h in trainer.state.log_history if "loss" in h)  # a divergence, not CE


def test_lut_training_keeps_every_assignment_and_trains_the_norms_only_besides(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    from optimum_edkm import prepare

    prepare(model, EDKMConfig(bits=2, granularity="per_grouped_channel", group_size=1))
    indices = {n: m.snap()[0].clone() for n, m in model.named_modules() if is_clustered(m)}
    luts = {n: m.weight_centroids.clone() for n, m in model.named_modules() if is_clustered(m)}
    embedding = model.get_input_embeddings().weight.detach().clone()
    norm = model.model.norm.weight.detach().clone()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    finetune(
        model,
        torch.randint(3, 128, (200,)),
        output_dir=str(tmp_path),
        steps=3,
        seq_len=16,
        batch_size=2,
        learning_rate=1e-2,
        progress=False,
        train="lut",
    )
    palettized = {n: m for n, m in model.named_modules() if is_palettized(m)}
    assert palettized.keys() == indices.keys()
    assert all(torch.equal(m.indices(), indices[n]) for n, m in palettized.items())  # assignments frozen
    assert any(not torch.equal(m.weight_lut.float(), luts[n].half().float()) for n, m in palettized.items())
    # not trained (stored in 16 bits like every float part of a palettized model: EDKMConfig.float_dtype)
    assert torch.equal(model.get_input_embeddings().weight, embedding.to(model.get_input_embeddings().weight.dtype))
    assert not torch.equal(model.model.norm.weight, norm)  # the norms train with the LUTs
    assert all(p.requires_grad == flags[n] for n, p in model.named_parameters())  # flags restored
