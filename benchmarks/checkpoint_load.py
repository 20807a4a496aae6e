"""What verifying a checkpoint costs when loading it: ``from_pretrained`` of a palettized model with and without
the sha256 check of every tensor (the config / structure / value checks always run).

The model is the offline SmolLM2-135M palettized without training (k-means; quality is irrelevant here), saved
once to a temporary folder; every load runs in a fresh process (so the file cache is warm for both, which is the
honest setting for "loading stays fast": the hash reads bytes the loader reads anyway).

    python benchmarks/checkpoint_load.py                 # 3-bit linears, 4-bit tied embedding; 5 loads each
    python benchmarks/checkpoint_load.py --runs 3 --embedding-bits 0

Prints a table and writes ``benchmarks/results/checkpoint_load.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, machine, worker_env, worker_result, write_json

WORKER = r"""
import json, sys, time
started = time.perf_counter()
import torch, optimum_edkm
from optimum_edkm import checkpoint
from transformers import AutoModelForCausalLM
imported = time.perf_counter()
hashing = sys.argv[2] == "hash"
timings = {}
original = checkpoint._check_hashes
def timed(*args, **kwargs):
    start = time.perf_counter()
    original(*args, **kwargs)
    timings["hash_s"] = time.perf_counter() - start
checkpoint._check_hashes = timed
with optimum_edkm.verify_checksums(hashing):
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    load = time.perf_counter() - start
print("RESULT " + json.dumps({"load_s": load, "import_s": imported - started, **timings}))
"""


def build(directory: str, embedding_bits: int) -> dict:
    import torch

    import optimum_edkm
    from optimum_edkm.models import load_causal_lm

    torch.manual_seed(0)
    model, tokenizer, info = load_causal_lm()
    config = optimum_edkm.EDKMConfig(bits=3, enable_per_channel_scale=True, embedding_bits=embedding_bits or None)
    optimum_edkm.prepare(model, config)
    optimum_edkm.palettize(model)
    optimum_edkm.save_pretrained(model, directory)
    return {"model": info["name"], "config": config.to_dict(), **optimum_edkm.checkpoint_bytes(directory)}


def load(directory: str, mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, directory, mode],
        capture_output=True,
        text=True,
        env=worker_env(release_memory=False),
    )
    result = worker_result(done.returncode, done.stdout)
    if result is None:
        raise RuntimeError(f"load worker failed:\n{done.stderr[-3000:]}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--embedding-bits", type=int, default=4, help="0 keeps the tied embedding in float")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "checkpoint_load.json"))
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        directory = os.path.join(workdir, "palettized")
        checkpoint = build(directory, args.embedding_bits)
        rows = {"with sha256 check": [], "without (verify_checksums(False))": []}
        for _ in range(args.runs):  # interleaved, so drift in machine load hits both
            rows["with sha256 check"].append(load(directory, "hash"))
            rows["without (verify_checksums(False))"].append(load(directory, "skip"))
    summary = {
        name: {
            "load_s_median": statistics.median(r["load_s"] for r in runs),
            "hash_s_median": statistics.median(r.get("hash_s", 0.0) for r in runs),
            "runs": runs,
        }
        for name, runs in rows.items()
    }
    hashed = summary["with sha256 check"]
    megabytes = checkpoint["file_bytes"] / 1e6
    print(f"\ncheckpoint: {checkpoint['model']}, {megabytes:.1f} MB in {len(checkpoint['files'])} file(s)\n")
    print("| load | from_pretrained (median) | of which sha256 |")
    print("|---|---:|---:|")
    for name, row in summary.items():
        print(f"| {name} | {row['load_s_median']:.2f} s | {row['hash_s_median']:.3f} s |")
    throughput = megabytes / hashed["hash_s_median"] if hashed["hash_s_median"] else float("nan")
    extra = hashed["load_s_median"] - summary["without (verify_checksums(False))"]["load_s_median"]
    print(
        f"\nsha256 of every tensor: {hashed['hash_s_median']:.3f} s ({throughput:,.0f} MB/s); load time difference "
        f"{extra:+.2f} s"
    )
    write_json(
        args.out,
        {
            "benchmark": "checkpoint_load",
            "checkpoint": checkpoint,
            "summary": summary,
            "hash_mb_per_s": throughput,
            "machine": machine(_cpu()),
            "wall_s": time.time() - started,
        },
    )
    return 0


def _cpu():
    import torch

    return torch.device("cpu")


if __name__ == "__main__":
    sys.exit(main())
