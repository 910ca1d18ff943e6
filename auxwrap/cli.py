"""The command line: ``python -m auxwrap demo``, ``taps MODEL`` and ``flops --primary P --aux A``."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from . import __version__
from .attach import attach
from .demo.models import build_model
from .errors import AuxwrapError
from .flops import report
from .taps import Tap, find_taps
from .trace import trace

#: what the demo trains, on the few-label task of :mod:`auxwrap.demo.experiments`
DEMO_TASK = "scenes-few"
DEMO_METHODS = ("single", "aux-g-layer", "aux-nas")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m auxwrap", description=__doc__)
    parser.add_argument("--version", action="version", version=f"auxwrap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train Single, Aux-G and Aux-NAS on a few-label task, prune, compare")
    demo.add_argument("--quick", action="store_true", help="10 epochs and 2 seeds: checks that it runs")
    demo.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3, 2 with --quick)")
    demo.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    demo.add_argument("--out", default="auxwrap-demo", help="where the report and gate plot go (default auxwrap-demo/)")
    taps = commands.add_parser("taps", help="list the fusion points of a timm or torchvision model")
    taps.add_argument("model", help="e.g. timm:resnet50 or torchvision:vgg16")
    taps.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    flops = commands.add_parser("flops", help="FLOPs, parameters and norm layers: primary, fused, deployed")
    flops.add_argument("--primary", required=True, help="e.g. timm:resnet50 or torchvision:vgg16")
    flops.add_argument("--aux", required=True, nargs="+", help="one or more auxiliary models")
    flops.add_argument("--mode", choices=("grad", "nas"), default="nas")
    flops.add_argument("--taps", default="layer", help="layer or stage (default layer)")
    flops.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    flops.add_argument("--batch", type=int, default=1, help="batch size of the counted pass (default 1)")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            seeds = args.seeds if args.seeds is not None else 2 if args.quick else 3
            return _demo(args.quick, seeds, args.jobs, Path(args.out))
        if args.command == "flops":
            return _flops(args)
        return _show_taps(args.model, args.size)
    except AuxwrapError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _demo(quick: bool, seeds: int, jobs: int, out: Path) -> int:
    """Single, Aux-G and Aux-NAS on a few-label task over several seeds; paired differences, in plain words."""
    from .demo import compare, experiments
    from .plot import plot_gates

    config = experiments.FULL[DEMO_TASK]  # the accuracy benchmark's scenes-few runs, seeds 0..seeds-1
    if quick:
        config = replace(config, epochs=10, n_val=200, n_test=400)
    task = experiments.make_task(DEMO_TASK, config)
    start = (f"both models first train alone for {experiments.pretrain_epochs(config)} epochs (the paper's "
             f"protocol), then every method trains {config.epochs} more" if config.protocol == "pretrained" else
             f"every method trains {config.epochs} epochs from random initial weights")
    print(f"auxwrap {__version__} demo: {len(task.train)} labelled images of rendered scenes (32x32); primary: "
          "the dominant object class (sphere, box or cylinder), a small ResNet classifier; auxiliary: surface "
          f"normals, learnt by an encoder-decoder (a different architecture). {start.capitalize()}, Single as many "
          f"steps. {seeds} seeds; {len(task.val)} validation and {len(task.test)} test images.\n", flush=True)
    runs = [(DEMO_TASK, method, seed, config) for seed in range(seeds) for method in DEMO_METHODS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rows = compare.train_grid(runs, jobs, histories=True)
    report = compare.side_by_side(rows, task.metric, DEMO_METHODS)
    print(report)
    out.mkdir(parents=True, exist_ok=True)
    command = f"python -m auxwrap demo{' --quick' if quick else ''} --seeds {seeds}"
    (out / "results.md").write_text(f"`{command}` on {time.strftime('%Y-%m-%d')}, {compare.training_machine()}\n\n"
                                    f"```\n{report}\n```\n")
    history = next(r["history"] for r in rows if r["method"] == "aux-nas" and r["seed"] == 0)
    plot_gates(history, path=out / "gates.png")
    print(f"\ngate plot (Aux-NAS, seed 0): {out / 'gates.png'}; this report: {out / 'results.md'}")
    return 0


def _show_taps(spec: str, size: int) -> int:
    model = build_model(spec).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    traced = trace(model)
    with torch.no_grad():
        same = torch.equal(traced.graph_module(x), model(x))
    print(f"model {spec}: traced {len(traced.graph.nodes)} nodes in {time.perf_counter() - start:.2f} s; "
          f"traced output equals eager output: {same}")
    layers = find_taps(traced, (x,), "layer")
    try:
        stage_names = {t.name for t in find_taps(traced, (x,), "stage")}
    except AuxwrapError as error:
        stage_names = set()
        print(f"  stages: {error}".splitlines()[0])
    print(_tap_table(layers, stage_names))
    print()
    return 0 if same else 1


def _flops(args: argparse.Namespace) -> int:
    primary = build_model(args.primary).eval()
    aux = [build_model(spec).eval() for spec in args.aux]
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    net = attach(primary, aux, args.mode, taps=args.taps, example_inputs=(x,))
    print(f"{args.primary} + {', '.join(args.aux)} (mode={args.mode}, taps={args.taps}, "
          f"{len(net.connections())} connections)\n")
    print(report(net, x))
    return 0


def _tap_table(taps: list[Tap], stage_names: set[str]) -> str:
    rows = [("#", "fusion point", "kind", "layout", "shape", "stage end")]
    rows += [(str(i), t.name, t.kind, t.layout, "x".join(map(str, t.shape[1:])), "yes" if t.name in stage_names else "")
             for i, t in enumerate(taps)]
    from .demo.compare import format_table

    return format_table(rows, indent="  ")
