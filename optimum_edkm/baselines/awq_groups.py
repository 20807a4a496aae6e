"""AWQ's scaling groups: which linears share an input whose scale can be folded into the operation before them.

This is architecture knowledge (the reference code keeps one table per model family). A group is
``previous -> linears -> inspect``: the linears all read ``previous``'s output, their input columns are scaled by
``s`` and ``previous``'s output by ``1/s`` (a norm's weight, or a linear's last output rows), and the scale is
judged on ``inspect``'s output. Supported decoder layers, recognised by their submodules:

* Llama-style (Llama, Mistral, Qwen2/3, SmolLM): ``input_layernorm -> q,k,v -> self_attn``;
  ``v_proj -> o_proj`` when the two weights have the same shape (no grouped-query attention);
  ``post_attention_layernorm -> gate,up -> mlp``; ``up_proj -> down_proj``;
* Gemma 2/3 (sandwich norms): as Llama, but the MLP reads ``pre_feedforward_layernorm`` (Gemma's
  ``post_attention_layernorm`` normalises the attention *output*), and the RMSNorms multiply by ``1 + weight``;
* Phi-3 (fused projections): ``input_layernorm -> qkv_proj``; ``qkv_proj``'s value rows ``-> o_proj`` without
  grouped-query attention; ``post_attention_layernorm -> gate_up_proj``; ``gate_up_proj``'s up rows ``-> down_proj``;
* OPT: ``self_attn_layer_norm -> q,k,v``; ``v_proj -> out_proj``; ``final_layer_norm -> fc1``; ``fc1 -> fc2`` with
  a ReLU between (``relu(x / s) = relu(x) / s``).

Anything else (GPT-2's ``Conv1D`` blocks, GPT-NeoX's parallel residual, ...) is refused by name.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class ScalingGroup:
    previous: str
    linears: tuple
    inspect: str
    #: a norm ``previous`` multiplies by ``offset + weight`` (0: LayerNorm, Llama's RMSNorm; 1: Gemma's RMSNorm);
    #: ``None`` for a linear ``previous``
    norm_offset: Optional[float] = None


_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def scaling_groups(layer: nn.Module, model: Optional[nn.Module] = None) -> list[ScalingGroup]:
    """The scaling groups of a decoder layer; a ``ValueError`` naming the layer for an unsupported one."""
    present = dict(layer.named_modules())

    def has(*names: str) -> bool:
        return all(name in present for name in names)

    def same_shape(first: str, second: str) -> bool:
        return present[first].weight.shape == present[second].weight.shape

    groups: list[tuple] = []
    if has("input_layernorm", "self_attn", *_ATTENTION, "self_attn.o_proj", "mlp", "mlp.gate_proj", "mlp.up_proj"):
        mlp_norm = "pre_feedforward_layernorm" if has("pre_feedforward_layernorm") else "post_attention_layernorm"
        if has(mlp_norm, "mlp.down_proj"):
            groups = [("input_layernorm", _ATTENTION, "self_attn")]
            if same_shape("self_attn.v_proj", "self_attn.o_proj"):
                groups.append(("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
            groups += [
                (mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
                ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
            ]
    elif has(
        "input_layernorm", "post_attention_layernorm", "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj"
    ):
        groups = [("input_layernorm", ("self_attn.qkv_proj",), "self_attn")]
        if present["self_attn.qkv_proj"].out_features == 3 * present["self_attn.o_proj"].in_features:
            groups.append(("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj"))  # v: the last third
        groups += [
            ("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
            ("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj"),  # up: the second half
        ]
    elif has("self_attn_layer_norm", "self_attn", *_ATTENTION, "self_attn.out_proj", "final_layer_norm", "fc1", "fc2"):
        groups = [("self_attn_layer_norm", _ATTENTION, "self_attn")]
        if same_shape("self_attn.v_proj", "self_attn.out_proj"):
            groups.append(("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"))
        groups.append(("final_layer_norm", ("fc1",), "fc1"))
        if isinstance(getattr(layer, "activation_fn", None), nn.ReLU):
            groups.append(("fc1", ("fc2",), "fc2"))
    if not groups or not all(isinstance(present[name], nn.Linear) for group in groups for name in group[1]):
        owner = f" of {type(model).__name__}" if model is not None else ""
        raise ValueError(
            f"AWQ's scaling groups are defined for Llama-style (Llama, Mistral, Qwen, SmolLM), Gemma 2/3, Phi-3 and "
            f"OPT decoder layers; {type(layer).__name__}{owner} is none of them: use gptq() or rtn() for this model"
        )
    return [
        ScalingGroup(
            previous,
            linears,
            inspect,
            None if isinstance(present[previous], nn.Linear) else norm_weight_offset(present[previous], previous),
        )
        for previous, linears, inspect in groups
    ]


@torch.no_grad()
def norm_weight_offset(norm: nn.Module, name: str = "norm") -> float:
    """0 if ``norm`` multiplies the normalised input by its weight (LayerNorm, Llama's RMSNorm), 1 if by
    ``1 + weight`` (Gemma's RMSNorm): found by the weight value that makes the output zero (bias zeroed)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"AWQ folds scales into {name}'s weight, but {type(norm).__name__} has no 1-D weight")
    bias = getattr(norm, "bias", None)
    saved = [(tensor, tensor.detach().clone()) for tensor in (weight, bias) if isinstance(tensor, torch.Tensor)]
    probe = torch.randn(2, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
    try:
        if bias is not None:
            bias.zero_()
        for offset in (0.0, 1.0):
            weight.fill_(-offset)
            if not bool(norm(probe).any()):
                return offset
    finally:
        for tensor, value in saved:
            tensor.copy_(value)
    raise ValueError(
        f"{name} ({type(norm).__name__}) multiplies by neither its weight nor 1 + weight; AWQ cannot fold scales "
        f"into it"
    )


@torch.no_grad()
def fold_scales(layer: nn.Module, group: ScalingGroup, scales: torch.Tensor) -> None:
    """``1/s`` into ``group.previous``'s output, ``s`` into the linears' input columns."""
    previous = layer.get_submodule(group.previous)
    if group.norm_offset is None:
        previous.weight[-scales.numel() :].div_(scales.to(previous.weight.dtype).view(-1, 1))
        if previous.bias is not None:
            previous.bias[-scales.numel() :].div_(scales.to(previous.bias.dtype))
    elif group.norm_offset == 0:
        previous.weight.div_(scales.to(previous.weight.dtype))
    else:
        offset = group.norm_offset
        previous.weight.copy_((previous.weight.float() + offset) / scales.float() - offset)
    if group.norm_offset is not None and getattr(previous, "bias", None) is not None:
        previous.bias.div_(scales.to(previous.bias.dtype))
    for name in group.linears:
        linear = layer.get_submodule(name)
        linear.weight.mul_(scales.to(linear.weight.dtype).view(1, -1))
