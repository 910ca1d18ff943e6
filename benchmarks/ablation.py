"""Ablation of Aux-NAS on one task: which of its choices matter, each measured against Single and Aux-G-Layer.

Every row is the task's FULL config (:data:`auxwrap.demo.experiments.FULL`, the accuracy benchmark's) with one change,
grouped by factor (the table :data:`VARIANTS` below); the rows without a change are the base config, run once
and shown in every factor's table. Each row runs on ``--seeds`` seeds, and each is compared with Single and with
Aux-G-Layer *of the same protocol* by the per-seed (paired) difference: the same seed gives every method the
same primary init, pretrained weights and batch order. Writes ablation.csv (one row per run) and ablation.md to
``--out`` (default: benchmarks/results/ablation, or a temporary folder with ``--quick``)::

    python benchmarks/ablation.py                           # the full ablation (about 25 min on 2 CPU cores)
    python benchmarks/ablation.py --quick                   # tiny models, 2 seeds: checks that everything runs
    python benchmarks/ablation.py --only window --only gate --seeds 3

Text below the line ``<!-- notes -->`` of an existing ablation.md is kept when it is rewritten.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import common
from common import METRICS, fmt_delta, fmt_metric, paired

from auxwrap.demo.experiments import FULL, QUICK, TASKS, Config, method_label

#: The ablation, one row per line: (factor, variant name, overrides of the task's FULL config, method).
#: A row without overrides is the base config; identical (method, config) pairs run once.
VARIANTS: tuple[tuple[str, str, dict, str], ...] = (
    ("protocol", "pretrained", {"protocol": "pretrained"}, "single"),
    ("protocol", "pretrained", {"protocol": "pretrained"}, "aux-g-layer"),
    ("protocol", "pretrained", {"protocol": "pretrained"}, "aux-nas"),
    ("protocol", "scratch", {"protocol": "scratch"}, "single"),
    ("protocol", "scratch", {"protocol": "scratch"}, "aux-g-layer"),
    ("protocol", "scratch", {"protocol": "scratch"}, "aux-nas"),
    ("gate", "sigmoid", {}, "aux-nas"),
    ("gate", "clamp", {"gate": "clamp"}, "aux-nas"),
    ("schedule", "decay linear, ramp (0.5, 0.8)", {}, "aux-nas"),
    ("schedule", "decay l1", {"decay": "l1"}, "aux-nas"),
    ("schedule", "ramp (0.2, 0.6)", {"ramp": (0.2, 0.6)}, "aux-nas"),
    ("window", "paper", {}, "aux-nas"),
    ("window", "code", {"window_form": "code"}, "aux-nas"),
    ("window", "group", {"window_form": "group"}, "aux-nas"),
    ("window", "paper", {}, "aux-g-layer"),
    ("window", "code", {"window_form": "code"}, "aux-g-layer"),
    ("window", "group", {"window_form": "group"}, "aux-g-layer"),
    ("alpha_init", "(0.001, 0.5)", {}, "aux-nas"),
    ("alpha_init", "(0.5, 0.5)", {"alpha_init": (0.5, 0.5)}, "aux-nas"),
)
FACTORS = tuple(dict.fromkeys(v[0] for v in VARIANTS))
#: every row is compared with these methods, run on the base config with the row's protocol
BASELINES = ("single", "aux-g-layer")
NOTES = "<!-- notes -->"


def baseline_config(base: Config, config: Config) -> Config:
    """The config of the baselines a run of ``config`` is compared with: the base, of the same protocol."""
    return replace(base, protocol=config.protocol)


def plan(base: Config, factors: Sequence[str]) -> tuple[list[tuple], list[tuple[str, Config]]]:
    """The rows of ``factors`` as (factor, name, method, config), and every distinct (method, config) they and
    their baselines need."""
    rows = [(f, name, method, replace(base, **overrides)) for f, name, overrides, method in VARIANTS if f in factors]
    runs = [(m, c) for _, _, m, c in rows]
    runs += [(b, baseline_config(base, c)) for _, _, _, c in rows for b in BASELINES]
    return rows, list(dict.fromkeys(runs))


# ---------------------------------------------------------------------------------------------- writing

def _changed(config: Config, base: Config) -> str:
    """The fields in which ``config`` differs from ``base``: what a CSV row needs to say which variant it is."""
    return ", ".join(f"{k}={v}" for k, v in asdict(config).items() if v != getattr(base, k)) or "base"


def csv_rows(results: Mapping[tuple, dict], base: Config, rows: list[tuple]) -> list[dict]:
    """One row per run: the variants it stands for, how its config differs from the base, its result."""
    names: dict[tuple, list[str]] = {}
    for factor, name, method, config in rows:
        names.setdefault((method, config), []).append(f"{factor}: {name}")
    return [{"variants": "; ".join(names.get((method, config), ["baseline"])), "config": _changed(config, base),
             **row} for (method, config, _), row in results.items()]


def factor_table(factor: str, rows: list[tuple], results: Mapping[tuple, dict], base: Config, task: str,
                 seeds: int) -> str:
    """A factor's rows: the headline metric, the paired differences to Single and Aux-G-Layer, the cut, the time."""
    name, lower = METRICS[task][0]
    head = ["variant", "method", f"{name} ({'↓' if lower else '↑'})",
            *(f"Δ vs {method_label(b)}, paired" for b in BASELINES), "max α^P at cut", "train s/run"]
    body = []
    for f, variant, method, config in rows:
        if f != factor:
            continue
        runs = [results[method, config, s] for s in range(seeds)]
        deltas = []
        for b in BASELINES:
            other = (b, baseline_config(base, config))
            same = other == (method, config)
            deltas.append("" if same else fmt_delta(name, paired(runs, [results[(*other, s)] for s in range(seeds)],
                                                                 name)))
        cuts = [float(r["alpha_p_at_cut"]) for r in runs if r["alpha_p_at_cut"] != ""]
        body.append([variant, method_label(method, config), fmt_metric(name, *common.mean_std([r[name] for r in runs])),
                     *deltas, f"{statistics.fmean(cuts):.3g}" if cuts else "",
                     f"{statistics.fmean(r['seconds'] for r in runs):.0f}"])
    return common.markdown_table(head, body, "ll" + "r" * (len(head) - 2))


def write_markdown(results: Mapping[tuple, dict], rows: list[tuple], base: Config, args: argparse.Namespace,
                   wall: float, loads: Sequence[float], path: Path) -> None:
    kept = ""
    if path.exists() and NOTES in (old := path.read_text()):
        kept = old.split(NOTES, 1)[1].strip("\n")
    name, lower = METRICS[args.task][0]
    fields = {k: v for k, v in asdict(base).items() if k != "progress"}
    parts = [
        f"# Ablation of Aux-NAS on {args.task}",
        "",
        *common.produced_by(args.command, wall, args.jobs, loads),
        "",
        f"Base: the {'QUICK' if args.quick else 'FULL'} config of `{args.task}` (`auxwrap.demo.experiments`): "
        f"`{fields}`. "
        "Each row changes one thing of it (the table `VARIANTS` of `benchmarks/ablation.py`); rows without a "
        "change are the base, run once and repeated in every factor's table.",
        "",
        f"{name} of the deployed primary on the test split ({'lower' if lower else 'higher'} is better), mean ± "
        f"std over {args.seeds} seed(s) (0..{args.seeds - 1}). Δ: the mean ± std over seeds of the per-seed "
        "difference to Single or to Aux-G-Layer run on the base config *with the row's protocol* (the same seed "
        "gives every method the same primary init, pretrained weights and batch order); \"within noise\" where "
        "its mean is no larger than its std. max α^P at cut: the largest auxiliary → primary gate when Search "
        "cut them (mean over seeds). Raw rows: `ablation.csv`.",
        "",
    ]
    for factor in dict.fromkeys(r[0] for r in rows):
        parts += [f"## {factor}", "", factor_table(factor, rows, results, base, args.task, args.seeds), ""]
    parts += [NOTES, "", kept or "(notes on the results go here; kept when the tables are regenerated)", ""]
    path.write_text("\n".join(parts))


# ---------------------------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASKS, default="scenes-few")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per row (default 5, 2 with --quick)")
    parser.add_argument("--only", action="append", choices=FACTORS, metavar="FACTOR",
                        help=f"run this factor only (repeatable; one of {', '.join(FACTORS)})")
    parser.add_argument("--quick", action="store_true", help="tiny models and data: checks that everything runs")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {(common.RESULTS / 'ablation').relative_to(common.ROOT)} for "
                             f"full runs, {common.QUICK_RESULTS} with --quick)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 5)
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    args.command = "python " + shlex.join(["benchmarks/ablation.py", *(sys.argv[1:] if argv is None else argv)])
    if args.out is None and not args.quick:
        args.out = common.RESULTS / "ablation"
    args.out = common.out_dir(args)
    base = (QUICK if args.quick else FULL)[args.task]
    rows, runs = plan(base, args.only or FACTORS)
    print(f"{args.command}: {len(rows)} rows, {len(runs)} distinct runs x {args.seeds} seed(s) on {args.task}")
    loads, start = [os.getloadavg()[0]], time.perf_counter()
    grid = [(method, config, seed) for method, config in runs for seed in range(args.seeds)]
    results = dict(zip(grid, common.train_grid([(args.task, m, s, c) for m, c, s in grid], args.jobs), strict=True))
    wall = time.perf_counter() - start
    loads.append(os.getloadavg()[0])
    table = csv_rows(results, base, rows)
    common.write_csv(args.out / "ablation.csv", common.columns_of(table), table, fill="")
    write_markdown(results, rows, base, args, wall, loads, args.out / "ablation.md")
    for factor in dict.fromkeys(r[0] for r in rows):
        print(f"\n{factor}\n{factor_table(factor, rows, results, base, args.task, args.seeds)}")
    print(f"\nwrote {args.out / 'ablation.md'} and ablation.csv in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
