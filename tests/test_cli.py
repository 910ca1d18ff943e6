import subprocess
import sys

import pytest

from auxwrap.cli import main


@pytest.mark.slow
def test_demo_quick_trains_prunes_and_compares_at_single_task_cost(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()
            if line.startswith(("Single", "Aux-G-Layer", "Aux-NAS"))}
    assert set(rows) == {"Single", "Aux-G-Layer", "Aux-NAS"}
    # the last three columns: deployed MFLOPs, params, FLOPs / Single
    cells = {name: row.split() for name, row in rows.items()}
    assert len({c[-3] for c in cells.values()}) == 1, rows  # every deployed model costs what Single costs
    assert len({c[-2] for c in cells.values()}) == 1, rows  # and has as many parameters
    assert all(c[-1] == "1.000" for c in cells.values()), rows
    assert all("±" in row for row in rows.values())
    assert "Paired over 2 seeds" in out
    verdicts = [line for line in out.splitlines() if line.startswith("- ")]
    assert [line.split(":")[0] for line in verdicts] == [
        "- Aux-G-Layer vs Single", "- Aux-NAS vs Single", "- Aux-NAS vs Aux-G-Layer"]
    assert all(any(word in line for word in ("noise", "sigma", "spread")) for line in verdicts), verdicts
    png, report = tmp_path / "demo" / "gates.png", tmp_path / "demo" / "results.md"
    assert f"gate plot (Aux-NAS, seed 0): {png}" in out and png.stat().st_size > 0
    assert "Paired over 2 seeds" in report.read_text()


def test_taps_command_lists_points_of_a_named_model(capsys):
    assert main(["taps", "torchvision:resnet18", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0" in out and "layer4.1" in out


def test_bad_model_name_is_a_clear_error(capsys):
    assert main(["taps", "foo:bar"]) == 2
    assert "unknown model source 'foo'" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "auxwrap", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("auxwrap ")


@pytest.mark.parametrize("argv", [[], ["nope"]])
def test_usage_errors_exit_nonzero(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
