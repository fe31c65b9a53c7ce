"""Helpers that measure nothing: tables from result files, joining synthetic image sets."""
