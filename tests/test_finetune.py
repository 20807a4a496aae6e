"""The fine-tuning recipe: training rows from a token stream and/or given sequences, and the Recipe record."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_edkm import EDKMConfig
from optimum_edkm.finetune import DEFAULT_RECIPE, Recipe, finetune, token_windows, training_rows


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


def test_recipe_arguments_follow_the_distillation_weight():
    assert (
        "distillation_weight" not in dataclasses.replace(DEFAULT_RECIPE, distillation_weight=0.0).finetune_arguments()
    )
    kd = Recipe(distillation_weight=1.0, distillation_loss="jsd").finetune_arguments()
    assert kd["distillation_loss"] == "jsd" and kd["steps"] == DEFAULT_RECIPE.steps
    assert Recipe(steps=3, batch_size=2, seq_len=8).as_dict()["tokens_seen"] == 48
    assert Recipe(teacher_sequences=0).teacher_text(None, None) is None  # no model needed without teacher text


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
