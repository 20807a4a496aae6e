"""The eDKM paper's ablation: memory kept for backward when clustering one LLaMA-7B attention layer.

Four 4096 x 4096 bf16 projections (q, k, v, o), 3 bits, one forward + backward of the clustering, with

* DKM                  - ``dkm_reference``: the |W| x k maps, kept by autograd;
* + marshaling         - the same inside ``TensorMarshal``: saved tensors offloaded, views / copies
                         deduplicated;
* + uniquification     - ``edkm_cluster``: keeps only the weight (already resident) and the centroids;
* + sharding           - ``dkm_reference`` inside ``TensorMarshal(shard=True)`` across 2 gloo processes;
* all together         - ``edkm_cluster`` inside ``TensorMarshal(shard=True)`` across 2 gloo processes;

plus two reference rows: offloading without deduplication (what naive offloading would copy) and, on a
CPU-only machine, marshaling with the copies forced (the offload target is then the compute device, so the
plain "+ marshaling" row copies nothing).

Each row runs in fresh processes (two for the sharded rows, loopback only) so that peak memory is its own.

    python benchmarks/ablation.py                   # full setting (~10 min on 2 CPU cores: 1 projection x4)
    python benchmarks/ablation.py --quick           # 512 x 512, 1 run, ~1.5 min: smoke test (temp dir)

Prints the machine and a markdown table, writes JSON (``--json``, default
``benchmarks/results/ablation.json``) and a bar chart (``--png``, default ``docs/ablation.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import GIB, PeakMemory, machine, worker_env, worker_result, write_json  # noqa: E402  (shared helpers)
from layer_memory import make_projections  # noqa: E402

# As quoted in the issue (the research notes could not check them against the paper's body).
PAPER_REDUCTION = {"+ marshaling": 2.9, "+ uniquification": 16.4, "+ sharding": 23.5, "all together": 130.0}
TARGET_TOGETHER = 130.0
TARGET_MARSHAL_OVERHEAD = 0.10


class Row:
    def __init__(self, name, engine, policy, world=1, runs=None, reference=False, paired=False, note=""):
        self.name, self.engine, self.policy, self.world = name, engine, policy, world
        self.runs, self.reference, self.paired, self.note = runs, reference, paired, note


def rows_for(device: torch.device):
    cpu = device.type == "cpu"
    rows = [
        Row("DKM", "dkm", None),
        Row("+ marshaling", "dkm", {}, paired=True),
        Row("+ uniquification", "edkm", None),
        Row(
            "+ sharding",
            "dkm",
            {"shard": True, "memory_threshold": 1.0},
            world=2,
            note="2 gloo processes, per rank; no offload (threshold never reached)",
        ),
        Row("all together", "edkm", {"shard": True}, world=2, note="2 gloo processes; per rank"),
        # on a CPU-only machine the copies are forced, so that the row's bytes are ones really held
        Row(
            "offload without dedup",
            "dkm",
            {"deduplicate": False, "max_view_hops": 0, "copy_same_device": cpu},
            runs=1,
            reference=True,
            note="reference: what naive offloading copies; 1 run",
        ),
    ]
    if cpu:
        rows.insert(
            2,
            Row(
                "+ marshaling, copies forced",
                "dkm",
                {"copy_same_device": True},
                reference=True,
                paired=True,
                note="reference: copies that an accelerator would make, made CPU to CPU",
            ),
        )
    return rows


# ----------------------------------------------------------------------------------------------- worker
def worker(args) -> None:
    import torch.distributed as dist

    from optimum_edkm.clustering import ClusteringSpec, SavedTensorMeter, dkm_reference, edkm_cluster, init_centroids
    from optimum_edkm.marshaling import TensorMarshal

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.world > 1:
        import datetime

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        dist.init_process_group("gloo", rank=args.rank, world_size=args.world, timeout=datetime.timedelta(seconds=600))
    engine = {"dkm": dkm_reference, "edkm": edkm_cluster}[args.worker]
    policy = json.loads(args.policy) if args.policy else None
    weights = make_projections(args.projections, args.size, device)  # seeded: identical on every rank
    spec = ClusteringSpec(bits=args.bits)
    centroids = [init_centroids(w.detach(), spec) for w in weights]
    upstream = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(1))
    upstream = upstream.to(device, torch.bfloat16)
    peak = PeakMemory(device)

    def one_pass(context):
        """Forward + backward of every projection; seconds and peak memory above the start."""
        for w in weights:
            w.grad = None
        if args.world > 1:
            dist.barrier()
        peak.start()
        start = time.perf_counter()
        with context if context is not None else contextlib.nullcontext():
            outputs = [engine(w, c, spec).weight for w, c in zip(weights, centroids)]
        torch.autograd.backward(outputs, [upstream] * len(outputs))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, peak.peak()

    def row_context():
        return TensorMarshal(resident=weights, **policy) if policy is not None else None

    # warm-up pass, which also does the accounting (hook-free rows are timed with no hooks at all)
    accounting_context = row_context() or SavedTensorMeter(resident=weights)
    _, first_peak = one_pass(accounting_context)
    peaks, times, baseline_times = [first_peak], [], []
    for run in range(args.runs):
        if args.paired:
            # the same process alternates plain and marshalled passes, so that load from other processes
            # hits both alike; the overhead is the median of the per-pair ratios
            order = ("plain", "row") if run % 2 == 0 else ("row", "plain")
            for which in order:
                seconds, peak_bytes = one_pass(None if which == "plain" else row_context())
                (baseline_times if which == "plain" else times).append(seconds)
                if which == "row":
                    peaks.append(peak_bytes)
        else:
            seconds, peak_bytes = one_pass(row_context())
            times.append(seconds)
            peaks.append(peak_bytes)
    if isinstance(accounting_context, SavedTensorMeter):
        accounting = {
            "on_device": accounting_context.saved_bytes,
            "offloaded": 0,
            "resident": accounting_context.resident_bytes,
            "counters": None,
        }
    else:
        same = accounting_context.policy.device.type == device.type
        counters = accounting_context.counters.as_dict()
        accounting = {
            "on_device": counters["bytes_on_device"] + (counters["bytes_offloaded"] if same else 0),
            "offloaded": counters["bytes_offloaded"],
            "resident": counters["bytes_resident"],
            "counters": counters,
            "sharding": accounting_context.sharding,
        }
    if args.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    result = {
        "rank": args.rank,
        "times": times,
        "baseline_times": baseline_times,
        "peak_bytes": max(peaks),
        "threads": torch.get_num_threads(),
        **accounting,
    }
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------- driver
def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def run_row(args, row: Row, projections: int) -> dict:
    threads = max(1, args.threads // row.world)
    port = free_port() if row.world > 1 else 0
    runs = row.runs if row.runs is not None else args.runs
    env = worker_env()
    policy = json.dumps(row.policy) if row.policy is not None else ""
    commands = [
        [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            row.engine,
            "--size",
            str(args.size),
            "--projections",
            str(projections),
            "--bits",
            str(args.bits),
            "--runs",
            str(runs),
            "--device",
            args.device,
            "--threads",
            str(threads),
            "--rank",
            str(rank),
            "--world",
            str(row.world),
            "--port",
            str(port),
            "--policy",
            policy,
        ]
        + (["--paired"] if row.paired else [])
        for rank in range(row.world)
    ]
    start = time.perf_counter()
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for command in commands
    ]
    outputs = [process.communicate() for process in processes]
    results = []
    for process, (stdout, stderr) in zip(processes, outputs):
        result = worker_result(process.returncode, stdout)
        if result is None:
            tail = " | ".join((stderr or stdout).strip().splitlines()[-4:])
            return {"status": "error", "error": tail}
        results.append(result)
    scale = args.projections / projections
    # per rank: the ranks keep the same amounts (up to one padding byte per tensor); report the largest
    result = {
        "status": "ok",
        "world": row.world,
        "threads_per_process": results[0]["threads"],
        "runs": runs,
        "projections_measured": projections,
        "scale": scale,
        "note": row.note,
        "reference": row.reference,
        "policy": row.policy,
        "engine": row.engine,
        "on_device_bytes": max(r["on_device"] for r in results) * scale,
        "offloaded_bytes": max(r["offloaded"] for r in results) * scale,
        "resident_bytes": max(r["resident"] for r in results) * scale,
        "peak_bytes": max(r["peak_bytes"] for r in results) * scale,
        "median_seconds": max(statistics.median(r["times"]) for r in results) * scale,
        "times": [[t * scale for t in r["times"]] for r in results],
        "counters_per_rank": [r["counters"] for r in results],
        "paired_overhead": (
            statistics.median(t / b for t, b in zip(results[0]["times"], results[0]["baseline_times"])) - 1
        )
        if row.paired
        else None,
        "wall_seconds": time.perf_counter() - start,
    }
    if row.world > 1:
        result["sharding_active"] = all(r.get("sharding") for r in results)
    return result


def fmt_bytes(value: float) -> str:
    if value >= 0.1 * GIB:
        return f"{value / GIB:.3f} GiB"
    if value >= 2**20:
        return f"{value / 2**20:.1f} MiB"
    if value >= 1024:
        return f"{value / 1024:.1f} KiB"
    return f"{value:.0f} B"


def fmt_ratio(value: float) -> str:
    return f"{value:,.0f}x" if value >= 100 else f"{value:.2f}x"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, row) for name, row in report["rows"].items() if row["status"] == "ok"]
    names = [name for name, _ in rows]
    nothing = float("nan")  # a log scale has no 0: draw no bar
    on_device = [row["on_device_bytes"] or nothing for _, row in rows]
    offloaded = [row["offloaded_bytes"] or nothing for _, row in rows]
    seconds = [row["median_seconds"] for _, row in rows]
    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    positions = range(len(names))
    width = 0.38
    target = report["offload_target"]
    same = report["offload_target_is_compute_device"]
    memory_axis.bar(
        [p - width / 2 for p in positions], on_device, width, label="kept on the compute device", color="#c0392b"
    )
    memory_axis.bar(
        [p + width / 2 for p in positions],
        offloaded,
        width,
        label=f"held on the offload target ({target}{' = compute device' if same else ''})",
        color="#2e86c1",
    )
    memory_axis.set_yscale("log")
    memory_axis.set_ylabel("bytes kept for backward (log)")
    memory_axis.set_xticks(list(positions))
    memory_axis.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    memory_axis.legend(fontsize=8)
    for position, value in zip(positions, on_device):
        if value == value:
            memory_axis.annotate(fmt_bytes(value), (position - width / 2, value), ha="center", va="bottom", fontsize=7)
    memory_axis.set_title("memory kept for backward (per rank)", fontsize=10)
    time_axis.bar(list(positions), seconds, color="#7f8c8d")
    time_axis.set_xticks(list(positions))
    time_axis.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    time_axis.set_ylabel("fwd+bwd median (s)")
    time_axis.set_title("time", fontsize=10)
    setting = report["setting"]
    figure.suptitle(
        f"{setting['layer']}, {setting['bits']} bits, device {report['device']} "
        f"({report['machine'].get('gpu', report['machine'].get('cpu', ''))})",
        fontsize=10,
    )
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=None, help="rows = columns of each projection (4096)")
    parser.add_argument("--projections", type=int, default=4, help="projections in the layer (q, k, v, o)")
    parser.add_argument(
        "--measure-projections",
        default="auto",
        help="projections actually run, scaled linearly to --projections ('auto': all on CUDA, 1 on CPU)",
    )
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--runs", type=int, default=None, help="timed fwd+bwd runs after one warm-up (3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads in all (the sharded rows split them between their processes)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: --size 512 --runs 1, outputs to a temp dir unless --json/--png say",
    )
    parser.add_argument("--json", default=None, help="default benchmarks/results/ablation.json")
    parser.add_argument("--png", default=None, help="default docs/ablation.png")
    parser.add_argument("--worker", choices=["dkm", "edkm"], help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="", help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 512 if args.quick else 4096
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    for name in ("size", "projections", "bits", "runs", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.worker:
        worker(args)
        return {}
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if args.measure_projections == "auto":
        measured = args.projections if device.type == "cuda" else 1
    else:
        measured = int(args.measure_projections)
        if not 1 <= measured <= args.projections:
            parser.error(f"--measure-projections must be from 1 to --projections ({args.projections}), got {measured}")
    output_dir = os.path.join(tempfile.gettempdir(), "optimum_edkm_ablation") if args.quick else None
    json_path = args.json or (
        os.path.join(output_dir, "ablation.json")
        if output_dir
        else os.path.join(ROOT, "benchmarks", "results", "ablation.json")
    )
    png_path = args.png or (
        os.path.join(output_dir, "ablation.png") if output_dir else os.path.join(ROOT, "docs", "ablation.png")
    )

    from optimum_edkm.marshaling import MarshalPolicy

    target = MarshalPolicy().device
    same = target.type == device.type
    info = machine(device)
    info["threads"] = args.threads
    print(f"machine: {json.dumps(info)}", flush=True)
    command = "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "command": command.strip(),
        "setting": {
            "layer": f"{args.projections} x ({args.size} x {args.size}) bf16 projections",
            "bits": args.bits,
            "iterations": 3,
            "temperature": 1e-4,
            "runs": args.runs,
            "what": "forward + backward of the clustering of every projection; memory = bytes kept "
            "for backward per rank (distinct storages), the weights themselves reported "
            "apart",
        },
        "machine": info,
        "device": str(device),
        "offload_target": str(target),
        "offload_target_is_compute_device": same,
        "rows": {},
    }
    for row in rows_for(device):
        print(
            f"{row.name}: {row.engine}, policy {row.policy}, {row.world} process(es), {measured} projection(s) ...",
            flush=True,
        )
        report["rows"][row.name] = run_row(args, row, measured)
        if report["rows"][row.name]["status"] != "ok":
            print(f"  error: {report['rows'][row.name]['error']}", flush=True)

    rows = report["rows"]
    dkm = rows.get("DKM", {})
    summary = {}
    if dkm.get("status") == "ok":
        for name, row in rows.items():
            if row["status"] != "ok":
                continue
            row["reduction_on_device"] = dkm["on_device_bytes"] / max(row["on_device_bytes"], 1)
            total = row["on_device_bytes"] + (0 if same else row["offloaded_bytes"])
            row["reduction_total"] = dkm["on_device_bytes"] / max(total, 1)
            row["time_vs_dkm"] = row["median_seconds"] / dkm["median_seconds"]
        together = rows.get("all together", {})
        marshaling = rows.get("+ marshaling", {})
        if together.get("status") == "ok":
            summary["together_reduction_on_device"] = together["reduction_on_device"]
            summary["together_target_met"] = together["reduction_on_device"] >= TARGET_TOGETHER
        if marshaling.get("status") == "ok":
            summary["marshaling_time_overhead"] = marshaling["paired_overhead"]
            summary["marshaling_overhead_target_met"] = marshaling["paired_overhead"] < TARGET_MARSHAL_OVERHEAD
        forced = rows.get("+ marshaling, copies forced", {})
        if forced.get("status") == "ok":
            summary["marshaling_time_overhead_with_copies"] = forced["paired_overhead"]
        naive = rows.get("offload without dedup", {})
        if naive.get("status") == "ok" and marshaling.get("status") == "ok":
            summary["dedup_factor"] = naive["offloaded_bytes"] / max(marshaling["offloaded_bytes"], 1)
    report["summary"] = summary
    report["paper_reduction_as_quoted_in_issue"] = PAPER_REDUCTION
    report["targets"] = {
        "together_reduction_at_least": TARGET_TOGETHER,
        "marshaling_time_overhead_below": TARGET_MARSHAL_OVERHEAD,
    }

    print()
    print(
        f"{report['setting']['layer']}, {args.bits} bits, fwd+bwd of the clustering, median of "
        f"{args.runs} runs after a warm-up; device {device} ({info.get('gpu', info.get('cpu'))}, "
        f"{args.threads} threads, torch {torch.__version__})"
    )
    if measured != args.projections:
        print(
            f"measured on {measured} projection(s) and scaled linearly x{args.projections / measured:g} "
            f"(bytes exactly, times approximately)"
        )
    if same:
        print(
            f"offload target = compute device ({device}): 'offloaded' bytes are held where they are (moved "
            f"only where a row forces copies); they count as kept on the compute device too"
        )
    print()
    print(
        "| row | kept on compute device | offloaded | weights (resident, apart) | peak memory | fwd+bwd "
        "| reduction vs DKM: device | device + offloaded | paper | time vs DKM | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        if row["status"] != "ok":
            print(f"| {name} | error: {row['error'][:150]} | | | | | | | | | |")
            continue
        paper = PAPER_REDUCTION.get(name)
        nan = float("nan")
        cells = [
            name,
            fmt_bytes(row["on_device_bytes"]),
            fmt_bytes(row["offloaded_bytes"]),
            fmt_bytes(row["resident_bytes"]),
            fmt_bytes(row["peak_bytes"]),
            f"{row['median_seconds']:.2f} s",
            fmt_ratio(row.get("reduction_on_device", nan)),
            fmt_ratio(row.get("reduction_total", nan)),
            fmt_ratio(paper) if paper else "",
            f"{row.get('time_vs_dkm', nan):.2f}x",
            row["note"],
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    if "together_reduction_on_device" in summary:
        met = "met" if summary["together_target_met"] else "NOT met"
        print(
            f"all together: {fmt_ratio(summary['together_reduction_on_device'])} less kept on the compute "
            f"device than DKM (target >= {TARGET_TOGETHER:.0f}x: {met})"
        )
    if "marshaling_time_overhead" in summary:
        met = "met" if summary["marshaling_overhead_target_met"] else "NOT met"
        line = (
            f"marshaling run-time overhead (median of paired plain/marshalled passes in one process): "
            f"{summary['marshaling_time_overhead']:+.1%} (target < {TARGET_MARSHAL_OVERHEAD:.0%}: {met})"
        )
        if "marshaling_time_overhead_with_copies" in summary:
            line += f"; with the copies forced: {summary['marshaling_time_overhead_with_copies']:+.1%}"
        print(line)
    if "dedup_factor" in summary:
        print(f"deduplication: naive offloading would copy {summary['dedup_factor']:.2f}x the bytes marshaling keeps")
    write_json(json_path, report)
    plot(report, png_path)
    print(f"wrote {os.path.relpath(png_path)}")
    return report


if __name__ == "__main__":
    main()
