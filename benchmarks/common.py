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
