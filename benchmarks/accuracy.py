"""Accuracy of the deployed primary: Single, Aux-Head, Aux-Module, Aux-G-Stage, Aux-G-Layer, Aux-NAS, Aux-NAS + MTO,
and Aux-G-Layer and Aux-NAS with low-rank fusions (``fusion_rank``, C/4), each paired with its full-rank run.

Every method trains the same built-in model with the same optimiser and number of weight steps, under the
protocol of the task's FULL config (the paper's: both single-task models pretrained first, every method of a
seed starting from the same weights; see :mod:`auxwrap.demo.experiments`), is pruned to the primary alone and scored
on the test split; mean +- std over seeds, the paired differences to Single and to Aux-G-Layer, deployed FLOPs
and parameters beside it, and the issue's two targets per task. Writes accuracy.csv (one row per run),
accuracy.md (the summary, machine, versions, command) and accuracy.png to ``--out`` (default: benchmarks/results,
or a temporary folder with ``--quick``)::

    python benchmarks/accuracy.py                       # the full run (about 25 minutes on 2 CPU cores)
    python benchmarks/accuracy.py --quick --seeds 1     # a tiny run, seconds
    python benchmarks/accuracy.py --task scenes-few --seeds 5 --jobs 4

Text below the line ``<!-- notes -->`` of an existing accuracy.md is kept when it is rewritten.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import common
from common import METRICS, PERCENT, fmt_delta, fmt_metric, mean_std, paired

from auxwrap.demo.experiments import (
    FULL,
    METHODS,
    QUICK,
    RANK_SUFFIX,
    TASKS,
    Config,
    method_label,
    pretrain_epochs,
)

NOTES = "<!-- notes -->"
BASELINES = ("single", "aux-g-layer")  # the paired differences of the tables and the targets


def run_grid(tasks: Sequence[str], seeds: int, configs: dict[str, Config], jobs: int,
             methods: Sequence[str] = METHODS) -> list[dict]:
    """Every (task, method, seed) on ``jobs`` processes (:func:`common.train_grid`); rows in grid order."""
    return common.train_grid([(t, m, s, configs[t]) for t in tasks for m in methods for s in range(seeds)], jobs)


# ---------------------------------------------------------------------------------------------- writing

def summarise(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (task, method): mean and std of each metric over seeds, the per-seed differences to Single and to
    Aux-G-Layer on the headline metric (paired: the same seed gives every method the same primary init, the
    same pretrained weights and the same batch order), and the deployed cost."""
    summary = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        headline = METRICS[task][0][0]
        by_method = {m: [r for r in rows if r["task"] == task and r["method"] == m] for m in METHODS}
        for method, runs in by_method.items():
            if not runs:
                continue
            summary[task, method] = {
                "label": runs[0]["label"], "n": len(runs),
                "stats": {m: mean_std([r[m] for r in runs]) for m, _ in METRICS[task]},
                "delta": {b: paired(runs, by_method[b], headline) if method != b else None for b in BASELINES},
                "full_rank": _full_rank_delta(method, runs, by_method, headline),
                "flops": {r["flops"] for r in runs}, "params": {r["params"] for r in runs},
                "seconds": statistics.fmean(r["seconds"] for r in runs)}
    return summary


def _full_rank_delta(method: str, runs: list[dict], by_method: dict[str, list[dict]],
                     headline: str) -> tuple[float, float, int] | None:
    """A low-rank method's per-seed differences to the same method at full rank (None for the others)."""
    if not method.endswith(RANK_SUFFIX):
        return None
    full = by_method.get(method.removesuffix(RANK_SUFFIX))
    return paired(runs, full, headline) if full else None


def markdown_table(task: str, summary: dict) -> str:
    metrics = METRICS[task]
    name = metrics[0][0]
    head = ["method", *(f"{m} ({'↓' if low else '↑'})" for m, low in metrics),
            *(f"Δ {name} vs {method_label(b)}, paired" for b in BASELINES),
            f"Δ {name} vs full rank, paired", "deployed MFLOPs", "params", "FLOPs / Single", "train s/run"]
    body = []
    base_flops = next(iter(summary[task, "single"]["flops"]))
    for method in METHODS:
        entry = summary.get((task, method))
        if entry is None:
            continue
        flops = ", ".join(f"{f / 1e6:.3f}" for f in sorted(entry["flops"]))
        ratio = ", ".join(f"{f / base_flops:.3f}" for f in sorted(entry["flops"]))
        params = ", ".join(f"{p:,}" for p in sorted(entry["params"]))
        body.append([entry["label"], *(fmt_metric(m, *entry["stats"][m]) for m, _ in metrics),
                     *(fmt_delta(name, entry["delta"][b]) for b in BASELINES),
                     fmt_delta(name, entry["full_rank"]), flops, params, ratio,
                     f"{entry['seconds']:.0f}"])
    return common.markdown_table(head, body)


def targets(task: str, summary: dict) -> list[common.Target]:
    """The issue's two targets for Aux-NAS on the headline metric, from the paired differences (σ: their std
    over seeds): (a) no worse than Aux-G-Layer by more than 1 σ, (b) better than Single by more than 2 σ."""
    name, lower = METRICS[task][0]
    nas = summary.get((task, "aux-nas"))
    found = []
    for baseline, threshold, sigmas in (("aux-g-layer", "Δ ≥ −1 σ (no worse by more than 1 σ)", -1.0),
                                        ("single", "Δ > 2 σ (better by more than 2 σ)", 2.0)):
        what = f"{task}: Aux-NAS vs {method_label(baseline)}"
        delta = None if nas is None else nas["delta"][baseline]
        if delta is None or delta[2] < 2:
            found.append(common.Target(what, threshold, "-", common.NOT_MEASURED, "needs 2 or more paired seeds"))
            continue
        mean, std, n = delta
        better = -mean if lower else mean  # Δ oriented so that positive is better
        met = better >= sigmas * std if sigmas < 0 else better > sigmas * std
        ratio = f"{better / std:+.1f} σ" if std > 0 else "σ = 0"
        found.append(common.Target(what, threshold, f"{fmt_metric(name, mean, std, signed=True)} ({ratio})",
                                   common.MET if met else common.MISSED, f"{n} seeds, {name}"
                                   f"{', lower is better' if lower else ''}"))
    return found


def write_markdown(rows: list[dict], configs: dict[str, Config], args: argparse.Namespace, wall: float,
                   loads: tuple, path: Path) -> None:
    summary = summarise(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    seeds = len({r["seed"] for r in rows})
    kept = ""
    if path.exists() and NOTES in (old := path.read_text()):
        kept = old.split(NOTES, 1)[1].strip("\n")
    parts = [
        "# Accuracy of the deployed primary",
        "",
        *common.produced_by(args.command, wall, args.jobs, loads),
        "",
        f"Mean ± std over {seeds} seed(s) (seeds 0..{seeds - 1}: model init, pretraining and batch order; data "
        "fixed) of the primary metric of the **deployed** model (`auxwrap.prune(net)`, or the primary's model "
        "traced and BatchNorm-folded for Single / Aux-Head) on the test split, at the epoch with the best "
        "validation score (Aux-NAS: among epochs after the α^P cut). FLOPs: one sample, `auxwrap.count_flops`. "
        "Δ: the mean ± std over seeds of the per-seed difference to Single or to Aux-G-Layer (the same seed gives "
        "every method the same primary init, pretrained weights and batch order), \"within noise\" where its mean "
        "is no larger than its std; \"vs full rank\": a low-rank method (`attach(..., fusion_rank=...)`) against "
        "the same method at full rank, which it should match within noise to be worth offering. Raw rows: "
        "`accuracy.csv`; plot: `accuracy.png`.",
        "",
        "Protocol (DESIGN.md §8): under \"pretrained\" (the paper's) the primary's model and the auxiliary model "
        "are first trained alone (the Single recipe), every method of a seed starts from those weights (parts "
        "without a single-task model, Aux-Head's head and the Aux-Module, start fresh) and trains the epochs "
        "below; Single is the pretrained primary trained as long again alone, so every deployed primary made the "
        "same total number of weight steps. Fairness: every method makes the same number of weight steps with "
        "the same optimiser (SGD, momentum 0.9, weight decay 5e-4, cosine schedule), batch size and primary "
        "model init; Aux-NAS takes one batch from each half of `auxwrap.search_loaders` per step (gates, then "
        "weights), cycling the halves twice per epoch, so its weights see as many samples as every other "
        "method's (its gates take as many steps again). Auxiliary loss weight 1.",
        "",
        "Targets (issue 12), per task, on the headline metric, σ = the std over seeds of the per-seed "
        "differences: (a) Aux-NAS no worse than Aux-G-Layer by more than 1 σ; (b) Aux-NAS better than Single by "
        "more than 2 σ.",
        "",
    ]
    for task in tasks:
        config = configs[task]
        parts += [f"## {task}", "", _task_text(task, config), "", markdown_table(task, summary), "",
                  common.targets_markdown(targets(task, summary)), ""]
    parts += [NOTES, "", kept or "(notes on the results go here; kept when the tables are regenerated)", ""]
    path.write_text("\n".join(parts))


def _task_text(task: str, config: Config) -> str:
    what = {
        "digits": "digit pairs (1x16x16), primary: the left digit (10 classes), auxiliary: the right digit; "
                  "`DigitNet`, a 3-stage ResNet",
        "scenes-seg": f"rendered scenes (3x{config.size}x{config.size}), primary: 5-class segmentation, auxiliary: "
                      "surface normals; `SceneNet`, a 3-stage encoder + 2-block decoder",
        "scenes-normals": f"rendered scenes (3x{config.size}x{config.size}), primary: surface normals, auxiliary: "
                          "5-class segmentation; `SceneNet`, a 3-stage encoder + 2-block decoder",
        "scenes-few": f"few labelled rendered scenes (3x{config.size}x{config.size}), primary: the dominant object "
                      "class (sphere, box or cylinder: the one covering the most pixels), auxiliary: surface normals; "
                      "primary `SceneClassNet` (a 3-stage ResNet classifier), auxiliary `SceneNet` (an "
                      "encoder-decoder): different architectures",
    }[task]
    per_epoch = config.n_train // config.batch_size
    steps = config.epochs * per_epoch
    pretraining = (f"protocol \"pretrained\": {pretrain_epochs(config)} epochs = {pretrain_epochs(config) * per_epoch} "
                   "steps of each single-task model, then " if config.protocol == "pretrained"
                   else "protocol \"scratch\": ")
    fields = {k: v for k, v in asdict(config).items() if k != "progress" and (k != "size" or task != "digits")}
    return (f"{what}. {config.n_train} train / {config.n_val} val / {config.n_test} test; {pretraining}"
            f"{config.epochs} epochs = {steps} weight steps of {config.batch_size}. Config: `{fields}`.")


def plot(rows: list[dict], path: Path) -> None:
    """One panel per task: the headline metric per method, mean with std error bars, Single dashed."""
    from matplotlib.figure import Figure

    summary = summarise(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = Figure(figsize=(5.0 * len(tasks), 4.2), layout="constrained")
    for ax, task in zip(fig.subplots(1, len(tasks), squeeze=False)[0], tasks, strict=True):
        name, lower = METRICS[task][0]
        scale = 100 if name in PERCENT else 1
        entries = [summary[task, m] for m in METHODS if (task, m) in summary]
        means = [scale * e["stats"][name][0] for e in entries]
        stds = [scale * e["stats"][name][1] for e in entries]
        colors = ["tab:gray", "tab:olive", "tab:cyan", "tab:blue", "tab:orange", "tab:red"][:len(entries)]
        ax.bar(range(len(entries)), means, yerr=stds, capsize=4, color=colors)
        ax.axhline(means[0], color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(entries)), [e["label"] for e in entries], rotation=30, ha="right")
        low, high = min(m - s for m, s in zip(means, stds, strict=True)), max(m + s for m, s in
                                                                             zip(means, stds, strict=True))
        pad = max(high - low, 1e-3) * 0.5
        ax.set_ylim(low - pad, high + pad)
        ax.set_title(f"{task}: {name} ({'lower' if lower else 'higher'} is better)")
        ax.set_ylabel(f"{name}{' (%)' if name in PERCENT else ' (degrees)'}, deployed, test")
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=(*TASKS, "all"), default="all")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per method (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny models and data: checks that everything runs")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--mto", default="pcgrad-aux", help="the auxwrap.mto method of Aux-NAS + MTO")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                        help=f"the methods to train, in table order (default: all of {', '.join(METHODS)}); "
                             f"{' and '.join(BASELINES)} are always trained: the paired differences need them")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {common.RESULTS.relative_to(common.ROOT)} for full runs, "
                             f"{common.QUICK_RESULTS} with --quick, so a quick run never overwrites the results)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    args.command = "python " + shlex.join(["benchmarks/accuracy.py", *(sys.argv[1:] if argv is None else argv)])
    tasks = TASKS if args.task == "all" else (args.task,)
    methods = [m for m in METHODS if m in {*BASELINES, *args.methods}]
    configs = {t: replace((QUICK if args.quick else FULL)[t], mto=args.mto) for t in tasks}
    labels = ", ".join(method_label(m, configs[tasks[0]]) for m in methods)
    print(f"{args.command}: {len(tasks)} task(s) x {len(methods)} methods ({labels}) x {args.seeds} seed(s)")
    args.out = common.out_dir(args)
    loads, start = [os.getloadavg()[0]], time.perf_counter()
    rows = run_grid(tasks, args.seeds, configs, args.jobs, methods)
    wall = time.perf_counter() - start
    loads.append(os.getloadavg()[0])
    common.write_csv(args.out / "accuracy.csv", common.columns_of(rows), rows, fill="")
    write_markdown(rows, configs, args, wall, tuple(loads), args.out / "accuracy.md")
    plot(rows, args.out / "accuracy.png")
    summary = summarise(rows)
    for task in tasks:
        print(f"\n{task}\n{markdown_table(task, summary)}\n\n{common.targets_markdown(targets(task, summary))}")
    print(f"\nwrote {args.out / 'accuracy.md'}, accuracy.csv, accuracy.png in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
