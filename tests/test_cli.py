import json
import subprocess
import sys
import tempfile

import pytest

from auxwrap.cli import main


@pytest.mark.slow
def test_the_demo_trains_after_torch_export_and_a_backward_pass_in_this_process(tmp_path):
    """Once torch.export has run, a backward pass leaves autograd threads that a forked worker cannot use
    ("Unable to handle autograd's threading in combination with fork-based multiprocessing"): the demo's
    workers start from a fork server instead."""
    import torch

    model = torch.nn.Linear(3, 3)
    torch.export.export(model, (torch.randn(2, 3),), strict=False)
    model(torch.randn(2, 3)).sum().backward()
    assert main(["demo", "--quick", "--seeds", "1", "--out", str(tmp_path / "demo")]) == 0


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


# ------------------------------------------------------------------ issue 14: the command line a user expects

HEAVY = ("torch", "timm", "torchvision")


def _heavy_imports(stderr: str) -> list[str]:
    """The torch / timm / torchvision modules a ``python -X importtime`` run lists on stderr."""
    modules = [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]
    return [m for m in modules if m.split(".")[0] in HEAVY]


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["demo", "--help"], ["taps", "--help"],
                                  ["flops", "--help"]])
def test_help_and_version_import_neither_torch_nor_timm(argv):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "auxwrap", *argv], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(("usage: python -m auxwrap", "auxwrap "))
    assert "import time:" in result.stderr  # the check below reads what it should
    assert _heavy_imports(result.stderr) == []


def test_public_names_resolve_lazily_and_keep_their_meaning():
    script = """
import sys, types
import auxwrap
assert "torch" not in sys.modules, "import auxwrap imported torch"
assert callable(auxwrap.deploy.deploy_tolerance)  # a submodule, as when import auxwrap imported them all
from auxwrap.trace import MODULE_PATH  # binds the submodule auxwrap.trace: the function must keep its name
import auxwrap.attach
assert isinstance(auxwrap.trace, types.FunctionType) and auxwrap.trace.__module__ == "auxwrap.trace"
assert isinstance(auxwrap.attach, types.FunctionType) and auxwrap.attach.__module__ == "auxwrap.attach"
assert isinstance(auxwrap.mto, types.ModuleType) and auxwrap.Balancer is auxwrap.mto.Balancer
namespace = {}
exec("from auxwrap import *", namespace)
assert set(auxwrap.__all__) <= set(namespace) and set(auxwrap.__all__) <= set(dir(auxwrap))
assert all(namespace[name] is getattr(auxwrap, name) for name in auxwrap.__all__)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_all_lists_every_lazy_name_and_each_one_resolves():
    import auxwrap
    from auxwrap.optional import AuxwrapMissingDependencyError

    assert set(auxwrap.__all__) == {*auxwrap._EXPORTS, *auxwrap._SUBMODULES, "__version__"}
    for name in auxwrap.__all__:
        assert getattr(auxwrap, name) is not None, name
    assert auxwrap.AuxwrapMissingDependencyError is AuxwrapMissingDependencyError
    assert issubclass(AuxwrapMissingDependencyError, auxwrap.AuxwrapError)
    assert issubclass(AuxwrapMissingDependencyError, ImportError)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        auxwrap.nope  # noqa: B018


@pytest.mark.parametrize("argv", [[], ["demo"], ["taps"], ["flops"]])
def test_help_is_plain_text_with_defaults_and_examples(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text and ":func:" not in text
    assert "examples:\n  python -m auxwrap" in text
    defaults = {"demo": ["(default: 2)", "(default: 3, or 2 with --quick)", "(default: a new temporary directory"],
                "taps": ["(default: 224)"], "flops": ["(default: nas)", "(default: layer)", "(default: 1)"]}
    for default in defaults.get(argv[0] if argv else "", []):
        assert default in " ".join(text.split()), default


class _Calls(list):
    """The taps of each stubbed attach() call; ``.captures``: the capture= of each."""


@pytest.fixture
def attach_calls(monkeypatch):
    """The ``taps`` argument each attach() call of the flops command gets (models: stand-ins, attach: stopped)."""
    import importlib

    from torch import nn

    from auxwrap import AuxwrapError

    calls = _Calls()

    def fake_attach(primary, aux, mode, *, taps, example_inputs, fusion_rank=None, capture="auto"):
        calls.append(taps)
        captures.append(capture)
        raise AuxwrapError("stopped by the test")

    captures = []
    calls.captures = captures

    monkeypatch.setattr(importlib.import_module("auxwrap.attach"), "attach", fake_attach)
    monkeypatch.setattr(importlib.import_module("auxwrap.demo.models"), "build_model", lambda spec: nn.Identity())
    return calls


@pytest.mark.parametrize(("flags", "expected"), [
    ([], "layer"),
    (["--taps", "stage"], "stage"),
    (["--taps", "layer1,layer2"], ["layer1", "layer2"]),
    (["--taps", "layer3"], ["layer3"]),
    (["--primary-taps", "layer1, layer3", "--aux-taps", "stage"], {"primary": ["layer1", "layer3"], "aux": "stage"}),
    (["--taps", "stage", "--aux-taps", "blocks.2,blocks.5"], {"primary": "stage", "aux": ["blocks.2", "blocks.5"]}),
])
def test_tap_flags_reach_attach_as_its_taps_argument(attach_calls, capsys, flags, expected):
    assert main(["flops", "--primary", "timm:a", "--aux", "timm:b", *flags]) == 2
    assert attach_calls == [expected]
    assert "stopped by the test" in capsys.readouterr().err


def test_an_empty_tap_name_is_a_usage_error(attach_calls, capsys):
    with pytest.raises(SystemExit) as info:
        main(["flops", "--primary", "timm:a", "--aux", "timm:b", "--taps", "layer1,,layer2"])
    assert info.value.code == 2 and attach_calls == []
    assert "argument --taps: 'layer1,,layer2' has an empty name" in capsys.readouterr().err


def test_vit_stage_error_says_how_to_name_points_on_the_command_line(capsys):
    argv = ["flops", "--primary", "timm:test_vit", "--aux", "timm:test_vit", "--taps", "stage", "--size", "160"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has no resolution stages" in err
    assert "on the command line: --taps NAME,NAME or --primary-taps/--aux-taps" in err
    assert "e.g. --taps blocks.2,blocks.5" in err


@pytest.mark.parametrize(("spec", "suggestion"), [("timm:resnt50", "timm:resnet50"), ("resnt50", "timm:resnet50"),
                                                  ("torchvision:resnet1", "torchvision:resnet18")])
def test_unknown_model_names_suggest_close_matches(capsys, spec, suggestion):
    from auxwrap import AuxwrapArgumentError
    from auxwrap.demo.models import build_model

    with pytest.raises(AuxwrapArgumentError, match=f"did you mean {suggestion}\\?"):
        build_model(spec)
    assert main(["taps", spec]) == 2
    captured = capsys.readouterr()
    assert f"did you mean {suggestion}?" in captured.err and captured.out == ""


def test_taps_json_is_machine_readable(capsys):
    assert main(["taps", "torchvision:resnet18", "--size", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    names = [t["name"] for t in result["taps"]]
    assert names[0] == "layer1.0" and names[-1] == "layer4.1" and result["traced_equals_eager"] is True
    assert result["taps"][0]["shape"] == [64, 16, 16]
    assert [t["name"] for t in result["taps"] if t["stage_end"]] == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]


def test_flops_json_is_machine_readable_and_per_branch_taps_apply(capsys):
    argv = ["flops", "--primary", "torchvision:resnet18", "--aux", "torchvision:resnet18", "--size", "32",
            "--mode", "grad", "--primary-taps", "layer2,layer4", "--aux-taps", "layer3,layer4", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["taps"] == {"primary": ["layer2", "layer4"], "aux": ["layer3", "layer4"]}
    assert result["inputs"] == "1x3x32x32" and result["connections"] > 0
    rows = {row["model"]: row for row in result["rows"]}
    assert rows["deployed primary"]["flops"] <= rows["original primary"]["flops"]
    assert rows["fused training graph, forward"]["flops"] > rows["original primary"]["flops"]
    assert all(row["macs"] == row["flops"] // 2 for row in rows.values())


@pytest.fixture
def fake_training(monkeypatch, tmp_path):
    """The demo with its task and training replaced by stand-ins, temporary directories made under tmp_path/tmp
    and tmp_path/cwd as the working directory: what the command does around the training."""
    from types import SimpleNamespace

    from auxwrap.demo import compare, experiments
    from auxwrap.plan import Connection
    from auxwrap.search import GateHistory

    def train_grid(runs, jobs, histories=False):
        rows = [{"task": task, "method": method, "label": experiments.method_label(method), "seed": seed,
                 "accuracy": 0.5 + 0.01 * seed, "flops": 1000, "params": 10} for task, method, seed, _ in runs]
        link = Connection("primary", "a", "aux0", "b", "primary->aux")
        history = GateHistory([link], {"primary": ["a"], "aux0": ["b"]}, [0, 1], [[0.5], [0.6]], [0.0, 0.1])
        next(r for r in rows if r["method"] == "aux-nas" and r["seed"] == 0)["history"] = history
        return rows

    task = SimpleNamespace(train=range(4), val=range(2), test=range(2), metric="accuracy")
    monkeypatch.setattr(experiments, "make_task", lambda name, config: task)
    monkeypatch.setattr(compare, "train_grid", train_grid)
    monkeypatch.setattr(compare, "training_machine", lambda: "a test machine")
    for folder in ("tmp", "cwd"):
        (tmp_path / folder).mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def test_demo_writes_into_a_new_temporary_directory_by_default(fake_training, capsys):
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    made = list((fake_training / "tmp").iterdir())
    assert len(made) == 1 and made[0].name.startswith("auxwrap-demo-")
    assert f"gate plot (Aux-NAS, seed 0): {made[0] / 'gates.png'}; this report: {made[0] / 'results.md'}" in out
    assert (made[0] / "gates.png").stat().st_size > 0 and "Paired over 2 seeds" in (made[0] / "results.md").read_text()
    assert list((fake_training / "cwd").iterdir()) == []  # nothing written where the command ran


def test_demo_json_is_the_only_thing_on_stdout(fake_training, capsys):
    out_dir = fake_training / "chosen"
    assert main(["demo", "--quick", "--seeds", "3", "--out", str(out_dir), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["seeds"] == 3 and len(result["runs"]) == 9 and "history" not in result["runs"][0]
    assert result["report"] == str(out_dir / "results.md") and (out_dir / "gates.png").exists()
    assert "Paired over 3 seeds" in captured.err  # the human-readable summary moved to stderr
    assert list((fake_training / "tmp").iterdir()) == []


@pytest.mark.parametrize(("module", "package"), [("sklearn", "scikit-learn"), ("tqdm", "tqdm"),
                                                 ("matplotlib", "matplotlib")])
def test_demo_names_a_missing_package_and_its_extra_before_training(monkeypatch, capsys, module, package):
    from auxwrap.demo import compare

    monkeypatch.setattr(compare, "train_grid", lambda *a, **k: pytest.fail("the demo trained without " + module))
    monkeypatch.setitem(sys.modules, module, None)  # what an import of a missing package meets
    assert main(["demo", "--quick"]) == 2
    err = capsys.readouterr().err
    assert (f"error: python -m auxwrap demo needs {package} (module {module}), which is not installed: "
            "pip install 'auxwrap[demo]'") in err
    assert "Traceback" not in err


def test_plot_gates_and_digits_name_their_missing_package_and_extra(monkeypatch):
    import auxwrap
    from auxwrap.demo import data

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(auxwrap.AuxwrapMissingDependencyError,
                       match=r"auxwrap.plot_gates\(\) needs matplotlib \(module matplotlib\), which is not "
                             r"installed: pip install 'auxwrap\[demo\]'") as info:
        auxwrap.plot_gates(None)
    assert isinstance(info.value, ImportError) and info.value.name == "matplotlib"
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r"needs scikit-learn \(module sklearn\).*auxwrap\[demo\]"):
        data._digits.__wrapped__()  # past its cache


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    """``python -m auxwrap taps MODEL | head`` closes the pipe before the table is written: exit quietly."""
    process = subprocess.Popen([sys.executable, "-m", "auxwrap", "taps", "timm:resnet18", "--size", "32"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the first line: torch alone takes longer to import
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0 and "Traceback" not in stderr, stderr


# ------------------------------------------------------------------ issue 16: --capture and hf: models


def _tiny_vit(spec="hf:vit", size=32):
    """A transformers ViT of 2 blocks on 32x32 images (random weights): torch.fx cannot trace it."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=size, patch_size=8, num_hidden_layers=2, hidden_size=32,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(config)


@pytest.mark.parametrize("command", ["taps", "flops"])
def test_help_lists_the_capture_choices_and_default(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--capture {auto,fx,export}" in text and "(default: auto)" in text.split("--capture {auto,fx,export}")[-1]
    assert "hf:vit" in text


@pytest.mark.parametrize("argv", [["taps", "timm:resnet18", "--capture", "jit"],
                                  ["flops", "--primary", "timm:a", "--aux", "timm:b", "--capture", "dynamo"]])
def test_a_bad_capture_is_a_usage_error_naming_the_choices(argv, attach_calls, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and attach_calls == []
    assert f"argument --capture: invalid choice: '{argv[-1]}'" in err
    assert all(choice in err.split("invalid choice")[-1] for choice in ("auto", "fx", "export"))


def test_the_capture_choices_are_those_trace_takes():
    from auxwrap.capture import CAPTURES
    from auxwrap.cli import CAPTURE_CHOICES

    assert CAPTURE_CHOICES == CAPTURES


@pytest.mark.parametrize(("flags", "expected"), [([], "auto"), (["--capture", "fx"], "fx"),
                                                 (["--capture", "export"], "export")])
def test_the_capture_flag_reaches_attach(attach_calls, capsys, flags, expected):
    assert main(["flops", "--primary", "timm:a", "--aux", "timm:b", *flags]) == 2
    assert attach_calls.captures == [expected] and "stopped by the test" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "expected"), [([], "auto"), (["--capture", "export"], "export")])
def test_the_capture_flag_reaches_trace_with_the_command_inputs(monkeypatch, capsys, flags, expected):
    import importlib

    from torch import nn

    from auxwrap import AuxwrapError

    calls = []

    def fake_trace(model, *, capture, example_inputs):
        calls.append((capture, [tuple(x.shape) for x in example_inputs]))
        raise AuxwrapError("stopped by the test")

    monkeypatch.setattr(importlib.import_module("auxwrap.trace"), "trace", fake_trace)
    monkeypatch.setattr("auxwrap.cli.build_named_model", lambda spec, size: nn.Identity())
    assert main(["taps", "timm:a", "--size", "48", *flags]) == 2
    assert calls == [(expected, [(2, 3, 48, 48)])]


def test_taps_of_a_transformers_model_falls_back_on_export_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr("auxwrap.cli.build_named_model", _tiny_vit)
    assert main(["taps", "hf:vit", "--size", "32", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["capture"] == "export" and result["traced_equals_eager"] is True
    assert [t["name"] for t in result["taps"]] == ["vit.layers.0", "vit.layers.1"]
    assert result["taps"][0]["layout"] == "tokens" and result["taps"][0]["shape"] == [17, 32]
    warnings = [line for line in captured.err.splitlines() if line.strip()]
    assert len(warnings) == 1, captured.err
    assert warnings[0].startswith("warning: ViTForImageClassification: torch.fx could not trace")
    assert "captured it with torch.export" in warnings[0]


def test_capture_fx_on_a_transformers_model_is_an_error_naming_the_fixes(monkeypatch, capsys):
    monkeypatch.setattr("auxwrap.cli.build_named_model", _tiny_vit)
    assert main(["taps", "hf:vit", "--size", "32", "--capture", "fx"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: torch.fx could not trace ViTForImageClassification")
    assert "Traceback" not in captured.err and captured.out == ""


def test_hf_names_build_a_transformers_image_classifier_of_the_given_size():
    pytest.importorskip("transformers")
    from auxwrap.cli import build_named_model

    model = build_named_model("hf:vit", 64)
    assert type(model).__name__ == "ViTForImageClassification" and model.config.image_size == 64


@pytest.mark.parametrize(("spec", "expected"), [
    ("hf:vitt", "did you mean hf:vit"), ("hf:bert", "the Python API (auxwrap.attach, auxwrap.trace) takes any")])
def test_unknown_hf_names_say_what_the_command_line_takes(capsys, spec, expected):
    pytest.importorskip("transformers")
    assert main(["taps", spec]) == 2
    err = capsys.readouterr().err
    assert f"unknown transformers image classifier {spec.split(':')[1]!r}" in err and expected in err


def test_hf_names_without_transformers_name_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["taps", "hf:vit"]) == 2
    assert "the model hf:vit needs transformers (module transformers), which is not installed: " \
           "pip install 'auxwrap[hf]'" in capsys.readouterr().err
