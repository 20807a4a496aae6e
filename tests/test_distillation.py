"""Distillation losses against float64 recomputations written out by hand, and teacher text generation: the KV-cache
path against full forwards, determinism, and the on-disk cache."""

import math

import pytest
import torch
from test_trainer import arguments, pattern_dataset
from transformers import AutoModelForCausalLM

from optimum_edkm import EDKMConfig, EDKMTrainer, distillation, losses
from optimum_edkm.distillation import GenerationSettings


def _reference(student, teacher, kind, beta=None):
    """Per-token divergence with explicit float64 sums over the vocabulary."""
    rows = []
    for s_row, t_row in zip(
        student.double().reshape(-1, student.shape[-1]), teacher.double().reshape(-1, teacher.shape[-1])
    ):
        p_s = [math.exp(v) for v in (s_row - torch.logsumexp(s_row, 0)).tolist()]
        p_t = [math.exp(v) for v in (t_row - torch.logsumexp(t_row, 0)).tolist()]
        forward = sum(t * math.log(t / s) for s, t in zip(p_s, p_t))
        reverse = sum(s * math.log(s / t) for s, t in zip(p_s, p_t))
        m = [(s + t) / 2 for s, t in zip(p_s, p_t)]
        jsd = (
            sum(t * math.log(t / mm) for t, mm in zip(p_t, m)) + sum(s * math.log(s / mm) for s, mm in zip(p_s, m))
        ) / 2
        rows.append(
            {
                "forward_kl": forward,
                "reverse_kl": reverse,
                "jsd": jsd,
                "cakld": None if beta is None else beta * reverse + (1 - beta) * forward,
            }[kind]
        )
    return torch.tensor(rows, dtype=torch.float64).view(student.shape[:-1])


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_token_divergence_matches_a_hand_recomputation(kind):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 11) * 2, torch.randn(2, 3, 11) * 2
    got = losses.token_divergence(student, teacher, kind)
    assert torch.allclose(got.double(), _reference(student, teacher, kind), rtol=1e-4, atol=1e-6)
    assert torch.allclose(losses.token_divergence(student, student, kind), torch.zeros(2, 3), atol=1e-6)


def test_cakld_mixes_reverse_and_forward_by_teacher_confidence():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 4, 7), torch.randn(2, 4, 7) * 3
    beta = float(torch.softmax(teacher.double(), -1).amax(-1).mean())
    got = losses.token_divergence(student, teacher, "cakld")
    assert torch.allclose(got.double(), _reference(student, teacher, "cakld", beta=beta), rtol=1e-4, atol=1e-6)
    fixed = losses.token_divergence(student, teacher, "cakld", beta=0.0)
    assert torch.allclose(fixed, losses.token_divergence(student, teacher, "forward_kl"))
    with pytest.raises(ValueError, match="beta"):
        losses.token_divergence(student, teacher, "cakld", beta=1.5)


def test_jsd_is_symmetric_and_bounded():
    torch.manual_seed(2)
    a, b = torch.randn(5, 9) * 10, torch.randn(5, 9) * 10
    ab, ba = losses.token_divergence(a, b, "jsd"), losses.token_divergence(b, a, "jsd")
    assert torch.allclose(ab, ba, atol=1e-6) and bool((ab <= math.log(2) + 1e-6).all())


def test_distillation_term_averages_over_label_positions_with_temperature():
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    labels = torch.tensor([[1, 2, -100, 4, 5], [1, -100, -100, -100, 5]])
    t = 2.0
    per_token = _reference(student / t, teacher / t, "forward_kl")
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 1, 0]], dtype=torch.float64)  # next token is a label
    expected = t * t * (per_token * mask).sum() / mask.sum()
    got = losses.distillation_term(student, teacher, labels, "forward_kl", temperature=t)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    summed = losses.distillation_term(student, teacher, labels, "forward_kl", temperature=t, num_items_in_batch=10)
    assert float(summed) == pytest.approx(float(t * t * (per_token * mask).sum() / 10), rel=1e-5)
    with pytest.raises(ValueError, match="one of"):
        losses.token_divergence(student, teacher, "kl")
    with pytest.raises(ValueError, match="shape"):
        losses.token_divergence(student, teacher[:, :4])


def test_trainer_uses_the_chosen_divergence(tiny_llama_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=EDKMConfig(bits=2))
    args = arguments(tmp_path, distillation_weight=1.0, distillation_loss="reverse_kl")
    trainer = EDKMTrainer(model=model, args=args, train_dataset=pattern_dataset(), teacher_model=teacher)
    ids = torch.tensor(pattern_dataset(count=2)["input_ids"])
    model.train()
    loss, outputs = trainer.compute_loss(model, {"input_ids": ids, "labels": ids}, return_outputs=True)
    loss, student_logits = float(loss.detach()), outputs.logits.detach()
    with torch.no_grad():
        teacher_logits = teacher(ids).logits
    expected = _reference(student_logits[:, :-1], teacher_logits[:, :-1], "reverse_kl").mean()
    assert loss == pytest.approx(float(expected), rel=1e-3)  # float32 log-ratios of a small divergence
    with pytest.raises(ValueError, match="distillation_loss"):
        arguments(tmp_path, distillation_loss="kl")


class _Tokenizer:
    all_special_ids = [0, 1, 2]

    def __len__(self):
        return 128


def test_generation_with_kv_cache_matches_full_forwards(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    greedy = GenerationSettings(sequences=3, seq_len=12, greedy_tokens=(12, 12), batch_size=2, seed=0)
    tokens = distillation.generate_teacher_data(model, _Tokenizer(), greedy)
    assert tokens.shape == (3, 12) and not set(tokens[:, 0].tolist()) & {0, 1, 2}
    with torch.no_grad():
        logits = model(tokens).logits
    logits[..., [0, 1, 2]] = -torch.inf  # special tokens are never chosen
    assert torch.equal(tokens[:, 1:], logits[:, :-1].argmax(-1))  # every token greedy, as recomputed


def test_generation_is_greedy_then_sampled_and_deterministic(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    settings = GenerationSettings(sequences=4, seq_len=16, greedy_tokens=(3, 3), batch_size=4, seed=5)
    tokens = distillation.generate_teacher_data(model, _Tokenizer(), settings)
    assert torch.equal(tokens, distillation.generate_teacher_data(model, _Tokenizer(), settings))
    other = distillation.generate_teacher_data(
        model, _Tokenizer(), GenerationSettings(sequences=4, seq_len=16, greedy_tokens=(3, 3), batch_size=4, seed=6)
    )
    assert not torch.equal(tokens, other)
    with torch.no_grad():
        argmax = model(tokens).logits[:, :-1].argmax(-1)
    assert torch.equal(tokens[:, 1:3], argmax[:, :2])  # positions 1, 2: greedy
    assert not torch.equal(tokens[:, 3:], argmax[:, 2:])  # later: sampled
    assert not set(tokens.flatten().tolist()) & {0, 1, 2}


def test_cached_teacher_data_reads_the_file_back(tiny_llama_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    settings = GenerationSettings(sequences=2, seq_len=8, batch_size=2)
    first = distillation.cached_teacher_data(model, _Tokenizer(), settings, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1 and len(list(tmp_path.glob("*.json"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(distillation, "generate_teacher_data", fail)
    assert torch.equal(distillation.cached_teacher_data(model, _Tokenizer(), settings, cache_dir=tmp_path), first)
    changed = GenerationSettings(sequences=2, seq_len=8, batch_size=2, seed=1)
    assert distillation.teacher_data_key(model, _Tokenizer(), changed) != distillation.teacher_data_key(
        model, _Tokenizer(), settings
    )
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)  # another model, another key
    assert distillation.teacher_data_key(model, _Tokenizer(), settings) != distillation.teacher_data_key(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), _Tokenizer(), settings
    )


def test_the_cache_is_a_prefix_of_one_generation_served_and_continued_exactly(tiny_llama_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    small = GenerationSettings(sequences=2, seq_len=8, batch_size=2, seed=3)
    large = GenerationSettings(sequences=6, seq_len=8, batch_size=2, seed=3)
    # the reference: each generated in one go, independently
    alone_small = distillation.generate_teacher_data(model, _Tokenizer(), small)
    alone_large = distillation.generate_teacher_data(model, _Tokenizer(), large)
    assert torch.equal(alone_large[:2], alone_small)
    # a small request, then a larger one continues the cached stream: the same as the one-go generation
    assert torch.equal(distillation.cached_teacher_data(model, _Tokenizer(), small, cache_dir=tmp_path), alone_small)
    assert torch.equal(distillation.cached_teacher_data(model, _Tokenizer(), large, cache_dir=tmp_path), alone_large)
    calls = []
    original = distillation.teacher_batches
    monkeypatch.setattr(distillation, "teacher_batches", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert torch.equal(distillation.cached_teacher_data(model, _Tokenizer(), small, cache_dir=tmp_path), alone_small)
    assert not calls  # whole batches of a larger file are read, not generated
    # 3 sequences are not whole batches of 2: generated apart, the file is kept as it is
    odd = GenerationSettings(sequences=3, seq_len=8, batch_size=2, seed=3)
    assert distillation.cached_teacher_data(model, _Tokenizer(), odd, cache_dir=tmp_path).shape == (3, 8)
    assert calls and len(list(tmp_path.glob("*.pt"))) == 1
    assert torch.equal(distillation.cached_teacher_data(model, _Tokenizer(), large, cache_dir=tmp_path), alone_large)


def test_generation_settings_and_mixing_validate():
    with pytest.raises(ValueError, match="greedy_tokens"):
        GenerationSettings(greedy_tokens=(4, 2))
    with pytest.raises(ValueError, match="sequences"):
        GenerationSettings(sequences=0)
    a, b = torch.zeros(3, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)
    mixed = distillation.mix_sequences([a, b], seed=0)
    assert mixed.shape == (5, 4) and int(mixed.sum()) == 8
    assert torch.equal(mixed, distillation.mix_sequences([a, b], seed=0))
    with pytest.raises(ValueError, match="same sequence length"):
        distillation.mix_sequences([a, torch.ones(1, 3, dtype=torch.long)])
