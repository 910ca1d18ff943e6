import subprocess
import sys

import pytest

from auxwrap.cli import main


def test_demo_quick_traces_both_models_and_lists_their_points(capsys):
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "primary timm:resnet18" in out and "auxiliary timm:vit_tiny_patch16_224" in out
    assert out.count("traced output equals eager output: True") == 2
    assert "layer4.1      block  nchw    512x2x2   yes" in out
    assert "blocks.11     block  tokens  17x192" in out
    assert "has no resolution stages" in out


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
