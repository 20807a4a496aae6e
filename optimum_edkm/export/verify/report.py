"""What a verification found: the report it returns and the checks it collects on the way."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional

from ..mil import PackageFormatError

#: ``optimum_edkm.interface`` metadata: what the package computes
FIXED_WINDOW, GENERATE = "fixed_window", "generate"
#: what reading a damaged package or manifest raises
READ_ERRORS = (PackageFormatError, OSError, ValueError, KeyError, IndexError, struct.error)


@dataclass
class ModuleReport:
    """How one palettized module is stored in the package."""

    name: str
    kind: str  # "linear" or "embedding"
    bits: int
    groups: int
    per_channel_scale: bool
    weight_op: str = ""  # the op whose output the linear / gather consumes
    lut_op: str = ""
    scale_op: Optional[str] = None
    consumers: list = field(default_factory=list)
    indices_dtype: str = ""
    lut_shape: tuple = ()
    layout: str = ""
    index_bytes: int = 0
    lut_bytes: int = 0
    scale_bytes: int = 0
    equivalent_indices: int = 0  # indices that differ from ours but select an identical LUT value
    tied_to: tuple = ()  # modules reading the same stored weight (a palettized tied embedding)


@dataclass
class VerificationReport:
    path: str
    spec_version: int = 0
    target: str = ""
    interface: str = FIXED_WINDOW
    context_length: Optional[int] = None
    states: dict = field(default_factory=dict)  # name -> shape, for the generation package
    op_counts: dict = field(default_factory=dict)
    lut_ops: int = 0
    modules: list = field(default_factory=list)
    decoders_agree: Optional[bool] = None
    logits_max_abs_diff: Optional[float] = None
    logits_tolerance: Optional[float] = None
    weight_bin_bytes: int = 0
    blob_count: int = 0  # tensors stored in weight.bin (each costs a 64-byte record)
    index_bytes: int = 0
    nbit_index_bytes: int = 0
    palettized_payload_bytes: int = 0  # indices + LUTs + scales as stored in the package
    nbit_payload_bytes: int = 0  # the same in torch: packed indices + fp16 LUTs + fp16 scales
    float_bytes: int = 0  # model tensors stored densely (fp16)
    converter_bytes: int = 0  # constants the converter added (zero biases, rope tables, mask)
    nbit_reference_bytes: int = 0  # nbit payload + every other model tensor at fp16, ties once
    float_tensors_in_package: list = field(default_factory=list)
    float_tensors_not_stored: list = field(default_factory=list)
    tied_embedding: Optional[dict] = None
    manifest_checked: bool = False
    checks: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    #: the package or its manifest could not be read at all (its own CLI exit code: 3)
    malformed: bool = False

    def summary(self) -> str:
        interface = (
            f"stateful generation step, context {self.context_length}" if self.interface == GENERATE else "fixed window"
        )
        lines = [
            f"{self.path}: ML program spec {self.spec_version} ({self.target}, {interface}), {self.lut_ops} LUT "
            f"ops for {len(self.modules)} palettized modules",
            f"  weight.bin {self.weight_bin_bytes:,} B: palettized payload {self.palettized_payload_bytes:,} B "
            f"(n-bit {self.nbit_payload_bytes:,} B; indices {self.index_bytes:,} B), float tensors "
            f"{self.float_bytes:,} B, converter constants {self.converter_bytes:,} B; n-bit reference "
            f"{self.nbit_reference_bytes:,} B",
        ]
        if self.logits_max_abs_diff is not None:
            lines.append(
                f"  logits of the rebuilt torch model: max abs diff {self.logits_max_abs_diff:.3g} "
                f"(tolerance {self.logits_tolerance:.3g})"
            )
        lines += [f"  ok: {check}" for check in self.checks]
        lines += [f"  FAILED: {failure}" for failure in self.failures]
        return "\n".join(lines)


class Findings:
    """Passed and failed checks, in the order they were made; ``malformed`` once a file could not be read."""

    def __init__(self):
        self.checks, self.failures = [], []
        self.malformed = False

    def ok(self, message: str) -> None:
        self.checks.append(message)

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def unreadable(self, what: str, error: BaseException) -> None:
        self.malformed = True
        self.failures.append(f"malformed {what}: {type(error).__name__}: {error}")
