"""benchmarks/timm_compat.py: the quick run passes on a handful of timm models (slow); its population, shards,
sizes and report (fast)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def compat(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import timm_compat

    yield timm_compat
    sys.path.remove(str(ROOT / "benchmarks"))


def _row(name: str, status: str, error: str = "", family: str = "f", seconds: float = 1.0) -> dict:
    return {"name": name, "family": family, "params": 1, "img_size": "64x64", "status": status, "error": error,
            "stage": "attach-grad" if error else "", "message": "why" if error else "", "zero_grad_fusions": "0/0",
            "max_rel_error": "", "seconds": seconds, "cpu_s": seconds}


@pytest.mark.slow
def test_quick_run_passes_every_model(tmp_path: Path) -> None:
    out = tmp_path / "timm_compat.csv"
    result = subprocess.run([sys.executable, "-m", "benchmarks.timm_compat", "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with out.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert len(rows) == 5 and all(r["status"] == "pass" for r in rows), rows
    assert all(float(r["max_rel_error"]) <= 1e-4 for r in rows)
    assert all(r["zero_grad_fusions"] == "0/0" for r in rows)  # every fusion weight learns, in both modes
    report = out.with_suffix(".md").read_text()
    assert "Pass rate: **100.0%**" in report and "--quick" in report


def test_shards_cover_every_architecture_once(compat) -> None:
    names = [f"m{i}" for i in range(11)]
    shards = [compat.candidates(names, (i, 3), None, 0) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(names)
    sample = compat.candidates(names, (0, 1), 4, seed=7)
    assert sample == compat.candidates(names, (0, 1), 4, seed=7) and sorted(sample) == sorted(names)


def test_sizes_try_64_first_and_img_size_first_where_the_config_fixes_the_size(compat) -> None:
    vit = compat.sizes("vit_tiny_patch16_224")
    assert vit[0] == ((64, 64), {"img_size": 64}) and ((224, 224), {}) in vit
    assert compat.sizes("resnet18")[0] == ((64, 64), {})


def test_the_report_counts_the_population_and_groups_failures(compat) -> None:
    rows = [_row("a", "pass"), _row("b", "pass"), _row("c", "fail", "AuxwrapTapError", "crossvit"),
            _row("d", "fail", "RuntimeError", "x"), _row("e", "skipped")]
    rows[-1]["message"] = "timm fx cannot trace it: TraceError: ..."
    assert compat.pass_rate(rows) == 0.5
    rate, unnamed = compat.targets(rows)
    assert (rate.measured, rate.status) == ("50.0%", "missed")
    assert (unnamed.measured, unnamed.status) == ("1", "missed")  # the RuntimeError
    text = compat.report(rows)
    assert "| crossvit | `AuxwrapTapError` | 1 | c |" in text and "`x` (RuntimeError)" in text
    assert "| timm fx cannot trace it | 1 | e |" in text


def test_committed_results_meet_the_target() -> None:
    path = RESULTS / "timm_compat.csv"
    if not path.is_file():
        pytest.skip("no committed timm_compat results")
    with path.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["status"] != "skipped"]
    assert len(rows) >= 150
    assert sum(r["status"] == "pass" for r in rows) / len(rows) >= 0.97
    assert all(r["error"].startswith("Auxwrap") for r in rows if r["status"] != "pass"), "unnamed failures"
