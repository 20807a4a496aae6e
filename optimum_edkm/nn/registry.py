"""The one type table: which float module becomes which clustered and which palettized module.

``register_clustered_module(float_class)`` decorates a clustered class (which names its palettized class in
``palettized_class``). Every conversion in the package goes through :func:`clustered_class_for`; nothing else
checks module types. Every module the table produced describes its stored form (:func:`palettized_storage`).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

#: float class -> clustered class, in registration order
_CLUSTERED_FOR: dict = {}


def register_clustered_module(float_class: type):
    """Class decorator: ``float_class`` modules are clustered by the decorated class."""

    def register(clustered_class: type) -> type:
        if float_class in _CLUSTERED_FOR:
            raise ValueError(
                f"{float_class.__name__} is already registered (-> {_CLUSTERED_FOR[float_class].__name__})"
            )
        _CLUSTERED_FOR[float_class] = clustered_class
        clustered_class.float_class = float_class
        return clustered_class

    return register


def clustered_class_for(module: nn.Module) -> Optional[type]:
    """The clustered class for ``module`` (its own class or its nearest registered base class), or ``None`` for
    modules the package does not convert, including ones it already converted."""
    if getattr(module, "edkm_role", None) is not None:  # already clustered or palettized
        return None
    for cls in type(module).__mro__:
        if cls in _CLUSTERED_FOR:
            return _CLUSTERED_FOR[cls]
    return None


def palettized_storage(model: nn.Module) -> dict:
    """``{module name: WeightStorage}`` of every clustered or palettized module of ``model`` (each once; a tied
    output head reads its embedding's palette and is not listed): what the palettized form stores, read from
    the module itself. Feeds :func:`optimum_edkm.storage.model_size`."""
    return {
        name: module.storage()
        for name, module in model.named_modules()
        if getattr(module, "edkm_role", None) in ("clustered", "palettized")
    }
