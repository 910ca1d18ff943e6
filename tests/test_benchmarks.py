"""The benchmarks run (``--quick``, into a temporary folder) and write what benchmarks/README.md is generated from.

The quick runs are slow tests (about half a minute each on 2 CPU cores); they never touch
``benchmarks/results``. The fast tests check the committed results against benchmarks/README.md and lint the
folder.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
BENCHMARKS_README = BENCHMARKS / "README.md"
MARKERS = ("<!-- results:start -->", "<!-- results:end -->")
LINK = re.compile(r"\]\(([^)\s]+)\)")  # the target of a Markdown link

FLOPS_COLUMNS = ["backbone", "K", "model", "flops", "macs", "params"]
FLOPS_MODELS = {"single", "aux-g-deployed", "aux-nas-deployed", "fused-train-fwd", "fused-train-fwdbwd",
                "soft-sharing", "aux-head", "aux-module-train-fwd", "aux-module-train-fwdbwd", "aux-module-deployed",
                "fused-train-fwd-rank", "fused-train-fwdbwd-rank"}
TRAIN_COLUMNS = ["device", "backbone", "img_size", "batch", "impl", "mode", "K", "part", "median_ms", "q1_ms", "q3_ms",
                 "repeats", "gflops", "fusion_gflops", "over_separate", "peak_mib", "runtime", "precision", "compile_s",
                 "flops_over_separate", "time_over_flops"]
LATENCY_COLUMNS = ["device", "backbone", "img_size", "batch", "model", "runtime", "median_ms", "q1_ms", "q3_ms",
                   "repeats", "over_original", "compile_s", "max_rel_error"]


def run_quick(script: str, out: Path) -> None:
    """``python benchmarks/SCRIPT --quick --out OUT --device cpu --threads 1`` (one thread: steady on a busy
    machine, and the counts and ratios do not depend on it)."""
    command = [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out), "--device", "cpu",
               "--threads", "1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def broken_links(page: Path) -> list[str]:
    """The relative link targets of a Markdown page that name nothing, read from the page's folder."""
    targets = [t.split("#")[0] for t in LINK.findall(page.read_text()) if "://" not in t]
    return [t for t in targets if t and not (page.parent / t).exists()]


def read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("benchmarks")


def _written(folder: Path, name: str) -> None:
    for suffix in (".csv", ".md", ".json"):
        assert (folder / f"{name}{suffix}").is_file(), f"{name}{suffix} not written"
    meta = json.loads((folder / f"{name}.json").read_text())
    assert "--quick" in meta["env"]["command"] and meta["env"]["loadavg_before"] is not None
    assert meta["targets"], "the targets are reported"


@pytest.mark.slow
def test_flops_quick_writes_exact_columns_and_deployed_equals_primary(quick_results: Path) -> None:
    run_quick("flops.py", quick_results)
    _written(quick_results, "flops")
    columns, rows = read(quick_results / "flops.csv")
    assert columns == FLOPS_COLUMNS
    assert {r["model"] for r in rows} == FLOPS_MODELS
    single = {(r["backbone"], r["K"]): r for r in rows if r["model"] == "single"}
    deployed = [r for r in rows if r["model"] in ("aux-g-deployed", "aux-nas-deployed", "aux-module-deployed")]
    assert len(deployed) == 3 * len(single) > 0
    for r in deployed:
        n = single[(r["backbone"], r["K"])]
        assert int(r["flops"]) / int(n["flops"]) == 1.0, r  # exactly the single-task cost
        assert int(r["params"]) <= int(n["params"]), r
    for r in rows:
        assert int(r["macs"]) * 2 == int(r["flops"])
    fused = {(r["backbone"], r["K"]): int(r["flops"]) for r in rows if r["model"] == "fused-train-fwd"}
    assert all(fused[key] > (int(key[1]) + 1) * int(n["flops"]) for key, n in single.items())
    module = {(r["backbone"], r["K"]): int(r["flops"]) for r in rows if r["model"] == "aux-module-train-fwd"}
    assert all(int(n["flops"]) < module[key] < fused[key] for key, n in single.items())  # light, but not free
    assert "Table 1" in (quick_results / "flops.md").read_text()


@pytest.mark.slow
def test_train_step_quick_writes_every_configuration(quick_results: Path) -> None:
    run_quick("train_step.py", quick_results)
    _written(quick_results, "train_step")
    columns, rows = read(quick_results / "train_step.csv")
    assert columns == TRAIN_COLUMNS
    seen = {(r["mode"], r["K"], r["part"]) for r in rows if r["impl"] == "auxwrap"}
    assert ("single", "0", "weight-step") in seen
    for k in ("1", "2"):
        assert {("grad", k, "weight-step"), ("nas", k, "gate-step"), ("nas", k, "weight-step"),
                ("nas", k, "iteration")} <= seen
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert {(r["runtime"], r["precision"]) for r in rows} == {("eager", "fp32")}  # no --compile, no --amp
    meta = json.loads((quick_results / "train_step.json").read_text())
    assert any(t["status"] == "not measured" and "GPU" in t["name"] for t in meta["targets"])


@pytest.mark.slow
def test_gpu_script_quick_runs_every_part_and_writes_the_compiled_and_bf16_rows(tmp_path: Path) -> None:
    """``benchmarks/gpu.py --quick`` on the CPU: the GPU run's sequence, tiny, ready for a GPU. Every part done;
    eager and compiled, fp32 and bf16 rows with a first-call time and time / FLOPs; a preview page from them."""
    out = tmp_path / "gpu"
    command = [sys.executable, str(BENCHMARKS / "gpu.py"), "--quick", "--out", str(out), "--device", "cpu",
               "--threads", "1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "gpu.json").read_text())
    assert [(p["name"], p["status"]) for p in record["parts"]] == [
        ("train_step", "done"), ("deploy_latency", "done"), ("train_step_compiled", "done"), ("readme", "done")]
    assert all(0 < p["elapsed_s"] <= p["budget_s"] for p in record["parts"])
    _, eager = read(out / "train_step.csv")
    assert {(r["runtime"], r["precision"]) for r in eager} == {("eager", "fp32"), ("eager", "bf16")}
    columns, rows = read(out / "compiled" / "train_step.csv")
    assert columns == TRAIN_COLUMNS
    assert {(r["runtime"], r["precision"]) for r in rows} == {(rt, p) for rt in ("eager", "compiled")
                                                            for p in ("fp32", "bf16")}
    for r in rows:
        first_call = r["runtime"] == "compiled" and r["part"] == "weight-step"
        assert (r["compile_s"] != "") == first_call and (not first_call or float(r["compile_s"]) > 0), r
        assert (r["time_over_flops"] != "") == (r["part"] == "weight-step"), r
    meta = json.loads((out / "compiled" / "train_step.json").read_text())
    assert sum("FLOPs / sum of separate" in t["name"] for t in meta["targets"]) == 4  # one per variant
    _written(out, "deploy_latency")
    page = (out / "README.md").read_text()
    assert "### Training step" in page and "`compiled/`" in page and "### Deployed latency" in page
    assert not broken_links(out / "README.md"), broken_links(out / "README.md")


def test_time_over_flops_compares_each_variant_with_its_own_single_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """(fused time / (K+1) single times) / (fused FLOPs / (K+1) single FLOPs), the single step of the same runtime
    and precision; the target (<= 1.05) reads the largest over the fused weight steps of each variant."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common
    import torch
    import train_step as ts

    compiled = ts.Variant("compiled", "fp32")
    setting = ts.Setting("vit", 32, 4, (1,), 0, 1)

    def config(mode: str, k: int, variant: ts.Variant) -> ts.Config:
        return ts.Config("auxwrap", mode, k, {"weight-step": None}, [], None, variant=variant)

    ms = {("single", ts.BASE): 10, ("single", compiled): 5, ("grad", ts.BASE): 22, ("grad", compiled): 12}
    configs = [config(mode, 0 if mode == "single" else 1, v) for mode, v in ms]
    timings = {c.name: common.Timing([ms[c.mode, c.variant] / 1e3], {"weight-step": [ms[c.mode, c.variant] / 1e3]})
               for c in configs}
    flops = {("auxwrap", "single", 0): {"weight-step": (100, 0)}, ("auxwrap", "grad", 1): {"weight-step": (210, 10)}}
    rows = ts.rows_of(configs, timings, flops, {}, setting, torch.device("cpu"), {configs[3].name: 7.0})
    grad = {r["runtime"]: r for r in rows if r["mode"] == "grad"}
    assert grad["eager"]["flops_over_separate"] == 1.05 and grad["eager"]["over_separate"] == 1.1
    assert grad["eager"]["time_over_flops"] == round(1.1 / 1.05, 3)  # against the eager single step
    assert grad["compiled"]["time_over_flops"] == round(1.2 / 1.05, 3)  # against the compiled one (5 ms), not 10
    assert (grad["eager"]["compile_s"], grad["compiled"]["compile_s"]) == ("", 7.0)
    targets = [ts.time_over_flops_target(rows, v, "CPU", "here") for v in ts.variants_of(rows)]
    assert [(t.measured, t.status) for t in targets] == [("1.048", "met"), ("1.143", "missed")]
    assert targets[1].name.endswith("every fused weight step compiled fp32 (CPU)")


@pytest.mark.slow
def test_deploy_latency_quick_writes_eager_and_compiled(quick_results: Path) -> None:
    run_quick("deploy_latency.py", quick_results)
    _written(quick_results, "deploy_latency")
    columns, rows = read(quick_results / "deploy_latency.csv")
    assert columns == LATENCY_COLUMNS
    assert {(r["model"], r["runtime"]) for r in rows} == {
        (m, rt) for m in ("original", "deployed", "fused-nas-K1") for rt in ("eager", "compile")}
    for r in rows:
        assert float(r["max_rel_error"]) <= 1e-5, r  # deployed = original, compiled or not


@pytest.mark.slow
def test_readme_section_generated_from_quick_results(quick_results: Path, tmp_path: Path) -> None:
    """From whatever quick results this module made (run alone: the quickest benchmark's only), into a page
    elsewhere (``--readme``), its links relative to that page's folder."""
    names = {"flops": "### FLOPs and parameters", "train_step": "### Training step",
             "deploy_latency": "### Deployed latency"}
    if not any((quick_results / f"{name}.json").is_file() for name in names):
        run_quick("deploy_latency.py", quick_results)
    readme = tmp_path / "benchmarks" / "README.md"
    readme.parent.mkdir()
    readme.write_text("# x\n\n## Results\n\n<!-- results:start -->\nSTALE-SECTION\n<!-- results:end -->\n\n## Errors\n")
    command = [sys.executable, str(BENCHMARKS / "readme.py"), "--results", str(quick_results), "--readme", str(readme)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=60)
    text = readme.read_text()
    assert "STALE-SECTION" not in text and text.endswith("<!-- results:end -->\n\n## Errors\n")
    assert "**Targets**" in text
    for name, heading in names.items():
        assert (heading in text) == (quick_results / f"{name}.json").is_file()
        assert (name in text.split("No results yet for:")[-1].split("\n")[0]) != (heading in text)
    assert "Full report: [" in text and not broken_links(readme), broken_links(readme)
    check = subprocess.run([*command, "--check"], cwd=ROOT, capture_output=True, timeout=60)
    assert check.returncode == 0


def test_the_reference_loads_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_step imports the anchor script unchanged and builds its models on our device."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import torch
    import train_step

    path = train_step.find_anchor()
    if path is None:
        pytest.skip("../shared/anchors/vit_pair_step.py is not beside this checkout")
    anchor = train_step.load_anchor(path, torch.device("cpu"))
    assert anchor.dev == "cpu" and anchor.B == 20  # its own default batch: our argv was hidden from it
    assert next(anchor.vit().parameters()).device.type == "cpu"  # its ViT-Base, moved to anchor.dev


def test_the_train_step_note_states_the_window_the_fused_networks_have(monkeypatch: pytest.MonkeyPatch) -> None:
    """The note lists, per destination block, as many sources as the fused network has connections into it (in
    attach()'s default window form), and the anchor's grouped window beside it (1, 2, 3, 1, 2, 3)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import timm
    import torch
    import train_step

    import auxwrap
    from auxwrap.plan import DEFAULT_WINDOW_FORM

    def vit() -> torch.nn.Module:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=6, num_classes=4,
                                 global_pool="")

    net = auxwrap.attach(vit(), vit(), mode="grad", example_inputs=(torch.randn(2, 3, 32, 32),))
    into = [sum(c.dest == tap.name for c in net.connections()) for tap in net.taps["aux0"]]
    note = train_step.window_note(net, "grad K=1: 99")
    assert f"window=3, window_form='{DEFAULT_WINDOW_FORM}' (attach()'s default)" in note
    assert f"block {', '.join(map(str, into))} ({len(net.connections())} per direction" in note
    assert note.endswith("1, 2, 3, 1, 2, 3 (12).") and "connections grad K=1: 99." in note


def test_the_flops_target_reads_missed_when_a_deployed_row_costs_less_than_the_primary(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly N is the target: fewer FLOPs would mean the deployed model is not the primary either."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import flops

    single = {"backbone": "b", "K": 1, "model": "single", "flops": 100, "params": 10}
    deployed = [{**single, "model": model, "flops": f} for model, f in zip(flops.DEPLOYED, (100, 98, 100), strict=True)]
    target = flops.targets([single, *deployed])[0]
    assert (target.measured, target.status) == ("0.980", "missed")
    exact = flops.targets([single, *[{**r, "flops": 100} for r in deployed]])[0]
    assert (exact.measured, exact.status) == ("1.000", "met")


def test_the_accuracy_targets_read_from_the_paired_differences(monkeypatch: pytest.MonkeyPatch) -> None:
    """(a) Aux-NAS no worse than Aux-G-Layer by more than 1 σ, (b) better than Single by more than 2 σ; σ: the
    std over seeds of the per-seed differences; lower is better for angle errors."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import accuracy

    def statuses(task: str, values: dict[str, list[float]]) -> list[str]:
        """The targets' statuses where every metric of ``task`` takes ``values[method][seed]``."""
        metrics = dict.fromkeys(m for m, _ in accuracy.METRICS[task])
        rows = [{"task": task, "method": m, "label": m, "seed": s, **dict.fromkeys(metrics, v), "flops": 1,
                 "params": 1, "seconds": 1} for m, vs in values.items() for s, v in enumerate(vs)]
        return [t.status for t in accuracy.targets(task, accuracy.summarise(rows))]

    single = [0.50, 0.52, 0.51]
    assert statuses("scenes-few", {"single": single, "aux-g-layer": [0.60, 0.60, 0.60],
                                   "aux-nas": [0.60, 0.63, 0.61]}) == ["met", "met"]
    assert statuses("scenes-few", {"single": single, "aux-g-layer": [0.70, 0.72, 0.71],
                                   "aux-nas": [0.51, 0.50, 0.53]}) == ["missed", "missed"]
    errors = {"single": [30.0, 31.0, 32.0], "aux-g-layer": [30.0, 31.0, 32.0], "aux-nas": [25.0, 26.1, 26.9]}
    assert statuses("scenes-normals", errors) == ["met", "met"]  # lower is better
    assert statuses("scenes-few", {m: v[:1] for m, v in errors.items()}) == ["not measured"] * 2


def test_the_ablation_runs_each_configuration_once_and_every_baseline_it_needs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ablation

    from auxwrap.demo.experiments import FULL

    base = FULL["scenes-few"]
    rows, runs = ablation.plan(base, ablation.FACTORS)
    assert len(rows) == len(ablation.VARIANTS) and len(runs) == len(set(runs))
    assert sum(config == base for _, config in runs) == 3  # single, aux-g-layer and aux-nas, shared by all factors
    for _, _, _, config in rows:
        for baseline in ablation.BASELINES:
            assert (baseline, replace(base, protocol=config.protocol)) in runs
    rows, runs = ablation.plan(base, ["gate"])
    assert {m for m, _ in runs} == {"single", "aux-g-layer", "aux-nas"} and len(runs) == 4


def test_readme_results_section_is_up_to_date() -> None:
    """benchmarks/README.md's results section is what ``python benchmarks/readme.py`` makes of benchmarks/results
    (its default page), and every link of the page, generated or written, opens from benchmarks/."""
    if not (RESULTS / "flops.json").is_file():
        pytest.skip("no committed benchmark results")
    assert all(marker in BENCHMARKS_README.read_text() for marker in MARKERS)
    result = subprocess.run([sys.executable, str(BENCHMARKS / "readme.py"), "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Full report: [results/flops.md](results/flops.md)" in BENCHMARKS_README.read_text()
    assert not broken_links(BENCHMARKS_README), broken_links(BENCHMARKS_README)


def test_the_library_defaults_are_what_the_committed_ablation_supports() -> None:
    """Issue 12: the defaults come from the measured ablation, not from taste. Each factor keeps the ablation's base
    setting unless a variant beat it by more than the paired spread (mean over seeds of the per-seed difference
    larger than its std); then the default must be that variant."""
    from auxwrap.attach import DEFAULT_ALPHA_INIT
    from auxwrap.demo.experiments import FULL
    from auxwrap.fusion import DEFAULT_GATE
    from auxwrap.plan import DEFAULT_WINDOW_FORM
    from auxwrap.search import DEFAULT_DECAY, Search

    values = {  # ablation variant name -> the setting it stands for
        "protocol": {"pretrained": "pretrained", "scratch": "scratch"},
        "gate": {"sigmoid": "sigmoid", "clamp": "clamp"},
        "schedule": {"decay linear, ramp (0.5, 0.8)": ("linear", (0.5, 0.8)), "decay l1": ("l1", (0.5, 0.8)),
                     "ramp (0.2, 0.6)": ("linear", (0.2, 0.6))},
        "window": {"paper": "paper", "code": "code", "group": "group"},
        "alpha_init": {"(0.001, 0.5)": (0.001, 0.5), "(0.5, 0.5)": (0.5, 0.5)},
    }
    alpha = DEFAULT_ALPHA_INIT if isinstance(DEFAULT_ALPHA_INIT, tuple) else (DEFAULT_ALPHA_INIT,) * 2
    library = {"protocol": FULL["scenes-few"].protocol, "gate": DEFAULT_GATE,
               "schedule": (DEFAULT_DECAY, Search.__init__.__kwdefaults__["ramp"]), "window": DEFAULT_WINDOW_FORM,
               "alpha_init": alpha}
    scores: dict[tuple[str, str], dict[int, float]] = {}
    base: dict[str, str] = {}
    with (RESULTS / "ablation" / "ablation.csv").open() as f:
        for row in csv.DictReader(f):
            if row["method"] != "aux-nas":
                continue
            for variant in row["variants"].split("; "):
                factor, name = variant.split(": ", 1)
                scores.setdefault((factor, name), {})[int(row["seed"])] = float(row["accuracy"])
                if row["config"] == "base":
                    base[factor] = name
    assert set(base) == set(values)
    for factor, names in values.items():
        assert all(len(scores[factor, name]) >= 5 for name in names), factor  # every row 5 seeds at least
        supported = values[factor][base[factor]]
        gains = {}
        for name in names:
            deltas = [scores[factor, name][s] - scores[factor, base[factor]][s] for s in scores[factor, name]]
            mean, std = statistics.fmean(deltas), statistics.stdev(deltas)
            if mean > std:
                gains[name] = mean
        if gains:
            supported = values[factor][max(gains, key=gains.get)]
        assert library[factor] == supported, (factor, library[factor], supported)

