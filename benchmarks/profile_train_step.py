"""Where the time of one training step goes: torch.profiler breakdown per phase and per op.

The setting of ``benchmarks/train_step.py`` (SmolLM2-135M, 8 x 256 tokens of real text, AdamW). After
``--warmup`` steps, one step is profiled and split into phases:

* clustering forward / backward - everything inside the eDKM engine's ``edkm::forward`` / ``edkm::backward``
  ranges (the engine labels them itself);
* model forward / backward - the rest of ``loss = model(...)`` / ``loss.backward()``;
* optimizer - ``optimizer.step()`` and ``zero_grad``.

For each phase the ops are listed by self CPU time (time spent in the op itself, not in ops it calls).

    python benchmarks/profile_train_step.py                  # eDKM 3-bit, one LUT per tensor, offline model
    python benchmarks/profile_train_step.py --granularity per_grouped_channel --group-size 1   # one per channel
    python benchmarks/profile_train_step.py --mode plain     # the same step without clustering
    python benchmarks/profile_train_step.py --top 12 --out /tmp/profile.json

Prints tables and writes JSON (default ``benchmarks/results/profile_train_step_<mode>.json``, or
``profile_train_step_edkm_<granularity>[_g<size>][_scale].json`` for another layout than one LUT per tensor).
The profiler adds a little overhead per op; compare phases within one profile, and use ``train_step.py`` for step times.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from common import machine, write_json  # noqa: E402
from train_step import add_layout_arguments, edkm_config, layout_name, layout_record  # noqa: E402

STEP_RANGES = {"step::forward": "model forward", "step::backward": "model backward", "step::optimizer": "optimizer"}
ENGINE_RANGES = {"edkm::forward": "clustering forward", "edkm::backward": "clustering backward"}
MMAP_THRESHOLD = "131072"  # as in train_step.py
PHASES = ["clustering forward", "model forward", "clustering backward", "model backward", "optimizer"]


def build(args):
    import optimum_edkm
    from optimum_edkm.data import CALIBRATION_SPLIT, load_text
    from optimum_edkm.models import load_causal_lm

    torch.manual_seed(0)
    model, tokenizer, info = load_causal_lm(args.model)
    model.to(args.device)
    if args.mode == "edkm":
        optimum_edkm.prepare(model, edkm_config(args))
    model.train()
    token_ids = load_text(split=CALIBRATION_SPLIT).token_ids(tokenizer)
    batch = token_ids[: args.batch_size * args.seq_len].view(args.batch_size, args.seq_len).to(args.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, batch, optimizer, info


def step(model, batch, optimizer, device) -> float:
    start = time.perf_counter()
    with record_function("step::forward"):
        loss = model(input_ids=batch, labels=batch).loss
    with record_function("step::backward"):
        loss.backward()
    with record_function("step::optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _walk(event, phase, totals, ops):
    """Attribute ``event``'s self time to ``phase`` (engine ranges open their own phase), then its children."""
    phase = ENGINE_RANGES.get(event.name, phase)
    if event.name in ENGINE_RANGES:
        totals[phase] += event.cpu_time_total
    ops[phase][event.name][0] += event.self_cpu_time_total
    ops[phase][event.name][1] += 1
    for child in event.cpu_children:
        _walk(child, phase, totals, ops)


def breakdown(events, steps: int) -> dict:
    """Per-phase time (us) and per-op self time and calls, per step, from the profiler's event tree."""
    totals = collections.Counter()
    ops = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    for event in events:
        if event.cpu_parent is None and event.name in STEP_RANGES:
            phase = STEP_RANGES[event.name]
            totals[phase] += event.cpu_time_total
            _walk(event, phase, totals, ops)
    # model phases are what remains of the step ranges once the engine ranges inside them are taken out
    totals["model forward"] -= totals["clustering forward"]
    totals["model backward"] -= totals["clustering backward"]
    return {
        phase: {
            "total_us": totals[phase] / steps,
            "ops": sorted(
                (
                    {"op": name, "self_us": value[0] / steps, "calls": value[1] // steps}
                    for name, value in ops[phase].items()
                    if name not in STEP_RANGES
                ),
                key=lambda row: -row["self_us"],
            ),
        }
        for phase in PHASES
    }


def same_allocator_as_train_step() -> None:
    """Re-run this script under the allocator setting of train_step.py's workers (big buffers are mapped and
    returned to the system at once, so every step pays for first-touching its large temporaries there too)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD))


def result_name(args) -> str:
    """``edkm`` / ``plain`` for the default layout (the files the docs link), else the layout in the name."""
    if args.mode == "plain" or (args.granularity == "per_tensor" and not args.per_channel_scale):
        return args.mode
    name = f"{args.mode}_{args.granularity}" + (f"_g{args.group_size}" if args.group_size is not None else "")
    return name + ("_scale" if args.per_channel_scale else "")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["edkm", "plain"], default="edkm")
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: offline SmolLM2-135M)")
    add_layout_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (times are per-step averages)")
    parser.add_argument("--top", type=int, default=8, help="ops listed per phase")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    edkm_config(args)  # a bad layout is refused before the model loads
    args.device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"profile_train_step_{result_name(args)}.json")

    model, batch, optimizer, info = build(args)
    unprofiled = [step(model, batch, optimizer, args.device) for _ in range(args.warmup)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    load_before = os.getloadavg()
    with profile(activities=activities) as prof:
        times = [step(model, batch, optimizer, args.device) for _ in range(args.steps)]
    seconds = sum(times) / len(times)
    phases = breakdown(prof.events(), args.steps)
    total = sum(p["total_us"] for p in phases.values())

    print(
        f"{info.get('name', args.model)}, {args.mode} ({layout_name(args)}), batch {args.batch_size} x "
        f"{args.seq_len}, device "
        f"{args.device}, {torch.get_num_threads()} threads; profiled step {seconds:.2f} s (mean of {args.steps}) "
        f"(unprofiled warm-up {', '.join(f'{s:.2f}' for s in unprofiled)} s); load average "
        f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print()
    print("| phase | time | share |")
    print("|---|---|---|")
    for phase in PHASES:
        print(f"| {phase} | {phases[phase]['total_us'] / 1e6:.3f} s | {100 * phases[phase]['total_us'] / total:.1f}% |")
    for phase in PHASES:
        rows = phases[phase]["ops"][: args.top]
        if not rows or phases[phase]["total_us"] == 0:
            continue
        print()
        print(f"{phase}: top ops by self time")
        print()
        print("| op | self time | calls |")
        print("|---|---|---|")
        for row in rows:
            print(f"| `{row['op']}` | {row['self_us'] / 1e3:.1f} ms | {row['calls']} |")
    report = {
        "setting": {
            "model": info.get("name", args.model),
            "mode": args.mode,
            **layout_record(args),
            "layout": layout_name(args),
            "batch": f"{args.batch_size} x {args.seq_len} tokens",
            "optimizer": "AdamW",
        },
        "machine": machine(args.device),
        "load_average": [load_before[0], os.getloadavg()[0]],
        "profiled_step_seconds": seconds,
        "warmup_step_seconds": unprofiled,
        "phases": {
            phase: {
                "seconds": value["total_us"] / 1e6,
                "ops": [
                    dict(op=row["op"], self_seconds=row["self_us"] / 1e6, calls=row["calls"])
                    for row in value["ops"][:40]
                ],
            }
            for phase, value in phases.items()
        },
    }
    write_json(out, report)
    return report


if __name__ == "__main__":
    same_allocator_as_train_step()
    main()
