"""The transformers quantizer plug-in: ``from_pretrained(..., quantization_config=EDKMConfig(...))``.

Registered under ``quant_method="edkm"`` with transformers' own ``register_quantization_config`` /
``register_quantizer``; importing ``optimum_edkm`` is all it takes. Which module becomes what is decided by
:func:`plan_conversion` from the one type table in :mod:`optimum_edkm.nn.registry`; each module class builds
itself (``from_float``, ``empty_for``, ``palettize``, ``to_float``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from functools import reduce
from typing import Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from .atomic import recover_folder
from .checkpoint import CheckpointError, checkpoint_state_dict, commit_record, verify_checkpoint
from .config import QUANT_METHOD, SAVED_QUANT_METHOD, EDKMConfig
from .nn import (
    CHECKPOINT_WEIGHT_DIM,
    EDKMTiedLinear,
    PaletteFormat,
    PalettizedTiedLinear,
    clustered_class_for,
    is_clustered,
    is_palettized,
)
from .nn.stored16 import Embedding16, Linear16, float_part_keys, store_float_parts_16bit

logger = logging.getLogger(__name__)

register_quantization_config(QUANT_METHOD)(EDKMConfig)
# what config.json holds (it names the fix when optimum_edkm is not imported); the quantizer is looked up by
# the config object's quant_method, always QUANT_METHOD
register_quantization_config(SAVED_QUANT_METHOD)(EDKMConfig)

#: train-format buffers an ordinary float checkpoint does not have (filled by k-means after loading)
TRAIN_STATE_PATTERNS = (r"\.weight_centroids$", r"\.weight_temperature$", r"\.weight_scale$")


@dataclass(frozen=True)
class ModulePlan:
    """What one module becomes: ``clustered_class`` with ``palette``; ``tied_to`` names the embedding whose
    palette an output head reads instead (the head then has no palette of its own)."""

    clustered_class: Optional[type]
    palette: Optional[PaletteFormat]
    tied_to: Optional[str] = None


def tied_pairs(model) -> dict:
    """``{output head module: input embedding module}`` of tied weights (transformers' tie mapping)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {
        target.removesuffix(".weight"): source.removesuffix(".weight")
        for target, source in tied.items()
        if target.endswith(".weight") and source.endswith(".weight")
    }


def unconvertible_modules(model, config: EDKMConfig) -> dict:
    """``{name: why}`` of the modules of a class eDKM clusters that it cannot cluster faithfully: subclasses whose
    ``forward`` computes something the clustered class would drop (OPT's learned positional embedding, a custom
    Linear). They stay in floating point; naming one in ``module_bits`` is refused before any change."""
    found = {}
    for name, module in model.named_modules():
        clustered_class = clustered_class_for(module)
        if clustered_class is None or config.bits_for(name, clustered_class.kind) is None:
            continue
        problem = clustered_class.unsupported(module)
        if problem is None:
            continue
        if config.module_bits is not None and name in config.module_bits:
            raise ValueError(
                f"EDKMConfig.module_bits asks to cluster '{name}', but {problem}; remove it from module_bits "
                f"(it then stays in floating point)"
            )
        found[name] = problem
    return found


def resolve_modules_to_not_convert(model, config: EDKMConfig) -> list:
    """Modules kept in floating point: the user's list, or transformers' defaults (the output head, tied
    modules) minus the input embedding when ``embedding_bits`` asks for it; ``_keep_in_fp32_modules`` and the
    :func:`unconvertible_modules` always."""
    if config.modules_to_not_convert is None:
        skip = set(get_keys_to_not_convert(model))
        if config.embedding_bits is not None:
            embedding = _input_embedding_name(model)
            skip.discard(embedding)
            skip -= {head for head, source in tied_pairs(model).items() if source == embedding}
    else:
        skip = set(config.modules_to_not_convert)
    skip |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    unconvertible = {
        name: why for name, why in unconvertible_modules(model, config).items() if should_convert_module(name, skip)
    }
    if unconvertible:
        logger.warning(
            "eDKM keeps %d module(s) in floating point that it cannot cluster: %s",
            len(unconvertible),
            "; ".join(f"{name} ({why})" for name, why in unconvertible.items()),
        )
    return sorted(skip | set(unconvertible))


def _input_embedding_name(model) -> Optional[str]:
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if getter is not None else None
    for name, module in model.named_modules():
        if module is embedding:
            return name
    return None


def _out_channels(module: nn.Module) -> int:
    if hasattr(module, "nf"):
        return module.nf
    if hasattr(module, "num_embeddings"):
        return module.num_embeddings
    return module.out_features


def plan_conversion(model, config: EDKMConfig, skip) -> dict:
    """``{name: ModulePlan}`` of the modules to convert; raises before any change when a module cannot take the
    requested granularity or nothing would be converted."""
    skip = list(skip)
    pairs = tied_pairs(model)
    heads = set(pairs)
    plans = {}
    for name, module in model.named_modules():
        clustered_class = clustered_class_for(module)
        if clustered_class is None or name in heads:
            continue
        if config.bits_for(name, clustered_class.kind) is None or not should_convert_module(name, skip):
            continue
        plans[name] = ModulePlan(clustered_class, config.palette_format(name, clustered_class.kind))
    for head, source in pairs.items():
        if source in plans:
            # one palette serves both uses of a tied weight: the head reads the embedding's
            plans[head] = ModulePlan(None, None, tied_to=source)
    if not plans:
        raise ValueError(
            "no module to cluster: eDKM clusters nn.Linear, transformers' Conv1D and (with embedding_bits) "
            "nn.Embedding modules, and every one of them is in modules_to_not_convert or absent"
        )
    if config.group_size is not None:
        sized = {name: _out_channels(model.get_submodule(name)) for name, plan in plans.items() if plan.tied_to is None}
        wrong = {name: channels for name, channels in sized.items() if channels % config.group_size}
        if wrong:
            common = reduce(math.gcd, sized.values())
            divisors = [d for d in range(1, common + 1) if common % d == 0]
            name, channels = next(iter(wrong.items()))
            raise ValueError(
                f"EDKMConfig.group_size={config.group_size} does not divide the {channels} output channels of "
                f"'{name}' ({len(wrong)} module(s) affected); choose a divisor of every layer's output channels: "
                f"{divisors}, or add those modules to modules_to_not_convert"
            )
    return plans


def convert_model(model, config: EDKMConfig, plans: dict, form: str) -> None:
    """Swap the planned modules in place. ``form``: ``"clustered"`` (train-time modules reusing the float
    parameters), ``"train-checkpoint"`` (train-time modules to load a train-format checkpoint into: weights
    shaped as that checkpoint stores them) or ``"palettized"`` (empty palettized modules on the meta device)."""
    options = config.clustering_options()
    built = {}
    for name, plan in plans.items():
        if plan.tied_to is not None:
            continue
        module = model.get_submodule(name)
        if form == "palettized":
            replacement = plan.clustered_class.palettized_class.empty_for(module, plan.palette)
        else:
            replacement = plan.clustered_class.from_float(module, plan.palette, options)
            if form == "train-checkpoint":
                weight = replacement.weight
                replacement.weight = nn.Parameter(
                    torch.empty((1,) + tuple(weight.shape), dtype=weight.dtype, device="meta"),
                    requires_grad=weight.requires_grad,
                )
        built[name] = replacement
        model.set_submodule(name, replacement)
    for name, plan in plans.items():
        if plan.tied_to is None:
            continue
        head = model.get_submodule(name)
        embedding = built[plan.tied_to]
        bias = getattr(head, "bias", None)
        if form == "palettized":
            model.set_submodule(name, PalettizedTiedLinear(embedding, bias=bias))
            # the tie is implemented by the head itself: transformers must not look for a tied parameter
            getattr(model, "all_tied_weights_keys", {}).pop(f"{name}.weight", None)
        else:
            model.set_submodule(name, EDKMTiedLinear(embedding, bias=bias))


def finish_train_checkpoint_load(model) -> None:
    """After loading a train-format checkpoint: weights back to their module layout, tied heads re-tied."""
    for module in model.modules():
        if is_clustered(module) and module.weight.dim() == CHECKPOINT_WEIGHT_DIM:
            module.weight = nn.Parameter(module.weight.data[0], requires_grad=module.weight.requires_grad)
            module._snap_cache = module._soft_cache = None
    for module in model.modules():
        if isinstance(module, EDKMTiedLinear):
            module.retie()


@torch.no_grad()
def init_clusters(
    model, config: EDKMConfig, importance: Optional[dict] = None, palettes: Optional[dict] = None, progress: bool = True
) -> None:
    """Initialise every clustered module (seeded, identical on every process): from ``palettes[name]`` (a
    :class:`~optimum_edkm.nn.Palette`) where given, else k-means, weighted by ``importance[name]`` (e.g. the
    Fisher diagonal, in the module's weight layout) where given."""
    importance, palettes = importance or {}, palettes or {}
    modules = [(name, m) for name, m in model.named_modules() if is_clustered(m)]
    mismatched = {}
    for name, module in tqdm(
        modules, desc="eDKM: initialisation", disable=not progress or len(modules) < 2, leave=False
    ):
        if name in palettes:
            mismatched[name] = module.start_from(palettes[name], name=f"{name}.weight")
            continue
        weights = importance.get(name)
        if weights is not None:
            weights = module.rows(weights.to(module.weight.device))
        module.init_clusters(seed=config.seed, name=f"{name}.weight", sample_weight=weights)
    moved = {name: n for name, n in mismatched.items() if n}
    if moved:
        logger.warning(
            "%d weight(s) of %d module(s) lie as near another LUT entry as their given one (near-duplicate LUT "
            "entries): palettize keeps the given indices, a training step may move them: %s",
            sum(moved.values()),
            len(moved),
            ", ".join(list(moved)[:5]),
        )


def check_initialisation(plans: dict, importance: Optional[dict], palettes: Optional[dict]) -> None:
    """Refuse, before any module is swapped, ``importance`` / ``palettes`` entries that name no module that will
    be clustered (a typo would otherwise silently fall back to plain k-means)."""
    clustered = {name for name, plan in plans.items() if plan.tied_to is None}
    for what, given in (("importance", importance), ("palettes", palettes)):
        if given is None:
            continue
        if not isinstance(given, dict):
            raise TypeError(f"{what} must be a dict {{module name: tensor}}, got {type(given).__name__}")
        unknown = sorted(set(given) - clustered)
        if unknown:
            raise ValueError(
                f"{what} names {len(unknown)} module(s) that are not clustered with this EDKMConfig: "
                f"{', '.join(unknown[:5])}; clustered modules are named like {sorted(clustered)[:3]}"
            )


def float_parts_as_stored(model, state: dict, config: EDKMConfig) -> dict:
    """``state`` with the float parts of a palettized model that are wider than ``config.float_dtype``
    (:func:`~optimum_edkm.nn.stored16.float_part_keys`) cast to it; tensors that share storage (tied weights) stay
    shared."""
    if config.float_dtype is None:
        return state
    dtype = config.float_dtype_16bit or torch.float32
    cast = {}
    state = dict(state)
    for key in float_part_keys(model, dtype) & set(state):
        tensor = state[key]
        memo = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if memo not in cast:
            cast[memo] = tensor.to(dtype)
        state[key] = cast[memo]
    return state


def _checkpoint_folder(checkpoint_files) -> Optional[str]:
    folders = {os.path.dirname(os.path.abspath(str(f))) for f in checkpoint_files or []}
    return folders.pop() if len(folders) == 1 else None


@register_quantizer(QUANT_METHOD)
class EDKMHfQuantizer(HfQuantizer):
    """Swaps Linear / Conv1D (and, with ``embedding_bits``, Embedding) modules for clustered ones.

    * float checkpoint: train-time modules, float weights loaded as trainable parameters, centroids
      initialised by k-means after loading;
    * train-format checkpoint (``palettized=False``): train-time modules with their saved centroids;
    * palettized checkpoint: palettized modules built on the meta device with the exact packed shapes, so no
      float weight is ever materialised.

    Saved checkpoints carry a commit record that every load verifies (:mod:`optimum_edkm.checkpoint`).
    """

    requires_calibration = False
    #: ``(importance, palettes)`` of :func:`optimum_edkm.prepare`: how the clustered modules start (k-means
    #: weighted by an importance, or given palettizations); ``from_pretrained`` starts from plain k-means
    initialisation = (None, None)

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in set(device_map.values()):
            raise ValueError(
                "eDKM models cannot be offloaded to disk with device_map; use 'cpu' for the modules "
                "that do not fit on the accelerator"
            )

    def update_dtype(self, dtype):
        # transformers writes the dtype of a model's first parameter to config.json: for a palettized model whose
        # float parts are stored in 16 bits, that is the 16-bit embedding, not the dtype the model computes in
        config = self.quantization_config
        if self.pre_quantized and config.palettized and dtype is not None and dtype == config.float_dtype_16bit:
            logger.info(
                "the float parts of this palettized model are stored in %s; it computes in float32 (call "
                "model.to(%s) after loading to compute in 16 bits)",
                config.float_dtype,
                dtype,
            )
            return torch.float32
        return dtype

    @property
    def palettized(self) -> bool:
        return bool(self.quantization_config.palettized)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        if config.palettized and not self.pre_quantized:
            raise ValueError(
                "EDKMConfig(palettized=True) describes a saved palettized checkpoint; to palettize a "
                "float model, load it with palettized=False and call optimum_edkm.palettize(model)"
            )
        if self.pre_quantized:
            self._repair_interrupted_save(checkpoint_files)
        if self.pre_quantized and config.modules_to_not_convert is not None:
            skip = list(config.modules_to_not_convert)  # exactly the modules the checkpoint was saved with
        else:
            skip = resolve_modules_to_not_convert(model, config)
        plans = plan_conversion(model, config, skip)
        check_initialisation(plans, *self.initialisation)
        form = ("palettized" if config.palettized else "train-checkpoint") if self.pre_quantized else "clustered"
        convert_model(model, config, plans, form)
        if form == "palettized" and config.float_dtype_16bit is not None:
            store_float_parts_16bit(model, config.float_dtype_16bit, on_meta=True)
        config.modules_to_not_convert = skip
        if self.pre_quantized and checkpoint_files is not None:
            verify_checkpoint(model, config, checkpoint_files)
        if not self.pre_quantized:
            patterns = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
            model._keys_to_ignore_on_load_missing = patterns | set(TRAIN_STATE_PATTERNS)

    @staticmethod
    def _repair_interrupted_save(checkpoint_files) -> None:
        folder = _checkpoint_folder(checkpoint_files)
        if folder is not None and recover_folder(folder) == "rolled-forward":
            raise CheckpointError(
                f"{folder} was being replaced by a save that was interrupted after it committed; optimum-edkm has "
                f"now completed it, so the folder holds the new model: load it again"
            )

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized and not self.palettized:
            finish_train_checkpoint_load(model)
        if not self.pre_quantized:
            init_clusters(model, self.quantization_config, *self.initialisation)
        model.add_model_tags(["edkm", "palettization"])
        return model

    def get_state_dict_and_metadata(self, model):
        state = checkpoint_state_dict(model)
        if self.quantization_config.palettized:
            state = float_parts_as_stored(model, state, self.quantization_config)
        return state, commit_record(model, self.quantization_config, state)

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
        """Back to plain ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` holding the palettized (snapped) weights:
        a model that loads without optimum-edkm. Tied weights are tied again."""
        converted = [
            (name, module)
            for name, module in model.named_modules()
            if is_clustered(module)
            or is_palettized(module)
            or isinstance(module, (EDKMTiedLinear, PalettizedTiedLinear, Linear16, Embedding16))
        ]
        tied = any(
            isinstance(module, (EDKMTiedLinear, PalettizedTiedLinear, Linear16, Embedding16)) for _, module in converted
        )
        # every float module is built before the first one is installed (a tied head reads its embedding)
        replacements = [(name, module.to_float(dtype)) for name, module in converted]
        for name, plain in replacements:
            model.set_submodule(name, plain)
        if tied:
            model.tie_weights(recompute_mapping=True)
        return model
