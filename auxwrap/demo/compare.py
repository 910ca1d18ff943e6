"""Comparing methods fairly: many trainings on worker processes, and their paired differences.

:func:`train_grid` trains and scores runs of :func:`auxwrap.demo.experiments.run` on a process pool; under the
"pretrained" protocol each single-task pretraining is done once and every run of that seed starts from it.
:func:`paired` is the comparison every report uses: the per-seed difference between two methods (the same seed
gives both the same primary init, pretrained weights and batch order), its mean and standard deviation over
seeds. ``python -m auxwrap demo``, ``benchmarks/accuracy.py`` and ``benchmarks/ablation.py`` share them.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import platform
import statistics
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import torch

from .experiments import (
    METHODS,
    Config,
    Task,
    make_task,
    pretrain,
    pretrained_parts,
    progress_bar,
    run,
    shared_config,
)

__all__ = ["METRICS", "PERCENT", "cpu_model", "fmt_delta", "fmt_metric", "format_table", "mean_std", "noise_words",
           "paired", "side_by_side", "train_grid", "training_machine"]

#: per task of :mod:`auxwrap.demo.experiments`: the metrics reported (the first one is the headline), and whether
#: lower is better
METRICS = {
    "digits": (("accuracy", False),),
    "scenes-seg": (("mIoU", False), ("pixel_acc", False)),
    "scenes-normals": (("mean_err", True), ("median_err", True), ("within_11.25", False)),
    "scenes-few": (("accuracy", False),),
}
PERCENT = {"accuracy", "mIoU", "pixel_acc", "within_11.25"}


def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny models: one thread per process beats several on a shared CPU


@functools.lru_cache(maxsize=8)
def _task_of(name: str, shared: Config) -> Task:
    return make_task(name, shared)


def _task(name: str, config: Config) -> Task:
    """The task of a run, built once per worker process for all the configs that share its data and models."""
    return _task_of(name, shared_config(config))


def _pretrain_one(name: str, config: Config, seed: int, part: str) -> dict:
    return pretrain(_task(name, config), config, seed, part)


def _train_one(name: str, method: str, seed: int, config: Config, pretrained: dict | None,
               history: bool = False) -> dict:
    """Train and score one (task, method, seed) in a worker; a flat row (with the gate history if asked)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Search's cut warning is reported in the row instead
        result = run(_task(name, config), method, seed, config, pretrained=pretrained)
    row = result.row()
    row["alpha_p_at_cut"] = "" if result.search is None else result.search.max_gate_at_cut
    if history and result.search is not None:
        row["history"] = result.search.history
    return row


def _pretraining(name: str, method: str, seed: int, config: Config) -> dict[tuple, tuple]:
    """The pretrained models a run starts from: {key: (task, config, seed, part)}, keyed as they are shared."""
    if config.protocol != "pretrained":
        return {}
    return {(name, shared_config(config), seed, part): (name, config, seed, part) for part in pretrained_parts(method)}


def train_grid(runs: Sequence[tuple[str, str, int, Config]], jobs: int, progress: bool = True,
               histories: bool = False) -> list[dict]:
    """Each run ``(task name, method, seed, Config)`` trained and scored on ``jobs`` worker processes (one torch
    thread each); one row per run (``Result.row()`` and ``alpha_p_at_cut``; with ``histories``, Aux-NAS rows also
    hold their :class:`~auxwrap.search.GateHistory` under ``"history"``), in the order given.

    Under the "pretrained" protocol the single-task models are pretrained first, each once per (task, shared
    config, seed, part) on the pool, and every run of that seed starts from the same weights; then the runs,
    the costliest methods first."""
    runs = [(t, m, s, replace(c, progress=False)) for t, m, s, c in runs]
    needed = {key: args for r in runs for key, args in _pretraining(*r).items()}
    states: dict[tuple, dict] = {}
    rows: dict[int, dict] = {}
    with ProcessPoolExecutor(max_workers=jobs, initializer=_one_thread, mp_context=_worker_context()) as pool, \
            _Closing(progress_bar(len(needed) + len(runs), "pretraining and runs", progress)) as bar:
        futures = {pool.submit(_pretrain_one, *args): key for key, args in needed.items()}
        for future in as_completed(futures):
            states[futures[future]] = future.result()
            bar.update()
        order = sorted(range(len(runs)), key=lambda i: -METHODS.index(runs[i][1]))
        futures = {}
        for i in order:
            parts = {key[-1]: states[key] for key in _pretraining(*runs[i])}
            futures[pool.submit(_train_one, *runs[i], parts or None, histories)] = i
        for future in as_completed(futures):
            rows[futures[future]] = row = future.result()
            bar.set_postfix(last=f"{row['task']} {row['label']} seed {row['seed']}: {row['seconds']} s")
            bar.update()
    return [rows[i] for i in range(len(runs))]


def _worker_context() -> multiprocessing.context.BaseContext:
    """How the workers start: from a fork server where the platform has one. A worker forked from this process
    after it ran a backward pass would fail ("Unable to handle autograd's threading in combination with
    fork-based multiprocessing"); the fork server is a fresh process, with torch preloaded so workers start fast."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "auxwrap.demo.experiments"])
    return context


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(rows: Sequence[Mapping], baseline: Sequence[Mapping], metric: str) -> tuple[float, float, int] | None:
    """The per-seed differences ``row - baseline`` on ``metric`` (the same seed gives both the same primary init
    and batch order): mean, std over seeds and their number; None without a common seed."""
    base = {r["seed"]: float(r[metric]) for r in baseline}
    deltas = [float(r[metric]) - base[r["seed"]] for r in rows if r["seed"] in base]
    return (*mean_std(deltas), len(deltas)) if deltas else None


def fmt_metric(metric: str, mean: float, std: float, signed: bool = False) -> str:
    """``mean ± std`` in the metric's unit: percent for accuracies and IoUs, degrees for angle errors."""
    scale, unit = (100, "") if metric in PERCENT else (1, "°")
    return f"{scale * mean:{'+' if signed else ''}.2f} ± {scale * std:.2f}{unit}"


def noise_words(delta: tuple[float, float, int]) -> str:
    """How a paired difference stands against its spread: "within noise" (|mean| <= std), "more than 2
    sigma" (|mean| > 2 std), else "between 1 and 2 sigma"; "one seed" when there is no spread to compare with."""
    mean, std, n = delta
    if n < 2:
        return "one seed"
    if abs(mean) <= std:
        return "within noise"
    return "more than 2 sigma" if abs(mean) > 2 * std else "between 1 and 2 sigma"


def fmt_delta(metric: str, delta: tuple[float, float, int] | None) -> str:
    """A paired difference, marked "within noise" where its mean is no larger than its std over seeds."""
    if delta is None:
        return ""
    mean, std, n = delta
    noise = " (within noise)" if noise_words(delta) == "within noise" else ""
    return fmt_metric(metric, mean, std, signed=True) + noise


def side_by_side(rows: Sequence[Mapping], metric: str, methods: Sequence[str]) -> str:
    """Deployed models side by side (``metric`` mean ± std over seeds, cost), then each paired difference in words:
    every method against the first (Single), and the last against the one before it (Aux-NAS against Aux-G)."""
    by_method = {m: [r for r in rows if r["method"] == m] for m in methods}
    base = by_method[methods[0]]
    points = " points" if metric in PERCENT else ""  # fmt_metric writes the degrees of angle errors itself
    name = base[0]["label"]
    table = [("method", f"test {metric}{' (%)' if metric in PERCENT else ''}", f"vs {name} (paired)", "deployed MFLOPs",
              "params", f"FLOPs / {name}")]
    for method, runs in by_method.items():
        delta = paired(runs, base, metric) if method != methods[0] else None
        table.append((runs[0]["label"], fmt_metric(metric, *mean_std([r[metric] for r in runs])),
                      fmt_delta(metric, delta), f"{runs[0]['flops'] / 1e6:.3f}", f"{runs[0]['params']:,}",
                      f"{runs[0]['flops'] / base[0]['flops']:.3f}"))
    seeds = len({r["seed"] for r in rows})
    lines = [format_table(table), "", f"Paired over {seeds} seeds (a seed gives every method the same initial weights "
                                      "and batch order, and the same pretrained weights where there are any):"]
    pairs = [(m, methods[0]) for m in methods[1:]] + [(methods[-1], methods[-2])] * (len(methods) > 2)
    for method, baseline in pairs:
        delta = paired(by_method[method], by_method[baseline], metric)
        lines.append(f"- {by_method[method][0]['label']} vs {by_method[baseline][0]['label']}: "
                     f"{fmt_metric(metric, delta[0], delta[1], signed=True)}{points}; {_PLAIN[noise_words(delta)]}")
    lines.append("Every deployed model is the primary alone: the same FLOPs and parameters as Single.")
    return "\n".join(lines)


def format_table(rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Rows as aligned, left-justified text columns."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join((indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))).rstrip()
                     for row in rows)


_PLAIN = {"within noise": "within noise: these seeds cannot tell the two apart",
          "between 1 and 2 sigma": "larger than the seed-to-seed spread, but less than twice it: a weak signal",
          "more than 2 sigma": "more than twice the seed-to-seed spread",
          "one seed": "one seed only: no spread to judge it by"}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def training_machine() -> str:
    """The machine and versions line of the training reports (the demo's and the benchmarks')."""
    import timm

    from .. import __version__

    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, auxwrap {__version__}")


class _Closing:
    """A progress bar as a context manager that closes it."""

    def __init__(self, bar: object):
        self.bar = bar

    def __enter__(self) -> object:
        return self.bar

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
