"""``evaluate``: perplexity and size of saved models on one text, side by side."""

from __future__ import annotations

import json
import logging
import os

from ..nn import palettized_storage
from ..storage import model_size
from .compress import DTYPES, CommandError, Row, format_table, measure, resolve_device

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ALIAS = "default"


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
    """``(bytes, bits per parameter)`` of what the checkpoint holds (:func:`optimum_edkm.storage.model_size`):
    packed indices, LUTs and scales of an eDKM model's modules, every other tensor at its dtype."""
    size = model_size(model, palettized_storage(model))
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
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2, default=str)
    return results


def _same_tokens(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


__all__ = ["Row", "checkpoint_size", "evaluate_models", "load_for_evaluation"]
