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
from .errors import AuxwrapError
from .flops import report
from .models import build_model
from .taps import Tap, find_taps
from .trace import trace

#: what the demo trains on the digits task (primary: the left digit; auxiliary: the right one)
DEMO_METHODS = ("single", "aux-g-layer", "aux-nas")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m auxwrap", description=__doc__)
    parser.add_argument("--version", action="version", version=f"auxwrap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train Single, Aux-G and Aux-NAS on digit pairs, prune, compare")
    demo.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    demo.add_argument("--out", default="auxwrap-demo", help="where the gate plot goes (default auxwrap-demo/)")
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
            return _demo(args.quick, Path(args.out))
        if args.command == "flops":
            return _flops(args)
        return _show_taps(args.model, args.size)
    except AuxwrapError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _demo(quick: bool, out: Path) -> int:
    """Train the primary alone, with Aux-G and with Aux-NAS on digit pairs; compare the deployed models."""
    from . import experiments
    from .plot import plot_gates

    config = experiments.FULL["digits"]  # seed 0 of the accuracy benchmark's digits runs
    if quick:
        config = replace(config, epochs=4, n_val=500, n_test=1000)
    task = experiments.make_task("digits", config)
    print(f"auxwrap {__version__} demo: digit pairs (16x16, primary: the left digit, auxiliary: the right digit; "
          f"{len(task.train)} train / {len(task.val)} val / {len(task.test)} test), a small ResNet with random init, "
          f"{config.epochs} epochs of {len(task.train) // config.batch_size} weight steps of {config.batch_size} for "
          "every method\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models are tiny: one thread is faster than several on a busy CPU
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            results = [experiments.run(task, method, seed=0, config=config) for method in DEMO_METHODS]
    finally:
        torch.set_num_threads(threads)
    print(_demo_table(results))
    nas = results[-1]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gates.png"
    plot_gates(nas.search, path=path)
    print(f"\n{nas.search.summary()}")
    print(f"\ngate plot: {path}")
    return 0


def _demo_table(results: list) -> str:  # list[experiments.Result]
    """Deployed test accuracy, FLOPs and parameters of each method beside the single-task model."""
    single = results[0]
    rows = [("method", "test accuracy", "deployed MFLOPs", "params", "FLOPs / Single", "training time")]
    rows += [(r.label, f"{100 * r.metrics['accuracy']:.2f} %", f"{r.flops / 1e6:.3f}", f"{r.params:,}",
              f"{r.flops / single.flops:.3f}", f"{r.seconds:.0f} s") for r in results]
    return _format_table(rows, numbers=True)


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
    return _format_table(rows, indent="  ")


def _format_table(rows: list[tuple[str, ...]], numbers: bool = False, indent: str = "") -> str:
    """Rows as aligned text columns; with ``numbers``, every column after the first right-aligned."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(cell.rjust(w) if numbers and c else cell.ljust(w) for c, (cell, w) in
                                        enumerate(zip(row, widths, strict=True))) for row in rows)
