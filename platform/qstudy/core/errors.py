"""The errors qstudy reports to a user as one line naming the field or file."""

from __future__ import annotations


class QstudyError(Exception):
    """Bad input, or a run that cannot train: one line naming the field or file; the CLI prints it and exits 2."""


class ConfigError(QstudyError, ValueError):
    """A config file or mapping does not match the schema; the message names the field."""
