"""Time and peak memory of one training step: plain fine-tuning vs eDKM fine-tuning of the same model.

One step = forward + backward + AdamW update on a batch of ``--batch-size`` x ``--seq-len`` tokens of real
text. Each mode runs in its own fresh process (so that its peak memory is its own): a warm-up step, then
``--steps`` timed steps. With ``--rounds N`` the modes alternate N times (plain, eDKM, plain, eDKM, ...), so
that a burst of load from other processes hits both; the median and the minimum over all timed steps of a
mode, and its largest peak memory, are reported, with the load average around each run. The process's CPU
time per step (all threads) is reported too: on a shared machine it is less sensitive than wall time to
being descheduled, though not to it entirely (threads waiting for each other spin).

Modes: ``plain`` (float fine-tuning), ``edkm`` (clustering in the loop, compiled engine kernels where they
build), ``edkm-torch`` (the same with ``OPTIMUM_EDKM_DISABLE_KERNELS=1``: the pure-torch engine). The LUT layout
is given as ``EDKMConfig`` spells it (default: one LUT per tensor, no per-channel scale).

    python benchmarks/train_step.py                       # default offline model (SmolLM2-135M), 3 bits
    python benchmarks/train_step.py --rounds 2 --modes plain,edkm,edkm-torch
    python benchmarks/train_step.py --granularity per_grouped_channel --group-size 1 --no-per-channel-scale
    python benchmarks/train_step.py --model HuggingFaceTB/SmolLM2-360M --bits 4

Prints a table and writes JSON (``benchmarks/results/train_step.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from common import GIB, PeakMemory, machine, worker_env, worker_result, write_json  # noqa: E402


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """The LUT layout, as ``EDKMConfig`` spells it (shared with profile_train_step.py)."""
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--granularity", choices=["per_tensor", "per_grouped_channel"], default="per_tensor")
    parser.add_argument("--group-size", type=int, default=None, help="output channels per LUT (per_grouped_channel)")
    parser.add_argument("--per-channel-scale", action=argparse.BooleanOptionalAction, default=False)


def edkm_config(args):
    """``EDKMConfig`` of the layout arguments (its own checks name a bad combination)."""
    from optimum_edkm import EDKMConfig

    return EDKMConfig(
        bits=args.bits,
        granularity=args.granularity,
        group_size=args.group_size,
        enable_per_channel_scale=args.per_channel_scale,
    )


def layout_record(args) -> dict:
    return {
        "bits": args.bits,
        "granularity": args.granularity,
        "group_size": args.group_size,
        "enable_per_channel_scale": args.per_channel_scale,
    }


def layout_argv(args) -> list:
    argv = ["--bits", str(args.bits), "--granularity", args.granularity]
    argv += ["--group-size", str(args.group_size)] if args.group_size is not None else []
    return argv + ["--per-channel-scale" if args.per_channel_scale else "--no-per-channel-scale"]


def layout_name(args) -> str:
    if args.granularity == "per_tensor":
        lut = "one LUT per tensor"
    elif args.group_size == 1:
        lut = "one LUT per output channel"
    else:
        lut = f"one LUT per {args.group_size} output channels"
    return lut + (", per-channel scale" if args.per_channel_scale else "")


def worker(args) -> dict:
    import optimum_edkm
    from optimum_edkm.data import CALIBRATION_SPLIT, load_text
    from optimum_edkm.models import load_causal_lm

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer, info = load_causal_lm(args.model)
    model.to(device)
    if args.mode.startswith("edkm"):
        optimum_edkm.prepare(model, edkm_config(args))
    model.train()
    token_ids = load_text(split=CALIBRATION_SPLIT).token_ids(tokenizer)
    need = args.batch_size * args.seq_len
    batch = token_ids[:need].view(args.batch_size, args.seq_len).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    peak = PeakMemory(device)
    peak.start()
    baseline = peak.base
    times, cpu_times = [], []
    for step in range(args.steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak_bytes = peak.peak() + baseline  # peak of the process (model, optimizer state included)
    return {
        "times": times,
        "cpu_times": cpu_times,
        "median_seconds": statistics.median(times),
        "peak_bytes": peak_bytes,
        "loss": float(loss),
        "model": info.get("name", args.model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "engine_kernels": args.mode.startswith("edkm") and engine_kernels_loaded(),
    }


def engine_kernels_loaded() -> bool:
    try:
        from optimum_edkm.clustering.patterns import compiled_ops
    except ImportError:  # a checkout from before the compiled engine (the script also times those)
        return False
    return compiled_ops() is not None


MODES = {
    "plain": "plain (float weights)",
    "edkm": "eDKM, {bits}-bit clustering in the loop ({layout})",
    "edkm-torch": "eDKM, {bits}-bit, pure-torch engine, no compiled kernels ({layout})",
}


def run(args, mode: str) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        mode,
        *layout_argv(args),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    command += ["--model", args.model] if args.model else []
    env = worker_env()
    if mode == "edkm-torch":
        env["OPTIMUM_EDKM_DISABLE_KERNELS"] = "1"
    load_before = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    result = worker_result(done.returncode, done.stdout)
    if result is None:
        raise RuntimeError(f"{mode} worker failed:\n{(done.stderr or done.stdout)[-3000:]}")
    result["load_average"] = [load_before, os.getloadavg()[0]]
    return result


def pool(runs: list) -> dict:
    """One row per mode from its runs: all timed steps, their median and minimum, the largest peak."""
    times = [t for run in runs for t in run["times"]]
    cpu_times = [t for run in runs for t in run["cpu_times"]]
    return {
        "times": times,
        "median_seconds": statistics.median(times),
        "min_seconds": min(times),
        "cpu_times": cpu_times,
        "median_cpu_seconds": statistics.median(cpu_times),
        "peak_bytes": max(run["peak_bytes"] for run in runs),
        "loss": runs[-1]["loss"],
        "model": runs[-1]["model"],
        "parameters": runs[-1]["parameters"],
        "engine_kernels": runs[-1]["engine_kernels"],
        "load_average": [run["load_average"] for run in runs],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: offline SmolLM2-135M)")
    add_layout_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the modes this many times")
    parser.add_argument("--modes", default="plain,edkm", help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of the workers (0: torch's default)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_step.json"))
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    edkm_config(args)  # a bad layout is refused here, before any worker starts
    if args.worker:
        args.mode = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return {}

    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or "plain" not in modes or len(modes) < 2:
        parser.error(
            f"--modes needs 'plain' and at least one of edkm, edkm-torch (got {args.modes!r}; unknown: {unknown})"
        )
    runs = {mode: [] for mode in modes}
    for round_index in range(args.rounds):
        for mode in modes:
            print(
                f"round {round_index + 1}/{args.rounds}: {mode} fine-tuning ... (load average "
                f"{os.getloadavg()[0]:.2f})",
                flush=True,
            )
            runs[mode].append(run(args, mode))
    rows = {mode: pool(mode_runs) for mode, mode_runs in runs.items()}
    plain = rows["plain"]
    report = {
        "setting": {
            "model": plain["model"],
            "parameters": plain["parameters"],
            **layout_record(args),
            "layout": layout_name(args),
            "batch": f"{args.batch_size} x {args.seq_len} tokens",
            "steps_timed": args.steps,
            "rounds": args.rounds,
            "optimizer": "AdamW",
            "what": "forward + backward + optimizer step",
        },
        "machine": dict(machine(torch.device(args.device)), threads=args.threads or torch.get_num_threads()),
        "rows": rows,
        "ratios": {
            mode: {
                "time_median": rows[mode]["median_seconds"] / plain["median_seconds"],
                "time_min": rows[mode]["min_seconds"] / plain["min_seconds"],
                "cpu_time_median": rows[mode]["median_cpu_seconds"] / plain["median_cpu_seconds"],
                "memory_overhead": rows[mode]["peak_bytes"] / plain["peak_bytes"] - 1,
            }
            for mode in modes
            if mode != "plain"
        },
    }
    main_mode = "edkm" if "edkm" in rows else modes[1]
    report["ratio_time"] = report["ratios"][main_mode]["time_median"]
    report["memory_overhead"] = report["ratios"][main_mode]["memory_overhead"]
    loads = [load for row in rows.values() for pair in row["load_average"] for load in pair]
    print()
    print(
        f"{plain['model']} ({plain['parameters'] / 1e6:.1f} M parameters), batch {args.batch_size} x "
        f"{args.seq_len} tokens, AdamW, device {args.device} "
        f"({report['machine'].get('gpu', report['machine']['cpu'])}, {report['machine']['threads']} threads); "
        f"{args.rounds} round(s) x {args.steps} timed steps; load average {min(loads):.2f}-{max(loads):.2f}"
    )
    print()
    print(
        "| fine-tuning | step time (median) | step time (min) | CPU time of the step (median) | peak memory of the "
        "process | vs plain |"
    )
    print("|---|---|---|---|---|---|")
    for mode in modes:
        row = rows[mode]
        versus = (
            "-"
            if mode == "plain"
            else f"{report['ratios'][mode]['time_median']:.2f}x median, {report['ratios'][mode]['time_min']:.2f}x "
            f"min, {report['ratios'][mode]['cpu_time_median']:.2f}x CPU time, memory "
            f"{100 * report['ratios'][mode]['memory_overhead']:+.1f}%"
        )
        print(
            f"| {MODES[mode].format(bits=args.bits, layout=layout_name(args))} | {row['median_seconds']:.2f} s | "
            f"{row['min_seconds']:.2f} s | "
            f"{row['median_cpu_seconds']:.2f} s | {row['peak_bytes'] / GIB:.2f} GiB | {versus} |"
        )
    print()
    print(
        f"{main_mode} / plain: step time {report['ratio_time']:.2f}x (median), memory overhead "
        f"{100 * report['memory_overhead']:+.1f}%"
    )
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
