"""Inference speed and memory: float vs palettized SmolLM2-135M (fused LUT kernel, pure-torch path, dense cache).

For every configuration, in a fresh process: load the model, then measure
* prefill throughput: forward passes over ``--prefill-batch`` x ``--prefill-len`` tokens (tokens/s, best of
  ``--prefill-runs`` after one warm-up);
* decode throughput: greedy ``generate`` of ``--new-tokens`` tokens at batch 1 from a short prompt, timed from
  the first generated token to the last (tokens/s);
* model footprint (bytes of distinct parameter/buffer storages), resident memory after loading, and peak resident
  memory during the measurements (process VmHWM; CUDA: allocator peak).

Palettized checkpoints are built once (float model -> ``optimum_edkm.prepare`` with k-means -> ``palettize`` ->
``save_pretrained``; no training, quality is irrelevant here) into ``--cache-dir`` and loaded with
``from_pretrained`` as a user would. The ``lmhead4`` configurations also palettize the tied embedding / lm_head
at 4 bits (``EDKMConfig(embedding_bits=4)``): one LUT and one set of packed indices serve both uses.
Configurations run interleaved, ``--repeats`` times; the table shows the median.

    python benchmarks/inference.py                      # all CPU configurations (~15-25 min on 2 busy cores)
    python benchmarks/inference.py --configs float,p3   # a subset
    python benchmarks/inference.py --kernel-sweep       # per-layer timings over rows of x and instruction sets

Writes ``benchmarks/results/inference.json`` (``--out``) and a plot (``--plot``, default docs/inference.png).
Timings on a shared machine are noisy: the load average is recorded next to every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Config:
    """One row of the table."""

    name: str
    bits: Optional[int] = None  # None: the float model
    group_size: Optional[int] = None  # None: one LUT per tensor
    scale: bool = True  # per-output-channel scale
    lm_head_bits: Optional[int] = None  # palettize the tied embedding / lm_head too
    kernels: bool = True  # False: OPTIMUM_EDKM_DISABLE_KERNELS=1 (pure-torch decode per call)
    dense_cache: bool = False  # PalettizedLinear.cache_dense_weight
    device: str = "cpu"
    new_tokens: Optional[int] = None  # overrides --new-tokens (the pure-torch path is ~10x slower)

    @property
    def checkpoint(self) -> Optional[str]:
        if self.bits is None:
            return None
        granularity = "tensor" if self.group_size is None else f"g{self.group_size}"
        head = f"-emb{self.lm_head_bits}" if self.lm_head_bits else ""
        return f"smollm2-{self.bits}bit-{granularity}-{'scale' if self.scale else 'noscale'}{head}"

    def describe(self) -> str:
        if self.bits is None:
            return "float32"
        parts = [
            f"{self.bits}-bit",
            "per-tensor LUT" if self.group_size is None else f"LUT per {self.group_size} rows",
            "scale" if self.scale else "no scale",
        ]
        if self.lm_head_bits:
            parts.append(f"tied emb/lm_head {self.lm_head_bits}-bit")
        if not self.kernels:
            parts.append("pure-torch decode")
        if self.dense_cache:
            parts.append("dense cache")
        return ", ".join(parts)


CONFIGS = {
    c.name: c
    for c in [
        Config("float"),
        Config("p2", bits=2),
        Config("p3", bits=3),
        Config("p4", bits=4),
        Config("p3-noscale", bits=3, scale=False),
        Config("p3-g16", bits=3, group_size=16),
        Config("p3-g16-noscale", bits=3, group_size=16, scale=False),
        Config("p3-lmhead4", bits=3, lm_head_bits=4),
        Config("p3-row", bits=3, group_size=1, scale=False),
        Config("p3-row-lmhead4", bits=3, group_size=1, scale=False, lm_head_bits=4),
        Config("p4-lmhead4", bits=4, lm_head_bits=4),
        Config("p3-densecache", bits=3, dense_cache=True),
        Config("p3-torch", bits=3, kernels=False, new_tokens=16),
    ]
}
DEFAULT_CONFIGS = [
    "float",
    "p2",
    "p3",
    "p4",
    "p3-noscale",
    "p3-g16",
    "p3-g16-noscale",
    "p3-lmhead4",
    "p3-densecache",
    "p3-torch",
]
CUDA_CONFIGS = ["float", "p3", "p3-densecache"]
CONFIGS.update(
    {f"{name}-cuda": dataclasses.replace(CONFIGS[name], name=f"{name}-cuda", device="cuda") for name in CUDA_CONFIGS}
)


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "n/a"


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(field + r":\s+(\d+)", status.read()).group(1)) * 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as refs:  # VmHWM := current RSS
        refs.write("5")


def footprint_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters, buffers and cached dense weights
    (``cache_dense_weight``), tied or shared tensors once."""
    caches = [m._dense_cache[1] for m in model.modules() if getattr(m, "_dense_cache", None) is not None]
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()) + caches:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


# ------------------------------------------------------------------------------------------ building
def build_checkpoint(config: Config, cache_dir: str) -> str:
    """Palettized checkpoint of the default model for ``config`` (built once, reused)."""
    path = os.path.join(cache_dir, config.checkpoint)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch

    import optimum_edkm
    from optimum_edkm import EDKMConfig
    from optimum_edkm.models import load_causal_lm

    torch.manual_seed(0)
    model, tokenizer, _ = load_causal_lm()
    granularity = (
        {} if config.group_size is None else dict(granularity="per_grouped_channel", group_size=config.group_size)
    )
    started = time.perf_counter()
    optimum_edkm.prepare(
        model,
        EDKMConfig(
            bits=config.bits, enable_per_channel_scale=config.scale, embedding_bits=config.lm_head_bits, **granularity
        ),
    )
    optimum_edkm.palettize(model)
    optimum_edkm.save_pretrained(model, path)
    tokenizer.save_pretrained(path)
    print(f"built {config.checkpoint} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


# ------------------------------------------------------------------------------------------ measuring
def load_model(config: Config, cache_dir: str):
    import torch

    from optimum_edkm.models import load_causal_lm

    if config.bits is None:
        model, tokenizer, _ = load_causal_lm(device=config.device)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import optimum_edkm  # noqa: F401  (registers the quantizer)

        path = os.path.join(cache_dir, config.checkpoint)
        model = AutoModelForCausalLM.from_pretrained(path, device_map=config.device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if config.dense_cache:
            from optimum_edkm.nn import PalettizedLinear

            for module in model.modules():
                if isinstance(module, PalettizedLinear):
                    module.cache_dense_weight = True
    model.eval()
    torch.manual_seed(0)
    return model, tokenizer


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_prefill(model, args, device) -> float:
    import torch

    vocab = model.config.vocab_size
    ids = torch.randint(
        100, vocab - 100, (args.prefill_batch, args.prefill_len), generator=torch.Generator().manual_seed(0)
    ).to(device)
    with torch.inference_mode():
        model(input_ids=ids[:1, :64])  # warm-up (kernel build, allocator, BLAS threads)
        best = float("inf")
        for _ in range(args.prefill_runs):
            synchronize(device)
            started = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            synchronize(device)
            best = min(best, time.perf_counter() - started)
    return ids.numel() / best


class _StepClock:
    """Stopping criterion that only records when each generated token arrives."""

    def __init__(self, device):
        self.times = []
        self.device = device

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def measure_decode(model, tokenizer, new_tokens, device) -> tuple:
    import torch
    from transformers import StoppingCriteriaList

    prompt = "The Python programming language is"
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    common = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id or 0)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, **common)  # warm-up
        clock = _StepClock(device)
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            stopping_criteria=StoppingCriteriaList([clock]),
            **common,
        )
    steps = clock.times
    tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
    # from the first generated token (prefill done) to the last
    return (len(steps) - 1) / (steps[-1] - steps[0]), tokens


def worker(config: Config, args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(config.device)
    started = time.perf_counter()
    model, tokenizer = load_model(config, args.cache_dir)
    load_s = time.perf_counter() - started
    result = {
        "config": config.name,
        "description": config.describe(),
        **dataclasses.asdict(config),
        "load_s": load_s,
        "footprint_bytes": footprint_bytes(model),
        "threads": torch.get_num_threads(),
        "loadavg_start": loadavg(),
    }
    if device.type == "cpu":
        result["rss_after_load_bytes"] = status_bytes("VmRSS")
        reset_peak_rss()
    else:
        torch.cuda.reset_peak_memory_stats(device)
    from optimum_edkm.kernels import kernel_isa

    result["kernel_isa"] = kernel_isa() if config.kernels else None
    result["prefill_tokens_per_s"] = measure_prefill(model, args, device)
    result["new_tokens"] = config.new_tokens or args.new_tokens
    result["decode_tokens_per_s"], result["generated"] = measure_decode(model, tokenizer, result["new_tokens"], device)
    if device.type == "cpu":
        result["peak_rss_bytes"] = status_bytes("VmHWM")
    else:
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    result["footprint_bytes"] = footprint_bytes(model)  # after the run: includes dense caches, if any
    result["loadavg_end"] = loadavg()
    return result


def run_in_fresh_process(config: Config, args) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not config.kernels:
        env["OPTIMUM_EDKM_DISABLE_KERNELS"] = "1"
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        config.name,
        "--cache-dir",
        args.cache_dir,
        "--prefill-batch",
        str(args.prefill_batch),
        "--prefill-len",
        str(args.prefill_len),
        "--prefill-runs",
        str(args.prefill_runs),
        "--new-tokens",
        str(args.new_tokens),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{config.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ kernel sweep
def kernel_sweep(args) -> dict:
    """Per-layer time of the fused kernel (each instruction set) and of decode + GEMM, against float F.linear,
    over rows of x; 30 copies of each weight are cycled so that they stream from memory as in a model."""
    import torch
    import torch.nn.functional as F

    from optimum_edkm.clustering import pack_indices
    from optimum_edkm.kernels import kernel_available, set_kernel_isa, supported_isas

    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernel_available():
        raise SystemExit("the LUT kernel is not available; nothing to sweep")
    op = torch.ops.optimum_edkm.lut_linear.default
    bits = args.sweep_bits

    def timed(calls, repeats=5):
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for call in calls:
                call()
            best = min(best, time.perf_counter() - started)
        return best / len(calls) * 1e6

    rows = []
    shapes = [(192, 576), (576, 576), (1536, 576), (576, 1536)]
    for m in [int(v) for v in args.sweep_rows.split(",")]:
        for out_f, in_f in shapes:
            weights = [torch.randn(out_f, in_f) for _ in range(30)]
            palettes = [
                (
                    pack_indices(torch.randint(0, 2**bits, (out_f, in_f), dtype=torch.uint8), bits),
                    torch.randn(1, 2**bits).half(),
                    torch.rand(out_f).half(),
                )
                for _ in range(30)
            ]
            x = torch.randn(m, in_f)
            row = {
                "rows": m,
                "out": out_f,
                "in": in_f,
                "bits": bits,
                "loadavg": loadavg(),
                "float_us": timed([lambda w=w: F.linear(x, w) for w in weights]),
            }
            for isa in supported_isas():
                set_kernel_isa(isa)
                row[f"fused_{isa}_us"] = timed(
                    [lambda p=p: op(x, p[0], p[1], p[2], None, in_f, out_f, bits, 1 << 30, 8 << 20) for p in palettes]
                )
                row[f"gemm_{isa}_us"] = timed(
                    [lambda p=p: op(x, p[0], p[1], p[2], None, in_f, out_f, bits, 1, 8 << 20) for p in palettes]
                )
            set_kernel_isa("best")
            rows.append(row)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return {"kernel_sweep": rows, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ report
def summarize(results: list) -> list:
    by_config = {}
    for result in results:
        by_config.setdefault(result["config"], []).append(result)
    float_rows = by_config.get("float", [])
    base = (
        {
            key: statistics.median(r[key] for r in float_rows)
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "footprint_bytes")
        }
        if float_rows
        else None
    )
    summary = []
    for name, runs in by_config.items():
        row = {
            "config": name,
            "description": runs[0]["description"],
            "device": runs[0]["device"],
            "runs": len(runs),
            "kernel_isa": runs[0].get("kernel_isa"),
        }
        for key in (
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "footprint_bytes",
            "rss_after_load_bytes",
            "peak_rss_bytes",
            "peak_cuda_bytes",
        ):
            if key in runs[0]:
                row[key] = statistics.median(r[key] for r in runs)
        if base:
            row["prefill_vs_float"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
            row["decode_vs_float"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            row["footprint_vs_float"] = row["footprint_bytes"] / base["footprint_bytes"]
        row["loadavg"] = [r["loadavg_start"] for r in runs]
        summary.append(row)
    return summary


def print_table(summary: list) -> None:
    print(
        "\n| config | what | decode tok/s | x float | prefill tok/s | x float | footprint MiB | x float | "
        "RSS after load MiB | peak RSS in run MiB | load avg at start |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in summary:

        def ratio(key):
            return f"{row[key]:.2f}" if key in row else "-"

        peak = row.get("peak_rss_bytes", row.get("peak_cuda_bytes", 0))
        print(
            f"| {row['config']} | {row['description']} | {row['decode_tokens_per_s']:.1f} | "
            f"{ratio('decode_vs_float')} | {row['prefill_tokens_per_s']:.0f} | {ratio('prefill_vs_float')} | "
            f"{row['footprint_bytes'] / MIB:.1f} | {ratio('footprint_vs_float')} | "
            f"{row.get('rss_after_load_bytes', 0) / MIB:.0f} | {peak / MIB:.0f} | {'; '.join(row['loadavg'])} |"
        )


def plot(summary: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["config"] for row in summary]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for axis, key, title in zip(
        axes,
        ("decode_tokens_per_s", "prefill_tokens_per_s", "footprint_bytes"),
        ("decode (batch 1), tokens/s", "prefill, tokens/s", "model footprint, MiB"),
    ):
        values = [row[key] / (MIB if key == "footprint_bytes" else 1) for row in summary]
        colors = ["tab:gray" if name == "float" else "tab:blue" for name in names]
        axis.bar(names, values, color=colors)
        axis.set_title(title)
        axis.tick_params(axis="x", rotation=60)
        for index, value in enumerate(values):
            axis.annotate(f"{value:.0f}", (index, value), ha="center", va="bottom", fontsize=7)
    fig.suptitle(
        f"SmolLM2-135M: float vs palettized (fused LUT kernel), {summary[0].get('device', 'cpu')}, median of runs"
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {os.path.relpath(path)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=None, help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=2, help="fresh-process runs per configuration")
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--prefill-runs", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "optimum_edkm", "bench_inference")
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "inference.json"))
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "inference.png"))
    parser.add_argument("--kernel-sweep", action="store_true")
    parser.add_argument("--sweep-rows", default="1,4,8,16,32,64,128")
    parser.add_argument("--sweep-bits", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(CONFIGS[args.worker], args)))
        return
    import torch
    from common import machine, write_json  # benchmarks/ helper (same folder)

    if args.kernel_sweep:
        report = kernel_sweep(args)
        report["machine"] = machine(torch.device("cpu"))
        write_json(args.out.replace(".json", "_kernel_sweep.json"), report)
        return
    names = args.configs.split(",") if args.configs else list(DEFAULT_CONFIGS)
    configs = [CONFIGS[name] for name in names]
    if torch.cuda.is_available() and not args.configs:
        configs += [CONFIGS[f"{name}-cuda"] for name in CUDA_CONFIGS]
    for config in configs:
        if config.bits is not None:
            build_checkpoint(config, args.cache_dir)
    results = []
    for repeat in range(args.repeats):
        for config in configs:
            result = run_in_fresh_process(config, args)
            results.append(result)
            print(
                f"[{repeat + 1}/{args.repeats}] {config.name}: decode {result['decode_tokens_per_s']:.1f} tok/s, "
                f"prefill {result['prefill_tokens_per_s']:.0f} tok/s, footprint "
                f"{result['footprint_bytes'] / MIB:.1f} MiB, load avg {result['loadavg_start']}",
                flush=True,
            )
    summary = summarize(results)
    print_table(summary)
    report = {
        "machine": machine(torch.device("cpu")),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker",)},
        "summary": summary,
        "runs": results,
    }
    write_json(args.out, report)
    if args.plot:
        plot(summary, args.plot)


if __name__ == "__main__":
    main()
