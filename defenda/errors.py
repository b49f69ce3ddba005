"""Exceptions users and plugin authors see. Each message is one line that says what to do."""

from __future__ import annotations


class DefendaError(Exception):
    """Base class: an error the CLI prints as one line (exit code 2) instead of a traceback."""


class ParamError(DefendaError):
    """A plugin parameter is unknown, of the wrong type or out of range."""


class StudyError(DefendaError):
    """A study file is malformed: names the file, the key and what is allowed."""


class DataError(DefendaError):
    """A dataset is missing or malformed on disk."""


class PluginError(DefendaError):
    """A plugin could not be loaded or registered."""


class RegistrationError(PluginError):
    """A plugin registered an invalid class, or a name another plugin already registered."""


class UnsupportedError(DefendaError):
    """An attack cannot run in this cell (requirements not met); the runner records a skipped row."""


class StoreError(DefendaError):
    """The results store cannot be used (unwritable, incompatible version, locked)."""
