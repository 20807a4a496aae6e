"""Memory and time of clustering one LLaMA-7B attention layer: plain DKM vs eDKM (vs coremltools' DKM).

The setting of the eDKM paper's ablation: the four attention projections of one LLaMA-7B decoder layer
(q, k, v, o: 4096 x 4096 each, bf16 weights), 3 bits, one forward + backward of the clustering.
Every engine runs in its own fresh process so that peak memory is its own.

    python benchmarks/layer_memory.py                   # full setting, ~5-10 minutes on 2 CPU cores
    python benchmarks/layer_memory.py --size 1024 --runs 3   # quick

Prints a markdown table and writes JSON (``--out``, default ``benchmarks/results/layer_memory.json``).
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
from common import GIB, ROOT, PeakMemory, machine, worker_env, worker_result, write_json  # noqa: E402,F401  (shared helpers)


# ----------------------------------------------------------------------------------------------- worker
def make_projections(count: int, size: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(size, size, generator=generator) * 0.02)
        .to(device=device, dtype=torch.bfloat16)
        .requires_grad_(True)
        for _ in range(count)
    ]


def run_optimum_edkm(args, device) -> dict:
    from optimum_edkm.clustering import ClusteringSpec, SavedTensorMeter, dkm_reference, edkm_cluster, init_centroids

    engine = {"dkm": dkm_reference, "edkm": edkm_cluster}[args.worker]
    weights = make_projections(args.projections, args.size, device)
    spec = ClusteringSpec(bits=args.bits)
    init_start = time.perf_counter()
    centroids = [init_centroids(w, spec) for w in weights]
    init_seconds = time.perf_counter() - init_start
    upstream = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    peak = PeakMemory(device)
    times, saved, resident, peaks = [], [], [], []
    for run in range(args.runs + 1):  # run 0 warms up caches and is not reported
        for w in weights:
            w.grad = None
        peak.start()
        start = time.perf_counter()
        with SavedTensorMeter(resident=weights) as meter:
            outputs = [engine(w, c, spec).weight for w, c in zip(weights, centroids)]
        torch.autograd.backward(outputs, [upstream] * len(outputs))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        del outputs
        if run:
            times.append(elapsed)
            saved.append(meter.saved_bytes)
            resident.append(meter.resident_bytes)
            peaks.append(peak.peak())
    return {
        "init_seconds": init_seconds,
        "times": times,
        "saved_bytes": max(saved),
        "resident_bytes": max(resident),
        "peak_bytes": max(peaks),
    }


def run_coremltools(args, device) -> dict:
    import coremltools
    import torch.nn as nn
    from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig

    sys.path.insert(0, ROOT)
    from optimum_edkm.clustering import SavedTensorMeter

    model = nn.ModuleList(nn.Linear(args.size, args.size, bias=False) for _ in range(args.projections))
    with torch.no_grad():
        for layer, w in zip(model, make_projections(args.projections, args.size, torch.device("cpu"))):
            layer.weight.copy_(w.float())
    model = model.to(device=device, dtype=torch.bfloat16)
    # its defaults except kmeans_n_init (10 restarts of its one-time k-means++ take > 10 min on 4096^2 on
    # 2 cores); that option only changes the initialisation, which is timed separately
    options = {"n_bits": args.bits, "granularity": "per_tensor", "kmeans_n_init": args.coremltools_kmeans_n_init}
    config = DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(**options))
    palettizer = DKMPalettizer(nn.Sequential(*model), config)
    model = palettizer.prepare(inplace=True)
    x = torch.randn(8, args.size, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    init_start = time.perf_counter()
    with torch.no_grad():
        for layer in model:
            layer(x)
    init_seconds = time.perf_counter() - init_start
    parameters = list(model.parameters())
    peak = PeakMemory(device)
    times, saved, resident, peaks = [], [], [], []
    for run in range(args.runs + 1):
        model.zero_grad(set_to_none=True)
        peak.start()
        start = time.perf_counter()
        with SavedTensorMeter(resident=parameters + [x]) as meter:
            loss = sum(layer(x).float().pow(2).mean() for layer in model)
        loss.backward()
        elapsed = time.perf_counter() - start
        del loss
        if run:
            times.append(elapsed)
            saved.append(meter.saved_bytes)
            resident.append(meter.resident_bytes)
            peaks.append(peak.peak())
    return {
        "init_seconds": init_seconds,
        "times": times,
        "saved_bytes": max(saved),
        "resident_bytes": max(resident),
        "peak_bytes": max(peaks),
        "options": options,
        "version": coremltools.__version__,
        "note": "includes the 8-token linear layer itself (negligible); bf16 model on CPU",
    }


def worker_main(args) -> None:
    device = torch.device(args.device)
    if args.worker == "coremltools":
        result = run_coremltools(args, device)
    else:
        result = run_optimum_edkm(args, device)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------- driver
def run_worker(args, engine: str, projections: int) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        engine,
        "--size",
        str(args.size),
        "--projections",
        str(projections),
        "--bits",
        str(args.bits),
        "--runs",
        str(args.runs),
        "--device",
        args.device,
        "--coremltools-kmeans-n-init",
        str(args.coremltools_kmeans_n_init),
    ]
    env = worker_env()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    result = worker_result(done.returncode, done.stdout)
    if result is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"engine": engine, "status": "error", "error": " | ".join(tail)}
    result.update(
        engine=engine, status="ok", projections_measured=projections, wall_seconds=time.perf_counter() - start
    )
    return result


def dkm_projections_that_fit(args) -> int:
    """All four projections if plain DKM's saved maps (~100 B/weight in bf16, x2 for backward peaks) fit."""
    need = args.projections * args.size**2 * 2**args.bits / 8 * 110 * 2
    if args.device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(args.device))[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return args.projections if need < 0.7 * free else 1


def scaled(result: dict, factor: float) -> dict:
    if result.get("status") != "ok" or factor == 1:
        return result
    out = dict(result)
    for key in ("saved_bytes", "resident_bytes", "peak_bytes"):
        out[key] = result[key] * factor
    out["times"] = [t * factor for t in result["times"]]
    out["scaled_from_projections"] = result["projections_measured"]
    return out


def fmt_bytes(value: float) -> str:
    return f"{value / GIB:.3f} GiB" if value >= 0.1 * GIB else f"{value / 2**20:.2f} MiB"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="rows = columns of each projection")
    parser.add_argument("--projections", type=int, default=4, help="projections in the layer (q, k, v, o)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="timed fwd+bwd runs (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dkm-projections",
        default="auto",
        help="projections measured for plain DKM ('auto': all if they fit, else 1 and scaled)",
    )
    parser.add_argument(
        "--coremltools",
        choices=["auto", "skip"],
        default="auto",
        help="add coremltools' DKMPalettizer row when coremltools is installed (CPU only)",
    )
    parser.add_argument(
        "--coremltools-projections",
        type=int,
        default=1,
        help="projections measured for coremltools (scaled linearly to --projections)",
    )
    parser.add_argument("--coremltools-kmeans-n-init", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "layer_memory.json"))
    parser.add_argument("--worker", choices=["dkm", "edkm", "coremltools"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args)
        return {}

    device = torch.device(args.device)
    print(f"machine: {json.dumps(machine(device))}", flush=True)
    dkm_count = dkm_projections_that_fit(args) if args.dkm_projections == "auto" else int(args.dkm_projections)
    rows = {}
    print(f"eDKM on {args.projections} projection(s) ...", flush=True)
    rows["eDKM (optimum-edkm)"] = run_worker(args, "edkm", args.projections)
    print(f"plain DKM on {dkm_count} projection(s) ...", flush=True)
    rows["DKM (reference)"] = scaled(run_worker(args, "dkm", dkm_count), args.projections / dkm_count)
    if args.coremltools == "auto" and device.type == "cpu":
        try:
            import importlib.util

            has_coremltools = importlib.util.find_spec("coremltools") is not None
        except ValueError:
            has_coremltools = False
        if has_coremltools:
            count = min(args.coremltools_projections, args.projections)
            print(f"coremltools DKMPalettizer on {count} projection(s) ...", flush=True)
            rows["DKM (coremltools DKMPalettizer)"] = scaled(
                run_worker(args, "coremltools", count), args.projections / count
            )

    dkm, edkm = rows["DKM (reference)"], rows["eDKM (optimum-edkm)"]
    for row in rows.values():
        if row.get("status") == "ok":
            row["median_seconds"] = statistics.median(row["times"])
    report = {
        "setting": {
            "layer": f"{args.projections} x ({args.size} x {args.size}) bf16 projections",
            "bits": args.bits,
            "iterations": 3,
            "temperature": 1e-4,
            "runs": args.runs,
            "what": "forward + backward of the clustering of every projection",
        },
        "machine": machine(device),
        "rows": rows,
    }
    if dkm.get("status") == "ok" and edkm.get("status") == "ok":
        report["ratio_saved_bytes"] = dkm["saved_bytes"] / max(edkm["saved_bytes"], 1)
        report["ratio_saved_bytes_including_weights"] = (dkm["saved_bytes"] + dkm["resident_bytes"]) / (
            edkm["saved_bytes"] + edkm["resident_bytes"]
        )
        report["ratio_time"] = dkm["median_seconds"] / edkm["median_seconds"]
        report["ratio_peak_bytes"] = dkm["peak_bytes"] / max(edkm["peak_bytes"], 1)

    print()
    print(
        f"{report['setting']['layer']}, {args.bits} bits, fwd+bwd of the clustering, "
        f"median of {args.runs} runs, device {device} ({report['machine'].get('gpu', report['machine']['cpu'])}, "
        f"{report['machine']['threads']} threads)"
    )
    print()
    print(
        "| engine | saved for backward (beyond the weights) | weights referenced by the graph | peak memory "
        "| fwd+bwd median | measured on |"
    )
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        if row.get("status") != "ok":
            print(f"| {name} | error: {row.get('error', '')[:120]} | | | | |")
            continue
        measured = (
            f"{row['scaled_from_projections']} projection(s), x{args.projections / row['scaled_from_projections']:g}"
            if "scaled_from_projections" in row
            else f"{row['projections_measured']} projection(s)"
        )
        print(
            f"| {name} | {fmt_bytes(row['saved_bytes'])} | {fmt_bytes(row['resident_bytes'])} | "
            f"{fmt_bytes(row['peak_bytes'])} | {row['median_seconds']:.2f} s | {measured} |"
        )
    if "ratio_saved_bytes" in report:
        print()
        print(
            f"DKM / eDKM: saved for backward {report['ratio_saved_bytes']:,.0f}x "
            f"({report['ratio_saved_bytes_including_weights']:.1f}x counting the referenced weights), "
            f"peak memory {report['ratio_peak_bytes']:.1f}x, fwd+bwd time {report['ratio_time']:.1f}x"
        )
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
