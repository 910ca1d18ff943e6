"""The command line: ``python -m auxwrap demo``, ``taps MODEL`` and ``flops --primary P --aux A``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from . import __version__
from .attach import attach
from .errors import AuxwrapError
from .flops import report
from .models import build_model
from .taps import Tap, find_taps
from .trace import trace

#: the demo's built-in pair: (role, model, whether it is built for the input size); random weights.
DEMO_MODELS = (("primary", "timm:resnet18", False), ("auxiliary", "timm:vit_tiny_patch16_224", True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m auxwrap", description=__doc__)
    parser.add_argument("--version", action="version", version=f"auxwrap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="trace a built-in primary/auxiliary pair and show its fusion points")
    demo.add_argument("--quick", action="store_true", help="small inputs, a few seconds")
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
            return _demo(args.quick)
        if args.command == "flops":
            return _flops(args)
        return _show_taps(args.model, args.size)
    except AuxwrapError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _demo(quick: bool) -> int:
    size = 64 if quick else 224
    print(f"auxwrap {__version__} demo: tracing a primary and an auxiliary model (random weights, "
          f"input 2x3x{size}x{size})\n")
    codes = [_show_taps(spec, size, role=role, **({"img_size": size} if sized else {}))
             for role, spec, sized in DEMO_MODELS]
    return max(codes)


def _show_taps(spec: str, size: int, role: str = "model", **kwargs) -> int:  # noqa: ANN003
    model = build_model(spec, **kwargs).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    traced = trace(model)
    with torch.no_grad():
        same = torch.equal(traced.graph_module(x), model(x))
    print(f"{role} {spec}: traced {len(traced.graph.nodes)} nodes in {time.perf_counter() - start:.2f} s; "
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
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
