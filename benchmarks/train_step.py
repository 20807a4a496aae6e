"""Time and peak memory of one training step: plain fine-tuning vs eDKM fine-tuning of the same model.

One step = forward + backward + AdamW update on a batch of ``--batch-size`` x ``--seq-len`` tokens of real
text. Each mode runs in its own fresh process (so that its peak memory is its own): a warm-up step, then
``--steps`` timed steps; the median time and the process's peak memory are reported.

    python benchmarks/train_step.py                       # default offline model (SmolLM2-135M), 3 bits
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
from layer_memory import GIB, PeakMemory, machine, write_json  # noqa: E402


def worker(args) -> dict:
    import optimum_edkm
    from optimum_edkm import EDKMConfig
    from optimum_edkm.data import CALIBRATION_SPLIT, load_text
    from optimum_edkm.models import load_causal_lm

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, tokenizer, info = load_causal_lm(args.model)
    model.to(device)
    if args.mode == "edkm":
        optimum_edkm.prepare(model, EDKMConfig(bits=args.bits))
    model.train()
    token_ids = load_text(split=CALIBRATION_SPLIT).token_ids(tokenizer)
    need = args.batch_size * args.seq_len
    batch = token_ids[:need].view(args.batch_size, args.seq_len).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    peak = PeakMemory(device)
    peak.start()
    baseline = peak.base
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
    peak_bytes = peak.peak() + baseline             # peak of the process (model, optimizer state included)
    return {"times": times, "median_seconds": statistics.median(times), "peak_bytes": peak_bytes,
            "loss": float(loss), "model": info.get("name", args.model),
            "parameters": sum(p.numel() for p in model.parameters())}


def run(args, mode: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--bits", str(args.bits),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--device", args.device] + (["--model", args.model] if args.model else [])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} worker failed:\n{(done.stderr or done.stdout)[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: offline SmolLM2-135M)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_step.json"))
    parser.add_argument("--worker", choices=["plain", "edkm"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.mode = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return {}

    rows = {}
    for mode in ("plain", "edkm"):
        print(f"{mode} fine-tuning ...", flush=True)
        rows[mode] = run(args, mode)
    plain, edkm = rows["plain"], rows["edkm"]
    report = {
        "setting": {"model": plain["model"], "parameters": plain["parameters"], "bits": args.bits,
                    "batch": f"{args.batch_size} x {args.seq_len} tokens", "steps_timed": args.steps,
                    "optimizer": "AdamW", "what": "forward + backward + optimizer step"},
        "machine": machine(torch.device(args.device)),
        "rows": rows,
        "ratio_time": edkm["median_seconds"] / plain["median_seconds"],
        "memory_overhead": edkm["peak_bytes"] / plain["peak_bytes"] - 1,
    }
    print()
    print(f"{plain['model']} ({plain['parameters'] / 1e6:.1f} M parameters), batch {args.batch_size} x "
          f"{args.seq_len} tokens, AdamW, device {args.device} "
          f"({report['machine'].get('gpu', report['machine']['cpu'])}, {report['machine']['threads']} threads)")
    print()
    print("| fine-tuning | step time (median) | peak memory of the process |")
    print("|---|---|---|")
    for mode, label in (("plain", "plain (float weights)"), ("edkm", f"eDKM, {args.bits}-bit clustering in the loop")):
        print(f"| {label} | {rows[mode]['median_seconds']:.2f} s | {rows[mode]['peak_bytes'] / GIB:.2f} GiB |")
    print()
    print(f"eDKM / plain: step time {report['ratio_time']:.2f}x, memory overhead "
          f"{100 * report['memory_overhead']:+.1f}%")
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
