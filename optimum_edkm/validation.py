"""Argument checks shared by every layer (pure Python: the clustering core imports it too)."""

from __future__ import annotations

import math


def is_int(value) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` in Python, never a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_bool(value) -> bool:
    return isinstance(value, bool)


def is_number(value) -> bool:
    """A real, finite number that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(value, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` itself if it is an integer in ``[minimum, maximum]``; otherwise a ``ValueError`` naming ``what``."""
    if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            bound = f"from {minimum} to {maximum}"
        elif minimum is not None:
            bound = f">= {minimum}"
        elif maximum is not None:
            bound = f"<= {maximum}"
        else:
            bound = ""
        raise ValueError(f"{what} must be an integer {bound}, got {value!r}".replace("  ", " "))
    return value


def check_bool(value, what: str) -> bool:
    if not is_bool(value):
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return value
