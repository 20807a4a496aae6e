"""optimum-edkm: train-time weight clustering (eDKM palettization) for Hugging Face models.

Importing the package registers the ``"edkm"`` quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained(name, quantization_config=EDKMConfig(bits=3))`` and loading a saved
palettized model both work.

Layers, bottom up (docs/architecture.md): base (:mod:`.validation`, :mod:`.atomic`, :mod:`.storage`, ...), the
pure-torch core (:mod:`.clustering`, :mod:`.marshaling`, :mod:`.kernels`, :mod:`.losses`), the module classes
(:mod:`.nn`), the Hugging Face integration (:mod:`.config` / :mod:`.quantizer` / :mod:`.checkpoint` /
:mod:`.api` / :mod:`.trainer`), then inputs and outputs (:mod:`.data`, :mod:`.models`, :mod:`.baselines`,
:mod:`.peft`, :mod:`.export`), methods and measures (:mod:`.evaluation`, :mod:`.sensitivity`, :mod:`.ptq`, ...),
the fine-tuning recipe (:mod:`.finetune`) and the command line (:mod:`.commands`). No module of the package
imports this one.
"""

from .api import (
    checkpoint_bytes,
    model_card_section,
    palettes_of,
    palettize,
    prepare,
    push_to_hub,
    save_pretrained,
    size_report,
)
from .checkpoint import CheckpointError, verify_checksums
from .config import EDKMConfig
from .marshaling import saved_tensor_policy
from .nn import (
    EDKMConv1D,
    EDKMEmbedding,
    EDKMLinear,
    EDKMTiedLinear,
    Palette,
    PalettizedConv1D,
    PalettizedEmbedding,
    PalettizedLinear,
    PalettizedTiedLinear,
)
from .quantizer import EDKMHfQuantizer  # registers the quantizer with transformers
from .trainer import ClusteringSchedule, ClusteringScheduleCallback, EDKMTrainer, EDKMTrainingArguments
from .version import __version__

__all__ = [
    "CheckpointError",
    "ClusteringSchedule",
    "ClusteringScheduleCallback",
    "EDKMConfig",
    "EDKMConv1D",
    "EDKMEmbedding",
    "EDKMHfQuantizer",
    "EDKMLinear",
    "EDKMTiedLinear",
    "EDKMTrainer",
    "EDKMTrainingArguments",
    "Palette",
    "PalettizedConv1D",
    "PalettizedEmbedding",
    "PalettizedLinear",
    "PalettizedTiedLinear",
    "__version__",
    "checkpoint_bytes",
    "model_card_section",
    "palettes_of",
    "palettize",
    "prepare",
    "push_to_hub",
    "save_pretrained",
    "saved_tensor_policy",
    "size_report",
    "verify_checksums",
]
