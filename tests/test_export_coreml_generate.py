"""Core ML generation export (optimum_edkm.export.to_coreml_generate) and palettized tied embeddings.

What Linux can check: the torch graph that is converted (eager wrapper and its trace) generates exactly
``model.generate``'s greedy tokens; the package's states, flexible inputs, outputs and LUT ops, read back with
coremltools' spec parser and with the project's MIL reader; the weights bit for bit. Running the package needs
macOS: that test is skipped elsewhere.
"""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import save_float_model, tiny_gpt2_config, tiny_llama_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import optimum_edkm
from optimum_edkm import EDKMConfig, palettize

needs_coremltools = pytest.mark.skipif(
    importlib.util.find_spec("coremltools") is None,
    reason='coremltools is not installed (pip install "optimum-edkm[coreml]")',
)
CONTEXT = 32
LLAMA_LINEARS = 14


@pytest.fixture(scope="module")
def ct():
    return pytest.importorskip(
        "coremltools", reason='coremltools is not installed (pip install "optimum-edkm[coreml]")'
    )


@pytest.fixture(scope="session")
def wide_llama_dir(tmp_path_factory):
    """A tiny Llama whose random weights are large enough for greedy decoding to pick varied tokens (with the
    default 0.02 init every step picks the same token, and a token-for-token comparison would prove little)."""
    return save_float_model(
        tiny_llama_config(tie=True, initializer_range=0.25), str(tmp_path_factory.mktemp("wide-llama"))
    )


@pytest.fixture(scope="session")
def wide_untied_llama_dir(tmp_path_factory):
    return save_float_model(
        tiny_llama_config(tie=False, initializer_range=0.25), str(tmp_path_factory.mktemp("wide-llama-untied"))
    )


def palettized(directory, **options):
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=EDKMConfig(**options))
    return palettize(model).eval()


PROMPT = np.array([5, 17, 99, 42, 7])


# ------------------------------------------------------------------------------------ the torch graph
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_stateful_wrapper_and_its_trace_generate_the_greedy_tokens_of_generate(tmp_path, kind):
    from optimum_edkm.export.common import export_copy
    from optimum_edkm.export.stateful import (
        StatefulCausalLM,
        greedy_generate,
        reference_generate,
        reset_cache,
        torch_step,
    )

    config = tiny_llama_config(initializer_range=0.25) if kind == "llama" else tiny_gpt2_config()
    if kind == "gpt2":
        config.initializer_range = 0.5
    directory = save_float_model(config, str(tmp_path / kind))
    model = palettized(directory, bits=4)
    expected = reference_generate(model, PROMPT, 24)
    assert len(expected) == 24 and len(set(expected)) >= 4  # varied tokens: the comparison means something

    wrapper = StatefulCausalLM(export_copy(model), CONTEXT).eval()
    example = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1, 2, 5))
    traced = torch.jit.trace(wrapper, example, strict=False)
    reset_cache(traced)
    for module in (wrapper, traced):
        assert greedy_generate(torch_step(module), PROMPT, 24, CONTEXT) == expected
        # twice on the same module: a new sequence starts from an empty cache
        assert greedy_generate(torch_step(module), PROMPT[:3], 6, CONTEXT) == reference_generate(model, PROMPT[:3], 6)
    # the cache is really used: decode steps feed one token, yet match a full forward over the whole sequence
    sequence = torch.tensor([list(PROMPT) + expected])
    with torch.no_grad():
        full = model(sequence).logits[0, len(PROMPT) - 1 : -1].argmax(-1).tolist()
    assert full == expected


def test_causal_mask_and_the_greedy_loop_refuse_what_does_not_fit():
    from optimum_edkm.export import causal_mask, greedy_generate

    mask = causal_mask(2, 3)
    assert mask.shape == (1, 1, 3, 5) and mask.dtype == np.float16
    assert np.array_equal(np.isfinite(mask[0, 0]), np.tril(np.ones((3, 5), dtype=bool), k=2))
    with pytest.raises(ValueError, match="exceed the package's context length 8"):
        greedy_generate(lambda ids, m: np.zeros((1, 1, 4)), [1, 2, 3, 4, 5], 5, 8)


# ---------------------------------------------------------------------------------------- the package
_EXPORTS = {}


def _generate_export(tmp_path_factory, key, model, **options):
    from optimum_edkm.export import to_coreml_generate

    if key not in _EXPORTS:
        path = str(tmp_path_factory.mktemp("coreml-generate") / "model.mlpackage")
        _EXPORTS[key] = (model, to_coreml_generate(model, path, context_length=CONTEXT, **options))
    return _EXPORTS[key]


@needs_coremltools
def test_generation_package_has_kv_states_flexible_inputs_and_lut_ops(ct, wide_llama_dir, tmp_path_factory):
    from optimum_edkm.export import verify_coreml
    from optimum_edkm.export.mil import MilPackage
    from optimum_edkm.export.stateful import reference_generate

    model = palettized(wide_llama_dir, bits=3, granularity="per_grouped_channel", group_size=8)
    model, result = _generate_export(tmp_path_factory, "llama-3bit", model, check_tokens=12)
    # the converted graph's tokens were checked before conversion; recompute the reference independently
    assert result.greedy_tokens == reference_generate(
        model, _default_prompt(model), 12, eos_token_id=model.config.eos_token_id
    )
    assert len(set(result.greedy_tokens)) >= 3

    # read back with coremltools' own spec parser
    spec = ct.models.MLModel(result.path, skip_model_load=True).get_spec()
    assert spec.specificationVersion == 9
    description = spec.description
    states = {s.name: s.type.stateType.arrayType for s in description.state}
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    expected_shape = [config.num_hidden_layers, 1, config.num_key_value_heads, CONTEXT, head_dim]
    assert set(states) == {"key_cache", "value_cache"}
    assert all(list(a.shape) == expected_shape and a.dataType == a.FLOAT16 for a in states.values())
    inputs = {i.name: i.type.multiArrayType for i in description.input}
    assert set(inputs) == {"input_ids", "causal_mask"}
    assert [(r.lowerBound, r.upperBound) for r in inputs["input_ids"].shapeRange.sizeRanges] == [(1, 1), (1, CONTEXT)]
    assert [(r.lowerBound, r.upperBound) for r in inputs["causal_mask"].shapeRange.sizeRanges] == [
        (1, 1),
        (1, 1),
        (1, CONTEXT),
        (1, CONTEXT),
    ]
    assert inputs["input_ids"].dataType == inputs["input_ids"].INT32
    assert inputs["causal_mask"].dataType == inputs["causal_mask"].FLOAT16
    (output,) = description.output
    assert output.name == "logits" and list(output.type.multiArrayType.shape) == [1, 1, config.vocab_size]
    assert description.metadata.userDefined["optimum_edkm.context_length"] == str(CONTEXT)

    # and with the project's MIL reader: state reads and writes, LUT ops feeding the linears
    package = MilPackage(result.path)
    counts = package.op_counts()
    assert counts["constexpr_lut_to_dense"] == LLAMA_LINEARS and counts["write_state"] == 2 * config.num_hidden_layers
    assert {name: (i.kind, i.shape) for name, i in package.inputs.items()} == {
        "input_ids": ("tensor", (1, None)),
        "causal_mask": ("tensor", (1, 1, None, None)),
        "key_cache": ("state", tuple(expected_shape)),
        "value_cache": ("state", tuple(expected_shape)),
    }
    report = verify_coreml(result.path, model)
    assert not report.failures and report.interface == "generate" and report.manifest_checked
    assert all(m.indices_dtype == "uint3" and m.consumers == ["linear.weight"] for m in report.modules)
    assert report.decoders_agree and report.index_bytes == report.nbit_index_bytes
    assert report.tied_embedding == {
        "keys": ["model.embed_tokens.weight", "lm_head.weight"],
        "palettized": False,
        "stored": 1,
    }
    with open(result.manifest_path) as handle:
        manifest = json.load(handle)["coreml"]
    assert manifest["kv_cache"] is True and manifest["context_length"] == CONTEXT
    assert [s["shape"] for s in manifest["states"]] == [expected_shape, expected_shape]


def _default_prompt(model):
    from optimum_edkm.export.common import reference_input_ids

    return reference_input_ids(model.config.vocab_size, 1, 4).numpy()


@needs_coremltools
def test_a_graph_that_does_not_generate_like_generate_is_refused_before_conversion(
    ct, wide_llama_dir, tmp_path, monkeypatch
):
    from optimum_edkm.export import CoreMLExportError, to_coreml_generate
    from optimum_edkm.export.stateful import _SliceLayer

    model = palettized(wide_llama_dir, bits=4)
    original = _SliceLayer.update

    def read_before_write(self, key_states, value_states, *args, **kwargs):  # attends to stale cache entries
        keys = self.owner.key_cache[self.layer_idx, :, :, : self.end].clone()
        values = self.owner.value_cache[self.layer_idx, :, :, : self.end].clone()
        original(self, key_states, value_states)
        return keys, values

    monkeypatch.setattr(_SliceLayer, "update", read_before_write)
    monkeypatch.setattr(ct, "convert", lambda *a, **k: pytest.fail("conversion started"))
    with pytest.raises(CoreMLExportError, match=r"the torch wrapper does not generate model.generate's greedy tokens"):
        to_coreml_generate(model, str(tmp_path / "g.mlpackage"), context_length=CONTEXT)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(minimum_deployment_target="iOS17"), r"has no stateful models .* minimum_deployment_target='iOS18'"),
        (dict(context_length=65), r"context_length=65 exceeds the model's max_position_embeddings=64"),
        (dict(context_length=8), r"context_length=8 leaves no room for the 8-token generation check"),
    ],
    ids=["iOS17", "too_long", "too_short"],
)
def test_generation_requests_that_cannot_work_are_refused_before_any_work(
    wide_llama_dir, tmp_path, monkeypatch, kwargs, message
):
    from optimum_edkm.export import CoreMLExportError, coreml, to_coreml_generate

    model = palettized(wide_llama_dir, bits=4)
    monkeypatch.setattr(coreml, "import_coremltools", lambda: pytest.fail("started before the checks"))
    with pytest.raises(CoreMLExportError, match=message):
        to_coreml_generate(model, str(tmp_path / "g.mlpackage"), **kwargs)
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------- palettized embedding
@needs_coremltools
def test_palettized_tied_embedding_is_one_lut_op_read_by_gather_and_lm_head(ct, wide_llama_dir, tmp_path_factory):
    from optimum_edkm.export import verify_coreml
    from optimum_edkm.export.common import palette_records

    model = palettized(wide_llama_dir, bits=3, embedding_bits=4)  # tied: the head reads the embedding's palette
    records = palette_records(model)
    assert records["lm_head"].tied_to == ("model.embed_tokens",)
    model, result = _generate_export(tmp_path_factory, "tied-4bit-embedding", model)
    report = result.verification
    assert not report.failures
    assert result.op_counts["constexpr_lut_to_dense"] == LLAMA_LINEARS + 1  # one op for both uses
    by_name = {m.name: m for m in report.modules}
    embedding, head = by_name["model.embed_tokens"], by_name["lm_head"]
    assert embedding.lut_op == head.lut_op and embedding.indices_dtype == "uint4"
    assert embedding.consumers == head.consumers == ["gather.x", "linear.weight"]
    assert report.tied_embedding == {
        "keys": ["model.embed_tokens.weight", "lm_head.weight"],
        "palettized": True,
        "stored": 1,
    }
    assert "lm_head.weight" not in report.float_tensors_in_package
    # stored once at n bits: indices of 14 projections at 3 bits + the 128 x 32 embedding at 4 bits
    linear_numel = sum(r.numel for name, r in records.items() if name not in ("lm_head", "model.embed_tokens"))
    assert report.index_bytes == linear_numel * 3 // 8 + 128 * 32 * 4 // 8
    assert report.logits_max_abs_diff <= report.logits_tolerance
    exported = load_file(result.tensors_path)
    assert "model.embed_tokens.weight" in exported and not any(k.startswith("lm_head") for k in exported)
    with open(result.manifest_path) as handle:
        entries = {e["name"]: e for e in json.load(handle)["modules"]}
    assert entries["lm_head"]["shares_storage_with"] == ["model.embed_tokens"]
    assert entries["lm_head"]["tensors"]["indices"]["name"] == "model.embed_tokens.weight"
    assert verify_coreml(result.path, model, check_logits=False).tied_embedding["palettized"]

    # the fixed-window export shares the same path: one LUT op for both uses there too
    from optimum_edkm.export import to_coreml

    window = to_coreml(
        model, str(tmp_path_factory.mktemp("tied-window") / "w.mlpackage"), seq_len=8, check_logits=False
    ).verification
    assert not window.failures and window.lut_ops == LLAMA_LINEARS + 1
    assert {m.name: m.consumers for m in window.modules}["lm_head"] == ["gather.x", "linear.weight"]


# ------------------------------------------------------------------------------------------------- CLI
@needs_coremltools
def test_cli_generate_exports_and_verifies_a_saved_model(ct, wide_llama_dir, tmp_path, capsys):
    from optimum_edkm.commands.cli import coreml_main as main

    saved = str(tmp_path / "saved")
    optimum_edkm.save_pretrained(palettized(wide_llama_dir, bits=4), saved)
    out = str(tmp_path / "out" / "gen.mlpackage")
    assert main([saved, out, "--generate", "--context-length", str(CONTEXT)]) == 0
    printed = capsys.readouterr().out
    assert "stateful generation step, context 32" in printed and "FAILED" not in printed
    assert "greedy tokens of the converted torch graph = model.generate's" in printed
    assert main(["verify", out, "--model", saved]) == 0
    assert "4 write_state ops: one slice_update of key_cache and of value_cache per layer" in capsys.readouterr().out
    assert main([saved, str(tmp_path / "x.mlpackage"), "--generate", "--target", "iOS17"]) == 2
    assert "has no stateful models" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ macOS
@needs_coremltools
@pytest.mark.skipif(sys.platform != "darwin", reason="running a Core ML package needs macOS (Core ML runtime)")
def test_core_ml_generation_matches_the_torch_wrapper_on_macos(ct, wide_llama_dir, tmp_path_factory):
    from optimum_edkm.export import generate_with_package
    from optimum_edkm.export.common import export_copy
    from optimum_edkm.export.predict import package_step
    from optimum_edkm.export.stateful import StatefulCausalLM, causal_mask, torch_step

    model = palettized(wide_llama_dir, bits=3, granularity="per_grouped_channel", group_size=8)
    model, result = _generate_export(tmp_path_factory, "llama-3bit", model, check_tokens=12)
    mlmodel = ct.models.MLModel(result.path)
    tokens = generate_with_package(mlmodel, PROMPT, 12)
    # teacher-forced on the torch tokens, step by step: Core ML (fp16) logits close to the torch wrapper's
    wrapper = StatefulCausalLM(export_copy(model), CONTEXT).eval()
    theirs, ours = package_step(mlmodel, mlmodel.make_state()), torch_step(wrapper)
    pending, past = list(PROMPT), 0
    for token in tokens:
        ids = np.asarray([pending], dtype=np.int32)
        mask = causal_mask(past, len(pending))
        reference, logits = ours(ids, mask), theirs(ids, mask)
        assert np.abs(logits - reference).max() <= 2e-2 * max(1.0, np.abs(reference).max())
        past, pending = past + len(pending), [token]
