"""The torch graph of the Core ML generation package: a causal LM whose KV cache lives in two buffers updated in
place, which ``ct.convert`` turns into Core ML states (iOS18 ``ct.StateType``), and the greedy loop that drives
it (the same loop drives the converted package on macOS).

One call of :class:`StatefulCausalLM` processes ``q`` new tokens after ``end - q`` cached ones, ``end`` being
the last size of the additive ``causal_mask`` input ``[batch, 1, q, end]`` (the pattern of coremltools'
stateful-model guide): it writes their keys and values into ``key_cache[:, :, :, end - q:end]`` /
``value_cache[...]``, attends over ``[:end]`` and returns the logits of the last position. The prompt
(prefill, ``q`` = prompt length) and each new token (decode, ``q = 1``) go through the same function.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from transformers.cache_utils import Cache, CacheLayerMixin

from .common import KEY_CACHE, VALUE_CACHE, WRAPPER_ATTRIBUTE
from .errors import CoreMLExportError


@dataclass(frozen=True)
class CacheGeometry:
    """Shape of the KV cache: ``[layers, batch, kv_heads, context_length, head_dim]`` for keys and values."""

    layers: int
    kv_heads: int
    head_dim: int

    def shape(self, batch_size: int, context_length: int) -> tuple:
        return (self.layers, batch_size, self.kv_heads, context_length, self.head_dim)


def _cache_argument(model: nn.Module) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _ProbeLayer(CacheLayerMixin):
    def __init__(self, shapes: dict, layer_idx: int):
        super().__init__()
        self.shapes, self.layer_idx = shapes, layer_idx

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.shapes[self.layer_idx] = (tuple(key_states.shape), tuple(value_states.shape))
        return key_states, value_states

    def get_mask_sizes(self, query_length: int):
        return query_length, 0

    def get_seq_length(self):
        return 0

    def get_max_length(self):
        return -1


@torch.no_grad()
def cache_geometry(model: nn.Module) -> CacheGeometry:
    """The KV-cache geometry of ``model``, measured by one forward pass of one token with a recording cache; refuses
    architectures whose layers do not all cache full-attention keys and values of one shape."""
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise CoreMLExportError(
            f"the generation export keeps one full-attention KV cache per layer; this model has "
            f"layer types {sorted(layer_types)}: export it with generate=False (fixed window)"
        )
    layers = int(config.num_hidden_layers)
    shapes = {}
    probe = Cache(layers=[_ProbeLayer(shapes, index) for index in range(layers)])
    device = next(model.parameters()).device
    model(
        input_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
        attention_mask=torch.zeros(1, 1, 1, 1, device=device),
        position_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
        use_cache=True,
        return_dict=True,
        **{_cache_argument(model): probe},
    )
    distinct = set(shapes.values())
    if len(shapes) != layers or len(distinct) != 1:
        raise CoreMLExportError(
            f"{type(model).__name__} updated the KV cache of {len(shapes)} of {layers} layers with "
            f"shapes {sorted(distinct)}; the generation export needs one key and one value of the "
            f"same shape per layer: export it with generate=False (fixed window)"
        )
    ((key_shape, value_shape),) = distinct
    if key_shape != value_shape or len(key_shape) != 4:
        raise CoreMLExportError(
            f"keys {key_shape} and values {value_shape} of different shapes cannot share one "
            f"cache layout: export it with generate=False (fixed window)"
        )
    return CacheGeometry(layers=layers, kv_heads=key_shape[1], head_dim=key_shape[3])


class _SliceLayer(CacheLayerMixin):
    """Layer ``layer_idx`` of the wrapper's stacked cache buffers, for one call covering positions ``[start, end)``."""

    def __init__(self, owner: "StatefulCausalLM", layer_idx: int, start, end):
        super().__init__()
        self.owner, self.layer_idx, self.start, self.end = owner, layer_idx, start, end

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = getattr(self.owner, KEY_CACHE), getattr(self.owner, VALUE_CACHE)
        # in place on the registered buffers: what ct.convert turns into read_state / slice_update / write_state
        keys[self.layer_idx, :, :, self.start : self.end] = key_states
        values[self.layer_idx, :, :, self.start : self.end] = value_states
        return keys[self.layer_idx, :, :, : self.end], values[self.layer_idx, :, :, : self.end]

    def get_mask_sizes(self, query_length: int):
        return self.end, 0

    def get_seq_length(self):
        return self.start

    def get_max_length(self):
        return getattr(self.owner, KEY_CACHE).shape[3]


class StatefulCausalLM(nn.Module):
    """A causal LM with its KV cache as two registered buffers (``key_cache``, ``value_cache``: fp32 in torch,
    Core ML states in fp16 after conversion), updated in place.

    ``forward(input_ids [batch, q], causal_mask [batch, 1, q, end]) -> logits [batch, 1, vocab]`` of the last
    position; the ``q`` new tokens take positions ``end - q ... end - 1``. Build the mask with
    :func:`causal_mask`.
    """

    def __init__(
        self, model: nn.Module, context_length: int, batch_size: int = 1, geometry: Optional[CacheGeometry] = None
    ):
        super().__init__()
        setattr(self, WRAPPER_ATTRIBUTE, model)
        self.geometry = geometry or cache_geometry(model)
        self.context_length, self.batch_size = context_length, batch_size
        self._cache_argument = _cache_argument(model)
        shape = self.geometry.shape(batch_size, context_length)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.register_buffer(KEY_CACHE, torch.zeros(shape, dtype=dtype))
        self.register_buffer(VALUE_CACHE, torch.zeros(shape, dtype=dtype))

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        model = getattr(self, WRAPPER_ATTRIBUTE)
        # from the input shapes, so that the traced graph keeps them symbolic (flexible shapes in Core ML)
        end = causal_mask.shape[-1]
        start = end - input_ids.shape[-1]
        cache = Cache(layers=[_SliceLayer(self, index, start, end) for index in range(self.geometry.layers)])
        position_ids = torch.arange(start, end, device=input_ids.device).unsqueeze(0)
        return model(
            input_ids=input_ids,
            attention_mask=causal_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            return_dict=False,
            **{self._cache_argument: cache},
        )[0]


def causal_mask(past: int, new: int, batch_size: int = 1, dtype=np.float16) -> np.ndarray:
    """The additive mask for ``new`` tokens after ``past`` cached ones: ``[batch, 1, new, past + new]``, 0 where
    token ``past + i`` may attend to position ``j`` (``j <= past + i``), ``-inf`` elsewhere."""
    rows = past + np.arange(new)[:, None]
    mask = np.where(np.arange(past + new)[None, :] <= rows, 0.0, -np.inf).astype(dtype)
    return np.broadcast_to(mask, (batch_size, 1, new, past + new)).copy()


def _eos_ids(eos_token_id) -> list:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, (int, np.integer)):
        return [int(eos_token_id)]
    return [int(t) for t in eos_token_id]


StepFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]


def greedy_generate(
    step: StepFunction,
    prompt_ids,
    max_new_tokens: int,
    context_length: int,
    eos_token_id=None,
    on_token: Optional[Callable[[int], None]] = None,
) -> list:
    """Greedy decoding through a stateful step ``step(input_ids int32 [1, q], causal_mask fp16 [1, 1, q, end]) ->
    logits [1, 1, vocab]`` whose cache is empty at the start: the prompt in one call, then one call per token.
    Stops after ``max_new_tokens`` or after emitting an EOS token (which is returned, as ``generate`` does).
    ``on_token`` is called with each new token as soon as it is chosen. Returns the new token ids."""
    prompt = [int(t) for t in np.asarray(prompt_ids).reshape(-1)]
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    if len(prompt) + max_new_tokens - 1 > context_length:
        raise ValueError(
            f"{len(prompt)} prompt tokens + {max_new_tokens} new tokens exceed the package's context "
            f"length {context_length}: shorten the prompt or generate fewer tokens"
        )
    stop = set(_eos_ids(eos_token_id))
    tokens, past, pending = [], 0, prompt
    while len(tokens) < max_new_tokens:
        ids = np.asarray([pending], dtype=np.int32)
        logits = np.asarray(step(ids, causal_mask(past, len(pending))), dtype=np.float32)
        past += len(pending)
        token = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop:
            break
        pending = [token]
    return tokens


def torch_step(module: nn.Module) -> StepFunction:
    """``step`` for :func:`greedy_generate` from a :class:`StatefulCausalLM` (or its traced module). A call with
    nothing cached (``end == q``) starts a new sequence: the cache is emptied first, as a fresh ``MLState`` is."""

    @torch.no_grad()
    def step(input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if mask.shape[-1] == input_ids.shape[-1]:
            reset_cache(module)
        dtype = getattr(module, KEY_CACHE).dtype
        logits = module(
            torch.from_numpy(input_ids.astype(np.int64)), torch.from_numpy(mask.astype(np.float32)).to(dtype)
        )
        return logits.float().numpy()

    return step


def reset_cache(module: nn.Module) -> None:
    """Zero the cache buffers of a :class:`StatefulCausalLM` or of its traced module."""
    with torch.no_grad():
        getattr(module, KEY_CACHE).zero_()
        getattr(module, VALUE_CACHE).zero_()


@torch.no_grad()
def reference_generate(model: nn.Module, prompt_ids, max_new_tokens: int, eos_token_id=None) -> list:
    """``model.generate`` in plain greedy mode (no sampling, beams or penalties from the model's generation config);
    returns the new token ids."""
    from transformers import GenerationConfig

    prompt = torch.as_tensor(np.asarray(prompt_ids).reshape(1, -1), dtype=torch.long)
    stop = _eos_ids(eos_token_id)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stop or None,
        pad_token_id=stop[0] if stop else 0,
    )
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    return [int(t) for t in output[0, prompt.shape[1] :]]


def check_greedy_tokens(
    model: nn.Module, steps: dict, prompt_ids, max_new_tokens: int, context_length: int, eos_token_id=None
) -> list:
    """Every ``{label: step}`` must generate ``model.generate``'s greedy tokens exactly; returns those tokens.
    Raises :class:`CoreMLExportError` naming the first difference otherwise."""
    expected = reference_generate(model, prompt_ids, max_new_tokens, eos_token_id)
    for label, step in steps.items():
        tokens = greedy_generate(step, prompt_ids, max_new_tokens, context_length, eos_token_id)
        if tokens != expected:
            at = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected)))
            raise CoreMLExportError(
                f"the {label} does not generate model.generate's greedy tokens: they differ at new token {at} "
                f"({tokens[at : at + 4]} vs {expected[at : at + 4]}); the model's attention does not take the explicit "
                f"KV cache and 4-D mask of the generation export: export it with generate=False (fixed window)"
            )
    return expected
