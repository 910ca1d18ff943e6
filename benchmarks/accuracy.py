"""Accuracy of the deployed primary: Single, Aux-Head, Aux-Module, Aux-G-Stage, Aux-G-Layer, Aux-NAS, Aux-NAS + MTO.

Every method trains the same built-in model (random init) with the same optimiser and number of weight
steps (see :mod:`auxwrap.experiments`), is pruned to the primary alone and scored on the test split;
mean +- std over seeds, deployed FLOPs and parameters beside it. Writes accuracy.csv (one row per run),
accuracy.md (the summary, machine, versions, command) and accuracy.png to ``--out`` (default: benchmarks/results,
or a temporary folder with ``--quick``)::

    python benchmarks/accuracy.py                       # the full run (7-12 minutes on 2 CPU cores)
    python benchmarks/accuracy.py --quick --seeds 1     # a tiny run, seconds
    python benchmarks/accuracy.py --task scenes-seg --seeds 5 --jobs 4

Text below the line ``<!-- notes -->`` of an existing accuracy.md is kept when it is rewritten.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path

import common
import torch

import auxwrap
from auxwrap.experiments import FULL, METHODS, QUICK, TASKS, Config, make_task, method_label, run

NOTES = "<!-- notes -->"

#: per task: the metrics reported (the first one is the headline, plotted), and whether lower is better
METRICS = {
    "digits": (("accuracy", False),),
    "scenes-seg": (("mIoU", False), ("pixel_acc", False)),
    "scenes-normals": (("mean_err", True), ("median_err", True), ("within_11.25", False)),
}
PERCENT = {"accuracy", "mIoU", "pixel_acc", "within_11.25"}


# ---------------------------------------------------------------------------------------------- running

@lru_cache(maxsize=3)
def _task(name: str, config: Config):  # noqa: ANN202 - a Task, built once per worker process
    return make_task(name, config)


def _init_worker() -> None:
    torch.set_num_threads(1)  # tiny models: one thread per process beats several on a shared CPU


def _one(name: str, method: str, seed: int, config: Config) -> dict:
    """Train and score one (task, method, seed) in a worker; a flat row."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Search's cut warning is reported in the row instead
        result = run(_task(name, config), method, seed, config)
    row = result.row()
    row["alpha_p_at_cut"] = "" if result.search is None else result.search.max_gate_at_cut
    return row


def run_grid(tasks: Sequence[str], seeds: int, configs: dict[str, Config], jobs: int) -> list[dict]:
    """Every (task, method, seed), the costliest first, on ``jobs`` processes; rows in grid order."""
    from tqdm.auto import tqdm

    grid = [(t, m, s) for t in tasks for m in METHODS for s in range(seeds)]
    order = sorted(grid, key=lambda g: -METHODS.index(g[1]))
    rows: dict[tuple, dict] = {}
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker) as pool:
        futures = {pool.submit(_one, t, m, s, replace(configs[t], progress=False)): (t, m, s) for t, m, s in order}
        with tqdm(total=len(futures), desc="runs", dynamic_ncols=True) as bar:
            for future in as_completed(futures):
                rows[futures[future]] = row = future.result()
                bar.set_postfix_str(f"{row['task']} {row['label']} seed {row['seed']}: {row['seconds']} s")
                bar.update()
    return [rows[g] for g in grid]


# ---------------------------------------------------------------------------------------------- writing

def _columns(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=_columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (task, method): mean and std of each metric over seeds, of the per-seed difference to Single on
    the headline metric (paired: the same seed gives every method the same primary init and batch order),
    and the deployed cost."""
    summary = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        headline = METRICS[task][0][0]
        single = {r["seed"]: r[headline] for r in rows if r["task"] == task and r["method"] == "single"}
        for method in METHODS:
            runs = [r for r in rows if r["task"] == task and r["method"] == method]
            if not runs:
                continue
            summary[task, method] = {
                "label": runs[0]["label"], "n": len(runs),
                "stats": {m: _mean_std([r[m] for r in runs]) for m, _ in METRICS[task]},
                "delta": _mean_std([r[headline] - single[r["seed"]] for r in runs if r["seed"] in single] or [0.0]),
                "flops": {r["flops"] for r in runs}, "params": {r["params"] for r in runs},
                "seconds": statistics.fmean(r["seconds"] for r in runs)}
    return summary


def _fmt(metric: str, mean: float, std: float, signed: bool = False) -> str:
    scale, unit = (100, "") if metric in PERCENT else (1, "°")
    return f"{scale * mean:{'+' if signed else ''}.2f} ± {scale * std:.2f}{unit}"


def markdown_table(task: str, summary: dict) -> str:
    metrics = METRICS[task]
    head = ["method", *(f"{m} ({'↓' if low else '↑'})" for m, low in metrics), f"Δ {metrics[0][0]} vs Single, paired",
            "deployed MFLOPs", "params", "FLOPs / Single", "train s/run"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    single = summary[task, "single"]
    base_flops = next(iter(single["flops"]))
    for method in METHODS:
        entry = summary.get((task, method))
        if entry is None:
            continue
        name, _ = metrics[0]
        flops = ", ".join(f"{f / 1e6:.3f}" for f in sorted(entry["flops"]))
        ratio = ", ".join(f"{f / base_flops:.3f}" for f in sorted(entry["flops"]))
        params = ", ".join(f"{p:,}" for p in sorted(entry["params"]))
        cells = [entry["label"], *(_fmt(m, *entry["stats"][m]) for m, _ in metrics),
                 "" if method == "single" else _fmt(name, *entry["delta"], signed=True), flops, params, ratio,
                 f"{entry['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(task: str, summary: dict) -> str:
    """One sentence: does Aux-NAS beat Single on the headline metric, by more than the spread over seeds?"""
    name, lower = METRICS[task][0]
    if (task, "aux-nas") not in summary or (task, "single") not in summary:
        return ""
    nas, single = summary[task, "aux-nas"], summary[task, "single"]
    delta, delta_sd = nas["delta"]
    word = "beats" if (delta < 0 if lower else delta > 0) else "does not beat"
    clear = abs(delta) > delta_sd
    return (f"Aux-NAS {word} Single on {name}: {_fmt(name, *nas['stats'][name])} vs "
            f"{_fmt(name, *single['stats'][name])}; the paired difference ({_fmt(name, delta, delta_sd, True)}) is "
            f"{'larger' if clear else 'smaller'} than its standard deviation over seeds.")


def machine() -> str:
    import timm

    return (f"{common.cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, auxwrap "
            f"{auxwrap.__version__}")


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
        f"Produced by `{args.command}` on {datetime.date.today().isoformat()} in {wall / 60:.1f} min "
        f"({args.jobs} worker processes, 1 thread each; load average {loads[0]:.1f} before, {loads[1]:.1f} after).",
        f"Machine: {machine()}.",
        "",
        f"Mean ± std over {seeds} seed(s) (seeds 0..{seeds - 1}: model init and batch order; data fixed) of the "
        "primary metric of the **deployed** model (`auxwrap.prune(net)`, or the primary's model traced and "
        "BatchNorm-folded for Single / Aux-Head) on the test split, at the epoch with the best validation "
        "score (Aux-NAS: among epochs after the α^P cut). FLOPs: one sample, `auxwrap.count_flops`. "
        "Δ: the mean ± std over seeds of the per-seed difference to Single (the same seed gives every method "
        "the same primary init and batch order). Raw rows: `accuracy.csv`; plot: `accuracy.png`.",
        "",
        "Fairness: every method makes the same number of weight steps with the same optimiser (SGD, momentum "
        "0.9, weight decay 5e-4, cosine schedule), batch size and primary model init; Aux-NAS takes one batch "
        "from each half of `auxwrap.search_loaders` per step (gates, then weights), cycling the halves twice "
        "per epoch, so its weights see as many samples as every other method's (its gates take as many steps "
        "again). Auxiliary loss weight 1.",
        "",
    ]
    for task in tasks:
        config = configs[task]
        parts += [f"## {task}", "", _task_text(task, config), "", markdown_table(task, summary), "",
                  verdict(task, summary), ""]
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
    }[task]
    steps = config.epochs * (config.n_train // config.batch_size)
    fields = {k: v for k, v in asdict(config).items() if k != "progress" and (k != "size" or task != "digits")}
    return (f"{what}. {config.n_train} train / {config.n_val} val / {config.n_test} test, {config.epochs} epochs = "
            f"{steps} weight steps of {config.batch_size}. Config: `{fields}`.")


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
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method (default 3)")
    parser.add_argument("--quick", action="store_true", help="tiny models and data: checks that everything runs")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--mto", default="pcgrad-aux", help="the auxwrap.mto method of Aux-NAS + MTO")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {common.RESULTS.relative_to(common.ROOT)} for full runs, "
                             f"{common.QUICK_RESULTS} with --quick, so a quick run never overwrites the results)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    args.command = "python " + shlex.join(["benchmarks/accuracy.py", *(sys.argv[1:] if argv is None else argv)])
    tasks = TASKS if args.task == "all" else (args.task,)
    configs = {t: replace((QUICK if args.quick else FULL)[t], mto=args.mto) for t in tasks}
    labels = ", ".join(method_label(m, configs[tasks[0]]) for m in METHODS)
    print(f"{args.command}: {len(tasks)} task(s) x {len(METHODS)} methods ({labels}) x {args.seeds} seed(s)")
    args.out = common.out_dir(args)
    loads, start = [os.getloadavg()[0]], time.perf_counter()
    rows = run_grid(tasks, args.seeds, configs, args.jobs)
    wall = time.perf_counter() - start
    loads.append(os.getloadavg()[0])
    write_csv(rows, args.out / "accuracy.csv")
    write_markdown(rows, configs, args, wall, tuple(loads), args.out / "accuracy.md")
    plot(rows, args.out / "accuracy.png")
    summary = summarise(rows)
    for task in tasks:
        print(f"\n{task}\n{markdown_table(task, summary)}\n{verdict(task, summary)}")
    print(f"\nwrote {args.out / 'accuracy.md'}, accuracy.csv, accuracy.png in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
