"""Driving a decoder-only transformers model one decoder layer at a time (what GPTQ and AWQ need).

The decoder layers are ``model.model.layers`` (Llama, Mistral, Qwen2, SmolLM, ...). The inputs of the first
layer are captured with a forward pre-hook registered ``with_kwargs=True``: transformers 5 passes the rotary
``position_embeddings``, ``attention_mask``, ``position_ids`` and cache arguments as keyword arguments, and they
must be replayed for every layer. The forward stops as soon as they are captured.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook to end a forward pass once what it needed was seen."""


@dataclasses.dataclass
class LayerCall:
    """The positional and keyword arguments of one decoder-layer call (one calibration batch)."""

    args: tuple
    kwargs: dict

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden_states(self, hidden_states: torch.Tensor) -> "LayerCall":
        if self.args:
            return LayerCall((hidden_states,) + tuple(self.args[1:]), self.kwargs)
        return LayerCall((), {**self.kwargs, "hidden_states": hidden_states})


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{type(model).__name__} has no decoder layers at model.model.layers; GPTQ and AWQ here drive "
            f"decoder-only transformers causal LMs (LlamaForCausalLM and relatives)"
        )
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if layer_types is not None and len(set(layer_types)) > 1:
        raise ValueError(
            f"the model mixes decoder layer types {sorted(set(layer_types))}; the layer-by-layer driver replays the "
            f"first layer's keyword arguments (attention mask) for every layer, which is only right when all "
            f"layers are of one type"
        )
    return layers


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def named_linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def check_calibration_ids(input_ids) -> torch.Tensor:
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.is_floating_point()
        or input_ids.numel() == 0
    ):
        raise ValueError(
            f"calibration input_ids must be a non-empty [n_samples, seq_len] integer tensor, got "
            f"{getattr(input_ids, 'dtype', type(input_ids))} of shape {tuple(getattr(input_ids, 'shape', ()))}"
        )
    return input_ids


@torch.no_grad()
def capture_first_layer_calls(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> list[LayerCall]:
    """Run the model on ``input_ids`` in batches up to the first decoder layer; return that layer's calls."""
    check_calibration_ids(input_ids)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    layers = decoder_layers(model)
    device = model_device(model)
    calls: list[LayerCall] = []

    def catch(_module, args, kwargs):
        calls.append(LayerCall(tuple(args), dict(kwargs)))
        raise StopForward

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return calls


def layer_output(output) -> torch.Tensor:
    """A decoder layer (or attention module) returns a tensor in transformers 5, a tuple in older versions."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_layer(layer: nn.Module, calls: list[LayerCall]) -> list[torch.Tensor]:
    return [layer_output(layer(*call.args, **call.kwargs)) for call in calls]


def next_layer_calls(calls: list[LayerCall], outputs: list[torch.Tensor]) -> list[LayerCall]:
    """The next decoder layer's calls: each call with its hidden states replaced by this layer's output."""
    return [call.with_hidden_states(output) for call, output in zip(calls, outputs)]


@torch.no_grad()
def run_until(
    layer: nn.Module,
    calls: list[LayerCall],
    watched: dict[str, nn.Module],
    on_input: Callable[[str, torch.Tensor], None],
) -> None:
    """Run ``layer`` on every call, passing each watched module's input to ``on_input``; each forward stops once
    every watched module has run (later modules are not needed)."""
    seen: set = set()

    def make_hook(name: str):
        def hook(_module, args):
            on_input(name, args[0])
            seen.add(name)
            if len(seen) == len(watched):
                raise StopForward

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in watched.items()]
    try:
        for call in calls:
            seen.clear()
            try:
                layer(*call.args, **call.kwargs)
            except StopForward:
                continue
            missing = sorted(set(watched) - seen)
            raise RuntimeError(f"modules {missing} were never called in the layer's forward; they cannot be calibrated")
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def sequential_groups(
    layer: nn.Module, call: LayerCall, linears: Optional[dict[str, nn.Linear]] = None
) -> list[list[str]]:
    """The layer's linears in execution order, grouped when consecutive ones read the same input tensor
    (q/k/v; gate/up): GPTQ's "true sequential" order, found by running the layer once."""
    linears = named_linears(layer) if linears is None else linears
    # keep the input tensors themselves: comparing ids of freed tensors could match a reused address
    order: list[tuple[str, torch.Tensor]] = []

    def make_hook(name: str):
        def hook(_module, args):
            order.append((name, args[0]))

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in linears.items()]
    try:
        layer(*call.args, **call.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    previous_input = None
    for name, inputs in order:
        if any(name in group for group in groups):
            continue
        if groups and inputs is previous_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous_input = inputs
    missing = sorted(set(linears) - {name for group in groups for name in group})
    if missing:
        raise RuntimeError(f"linears {missing} are never called in the layer's forward; they cannot be calibrated")
    return groups


@torch.no_grad()
def input_hessians(layer: nn.Module, calls: list[LayerCall], watched: dict[str, nn.Module]) -> dict:
    """``{name: 2/N X^T X}`` of each watched module's inputs over the calibration calls: GPTQ's Hessian of the
    layer-wise squared error (float32; float64 for float64 inputs)."""
    gram: dict = dict.fromkeys(watched)
    tokens = dict.fromkeys(watched, 0)

    def accumulate(name: str, inputs: torch.Tensor):
        x = inputs.reshape(-1, inputs.shape[-1])
        x = x.double() if x.dtype == torch.float64 else x.float()
        gram[name] = x.T @ x if gram[name] is None else gram[name] + x.T @ x
        tokens[name] += x.shape[0]

    run_until(layer, calls, watched, accumulate)
    return {name: 2 * gram[name] / tokens[name] for name in watched}


def for_each_hessian(
    layer: nn.Module,
    calls: list[LayerCall],
    visit: Callable[[nn.Module, torch.Tensor], None],
    linears: Optional[dict[str, nn.Module]] = None,
    true_sequential: bool = True,
) -> None:
    """``visit(linear, 2/N X^T X)`` for every linear of ``linears`` (default: all of the layer's), group by group
    of :func:`sequential_groups` (with ``true_sequential=False`` one group of all). A group's Hessians are
    computed once the groups before it are visited, so they see the inputs produced by the linears ``visit`` has
    already changed."""
    linears = named_linears(layer) if linears is None else linears
    groups = sequential_groups(layer, calls[0], linears) if true_sequential else [list(linears)]
    for group in groups:
        hessians = input_hessians(layer, calls, {name: linears[name] for name in group})
        for name in group:
            visit(linears[name], hessians[name])
        del hessians
