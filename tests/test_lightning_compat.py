"""The private Lightning members lit_accel relies on exist in the installed Lightning (one message if not)."""

from __future__ import annotations

import pytest

from helpers import REPO_ROOT
from lit_accel.lightning_compat import PRIVATE_LIGHTNING_MEMBERS, missing_private_members


def test_every_private_lightning_member_lit_accel_relies_on_exists() -> None:
    missing = missing_private_members()
    assert not missing, "\n".join(missing)


def test_a_member_that_disappears_is_named_with_its_user(monkeypatch) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.delattr(ModelCheckpoint, "_monitor_candidates")
    (message,) = missing_private_members()
    assert "has no ModelCheckpoint._monitor_candidates" in message
    assert "lit_accel/checkpoints.py relies on (LastAfterEveryValidation)" in message


@pytest.mark.parametrize("member", PRIVATE_LIGHTNING_MEMBERS, ids=str)
def test_each_listed_member_is_used_where_the_list_says(member) -> None:
    """The list does not rot: each entry's file still names the member."""
    used_in = REPO_ROOT / member.used_by.split(":")[0]
    last = member.name.split(".")[-1]
    name = member.owner.split(":")[1] if last in ("__call__", "get") else last
    assert name in used_in.read_text(), f"{member} is no longer used in {used_in}: remove it from the list"
