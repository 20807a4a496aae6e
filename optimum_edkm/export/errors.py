"""Errors raised by the Core ML export and its verifier."""

from __future__ import annotations

COREML_INSTALL = 'pip install "optimum-edkm[coreml]"'


class CoreMLExportError(ValueError):
    """The model cannot be exported as asked (raised before any conversion work)."""


class ExactnessError(CoreMLExportError):
    """A weight handed to (or stored by) Core ML is not exactly the palettized weight: the converter would
    re-approximate it, or did."""


class VerificationError(AssertionError):
    """A saved package does not match the torch palettized model; ``failures`` lists every mismatch.
    ``malformed`` is True when the package or its manifest could not be read at all (a missing ``weight.bin``,
    a cut-off manifest): the CLI reports that with its own exit code."""

    def __init__(self, path: str, failures: list, malformed: bool = False):
        self.path = path
        self.failures = list(failures)
        self.malformed = malformed
        lines = "\n".join(f"  - {failure}" for failure in self.failures)
        super().__init__(f"{path}: {len(self.failures)} check(s) failed:\n{lines}")


def import_coremltools():
    """coremltools, or an ImportError that says how to install the optional extra."""
    try:
        import coremltools
    except ImportError as error:
        raise ImportError(
            f"Core ML export needs coremltools, which is an optional extra of optimum-edkm: {COREML_INSTALL} "
            f"(it pins coremltools==9.0 and numpy<2.4)"
        ) from error
    return coremltools
