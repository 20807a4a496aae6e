"""Token-weighted perplexity of a causal LM on one token stream, with a fixed context length and stride.

The windowing is the one of Hugging Face's perplexity guide ("Perplexity of fixed-length models") and of
lm-eval's rolling log-likelihood: windows of ``context_length`` tokens start every ``stride`` tokens; each
window scores only the tokens the previous window did not score, so every token after the first is scored
exactly once, with at least ``context_length - stride`` tokens of context (except near the start). With
``stride == context_length`` the windows do not overlap and the first token of each window is not scored
(it has no context inside its window), as in the GPTQ paper's evaluation. The result is
``exp(sum of token NLLs / number of scored tokens)``: windows are weighted by the tokens they score, not
averaged per window.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class Window(NamedTuple):
    """Tokens ``[begin, end)`` are fed to the model; tokens ``[first_scored, end)`` are scored."""

    begin: int
    end: int
    first_scored: int


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    scored_tokens: int
    total_tokens: int
    context_length: int
    stride: int
    windows: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def perplexity_windows(n_tokens: int, context_length: int, stride: Optional[int] = None) -> list[Window]:
    """The evaluation windows for a stream of ``n_tokens`` (``stride`` defaults to ``context_length``)."""
    stride = context_length if stride is None else stride
    for value, what in ((n_tokens, "n_tokens"), (context_length, "context_length"), (stride, "stride")):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{what} must be an integer, got {value!r}")
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (one token of context, one to score), got {context_length}")
    if not 1 <= stride <= context_length:
        raise ValueError(
            f"stride must be between 1 and context_length={context_length} (a larger stride would skip tokens), "
            f"got {stride}"
        )
    if n_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n_tokens}")
    windows = []
    begin = previous_end = 0
    while True:
        end = min(begin + context_length, n_tokens)
        first_scored = max(previous_end, begin + 1)
        if end > first_scored:
            windows.append(Window(begin, end, first_scored))
        if end == n_tokens:
            return windows
        previous_end = end
        begin += stride


@torch.no_grad()
def evaluate_perplexity(
    model,
    token_ids: torch.Tensor,
    context_length: int = 512,
    stride: Optional[int] = None,
    batch_size: int = 4,
    progress: bool = True,
    description: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of ``model`` (any causal LM returning ``.logits``) on the 1-D stream ``token_ids``.

    Windows of equal length are batched ``batch_size`` at a time; batching does not change the result.
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1 or token_ids.is_floating_point():
        raise ValueError(
            f"token_ids must be a 1-D integer tensor (one token stream), got "
            f"{getattr(token_ids, 'dtype', type(token_ids))} of shape {tuple(getattr(token_ids, 'shape', ()))}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and context_length > max_positions:
        raise ValueError(
            f"context_length={context_length} exceeds the model's max_position_embeddings={max_positions}; "
            f"use a context_length <= {max_positions}"
        )
    windows = perplexity_windows(token_ids.numel(), context_length, stride)
    check_token_ids(token_ids, model)
    device = next(model.parameters()).device
    token_ids = token_ids.to(device=device, dtype=torch.long)

    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    scored = 0
    try:
        with tqdm(total=len(windows), desc=description, unit="window", disable=not progress) as bar:
            for batch in _batches_of_equal_length(windows, batch_size):
                inputs = torch.stack([token_ids[w.begin : w.end] for w in batch])
                logits = model(input_ids=inputs, use_cache=False).logits
                for row, window in enumerate(batch):
                    # the logits at position p predict the token at position p + 1
                    start, stop = window.first_scored - window.begin, window.end - window.begin
                    nll = F.cross_entropy(
                        logits[row, start - 1 : stop - 1].float(), inputs[row, start:stop], reduction="sum"
                    )
                    total_nll += nll.double().cpu()
                    scored += stop - start
                bar.update(len(batch))
    finally:
        model.train(was_training)
    mean_nll = float(total_nll) / scored
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        scored_tokens=scored,
        total_tokens=int(token_ids.numel()),
        context_length=context_length,
        stride=context_length if stride is None else stride,
        windows=len(windows),
    )


def check_token_ids(token_ids: torch.Tensor, model) -> None:
    """Token ids must lie in ``[0, vocab_size)`` of the model's input embedding: an id beyond it would index out
    of range in the forward pass (a crash deep in torch, or on GPU an asynchronous device assert)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None or token_ids.numel() == 0:
        return
    low, high = int(token_ids.min()), int(token_ids.max())
    if low < 0 or high >= vocab:
        bad = int(((token_ids < 0) | (token_ids >= vocab)).sum())
        raise ValueError(
            f"token_ids hold {bad} id(s) outside the model's vocabulary [0, {vocab}) (smallest {low}, largest "
            f"{high}); tokenize the text with this model's tokenizer"
        )


def _batches_of_equal_length(windows: list[Window], batch_size: int):
    batch: list[Window] = []
    for window in windows:
        if batch and (len(batch) == batch_size or window.end - window.begin != batch[0].end - batch[0].begin):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch
