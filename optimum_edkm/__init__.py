"""optimum-edkm: train-time weight clustering (eDKM palettization) for Hugging Face models.

Importing the package registers the ``"edkm"`` quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained(name, quantization_config=EDKMConfig(bits=3))`` and loading a saved
palettized model both work.
"""

__version__ = "0.1.0"

from .config import EDKMConfig  # noqa: E402
from .quantizer import EDKMHfQuantizer  # noqa: E402  (registers the quantizer)
from .api import (checkpoint_bytes, model_card_section, palettize, prepare, push_to_hub,  # noqa: E402
                  save_pretrained, size_report)
from .trainer import EDKMTrainer, EDKMTrainingArguments  # noqa: E402
from .modules import (EDKMConv1D, EDKMEmbedding, EDKMLinear, PalettizedEmbedding,  # noqa: E402
                      PalettizedLinear)

__all__ = [
    "EDKMConfig",
    "EDKMConv1D",
    "EDKMEmbedding",
    "EDKMHfQuantizer",
    "EDKMLinear",
    "EDKMTrainer",
    "EDKMTrainingArguments",
    "PalettizedEmbedding",
    "PalettizedLinear",
    "checkpoint_bytes",
    "model_card_section",
    "palettize",
    "prepare",
    "push_to_hub",
    "save_pretrained",
    "size_report",
]
