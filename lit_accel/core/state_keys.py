"""Callback state keys that survive a changed setting, shared by lit_accel's stateful callbacks.

Lightning files each callback's ``state_dict()`` in a checkpoint under ``callback.state_key`` and,
on resume, hands a callback only the state filed under its current key: a key that spells out
tuning settings silently drops the state when the user resumes with another value (more
``max_rollbacks``, as DivergenceGuard's own stop message suggests). lit_accel's callbacks key on
identity only (an optional ``name``; DynamicBatchLR also ``monitor``/``mode``, as Lightning's
``EarlyStopping`` does), and :func:`adopt_older_state` moves state filed under an older key that
also spelled out settings to the current key before Lightning reads it.

Imports only the standard library, so a callback module plus this file can be copied elsewhere.
"""

from __future__ import annotations

import ast
from typing import Any

__all__ = ["adopt_older_state", "identity_state_key"]


def identity_state_key(qualname: str, **identity: Any) -> str:
    """``qualname`` alone, or ``qualname{...}`` with the identity entries that are not ``None``.

    The same format as Lightning's ``Callback._generate_state_key``, so keys stay readable.
    """
    given = {k: v for k, v in identity.items() if v is not None}
    return f"{qualname}{given!r}" if given else qualname


def adopt_older_state(checkpoint: dict[str, Any], state_key: str, qualname: str, **identity: Any) -> str | None:
    """File the state of an older key under ``state_key`` in ``checkpoint["callbacks"]``.

    Call from ``on_load_checkpoint`` (Lightning runs it before ``load_state_dict``). An older key
    is ``qualname{...}`` whose entries include every ``identity`` entry that is not ``None``;
    it is adopted only if it is the only such key and nothing is filed under ``state_key`` yet.

    Returns:
        The adopted key, or ``None``.
    """
    states = checkpoint.get("callbacks")
    if not isinstance(states, dict) or state_key in states:
        return None
    wanted = {k: v for k, v in identity.items() if v is not None}
    matches = []
    for key in states:
        if not (isinstance(key, str) and key.startswith(qualname + "{") and key.endswith("}")):
            continue
        try:
            settings = ast.literal_eval(key[len(qualname) :])
        except (ValueError, SyntaxError):
            continue
        if isinstance(settings, dict) and all(k in settings and settings[k] == v for k, v in wanted.items()):
            if "name" in settings and "name" not in wanted:
                continue  # another, named instance's state
            matches.append(key)
    if len(matches) != 1:
        return None
    states[state_key] = states[matches[0]]
    return matches[0]
