"""The model-level life cycle: prepare -> (train) -> palettize -> save / push.

``from_pretrained(..., quantization_config=EDKMConfig(...))`` is the usual way in; :func:`prepare` does the
same for a model already in memory. ``model.dequantize()`` (transformers) goes back to plain float modules.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Optional

import torch
from transformers import PreTrainedModel

from .atomic import commit_folder, resolve_target_folder, write_file
from .config import EDKMConfig
from .nn import EDKMTiedLinear, is_clustered, is_palettized, palettized_storage
from .nn.stored16 import float_part_keys, store_float_parts_16bit
from .storage import model_size

logger = logging.getLogger(__name__)

#: top-level files a ``save_pretrained`` of a model owns: a new save replaces them, stale ones are removed
MODEL_FILE_PATTERN = re.compile(
    r"(config\.json|generation_config\.json"
    r"|(model|pytorch_model)(\.[\w-]+)?(-\d{5}-of-\d{5})?\.(safetensors|bin)"
    r"|(model|pytorch_model)(\.[\w-]+)?\.(safetensors|bin)\.index(\.[\w-]+)?\.json)"
)
MODEL_CARD = "README.md"
CARD_BEGIN = "<!-- optimum-edkm: begin palettization section -->"
CARD_END = "<!-- optimum-edkm: end palettization section -->"


def edkm_config(model) -> EDKMConfig:
    """The model's :class:`EDKMConfig`; a clear error for a model that was not prepared for eDKM."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(config, EDKMConfig):
        raise ValueError(
            "this model was not prepared for eDKM: load it with "
            "AutoModelForCausalLM.from_pretrained(..., quantization_config=EDKMConfig(bits=3)) "
            "or call optimum_edkm.prepare(model, EDKMConfig(bits=3)) first"
        )
    return config


def quant_method(model_or_quantizer) -> Optional[str]:
    """The quantization method name of a model or quantizer (``None`` for a float model)."""
    quantizer = getattr(model_or_quantizer, "hf_quantizer", model_or_quantizer)
    config = getattr(quantizer, "quantization_config", None)
    if config is None:
        return None
    method = config.quant_method
    return str(getattr(method, "value", method))


def prepare(model, config: EDKMConfig, *, importance: Optional[dict] = None, palettes: Optional[dict] = None):
    """Make an in-memory transformers model clustering-aware, exactly as ``from_pretrained`` with
    ``quantization_config=config`` would (modules swapped, centroids initialised by k-means). The float
    parameters are reused, not copied. Returns the model.

    Args:
        importance: ``{module name: importance of each weight}`` (the module's weight layout, e.g. the Fisher
            diagonal of :func:`optimum_edkm.sensitivity.fisher_diagonal`): those modules' k-means is weighted by
            it (SqueezeLLM's sensitivity-weighted k-means), run once.
        palettes: ``{module name: Palette}`` (:class:`optimum_edkm.nn.Palette`: LUT, indices, scale; or a bare
            ``[groups, 2**bits]`` LUT tensor): those modules start from that palettization instead of k-means,
            e.g. a post-training result or a palettized model's (:func:`palettes_of`), so that fine-tuning
            continues from it; palettizing before any training step gives it back exactly.
    """
    from .quantizer import EDKMHfQuantizer

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"prepare() takes a transformers model (a PreTrainedModel, e.g. from AutoModelForCausalLM.from_pretrained "
            f"or from_config), got {type(model).__module__}.{type(model).__name__}: eDKM runs as a transformers "
            f"quantizer, and the model's config is where the palettization is recorded for saving and loading"
        )
    if not isinstance(config, EDKMConfig):
        raise TypeError(f"prepare expects an EDKMConfig, got {type(config).__name__}")
    existing = quant_method(model)
    # transformers de-quantizes GGUF checkpoints to float on load: such a model is a float model for eDKM
    if existing is not None and existing != "gguf":
        raise ValueError(
            f"the model is already quantized ({existing}); load the float model again to prepare it for eDKM"
        )
    if config.palettized:
        raise ValueError("prepare() takes a config with palettized=False; palettize(model) sets it after training")
    quantizer = EDKMHfQuantizer(config, pre_quantized=False)
    quantizer.initialisation = (importance, palettes)
    quantizer.validate_environment()
    quantizer.preprocess_model(model)
    quantizer.postprocess_model(model)
    quantizer.initialisation = (None, None)
    model.hf_quantizer = quantizer
    return model


def palettes_of(model) -> dict:
    """``{module name: Palette}`` of every clustered or palettized module of ``model``: what
    :func:`palettize` stores (snapped indices of a train-time model), to start another model from it with
    ``prepare(model, config, palettes=...)``. Tied output heads share their embedding's palette and are not
    listed."""
    palettes = {
        name: module.palette()
        for name, module in model.named_modules()
        if is_clustered(module) or is_palettized(module)
    }
    if not palettes:
        raise ValueError("the model has no clustered or palettized module: prepare or palettize it first")
    return palettes


@torch.no_grad()
def palettize(model):
    """Finalize: snap every clustered weight to its nearest centroid and replace the module with its
    palettized form (LUT + packed n-bit indices [+ scale]); the float parts (what is not palettized) go to
    ``EDKMConfig.float_dtype`` (16 bits by default, :mod:`optimum_edkm.nn.stored16`). In place; returns the model.

    All replacements are computed before the first one is installed, so an error leaves the model unchanged.
    """
    config = edkm_config(model)
    clustered = [(name, module) for name, module in model.named_modules() if is_clustered(module)]
    if not clustered:
        if config.palettized:
            raise ValueError("the model is already palettized (LUTs and indices only); nothing to snap")
        raise ValueError("the model has no clustered module to palettize")
    replacements = {name: module.palettize() for name, module in clustered}
    heads = []
    for name, module in model.named_modules():
        if isinstance(module, EDKMTiedLinear):
            source = next(n for n, m in clustered if m is module.tied_embedding)
            heads.append((name, module.palettize(replacements[source])))
    for name, replacement in list(replacements.items()) + heads:
        model.set_submodule(name, replacement)
    for name, _ in heads:
        getattr(model, "all_tied_weights_keys", {}).pop(f"{name}.weight", None)
    if config.float_dtype_16bit is not None:
        store_float_parts_16bit(model, config.float_dtype_16bit)
    config.palettized = True
    return model


# --------------------------------------------------------------------------------------------- size
def stored_size(model):
    """The :class:`~optimum_edkm.storage.ModelSize` of what a checkpoint of ``model`` holds: the packed form of
    its clustered / palettized modules, the float parts of an eDKM model at ``EDKMConfig.float_dtype``, every
    other tensor at its dtype (any model: a float model is all "other")."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    dtype_16bit = config.float_dtype_16bit if isinstance(config, EDKMConfig) else None
    stored_16bit = float_part_keys(model, dtype_16bit) if dtype_16bit is not None else set()
    return model_size(model, palettized_storage(model), tensor_bits={key: 16 for key in stored_16bit})


def size_report(model) -> dict:
    """Bytes and bits per weight of the palettized form of ``model`` (what a checkpoint holds), by the one size
    rule (:func:`optimum_edkm.storage.model_size`).

    ``theoretical_bytes`` = the packed form of every converted weight (:meth:`storage`, indices + LUTs +
    scales) + every other parameter and buffer at the dtype the checkpoint stores it in (its own, or
    ``EDKMConfig.float_dtype`` for the float parts of a palettized model; tied tensors once). ``float_parameters``
    are the parameters that stay in floating point (embeddings, heads, norms, biases, skipped modules) and
    ``float_parameter_share`` / ``float_byte_share`` their share of the parameters / of ``theoretical_bytes``:
    where a large float embedding (a 262,144-token vocabulary) dominates, the size is set by them. Works before
    and after :func:`palettize`.
    """
    config = edkm_config(model)
    size = stored_size(model)
    return {
        "bits": config.bits,
        "granularity": config.granularity,
        "group_size": config.group_size,
        "clustered_weights": size.compressed_weights,
        "clustered_bytes": size.compressed_bytes,
        "other_bytes": size.model_bytes - size.compressed_bytes,
        "theoretical_bytes": size.model_bytes,
        "bits_per_clustered_weight": size.linears or 0.0,
        "bits_per_weight": size.whole_model,
        "float_parameters": size.model_parameters - size.compressed_weights,
        "float_parameter_share": (size.model_parameters - size.compressed_weights) / max(size.model_parameters, 1),
        "float_byte_share": (size.model_bytes - size.compressed_bytes) / max(size.model_bytes, 1),
        "memory_footprint": model.get_memory_footprint(),
    }


def checkpoint_bytes(directory: str) -> dict:
    """Bytes of the safetensors files in ``directory``: total on disk and the tensors' own bytes (read from the
    file headers; no tensor is loaded)."""
    from .checkpoint import read_header

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {directory}")
    tensor_bytes = 0
    for name in files:
        tensors, _ = read_header(os.path.join(directory, name))
        tensor_bytes += sum(stored.end - stored.begin for stored in tensors.values())
    file_bytes = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
    return {"files": files, "file_bytes": file_bytes, "tensor_bytes": tensor_bytes}


def model_card_section(model) -> str:
    """Markdown describing the palettization, for the model card (README.md) of a saved model."""
    config = edkm_config(model)
    report = size_report(model)
    granularity = (
        "one LUT per weight tensor" if config.group_size is None else f"one LUT per {config.group_size} output channels"
    )
    embedding = config.embedding_bits if config.embedding_bits is not None else "not clustered"
    lines = [
        CARD_BEGIN,
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
        f"| embedding bits | {embedding} |",
        f"| modules with their own bit width | {len(config.module_bits or {})} |",
        f"| LUT dtype | {config.lut_dtype} |",
        f"| clustered weights | {report['clustered_weights']:,} ({report['bits_per_clustered_weight']:.3f} bits each "
        f"with LUTs and scales) |",
        f"| checkpoint size | {report['theoretical_bytes'] / 2**20:.2f} MiB "
        f"({report['bits_per_weight']:.2f} bits per parameter overall) |",
        f"| kept in floating point | {', '.join(config.modules_to_not_convert or []) or 'nothing'} |",
        f"| parameters in floating point | {report['float_parameters']:,} ({report['float_parameter_share']:.1%} of "
        f"the parameters, {report['float_byte_share']:.1%} of the checkpoint) |",
        f"| float parts stored in | {config.float_dtype or 'the model dtype'} |",
        "",
        "Load it with optimum-edkm installed (without it, transformers cannot read the packed weights):",
        "",
        "```python",
        "import optimum_edkm  # registers the 'edkm' quantization method",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("<this repo>")',
        "```",
        CARD_END,
        "",
    ]
    return "\n".join(lines)


def _card_with_section(existing: str, section: str) -> str:
    """``existing`` model card with the palettization section replaced (or appended)."""
    start, end = existing.find(CARD_BEGIN), existing.find(CARD_END)
    if start != -1 and end > start:
        tail = existing[end + len(CARD_END) :]
        return existing[:start] + section.rstrip("\n") + tail
    return (existing.rstrip("\n") + "\n\n" if existing.strip() else "") + section


# --------------------------------------------------------------------------------------------- saving
def owns_model_file(name: str) -> bool:
    """A top-level file that a ``save_pretrained`` of a model writes (config, weights and their index)."""
    return MODEL_FILE_PATTERN.fullmatch(name) is not None


def save_pretrained(model, save_directory: str, *, is_main_process: bool = True, **kwargs) -> str:
    """``model.save_pretrained`` into ``save_directory``, atomically: the folder holds the complete old model
    or the complete new one at every instant (:func:`optimum_edkm.atomic.commit_folder`), and files the model
    does not own (a tokenizer, trainer outputs, anything else) are kept. Stale weight shards of an earlier model
    are removed. Adds (or updates) the palettization section of ``README.md``. Symlinked folders are followed;
    a path that is a regular file is refused. On a non-main process (``is_main_process=False``) nothing is
    written or removed. Returns the real path of the directory."""
    edkm_config(model)
    target = resolve_target_folder(save_directory)
    if not is_main_process:
        return target
    if kwargs.get("safe_serialization") is False:
        raise ValueError(
            "optimum-edkm saves safetensors only (their header carries the commit record that loading "
            "verifies); drop safe_serialization=False"
        )
    card_path = os.path.join(target, MODEL_CARD)
    existing_card = open(card_path, encoding="utf-8").read() if os.path.isfile(card_path) else ""

    def stage(staging: str) -> None:
        model.save_pretrained(staging, is_main_process=True, **kwargs)
        staged_card = os.path.join(staging, MODEL_CARD)
        base = open(staged_card, encoding="utf-8").read() if os.path.isfile(staged_card) else existing_card
        write_file(staged_card, _card_with_section(base, model_card_section(model)))

    return commit_folder(target, stage, owns=owns_model_file)


def push_to_hub(
    model,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload eDKM-palettized model",
    **save_kwargs,
) -> str:
    """Upload exactly the files :func:`save_pretrained` writes (with the model card section) to the Hub."""
    from huggingface_hub import HfApi

    edkm_config(model)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as workdir:
        folder = save_pretrained(model, os.path.join(workdir, "model"), **save_kwargs)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return repo_id
