"""Driving a decoder-only transformers model one decoder layer at a time on calibration batches.

What GPTQ, AWQ and post-training palettization share: find the decoder layers, replay each layer's own calls
(:func:`layer_by_layer`), collect the inputs of the linears inside a layer (:func:`input_hessians`,
:func:`for_each_hessian`) in the order the layer computes them (:func:`sequential_groups`).

Every decoder layer's calls are captured with forward pre-hooks registered ``with_kwargs=True``: transformers 5
passes the rotary ``position_embeddings``, the ``attention_mask`` and the cache arguments as keyword arguments,
and models that mix layer types (``config.layer_types``: ``"full_attention"`` / ``"sliding_attention"`` in
Gemma 2 / 3, Mistral or Qwen with a sliding window) give each layer the mask, and in Gemma 3 the rotary
embeddings, of its own type. Each layer is therefore replayed with its own arguments and only its hidden states
replaced by the previous layer's output.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


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

    def with_hidden_states(self, hidden_states: Optional[torch.Tensor]) -> "LayerCall":
        if self.args:
            return LayerCall((hidden_states,) + tuple(self.args[1:]), self.kwargs)
        return LayerCall((), {**self.kwargs, "hidden_states": hidden_states})


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a decoder-only transformers model: the ``nn.ModuleList`` of
    ``config.num_hidden_layers`` modules inside ``model.get_decoder()`` (``model.model.layers`` in Llama and its
    relatives, ``transformer.h`` in GPT-2, ``gpt_neox.layers``, ``model.decoder.layers`` in OPT)."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model; layer-by-layer calibration drives decoder-only causal LMs"
        )
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    count = getattr(text_config, "num_hidden_layers", None)
    found = [
        child
        for child in (decoder.children() if isinstance(decoder, nn.Module) else ())
        if isinstance(child, nn.ModuleList) and len(child) > 0 and len(child) == count
    ]
    if len(found) != 1:
        raise ValueError(
            f"{name} has no decoder layers that layer-by-layer calibration can find (a list of "
            f"config.num_hidden_layers modules in model.get_decoder(): model.model.layers in Llama, transformer.h in "
            f"GPT-2, ...); it drives decoder-only transformers causal LMs (Llama, Mistral, Qwen, Gemma, Phi-3, GPT-2, "
            f"GPT-NeoX, OPT and relatives)"
        )
    return found[0]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def named_linears(module: nn.Module) -> dict[str, nn.Module]:
    """The modules inside ``module`` that compute ``x W^T`` with a float weight: ``nn.Linear`` and transformers'
    ``Conv1D`` (GPT-2, weight stored ``[in, out]``); see :func:`weight_rows`."""
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and m.weight.is_floating_point()
    }


def weight_rows(linear: nn.Module) -> torch.Tensor:
    """The weight of a :func:`named_linears` module with output channels on dim 0 (a transposed view of a
    ``Conv1D`` weight: writing into it writes the weight)."""
    return linear.weight.t() if isinstance(linear, Conv1D) else linear.weight


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


def check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


@torch.no_grad()
def capture_layer_calls(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> list[list[LayerCall]]:
    """Every decoder layer's calls on ``input_ids`` (in batches of ``batch_size``), one per batch, as the model
    makes them. The first layer's calls hold its hidden states; the other layers' hold ``None`` in their place
    (they get the previous layer's output when they are replayed). The forward of each batch stops at the last
    layer (no final norm, no logits)."""
    check_calibration_ids(input_ids)
    check_batch_size(batch_size)
    layers = decoder_layers(model)
    device = model_device(model)
    calls: list[list[LayerCall]] = [[] for _ in layers]

    def recorder(index: int):
        def record(_module, args, kwargs):
            call = LayerCall(tuple(args), dict(kwargs))
            calls[index].append(call if index == 0 else call.with_hidden_states(None))
            if index == len(layers) - 1:
                raise StopForward

        return record

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    counts = {len(layer_calls) for layer_calls in calls}
    if counts != {len(input_ids.split(batch_size))}:
        raise RuntimeError(
            "not every decoder layer was called once per calibration batch; this model cannot be calibrated"
        )
    return calls


def layer_output(output) -> torch.Tensor:
    """A decoder layer (or attention module) returns a tensor in transformers 5, a tuple in older versions."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_layer(layer: nn.Module, calls: list[LayerCall]) -> list[torch.Tensor]:
    return [layer_output(layer(*call.args, **call.kwargs)) for call in calls]


@dataclasses.dataclass
class LayerStep:
    """One decoder layer of :func:`layer_by_layer`: the layer, its number and its calibration calls."""

    index: int
    layer: nn.Module
    calls: list[LayerCall]
    #: what the next layer reads: ``None`` runs this layer on ``calls`` as the caller left it (GPTQ: the
    #: quantized layer's outputs); a caller may set the outputs it computed instead (AWQ: the float layer's)
    outputs: Optional[list] = None


def layer_by_layer(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> Iterator[LayerStep]:
    """The decoder layers of ``model`` in order, each with its calls on the calibration ``input_ids``: its own
    keyword arguments (attention mask, position embeddings) and the hidden states the previous layer produced
    after the caller's work on it (see :attr:`LayerStep.outputs`)."""
    templates = capture_layer_calls(model, input_ids, batch_size)
    calls = templates[0]
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        step = LayerStep(index, layer, calls)
        yield step
        if index + 1 < len(layers):
            outputs = step.outputs if step.outputs is not None else run_layer(layer, calls)
            calls = [template.with_hidden_states(output) for template, output in zip(templates[index + 1], outputs)]


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
    layer: nn.Module, call: LayerCall, linears: Optional[dict[str, nn.Module]] = None
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
