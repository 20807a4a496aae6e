"""LoRA fine-tuning on a palettized base (QLoRA-style) against LoRA on the float model: memory and step time.

Three modes, each in its own fresh process (so that its peak memory is its own), on the same batch of real
text, AdamW on the adapters only (rank ``--rank`` on q_proj and v_proj):

* ``float``: peft LoRA on the float model;
* ``palettized``: ``optimum_edkm.peft`` LoRA on the model palettized to ``--bits`` (k-means LUTs with an fp16
  scale per output channel; no eDKM training, which does not change memory or speed), every palettized weight
  decoded again in backward (the default: ``EDKMLoraLinear.decode_in_backward = True``, and the fused LUT op of
  the layers LoRA does not target keeps only the packed indices);
* ``palettized-keep``: ``EDKMLoraLinear.decode_in_backward = False`` and
  ``optimum_edkm.peft.decode_in_backward(model, enabled=False)``: autograd keeps every decoded dense weight
  until backward (peft's plain path).

    python benchmarks/lora_memory.py                     # offline SmolLM2-135M, batch 4 x 256, 3 timed steps

Prints a table and writes JSON (``benchmarks/results/lora_memory.json``).
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

MODES = ("float", "palettized", "palettized-keep")
TARGETS = ["q_proj", "v_proj"]


def worker(args) -> dict:
    import peft

    import optimum_edkm
    from optimum_edkm import EDKMConfig
    from optimum_edkm.data import CALIBRATION_SPLIT, load_text
    from optimum_edkm.models import load_causal_lm
    from optimum_edkm.peft import EDKMLoraLinear, decode_in_backward, lora_config
    from optimum_edkm.storage import model_size

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, tokenizer, info = load_causal_lm(args.model)
    model.to(device)
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0)
    if args.mode == "float":
        model = peft.get_peft_model(model, peft.LoraConfig(**lora))
    else:
        optimum_edkm.prepare(model, EDKMConfig(bits=args.bits, enable_per_channel_scale=True))
        optimum_edkm.palettize(model)
        model = peft.get_peft_model(model, lora_config(**lora))
        EDKMLoraLinear.decode_in_backward = args.mode == "palettized"
        decode_in_backward(model, enabled=args.mode == "palettized")  # the layers LoRA does not target
    import gc

    gc.collect()
    resident = model_size(model).model_bytes
    model.train()
    token_ids = load_text(split=CALIBRATION_SPLIT).token_ids(tokenizer)
    batch = token_ids[: args.batch_size * args.seq_len].view(args.batch_size, args.seq_len).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
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
    return {
        "times": times,
        "median_seconds": statistics.median(times),
        "peak_bytes": peak.peak() + baseline,
        "training_bytes": peak.peak(),
        "state_dict_bytes": resident,
        "loss": float(loss),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "model": info.get("name", args.model),
        "parameters": info.get("parameters"),
    }


def run(args, mode: str) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        mode,
        "--bits",
        str(args.bits),
        "--rank",
        str(args.rank),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
    ] + (["--model", args.model] if args.model else [])
    env = worker_env()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    result = worker_result(done.returncode, done.stdout)
    if result is None:
        raise RuntimeError(f"{mode} worker failed:\n{(done.stderr or done.stdout)[-3000:]}")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: offline SmolLM2-135M)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "lora_memory.json"))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.mode = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return {}

    rows = {}
    for mode in MODES:
        print(f"LoRA on the {mode} model ...", flush=True)
        rows[mode] = run(args, mode)
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[:3]
    base = rows["float"]
    report = {
        "setting": {
            "model": base["model"],
            "parameters": base["parameters"],
            "bits": args.bits,
            "rank": args.rank,
            "targets": TARGETS,
            "batch": f"{args.batch_size} x {args.seq_len} tokens",
            "steps_timed": args.steps,
            "optimizer": "AdamW (adapters only)",
            "what": "forward + backward + optimizer step",
        },
        "machine": machine(torch.device(args.device)),
        "load_average": load,
        "rows": rows,
    }
    print()
    print(
        f"{base['model']}, LoRA r={args.rank} on {'/'.join(TARGETS)} ({base['trainable_parameters']:,} trainable), "
        f"batch {args.batch_size} x {args.seq_len}, device {args.device}, load average {' '.join(load)}"
    )
    print()
    print("| LoRA base | state dict | peak memory of the process | of which the training loop | step time (median) |")
    print("|---|---:|---:|---:|---:|")
    labels = {
        "float": "float model",
        "palettized": f"palettized {args.bits}-bit, decode in backward",
        "palettized-keep": f"palettized {args.bits}-bit, dense weight kept for backward",
    }
    for mode in MODES:
        row = rows[mode]
        print(
            f"| {labels[mode]} | {row['state_dict_bytes'] / GIB:.3f} GiB | {row['peak_bytes'] / GIB:.2f} GiB | "
            f"{row['training_bytes'] / GIB:.2f} GiB | {row['median_seconds']:.2f} s |"
        )
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
