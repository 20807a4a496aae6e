"""The framework-neutral description of an export: which modules are palettized, how (bits, LUT shape,
granularity, scale), the sha256 of their tensors exactly as optimum-edkm stores them (safetensors layout), and
where each one lives in the Core ML package. Other runtimes can decode the same weights from it."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .. import atomic
from ..version import __version__
from .common import PaletteRecord, storage_groups

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


def record_tensors(record: PaletteRecord) -> dict:
    """``{role: {name, dtype, shape, sha256[, layout]}}`` of a palettized weight's stored tensors."""
    described = {}
    for role, (key, tensor) in record.tensors().items():
        described[role] = {
            "name": key,
            "dtype": _DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)),
            "shape": list(tensor.shape),
            "sha256": tensor_sha256(tensor),
        }
    described["indices"]["layout"] = f"packed {record.palette.bits}-bit, LSB-first, row-major over [out, in]"
    return described


def build_manifest(
    model, records: dict, report, *, package: str, tensors_file, target, capture: str, interface: dict
) -> dict:
    """The manifest document; ``interface`` describes the package's inputs, outputs and states."""
    import coremltools
    import transformers

    by_name = {entry.name: entry for entry in report.modules}
    entries = []
    for name, record in records.items():
        stored, palette = by_name[name], record.palette
        entries.append(
            {
                "name": name,
                "kind": record.kind,
                "from_conv1d": record.from_conv1d,
                "out_channels": palette.out_channels,
                "in_channels": palette.in_channels,
                "bits": palette.bits,
                "granularity": "per_tensor" if palette.group_size is None else "per_grouped_channel",
                "group_size": palette.group_size,
                "lut_shape": list(palette.lut.shape),
                "lut_dtype": _DTYPE_NAMES[palette.lut.dtype],
                "per_channel_scale": palette.scale is not None,
                "has_bias": record.bias is not None,
                "shares_storage_with": list(record.tied_to),
                "tensors": record_tensors(record),
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
            }
        )
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
        "created_by": {
            "optimum_edkm": __version__,
            "coremltools": coremltools.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
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
            **interface,
            "weight_files": weight_files,
            "op_counts": report.op_counts,
            "sizes": {
                "weight_bin": report.weight_bin_bytes,
                "palettized_payload": report.palettized_payload_bytes,
                "nbit_payload": report.nbit_payload_bytes,
                "float_tensors": report.float_bytes,
                "converter_constants": report.converter_bytes,
            },
        },
        "modules": entries,
    }


def write_tensors(model, records: dict, path: str) -> None:
    """The palettized tensors (packed indices, LUTs, scales), keyed as in the optimum-edkm checkpoint; a tied
    weight once, under its first module's name."""
    from safetensors.torch import save

    tensors = {
        key: tensor.detach().cpu().contiguous()
        for members in storage_groups(records)
        for key, tensor in records[members[0]].tensors().values()
    }
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "optimum_edkm": __version__,
        "quantization_config": json.dumps(model.config.quantization_config.to_dict(), sort_keys=True),
    }
    atomic.write_file(path, save(tensors, metadata=metadata))
