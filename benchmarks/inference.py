"""Inference speed and memory: float vs palettized SmolLM2-135M (fused LUT kernels), and llama.cpp on the same model.

For every configuration and thread count (``--threads``), in a fresh process: load the model, then measure
* prefill throughput: forward passes over ``--prefill-batch`` x ``--prefill-len`` tokens (tokens/s, best of
  ``--prefill-runs`` after one warm-up);
* decode throughput at each batch size of ``--decode-batches``: greedy ``generate`` of ``--new-tokens`` tokens
  from a short prompt (the same prompt in every row of the batch; no end-of-sequence stop), timed from the first
  generated token to the last (tokens/s, all rows counted);
* the checkpoint's file size, the model footprint (bytes of distinct parameter/buffer storages), resident memory
  after loading and the peak during the measurements (process VmHWM);
* once per configuration (``--check-tokens``, first run): whether greedy generation at batch 1 equals the pure-torch
  reference path (kernels off) token for token, on every instruction set the CPU runs.

The ``job`` rows are the main job's layout (``optimum_edkm.pipeline.DEFAULT_LAYOUT``: 3-bit indices, one LUT per
output channel, no scale) with the float parts in float16 (the default ``EDKMConfig.float_dtype``): ``job-emb4``
also palettizes the tied embedding / lm_head at 4 bits (``embedding_bits=4``), ``job-f32`` keeps the float parts in
float32 (what the main job saved before ``float_dtype``). Their checkpoints are built once (float model ->
``optimum_edkm.prepare`` with k-means -> ``palettize`` -> ``save_pretrained``; no training: quality is irrelevant
here) into ``--cache-dir`` and loaded with ``from_pretrained`` as a user would; ``--model-dir`` adds a row for a
saved model (e.g. the main job's output). ``llamacpp-*`` rows: ``benchmarks/llamacpp_rows.py`` (needs
``pip install llama-cpp-python``; skipped with a message without it). Configurations run interleaved,
``--repeats`` times; the table shows the median and the load average at the start of each run.

    python benchmarks/inference.py                          # the default rows, 1 and 2 threads
    python benchmarks/inference.py --configs float,job --threads 2
    python benchmarks/inference.py --kernel-sweep           # per-layer timings over rows of x and instruction sets

Writes ``benchmarks/results/inference.json`` (``--out``) and a plot (``--plot``, default docs/inference.png).
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MIB = 2**20
PROMPT = "The Python programming language is"


@dataclasses.dataclass(frozen=True)
class Config:
    """One row of the table."""

    name: str
    bits: Optional[int] = None  # None: the float model (or llama.cpp)
    group_size: Optional[int] = None  # None: one LUT per tensor
    scale: bool = True  # per-output-channel scale
    lm_head_bits: Optional[int] = None  # palettize the tied embedding / lm_head too
    float_dtype: str = "float16"  # EDKMConfig.float_dtype: the float parts of the palettized model
    kernels: bool = True  # False: OPTIMUM_EDKM_DISABLE_KERNELS=1 (pure-torch decode per call)
    dense_cache: bool = False  # PalettizedLinear.cache_dense_weight
    device: str = "cpu"
    new_tokens: Optional[int] = None  # overrides --new-tokens (the pure-torch path is ~10x slower)
    gguf: Optional[str] = None  # llama.cpp: the GGUF kind (llamacpp_rows.GGUF_TYPES)
    saved: bool = False  # the model in --model-dir

    @property
    def checkpoint(self) -> Optional[str]:
        if self.bits is None:
            return None
        granularity = "tensor" if self.group_size is None else f"g{self.group_size}"
        head = f"-emb{self.lm_head_bits}" if self.lm_head_bits else ""
        floats = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}[self.float_dtype]
        return f"smollm2-{self.bits}bit-{granularity}-{'scale' if self.scale else 'noscale'}{head}-{floats}"

    def describe(self) -> str:
        if self.saved:
            return "saved model (--model-dir)"
        if self.gguf:
            return f"llama.cpp {self.gguf} (re-quantized from Q4_1)"
        if self.bits is None:
            return "float32"
        granularity = {None: "per-tensor LUT", 1: "LUT per output row"}
        parts = [
            f"{self.bits}-bit",
            granularity.get(self.group_size, f"LUT per {self.group_size} rows"),
            "scale" if self.scale else "no scale",
        ]
        if self.lm_head_bits:
            parts.append(f"tied emb/lm_head {self.lm_head_bits}-bit")
        else:
            parts.append(f"float parts {self.float_dtype}")
        if not self.kernels:
            parts.append("pure-torch decode")
        if self.dense_cache:
            parts.append("dense cache")
        return ", ".join(parts)


#: the main job's layout (optimum_edkm.pipeline.DEFAULT_LAYOUT)
JOB = dict(bits=3, group_size=1, scale=False)
CONFIGS = {
    c.name: c
    for c in [
        Config("float"),
        Config("job", **JOB),
        Config("job-emb4", **JOB, lm_head_bits=4),
        Config("job-f32", **JOB, float_dtype="float32"),
        Config("job-bf16", **JOB, float_dtype="bfloat16"),
        Config("job-torch", **JOB, kernels=False, new_tokens=16),
        Config("llamacpp-q4_0", gguf="Q4_0"),
        Config("llamacpp-q3_k", gguf="Q3_K_M"),
        Config("saved", saved=True),
        Config("p2", bits=2),
        Config("p3", bits=3),
        Config("p4", bits=4),
        Config("p3-noscale", bits=3, scale=False),
        Config("p3-g16", bits=3, group_size=16),
        Config("p3-g16-noscale", bits=3, group_size=16, scale=False),
        Config("p3-lmhead4", bits=3, lm_head_bits=4),
        Config("p4-lmhead4", bits=4, lm_head_bits=4),
        Config("p3-densecache", bits=3, dense_cache=True),
        Config("p3-torch", bits=3, kernels=False, new_tokens=16),
    ]
}
DEFAULT_CONFIGS = ["float", "job", "job-emb4", "job-f32", "llamacpp-q4_0", "llamacpp-q3_k"]
CUDA_CONFIGS = ["float", "job", "p3-densecache"]
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
            bits=config.bits,
            enable_per_channel_scale=config.scale,
            embedding_bits=config.lm_head_bits,
            float_dtype=config.float_dtype,
            **granularity,
        ),
    )
    optimum_edkm.palettize(model)
    optimum_edkm.save_pretrained(model, path)
    tokenizer.save_pretrained(path)
    print(f"built {config.checkpoint} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def model_path(config: Config, args) -> Optional[str]:
    if config.saved:
        return args.model_dir
    if config.gguf:
        from llamacpp_rows import make_gguf

        return make_gguf(config.gguf, os.path.join(args.cache_dir, "gguf"))
    return None if config.bits is None else os.path.join(args.cache_dir, config.checkpoint)


# ------------------------------------------------------------------------------------------ measuring
def load_model(config: Config, path: Optional[str]):
    import torch

    from optimum_edkm.models import load_causal_lm

    if path is None:
        model, tokenizer, _ = load_causal_lm(device=config.device)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import optimum_edkm  # noqa: F401  (registers the quantizer)

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


def greedy(model, tokenizer, new_tokens: int, batch: int, device, clock=None):
    """Greedy ``generate`` of ``new_tokens`` tokens for ``batch`` copies of the prompt; the new token ids."""
    import torch
    from transformers import StoppingCriteriaList

    inputs = tokenizer([PROMPT] * batch, return_tensors="pt").to(device)
    criteria = StoppingCriteriaList([clock] if clock is not None else [])
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,  # exactly new_tokens tokens, without min_new_tokens' per-step masking of the vocabulary
            pad_token_id=tokenizer.eos_token_id or 0,
            stopping_criteria=criteria,
        )
    return out[:, inputs["input_ids"].shape[1] :]


def measure_decode(model, tokenizer, new_tokens, batch, device) -> tuple:
    greedy(model, tokenizer, 8, batch, device)  # warm-up
    clock = _StepClock(device)
    tokens = greedy(model, tokenizer, new_tokens, batch, device, clock)
    steps = clock.times
    # from the first generated token (prefill done) to the last
    return batch * (len(steps) - 1) / (steps[-1] - steps[0]), tokens[0].tolist()


def matches_reference(model, tokenizer, new_tokens: int, device) -> dict:
    """``{loop variant: greedy tokens equal to the pure-torch path's}`` at batch 1, for every instruction set (and,
    with AVX-512, its 16-lane loops for one row of x, ``avx512-wide``)."""
    import torch

    from optimum_edkm.kernels import lut as lut_module
    from optimum_edkm.kernels import set_kernel_isa, supported_isas

    kernel_available = lut_module.kernel_available
    lut_module.kernel_available = lambda: False
    try:
        reference = greedy(model, tokenizer, new_tokens, 1, device)
    finally:
        lut_module.kernel_available = kernel_available
    result = {}
    for variant in supported_isas() + ["avx512-wide"] * ("avx512" in supported_isas()):
        isa, _, wide = variant.partition("-")
        set_kernel_isa(isa)
        lut_module._state["extension"].set_narrow_one_row(not wide)
        result[variant] = bool(torch.equal(greedy(model, tokenizer, new_tokens, 1, device), reference))
    set_kernel_isa("best")
    lut_module._state["extension"].set_narrow_one_row(True)
    return result


def file_bytes(config: Config, path: Optional[str], model=None) -> int:
    if path is None:  # the float model: its float32 tensors (what a float checkpoint holds)
        return footprint_bytes(model)
    if config.gguf:
        return os.path.getsize(path)
    from optimum_edkm import checkpoint_bytes

    return checkpoint_bytes(path)["file_bytes"]


def worker(config: Config, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    path = model_path(config, args)
    result = {
        "config": config.name,
        "description": config.describe(),
        **dataclasses.asdict(config),
        "threads": args.threads,
        "loadavg_start": loadavg(),
    }
    if config.gguf:
        from llamacpp_rows import measure

        started = time.perf_counter()
        result.update(
            measure(
                path, args.threads, PROMPT, args.new_tokens, args.prefill_len, args.prefill_batch, args.prefill_runs
            )
        )
        result["load_s"] = time.perf_counter() - started
        result["file_bytes"] = file_bytes(config, path)
        result["rss_after_load_bytes"] = result["peak_rss_bytes"] = status_bytes("VmHWM")
        result["decode"] = {"1": result.pop("decode_tokens_per_s")}
        result["loadavg_end"] = loadavg()
        return result
    device = torch.device(config.device)
    started = time.perf_counter()
    model, tokenizer = load_model(config, path)
    result["load_s"] = time.perf_counter() - started
    result["file_bytes"] = file_bytes(config, path, model)
    result["footprint_bytes"] = footprint_bytes(model)
    if device.type == "cpu":
        result["rss_after_load_bytes"] = status_bytes("VmRSS")
        reset_peak_rss()
    else:
        torch.cuda.reset_peak_memory_stats(device)
    from optimum_edkm.kernels import kernel_isa

    result["kernel_isa"] = kernel_isa() if config.kernels else None
    result["prefill_tokens_per_s"] = measure_prefill(model, args, device)
    result["new_tokens"] = config.new_tokens or args.new_tokens
    result["decode"] = {}
    for batch in args.decode_batches:
        result["decode"][str(batch)], tokens = measure_decode(model, tokenizer, result["new_tokens"], batch, device)
        result.setdefault("generated", tokens)
    if device.type == "cpu":
        result["peak_rss_bytes"] = status_bytes("VmHWM")
    else:
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    palettized = config.bits is not None or config.saved
    if args.check_tokens and palettized and config.kernels and device.type == "cpu":
        result["matches_reference"] = matches_reference(model, tokenizer, args.check_tokens, device)
    result["footprint_bytes"] = footprint_bytes(model)  # after the run: includes dense caches, if any
    result["loadavg_end"] = loadavg()
    return result


def run_in_fresh_process(config: Config, args, threads: int, check: bool) -> dict:
    from common import worker_env, worker_result

    env = worker_env(release_memory=False, **({} if config.kernels else {"OPTIMUM_EDKM_DISABLE_KERNELS": "1"}))
    command = [sys.executable, os.path.abspath(__file__), "--worker", config.name, "--threads", str(threads)]
    for option in ("cache_dir", "prefill_batch", "prefill_len", "prefill_runs", "new_tokens", "model_dir"):
        value = getattr(args, option)
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    command += ["--decode-batches", ",".join(map(str, args.decode_batches))]
    command += ["--check-tokens", str(args.check_tokens if check else 0)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    result = worker_result(done.returncode, done.stdout)
    if result is None:
        raise RuntimeError(f"{config.name} failed:\n{done.stderr[-3000:]}")
    return result


# ------------------------------------------------------------------------------------------ kernel sweep
def kernel_sweep(args) -> dict:
    """Per-layer time of the fused loops (each instruction set, and AVX-512's 16-lane loops for one row) and of
    decode + GEMM, for ``--sweep-bits`` LUTs (one per output row, the main job's layout) and 16-bit weights, against
    float ``F.linear``, over rows of x; 30 copies of each weight are cycled so that they stream from memory as in a
    model. One thread: CPU time of the thread (steadier than wall time on a shared machine); more: wall time."""
    import torch
    import torch.nn.functional as F

    from optimum_edkm.clustering import pack_indices
    from optimum_edkm.kernels import kernel_available, set_kernel_isa, supported_isas
    from optimum_edkm.kernels import lut as lut_module

    torch.set_num_threads(args.threads)
    if not kernel_available():
        raise SystemExit("the LUT kernel is not available; nothing to sweep")
    extension = lut_module._state["extension"]
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    bits = args.sweep_bits
    variants = supported_isas() + ["avx512-wide"] * ("avx512" in supported_isas())

    def timed(calls, repeats=5):
        best = float("inf")
        for _ in range(repeats):
            started = clock()
            for call in calls:
                call()
            best = min(best, clock() - started)
        return best / len(calls) * 1e6

    rows = []
    shapes = [(192, 576), (576, 576), (1536, 576), (576, 1536)]
    for m in [int(v) for v in args.sweep_rows.split(",")]:
        for out_f, in_f in shapes:
            generator = torch.Generator().manual_seed(0)
            weights = [torch.randn(out_f, in_f, generator=generator) for _ in range(30)]
            halves = [w.half() for w in weights]
            palettes = [
                (
                    pack_indices(torch.randint(0, 2**bits, (out_f, in_f), dtype=torch.uint8), bits),
                    torch.randn(out_f, 2**bits).half(),
                )
                for _ in range(30)
            ]
            x = torch.randn(m, in_f)
            row = {"rows": m, "out": out_f, "in": in_f, "bits": bits, "loadavg": loadavg()}
            row["float_us"] = timed([lambda w=w: F.linear(x, w) for w in weights])
            for variant in variants:
                isa, _, wide = variant.partition("-")
                set_kernel_isa(isa)
                extension.set_narrow_one_row(not wide)
                for path, gemm_min_rows in (("fused", 1 << 30), ("gemm", 1)):
                    row[f"{path}_lut_{variant}_us"] = timed(
                        [
                            lambda p=p: extension.lut_linear(
                                x, *p, None, None, in_f, out_f, bits, gemm_min_rows, 8 << 20
                            )
                            for p in palettes
                        ]
                    )
                    row[f"{path}_16bit_{variant}_us"] = timed(
                        [lambda h=h: extension.linear16(x, h, None, gemm_min_rows, 8 << 20) for h in halves]
                    )
            set_kernel_isa("best")
            extension.set_narrow_one_row(True)
            rows.append(row)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return {"kernel_sweep": rows, "threads": torch.get_num_threads(), "clock": clock.__name__}


# ------------------------------------------------------------------------------------------ report
def summarize(results: list) -> list:
    """One row per (configuration, threads): medians over the runs, ratios to the float row with the same
    threads."""
    by_row = {}
    for result in results:
        by_row.setdefault((result["config"], result["threads"]), []).append(result)

    def median(runs, get):
        values = [get(r) for r in runs if get(r) is not None]
        return statistics.median(values) if values else None

    summary = []
    for (name, threads), runs in by_row.items():
        row = {
            "config": name,
            "threads": threads,
            "description": runs[0]["description"],
            "device": runs[0]["device"],
            "runs": len(runs),
            "kernel_isa": runs[0].get("kernel_isa"),
            "decode_tokens_per_s": {
                batch: median(runs, lambda r, b=batch: r["decode"].get(b)) for batch in runs[0]["decode"]
            },
        }
        for key in ("prefill_tokens_per_s", "file_bytes", "footprint_bytes", "rss_after_load_bytes", "peak_rss_bytes"):
            row[key] = median(runs, lambda r, k=key: r.get(k))
        checks = [r["matches_reference"] for r in runs if "matches_reference" in r]
        if checks:
            row["matches_reference"] = checks[0]
        row["loadavg"] = [r["loadavg_start"] for r in runs]
        summary.append(row)
    floats = {row["threads"]: row for row in summary if row["config"] == "float"}
    for row in summary:
        base = floats.get(row["threads"])
        if base is None:
            continue
        row["decode_vs_float"] = {
            batch: value / base["decode_tokens_per_s"][batch]
            for batch, value in row["decode_tokens_per_s"].items()
            if value and base["decode_tokens_per_s"].get(batch)
        }
        row["prefill_vs_float"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        row["file_vs_float"] = row["file_bytes"] / base["file_bytes"]
    return summary


def print_table(summary: list, batches: list) -> None:
    decode_heads = "".join(f" decode b{b} tok/s | x float |" for b in batches)
    print(
        f"\n| config | what | threads |{decode_heads} prefill tok/s | x float | file MiB | x float | "
        "RSS after load MiB | peak RSS MiB | = reference path | load avg at start |"
    )
    print("|---" * (12 + 2 * len(batches)) + "|")
    for row in summary:
        ratios = row.get("decode_vs_float", {})
        decode = "".join(
            f" {row['decode_tokens_per_s'][str(b)]:.1f} | {ratios[str(b)]:.2f} |"
            if row["decode_tokens_per_s"].get(str(b))
            else " n/a | - |"
            for b in batches
        )
        prefill_ratio = f"{row['prefill_vs_float']:.2f}" if "prefill_vs_float" in row else "-"
        file_ratio = f"{row['file_vs_float']:.2f}" if "file_vs_float" in row else "-"
        check = row.get("matches_reference")
        check = "-" if check is None else ", ".join(f"{isa} {'yes' if ok else 'NO'}" for isa, ok in check.items())
        print(
            f"| {row['config']} | {row['description']} | {row['threads']} |{decode} "
            f"{row['prefill_tokens_per_s']:.0f} | {prefill_ratio} | {row['file_bytes'] / MIB:.1f} | {file_ratio} | "
            f"{(row['rss_after_load_bytes'] or 0) / MIB:.0f} | {(row['peak_rss_bytes'] or 0) / MIB:.0f} | {check} | "
            f"{'; '.join(row['loadavg'])} |"
        )


def plot(summary: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in summary if row["threads"] == max(r["threads"] for r in summary)]
    names = [row["config"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (
        (lambda row: row["decode_tokens_per_s"].get("1"), "decode (batch 1), tokens/s"),
        (lambda row: row["prefill_tokens_per_s"], "prefill, tokens/s"),
        (lambda row: row["file_bytes"] / MIB, "file size, MiB"),
    )
    for axis, (get, title) in zip(axes, panels):
        values = [get(row) or 0 for row in rows]
        colors = [{"float": "tab:gray", "llamacpp": "tab:orange"}.get(n.split("-")[0], "tab:blue") for n in names]
        axis.bar(names, values, color=colors)
        axis.set_title(title)
        axis.tick_params(axis="x", rotation=60)
        for index, value in enumerate(values):
            axis.annotate(f"{value:.0f}", (index, value), ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"SmolLM2-135M on CPU, {rows[0]['threads']} threads: float, palettized (optimum-edkm), llama.cpp")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {os.path.relpath(path)}")


def _ints(text: str) -> list:
    return [int(value) for value in text.split(",") if value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=None, help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=2, help="fresh-process runs per configuration")
    parser.add_argument("--threads", default="1,2", help="torch threads of the workers, comma-separated")
    parser.add_argument("--decode-batches", default="1,8", help="decode batch sizes, comma-separated")
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--prefill-runs", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--check-tokens", type=int, default=64, help="greedy tokens compared with the pure-torch path (0: skip)"
    )
    parser.add_argument("--model-dir", default=None, help="a saved palettized model to add as the 'saved' row")
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
    args.decode_batches = _ints(args.decode_batches)

    if args.worker:
        args.threads = int(args.threads)
        print("RESULT " + json.dumps(worker(CONFIGS[args.worker], args)))
        return
    import torch
    from common import machine, write_json  # benchmarks/ helper (same folder)

    if args.kernel_sweep:
        args.threads = _ints(args.threads)[0]
        report = kernel_sweep(args)
        report["machine"] = machine(torch.device("cpu"))
        write_json(args.out.replace(".json", "_kernel_sweep.json"), report)
        return
    names = args.configs.split(",") if args.configs else list(DEFAULT_CONFIGS)
    if args.model_dir and "saved" not in names:
        names.append("saved")
    configs = [CONFIGS[name] for name in names]
    if torch.cuda.is_available() and not args.configs:
        configs += [CONFIGS[f"{name}-cuda"] for name in CUDA_CONFIGS]
    import llamacpp_rows

    if any(config.gguf for config in configs) and not llamacpp_rows.available():
        print("llama-cpp-python is not installed (pip install llama-cpp-python): llama.cpp rows skipped")
        configs = [config for config in configs if not config.gguf]
    if any(config.saved for config in configs) and not args.model_dir:
        raise SystemExit("the 'saved' row needs --model-dir (a folder written by optimum_edkm.save_pretrained)")
    for config in configs:
        if config.bits is not None:
            build_checkpoint(config, args.cache_dir)
        model_path(config, args)  # llama.cpp files are made once, before any timing
    results = []
    threads = _ints(args.threads)
    for repeat in range(args.repeats):
        for config in configs:
            for count in threads:
                result = run_in_fresh_process(config, args, count, check=repeat == 0 and count == threads[0])
                results.append(result)
                decode = ", ".join(f"b{b} {v:.1f}" for b, v in result["decode"].items())
                print(
                    f"[{repeat + 1}/{args.repeats}] {config.name} x{count}: decode {decode} tok/s, prefill "
                    f"{result['prefill_tokens_per_s']:.0f} tok/s, file {result['file_bytes'] / MIB:.1f} MiB, "
                    f"reference {result.get('matches_reference', '-')}, load avg {result['loadavg_start']}",
                    flush=True,
                )
    summary = summarize(results)
    print_table(summary, args.decode_batches)
    report = {
        "machine": machine(torch.device("cpu")),
        "command": "python benchmarks/inference.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker",)},
        "summary": summary,
        "runs": results,
    }
    write_json(args.out, report)
    if args.plot:
        plot(summary, args.plot)


if __name__ == "__main__":
    main()
