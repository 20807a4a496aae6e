"""Helpers every benchmark script shares: peak memory of a process, the machine record (with the load
average, since other jobs distort timings), and atomic JSON output."""

from __future__ import annotations

import os
import platform
import re

import torch

from optimum_edkm import atomic

GIB = 2**30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_average() -> list:
    """The 1, 5 and 15 minute load averages (say them next to every timing)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


# ----------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory above the level at ``start()``: the CUDA allocator's peak, or the process's VmHWM."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as status:
            return int(re.search(field + r":\s+(\d+)", status.read()).group(1)) * 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as refs:  # resets VmHWM to the current RSS
                refs.write("5")
            self.base = self._status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return self._status("VmHWM") - self.base


def write_json(path: str, report: dict) -> None:
    """Write ``report`` to ``path`` atomically (never half a file)."""
    atomic.write_json(path, report)
    print(f"\nwrote {os.path.relpath(path)}")


def machine(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "os": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu"] = re.search(r"model name\s*:\s*(.*)", cpuinfo.read()).group(1).strip()
    except (OSError, AttributeError):
        info["cpu"] = platform.processor()
    info["cpu_count"] = os.cpu_count()
    info["load_average"] = load_average()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def finish_sweep_line(record: dict, started: float, load_start, tag: str, out: str) -> None:
    """Close one line of a validation sweep (``validation_sweep.py``): wall time, load average at
    start and end, tag and date; print it and append it to the JSONL file ``out`` (rewritten atomically, so an
    interrupted run leaves the file as it was)."""
    import json
    import time

    record.update(
        {
            "wall_seconds": round(time.time() - started, 1),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "tag": tag,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    line = json.dumps(record)
    print(line, flush=True)
    previous = ""
    if os.path.exists(out):
        with open(out, encoding="utf-8") as handle:
            previous = handle.read()
        if previous and not previous.endswith("\n"):
            previous += "\n"
    atomic.write_file(out, previous + line + "\n")


def cached_result(path: str, compute):
    """``compute()``'s JSON result, computed once and then read back from ``path`` (written atomically): the
    sweeps' float-model perplexities depend only on the texts and the token count."""
    import json

    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    result = compute()
    atomic.write_json(path, result)
    return result


def worker_env(release_memory: bool = True, **extra: str) -> dict:
    """The environment of a benchmark's worker process: this checkout importable and, with ``release_memory``,
    malloc serving big blocks straight from mmap, so freed memory leaves the RSS and VmHWM measures live memory
    only."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    if release_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    return env


def worker_result(returncode: int, stdout: str):
    """The JSON of the last ``RESULT {...}`` line a worker printed; ``None`` when it failed or printed none."""
    import json

    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if returncode != 0 or not lines:
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def validation_texts(tokenizer, eval_tokens: int):
    """The validation sweeps' two texts (the help topics' validation split, in domain; the news text, out of
    domain), as ``({role: TextData}, {role: first eval_tokens token ids})``."""
    from optimum_edkm.data import DEFAULT_TEXT, OOD_VALIDATION_TEXT, VALIDATION_SPLIT, load_text

    texts = {
        "in_domain": load_text(DEFAULT_TEXT, split=VALIDATION_SPLIT),
        "out_of_domain": load_text(OOD_VALIDATION_TEXT, split=VALIDATION_SPLIT),
    }
    return texts, {role: text.token_ids(tokenizer)[:eval_tokens] for role, text in texts.items()}


def validation_perplexities(model, eval_ids: dict) -> dict:
    """``{role: perplexity}`` of ``model`` on each validation text (512-token windows), rounded as the sweeps
    record them."""
    from optimum_edkm.evaluation import evaluate_perplexity

    return {
        role: round(evaluate_perplexity(model, ids, context_length=512, progress=False).perplexity, 4)
        for role, ids in eval_ids.items()
    }


def sweep_record(script: str, argv: list, args, texts: dict, eval_ids: dict) -> dict:
    """The first fields of a sweep line: the command, the settings, which validation texts and how many tokens."""
    settings = vars(args).copy()
    settings.pop("out", None)
    return {
        "command": f"python benchmarks/{script} " + " ".join(argv),
        "settings": settings,
        "validation_texts": {role: f"{text.name}/{text.split}" for role, text in texts.items()},
        "eval_tokens": {role: int(ids.numel()) for role, ids in eval_ids.items()},
    }
