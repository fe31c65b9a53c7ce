"""Errors a user can cause. Each message says what to change; the command line prints it as one line."""

from __future__ import annotations


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
