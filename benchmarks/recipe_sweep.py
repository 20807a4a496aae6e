#!/usr/bin/env python
"""One point of the recipe sweep behind the defaults, scored on VALIDATION text only.

Prepares the default offline model (SmolLM2-135M) for eDKM, fine-tunes it with one recipe option and scores
the float model, the starting point (k-means, no training) and the result on two validation texts: the help
topics' validation split (in domain) and the news validation text (out of domain; ``gensim-lee-news``). The
test texts (help topics' test split, Wikipedia) are never loaded here. Prints one JSON line and appends it to
``--out`` (default ``benchmarks/results/recipe_validation.jsonl``) with the command, every setting, the
perplexities, the wall time and the load average:

    python benchmarks/recipe_sweep.py --loss ce --data help                    # the former recipe
    python benchmarks/recipe_sweep.py --loss forward_kl --data generated       # distil on teacher text
    python benchmarks/recipe_sweep.py --loss forward_kl --data mixed --init fisher
    python benchmarks/recipe_sweep.py --steps 0 --init fisher --group-size 16  # post-training only
    python benchmarks/recipe_sweep.py --summary                                # every line as a markdown table
"""

import argparse
import copy
import json
import os
import sys
import time

import torch
from common import cached_result, finish_sweep_line, sweep_record, validation_perplexities, validation_texts

import optimum_edkm
from optimum_edkm import EDKMConfig
from optimum_edkm.data import DEFAULT_TEXT, TRAIN_SPLIT, load_text
from optimum_edkm.distillation import GenerationSettings, cached_teacher_data
from optimum_edkm.finetune import finetune
from optimum_edkm.losses import DIVERGENCES
from optimum_edkm.models import load_default_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_CHOICES = ("help", "generated", "mixed")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.01, help="eDKM softmax temperature (relative)")
    parser.add_argument("--group-size", type=int, default=0, help="output rows per LUT (0: one LUT per tensor)")
    parser.add_argument(
        "--scale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fp16 scale per output channel (default on)",
    )
    parser.add_argument(
        "--loss",
        default="ce",
        choices=("ce",) + DIVERGENCES,
        help="ce: cross-entropy on the data; otherwise distillation from the float model",
    )
    parser.add_argument("--kd-weight", type=float, default=1.0, help="weight of the distillation term (with --loss)")
    parser.add_argument("--kd-temperature", type=float, default=1.0)
    parser.add_argument(
        "--data",
        default="help",
        choices=DATA_CHOICES,
        help="help: the help topics' train split; generated: teacher text; mixed: both",
    )
    parser.add_argument("--generated-sequences", type=int, default=128)
    parser.add_argument("--generation-seed", type=int, default=0)
    parser.add_argument("--generation-top-k", type=int, default=0)
    parser.add_argument(
        "--generation-threads",
        type=int,
        default=0,
        help="torch threads while generating (0: unchanged); 1 is far faster on a loaded machine",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--init",
        default="kmeans",
        choices=("kmeans", "fisher"),
        help="k-means initialisation: plain, or weighted by squared gradients (Fisher diagonal)",
    )
    parser.add_argument("--fisher-samples", type=int, default=16, help="windows of --seq-len for the Fisher pass")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--skip-start",
        action="store_true",
        help="do not score the starting point (the same for every run with the same --init)",
    )
    parser.add_argument("--tag", default="", help="free text recorded with the line")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "recipe_validation.jsonl"))
    return parser.parse_args(argv)


def summary_table(path: str) -> str:
    """Every recorded line of ``path`` as a markdown table (validation perplexities and ratios to float)."""
    lines = [
        "| # | tag | steps | loss | data | init | LUT | in-domain val. | x float | news val. | x float | "
        "train s | load avg |",
        "|---:|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            record = json.loads(line)
            settings = record["settings"]
            scores = record.get("tuned", record.get("start", {}))
            ratios = record.get("ratio_vs_float", {})
            lut = f"g{settings['group_size']}" if settings.get("group_size") else "tensor"
            lines.append(
                f"| {number} | {record.get('tag', '')} | {settings['steps']} | {settings['loss']} | {settings['data']} "
                f"| {settings.get('init', 'kmeans')} | {lut}{'+scale' if settings.get('scale') else ''} | "
                f"{scores.get('in_domain', float('nan')):.3f} | {ratios.get('in_domain', float('nan')):.3f} | "
                f"{scores.get('out_of_domain', float('nan')):.3f} | {ratios.get('out_of_domain', float('nan')):.3f} | "
                f"{record.get('train_seconds', 0):.0f} | {record.get('load_average_end')} |"
            )
    return "\n".join(lines)


def main(argv=None):
    if argv is None and "--summary" in sys.argv[1:]:
        default = os.path.join(ROOT, "benchmarks", "results", "recipe_validation.jsonl")
        print(
            summary_table(
                sys.argv[sys.argv.index("--summary") + 1]
                if len(sys.argv) > sys.argv.index("--summary") + 1
                else default
            )
        )
        return
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    load_start = os.getloadavg()
    torch.manual_seed(0)
    model, tokenizer, _ = load_default_model()
    texts, eval_ids = validation_texts(tokenizer, args.eval_tokens)

    def perplexities():
        return validation_perplexities(model, eval_ids)

    record = sweep_record("recipe_sweep.py", sys.argv[1:] if argv is None else argv, args, texts, eval_ids)
    float_cache = os.path.join(ROOT, "runs", "recipe-sweep", f"float-{args.eval_tokens}.json")
    record["float"] = cached_result(float_cache, perplexities)
    train_ids = load_text(DEFAULT_TEXT, split=TRAIN_SPLIT).token_ids(tokenizer) if args.data != "generated" else None
    generated, generation_seconds = None, 0.0
    if args.data != "help":
        settings = GenerationSettings(
            sequences=args.generated_sequences,
            seq_len=args.seq_len,
            seed=args.generation_seed,
            top_k=args.generation_top_k,
        )
        begin = time.time()
        threads = torch.get_num_threads()
        torch.set_num_threads(args.generation_threads or threads)
        generated = cached_teacher_data(model, tokenizer, settings)
        torch.set_num_threads(threads)
        generation_seconds = time.time() - begin
    teacher = copy.deepcopy(model) if args.loss != "ce" else None
    grouping = {"granularity": "per_grouped_channel", "group_size": args.group_size} if args.group_size else {}
    config = EDKMConfig(bits=args.bits, temperature=args.temperature, enable_per_channel_scale=args.scale, **grouping)
    begin = time.time()
    if args.init == "fisher":
        from optimum_edkm.api import prepare
        from optimum_edkm.sensitivity import fisher_diagonal

        calibration = (
            load_text(DEFAULT_TEXT, split=TRAIN_SPLIT).token_ids(tokenizer) if train_ids is None else train_ids
        )
        fisher = fisher_diagonal(model, calibration, samples=args.fisher_samples, seq_len=args.seq_len)
        prepare(model, config, importance=fisher)
    else:
        optimum_edkm.prepare(model, config)
    record["init_seconds"] = round(time.time() - begin, 1)
    if not args.skip_start or args.steps == 0:
        record["start"] = perplexities()
    begin = time.time()
    losses = []
    if args.steps > 0:
        kd = (
            {}
            if args.loss == "ce"
            else {
                "distillation_weight": args.kd_weight,
                "distillation_loss": args.loss,
                "distillation_temperature": args.kd_temperature,
            }
        )
        trainer = finetune(
            model,
            train_ids,
            output_dir=os.path.join(ROOT, "runs", "recipe-sweep"),
            steps=args.steps,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=args.warmup_steps,
            progress=False,
            logging_steps=max(1, args.steps // 6),
            teacher_model=teacher,
            sequences=generated,
            **kd,
        )
        losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
        record["tuned"] = perplexities()
    record.update(
        {
            "train_seconds": round(time.time() - begin, 1),
            "generation_seconds": round(generation_seconds, 1),
            "losses": losses,
            "ratio_vs_float": {
                k: round(v / record["float"][k], 4) for k, v in record.get("tuned", record.get("start", {})).items()
            },
        }
    )
    finish_sweep_line(record, started, load_start, args.tag, args.out)


if __name__ == "__main__":
    main()
