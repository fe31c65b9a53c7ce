"""Errors a user can cause. Each message says what to change; the command line prints it as one line."""

from __future__ import annotations


def describe(e: BaseException) -> str:
    """Another library's (or the user's) exception as one line: its type and its message's first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class SvdnasError(Exception):
    """Base of every error svdnas raises for bad input."""


class SpecError(SvdnasError, ValueError):
    """An invalid low-rank spec, model spec or option."""


class DataError(SvdnasError, ValueError):
    """Missing, unreadable or unsuitable data."""


class WeightsError(SvdnasError, ValueError):
    """Weights that are missing, unsafe or do not fit the architecture."""


class BudgetError(SvdnasError, ValueError):
    """A budget that cannot be met."""


class NonFiniteError(SvdnasError, ArithmeticError):
    """A NaN or inf met while searching or training: the run stops instead of going on with garbage."""


class WriteError(SvdnasError, OSError):
    """A file of the output that could not be written (disk full, no permission); names the file.

    Attributes:
        errno: the operating system's error number, as for any ``OSError``.
        filename: the file that could not be written.
    """

    def __init__(self, path: object, cause: OSError) -> None:
        super().__init__(f"cannot write {path}: {cause.strerror or cause}")
        self.errno = cause.errno
        self.filename = str(path)

    def __str__(self) -> str:  # OSError's own would print the errno instead of the message
        return str(self.args[0])
