"""The manifest beside the package: its format, modules, tensor sha256 and op names match the model and the
package."""

from __future__ import annotations

import json
import os

from ..manifest import FORMAT, FORMAT_VERSION, record_tensors, sha256_file
from ..mil import MilPackage
from .report import Findings


def check_manifest(package: MilPackage, manifest_path: str, records: dict, modules: list, findings: Findings) -> bool:
    """The manifest's modules, tensor sha256 and op names must match the model and the package."""
    with open(manifest_path) as handle:
        document = json.load(handle)
    if document.get("format") != FORMAT or document.get("format_version") != FORMAT_VERSION:
        findings.fail(
            f"{manifest_path}: format {document.get('format')!r} v{document.get('format_version')}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION}"
        )
        return False
    before = len(findings.failures)
    entries = {entry["name"]: entry for entry in document.get("modules", [])}
    if set(entries) != set(records):
        findings.fail(f"manifest lists {sorted(set(entries) ^ set(records))} differently from the model")
    ops = {m.name: m for m in modules}
    for name, record in records.items():
        entry = entries.get(name)
        if entry is None:
            continue
        if entry.get("bits") != record.palette.bits or entry.get("lut_shape") != list(record.palette.lut.shape):
            findings.fail(f"manifest: '{name}' bits/lut_shape {entry.get('bits')}/{entry.get('lut_shape')}")
        for role, description in record_tensors(record).items():
            if entry.get("tensors", {}).get(role, {}).get("sha256") != description["sha256"]:
                findings.fail(f"manifest: sha256 of '{description['name']}' does not match the model")
        coreml = entry.get("coreml", {})
        if name in ops and coreml.get("lut_op") != ops[name].lut_op:
            findings.fail(f"manifest: '{name}' LUT op {coreml.get('lut_op')!r}, the package has {ops[name].lut_op!r}")
    for relative, description in document.get("coreml", {}).get("weight_files", {}).items():
        file_path = os.path.join(package.model_dir, relative)
        if not os.path.isfile(file_path) or sha256_file(file_path) != description.get("sha256"):
            findings.fail(f"manifest: sha256 of {relative} does not match the package")
    if len(findings.failures) == before:
        findings.ok(f"manifest {os.path.basename(manifest_path)}: modules, tensor sha256 and op names match")
    return True
