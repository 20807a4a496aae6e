"""On-device export of palettized models (optional extra: ``pip install "optimum-edkm[coreml]"``).

* :func:`to_coreml` writes an ``.mlpackage`` whose clustered weights are ``constexpr_lut_to_dense`` ops
  (n-bit indices + the model's own LUTs), a framework-neutral manifest and the palettized tensors beside it;
* :func:`verify_coreml` checks a saved package against the torch model from its files (works on Linux);
* :func:`predict_logits` runs a package with Core ML (macOS only).

Nothing here imports coremltools at import time, and the rest of optimum-edkm never imports this package.
CLI: ``python -m optimum_edkm.export SAVED_DIR OUT.mlpackage --seq-len 64 --target iOS18``.
"""

from .coreml import CoreMLExport, FixedLengthLogits, manifest_path_for, tensors_path_for, to_coreml
from .errors import CoreMLExportError, ExactnessError, VerificationError
from .targets import DeploymentTarget, resolve_target
from .verify import ModuleReport, VerificationReport, predict_logits, verify_coreml

__all__ = [
    "CoreMLExport",
    "CoreMLExportError",
    "DeploymentTarget",
    "ExactnessError",
    "FixedLengthLogits",
    "ModuleReport",
    "VerificationError",
    "VerificationReport",
    "manifest_path_for",
    "predict_logits",
    "resolve_target",
    "tensors_path_for",
    "to_coreml",
    "verify_coreml",
]
