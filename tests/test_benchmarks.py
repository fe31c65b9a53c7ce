"""The benchmark scripts import and parse their arguments; their small helpers are right."""

import importlib
import math
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


def test_bits_round_trip_and_the_sign_test(monkeypatch, tmp_path):
    import json

    m = _load("tables.post_training_comparison", monkeypatch)
    for bits in ([], [True], [False, True, True], [True, False] * 7 + [True]):
        assert m.decode_bits(m.encode_bits(bits), len(bits)) == bits
    assert m.encode_bits([True, False, False, False, False, False, False, True]) == "81"
    # by hand: 0 against 5 has p = 2 / 2^5; 1 against 1 is an even split; 10 against 0: 2 / 1024
    assert m.sign_test(0, 5) == pytest.approx(2 / 32)
    assert m.sign_test(1, 1) == 1.0 and m.sign_test(0, 0) == 1.0
    assert m.sign_test(10, 0) == m.sign_test(0, 10) == pytest.approx(2 / 1024)
    assert m.sign_test(3, 9) == pytest.approx(2 * sum(math.comb(12, i) for i in range(4)) / 4096)
    ours, theirs = [True, True, False, True, False], [False, True, True, False, False]
    rows = [{"reduction_target": 0.2, "method": "svdnas@prefix", "correct": m.encode_bits(ours)},
            {"reduction_target": 0.2, "method": "balf", "correct": m.encode_bits(theirs)},
            {"reduction_target": 0.4, "method": "balf", "correct": m.encode_bits(theirs)}]
    (tmp_path / "r.json").write_text(json.dumps({"meta": {"test_images": 5}, "rows": rows}))
    lines = m.paired_table(tmp_path / "r.json").splitlines()
    assert len(lines) == 3 and "| 0.2 | svdnas@prefix vs balf | 2 | 1 | 1 |" in lines[2]
    assert m.sign_test(3000, 200) == 0.0 and m.p_text(0.0) == "<1e-300" and m.p_text(0.0123) == "0.012"
    rows[1]["correct"] = m.encode_bits(theirs + [True] * 4)  # right answers for 9 images, not 5
    (tmp_path / "r.json").write_text(json.dumps({"meta": {"test_images": 5}, "rows": rows}))
    with pytest.raises(ValueError, match="another number of test images"):
        m.paired_table(tmp_path / "r.json")
