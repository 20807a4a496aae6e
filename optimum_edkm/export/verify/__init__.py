"""Verify a saved Core ML package against the torch palettized model, from the files alone (works on Linux).

What it proves: the package is an ML program for the intended specification with the expected interface
(a fixed window, or the stateful generation step with its KV-cache states: :mod:`.interface`); every palettized
weight is one ``constexpr_lut_to_dense`` op with ``uint{bits}`` indices feeding its ``linear``/``gather`` (both,
for a tied embedding), and the stored indices, LUTs and scales, decoded here independently of coremltools, equal
the torch modules' bit for bit, and so do the dense weights (also cross-checked with coremltools' own decoder:
:mod:`.weights`); no dense copy is left and the stored sizes are n-bit sizes (:mod:`.floats`); a torch model
rebuilt from the package's weights gives the model's logits within fp16 tolerance (:mod:`.logits`); the
manifest matches (:mod:`.manifest`). What it cannot prove: that Core ML *executes* the program correctly (that
needs macOS: :mod:`optimum_edkm.export.predict`).

:func:`verify_coreml` (:mod:`.pipeline`) runs the checks in order.
"""

from .pipeline import verify_coreml
from .report import ModuleReport, VerificationReport

__all__ = ["ModuleReport", "VerificationReport", "verify_coreml"]
