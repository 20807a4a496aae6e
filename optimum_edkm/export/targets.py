"""Core ML deployment targets and what each one can store (no coremltools needed, so that an impossible
request fails before any work)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CoreMLExportError

#: ML program specification version of each deployment target (coremltools' ``ct.target`` values)
SPEC_VERSIONS = {
    **{name: 7 for name in ("iOS16", "macOS13", "tvOS16", "watchOS9")},
    **{name: 8 for name in ("iOS17", "macOS14", "tvOS17", "watchOS10")},
    **{name: 9 for name in ("iOS18", "macOS15", "tvOS18", "watchOS11")},
    **{name: 10 for name in ("iOS26", "macOS26", "tvOS26", "watchOS26")},
}
#: the first specification (iOS18 / macOS15) with grouped LUTs, 3-bit indices and per-channel scales
GROUPED_LUT_SPEC = 9
#: the first specification (iOS18 / macOS15) with states (the generation package's KV cache)
STATE_SPEC = 9
#: index widths of the iOS16/iOS17 ``constexpr_lut_to_dense`` op (a LUT of 2, 4, 16, 64 or 256 entries)
PRE_IOS18_BITS = (1, 2, 4, 6, 8)


@dataclass(frozen=True)
class DeploymentTarget:
    name: str
    spec_version: int

    @property
    def supports_grouped_luts(self) -> bool:
        return self.spec_version >= GROUPED_LUT_SPEC


def resolve_target(target) -> DeploymentTarget:
    """``"iOS18"`` (any case) or a ``coremltools.target`` member -> :class:`DeploymentTarget`."""
    name = getattr(target, "name", target)
    if isinstance(name, str):
        by_lower = {known.lower(): known for known in SPEC_VERSIONS}
        known = by_lower.get(name.lower())
        if known is not None:
            return DeploymentTarget(known, SPEC_VERSIONS[known])
    raise CoreMLExportError(
        f"minimum_deployment_target={target!r} cannot hold palettized weights: LUT ops exist from iOS16 / "
        f"macOS13 on. Use one of {', '.join(SPEC_VERSIONS)} (iOS18 is the default: it is the first with "
        f"3-bit indices, grouped LUTs and per-channel scales)"
    )


def unsupported_modules(records: dict, target: DeploymentTarget) -> dict:
    """``{module name: reason}`` for the palettized weights (``{name: PaletteRecord}``) that ``target`` cannot
    store exactly."""
    if target.supports_grouped_luts:
        return {}
    problems = {}
    for name, record in records.items():
        palette, reasons = record.palette, []
        if palette.bits not in PRE_IOS18_BITS:
            reasons.append(f"{palette.bits}-bit indices (before iOS18 only {PRE_IOS18_BITS} bits)")
        if palette.groups > 1:
            reasons.append(f"{palette.groups} grouped LUTs (before iOS18 one LUT per tensor)")
        if palette.scale is not None:
            reasons.append("a per-channel scale (iOS18+)")
        if reasons:
            problems[name] = ", ".join(reasons)
    return problems


def check_target(records: dict, target: DeploymentTarget) -> None:
    """Raise :class:`CoreMLExportError` naming the modules ``target`` cannot store, and the fix."""
    problems = unsupported_modules(records, target)
    if not problems:
        return
    listed = "; ".join(f"'{name}': {reason}" for name, reason in list(problems.items())[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise CoreMLExportError(
        f"minimum_deployment_target={target.name} cannot store {len(problems)} palettized module(s) exactly: "
        f"{listed}{more}. {target.name} (ML program spec {target.spec_version}) only has per-tensor LUTs with "
        f"{'/'.join(map(str, PRE_IOS18_BITS))}-bit indices and no per-channel scale. Export with "
        f"minimum_deployment_target='iOS18' (or macOS15), or palettize with "
        f"EDKMConfig(bits in {PRE_IOS18_BITS}, granularity='per_tensor', enable_per_channel_scale=False)"
    )
