"""The transformers quantizer plug-in: ``from_pretrained(..., quantization_config=EDKMConfig(...))``.

Registered under ``quant_method="edkm"`` with transformers' own ``register_quantization_config`` /
``register_quantizer``; importing ``optimum_edkm`` is all it takes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from functools import reduce
from typing import Iterable, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from .config import QUANT_METHOD, EDKMConfig
from .modules import (CLUSTERED_TYPES, LUT_DTYPES, PALETTIZED_TYPES, EDKMConv1D, EDKMEmbedding, EDKMLinear,
                      PalettizedEmbedding, PalettizedLinear)

register_quantization_config(QUANT_METHOD)(EDKMConfig)

#: train-format buffers an ordinary float checkpoint does not have (filled by k-means after loading)
TRAIN_STATE_PATTERNS = (r"\.weight_centroids$", r"\.weight_temperature$", r"\.weight_scale$")


def _tied_module_names(model) -> set:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names = set(tied.keys()) | set(tied.values())
    return {name.removesuffix(".weight") for name in names}


def resolve_modules_to_not_convert(model, config: EDKMConfig) -> list:
    """Modules kept in floating point: the user's list (or transformers' defaults), always with every tied
    module (clustering one side of a tie would silently change the other), and ``_keep_in_fp32_modules``."""
    if config.modules_to_not_convert is None:
        skip = set(get_keys_to_not_convert(model))
    else:
        skip = set(config.modules_to_not_convert)
    skip |= _tied_module_names(model)
    skip |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted(skip)


def _candidate(module: nn.Module, config: EDKMConfig) -> Optional[str]:
    if isinstance(module, CLUSTERED_TYPES + PALETTIZED_TYPES):
        return None
    if isinstance(module, (nn.Linear, Conv1D)):
        return "linear"
    if isinstance(module, nn.Embedding) and config.embedding_bits is not None:
        return "embedding"
    return None


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, Conv1D):
        return module.nf
    if isinstance(module, nn.Embedding):
        return module.num_embeddings
    return module.out_features


def modules_to_convert(model, config: EDKMConfig, skip: Iterable[str]) -> dict:
    """``{name: kind}`` of the modules that will be clustered; raises before any change if a module cannot
    take the requested granularity, or if an embedding to cluster is tied."""
    selected = {}
    tied = _tied_module_names(model)
    user_skip = list(config.modules_to_not_convert or [])
    for name, module in model.named_modules():
        kind = _candidate(module, config)
        if kind is None:
            continue
        if kind == "embedding" and name in tied and should_convert_module(name, user_skip):
            raise ValueError(
                f"EDKMConfig.embedding_bits is set but '{name}' is tied to the output embedding; untie the "
                f"weights (config.tie_word_embeddings=False) or add '{name}' to modules_to_not_convert"
            )
        if not should_convert_module(name, list(skip)):
            continue
        selected[name] = kind
    if not selected:
        raise ValueError(
            "no module to cluster: eDKM clusters nn.Linear, transformers' Conv1D and (with embedding_bits) "
            "nn.Embedding modules, and every one of them is in modules_to_not_convert or absent"
        )
    if config.group_size is not None:
        wrong = {name: _out_channels(model.get_submodule(name)) for name in selected
                 if _out_channels(model.get_submodule(name)) % config.group_size}
        if wrong:
            common = reduce(math.gcd, (_out_channels(model.get_submodule(name)) for name in selected))
            divisors = [d for d in range(1, common + 1) if common % d == 0]
            name, channels = next(iter(wrong.items()))
            raise ValueError(
                f"EDKMConfig.group_size={config.group_size} does not divide the {channels} output channels of "
                f"'{name}' ({len(wrong)} module(s) affected); choose a divisor of every layer's output channels: "
                f"{divisors}, or add those modules to modules_to_not_convert"
            )
    return selected


def _build(module: nn.Module, kind: str, config: EDKMConfig, palettized: bool) -> nn.Module:
    weight = module.weight
    common = dict(per_channel_scale=config.enable_per_channel_scale, lut_dtype=LUT_DTYPES[config.lut_dtype],
                  device=weight.device, dtype=weight.dtype)
    if palettized:
        bits = config.embedding_bits if kind == "embedding" else config.bits
        if kind == "embedding":
            return PalettizedEmbedding(module.num_embeddings, module.embedding_dim, bits,
                                       padding_idx=module.padding_idx, group_size=config.group_size, **common)
        if isinstance(module, Conv1D):
            palettized_conv1d = PalettizedLinear(module.nx, module.nf, True, bits, group_size=config.group_size,
                                                 **common)
            palettized_conv1d.from_conv1d = True
            return palettized_conv1d
        return PalettizedLinear(module.in_features, module.out_features, module.bias is not None, bits,
                                group_size=config.group_size, **common)
    train = dict(relative_temperature=config.temperature, uniquify=config.uniquify, **common)
    if kind == "embedding":
        return EDKMEmbedding(module.num_embeddings, module.embedding_dim, config.clustering_spec(embedding=True),
                             padding_idx=module.padding_idx, **train)
    spec = config.clustering_spec()
    if isinstance(module, Conv1D):
        return EDKMConv1D(module.nf, module.nx, spec, **train)
    return EDKMLinear(module.in_features, module.out_features, module.bias is not None, spec, **train)


def convert_model(model, config: EDKMConfig, skip: Iterable[str], palettized: bool) -> dict:
    """Swap the selected modules in place; live (non-meta) parameters are carried over as the same
    ``nn.Parameter`` objects. Returns ``{name: kind}``."""
    selected = modules_to_convert(model, config, skip)
    for name, kind in selected.items():
        module = model.get_submodule(name)
        with torch.device("meta") if module.weight.device.type == "meta" else torch.device(module.weight.device):
            replacement = _build(module, kind, config, palettized)
        if not palettized and module.weight.device.type != "meta":
            replacement.weight = module.weight
            if getattr(module, "bias", None) is not None:
                replacement.bias = module.bias
        model.set_submodule(name, replacement)
    return selected


def verify_palettized_checkpoint(model, checkpoint_files: Optional[list]) -> None:
    """Before loading: every palettized tensor the model expects is in the checkpoint, with its exact shape
    and dtype. Catches truncated or edited files and a ``bits`` that does not match config.json."""
    files = [f for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
    if not files:
        return
    from safetensors import safe_open

    found = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                found[key] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    dtype_names = {torch.uint8: "U8", torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}
    for name, module in model.named_modules():
        if not isinstance(module, PALETTIZED_TYPES):
            continue
        for key, tensor in module.state_dict().items():
            if key == "bias":
                continue
            full = f"{name}.{key}"
            if full not in found:
                raise ValueError(
                    f"palettized checkpoint is missing tensor '{full}' (checked {len(files)} safetensors file(s)); "
                    f"the file is incomplete or was not written by optimum_edkm.palettize: re-save the model"
                )
            shape, dtype = found[full]
            if shape != tuple(tensor.shape):
                hint = ""
                if key == "weight":
                    elements = module.out_channels * module.in_channels
                    hint = (f"; {module.bits}-bit indices of a {module.out_channels}x{module.in_channels} weight "
                            f"need {math.ceil(elements * module.bits / 8)} bytes, so the checkpoint does not match "
                            f"config.json's quantization_config (bits={module.bits}, group_size={module.group_size})")
                raise ValueError(f"palettized tensor '{full}' has shape {shape} in the checkpoint but the model "
                                 f"expects {tuple(tensor.shape)}{hint}")
            if dtype != dtype_names.get(tensor.dtype, dtype):
                raise ValueError(f"palettized tensor '{full}' is stored as {dtype} but must be "
                                 f"{dtype_names.get(tensor.dtype)}; the checkpoint is corrupted or was edited")


@torch.no_grad()
def init_clusters(model, config: EDKMConfig, progress: bool = True) -> None:
    """k-means initialisation of every clustered module (seeded, identical on every process)."""
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, CLUSTERED_TYPES)]
    for name, module in tqdm(modules, desc="eDKM: k-means initialisation", disable=not progress or len(modules) < 2,
                             leave=False):
        module.init_clusters(seed=config.seed, name=f"{name}.weight")


class ClusteringMarshal:
    """Runs a module's clustering inside one shared :class:`~optimum_edkm.marshal.TensorMarshal`, so that
    what the clustering saves for backward is offloaded / sharded as ``EDKMConfig(offload=, shard=)`` asks."""

    def __init__(self, marshal):
        self.marshal = marshal

    def __call__(self, clustering):
        with self.marshal:
            return clustering()

    def counters(self, reset: bool = True) -> dict:
        values = self.marshal.as_dict(prefix="")
        if reset:
            self.marshal.reset()
        return values


def saved_tensor_policy(config: EDKMConfig):
    """The marshaling policy ``config`` asks for, or ``None``."""
    from .marshal import MarshalPolicy

    policy = MarshalPolicy.from_config(config.offload)
    if config.shard:
        # sharding alone keeps this rank's slice on the compute device (no offload)
        policy = dataclasses.replace(policy, shard=True) if policy is not None else MarshalPolicy(
            shard=True, memory_threshold=1.0)
    return policy


def attach_saved_tensor_policy(model, config: EDKMConfig) -> None:
    from .marshal import TensorMarshal

    policy = saved_tensor_policy(config)
    shared = ClusteringMarshal(TensorMarshal(policy)) if policy is not None else None
    for module in model.modules():
        if isinstance(module, CLUSTERED_TYPES):
            module.saved_tensor_policy = shared


@register_quantizer(QUANT_METHOD)
class EDKMHfQuantizer(HfQuantizer):
    """Swaps Linear / Conv1D (and, with ``embedding_bits``, Embedding) modules for clustered ones.

    * float checkpoint: train-time modules, float weights loaded as trainable parameters, centroids
      initialised by k-means after loading;
    * train-format checkpoint (``palettized=False``): train-time modules with their saved centroids;
    * palettized checkpoint: :class:`PalettizedLinear` / :class:`PalettizedEmbedding` built on the meta
      device with the exact packed shapes, so no float weight is ever materialised.
    """

    requires_calibration = False

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in set(device_map.values()):
            raise ValueError("eDKM models cannot be offloaded to disk with device_map; use 'cpu' for the modules "
                             "that do not fit on the accelerator")

    def update_dtype(self, dtype):
        return dtype

    @property
    def palettized(self) -> bool:
        return bool(self.quantization_config.palettized)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        palettized = self.pre_quantized and config.palettized
        if config.palettized and not self.pre_quantized:
            raise ValueError("EDKMConfig(palettized=True) describes a saved palettized checkpoint; to palettize a "
                             "float model, load it with palettized=False and call optimum_edkm.palettize(model)")
        if self.pre_quantized and config.modules_to_not_convert is not None:
            skip = list(config.modules_to_not_convert)    # exactly the modules the checkpoint was saved with
        else:
            skip = resolve_modules_to_not_convert(model, config)
        convert_model(model, config, skip, palettized)
        config.modules_to_not_convert = skip
        if palettized:
            verify_palettized_checkpoint(model, checkpoint_files)
        if not self.pre_quantized:
            patterns = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
            model._keys_to_ignore_on_load_missing = patterns | set(TRAIN_STATE_PATTERNS)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            init_clusters(model, self.quantization_config)
        attach_saved_tensor_policy(model, self.quantization_config)
        model.add_model_tags(["edkm", "palettization"])
        return model

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return not self.palettized

    @property
    def is_compileable(self) -> bool:
        # palettized layers run one torch op with a fake implementation (tests/test_kernels.py compiles a model)
        return self.palettized

    @property
    def quantized_element_size(self):
        return self.quantization_config.bits / 8

    def _dequantize(self, model, dtype=None):
        """Back to plain ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` holding the palettized (snapped)
        weights: a model that loads without optimum-edkm."""
        for name, module in list(model.named_modules()):
            if isinstance(module, CLUSTERED_TYPES):
                rows = module._rows(module.snapped_weight()).detach()
            elif isinstance(module, PALETTIZED_TYPES):
                rows = module.dense_weight(dtype or module.output_dtype)
            else:
                continue
            target_dtype = dtype or rows.dtype
            out_channels, in_channels = rows.shape
            if isinstance(module, (EDKMEmbedding, PalettizedEmbedding)):
                plain = nn.Embedding(out_channels, in_channels, padding_idx=module.padding_idx, device=rows.device,
                                     dtype=target_dtype)
            elif isinstance(module, EDKMConv1D) or getattr(module, "from_conv1d", False):
                plain = Conv1D(out_channels, in_channels).to(device=rows.device, dtype=target_dtype)
                rows = rows.t()
            else:
                plain = nn.Linear(in_channels, out_channels, bias=module.bias is not None, device=rows.device,
                                  dtype=target_dtype)
            plain.weight.data.copy_(rows)
            if getattr(module, "bias", None) is not None:
                plain.bias.data.copy_(module.bias)
            model.set_submodule(name, plain)
        return model


def checkpoint_files_in(path: str) -> list:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if re.search(r"\.safetensors$", f))
