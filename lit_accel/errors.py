"""Errors a user can cause and fix. The CLI prints their message alone, without a traceback."""

from __future__ import annotations

__all__ = ["LitAccelUserError", "DataNotFoundError"]


class LitAccelUserError(Exception):
    """Base class: the message says what is wrong and what to do next."""


class DataNotFoundError(LitAccelUserError, FileNotFoundError):
    """The data set is not on disk and could not be downloaded."""
