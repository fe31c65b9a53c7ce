"""svdnas's benchmarks: ``tables`` for the paper's tables and figures, ``diagnostics`` for the
rest, ``tools`` for helpers that measure nothing; run from the repository root as
``python -m benchmarks.<folder>.<script>`` (see RESULTS.md)."""
