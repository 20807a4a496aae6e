#!/usr/bin/env python
"""One point of the post-training palettization sweep, scored on VALIDATION text only.

Compresses the default offline model (SmolLM2-135M) with one method and scores it on the help topics'
validation split (in domain) and the news validation text (``gensim-lee-news``, out of domain); the test texts
are never loaded. Methods:

* ``ptq`` - :func:`optimum_edkm.ptq.palettize_post_training` (GPTQ onto LUTs), then ``palettize``;
* ``kmeans`` / ``skm`` - the k-means start of eDKM, plain or weighted by the float model's Fisher diagonal
  (``prepare(..., importance=fisher)``), then ``palettize``;
* ``gptq`` / ``awq`` - the uniform baselines (``--group-size`` is then their input-column group, default 128);
* ``float`` - the float model.

With ``--steps N`` the palettization rows are fine-tuned with eDKM afterwards (distillation from the float model
on the help topics' train split), to compare starting points. Prints one JSON line and appends it to ``--out``
(default ``benchmarks/results/ptq_validation.jsonl``) with the command, settings, perplexities, ratios to the
float model, bits per weight, wall time and load average:

    python benchmarks/ptq_sweep.py --method ptq --bits 3                        # per-tensor LUT + scale
    python benchmarks/ptq_sweep.py --method ptq --bits 3 --group-size 16 --importance obs --refits 2
    python benchmarks/ptq_sweep.py --method gptq --bits 3                       # GPTQ g128 baseline
    python benchmarks/ptq_sweep.py --summary                                    # the recorded lines as a table
"""

import argparse
import copy
import json
import logging
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import (  # noqa: E402
    cached_result,
    finish_sweep_line,
    sweep_record,
    validation_perplexities,
    validation_texts,
)  # noqa: E402

import optimum_edkm  # noqa: E402
from optimum_edkm import EDKMConfig  # noqa: E402
from optimum_edkm.data import (  # noqa: E402
    DEFAULT_TEXT,
    TRAIN_SPLIT,
    load_text,
    sample_windows,
)
from optimum_edkm.evaluation import effective_bits  # noqa: E402
from optimum_edkm.models import load_default_model  # noqa: E402
from optimum_edkm.nn import palettized_storage  # noqa: E402

METHODS = ("ptq", "kmeans", "skm", "gptq", "awq", "float")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "ptq_validation.jsonl")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="ptq", choices=METHODS)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="palettization: output rows per LUT (default: one LUT per tensor); gptq/awq: input "
        "columns per group (default 128)",
    )
    parser.add_argument(
        "--scale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="palettization: fp16 scale per output channel (default on)",
    )
    ptq = parser.add_argument_group("ptq")
    ptq.add_argument("--importance", default="hessian", choices=("none", "hessian", "obs", "fisher"))
    ptq.add_argument("--refits", type=int, default=1)
    ptq.add_argument("--refit-scales", action="store_true")
    ptq.add_argument("--act-order", action="store_true")
    ptq.add_argument("--damp", type=float, default=0.01)
    calibration = parser.add_argument_group("calibration (ptq, gptq, awq, and the Fisher diagonal of skm / fisher)")
    calibration.add_argument(
        "--calibration",
        default="help",
        choices=("help", "teacher", "mixed"),
        help="help: windows of the help topics' train split; teacher: text sampled from the "
        "float model (cached); mixed: half of each",
    )
    calibration.add_argument("--calib-samples", type=int, default=8)
    calibration.add_argument("--calib-seq-len", type=int, default=512)
    calibration.add_argument("--fisher-samples", type=int, default=16, help="windows of 256 tokens (skm, fisher)")
    tune = parser.add_argument_group("eDKM fine-tuning after the start (palettization rows)")
    tune.add_argument("--steps", type=int, default=0)
    tune.add_argument("--learning-rate", type=float, default=1e-3)
    tune.add_argument("--temperature", type=float, default=0.01)
    tune.add_argument("--batch-size", type=int, default=8)
    tune.add_argument("--seq-len", type=int, default=256)
    tune.add_argument("--loss", default="forward_kl", help="ce, or a distillation divergence")
    tune.add_argument(
        "--teacher-sequences",
        type=int,
        default=0,
        help="training rows of teacher text (--seq-len tokens, cached) added to the help train windows",
    )
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=DEFAULT_OUT)
    return parser.parse_args(argv)


def calibration_ids(args, model, tokenizer) -> torch.Tensor:
    """``[calib_samples, calib_seq_len]`` calibration windows: help-topics train text, teacher text or both."""
    help_ids = load_text(DEFAULT_TEXT, split=TRAIN_SPLIT).token_ids(tokenizer)
    if args.calibration == "help":
        return sample_windows(help_ids, args.calib_samples, args.calib_seq_len, seed=0)
    from optimum_edkm.distillation import GenerationSettings, cached_teacher_data

    teacher_rows = args.calib_samples if args.calibration == "teacher" else args.calib_samples // 2
    settings = GenerationSettings(sequences=teacher_rows, seq_len=args.calib_seq_len, seed=0)
    teacher = cached_teacher_data(model, tokenizer, settings)
    if args.calibration == "teacher":
        return teacher
    return torch.cat([sample_windows(help_ids, args.calib_samples - teacher_rows, args.calib_seq_len, seed=0), teacher])


def palettization_config(args) -> EDKMConfig:
    grouping = {"granularity": "per_grouped_channel", "group_size": args.group_size} if args.group_size else {}
    return EDKMConfig(bits=args.bits, temperature=args.temperature, enable_per_channel_scale=args.scale, **grouping)


def summary_table(path: str) -> str:
    """Every recorded line of ``path`` as a markdown table."""
    lines = [
        "| # | method | bits | LUT / group | options | calib. | steps | in-dom. val. | x float | news val. | "
        "x float | bits/w linears | bits/w model | s | load |",
        "|---:|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            r = json.loads(line)
            s = r["settings"]
            method = s["method"]
            if method in ("gptq", "awq"):
                grouping = f"g{s['group_size'] or 128} cols"
            elif method == "float":
                grouping = ""
            else:
                grouping = (f"g{s['group_size']} rows" if s.get("group_size") else "tensor") + (
                    "+scale" if s.get("scale") else ""
                )
            options = ""
            if method == "ptq":
                options = (
                    f"{s['importance']}, refits {s['refits']}"
                    + (", scales" if s.get("refit_scales") else "")
                    + (", act-order" if s.get("act_order") else "")
                )
            bits = r.get("bits_per_weight", {})
            ppl, ratio = r.get("perplexity", {}), r.get("ratio_vs_float", {})
            lines.append(
                f"| {number} | {method} | {s['bits'] if method != 'float' else ''} | {grouping} | {options} | "
                f"{s['calibration'] if method in ('ptq', 'gptq', 'awq') or method == 'skm' else ''} | "
                f"{s.get('steps', 0)} | {ppl.get('in_domain', float('nan')):.2f} | "
                f"{ratio.get('in_domain', float('nan')):.3f} | {ppl.get('out_of_domain', float('nan')):.2f} | "
                f"{ratio.get('out_of_domain', float('nan')):.3f} | {bits.get('linears') or float('nan'):.3f} | "
                f"{bits.get('whole_model', float('nan')):.3f} | {r.get('compress_seconds', 0):.0f} | "
                f"{r.get('load_average_end', [''])[0]} |"
            )
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--summary" in argv:
        rest = argv[argv.index("--summary") + 1 :]
        print(summary_table(rest[0] if rest else DEFAULT_OUT))
        return
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started, load_start = time.time(), os.getloadavg()
    torch.manual_seed(0)
    model, tokenizer, _ = load_default_model()
    texts, eval_ids = validation_texts(tokenizer, args.eval_tokens)

    def perplexities():
        return validation_perplexities(model, eval_ids)

    record = sweep_record("ptq_sweep.py", argv, args, texts, eval_ids)
    float_cache = os.path.join(ROOT, "runs", "ptq-sweep", f"float-{args.eval_tokens}.json")
    record["float"] = cached_result(float_cache, perplexities)

    needs_calibration = args.method in ("ptq", "gptq", "awq", "skm") or args.importance == "fisher"
    calibration = calibration_ids(args, model, tokenizer) if needs_calibration else None
    if calibration is not None:
        record["calibration_shape"] = list(calibration.shape)
    fisher = None
    if args.method == "skm" or (args.method == "ptq" and args.importance == "fisher"):
        from optimum_edkm.sensitivity import fisher_diagonal

        # as the recipe sweep: windows of the help topics' train split (teacher calibration: the teacher rows)
        stream = (
            load_text(DEFAULT_TEXT, split=TRAIN_SPLIT).token_ids(tokenizer)
            if args.calibration == "help"
            else calibration.reshape(-1)
        )
        fisher = fisher_diagonal(model, stream, samples=args.fisher_samples, seq_len=256)
    teacher = copy.deepcopy(model) if args.steps > 0 and args.loss != "ce" else None
    generated = None
    if args.steps > 0 and args.teacher_sequences:  # sampled from the float model, before it is compressed
        from optimum_edkm.distillation import GenerationSettings, cached_teacher_data

        generated = cached_teacher_data(
            model, tokenizer, GenerationSettings(sequences=args.teacher_sequences, seq_len=args.seq_len, seed=0)
        )

    begin = time.time()
    details = {}
    if args.method == "float":
        storage = {}
    elif args.method in ("gptq", "awq"):
        from optimum_edkm import baselines

        result = getattr(baselines, args.method)(model, calibration, args.bits, args.group_size or 128, progress=False)
        storage, details = result.storage, {"settings": result.settings}
    else:
        config = palettization_config(args)
        if args.method == "ptq":
            from optimum_edkm.ptq import palettize_post_training

            result = palettize_post_training(
                model,
                calibration,
                config,
                importance=args.importance,
                fisher=fisher,
                refits=args.refits,
                refit_scales=args.refit_scales,
                act_order=args.act_order,
                damp=args.damp,
                progress=False,
            )
            errors = [d["output_error"] for d in result.details.values()]
            chosen = [d["chosen"] for d in result.details.values()]
            details = {
                "mismatched": sum(d["mismatched"] for d in result.details.values()),
                "chosen": {c: chosen.count(c) for c in sorted(set(chosen))},
                "output_error_sum": {k: round(sum(e[k] for e in errors), 4) for k in errors[0]},
            }
        elif args.method == "skm":
            from optimum_edkm.api import prepare

            prepare(model, config, importance=fisher)
        else:
            optimum_edkm.prepare(model, config)
        record["compress_seconds"] = round(time.time() - begin, 1)
        if args.steps > 0:
            from optimum_edkm.finetune import finetune

            kd = {} if args.loss == "ce" else {"distillation_weight": 1.0, "distillation_loss": args.loss}
            train_ids = load_text(DEFAULT_TEXT, split=TRAIN_SPLIT).token_ids(tokenizer)
            tune_begin = time.time()
            trainer = finetune(
                model,
                train_ids,
                output_dir=os.path.join(ROOT, "runs", "ptq-sweep", "train"),
                steps=args.steps,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                progress=False,
                logging_steps=max(1, args.steps // 6),
                teacher_model=teacher,
                sequences=generated,
                **kd,
            )
            record["train_seconds"] = round(time.time() - tune_begin, 1)
            details["train_loss"] = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
        else:
            optimum_edkm.palettize(model)
        storage = palettized_storage(model)
    record.setdefault("compress_seconds", round(time.time() - begin, 1))
    record["perplexity"] = perplexities()
    record["ratio_vs_float"] = {k: round(v / record["float"][k], 4) for k, v in record["perplexity"].items()}
    bits = effective_bits(model, storage)
    record["bits_per_weight"] = {"linears": bits.linears, "whole_model": round(bits.whole_model, 4)}
    record["details"] = details
    finish_sweep_line(record, started, load_start, args.tag, args.out)


if __name__ == "__main__":
    main()
