"""Callback state keys that survive a changed setting, shared by lit_accel's stateful callbacks.

Lightning files each callback's ``state_dict()`` in a checkpoint under ``callback.state_key`` and,
on resume, hands a callback only the state filed under its current key: a key that spells out
tuning settings silently drops the state when the user resumes with another value (more
``max_rollbacks``, as DivergenceGuard's own stop message suggests). lit_accel's callbacks key on
identity only (an optional ``name``; DynamicBatchLR also ``monitor``/``mode``, as Lightning's
``EarlyStopping`` does).

Imports only the standard library, so a callback module plus this file can be copied elsewhere.
"""

from __future__ import annotations

from typing import Any

__all__ = ["identity_state_key"]


def identity_state_key(qualname: str, **identity: Any) -> str:
    """``qualname`` alone, or ``qualname{...}`` with the identity entries that are not ``None``.

    The same format as Lightning's ``Callback._generate_state_key``, so keys stay readable.
    """
    given = {k: v for k, v in identity.items() if v is not None}
    return f"{qualname}{given!r}" if given else qualname
