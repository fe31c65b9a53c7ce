"""The benchmark scripts import and parse their arguments; their small helpers are right."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the benchmarks are modules of the benchmarks package, run from the repository root: python -m benchmarks.tables.NAME
SCRIPTS = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for folder in ("tables", "diagnostics", "tools")
    for p in (ROOT / "benchmarks" / folder).glob("*.py")
    if not p.name.startswith("_")
)


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.split(".", 1)[1])
def test_benchmark_help(module):
    res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout


def _load(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # as when run with -m from the repository root
    return importlib.import_module(f"benchmarks.{name}")


def test_spearman_and_pareto(monkeypatch):
    m = _load("tables.one_layer_space", monkeypatch)
    assert m.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert m.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert m.ranks([5.0, 1.0, 5.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    # by hand: ranks (1,2,3,4,5) and (2,1,4,3,5): d^2 = 1+1+1+1+0 = 4, rho = 1 - 6*4/(5*24) = 0.8
    assert m.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    front = m.pareto([(0.5, 80.0), (0.2, 70.0), (0.3, 60.0), (0.9, 90.0), (0.6, 75.0)])
    assert front == [(0.2, 70.0), (0.5, 80.0), (0.9, 90.0)]


def test_allocation_reads_kept_share_and_groups(monkeypatch, tmp_path):
    import json

    m = _load("diagnostics.budget_allocation", monkeypatch)
    layers = [
        {"name": "a", "flops": [100, 25], "branches": [{"first_kernel": [1, 1], "groups": [24, 1], "rank": 8}]},
        {"name": "b", "flops": [100, 100], "branches": []},
    ]
    (tmp_path / "report.json").write_text(json.dumps({"layers": layers}))
    alloc = m.allocation(tmp_path)
    assert alloc["a"] == (0.25, "1x1-first/g24x1/r8", 24)
    assert alloc["b"] == (1.0, "original", 1)
