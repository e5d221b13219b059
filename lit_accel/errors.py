"""Errors a user can cause and fix. The CLI prints their message alone, without a traceback."""

from __future__ import annotations

__all__ = ["LitAccelUserError", "ConfigurationError", "DataNotFoundError", "CheckpointError"]


class LitAccelUserError(Exception):
    """Base class: the message says what is wrong and what to do next."""


class ConfigurationError(LitAccelUserError, ValueError):
    """An argument or a combination of arguments is not allowed (a ``ValueError`` too)."""


class DataNotFoundError(LitAccelUserError, FileNotFoundError):
    """The data set is not on disk and could not be downloaded."""


class CheckpointError(LitAccelUserError):
    """A checkpoint is missing, damaged, or does not fit the configured model."""
