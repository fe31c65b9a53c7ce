"""Diagnostics: measurements that explain a table's numbers (see benchmarks/RESULTS.md)."""
