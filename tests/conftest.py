"""Shared fixtures: tiny transformers models built from configs (nothing is downloaded)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path_factory, monkeypatch):
    """optimum-edkm's cache (built-in texts, text sampled from test models) lives in the session's temporary
    folder, never in the user's."""
    monkeypatch.setenv("OPTIMUM_EDKM_CACHE", str(tmp_path_factory.getbasetemp() / "optimum-edkm-cache"))


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Test tensors are tiny: on a busy 2-core machine, OpenMP threads waiting for a core made single tests take
    25 s instead of 0.2 s. Tests that measure multi-process behaviour start their own processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: the fields of a tiny Llama-style decoder (most transformers configs take them)
TINY_DECODER = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_llama_config(tie: bool = True, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_DECODER, "tie_word_embeddings": tie, **overrides})


def train_steps(model, input_ids, steps: int, lr: float = 1e-2) -> list:
    """``steps`` AdamW steps of the causal-LM loss on ``input_ids`` over the trainable parameters; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def tiny_gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)


def save_float_model(config, directory, seed=0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_float_model(tiny_llama_config(tie=True), str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_llama_untied_dir(tmp_path_factory):
    return save_float_model(tiny_llama_config(tie=False), str(tmp_path_factory.mktemp("tiny-llama-untied")))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return save_float_model(tiny_gpt2_config(), str(tmp_path_factory.mktemp("tiny-gpt2")))


@pytest.fixture
def input_ids():
    return torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def round_float_parts(model, dtype=torch.float16):
    """Round the float parts of a model about to be palettized to the values palettize stores them as
    (``EDKMConfig.float_dtype``, float16 by default), so that its float32 logits are the reference the palettized
    model must reproduce exactly."""
    from optimum_edkm.nn.stored16 import float_part_keys

    tensors = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key in float_part_keys(model, dtype):
            tensors[key].copy_(tensors[key].to(dtype))
