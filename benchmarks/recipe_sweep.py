#!/usr/bin/env python
"""One point of the fine-tuning recipe sweep behind the defaults (temperature, learning rate, distillation).

Prepares the default offline model (SmolLM2-135M) for eDKM, evaluates the k-means start and, after
``--steps`` of :func:`optimum_edkm.finetune.finetune` on the calibration split of the help topics, the
fine-tuned model, on the first ``--eval-tokens`` held-out tokens. Prints one JSON line and appends it to
``--out`` (default ``benchmarks/results/recipe_sweep.jsonl``, which holds the sweep quoted in
docs/transformers.md):

    python benchmarks/recipe_sweep.py --scale --temperature 0.01 --learning-rate 1e-3
    python benchmarks/recipe_sweep.py --scale --temperature 0.25 --distillation 1.0
"""

import argparse
import copy
import json
import os
import time

import torch

import optimum_edkm
from optimum_edkm import EDKMConfig
from optimum_edkm.data import CALIBRATION_SPLIT, EVALUATION_SPLIT, load_text
from optimum_edkm.evaluation import evaluate_perplexity
from optimum_edkm.finetune import finetune
from optimum_edkm.models import load_default_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=0.25)
    parser.add_argument("--group-size", type=int, default=0, help="output rows per LUT (0: one LUT per tensor)")
    parser.add_argument("--scale", action="store_true", help="fp16 scale per output channel")
    parser.add_argument("--distillation", type=float, default=0.0, help="distillation weight (0: cross-entropy)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--temperature-schedule", default="constant", choices=["constant", "linear", "cosine"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "recipe_sweep.jsonl"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer, _ = load_default_model()
    eval_ids = load_text(split=EVALUATION_SPLIT).token_ids(tokenizer)[: args.eval_tokens]
    train_ids = load_text(split=CALIBRATION_SPLIT).token_ids(tokenizer)
    teacher = copy.deepcopy(model) if args.distillation > 0 else None
    grouping = {"granularity": "per_grouped_channel", "group_size": args.group_size} if args.group_size else {}
    optimum_edkm.prepare(model, EDKMConfig(bits=args.bits, temperature=args.temperature,
                                           enable_per_channel_scale=args.scale, **grouping))
    start = evaluate_perplexity(model, eval_ids, context_length=512, progress=False).perplexity
    started = time.time()
    trainer = finetune(model, train_ids, output_dir=os.path.join(ROOT, "runs", "recipe-sweep"), steps=args.steps,
                       seq_len=args.seq_len, batch_size=args.batch_size, learning_rate=args.learning_rate,
                       progress=False, logging_steps=10, teacher_model=teacher,
                       distillation_weight=args.distillation, temperature_schedule=args.temperature_schedule)
    seconds = time.time() - started
    losses = [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h]
    tuned = evaluate_perplexity(model, eval_ids, context_length=512, progress=False).perplexity
    line = json.dumps({"bits": args.bits, "steps": args.steps, "lr": args.learning_rate, "temp": args.temperature,
                       "gs": args.group_size, "scale": args.scale, "distill": args.distillation,
                       "batch": args.batch_size, "sched": args.temperature_schedule, "seq": args.seq_len,
                       "ptq": start, "edkm": tuned, "train_s": seconds, "losses": losses})
    print(line, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


if __name__ == "__main__":
    main()
