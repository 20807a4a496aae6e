#!/usr/bin/env python
"""One point of the validation sweep behind the defaults: ``optimum_edkm.compress`` with one recipe, scored on
VALIDATION text only.

Compresses the default offline model (or ``--model``) with :func:`optimum_edkm.compress` (any :class:`Recipe`
field as ``--<field>``, any layout as ``--bits`` / ``--group-size`` / ``--per-channel-scale``) and scores the float
model, the start and the result on two validation texts: the help topics' validation split (in domain) and the
news text (out of domain; ``gensim-lee-news``). The test texts (help topics' test split, Wikipedia) are never
loaded here. Prints one JSON line and appends it to ``--out`` (default
``benchmarks/results/validation.jsonl``) with the command, the recipe, the perplexities, each stage's seconds and
the load average.

    python benchmarks/validation_sweep.py --steps 0                               # the post-training start
    python benchmarks/validation_sweep.py --steps 0 --save-start runs/start-ptq   # ... kept for later points
    python benchmarks/validation_sweep.py --start-from runs/start-ptq --block-epochs 2
    python benchmarks/validation_sweep.py --start-from runs/start-ptq --steps 30 --e2e-train lut
    python benchmarks/validation_sweep.py --summary                               # every line as a table
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
from common import cached_result, finish_sweep_line, validation_texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "validation.jsonl")


def parse_args(argv=None):
    from optimum_edkm.pipeline import DEFAULT_RECIPE, recipe_with

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=1, help="output rows per LUT (0: one LUT per tensor)")
    parser.add_argument("--per-channel-scale", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--temperature", type=float, default=None, help="EDKMConfig.temperature (relative)")
    recipe = parser.add_argument_group("recipe (optimum_edkm.Recipe; unset fields keep DEFAULT_RECIPE's)")
    for field in dataclasses.fields(DEFAULT_RECIPE):
        value = getattr(DEFAULT_RECIPE, field.name)
        recipe.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(value), default=None, help=f"default {value!r}"
        )
    parser.add_argument("--start-from", default=None, help="a palettized model saved by --save-start: start from it")
    parser.add_argument("--save-start", default=None, help="save the start (before training) to this folder")
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: the offline SmolLM2)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--summary", action="store_true", help="print every line of --out as a markdown table")
    args = parser.parse_args(argv)
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(DEFAULT_RECIPE)}
    args.recipe = recipe_with(changes)
    return args


def summary_table(path: str) -> str:
    lines = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    out = [
        "| # | tag | recipe (changes) | start in / out | result in / out | seconds | load |",
        "|---:|---|---|---|---|---:|---:|",
    ]
    for number, line in enumerate(lines, 1):
        rows = line["ratios"]
        start = rows.get("start") or {}
        result = rows["result"]
        cell = lambda r: " / ".join(f"{r[k]:.3f}" for k in ("in_domain", "out_of_domain") if k in r)  # noqa: E731
        out.append(
            f"| V{number} | {line['tag']} | {line['changes']} | {cell(start)} | {cell(result)} | "
            f"{line['wall_seconds']:.0f} | {line['load_average_start'][0]:.1f} |"
        )
    return "\n".join(out)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.summary:
        print(summary_table(args.out))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    import optimum_edkm
    from optimum_edkm import EDKMConfig
    from optimum_edkm.data import DEFAULT_TEXT, TRAIN_SPLIT, load_text
    from optimum_edkm.evaluation import evaluate_perplexity
    from optimum_edkm.models import load_causal_lm
    from optimum_edkm.pipeline import DEFAULT_RECIPE, CompressionData, compress

    started, load_start = time.time(), os.getloadavg()
    torch.manual_seed(0)
    model, tokenizer, info = load_causal_lm(args.model)
    texts, eval_ids = validation_texts(tokenizer, args.eval_tokens)
    name = (args.model or "default").replace("/", "_")
    float_ppl = cached_result(
        os.path.join(ROOT, "runs", "cache", f"validation_float_{name}_{args.eval_tokens}.json"),
        lambda: {r: evaluate_perplexity(model, ids, progress=False).perplexity for r, ids in eval_ids.items()},
    )
    layout = {"granularity": "per_tensor"}
    if args.group_size:
        layout = {"granularity": "per_grouped_channel", "group_size": args.group_size}
    options = {"temperature": args.temperature} if args.temperature is not None else {}
    config = EDKMConfig(bits=args.bits, enable_per_channel_scale=args.per_channel_scale, **layout, **options)
    train = load_text(DEFAULT_TEXT, split=TRAIN_SPLIT)
    data = CompressionData(
        train_ids=train.token_ids(tokenizer),
        tokenizer=tokenizer,
        evaluation=eval_ids,
        texts={"train": train.describe(), **{r: t.describe() for r, t in texts.items()}},
        float_perplexity=float_ppl,
    )
    palettes = None
    if args.start_from:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(args.start_from)
        palettes = optimum_edkm.palettes_of(saved)
        del saved
    if args.save_start:
        recipe = dataclasses.replace(args.recipe, block_epochs=0, steps=0)
        report = compress(model, config, recipe, data, palettes=palettes, progress=False)
        optimum_edkm.save_pretrained(model, args.save_start)
    else:
        report = compress(model, config, args.recipe, data, palettes=palettes, progress=False)
    ratios = {"float": report.ratios(0), "result": report.ratios(-1)}
    if len(report.rows) == 3:
        ratios["start"] = report.ratios(1)
    record = {
        "command": "python benchmarks/validation_sweep.py " + " ".join(argv),
        "changes": {k: v for k, v in dataclasses.asdict(args.recipe).items() if getattr(DEFAULT_RECIPE, k) != v},
        "config": {
            "bits": args.bits,
            "group_size": args.group_size,
            "per_channel_scale": args.per_channel_scale,
            **options,
        },
        "start_from": args.start_from,
        "recipe": report.recipe,
        "perplexity": {row.label: row.perplexity for row in report.rows},
        "ratios": ratios,
        "stages": {k: {"seconds": round(v["seconds"], 1)} for k, v in report.stages.items()},
        "stage_details": {k: {d: v[d] for d in v if d != "seconds"} for k, v in report.stages.items()},
        "validation_texts": {r: f"{t.name}/{t.split}" for r, t in texts.items()},
        "eval_tokens": {r: int(ids.numel()) for r, ids in eval_ids.items()},
        "threads": torch.get_num_threads(),
        # CPU seconds of this process: on a loaded machine, a better guide to the time alone than wall seconds
        "cpu_seconds": round(time.process_time(), 1),
    }
    print(report.table())
    finish_sweep_line(record, started, load_start, args.tag, args.out)


if __name__ == "__main__":
    main()
