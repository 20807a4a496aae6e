"""``compress``: the main job as one command.

load the float model -> measure it -> prepare for eDKM (k-means initialisation) -> measure the k-means
palettization -> fine-tune with :func:`optimum_edkm.finetune.finetune` (optionally distilling from the float
model) -> palettize -> save -> report size and quality (a table on stdout, ``compress_report.json`` in the
output folder).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Optional

import torch

from ..storage import model_size
from .arguments import CONFIG_OPTIONS, FINETUNE_OPTIONS, given

logger = logging.getLogger(__name__)

REPORT_NAME = "compress_report.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20


class CommandError(ValueError):
    """Bad input to a command; the message names the problem and the fix."""


@dataclasses.dataclass
class Row:
    """One line of the summary table."""

    label: str
    perplexity: Optional[float] = None
    scored_tokens: Optional[int] = None
    size_bytes: Optional[int] = None
    bits_per_weight: Optional[float] = None


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
    """The ``EDKMConfig`` of the options that were given (the rest keep its defaults); raises on bad values
    before the model is loaded."""
    from optimum_edkm.config import EDKMConfig
    from optimum_edkm.finetune import RECIPE_PALETTE

    options = given(args, CONFIG_OPTIONS)
    if not {"granularity", "group_size", "enable_per_channel_scale"} & set(options):
        options = {**RECIPE_PALETTE, **options}  # the LUT layout the recipe was validated with
    try:
        return EDKMConfig(**options)
    except ValueError as error:
        raise CommandError(str(error)) from None


def finetune_options(args) -> dict:
    options = given(args, FINETUNE_OPTIONS)
    if getattr(args, "fisher_samples", None) is not None and args.fisher_samples < 0:
        raise CommandError(f"--fisher-samples must be >= 0 (0: plain k-means), got {args.fisher_samples}")
    if options.get("steps", 1) < 0:
        raise CommandError(f"--steps must be >= 0 (0 palettizes without fine-tuning), got {options['steps']}")
    if options.get("distillation_weight", 0) < 0 or options.get("distillation_weight", 0) > 1:
        raise CommandError(f"--distillation-weight must be in [0, 1], got {options['distillation_weight']}")
    return options


def measure(model, eval_ids, args, label: str) -> Row:
    from optimum_edkm.evaluation import evaluate_perplexity

    options = {} if args.context_length is None else {"context_length": args.context_length}
    result = evaluate_perplexity(model, eval_ids, progress=not args.no_progress, description=label, **options)
    logger.info("%s: perplexity %.3f (%d tokens)", label, result.perplexity, result.scored_tokens)
    return Row(label, result.perplexity, result.scored_tokens)


def format_table(rows: list) -> str:
    """A markdown table of the rows (empty cells where a figure was not measured)."""
    header = "| model | perplexity | scored tokens | size (MiB) | bits per parameter |"
    lines = [header, "|---|---:|---:|---:|---:|"]
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


def compress(args) -> dict:
    """Run the job described by parsed ``compress`` arguments; returns the report (also written as JSON)."""
    from optimum_edkm.api import checkpoint_bytes, palettize, save_pretrained, size_report
    from optimum_edkm.data import CALIBRATION_SPLIT, EVALUATION_SPLIT, load_text
    from optimum_edkm.finetune import DEFAULT_RECIPE, finetune
    from optimum_edkm.models import load_causal_lm

    started = time.perf_counter()
    timings = {}
    output = check_output(args.output, args.overwrite)
    config = build_config(args)
    options = finetune_options(args)
    device = resolve_device(args.device)
    if args.eval_tokens is not None and args.eval_tokens < 2:
        raise CommandError(f"--eval-tokens must be >= 2, got {args.eval_tokens}")

    logger.info("[1/5] loading %s", args.model or "the offline default model")
    model, tokenizer, info = load_causal_lm(
        args.model, gguf_file=args.gguf_file, dtype=DTYPES[args.dtype], device=device
    )
    train_text = load_text(
        args.train_text, split=args.train_split or (CALIBRATION_SPLIT if args.train_text is None else None)
    )
    train_ids = train_text.token_ids(tokenizer)
    eval_ids, eval_text = None, None
    if not args.no_eval:
        eval_text = load_text(
            args.eval_text, split=args.eval_split or (EVALUATION_SPLIT if args.eval_text is None else None)
        )
        eval_ids = eval_text.token_ids(tokenizer, max_tokens=args.eval_tokens)
    float_size = model_size(model)
    float_row = Row("float model", size_bytes=float_size.model_bytes, bits_per_weight=float_size.whole_model)
    timings["load"] = time.perf_counter() - started

    rows = [float_row]
    tic = time.perf_counter()
    if eval_ids is not None:
        logger.info("[2/5] measuring the float model")
        measured = measure(model, eval_ids, args, "float model")
        float_row.perplexity, float_row.scored_tokens = measured.perplexity, measured.scored_tokens
    teacher = None
    if options.get("distillation_weight", 0) > 0:
        teacher = copy.deepcopy(model)
    fisher_samples = DEFAULT_RECIPE.fisher_samples if args.fisher_samples is None else args.fisher_samples
    start = "sensitivity-weighted k-means" if fisher_samples else "k-means palettization"
    logger.info("[3/5] preparing for eDKM (%d-bit, %s)", config.bits, start)
    recipe = dataclasses.replace(
        DEFAULT_RECIPE, fisher_samples=fisher_samples, seq_len=options.get("seq_len", DEFAULT_RECIPE.seq_len)
    )
    recipe.prepare(model, config, train_ids)
    if eval_ids is not None:
        rows.append(measure(model, eval_ids, args, f"{start}, {config.bits}-bit"))
    timings["measure_and_prepare"] = time.perf_counter() - tic

    tic = time.perf_counter()
    steps = options.pop("steps", 0)
    losses, mean_loss = [], None
    if steps == 0:
        logger.info("[4/5] --steps 0: palettizing the start without fine-tuning")
        palettize(model)
        label = f"palettized ({start}, no fine-tuning), {config.bits}-bit"
    else:
        logger.info("[4/5] eDKM fine-tuning")
        kwargs = dict(options, steps=steps, progress=not args.no_progress, teacher_model=teacher)
        # the recipe saves no checkpoint (save_strategy="no"), but Trainer wants a folder of its own
        scratch = tempfile.mkdtemp(prefix=".edkm-trainer-", dir=os.path.dirname(output))
        try:
            trainer = finetune(model, train_ids, output_dir=scratch, **kwargs)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        steps = trainer.state.global_step
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        mean_loss = next((entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry), None)
        if not model.config.quantization_config.palettized:
            palettize(model)
        label = f"eDKM fine-tuned ({steps} steps), {config.bits}-bit"
        del trainer, teacher
    timings["fine_tune"] = time.perf_counter() - tic

    tic = time.perf_counter()
    final = Row(label)
    if eval_ids is not None:
        measured = measure(model, eval_ids, args, label)
        final.perplexity, final.scored_tokens = measured.perplexity, measured.scored_tokens
    logger.info("[5/5] saving to %s", output)
    size = size_report(model)
    save_pretrained(model, output)
    tokenizer.save_pretrained(output)
    final.size_bytes = size["theoretical_bytes"]
    final.bits_per_weight = size["bits_per_weight"]
    rows.append(final)
    timings["measure_and_save"] = time.perf_counter() - tic
    timings["total"] = time.perf_counter() - started

    report = {
        "model": info,
        "output": output,
        "quantization_config": config.to_dict(),
        "fine_tuning": {
            "steps": steps,
            "options": options,
            "train_loss": losses,
            "mean_train_loss": mean_loss,
            "distilled": options.get("distillation_weight", 0) > 0,
            "text": train_text.describe(tokens=train_ids.numel()),
        },
        "evaluation": None
        if eval_text is None
        else {"text": eval_text.describe(tokens=eval_ids.numel()), "context_length": args.context_length},
        "rows": [dataclasses.asdict(row) for row in rows],
        "size": size,
        "checkpoint": checkpoint_bytes(output),
        "seconds": timings,
        "table": format_table(rows),
    }
    with open(os.path.join(output, REPORT_NAME), "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    return report
