"""Distillation losses: per-token divergences between a student's and a teacher's next-token distributions
(pure torch; :class:`optimum_edkm.EDKMTrainer` uses them, :mod:`optimum_edkm.distillation` makes teacher text).

Forward KL ``KL(teacher || student)`` (LLM-QAT's loss), reverse KL, Jensen-Shannon, and BitDistiller's
confidence-aware mix (CAKLD); :func:`distillation_term` averages one over the positions the causal LM loss
counts.
"""

from __future__ import annotations

from typing import Optional

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "cakld")


def _check_divergence(kind: str) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"distillation loss must be one of {DIVERGENCES}, got {kind!r}")


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: Optional[float] = None,
) -> torch.Tensor:
    """Divergence between the next-token distributions, one value per position (shape of the logits less the
    vocabulary dimension), computed in float32 at ``temperature``:

    * ``"forward_kl"``: ``KL(T || S) = sum T (log T - log S)`` (mass-covering; LLM-QAT);
    * ``"reverse_kl"``: ``KL(S || T)`` (mode-seeking);
    * ``"jsd"``: ``(KL(T || M) + KL(S || M)) / 2`` with ``M = (T + S) / 2``;
    * ``"cakld"``: ``beta * KL(S || T) + (1 - beta) * KL(T || S)`` (BitDistiller); ``beta`` defaults to the
      teacher's mean top-1 probability over the positions given (its confidence).
    """
    _check_divergence(kind)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)} (same tokenizer and inputs needed)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "reverse_kl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if kind == "jsd":
        p_s, p_t = log_s.exp(), log_t.exp()
        log_m = torch.log((p_s + p_t) / 2).clamp_min(torch.finfo(torch.float32).min)
        return ((p_t * (log_t - log_m)).sum(-1) + (p_s * (log_s - log_m)).sum(-1)) / 2
    p_t = log_t.exp()
    if beta is None:
        beta = float(p_t.detach().amax(-1).mean())
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    forward = (p_t * (log_t - log_s)).sum(-1)
    reverse = (log_s.exp() * (log_s - log_t)).sum(-1)
    return beta * reverse + (1 - beta) * forward


def label_mask(labels: Optional[torch.Tensor], shape) -> torch.Tensor:
    """1 where the next token is a label (the positions a causal LM loss counts: logits at ``t`` predict
    ``labels[t + 1]``, ``-100`` is ignored), else 0; all ones without labels."""
    if labels is None:
        return torch.ones(shape)
    return torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False).float()


def distillation_term(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    num_items_in_batch=None,
    beta: Optional[float] = None,
) -> torch.Tensor:
    """The distillation loss of a batch: :func:`token_divergence` times ``temperature ** 2`` (so gradients keep
    their size across temperatures), averaged over the positions of :func:`label_mask`, or summed and divided
    by ``num_items_in_batch`` when the Trainer counts tokens across gradient-accumulation steps."""
    per_token = token_divergence(student_logits, teacher_logits, kind, temperature, beta)
    mask = label_mask(labels, per_token.shape).to(per_token.device, per_token.dtype)
    total = (per_token * mask).sum()
    count = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp_min(1)
    return temperature**2 * total / count


# ------------------------------------------------------------------------------------------ teacher text
