"""Core ML export (optimum_edkm.export): LUT ops, bit-exact weights, logits, sizes, targets, guards, CLI.

Conversions take a few seconds each, so every configuration is converted once (``_export``) and all its
checks run on that one package. Running a package needs macOS: that test is skipped elsewhere.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import optimum_edkm
from optimum_edkm import EDKMConfig, palettize


def _coremltools_installed() -> bool:
    try:
        return importlib.util.find_spec("coremltools") is not None
    except (ImportError, ValueError):
        return False


HAVE_COREMLTOOLS = _coremltools_installed()  # cheap: the real import happens in the ``ct`` fixture
needs_coremltools = pytest.mark.skipif(
    not HAVE_COREMLTOOLS, reason='coremltools is not installed (pip install "optimum-edkm[coreml]")'
)

SEQ_LEN = 8
LLAMA_LINEARS = 14  # 7 projections x 2 layers of the tiny Llama
MATRIX = [(bits, group) for bits in (2, 3, 4) for group in (None, 8)]


@pytest.fixture(scope="module")
def ct():
    return pytest.importorskip(
        "coremltools", reason='coremltools is not installed (pip install "optimum-edkm[coreml]")'
    )


def palettized(directory, bits, group_size=None, scale=False, embedding_bits=None, randomize_norms=True):
    config = EDKMConfig(
        bits=bits,
        granularity="per_grouped_channel" if group_size else "per_tensor",
        group_size=group_size,
        enable_per_channel_scale=scale,
        embedding_bits=embedding_bits,
    )
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config)
    palettize(model)
    if randomize_norms:  # norms of ones would be folded away by the converter, leaving nothing to check
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


_EXPORTS = {}


def _export(tmp_path_factory, directory, key, **options):
    """Convert each configuration once per session; returns (model, CoreMLExport)."""
    from optimum_edkm.export import to_coreml

    if key not in _EXPORTS:
        model_options = {k: options.pop(k) for k in ("bits", "group_size", "scale", "embedding_bits") if k in options}
        model = palettized(directory, **model_options)
        path = str(tmp_path_factory.mktemp("coreml") / "model.mlpackage")
        _EXPORTS[key] = (model, to_coreml(model, path, seq_len=SEQ_LEN, **options))
    return _EXPORTS[key]


def package_indices_blob(path, lut_op):
    """(data offset, byte count) of the indices of ``lut_op`` in weight.bin."""
    from optimum_edkm.export.mil import MilPackage

    package = MilPackage(path)
    tensor = package.param(package.by_output[lut_op], "indices")
    return os.path.join(package.model_dir, "weights", "weight.bin"), tensor.blob.data_offset, tensor.blob.size


# ---------------------------------------------------------------------------------------------- layering
def test_importing_the_package_and_the_export_module_does_not_import_coremltools():
    script = (
        "import sys, optimum_edkm, optimum_edkm.export, optimum_edkm.export.cli; print('coremltools' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_missing_coremltools_names_the_install_command(tiny_llama_dir, tmp_path, monkeypatch):
    from optimum_edkm.export import to_coreml

    model = palettized(tiny_llama_dir, bits=4, randomize_norms=False)
    monkeypatch.setitem(sys.modules, "coremltools", None)  # makes `import coremltools` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "optimum-edkm\[coreml\]"'):
        to_coreml(model, str(tmp_path / "m.mlpackage"), seq_len=SEQ_LEN)
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------ export matrix
@needs_coremltools
@pytest.mark.parametrize(
    "bits,group_size", MATRIX, ids=[f"{b}bit-{'grouped' if g else 'per_tensor'}" for b, g in MATRIX]
)
def test_export_is_lut_ops_with_bit_exact_weights_logits_and_nbit_size(
    ct, tiny_llama_dir, tmp_path_factory, bits, group_size
):
    from optimum_edkm.export import verify_coreml
    from optimum_edkm.export.mil import MilPackage

    model, result = _export(
        tmp_path_factory, tiny_llama_dir, ("llama", bits, group_size), bits=bits, group_size=group_size
    )
    groups = {name: m.weight_lut.shape[0] for name, m in model.named_modules() if hasattr(m, "weight_lut")}
    assert len(groups) == LLAMA_LINEARS

    # structure, read back from disk by coremltools' own spec parser
    spec = ct.models.MLModel(result.path, skip_model_load=True).get_spec()
    assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion == 9
    assert result.op_counts["constexpr_lut_to_dense"] == LLAMA_LINEARS
    assert result.op_counts["linear"] == LLAMA_LINEARS + 1  # + the float (tied) lm_head
    assert "constexpr_blockwise_shift_scale" not in result.op_counts

    # a fresh verification of the saved files, with the manifest
    report = verify_coreml(result.path, model)
    assert not report.failures and report.manifest_checked and report.decoders_agree
    for module in report.modules:
        assert module.indices_dtype == f"uint{bits}"
        assert module.lut_shape == (groups[module.name], 1, 2**bits, 1)
        assert module.consumers == ["linear.weight"] and module.equivalent_indices == 0
    assert report.tied_embedding == {
        "keys": ["model.embed_tokens.weight", "lm_head.weight"],
        "palettized": False,
        "stored": 1,
    }
    assert report.logits_max_abs_diff <= report.logits_tolerance

    # sizes: indices at exactly n bits, LUT payload = torch's, the rest is fp16 tensors + converter constants
    numel = sum(m.out_channels * m.in_channels for m in model.modules() if hasattr(m, "weight_lut"))
    assert report.index_bytes == numel * bits // 8
    assert report.palettized_payload_bytes == report.nbit_payload_bytes
    assert report.weight_bin_bytes <= (
        report.nbit_reference_bytes + report.converter_bytes + 128 * report.blob_count + 64
    )
    fp16_bytes = 2 * (numel + sum(p.numel() for p in model.parameters()))
    assert report.weight_bin_bytes < 0.75 * fp16_bytes

    # the package really holds these bits: decode the first module's indices from weight.bin ourselves
    first = report.modules[0]
    weight_bin, offset, size = package_indices_blob(result.path, first.lut_op)
    with open(weight_bin, "rb") as handle:
        handle.seek(offset)
        raw = np.frombuffer(handle.read(size), dtype=np.uint8)
    module = model.get_submodule(first.name)
    assert size == module.weight.numel() and np.array_equal(raw, module.weight.numpy())  # same packed stream
    assert MilPackage(result.path).spec_version == 9


@needs_coremltools
def test_untied_8bit_embedding_and_per_channel_scale(ct, tiny_llama_untied_dir, tmp_path_factory):
    model, result = _export(
        tmp_path_factory,
        tiny_llama_untied_dir,
        ("untied", 3, 8, "scale"),
        bits=3,
        group_size=8,
        scale=True,
        embedding_bits=8,
    )
    report = result.verification
    assert not report.failures and report.tied_embedding is None
    assert result.op_counts["constexpr_lut_to_dense"] == LLAMA_LINEARS + 1
    assert result.op_counts["constexpr_blockwise_shift_scale"] == LLAMA_LINEARS + 1
    by_name = {m.name: m for m in report.modules}
    embedding = by_name["model.embed_tokens"]
    assert embedding.kind == "embedding" and embedding.consumers == ["gather.x"]
    assert embedding.indices_dtype == "uint8" and embedding.scale_op is not None
    # iOS18 folds the per-channel scale into a LUT tiled per output row; values are checked row by row
    q_proj = by_name["model.layers.0.self_attn.q_proj"]
    assert q_proj.lut_shape == (32, 1, 8, 1) and q_proj.layout.startswith("per-row LUT")
    assert report.palettized_payload_bytes > report.nbit_payload_bytes  # the documented cost of the tiling
    assert "lm_head.weight" in report.float_tensors_in_package
    assert report.logits_max_abs_diff <= report.logits_tolerance


@needs_coremltools
def test_ios16_per_tensor_export_and_torch_export_capture(ct, tiny_llama_dir, tmp_path_factory):
    model, result = _export(
        tmp_path_factory, tiny_llama_dir, ("ios16", 4), bits=4, minimum_deployment_target="iOS16", capture="export"
    )
    report = result.verification
    assert not report.failures and result.spec_version == 7 and result.target == "iOS16"
    assert result.op_counts["constexpr_lut_to_dense"] == LLAMA_LINEARS
    assert all(m.indices_dtype == "uint8" and m.lut_shape == (16,) for m in report.modules)
    assert report.index_bytes == report.nbit_index_bytes
    assert report.decoders_agree and report.logits_max_abs_diff <= report.logits_tolerance


@needs_coremltools
def test_gpt2_conv1d_layers_export_exactly(ct, tiny_gpt2_dir, tmp_path_factory):
    model, result = _export(tmp_path_factory, tiny_gpt2_dir, ("gpt2", 4, 16), bits=4, group_size=16)
    report = result.verification
    from optimum_edkm.export.common import palette_records

    conv1d = [name for name, record in palette_records(model).items() if record.from_conv1d]
    assert len(conv1d) == 8 and not report.failures
    assert result.op_counts["constexpr_lut_to_dense"] == 8
    assert all(m.consumers == ["linear.weight"] and m.indices_dtype == "uint4" for m in report.modules)
    assert report.tied_embedding["stored"] == 1
    assert report.logits_max_abs_diff <= report.logits_tolerance


# -------------------------------------------------------------------------------------------- manifest
@needs_coremltools
def test_manifest_and_tensors_file_match_the_saved_checkpoint(ct, tiny_llama_dir, tmp_path_factory, tmp_path):
    model, result = _export(tmp_path_factory, tiny_llama_dir, ("llama", 3, 8), bits=3, group_size=8)
    with open(result.manifest_path) as handle:
        manifest = json.load(handle)
    assert manifest["format"] == "optimum-edkm.palettized" and manifest["format_version"] == 1
    assert manifest["created_by"]["optimum_edkm"] == optimum_edkm.__version__
    assert manifest["quantization_config"]["bits"] == 3 and manifest["model_config"]["vocab_size"] == 128
    assert manifest["coreml"]["minimum_deployment_target"] == "iOS18"
    assert manifest["coreml"]["inputs"] == [{"name": "input_ids", "dtype": "int32", "shape": [1, SEQ_LEN]}]
    assert len(manifest["modules"]) == LLAMA_LINEARS

    optimum_edkm.save_pretrained(model, str(tmp_path / "saved"))
    checkpoint = load_file(str(tmp_path / "saved" / "model.safetensors"))
    exported = load_file(result.tensors_path)
    from optimum_edkm.export.manifest import tensor_sha256

    for entry in manifest["modules"]:
        assert entry["bits"] == 3 and entry["granularity"] == "per_grouped_channel" and entry["group_size"] == 8
        assert entry["lut_shape"] == [entry["out_channels"] // 8, 8]
        assert entry["coreml"]["indices_dtype"] == "uint3"
        assert set(entry["tensors"]) == {"indices", "lut"}
        for description in entry["tensors"].values():
            assert tensor_sha256(checkpoint[description["name"]]) == description["sha256"]
            assert torch.equal(exported[description["name"]], checkpoint[description["name"]])

    spec = ct.models.MLModel(result.path, skip_model_load=True).get_spec()
    metadata = dict(spec.description.metadata.userDefined)
    assert metadata["optimum_edkm.version"] == optimum_edkm.__version__
    assert json.loads(metadata["optimum_edkm.quantization_config"])["group_size"] == 8
    assert json.loads(metadata["optimum_edkm.model_config"])["hidden_size"] == 32


# ---------------------------------------------------------------------------------- targets and guards
@pytest.mark.parametrize(
    "options,message",
    [
        (dict(bits=3), r"'model.layers.0.self_attn.q_proj': 3-bit indices"),
        (dict(bits=4, group_size=8), r"grouped LUTs"),
        (dict(bits=4, scale=True), r"a per-channel scale"),
    ],
    ids=["3bit", "grouped", "per_channel_scale"],
)
def test_ios16_refuses_what_it_cannot_store_before_any_work(tiny_llama_dir, tmp_path, monkeypatch, options, message):
    from optimum_edkm.export import CoreMLExportError, coreml, to_coreml

    model = palettized(tiny_llama_dir, randomize_norms=False, **options)

    def no_work(*args, **kwargs):
        raise AssertionError("the export started before the target was checked")

    monkeypatch.setattr(coreml, "export_copy", no_work)
    monkeypatch.setattr(coreml, "import_coremltools", no_work)
    with pytest.raises(
        CoreMLExportError,
        match=rf"minimum_deployment_target=iOS16 cannot store 14 .*{message}.*"
        r"minimum_deployment_target='iOS18'",
    ):
        to_coreml(model, str(tmp_path / "m.mlpackage"), minimum_deployment_target="iOS16")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(minimum_deployment_target="iOS15"), "LUT ops exist from iOS16"),
        (dict(seq_len=65), "exceeds the model's max_position_embeddings=64"),
        (dict(seq_len=0), "seq_len must be a positive integer"),
        (dict(capture="onnx"), "capture must be one of"),
    ],
    ids=["iOS15", "seq_len_too_long", "seq_len_zero", "unknown_capture"],
)
def test_bad_requests_are_refused_with_the_fix(tiny_llama_dir, tmp_path, kwargs, message):
    from optimum_edkm.export import CoreMLExportError, to_coreml

    model = palettized(tiny_llama_dir, bits=4, randomize_norms=False)
    with pytest.raises(CoreMLExportError, match=message):
        to_coreml(model, str(tmp_path / "m.mlpackage"), **kwargs)
    with pytest.raises(CoreMLExportError, match=r"must name an .mlpackage"):
        to_coreml(model, str(tmp_path / "m.coreml"))
    with pytest.raises(CoreMLExportError, match=r"call optimum_edkm.palettize\(model\)"):
        to_coreml(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(tmp_path / "m.mlpackage"))


def test_float32_lut_values_off_the_fp16_grid_are_refused(tiny_llama_dir, tmp_path):
    from optimum_edkm.export import ExactnessError, to_coreml

    model = palettized(tiny_llama_dir, bits=4, randomize_norms=False)
    module = model.model.layers[1].mlp.down_proj
    module.weight_lut = module.weight_lut.float() + 1e-6  # an fp32 LUT that fp16 would round
    with pytest.raises(
        ExactnessError,
        match=r"'model.layers.1.mlp.down_proj.weight_lut' holds values that float16 "
        r"cannot represent exactly",
    ):
        to_coreml(model, str(tmp_path / "m.mlpackage"))


@needs_coremltools
def test_toolchain_and_graph_problems_are_refused_before_conversion(ct, tiny_llama_dir, tmp_path, monkeypatch):
    from optimum_edkm.export import CoreMLExportError, FixedLengthLogits, to_coreml

    model = palettized(tiny_llama_dir, bits=4, randomize_norms=False)
    monkeypatch.setattr(ct, "convert", lambda *a, **k: pytest.fail("conversion started"))
    with monkeypatch.context() as patch:
        patch.setattr(np, "__version__", "2.4.0")
        patch.setattr(ct, "__version__", "9.0")
        with pytest.raises(CoreMLExportError, match=r'numpy<2.4 .* or pass capture="export"'):
            to_coreml(model, str(tmp_path / "m.mlpackage"), seq_len=SEQ_LEN)

    def bidirectional(self, input_ids):  # a model that would ignore the causal mask
        return self.lm(
            input_ids=input_ids,
            attention_mask=torch.zeros_like(self.mask),
            position_ids=self.position_ids,
            use_cache=False,
            return_dict=False,
        )[0]

    monkeypatch.setattr(FixedLengthLogits, "forward", bidirectional)
    with pytest.raises(CoreMLExportError, match=r"does not reproduce model\(input_ids\).logits"):
        to_coreml(model, str(tmp_path / "m.mlpackage"), seq_len=SEQ_LEN)
    assert not os.listdir(tmp_path)


@needs_coremltools
def test_a_weight_off_its_lut_is_caught_before_conversion(ct, tiny_llama_dir, tmp_path, monkeypatch):
    from optimum_edkm.export import ExactnessError, to_coreml

    model = palettized(tiny_llama_dir, bits=3, group_size=8, randomize_norms=False)
    module = model.model.layers[0].mlp.up_proj
    dense = module.dense_weight(torch.float32).clone()
    dense[5, 7] = torch.nextafter(dense[5, 7], torch.tensor(1.0))  # one ulp off its LUT entry
    monkeypatch.setattr(module, "dense_weight", lambda dtype=None: dense.to(dtype or torch.float32))
    monkeypatch.setattr(ct, "convert", lambda *a, **k: pytest.fail("converted a weight that is off its LUT"))
    with pytest.raises(
        ExactnessError,
        match=r"'model.layers.0.mlp.up_proj.weight' is not exactly on its LUT: 1 of "
        r"2048 .* first at \[5, 7\]",
    ):
        to_coreml(model, str(tmp_path / "m.mlpackage"), seq_len=SEQ_LEN)
    assert not os.listdir(tmp_path)


@needs_coremltools
def test_verifier_catches_a_tampered_index_in_weight_bin(ct, tiny_llama_dir, tmp_path_factory, tmp_path):
    from optimum_edkm.export import VerificationError, verify_coreml

    model, result = _export(tmp_path_factory, tiny_llama_dir, ("llama", 4, None), bits=4)
    tampered = str(tmp_path / "tampered.mlpackage")
    shutil.copytree(result.path, tampered)
    target = next(m for m in result.verification.modules if m.name == "model.layers.1.self_attn.v_proj")
    weight_bin, offset, _ = package_indices_blob(tampered, target.lut_op)
    module = model.get_submodule(target.name)
    lut = module.weight_lut[0]
    first = int(module.indices()[0, 0])
    other = next(i for i in range(16) if lut[i] != lut[first])  # an index with a different value
    with open(weight_bin, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([(byte & 0xF0) | other]))  # element 0 = low nibble of byte 0
    with pytest.raises(VerificationError) as caught:
        verify_coreml(tampered, model, manifest=None)
    failures = "\n".join(caught.value.failures)
    assert "'model.layers.1.self_attn.v_proj.weight': 1 of 512 decoded weights differ" in failures
    assert "first at [0, 0]" in failures and "the converter re-approximated it" in failures
    report = verify_coreml(result.path, model, manifest=None, check_logits=False)  # the original still passes
    assert not report.failures


@needs_coremltools
def test_a_module_exported_dense_is_reported_as_missing_its_lut_op(ct, tiny_llama_dir, tmp_path, monkeypatch):
    from optimum_edkm.export import VerificationError, common, to_coreml

    model = palettized(tiny_llama_dir, bits=2, randomize_norms=False)
    original = common.float_module

    def without_compression_info(record, weight=None):
        plain = original(record, weight)
        if record.name == "model.layers.0.self_attn.o_proj":
            for key in [k for k in plain._buffers if k.startswith("_COREML_")]:
                del plain._buffers[key]
        return plain

    monkeypatch.setattr(common, "float_module", without_compression_info)
    with pytest.raises(VerificationError) as caught:
        to_coreml(model, str(tmp_path / "m.mlpackage"), seq_len=SEQ_LEN, check_logits=False)
    failures = "\n".join(caught.value.failures)
    assert (
        "1 palettized module(s) have no LUT op (stored dense or dropped): model.layers.0.self_attn.o_proj"
    ) in failures
    assert "13 constexpr_lut_to_dense ops for 14 palettized modules" in failures
    assert "a dense copy?" in failures
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == []  # nothing put in place


@needs_coremltools
def test_duplicate_lut_entries_are_exported_exactly_and_counted(ct, tiny_llama_dir, tmp_path):
    from optimum_edkm.export import to_coreml

    model = palettized(tiny_llama_dir, bits=2, randomize_norms=False)
    module = model.model.layers[0].mlp.gate_proj
    with torch.no_grad():
        module.weight_lut[0, 2] = module.weight_lut[0, 1]  # entries 1 and 2 now hold the same value
    chosen = int((module.indices() == 2).sum())
    assert chosen > 0
    result = to_coreml(model, str(tmp_path / "m.mlpackage"), seq_len=SEQ_LEN, check_logits=False)
    entry = next(m for m in result.verification.modules if m.name == "model.layers.0.mlp.gate_proj")
    # the converter picks the first nearest entry: other indices, identical weights
    assert entry.equivalent_indices == chosen and not result.verification.failures


# ------------------------------------------------------------------------------------------------- CLI
@needs_coremltools
def test_cli_exports_a_saved_palettized_model_and_verifies_it(ct, tiny_llama_dir, tmp_path, capsys):
    from optimum_edkm.commands.cli import coreml_main as main

    model = palettized(tiny_llama_dir, bits=4, group_size=16)
    saved = str(tmp_path / "saved")
    optimum_edkm.save_pretrained(model, saved)
    out = str(tmp_path / "out" / "tiny.mlpackage")
    assert main([saved, out, "--seq-len", str(SEQ_LEN), "--target", "ios18"]) == 0
    printed = capsys.readouterr().out
    assert "14 LUT ops for 14 palettized modules" in printed and "FAILED" not in printed
    assert sorted(os.listdir(tmp_path / "out")) == [
        "tiny.manifest.json",
        "tiny.mlpackage",
        "tiny.palettized.safetensors",
    ]
    assert main(["verify", out, "--model", saved]) == 0
    assert "manifest tiny.manifest.json: modules, tensor sha256 and op names match" in capsys.readouterr().out
    assert main([saved, out, "--seq-len", str(SEQ_LEN)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([saved, out, "--seq-len", str(SEQ_LEN), "--overwrite", "--no-tensors", "--no-logits-check"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["tiny.manifest.json", "tiny.mlpackage"]  # stale file removed
    with open(tmp_path / "out" / "tiny.manifest.json") as handle:
        assert json.load(handle)["tensors_file"] is None
    assert main(["verify", out, "--model", saved, "--no-logits-check"]) == 0
    assert main([saved, str(tmp_path / "x.mlpackage"), "--target", "iOS16"]) == 2
    assert "grouped LUTs" in capsys.readouterr().err
    # a malformed package or manifest is not "verification failed" (1): its own exit code, no traceback
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "out", damaged)
    manifest = damaged / "tiny.manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    assert main(["verify", str(damaged / "tiny.mlpackage"), "--model", saved, "--no-logits-check"]) == 3
    error = capsys.readouterr().err
    assert "malformed manifest" in error and "JSONDecodeError" in error and "Traceback" not in error
    for blob in (damaged / "tiny.mlpackage").rglob("weight.bin"):
        blob.unlink()
    assert main(["verify", str(damaged / "tiny.mlpackage"), "--model", saved, "--manifest", "none"]) == 3
    error = capsys.readouterr().err
    assert "malformed package" in error and "weight.bin" in error


# ------------------------------------------------------------------------------------------------ macOS
@needs_coremltools
@pytest.mark.skipif(sys.platform != "darwin", reason="running a Core ML package needs macOS (Core ML runtime)")
def test_core_ml_predictions_match_torch_on_macos(ct, tiny_llama_dir, tmp_path_factory):
    from optimum_edkm.export import predict_logits

    model, result = _export(tmp_path_factory, tiny_llama_dir, ("llama", 3, 8), bits=3, group_size=8)
    ids = torch.randint(0, 128, (1, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids).logits.float().numpy()
    logits = predict_logits(result.path, ids)
    assert logits.shape == reference.shape
    assert np.abs(logits - reference).max() <= 2e-2 * max(1.0, np.abs(reference).max())


def test_predict_refuses_to_pretend_off_macos():
    if sys.platform == "darwin":
        pytest.skip("on macOS predict_logits runs Core ML")
    from optimum_edkm.export import predict_logits

    with pytest.raises(RuntimeError, match="needs macOS"):
        predict_logits("any.mlpackage", np.zeros((1, SEQ_LEN), dtype=np.int32))
