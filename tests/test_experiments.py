"""The training harness of the demo and the accuracy benchmark: every method on a tiny configuration."""

import collections
import csv
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import auxwrap
from auxwrap.demo import data, experiments
from auxwrap.demo.experiments import METHODS, Config, DigitNet, SceneClassNet, SceneNet, make_task, pretrain, run

ROOT = Path(__file__).resolve().parents[1]
TINY = Config(width=4, blocks=1, epochs=2, batch_size=16, n_train=64, n_val=32, n_test=32, size=32, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: see conftest.one_thread."""


@pytest.fixture(scope="module")
def digits():
    task = make_task("digits", TINY)
    return {method: run(task, method, seed=0, config=TINY) for method in METHODS}


def test_every_method_deploys_the_primary_at_single_task_cost(digits):
    single = digits["single"]
    for method, result in digits.items():
        assert result.flops == single.flops and result.params == single.params, method
        assert set(result.metrics) == {"accuracy"} and 0.0 <= result.metrics["accuracy"] <= 1.0
        assert isinstance(result.deployed, torch.fx.GraphModule) and not result.deployed.training


def test_every_method_makes_the_same_number_of_weight_steps(digits):
    steps = TINY.epochs * (TINY.n_train // TINY.batch_size)
    assert {r.weight_steps for r in digits.values()} == {steps}
    assert {m: r.gate_steps for m, r in digits.items() if r.gate_steps} == {"aux-nas": steps, "aux-nas-rank": steps,
                                                                            "aux-nas+mto": steps}


def test_aux_nas_is_cut_before_its_state_is_kept(digits):
    for method in ("aux-nas", "aux-nas-rank", "aux-nas+mto"):
        result = digits[method]
        assert result.search.is_cut and result.search.steps_done == result.gate_steps
        assert result.best_epoch >= TINY.epochs * 0.8  # only states after the cut are eligible
        assert result.search.summary().max_to_primary == 0.0


def test_aux_module_trains_the_primary_with_its_loss_and_leaves_nothing_behind(digits):
    """Same seed, same batches as Single: only the auxiliary module's gradients can make them differ."""
    single, module = (digits[m].deployed.state_dict() for m in ("single", "aux-module"))
    assert single.keys() == module.keys()
    assert any(not torch.equal(single[k], module[k]) for k in single if single[k].is_floating_point())


def test_the_same_seed_gives_the_same_result():
    task = make_task("digits", TINY)
    first, second = (run(task, "aux-g-stage", seed=3, config=TINY) for _ in range(2))
    assert first.metrics == second.metrics and first.val == second.val


@pytest.mark.filterwarnings("ignore:auxwrap.Search cut")  # two steps: the gates are cut before they can shrink
@pytest.mark.parametrize("name, metrics", [("scenes-seg", {"mIoU", "pixel_acc"}),
                                           ("scenes-normals", {"mean_err", "median_err", "within_11.25"})])
def test_scene_tasks_train_dense_models_with_the_other_task_as_auxiliary(name, metrics):
    config = Config(width=4, blocks=1, epochs=1, batch_size=8, n_train=16, n_val=8, n_test=8, size=32,
                    progress=False)
    task = make_task(name, config)
    x, y, y_aux = task.train[0]
    assert x.shape == (3, 32, 32) and (y.dtype == torch.long) == (name == "scenes-seg")
    assert (y_aux.dtype == torch.long) == (name == "scenes-normals")
    results = [run(task, method, seed=0, config=config) for method in ("single", "aux-head", "aux-module", "aux-nas")]
    assert {r.flops for r in results} == {results[0].flops}
    assert all(set(r.metrics) == metrics for r in results)


def test_scenes_few_labels_are_the_object_class_covering_the_most_pixels():
    config = Config(width=4, blocks=1, n_train=6, n_val=6, n_test=6, size=32)
    task = make_task("scenes-few", config)
    rendered = data.scenes(6, 32, seed=0, split="val")
    x, labels, normals = task.val.tensors
    assert torch.equal(x, rendered.rendered.rgb) and torch.equal(normals, rendered.rendered.normals)
    for seg, label in zip(rendered.rendered.segmentation, labels.tolist(), strict=True):
        pixels = collections.Counter(seg.flatten().tolist())  # a hand count of every class's pixels
        counts = [pixels[data.SPHERE], pixels[data.BOX], pixels[data.CYLINDER]]
        assert max(counts) > 0 and counts[label] == max(counts)
        assert label == counts.index(max(counts))  # a tie would go to the first
    assert set(torch.cat([task.train.tensors[1], labels, task.test.tensors[1]]).tolist()) <= {0, 1, 2}


@pytest.mark.filterwarnings("ignore:auxwrap.Search cut")
def test_scenes_few_fuses_a_classifier_with_an_encoder_decoder():
    config = Config(width=4, blocks=1, epochs=1, batch_size=8, n_train=16, n_val=8, n_test=8, size=32,
                    protocol="pretrained", pretrain_epochs=1, progress=False)
    task = make_task("scenes-few", config)
    primary, aux = task.build(False), task.build(True)
    assert isinstance(primary, SceneClassNet) and isinstance(aux, SceneNet)
    x = task.train[0][0][None].repeat(2, 1, 1, 1)
    assert primary(x).shape == (2, 3) and aux(x).shape == (2, 3, 32, 32) == task.head()(primary.encoder(x)).shape
    results = [run(task, method, seed=0, config=config) for method in ("single", "aux-head", "aux-module",
                                                                       "aux-g-layer", "aux-nas")]
    assert {r.flops for r in results} == {results[0].flops} and {r.params for r in results} == {results[0].params}
    assert all(set(r.metrics) == {"accuracy"} for r in results)


PRETRAINED = replace(TINY, protocol="pretrained", pretrain_epochs=2)


@pytest.fixture(scope="module")
def pretrained_runs():
    """single, aux-head, aux-g-layer and aux-nas of one seed under "pretrained", in a fresh pretraining cache:
    their results, the primary's (and aux model's) state right after set-up, and every pretraining call."""
    calls, starts = [], {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiments, "_PRETRAINED", {})
        real_pretrain, real_network = experiments._pretrain, experiments._network

        def counting(task, config, seed, part):
            calls.append((config, seed, part))
            return real_pretrain(task, config, seed, part)

        def recording(method, task, config, states=None):
            setup = real_network(method, task, config, states)
            starts[method] = {k: v.clone() for k, v in setup.net.state_dict().items()}
            starts[method, "primary"] = {k: v.clone() for k, v in setup.primary.state_dict().items()}
            return setup

        patch.setattr(experiments, "_pretrain", counting)
        patch.setattr(experiments, "_network", recording)
        task = make_task("digits", PRETRAINED)
        results = {m: run(task, m, seed=1, config=PRETRAINED) for m in ("single", "aux-head", "aux-g-layer")}
        other = replace(PRETRAINED, epochs=3, alpha_init=(0.001, 0.5), ramp=(0.2, 0.6))  # method-only changes
        results["aux-nas"] = run(task, "aux-nas", seed=1, config=other)
        yield task, results, starts, calls


def test_pretrained_methods_of_a_seed_start_from_the_same_pretrained_weights(pretrained_runs):
    task, results, starts, _ = pretrained_runs
    primary = pretrain(task, PRETRAINED, seed=1, part="primary")  # trained again here: the same weights
    torch.manual_seed(1)
    fresh = task.build(False).state_dict()
    assert any(not torch.equal(primary[k], fresh[k]) for k in primary if primary[k].is_floating_point())
    for method in results:
        state = starts[method, "primary"]
        assert state.keys() == primary.keys() and all(torch.equal(state[k], primary[k]) for k in state), method
    aux = pretrain(task, PRETRAINED, seed=1, part="aux")
    fused = starts["aux-g-layer"]
    aux_keys = [k for k in fused if k.startswith("aux.0.")]
    assert len(aux_keys) == len(aux) and all(torch.equal(fused[k], aux[k.removeprefix("aux.0.")]) for k in aux_keys)


def test_single_makes_as_many_primary_steps_as_every_method_under_pretrained(pretrained_runs):
    _, results, _, _ = pretrained_runs
    per_epoch = PRETRAINED.n_train // PRETRAINED.batch_size
    assert {r.pretrain_steps for r in results.values()} == {2 * per_epoch}
    assert {r.pretrain_steps + r.weight_steps for m, r in results.items() if m != "aux-nas"} == {4 * per_epoch}
    assert results["aux-nas"].weight_steps == 3 * per_epoch  # its config asked for 3 epochs after pretraining
    assert {r.row()["protocol"] for r in results.values()} == {"pretrained"}
    assert run("digits", "single", seed=0, config=TINY).row()["pretrain_steps"] == 0  # "scratch"


def test_pretraining_is_cached_across_methods_and_method_only_options(pretrained_runs):
    _, _, _, calls = pretrained_runs
    assert [(seed, part) for _, seed, part in calls] == [(1, "primary"), (1, "aux")]  # once each, 4 methods


def test_pretrained_weights_made_elsewhere_are_used_as_given():
    task = make_task("digits", PRETRAINED)
    states = {"primary": pretrain(task, PRETRAINED, seed=2, part="primary")}
    first = run(task, "single", seed=2, config=PRETRAINED, pretrained=states)
    assert first.metrics == run(task, "single", seed=2, config=PRETRAINED).metrics
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=r"lacks \['aux'\]"):
        run(task, "aux-g-layer", seed=2, config=PRETRAINED, pretrained=states)
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="protocol='scratch'"):
        run(task, "single", seed=2, config=TINY, pretrained=states)


def test_built_in_models_have_stages_and_blocks_to_fuse():
    digits = auxwrap.trace(DigitNet(10, width=4))
    x = torch.randn(2, 1, 16, 16)
    assert len(auxwrap.find_taps(digits, (x,), "layer")) == 7  # the stem unit and 6 blocks
    assert len(auxwrap.find_taps(digits, (x,), "stage")) == 3
    scenes = auxwrap.trace(SceneNet(5, width=4))
    x = torch.randn(2, 3, 64, 64)
    assert SceneNet(5, width=4)(x).shape == (2, 5, 64, 64)
    names = [t.name for t in auxwrap.find_taps(scenes, (x,), "stage")]
    assert names == ["encoder.stages.0.1", "encoder.stages.1.1", "encoder.stages.2.1", "head.up2", "head.up1"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="nope", method="single"), "task='nope'"),
    (dict(task="digits", method="nope"), "method='nope'"),
    (dict(task="digits", method="single", config=Config(epochs=0)), "Config.epochs=0"),
    (dict(task="digits", method="aux-nas+mto", config=Config(mto="nope")), "Config.mto='nope'"),
    (dict(task="digits", method="single", config=Config(protocol="nope")), "Config.protocol='nope'"),
    (dict(task="digits", method="single", config=Config(pretrain_epochs=0)), "Config.pretrain_epochs=0"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=match):
        run(**kwargs)


@pytest.mark.parametrize("method, match", [("single", r"larger than the 40 training samples"),
                                           ("aux-nas", r"larger than the smaller half \(20\) of the 40")])
def test_a_batch_larger_than_what_a_method_draws_from_is_refused_before_training(method, match):
    """Aux-NAS draws each batch from one half: a batch of 32 from 40 samples would never come (it hung)."""
    config = Config(width=4, blocks=1, epochs=1, batch_size=32 if method == "aux-nas" else 64, n_train=40,
                    n_val=8, n_test=8, progress=False)
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=match):
        run(make_task("digits", config), method, config=config)


@pytest.mark.slow
def test_accuracy_benchmark_quick_writes_results_at_single_task_cost(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--quick", "--seeds", "2", "--jobs", "2",
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "accuracy.csv").open() as file:
        rows = list(csv.DictReader(file))
    columns = set(rows[0])
    assert {"task", "method", "label", "seed", "accuracy", "mIoU", "pixel_acc", "mean_err", "median_err",
            "within_11.25", "val", "best_epoch", "flops", "params", "protocol", "pretrain_steps", "weight_steps",
            "gate_steps"} <= columns
    assert len(rows) == len(experiments.TASKS) * len(METHODS) * 2
    for task in experiments.TASKS:
        single = {r["flops"] for r in rows if r["task"] == task and r["method"] == "single"}
        assert len(single) == 1
        assert {r["flops"] for r in rows if r["task"] == task} == single, task
        assert len({(r["pretrain_steps"], r["weight_steps"]) for r in rows if r["task"] == task}) == 1
        assert {r["protocol"] for r in rows if r["task"] == task} == {experiments.QUICK[task].protocol}
    report = (tmp_path / "accuracy.md").read_text()
    assert "python benchmarks/accuracy.py --quick" in report and "torch " in report
    assert "## scenes-few" in report and "Δ accuracy vs Aux-G-Layer, paired" in report
    assert report.count("Aux-NAS vs Single | Δ > 2 σ") == len(experiments.TASKS)
    assert (tmp_path / "accuracy.png").stat().st_size > 0


@pytest.mark.slow
def test_ablation_benchmark_quick_compares_each_variant_with_its_baselines(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/ablation.py", "--quick", "--seeds", "2", "--out",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "ablation.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert {r["task"] for r in rows} == {"scenes-few"} and {r["seed"] for r in rows} == {"0", "1"}
    assert {r["protocol"] for r in rows} == {"scratch", "pretrained"}
    runs = [(r["method"], r["config"]) for r in rows]
    assert len(runs) == len(set(runs)) * 2  # every distinct run once per seed: the base rows are shared
    assert {r["config"] for r in rows if r["method"] == "single"} == {"base", "protocol=scratch"}
    report = (tmp_path / "ablation.md").read_text()
    assert "python benchmarks/ablation.py --quick" in report and "torch " in report
    for factor in ("protocol", "gate", "schedule", "window", "alpha_init"):
        assert f"## {factor}" in report
