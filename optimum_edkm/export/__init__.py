"""On-device export of palettized models (optional extra: ``pip install "optimum-edkm[coreml]"``).

* :func:`to_coreml` writes an ``.mlpackage`` scoring a fixed window of tokens, :func:`to_coreml_generate` a
  stateful generation step (KV cache as Core ML states); in both, the clustered weights are
  ``constexpr_lut_to_dense`` ops (n-bit indices + the model's own LUTs), with a framework-neutral manifest and
  the palettized tensors beside the package;
* :func:`verify_coreml` checks a saved package against the torch model from its files (works on Linux);
* :func:`predict_logits` and :func:`generate_with_package` run a package with Core ML (macOS only).

Nothing here imports coremltools at import time, and the rest of optimum-edkm never imports this package.
CLI: ``optimum-edkm-coreml SAVED_DIR OUT.mlpackage [--generate --context-length 512]``.
"""

from .common import manifest_path_for, tensors_path_for
from .coreml import CoreMLExport, FixedLengthLogits, to_coreml, to_coreml_generate
from .errors import CoreMLExportError, ExactnessError, VerificationError
from .predict import generate_with_package, predict_logits
from .stateful import StatefulCausalLM, causal_mask, greedy_generate
from .targets import DeploymentTarget, resolve_target
from .verify import ModuleReport, VerificationReport, verify_coreml

__all__ = [
    "CoreMLExport",
    "CoreMLExportError",
    "DeploymentTarget",
    "ExactnessError",
    "FixedLengthLogits",
    "ModuleReport",
    "StatefulCausalLM",
    "VerificationError",
    "VerificationReport",
    "causal_mask",
    "generate_with_package",
    "greedy_generate",
    "manifest_path_for",
    "predict_logits",
    "resolve_target",
    "tensors_path_for",
    "to_coreml",
    "to_coreml_generate",
    "verify_coreml",
]
