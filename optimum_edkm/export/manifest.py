"""The framework-neutral description of an export: which modules are palettized, how (bits, LUT shape,
granularity, scale), the sha256 of their tensors exactly as optimum-edkm stores them (safetensors layout), and
where each one lives in the Core ML package. Other runtimes can decode the same weights from it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch

from ..nn import PalettizedConv1D, PalettizedEmbedding

FORMAT = "optimum-edkm.palettized"
FORMAT_VERSION = 1
DECODE_RULE = (
    "dense[r, c] = scale[r] * lut[r // group_size, index[r, c]] over [out_channels, in_channels] (scale = 1 "
    "without per-channel scale; group_size = out_channels for a per-tensor LUT). 'indices' is the packed "
    "stream: bits-wide unsigned integers, row-major, filled LSB-first (index i occupies bits [i*bits, "
    "(i+1)*bits); bit b is bit b % 8 of byte b // 8) - the layout of Core ML's sub-byte blobs. Linear: "
    "y = x @ dense.T + bias; embedding: row lookup. Products are exact in fp32 and rounded once to fp16."
)
_DTYPE_NAMES = {torch.uint8: "uint8", torch.float16: "float16", torch.float32: "float32", torch.bfloat16: "bfloat16"}


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of the tensor's bytes as safetensors stores them (row-major, little-endian)."""
    data = tensor.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def module_tensors(name: str, module) -> dict:
    """``{role: (state-dict key, tensor)}`` of a palettized module, as in an optimum-edkm checkpoint."""
    tensors = {"indices": (f"{name}.weight", module.weight), "lut": (f"{name}.weight_lut", module.weight_lut)}
    if module.weight_scale is not None:
        tensors["scale"] = (f"{name}.weight_scale", module.weight_scale)
    return tensors


def module_entry_tensors(name: str, module) -> dict:
    described = {}
    for role, (key, tensor) in module_tensors(name, module).items():
        described[role] = {"name": key, "dtype": _DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)),
                           "shape": list(tensor.shape), "sha256": tensor_sha256(tensor)}
    described["indices"]["layout"] = f"packed {module.bits}-bit, LSB-first, row-major over [out, in]"
    return described


def build_manifest(model, modules: dict, report, *, package: str, tensors_file, target, seq_len: int,
                   batch_size: int, capture: str) -> dict:
    import coremltools
    import transformers

    from .. import __version__

    by_name = {entry.name: entry for entry in report.modules}
    entries = []
    for name, module in modules.items():
        stored = by_name[name]
        entries.append({
            "name": name,
            "kind": "embedding" if isinstance(module, PalettizedEmbedding) else "linear",
            "from_conv1d": isinstance(module, PalettizedConv1D),
            "out_channels": module.out_channels,
            "in_channels": module.in_channels,
            "bits": module.bits,
            "granularity": "per_tensor" if module.group_size is None else "per_grouped_channel",
            "group_size": module.group_size,
            "lut_shape": list(module.weight_lut.shape),
            "lut_dtype": _DTYPE_NAMES[module.weight_lut.dtype],
            "per_channel_scale": module.weight_scale is not None,
            "has_bias": getattr(module, "bias", None) is not None,
            "tensors": module_entry_tensors(name, module),
            "coreml": {
                "weight_op": stored.weight_op,
                "lut_op": stored.lut_op,
                "scale_op": stored.scale_op,
                "consumers": stored.consumers,
                "indices_dtype": stored.indices_dtype,
                "lut_shape": list(stored.lut_shape),
                "layout": stored.layout,
                "equivalent_indices": stored.equivalent_indices,
            },
        })
    config = model.config.to_dict()
    quantization = config.pop("quantization_config", None)
    weight_files = {}
    for relative in ("weights/weight.bin",):
        file_path = os.path.join(report.path, "Data", "com.apple.CoreML", relative)
        if os.path.isfile(file_path):
            weight_files[relative] = {"bytes": os.path.getsize(file_path), "sha256": sha256_file(file_path)}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": {"optimum_edkm": __version__, "coremltools": coremltools.__version__,
                       "torch": torch.__version__, "transformers": transformers.__version__},
        "decode": DECODE_RULE,
        "quantization_config": quantization,
        "model_config": config,
        "tensors_file": tensors_file,
        "tied_embedding": report.tied_embedding,
        "coreml": {
            "package": package,
            "minimum_deployment_target": target.name,
            "specification_version": report.spec_version,
            "compute_precision": "float16",
            "capture": capture,
            "inputs": [{"name": "input_ids", "dtype": "int32", "shape": [batch_size, seq_len]}],
            "outputs": [{"name": "logits", "dtype": "float16",
                         "shape": [batch_size, seq_len, model.config.vocab_size]}],
            "kv_cache": False,
            "weight_files": weight_files,
            "op_counts": report.op_counts,
            "sizes": {"weight_bin": report.weight_bin_bytes, "palettized_payload": report.palettized_payload_bytes,
                      "nbit_payload": report.nbit_payload_bytes, "float_tensors": report.float_bytes,
                      "converter_constants": report.converter_bytes},
        },
        "modules": entries,
    }


def write_json_atomic(path: str, document: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".edkm-", suffix=".json", dir=directory)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(document, stream, indent=2, sort_keys=False, default=str)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_tensors(model, modules: dict, path: str) -> None:
    """The palettized tensors (packed indices, LUTs, scales), keyed as in the optimum-edkm checkpoint."""
    from safetensors.torch import save_file

    from .. import __version__

    tensors = {key: tensor.detach().cpu().contiguous() for name, module in modules.items()
               for key, tensor in module_tensors(name, module).values()}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "optimum_edkm": __version__,
                "quantization_config": json.dumps(model.config.quantization_config.to_dict(), sort_keys=True)}
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".edkm-", suffix=".safetensors", dir=directory)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
