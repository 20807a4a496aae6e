"""Fair size accounting: effective bits per weight, counting every scale, zero point, look-up table and every
weight that was left uncompressed.

Each compressed weight tensor is described by a :class:`WeightStorage` (what a deployable format has to store
for it), and :func:`effective_bits` turns a model plus those descriptions into two numbers, by the one size rule
of :mod:`optimum_edkm.storage` with every other parameter at a deployment precision:

* bits per weight over the compressed tensors only (``linears``), e.g. 3-bit RTN/GPTQ/AWQ with groups of
  128 and an fp16 scale and fp16 zero point per group costs ``3 + 32/128 = 3.25`` bits; a 3-bit palette with one
  fp16 look-up table per tensor costs ``3 + 8*16/numel`` bits, and one table per group of output channels
  ``3 + groups*2**bits*16/numel``;
* bits per parameter of the whole model (``whole_model``), where every parameter outside those tensors
  (embeddings, norms, biases, the LM head unless compressed) costs ``unquantized_bits`` (16 by default: a
  half-precision deployment). Parameters shared between modules (tied embeddings) are counted once.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..storage import ModelSize, WeightStorage, model_size


def effective_bits(
    model: torch.nn.Module, storage: Mapping[str, WeightStorage], unquantized_bits: int = 16
) -> ModelSize:
    """Effective bits per weight of ``model`` whose modules named in ``storage`` (``named_modules`` names) have
    their ``weight`` stored as described; every other floating-point tensor costs ``unquantized_bits``."""
    return model_size(model, storage, unquantized_bits=unquantized_bits)
