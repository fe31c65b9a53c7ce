"""The paper's tables and figures, re-measured at this project's scale (see benchmarks/RESULTS.md)."""
