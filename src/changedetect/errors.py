"""Errors and warnings raised by changedetect.

Every error a user can cause subclasses :class:`ChangeDetectError`; the CLI turns
them into a one-line message on stderr and an exit code (1 for data and
processing errors, 2 for usage and configuration errors).
"""


class ChangeDetectError(Exception):
    """Base class for errors caused by input data or processing (exit code 1)."""

    exit_code = 1


class DataError(ChangeDetectError):
    """An input file is missing, unreadable, or unusable."""


class GridMismatchError(DataError, ValueError):
    """Two rasters do not share the grid an operation needs."""


class NoOverlapError(DataError):
    """The before and after images (or an AOI) do not overlap."""


class ConfigError(ChangeDetectError, ValueError):
    """A pipeline file or a command-line option is invalid (exit code 2)."""

    exit_code = 2


class OutputExistsError(ChangeDetectError):
    """An output exists and ``--overwrite`` was not given (exit code 2)."""

    exit_code = 2


class ChangeDetectWarning(UserWarning):
    """Base class for warnings that a result is less reliable than usual."""


class CoregistrationWarning(ChangeDetectWarning):
    """Co-registration could not be confirmed as reliable."""
