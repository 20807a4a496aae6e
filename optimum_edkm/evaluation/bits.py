"""Fair size accounting: effective bits per weight, counting every scale, zero point, look-up table and every
weight that was left uncompressed.

Each compressed weight tensor is described by a :class:`WeightStorage` (what a deployable format has to store
for it), and :func:`effective_bits` turns a model plus those descriptions into two numbers:

* bits per weight over the compressed tensors only (``"linears"``), e.g. 3-bit RTN/GPTQ/AWQ with groups of
  128 and an fp16 scale and fp16 zero point per group costs ``3 + 32/128 = 3.25`` bits; a 3-bit palette with one
  fp16 look-up table per tensor costs ``3 + 8*16/numel`` bits, and one table per group of output channels
  ``3 + groups*2**bits*16/numel``;
* bits per parameter of the whole model, where every parameter outside those tensors (embeddings, norms,
  biases, the LM head unless compressed) costs ``unquantized_bits`` (16 by default: a half-precision
  deployment). Parameters shared between modules (tied embeddings) are counted once.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch

from ..storage import WeightStorage
from ..validation import check_int


@dataclasses.dataclass(frozen=True)
class BitsReport:
    """Effective bits per weight; ``linears`` is ``None`` when nothing was compressed."""

    linears: Optional[float]
    whole_model: float
    compressed_weights: int
    model_parameters: int
    compressed_bits: int
    model_bits: int
    unquantized_bits: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def effective_bits(
    model: torch.nn.Module, storage: Mapping[str, WeightStorage], unquantized_bits: int = 16
) -> BitsReport:
    """Effective bits per weight of ``model`` whose modules named in ``storage`` (``named_modules`` names) have
    their ``weight`` stored as described; every other parameter costs ``unquantized_bits``."""
    check_int(unquantized_bits, "unquantized_bits", 1)
    compressed: dict[int, str] = {}
    compressed_bits = compressed_weights = 0
    for name, description in storage.items():
        if not isinstance(description, WeightStorage):
            raise TypeError(f"storage[{name!r}] must be a WeightStorage, got {type(description).__name__}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"storage names module {name!r}, which the model does not have") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"module {name!r} has no weight tensor to account for")
        # a palettized module stores its weight packed; it describes the dense shape it stands for
        shape = tuple(getattr(module, "dense_shape", weight.shape))
        if shape != tuple(description.shape):
            raise ValueError(
                f"storage for {name!r} describes shape {description.shape}, but its weight has shape {shape}"
            )
        if id(weight) in compressed:
            raise ValueError(f"modules {compressed[id(weight)]!r} and {name!r} share one weight; describe it once")
        compressed[id(weight)] = name
        compressed_bits += description.total_bits
        compressed_weights += description.numel
    # a compressed weight counts through its description: a palettized module holds it as a packed buffer, which
    # model.parameters() does not yield
    model_bits, parameters = compressed_bits, compressed_weights
    for parameter in model.parameters():  # yields a shared (tied) parameter once
        if id(parameter) not in compressed:
            parameters += parameter.numel()
            model_bits += parameter.numel() * unquantized_bits
    return BitsReport(
        linears=compressed_bits / compressed_weights if compressed_weights else None,
        whole_model=model_bits / parameters,
        compressed_weights=compressed_weights,
        model_parameters=parameters,
        compressed_bits=compressed_bits,
        model_bits=model_bits,
        unquantized_bits=unquantized_bits,
    )


def palettized_storage(model: torch.nn.Module) -> dict:
    """``{module name: WeightStorage}`` of every palettized module of ``model`` (after
    :func:`optimum_edkm.palettize`): its index width, LUT grouping, LUT dtype and per-channel scale, read from
    the module itself. Feeds :func:`effective_bits`."""
    from ..nn import is_palettized

    return {name: module.storage() for name, module in model.named_modules() if is_palettized(module)}
