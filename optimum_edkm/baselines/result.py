"""What a baseline returns: what it stored for each compressed weight, its settings and its diagnostics."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class BaselineResult:
    """The outcome of RTN / GPTQ / AWQ on a model (compressed in place).

    Attributes:
        storage: per compressed module (``named_modules`` name), the
            :class:`~optimum_edkm.evaluation.WeightStorage` describing what a deployable format stores for its
            weight; feeds :func:`~optimum_edkm.evaluation.effective_bits`.
        settings: the method's hyper-parameters.
        details: method-specific diagnostics (per-module errors, chosen scales, ...).
    """

    storage: dict
    settings: dict = dataclasses.field(default_factory=dict)
    details: dict = dataclasses.field(default_factory=dict)
