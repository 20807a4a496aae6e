"""``compress``: the main job as one command, on :func:`optimum_edkm.compress`.

load the float model and the texts -> :func:`optimum_edkm.compress` (measure the float model, the start and the
result on the evaluation texts) -> save -> a table on stdout and ``compress_report.json`` in the output folder.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import torch

from .arguments import COMPRESS_EVAL_TOKENS, CONFIG_OPTIONS, RECIPE_OPTIONS, given

logger = logging.getLogger(__name__)

REPORT_NAME = "compress_report.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20
#: the evaluation texts of the main job: the held-out help topics (in domain) and Wikipedia (out of domain)
IN_DOMAIN, OUT_OF_DOMAIN = "in-domain", "out-of-domain"


class CommandError(ValueError):
    """Bad input to a command; the message names the problem and the fix."""


def resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise CommandError(
            f"--device {device!r} is not a torch device ({error}); use e.g. cpu, cuda or cuda:1"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device} asks for CUDA but torch sees no CUDA device; use --device cpu")
    return resolved


def check_output(output: str, overwrite: bool) -> str:
    """Refuse an existing non-empty output folder (unless ``overwrite``) before any work is done."""
    output = os.path.abspath(output)
    if os.path.exists(output) and not os.path.isdir(output):
        raise CommandError(f"--output {output} exists and is not a folder; pass a folder path")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise CommandError(
            f"--output {output} exists and is not empty; pass --overwrite to save the model's "
            f"files into it (other files are kept) or choose another folder"
        )
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise CommandError(f"cannot write into {parent}; choose another --output")
    return output


def build_config(args):
    """The ``EDKMConfig`` of the options that were given (the layout defaults to the main job's: one LUT per
    output channel); raises on bad values before the model is loaded."""
    from optimum_edkm.config import EDKMConfig
    from optimum_edkm.pipeline import DEFAULT_LAYOUT

    options = given(args, CONFIG_OPTIONS)
    if not {"granularity", "group_size", "enable_per_channel_scale"} & set(options):
        options = {**DEFAULT_LAYOUT, **options}
    try:
        return EDKMConfig(**options)
    except ValueError as error:
        raise CommandError(str(error)) from None


def build_recipe(args):
    """The :class:`~optimum_edkm.Recipe`: ``DEFAULT_RECIPE`` with the options that were given (``--steps 0``
    alone: the post-training start without any training)."""
    from optimum_edkm.pipeline import recipe_with

    try:
        return recipe_with(given(args, RECIPE_OPTIONS))
    except ValueError as error:
        raise CommandError(str(error).replace("Recipe.", "--").replace("_", "-")) from None


def evaluation_texts(args) -> dict:
    """``{label: TextData}`` of the evaluation texts (none with ``--no-eval``)."""
    from optimum_edkm.data import OOD_TEST_TEXT, TEST_SPLIT, load_text

    if args.no_eval:
        return {}
    texts = {
        IN_DOMAIN: load_text(args.eval_text, split=args.eval_split or (TEST_SPLIT if not args.eval_text else None))
    }
    ood = args.ood_text or OOD_TEST_TEXT
    if ood.lower() != "none":
        try:
            texts[OUT_OF_DOMAIN] = load_text(ood)
        except ModuleNotFoundError as error:
            if args.ood_text:  # asked for by name: the fix is the user's
                raise
            logger.warning("no out-of-domain evaluation: %s", error)
    return texts


def compress(args) -> dict:
    """Run the job described by parsed ``compress`` arguments; returns the report (also written as JSON)."""
    from optimum_edkm import atomic, pipeline
    from optimum_edkm.api import checkpoint_bytes, save_pretrained, stored_size
    from optimum_edkm.data import TRAIN_SPLIT, load_text
    from optimum_edkm.models import load_causal_lm
    from optimum_edkm.pipeline import CompressionData
    from optimum_edkm.storage import model_size

    started = time.perf_counter()
    output = check_output(args.output, args.overwrite)
    config = build_config(args)
    recipe = build_recipe(args)
    device = resolve_device(args.device)
    if args.eval_tokens is not None and args.eval_tokens != 0 and args.eval_tokens < 2:
        raise CommandError(f"--eval-tokens must be >= 2 (0: all), got {args.eval_tokens}")
    eval_tokens = COMPRESS_EVAL_TOKENS if args.eval_tokens is None else (args.eval_tokens or None)
    if args.context_length is not None and args.context_length < 2:
        raise CommandError(f"--context-length must be >= 2, got {args.context_length}")
    train_text = load_text(args.train_text, split=args.train_split or (TRAIN_SPLIT if not args.train_text else None))
    texts = evaluation_texts(args)

    logger.info("loading %s", args.model or "the offline default model")
    model, tokenizer, info = load_causal_lm(
        args.model, gguf_file=args.gguf_file, dtype=DTYPES[args.dtype], device=device
    )
    float_size = model_size(model)
    data = CompressionData(
        train_ids=train_text.token_ids(tokenizer),
        tokenizer=tokenizer,
        evaluation={label: text.token_ids(tokenizer, max_tokens=eval_tokens) for label, text in texts.items()},
        context_length=args.context_length or 512,
        texts={
            "train": train_text.describe(),
            **{label: text.describe() for label, text in texts.items()},
        },
    )
    report = pipeline.compress(model, config, recipe, data, progress=not args.no_progress)
    save_pretrained(model, output)
    tokenizer.save_pretrained(output)
    record = {
        "model": info,
        "output": output,
        **report.as_dict(),
        "float_size": float_size.as_dict(),
        "checkpoint": checkpoint_bytes(output),
        "stored_bits": stored_size(model).as_dict(),
        "total_seconds": time.perf_counter() - started,
    }
    atomic.write_json(os.path.join(output, REPORT_NAME), record, default=str)
    return record


def summary(record: dict) -> str:
    """What ``optimum-edkm compress`` prints: the table, each text's ratio, the size and where it went."""
    size = record["size"]
    lines = [record["table"], ""]
    float_row = record["rows"][0]["perplexity"] if record["rows"] else {}
    for row in record["rows"][1:]:
        ratios = ", ".join(f"{t} {row['perplexity'][t] / float_row[t]:.3f}x" for t in row["perplexity"])
        lines.append(f"{row['label']}: {ratios} the float model's perplexity")
    lines.append(
        f"saved to {record['output']}: {record['checkpoint']['file_bytes'] / MIB:.1f} MiB on disk "
        f"({record['float_size']['model_bytes'] / MIB:.1f} MiB float), {size['bits_per_clustered_weight']:.3f} bits "
        f"per clustered weight, {size['bits_per_weight']:.2f} bits per parameter overall; "
        f"{100 * size['float_parameter_share']:.1f}% of the parameters stayed in floating point "
        f"({100 * size['float_byte_share']:.1f}% of the bytes); report in {REPORT_NAME} "
        f"({record['total_seconds']:.0f} s)"
    )
    return "\n".join(lines)
