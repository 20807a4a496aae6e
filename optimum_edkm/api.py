"""The model-level life cycle: prepare -> (train) -> palettize -> save / push.

``from_pretrained(..., quantization_config=EDKMConfig(...))`` is the usual way in; :func:`prepare` does the
same for a model already in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch

from .config import EDKMConfig
from .modules import CLUSTERED_TYPES, PALETTIZED_TYPES, palettize_module
from .clustering import packed_size


def _edkm_config(model) -> EDKMConfig:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(config, EDKMConfig):
        raise ValueError(
            "this model was not prepared for eDKM: load it with "
            "AutoModelForCausalLM.from_pretrained(..., quantization_config=EDKMConfig(bits=3)) "
            "or call optimum_edkm.prepare(model, EDKMConfig(bits=3)) first"
        )
    return config


def prepare(model, config: EDKMConfig):
    """Make an in-memory transformers model clustering-aware, exactly as ``from_pretrained`` with
    ``quantization_config=config`` would (modules swapped, centroids initialised by k-means). The float
    parameters are reused, not copied. Returns the model."""
    from .quantizer import EDKMHfQuantizer

    if not isinstance(config, EDKMConfig):
        raise TypeError(f"prepare expects an EDKMConfig, got {type(config).__name__}")
    existing = getattr(model, "hf_quantizer", None)
    # transformers de-quantizes GGUF checkpoints to float on load: such a model is a float model for eDKM
    if existing is not None and _quant_method(existing) != "gguf":
        raise ValueError(f"the model is already quantized ({model.hf_quantizer.quantization_config.quant_method}); "
                         f"load the float model again to prepare it for eDKM")
    if config.palettized:
        raise ValueError("prepare() takes a config with palettized=False; palettize(model) sets it after training")
    quantizer = EDKMHfQuantizer(config, pre_quantized=False)
    quantizer.validate_environment()
    quantizer.preprocess_model(model)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    return model


def _quant_method(quantizer) -> str:
    method = quantizer.quantization_config.quant_method
    return str(getattr(method, "value", method))


@torch.no_grad()
def palettize(model):
    """Finalize: snap every clustered weight to its nearest centroid and replace the module with its
    palettized form (LUT + packed n-bit indices [+ scale]). In place; returns the model.

    All replacements are computed before the first one is installed, so an error leaves the model unchanged.
    """
    config = _edkm_config(model)
    clustered = [(name, module) for name, module in model.named_modules() if isinstance(module, CLUSTERED_TYPES)]
    if not clustered:
        if config.palettized:
            raise ValueError("the model is already palettized")
        raise ValueError("the model has no clustered module to palettize")
    replacements = [(name, palettize_module(module)) for name, module in clustered]
    for name, replacement in replacements:
        replacement.train(model.training)
        model.set_submodule(name, replacement)
    config.palettized = True
    return model


# --------------------------------------------------------------------------------------------- size
def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def size_report(model) -> dict:
    """Bytes and bits per weight of the palettized form of ``model`` (what a checkpoint holds).

    ``theoretical_bytes`` = packed indices + LUTs + scales of the clustered weights + every other tensor of
    the state dict at its own dtype (tied tensors once). Works before and after :func:`palettize`.
    """
    config = _edkm_config(model)
    seen, clustered_weights, clustered_bytes, other_bytes = set(), 0, 0, 0
    for name, module in model.named_modules():
        if isinstance(module, PALETTIZED_TYPES):
            count = module.out_channels * module.in_channels
            lut, scale = module.weight_lut, module.weight_scale
            clustered_weights += count
            clustered_bytes += packed_size(count, module.bits) + _tensor_bytes(lut)
            clustered_bytes += _tensor_bytes(scale) if scale is not None else 0
            seen.update(id(t) for t in (module.weight, lut, scale) if t is not None)
        elif isinstance(module, CLUSTERED_TYPES):
            rows = module._rows()
            count = rows.numel()
            element = torch.finfo(module.lut_dtype).bits // 8
            clustered_weights += count
            clustered_bytes += packed_size(count, module.spec.bits) + module.weight_centroids.numel() * element
            clustered_bytes += rows.shape[0] * element if module.weight_scale is not None else 0
            seen.update(id(t) for t in (module.weight, module.weight_centroids, module.weight_temperature,
                                        module.weight_scale) if t is not None)
    for tensor in model.state_dict(keep_vars=True).values():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        other_bytes += _tensor_bytes(tensor)
    total_weights = clustered_weights + sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values()
        if id(p) not in {id(m.weight) for m in model.modules() if isinstance(m, CLUSTERED_TYPES)})
    theoretical = clustered_bytes + other_bytes
    return {
        "bits": config.bits,
        "granularity": config.granularity,
        "group_size": config.group_size,
        "clustered_weights": clustered_weights,
        "clustered_bytes": clustered_bytes,
        "other_bytes": other_bytes,
        "theoretical_bytes": theoretical,
        "bits_per_clustered_weight": 8 * clustered_bytes / max(clustered_weights, 1),
        "bits_per_weight": 8 * theoretical / max(total_weights, 1),
        "memory_footprint": model.get_memory_footprint(),
    }


def checkpoint_bytes(directory: str) -> dict:
    """Bytes of the safetensors files in ``directory``: total on disk and the tensors' own bytes."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {directory}")
    tensor_bytes = 0
    for name in files:
        with safe_open(os.path.join(directory, name), framework="pt") as handle:
            for key in handle.keys():
                tensor_bytes += _tensor_bytes(handle.get_tensor(key))
    file_bytes = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
    return {"files": files, "file_bytes": file_bytes, "tensor_bytes": tensor_bytes}


def model_card_section(model) -> str:
    """Markdown describing the palettization, for the model card (README.md) of a saved model."""
    config = _edkm_config(model)
    report = size_report(model)
    granularity = ("one LUT per weight tensor" if config.group_size is None
                   else f"one LUT per {config.group_size} output channels")
    lines = [
        "## Palettization (optimum-edkm)",
        "",
        f"This model's weights were clustered with eDKM (train-time differentiable k-means) by "
        f"[optimum-edkm](https://github.com/optimum-edkm/optimum-edkm) {config.edkm_version}.",
        "",
        "| | |",
        "|---|---|",
        f"| bits per index | {config.bits} |",
        f"| granularity | {config.granularity} ({granularity}) |",
        f"| per-channel scale | {'yes' if config.enable_per_channel_scale else 'no'} |",
        f"| embedding bits | {config.embedding_bits if config.embedding_bits is not None else 'not clustered'} |",
        f"| LUT dtype | {config.lut_dtype} |",
        f"| clustered weights | {report['clustered_weights']:,} ({report['bits_per_clustered_weight']:.3f} bits each "
        f"with LUTs and scales) |",
        f"| checkpoint size | {report['theoretical_bytes'] / 2 ** 20:.2f} MiB "
        f"({report['bits_per_weight']:.2f} bits per parameter overall) |",
        f"| kept in floating point | {', '.join(config.modules_to_not_convert or []) or 'nothing'} |",
        "",
        "Load it with optimum-edkm installed (without it, transformers cannot read the packed weights):",
        "",
        "```python",
        "import optimum_edkm  # registers the 'edkm' quantization method",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(\"<this repo>\")",
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- saving
def save_pretrained(model, save_directory: str, **kwargs) -> str:
    """``model.save_pretrained`` into a temporary folder next to ``save_directory``, then renamed into place:
    an interrupted save never leaves a half-written model. Adds the palettization section to README.md.
    Returns the directory."""
    _edkm_config(model)
    save_directory = os.path.abspath(save_directory)
    parent = os.path.dirname(save_directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".edkm-save-", dir=parent)
    try:
        model.save_pretrained(staging, **kwargs)
        card = os.path.join(staging, "README.md")
        existing = open(card).read() + "\n" if os.path.exists(card) else ""
        with open(card, "w") as handle:
            handle.write(existing + model_card_section(model))
        _replace_directory(staging, save_directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return save_directory


def _replace_directory(source: str, target: str) -> None:
    if not os.path.exists(target):
        os.replace(source, target)
        return
    retired = tempfile.mkdtemp(prefix=".edkm-old-", dir=os.path.dirname(target))
    os.rmdir(retired)
    os.replace(target, retired)
    os.replace(source, target)
    shutil.rmtree(retired, ignore_errors=True)


def push_to_hub(model, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None,
                commit_message: str = "Upload eDKM-palettized model", **save_kwargs) -> str:
    """Upload exactly the files :func:`save_pretrained` writes (with the model card section) to the Hub."""
    from huggingface_hub import HfApi

    _edkm_config(model)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as workdir:
        folder = save_pretrained(model, os.path.join(workdir, "model"), **save_kwargs)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return repo_id


def describe(model) -> str:
    """One JSON line: config and size (for logs)."""
    return json.dumps({"quantization_config": _edkm_config(model).to_dict(), **size_report(model)})
