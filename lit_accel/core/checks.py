"""Argument checks shared by lit_accel's engines and callbacks: one message shape for a bad value.

A bad argument raises ``ValueError`` naming the argument, its value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

__all__ = ["check_int", "check_name", "fmt", "is_int", "is_number", "require"]


def is_int(value: object) -> TypeGuard[int]:
    """An int, not a bool (``True`` is an int to Python, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, name: str, value: object, allowed: str) -> None:
    """Raise ``ValueError`` naming the argument, its value and what is allowed, unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: use {allowed}")


def check_int(name: str, value: object, minimum: int, extra: str = "") -> None:
    """``value`` is an int (not a bool) >= ``minimum``; ``extra`` says more about the setting."""
    require(is_int(value) and value >= minimum, name, value, f"an integer >= {minimum}{' ' + extra if extra else ''}")


def check_name(name: Any) -> None:
    """``name`` is ``None`` or a non-empty string (a callback's identity in checkpoints)."""
    if name is not None and not (isinstance(name, str) and name):
        raise ValueError(f"name={name!r} is not allowed: use a non-empty string, or None")


def fmt(value: float | None) -> str:
    """A metric for a message: 4 significant digits, ``n/a`` when there is none."""
    return "n/a" if value is None else f"{value:.4g}"
