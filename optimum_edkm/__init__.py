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
from .pipeline import CompressionData, CompressionReport, Recipe, compress
from .quantizer import EDKMHfQuantizer  # registers the quantizer with transformers
from .trainer import ClusteringSchedule, ClusteringScheduleCallback, EDKMTrainer, EDKMTrainingArguments
from .version import __version__


def _dispatch_lora_to_edkm_layers() -> None:
    """With peft installed, its own ``LoraConfig`` gives eDKM layers their LoRA layer (see :mod:`.peft`)."""
    import importlib.util
    import logging

    if importlib.util.find_spec("peft") is None:
        return
    try:
        from .peft import dispatch_edkm_layers
    except ImportError as error:  # a peft this version cannot use: optimum_edkm itself still works
        logging.getLogger(__name__).debug("peft's LoRA dispatch of eDKM layers not installed: %s", error)
        return
    dispatch_edkm_layers()


_dispatch_lora_to_edkm_layers()

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
    "CompressionData",
    "CompressionReport",
    "EDKMTrainingArguments",
    "Palette",
    "PalettizedConv1D",
    "PalettizedEmbedding",
    "PalettizedLinear",
    "PalettizedTiedLinear",
    "Recipe",
    "__version__",
    "checkpoint_bytes",
    "compress",
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
