"""``evaluate``: perplexity and size of saved models on one text, side by side."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

from ..api import stored_size
from .compress import DTYPES, MIB, CommandError, resolve_device

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ALIAS = "default"


@dataclasses.dataclass
class Row:
    """One line of the table: a model's perplexity and what it stores."""

    label: str
    perplexity: Optional[float] = None
    scored_tokens: Optional[int] = None
    size_bytes: Optional[int] = None
    bits_per_weight: Optional[float] = None


def measure(model, token_ids, args, label: str) -> Row:
    from optimum_edkm.evaluation import evaluate_perplexity

    options = {} if args.context_length is None else {"context_length": args.context_length}
    result = evaluate_perplexity(model, token_ids, progress=not args.no_progress, description=label, **options)
    logger.info("%s: perplexity %.3f (%d tokens)", label, result.perplexity, result.scored_tokens)
    return Row(label, result.perplexity, result.scored_tokens)


def format_table(rows: list) -> str:
    """A markdown table of the rows (empty cells where a figure was not measured)."""
    lines = ["| model | perplexity | scored tokens | size (MiB) | bits per parameter |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        cells = [
            row.label,
            "" if row.perplexity is None else f"{row.perplexity:.3f}",
            "" if row.scored_tokens is None else f"{row.scored_tokens:,}",
            "" if row.size_bytes is None else f"{row.size_bytes / MIB:.1f}",
            "" if row.bits_per_weight is None else f"{row.bits_per_weight:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_for_evaluation(name: str, dtype, device):
    """A saved model (palettized or not) and its tokenizer; ``optimum_edkm`` is imported first so that a
    palettized checkpoint loads as one."""
    from optimum_edkm import quantizer  # noqa: F401  (registers the "edkm" quantization method)
    from optimum_edkm.models import load_causal_lm

    if name == DEFAULT_MODEL_ALIAS:
        return load_causal_lm(None, dtype=dtype, device=device)
    # Hub ids are "name" or "owner/name"; anything else shaped like a path must exist
    if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise CommandError(
            f"{name} is not a folder; pass the folder written by optimum_edkm.save_pretrained (or "
            f"'{DEFAULT_MODEL_ALIAS}' for the offline default model)"
        )
    return load_causal_lm(name, dtype=dtype, device=device)


def checkpoint_size(model):
    """``(bytes, bits per parameter)`` of what the checkpoint holds (:func:`optimum_edkm.api.stored_size`):
    packed indices, LUTs and scales of an eDKM model's modules, its float parts at ``EDKMConfig.float_dtype``,
    every other tensor at its dtype."""
    size = stored_size(model)
    return size.model_bytes, size.whole_model


def evaluate_models(args) -> dict:
    """Perplexity (same token stream, same windows) and size of every model in ``args.models``."""
    from optimum_edkm.data import EVALUATION_SPLIT, load_text

    if args.eval_tokens is not None and args.eval_tokens < 2:
        raise CommandError(f"--eval-tokens must be >= 2, got {args.eval_tokens}")
    device = resolve_device(args.device)
    text = load_text(args.eval_text, split=args.eval_split or (EVALUATION_SPLIT if args.eval_text is None else None))
    rows, reference_tokens = [], None
    for name in args.models:
        model, tokenizer, info = load_for_evaluation(name, DTYPES[args.dtype], device)
        token_ids = text.token_ids(tokenizer, max_tokens=args.eval_tokens)
        if reference_tokens is not None and not _same_tokens(reference_tokens, token_ids):
            logger.warning(
                "%s tokenizes the text differently from %s: its perplexity is not comparable", name, args.models[0]
            )
        reference_tokens = reference_tokens if reference_tokens is not None else token_ids
        row = measure(model, token_ids, args, name)
        row.size_bytes, row.bits_per_weight = checkpoint_size(model)
        rows.append(row)
        del model
    results = {
        "text": text.describe(tokens=int(reference_tokens.numel())),
        "context_length": args.context_length,
        "rows": [vars(row) for row in rows],
        "table": format_table(rows),
    }
    if args.json:
        from optimum_edkm import atomic

        atomic.write_json(args.json, results, default=str)
    return results


def _same_tokens(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


__all__ = ["Row", "checkpoint_size", "evaluate_models", "load_for_evaluation"]
