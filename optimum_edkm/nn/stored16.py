"""The float parts of a palettized model in 16 bits: what is not palettized (a tied embedding / output head kept in
floating point, norms, layers in ``modules_to_not_convert``) is stored in float16 or bfloat16
(``EDKMConfig.float_dtype``) and computed in the model's own dtype (float32 on CPU), with float32 accumulation.

* ``nn.Linear`` -> :class:`Linear16`, ``nn.Embedding`` -> :class:`Embedding16`: their weights stay in 16 bits in
  memory (half the bytes a decoded token reads); ``Linear16`` multiplies with the fused 16-bit GEMV of
  :func:`optimum_edkm.kernels.linear16` (pure-torch ``F.linear`` on an upcast weight elsewhere).
* every other floating-point parameter or buffer (norm weights, biases) keeps the model's dtype in memory and
  holds values rounded to the 16-bit dtype, so the checkpoint stores it in 16 bits without loss.

Only float32 (or wider) tensors are converted: a model that already holds its float parts in 16 bits (a bfloat16
model) keeps them as they are. Tied weights stay tied: modules that share one float weight share one 16-bit
weight.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import linear16

#: the ``EDKMConfig.float_dtype`` values that store the float parts in 16 bits
STORED_16BIT = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _keep_storage_dtype(module: nn.Module, fn, recurse: bool, apply) -> None:
    """``module._apply`` that moves the 16-bit weight and bias between devices but never changes their dtype
    (``model.float()`` / ``.half()`` / ``.to(bfloat16)`` change the compute dtype only). In place (``.data``), so
    that a weight shared with another module stays shared."""
    kept = {name: p.data for name, p in module._parameters.items() if p is not None and p.is_floating_point()}
    apply(fn, recurse)
    for name, before in kept.items():
        parameter = module._parameters[name]
        if parameter.dtype != before.dtype:
            parameter.data = before.to(device=parameter.device)


class Linear16(nn.Linear):
    """An ``nn.Linear`` whose weight (and bias) are stored in float16 / bfloat16; the output has the input's dtype
    and is accumulated in float32 (a float32 weight, e.g. in an export copy, runs ``F.linear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return F.linear(x, self.weight, self.bias)
        return linear16(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        _keep_storage_dtype(self, fn, recurse, super()._apply)
        return self

    @classmethod
    def empty_like(cls, module: nn.Linear, dtype: torch.dtype) -> "Linear16":
        """A ``Linear16`` with ``module``'s shape, its weight on the meta device in ``dtype`` (to load into)."""
        return cls(module.in_features, module.out_features, module.bias is not None, device="meta", dtype=dtype)

    def to_float(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` (``dtype``: float32 by default) with the same values."""
        dtype = dtype or torch.float32
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device)
        linear.weight = nn.Parameter(self.weight.detach().to(dtype), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=self.bias.requires_grad)
        return linear


class Embedding16(nn.Embedding):
    """An ``nn.Embedding`` whose table is stored in float16 / bfloat16; looked-up rows are returned in
    ``output_dtype`` (the model's compute dtype, which ``model.to(dtype)`` changes)."""

    output_dtype: torch.dtype = torch.float32

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids).to(self.output_dtype)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros((), dtype=self.output_dtype, device=self.weight.device))
        _keep_storage_dtype(self, fn, recurse, super()._apply)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.output_dtype = probe.dtype
        return self

    @classmethod
    def empty_like(cls, module: nn.Embedding, dtype: torch.dtype) -> "Embedding16":
        embedding = cls(
            module.num_embeddings,
            module.embedding_dim,
            padding_idx=module.padding_idx,
            max_norm=module.max_norm,
            norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq,
            sparse=module.sparse,
            device="meta",
            dtype=dtype,
        )
        embedding.output_dtype = module.weight.dtype
        return embedding

    def to_float(self, dtype: Optional[torch.dtype] = None) -> nn.Embedding:
        dtype = dtype or self.output_dtype
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        embedding.weight = nn.Parameter(self.weight.detach().to(dtype), requires_grad=self.weight.requires_grad)
        return embedding


_CLASSES_16 = ((nn.Linear, Linear16), (nn.Embedding, Embedding16))


def _wider(tensor: Optional[torch.Tensor], dtype: torch.dtype) -> bool:
    return tensor is not None and tensor.is_floating_point() and tensor.element_size() > torch.finfo(dtype).bits // 8


def _class_16(module: nn.Module, dtype: torch.dtype) -> Optional[type]:
    if isinstance(module, (Linear16, Embedding16)) or not _wider(getattr(module, "weight", None), dtype):
        return None
    for float_class, class_16 in _CLASSES_16:
        # the exact class only: a subclass has a forward of its own (OPT's learned positions take position_ids)
        # that a 16-bit replacement would lose; its tensors are rounded in place like a norm's
        if type(module) is float_class:
            return class_16
    return None


def _float_part_modules(model: nn.Module):
    """``(name, module)`` of the modules whose own tensors are float parts: not converted by eDKM (clustered,
    palettized or a tied head: their tensors, biases included, are the palette's)."""
    for name, module in model.named_modules():
        if getattr(module, "edkm_role", None) is None:
            yield name, module


def store_float_parts_16bit(model: nn.Module, dtype: torch.dtype, *, on_meta: bool = False) -> None:
    """Put the float parts of a palettized ``model`` in 16 bits (``dtype``), in place: ``nn.Linear`` /
    ``nn.Embedding`` become :class:`Linear16` / :class:`Embedding16` holding 16-bit weights, every other float
    tensor is rounded to ``dtype``'s values. ``on_meta``: the model is an empty skeleton a checkpoint is about to
    be loaded into; the 16-bit modules are built on the meta device in ``dtype``, nothing is rounded."""
    replaced = {}  # id(float weight) -> 16-bit parameter (tied weights stay tied)
    for name, module in list(_float_part_modules(model)):
        class_16 = _class_16(module, dtype)
        if class_16 is None:
            continue
        new = class_16.empty_like(module, dtype)
        for key in ("weight", "bias"):
            source = getattr(module, key, None)
            if source is None or on_meta:
                continue
            if id(source) not in replaced:
                replaced[id(source)] = nn.Parameter(source.detach().to(dtype), requires_grad=source.requires_grad)
            setattr(new, key, replaced[id(source)])
        new.train(module.training)
        model.set_submodule(name, new)
    if on_meta:
        return
    with torch.no_grad():
        for _, module in _float_part_modules(model):
            if isinstance(module, (Linear16, Embedding16)):
                continue
            tensors = list(module._parameters.values()) + [
                b for key, b in module._buffers.items() if key not in module._non_persistent_buffers_set
            ]
            for tensor in tensors:
                if _wider(tensor, dtype):
                    tensor.copy_(tensor.to(dtype))


def float_part_keys(model: nn.Module, dtype: torch.dtype) -> set:
    """State-dict keys of the float parts of ``model`` wider than ``dtype`` (the tensors a checkpoint stores in
    ``dtype``, ``EDKMConfig.float_dtype``)."""
    keys = set()
    for name, module in _float_part_modules(model):
        prefix = f"{name}." if name else ""
        for key, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if _wider(tensor, dtype) and key not in module._non_persistent_buffers_set:
                keys.add(prefix + key)
    return keys
