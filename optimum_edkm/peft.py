"""LoRA adapters on eDKM models (QLoRA-style) with peft's own ``LoraConfig``.

Palettized and train-time eDKM layers get :class:`EDKMLoraLinear`, with peft's plain config as with bitsandbytes,
HQQ, GPTQ or torchao bases::

    import optimum_edkm
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained("my-palettized-model")        # LUTs + packed indices
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    Trainer(model=model, ...).train()                                          # only the adapters train

peft chooses the LoRA layer of a target from a fixed list of dispatchers (bitsandbytes, GPTQ, AWQ, HQQ, torchao,
..., then ``nn.Linear``), which optimum-edkm cannot register into. :func:`dispatch_edkm_layers` (run by
``import optimum_edkm`` when peft is installed) puts :func:`edkm_dispatcher` in front of them; any other layer
goes to peft's own choice unchanged. :class:`~optimum_edkm.PalettizedLinear` also subclasses ``nn.Linear``, so
``target_modules="all-linear"`` finds it. :func:`lora_config` (peft's ``LoraConfig`` with the same mapping
registered through ``_register_custom_module``, peft's experimental API for custom layers) gives the same layers.

What :class:`EDKMLoraLinear` adds to peft's ``lora.Linear``:

* the frozen palettized base is decoded for the forward pass and decoded *again* in backward instead of
  keeping the dense weight alive for backward (what bitsandbytes' 4-bit matmul does for QLoRA);
  ``EDKMLoraLinear.decode_in_backward = False`` keeps peft's plain path. The palettized layers LoRA does not
  target do the same (their fused LUT op keeps only the packed indices); :func:`decode_in_backward` with
  ``enabled=False`` makes them keep the decoded weight instead;
* merging is defined and never silent. A palettized layer can only hold values of its LUT, so
  ``merge()`` / ``merge_and_unload()`` raise :class:`PalettizedMergeError` with the two ways out:
  :func:`merge_and_repalettize` (lossy, re-assigns every weight of ``W + BA`` to its nearest LUT entry and
  reports the error), or ``model.dequantize()`` first (exact; the merged model is then a float model);
* a train-time :class:`~optimum_edkm.EDKMLinear` base (which peft would otherwise wrap as an ordinary Linear,
  its merge adding ``BA`` to the float weight that the module then re-clusters) is refused the same way.

Only the public attributes of the palettized modules are used (``dense_weight()``, ``weight``, ``weight_lut``,
``weight_scale``, ``bits``, ``group_size``, ``in_features``, ``out_features``, ``bias``).
"""

from __future__ import annotations

import logging
import types
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from peft.tuners.lora import model as lora_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from .clustering import ClusteringSpec, decode, hard_assign, pack_indices
from .nn import EDKMConv1D, EDKMLinear, PalettizedLinear

logger = logging.getLogger(__name__)

#: LoRA initialisations that do not read (or rewrite) the base weight
SUPPORTED_INITS = (True, False, "gaussian")
EDKM_BASE_TYPES = (PalettizedLinear, EDKMLinear, EDKMConv1D)


class PalettizedMergeError(ValueError):
    """A LoRA adapter cannot be merged exactly into a palettized or clustered layer."""


def _merge_refusal(base: nn.Module) -> str:
    if isinstance(base, PalettizedLinear):
        what = (
            f"a palettized layer stores only the {2**base.bits} values of its LUT, so W + BA is in general "
            f"not representable"
        )
    else:
        what = (
            f"a train-time {type(base).__name__} re-clusters its float weight in forward, so adding BA to it "
            f"would compute snap(W + BA) instead of snap(W) + BA"
        )
    return (
        f"cannot merge a LoRA adapter into {type(base).__name__}: {what}. Keep the adapter unmerged, or "
        f"(1) merge exactly into a float model: peft_model.get_base_model().dequantize(), then "
        f"merge_and_unload(); or (2) re-palettize the merged weight (lossy, the error is reported): "
        f"optimum_edkm.palettize(...) first for a train-time model, then "
        f"optimum_edkm.peft.merge_and_repalettize(peft_model)"
    )


def palettized_linear(x: torch.Tensor, module: PalettizedLinear, decode_in_backward: bool = True) -> torch.Tensor:
    """The palettized layer's output. ``decode_in_backward`` (the layer's own forward): only the packed indices
    are kept for backward, which decodes the weight again; ``False``: ``F.linear`` on the decoded weight, which
    autograd keeps (a faster backward for the memory of the dense weight)."""
    if decode_in_backward:
        return PalettizedLinear.forward(module, x)
    return F.linear(x, module.dense_weight(x.dtype), module.bias)


def decode_in_backward(model, enabled: bool = True) -> int:
    """Whether every :class:`PalettizedLinear` of ``model`` decodes its weight again in backward (``True``, what
    the class does by default since 0.2: its fused LUT op keeps only the packed indices) or keeps the decoded
    weight for backward (``False``: sets an instance-level ``forward``; faster backward, as much memory as the
    float weights). The layers LoRA does not target matter too: they pass gradients down to the adapters below
    them. Returns the number of layers set."""
    changed = 0
    for module in model.modules():
        if not isinstance(module, PalettizedLinear):
            continue
        if enabled:
            module.__dict__.pop("forward", None)
        else:
            module.forward = types.MethodType(_keeping_forward, module)  # deepcopy rebinds it to the copy
        changed += 1
    return changed


def _keeping_forward(self, x):
    return palettized_linear(x, self, False)


class EDKMLoraLinear(LoraLinear):
    """peft ``lora.Linear`` for a palettized (:class:`PalettizedLinear`) or train-time eDKM base layer.

    The adapter is ``B A x * scaling`` as in peft; the base stays frozen. ``fan_in_fan_out`` follows the base
    layer (a palettized layer computes ``x W^T`` whatever it was converted from), not the config.
    """

    #: decode the palettized weight again in backward instead of keeping it (see the module docstring)
    decode_in_backward = True

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, **kwargs):
        init = kwargs.get("init_lora_weights", config.init_lora_weights)
        if not (init is True or init is False or init == "gaussian"):
            raise ValueError(
                f"init_lora_weights={init!r} reads or rewrites the base weight, which an eDKM layer "
                f"({type(base_layer).__name__}) does not hold as a float tensor; use one of "
                f"{SUPPORTED_INITS}"
            )
        if kwargs.get("use_dora", config.use_dora):
            raise ValueError(
                "DoRA needs the dense base weight's norm at every step; it is not supported on eDKM "
                "layers: use plain LoRA (use_dora=False) or dequantize() the model first"
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        if self.lora_variant:
            variant = type(self.lora_variant[adapter_name]).__name__
            raise ValueError(f"LoRA variants ({variant}) are not supported on eDKM layers; use plain LoRA")
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def _base_is_edkm(self) -> bool:
        return isinstance(self.get_base_layer(), EDKM_BASE_TYPES)

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        plain_path = self.disable_adapters or self.merged or args or kwargs or not isinstance(base, PalettizedLinear)
        if plain_path:
            return super().forward(x, *args, **kwargs)
        result = palettized_linear(x, base, self.decode_in_backward)
        result_dtype = result.dtype
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[active_adapter], self.lora_B[active_adapter]
            dropout, scaling = self.lora_dropout[active_adapter], self.scaling[active_adapter]
            adapter_input = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + lora_b(lora_a(dropout(adapter_input))) * scaling
        return result.to(result_dtype)

    # --------------------------------------------------------------------------------------------- merge
    def get_delta_weight(self, adapter) -> torch.Tensor:
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)  # the base may have been dequantized
        return super().get_delta_weight(adapter)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        """Exact merge into a float base (after ``dequantize()``); :class:`PalettizedMergeError` otherwise."""
        if self._base_is_edkm():
            raise PalettizedMergeError(_merge_refusal(self.get_base_layer()))
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        if self._base_is_edkm() and self.merged:
            raise PalettizedMergeError("this adapter was merged by re-palettizing, which cannot be undone")
        super().unmerge()

    def dense_delta(self, adapter_names: Optional[list] = None) -> torch.Tensor:
        """Sum of ``B A * scaling`` of the adapters (default: the active ones), fp32, ``[out, in]``."""
        names = self.active_adapters if adapter_names is None else adapter_names
        delta = torch.zeros(
            self.out_features,
            self.in_features,
            dtype=torch.float32,
            device=next(iter(self.lora_A.values())).weight.device,
        )
        for name in names:
            if name in self.lora_A:
                delta += (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]
        return delta

    @torch.no_grad()
    def repalettize(self, adapter_names: Optional[list] = None) -> dict:
        """Merge the adapters into the palettized base by re-assigning every weight of ``W + BA`` to its
        nearest entry of the layer's own LUT (LUT and scale unchanged): lossy. Returns the error record."""
        base = self.get_base_layer()
        if not isinstance(base, PalettizedLinear):
            raise PalettizedMergeError(
                _merge_refusal(base)
                if self._base_is_edkm()
                else f"the base layer is a {type(base).__name__}, not palettized: use peft's merge_and_unload() (exact)"
            )
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names) if n in self.lora_A]
        dense = base.dense_weight(torch.float32)
        delta = self.dense_delta(names).to(dense.device)
        target = dense + delta
        lut = base.weight_lut
        scale = None if base.weight_scale is None else base.weight_scale.float()
        spec = ClusteringSpec(bits=base.bits, group_size=base.group_size)
        indices = hard_assign(target, lut.float(), spec, scale=scale).indices
        stored = decode(indices, lut, base.weight_scale, dtype=torch.float32)
        old_indices = base.indices() if hasattr(base, "indices") else None
        base.weight.copy_(pack_indices(indices, base.bits))
        for name in names:
            if self.lora_bias.get(name):
                if base.bias is None:
                    raise PalettizedMergeError("lora_bias=True but the palettized layer has no bias to merge into")
                base.bias.add_(self.lora_B[name].bias.to(base.bias.dtype) * self.scaling[name])
        self.merged_adapters.extend(names)
        delta_norm, error_norm = float(delta.norm()), float((stored - target).norm())
        record = {
            "delta_norm": delta_norm,
            "error_norm": error_norm,
            "relative_error": error_norm / max(float(target.norm()), 1e-30),
            "error_vs_delta": error_norm / delta_norm if delta_norm > 0 else 0.0,
            "changed_indices": None if old_indices is None else float((old_indices != indices).float().mean()),
        }
        return record


def edkm_dispatcher(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> Optional[nn.Module]:
    """A peft LoRA dispatcher: :class:`EDKMLoraLinear` for a palettized or train-time eDKM target, else ``None``
    (peft's own dispatchers decide)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, EDKM_BASE_TYPES):
        return EDKMLoraLinear(target, adapter_name, config=config, **kwargs)
    return None


def dispatch_edkm_layers() -> bool:
    """Put :func:`edkm_dispatcher` in front of peft's LoRA dispatchers (``LoraModel._create_new_module``), so that
    a plain ``peft.LoraConfig`` gives eDKM layers :class:`EDKMLoraLinear` (merging refused clearly, decoding again
    in backward, ...). Idempotent; returns whether the dispatch is in place (``False`` for a peft without
    ``LoraModel._create_new_module``: use :func:`lora_config` there)."""
    create = getattr(lora_model.LoraModel, "_create_new_module", None)
    if create is None:
        return False
    if getattr(create, "edkm_dispatch", False):
        return True

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        module = edkm_dispatcher(target, adapter_name, lora_config, **kwargs)
        return module if module is not None else create(lora_config, adapter_name, target, **kwargs)

    _create_new_module.edkm_dispatch = True
    lora_model.LoraModel._create_new_module = staticmethod(_create_new_module)
    return True


def register_edkm_modules(config: LoraConfig) -> LoraConfig:
    """Register :class:`EDKMLoraLinear` for palettized and train-time eDKM layers on ``config`` (in place)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({base: EDKMLoraLinear for base in EDKM_BASE_TYPES})
    return config


def lora_config(**kwargs) -> LoraConfig:
    """``peft.LoraConfig(**kwargs)`` that knows eDKM layers (``target_modules`` etc. as usual)."""
    return register_edkm_modules(LoraConfig(**kwargs))


def load_adapter(model, adapter_path: str, **kwargs) -> PeftModel:
    """``PeftModel.from_pretrained`` for an adapter trained on an eDKM model, with the eDKM layer mapping
    registered on its config (the same as ``PeftModel.from_pretrained`` once :func:`dispatch_edkm_layers` ran)."""
    config = register_edkm_modules(LoraConfig.from_pretrained(adapter_path))
    return PeftModel.from_pretrained(model, adapter_path, config=config, **kwargs)


def merge_and_repalettize(peft_model, adapter_names: Optional[list] = None):
    """Merge LoRA adapters into a palettized base by re-palettizing (lossy) and unload them.

    Every adapted :class:`PalettizedLinear` gets the indices of ``W + BA`` snapped to its own LUT (the LUT and
    scale do not change, so the checkpoint format and size do not either). Returns ``(model, report)``:
    ``report[layer]`` has ``delta_norm`` (Frobenius norm of ``BA``), ``error_norm`` (of the stored weight minus
    ``W + BA``), ``relative_error`` (error / norm of ``W + BA``), ``error_vs_delta`` (error / delta: 0 is an exact
    merge, about 1 means the adapter was as good as dropped) and ``changed_indices`` (fraction of weights that
    moved to another LUT entry). A summary is logged as a warning. Refuses (before changing anything) if an
    adapted layer is a train-time eDKM layer: palettize first.
    """
    layers = {name: m for name, m in peft_model.named_modules() if isinstance(m, EDKMLoraLinear)}
    train_time = [
        name for name, m in layers.items() if not isinstance(m.get_base_layer(), PalettizedLinear) and m._base_is_edkm()
    ]
    if train_time:
        raise PalettizedMergeError(
            f"{len(train_time)} adapted layer(s) are train-time eDKM layers (e.g. "
            f"{train_time[0]}): call optimum_edkm.palettize(peft_model.get_base_model()) "
            f"first, then merge_and_repalettize"
        )
    if not layers:
        raise PalettizedMergeError(
            "no LoRA layer on a palettized base found: was the adapter created after import optimum_edkm (or with "
            "optimum_edkm.peft.lora_config(...))?"
        )
    report = {name: layer.repalettize(adapter_names) for name, layer in layers.items()}
    model = peft_model.unload()
    ratios = sorted(r["error_vs_delta"] for r in report.values())
    logger.warning(
        "merged LoRA into %d palettized layers by re-palettizing (lossy): error / |BA| median %.3f, "
        "max %.3f; relative weight error max %.2e",
        len(report),
        ratios[len(ratios) // 2],
        ratios[-1],
        max(r["relative_error"] for r in report.values()),
    )
    return model, report
