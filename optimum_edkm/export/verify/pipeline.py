"""The verification pipeline: each step reads the package (and the model) and returns what the next step needs;
failed and passed checks are collected in one :class:`~.report.Findings`."""

from __future__ import annotations

import os

from ..common import manifest_path_for, palette_records
from ..errors import VerificationError, import_coremltools
from ..mil import MilPackage
from .floats import FloatTensors, Sizes, check_float_tensors, measure_sizes
from .interface import check_fixed_window_io, check_generation_io, check_metadata, check_state_updates
from .logits import compare_logits
from .manifest import check_manifest
from .report import GENERATE, READ_ERRORS, Findings, VerificationReport
from .weights import check_module, cross_check_decoders, match_lut_ops


def verify_coreml(
    path: str,
    model,
    *,
    minimum_deployment_target=None,
    manifest="auto",
    check_logits: bool = True,
    logits_rtol: float = 1e-2,
    cross_check: bool = True,
    raise_on_failure: bool = True,
) -> VerificationReport:
    """Check the package at ``path`` against the palettized torch ``model`` (see the module docstring).

    Args:
        minimum_deployment_target: expected target; default: the one recorded in the package's metadata.
        manifest: path of the manifest to check too; ``"auto"``: ``<stem>.manifest.json`` if it exists;
            ``None``: skip.
        check_logits: rebuild a torch model from the package's weights and compare its logits with ``model``'s
            (tolerance ``logits_rtol * max(1, max |logits|)``).
        cross_check: also decode the LUT weights with coremltools' own loader and compare with ours.
        raise_on_failure: raise :class:`VerificationError` listing every failed check (else only report it).
    """
    import_coremltools()
    report = VerificationReport(path=os.fspath(path))
    findings = Findings()
    try:
        package = MilPackage(report.path)
    except READ_ERRORS as error:
        findings.unreadable("package", error)
        return _finish(report, findings, raise_on_failure, error)
    report.op_counts = package.op_counts()
    records = palette_records(model)
    if not records:
        findings.fail(
            "the torch model has no palettized module to compare with: pass the model after "
            "optimum_edkm.palettize (or loaded from the saved palettized checkpoint)"
        )
        return _finish(report, findings, raise_on_failure)
    report.spec_version = package.spec_version
    interface = check_metadata(
        package, model, getattr(minimum_deployment_target, "name", minimum_deployment_target), findings
    )
    report.target, report.interface, report.context_length = interface.target, interface.kind, interface.context_length
    if interface.kind == GENERATE:
        interface = check_generation_io(package, model, interface, findings)
        check_state_updates(package, model, findings)
        report.states = interface.states
    else:
        interface = check_fixed_window_io(package, model, interface, findings)
    chains, report.lut_ops = match_lut_ops(package, records, findings)
    decoded = {}
    try:
        for name, chain in chains.items():
            entry, dense = check_module(package, records, name, chain, findings)
            report.modules.append(entry)
            if dense is not None:
                decoded[name] = dense
        floats = check_float_tensors(package, model, records, chains, findings)
        sizes = measure_sizes(package, model, records, report.modules, findings)
        if cross_check and decoded:
            report.decoders_agree = cross_check_decoders(package, chains, decoded, findings)
    except READ_ERRORS as error:
        findings.unreadable("package", error)
        return _finish(report, findings, raise_on_failure, error)
    _fill_sizes(report, sizes, floats)
    if not findings.failures and chains:
        widths = "/".join(f"uint{b}" for b in sorted({m.bits for m in report.modules}))
        findings.ok(
            f"indices ({widths}), LUTs, scales and dense weights of {len(report.modules)} modules equal the "
            f"torch model bit for bit ({sum(m.equivalent_indices for m in report.modules)} indices select an "
            f"identical duplicate LUT value)"
        )
    if check_logits and not findings.failures and interface.input_shape is not None:
        report.logits_max_abs_diff, report.logits_tolerance = compare_logits(
            model, records, decoded, floats, interface.input_shape, logits_rtol, findings
        )
    manifest_path = manifest_path_for(report.path) if manifest == "auto" else manifest
    if manifest_path is not None and (manifest != "auto" or os.path.exists(manifest_path)):
        try:
            report.manifest_checked = check_manifest(
                package, os.fspath(manifest_path), records, report.modules, findings
            )
        except READ_ERRORS as error:
            findings.unreadable(f"manifest {manifest_path}", error)
    return _finish(report, findings, raise_on_failure)


def _fill_sizes(report: VerificationReport, sizes: Sizes, floats: FloatTensors) -> None:
    report.weight_bin_bytes, report.blob_count = sizes.weight_bin_bytes, sizes.blob_count
    report.index_bytes, report.nbit_index_bytes = sizes.index_bytes, sizes.nbit_index_bytes
    report.palettized_payload_bytes = sizes.palettized_payload_bytes
    report.nbit_payload_bytes = sizes.nbit_payload_bytes
    report.nbit_reference_bytes = sizes.nbit_reference_bytes
    report.float_bytes, report.converter_bytes = floats.float_bytes, floats.converter_bytes
    report.float_tensors_in_package, report.float_tensors_not_stored = floats.in_package, floats.not_stored
    report.tied_embedding = floats.tied_embedding


def _finish(report: VerificationReport, findings: Findings, raise_on_failure: bool, cause=None) -> VerificationReport:
    report.checks, report.failures, report.malformed = findings.checks, findings.failures, findings.malformed
    if report.failures and raise_on_failure:
        raise VerificationError(report.path, report.failures, malformed=findings.malformed) from cause
    return report
