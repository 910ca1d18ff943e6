"""The training harness of the demo and the accuracy benchmark: every method on a tiny configuration."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import auxwrap
from auxwrap.experiments import METHODS, Config, DigitNet, SceneNet, make_task, run

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
    assert {m: r.gate_steps for m, r in digits.items() if r.gate_steps} == {"aux-nas": steps, "aux-nas+mto": steps}


def test_aux_nas_is_cut_before_its_state_is_kept(digits):
    for method in ("aux-nas", "aux-nas+mto"):
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
            "within_11.25", "val", "best_epoch", "flops", "params", "weight_steps", "gate_steps"} <= columns
    assert len(rows) == 3 * len(METHODS) * 2
    for task in ("digits", "scenes-seg", "scenes-normals"):
        single = {r["flops"] for r in rows if r["task"] == task and r["method"] == "single"}
        assert len(single) == 1
        assert {r["flops"] for r in rows if r["task"] == task} == single, task
        assert len({r["weight_steps"] for r in rows if r["task"] == task}) == 1
    report = (tmp_path / "accuracy.md").read_text()
    assert "python benchmarks/accuracy.py --quick" in report and "torch " in report
    assert (tmp_path / "accuracy.png").stat().st_size > 0
