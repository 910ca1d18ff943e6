"""auxwrap on the command line: train the demo, list a model's fusion points, count the costs of a fused pair.

Models are named source:name, e.g. timm:resnet50, torchvision:vgg16 or hf:vit (a transformers image classifier of
its default config; a bare name means timm), and built with random weights: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import AuxwrapArgumentError, AuxwrapError, AuxwrapTapError
from .optional import require

if TYPE_CHECKING:  # the command handlers import torch and auxwrap's core themselves: --help stays fast
    from torch import nn

    from .taps import Tap

#: what the demo trains, on the few-label task of auxwrap.demo.experiments
DEMO_TASK = "scenes-few"
DEMO_METHODS = ("single", "aux-g-layer", "aux-nas")
#: the modules the demo needs beyond the core: pip install 'auxwrap[demo]'
DEMO_NEEDS = ("sklearn", "tqdm", "matplotlib")
#: the --taps choices that are not lists of names
TAP_CHOICES = ("layer", "stage")
#: the --capture choices: auxwrap.capture.CAPTURES, written out so that --help does not import torch (a test checks)
CAPTURE_CHOICES = ("auto", "fx", "export")
CAPTURE_HELP = ("how each model becomes a graph: auto (torch.fx, and non-strict torch.export where torch.fx cannot "
                "trace, with a warning saying so), fx, or export (e.g. for transformers models)")
#: the source prefix of a Hugging Face transformers model: hf:vit, hf:convnext, hf:swin...
HF_SOURCE = "hf"
MODEL_HELP = "source:name, e.g. timm:resnet50, torchvision:vgg16 or hf:vit"

EPILOG = """examples:
  python -m auxwrap demo --quick                 # 10 epochs and 2 seeds: checks that it runs
  python -m auxwrap demo --seeds 5 --out results # the full comparison, report and gate plot in results/
  python -m auxwrap taps timm:resnet50           # the fusion points of a model, by name
  python -m auxwrap taps hf:vit --size 64        # a transformers ViT, captured with torch.export
  python -m auxwrap flops --primary timm:resnet50 --aux torchvision:resnet18 --taps stage
  python -m auxwrap flops --primary timm:vit_tiny_patch16_224 --aux timm:vit_tiny_patch16_224 \\
      --taps blocks.2,blocks.5,blocks.8,blocks.11 --json"""
TAPS_HELP = ("fusion points of every branch: 'layer' (every block or conv unit), 'stage' (the end of each "
             "resolution stage) or comma-separated module paths / node names as 'python -m auxwrap taps MODEL' "
             "lists them, e.g. layer1,layer2,layer3")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown (unless the help states it or the option is required); examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "(default" in text or action.required else super()._get_help_string(action)


def tap_spec(text: str) -> str | list[str]:
    """A --taps value: ``"layer"``, ``"stage"``, or comma-separated names (a list, also of one name)."""
    if text in TAP_CHOICES:
        return text
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"{text!r} has an empty name; give 'layer', 'stage' or names separated by single commas, "
            "e.g. layer1,layer2")
    return names


def fusion_rank_arg(text: str) -> int | float:
    """A --fusion-rank value: an int (a rank) or a float (a fraction of each destination's channels), as
    ``attach(fusion_rank=...)`` takes them; attach() checks the range."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a number; give an int r >= 1 (rank r at every fusion) or a fraction in (0, 1] of each "
        "destination's channels, e.g. 0.25 for C/4")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m auxwrap``: sub-commands demo, taps and flops."""
    parser = argparse.ArgumentParser(prog="python -m auxwrap", description=__doc__, epilog=EPILOG,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"auxwrap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,taps,flops}")
    _add_demo(commands)
    _add_taps(commands)
    _add_flops(commands)
    return parser


def _subparser(commands: Any, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=summary, description=textwrap.fill(description, 100),
                               epilog=f"examples:\n{examples}", formatter_class=_HelpFormatter)


def _add_demo(commands: Any) -> None:
    demo = _subparser(
        commands, "demo", "train Single, Aux-G and Aux-NAS on a few-label task, prune, compare",
        "Train Single, Aux-G and Aux-NAS on a few-label task over several seeds (rendered scenes: nothing is "
        "downloaded), prune to the primary alone and compare the deployed models with paired differences. "
        "Needs the demo extra: pip install 'auxwrap[demo]'.",
        "  python -m auxwrap demo --quick\n  python -m auxwrap demo --seeds 5 --jobs 4 --out results")
    demo.add_argument("--quick", action="store_true", help="10 epochs and 2 seeds: checks that it runs")
    demo.add_argument("--seeds", type=int, default=None, help="train seeds 0..N-1 (default: 3, or 2 with --quick)")
    demo.add_argument("--jobs", type=int, default=2, help="worker processes")
    demo.add_argument("--out", default=None, metavar="DIR",
                      help="directory for the report (results.md) and the gate plot (gates.png), created if "
                           "missing (default: a new temporary directory auxwrap-demo-*, printed at the end)")
    demo.add_argument("--json", action="store_true",
                      help="print the runs and file paths as JSON on stdout (the rest goes to stderr)")


def _add_taps(commands: Any) -> None:
    taps = _subparser(
        commands, "taps", "list the fusion points of a timm or torchvision model",
        "Trace a model, check that the traced graph computes what the model computes, and list its fusion "
        "points (the names --taps takes) with their layouts and shapes.",
        "  python -m auxwrap taps timm:resnet50\n  python -m auxwrap taps torchvision:vgg16 --size 64 --json\n"
        "  python -m auxwrap taps hf:vit --size 64 --capture export")
    taps.add_argument("model", help=MODEL_HELP)
    taps.add_argument("--size", type=int, default=224, help="input height and width")
    taps.add_argument("--capture", choices=CAPTURE_CHOICES, default="auto", help=CAPTURE_HELP)
    taps.add_argument("--json", action="store_true", help="print the points as JSON on stdout")


def _add_flops(commands: Any) -> None:
    flops = _subparser(
        commands, "flops", "FLOPs, parameters and norm layers: primary, fused, deployed",
        "Fuse a primary with one or more auxiliary models (auxwrap.attach) and count the FLOPs, parameters and "
        "norm layers of the original primary, the fused training network and the deployed primary.",
        "  python -m auxwrap flops --primary timm:resnet50 --aux timm:resnet50 --taps stage\n"
        "  python -m auxwrap flops --primary torchvision:resnet18 --aux torchvision:resnet18 \\\n"
        "      --primary-taps layer1,layer2,layer3,layer4 --aux-taps layer\n"
        "  python -m auxwrap flops --primary timm:vit_tiny_patch16_224 --aux timm:vit_tiny_patch16_224 \\\n"
        "      --taps blocks.2,blocks.5,blocks.8,blocks.11 --json")
    flops.add_argument("--primary", required=True, help=MODEL_HELP)
    flops.add_argument("--aux", required=True, nargs="+", metavar="MODEL", help="one or more auxiliary models")
    flops.add_argument("--mode", choices=("grad", "nas"), default="nas",
                       help="grad: Aux-G, primary -> auxiliary links only; nas: Aux-NAS, links both ways")
    flops.add_argument("--taps", type=tap_spec, default="layer", metavar="SPEC", help=TAPS_HELP)
    flops.add_argument("--primary-taps", type=tap_spec, default=None, metavar="SPEC",
                       help="the primary's fusion points, as --taps (default: --taps)")
    flops.add_argument("--aux-taps", type=tap_spec, default=None, metavar="SPEC",
                       help="every auxiliary's fusion points, as --taps (default: --taps)")
    flops.add_argument("--fusion-rank", type=fusion_rank_arg, default=None, metavar="R",
                       help="low-rank fusions, as attach(fusion_rank=R): an int rank, or a fraction of each "
                            "destination's channels such as 0.25 (default: full rank)")
    flops.add_argument("--capture", choices=CAPTURE_CHOICES, default="auto", help=CAPTURE_HELP)
    flops.add_argument("--size", type=int, default=224, help="input height and width")
    flops.add_argument("--batch", type=int, default=1, help="batch size of the counted pass")
    flops.add_argument("--json", action="store_true", help="print the costs as JSON on stdout")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m auxwrap ARGS``; returns the exit status (2: bad arguments, with the reason on stderr)."""
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {"demo": _demo, "taps": _show_taps, "flops": _flops}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _plain_auxwrap_warnings(warnings.showwarning)
            return handlers[args.command](args)
    except AuxwrapTapError as error:
        print(f"error: {error}\n{command_line_taps_hint(str(error))}", file=sys.stderr)
        return 2
    except AuxwrapError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (python -m auxwrap taps MODEL | head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that Python's exit flush stays quiet
        return 0


def _plain_auxwrap_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` printing auxwrap's own warnings (the capture="auto" fallback) as ``warning: ...``
    on stderr, without Python's file and line; others go to ``show``."""
    def show_warning(message: Warning | str, category: type[Warning], *where: Any, **more: Any) -> None:
        if category.__module__.startswith("auxwrap."):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, *where, **more)
    return show_warning


def command_line_taps_hint(message: str) -> str:
    """How to choose fusion points on the command line; a ``taps=[...]`` list in ``message`` becomes --taps."""
    hint = "on the command line: --taps NAME,NAME or --primary-taps/--aux-taps (one branch each)"
    found = re.search(r"taps=(\[[^\[\]]*\])", message)
    if found is None:
        return hint
    try:
        names = ast.literal_eval(found.group(1))
    except (ValueError, SyntaxError):
        return hint
    return f"{hint}, e.g. --taps {','.join(names)}" if names and all(isinstance(n, str) for n in names) else hint


def _demo(args: argparse.Namespace) -> int:
    """Single, Aux-G and Aux-NAS on a few-label task over several seeds; paired differences, in plain words."""
    for module in DEMO_NEEDS:  # before any training: a missing package fails in a second, not at the end
        require(module, extra="demo", purpose="python -m auxwrap demo")
    from .demo import compare, experiments
    from .plot import plot_gates

    seeds = args.seeds if args.seeds is not None else 2 if args.quick else 3
    say = _printer(sys.stderr if args.json else sys.stdout)
    config = experiments.FULL[DEMO_TASK]  # the accuracy benchmark's scenes-few runs, seeds 0..seeds-1
    if args.quick:
        config = replace(config, epochs=10, n_val=200, n_test=400)
    task = experiments.make_task(DEMO_TASK, config)
    start = (f"both models first train alone for {experiments.pretrain_epochs(config)} epochs (the paper's "
             f"protocol), then every method trains {config.epochs} more" if config.protocol == "pretrained" else
             f"every method trains {config.epochs} epochs from random initial weights")
    say(f"auxwrap {__version__} demo: {len(task.train)} labelled images of rendered scenes (32x32); primary: "
        "the dominant object class (sphere, box or cylinder), a small ResNet classifier; auxiliary: surface "
        f"normals, learnt by an encoder-decoder (a different architecture). {start.capitalize()}, Single as many "
        f"steps. {seeds} seeds; {len(task.val)} validation and {len(task.test)} test images.\n")
    runs = [(DEMO_TASK, method, seed, config) for seed in range(seeds) for method in DEMO_METHODS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rows = compare.train_grid(runs, args.jobs, histories=True)
    summary = compare.side_by_side(rows, task.metric, DEMO_METHODS)
    say(summary)
    out = Path(args.out) if args.out is not None else Path(tempfile.mkdtemp(prefix="auxwrap-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    command = f"python -m auxwrap demo{' --quick' if args.quick else ''} --seeds {seeds}"
    (out / "results.md").write_text(f"`{command}` on {time.strftime('%Y-%m-%d')}, {compare.training_machine()}\n\n"
                                    f"```\n{summary}\n```\n")
    history = next(r["history"] for r in rows if r["method"] == "aux-nas" and r["seed"] == 0)
    plot_gates(history, path=out / "gates.png")
    say(f"\ngate plot (Aux-NAS, seed 0): {out / 'gates.png'}; this report: {out / 'results.md'}")
    if args.json:
        print(json.dumps({"task": DEMO_TASK, "metric": task.metric, "seeds": seeds,
                          "runs": [{k: v for k, v in r.items() if k != "history"} for r in rows],
                          "report": str(out / "results.md"), "gate_plot": str(out / "gates.png")}, indent=2))
    return 0


def _printer(stream: Any) -> Callable[[str], None]:
    return lambda text: print(text, file=stream, flush=True)


def _show_taps(args: argparse.Namespace) -> int:
    import torch

    from .taps import find_taps
    from .trace import trace

    model = build_named_model(args.model, args.size).eval()
    x = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    traced = trace(model, capture=args.capture, example_inputs=(x,))
    with torch.no_grad():
        same = _same_tensors(traced.graph_module(x), model(x))
    seconds = time.perf_counter() - start
    layers = find_taps(traced, (x,), "layer")
    try:
        stage_names, stage_error = {t.name for t in find_taps(traced, (x,), "stage")}, None
    except AuxwrapError as error:
        stage_names, stage_error = set(), str(error).splitlines()[0]
    if args.json:
        print(json.dumps({"model": args.model, "capture": traced.capture, "traced_nodes": len(traced.graph.nodes),
                          "traced_equals_eager": same, "stages_error": stage_error,
                          "taps": [_tap_record(t, t.name in stage_names) for t in layers]}, indent=2))
    else:
        print(f"model {args.model}: traced {len(traced.graph.nodes)} nodes with torch.{traced.capture} in "
              f"{seconds:.2f} s; "
              f"traced output equals eager output: {same}")
        if stage_error is not None:
            print(f"  stages: {stage_error}")
        print(_tap_table(layers, stage_names))
        print()
    return 0 if same else 1


def _same_tensors(a: Any, b: Any) -> bool:
    """Whether two outputs (tensors, or structures of them such as a transformers ``ImageClassifierOutput``) hold
    equal tensors in the same structure."""
    import torch
    from torch.utils._pytree import tree_flatten

    (leaves_a, spec_a), (leaves_b, spec_b) = tree_flatten(a), tree_flatten(b)
    return spec_a == spec_b and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                                    for x, y in zip(leaves_a, leaves_b, strict=True))


def build_named_model(spec: str, size: int = 224) -> nn.Module:
    """A model named on the command line, with random weights: ``hf:NAME`` is a transformers image classifier of
    ``NAME``'s default config (image_size set to ``size`` where the config has one); others as
    :func:`auxwrap.demo.models.build_model` builds them (timm, torchvision)."""
    from .demo.models import build_model

    source, _, name = spec.rpartition(":")
    return _hf_model(spec, name, size) if source == HF_SOURCE else build_model(spec)


def _hf_model(spec: str, name: str, size: int) -> nn.Module:
    require("transformers", extra="hf", purpose=f"the model {spec}")
    from transformers import AutoConfig, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    known = sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    if name not in known:
        close = difflib.get_close_matches(name.lower(), known, n=3)
        hint = f"did you mean {', '.join(f'hf:{c}' for c in close)}? " if close else ""
        raise AuxwrapArgumentError(
            f"unknown transformers image classifier {name!r} in {spec!r}: {hint}The command line takes hf:TYPE "
            f"with a model type of AutoModelForImageClassification, e.g. hf:vit, hf:convnext, hf:swin ({len(known)} "
            "of them); the Python API (auxwrap.attach, auxwrap.trace) takes any model.")
    config = AutoConfig.for_model(name)
    if isinstance(getattr(config, "image_size", None), int):
        config.image_size = size
    return AutoModelForImageClassification.from_config(config)


def _tap_record(tap: Tap, stage_end: bool) -> dict[str, Any]:
    """One fusion point for --json: its shape without the batch dimension."""
    return {"name": tap.name, "kind": tap.kind, "layout": tap.layout, "shape": list(tap.shape[1:]),
            "module_path": tap.module_path, "stage_end": stage_end}


def _flops(args: argparse.Namespace) -> int:
    import torch

    from .attach import attach
    from .flops import report
    from .plan import PRIMARY

    primary = build_named_model(args.primary, args.size).eval()
    aux = [build_named_model(spec, args.size).eval() for spec in args.aux]
    taps = args.taps
    if args.primary_taps is not None or args.aux_taps is not None:  # attach()'s per-branch form
        taps = {PRIMARY: args.primary_taps or args.taps, "aux": args.aux_taps or args.taps}
    # example inputs of at least 2 images: torch.export fixes a batch dimension of size 1 (and train-mode BatchNorm
    # needs two); the counted pass takes the first --batch of them
    examples = torch.randn(max(2, args.batch), 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    x = examples[:args.batch]
    net = attach(primary, aux, args.mode, taps=taps, example_inputs=(examples,), fusion_rank=args.fusion_rank,
                 capture=args.capture)
    captures = dict(net.captures)
    costs = report(net, x)
    if args.json:
        print(json.dumps({"primary": args.primary, "aux": args.aux, "mode": args.mode, "taps": taps,
                          "fusion_rank": args.fusion_rank, "capture": args.capture, "captures": captures,
                          "connections": len(net.connections()),
                          "inputs": costs.inputs,
                          "rows": [{**asdict(row), "macs": row.macs} for row in costs.rows]}, indent=2))
    else:
        rank = "" if args.fusion_rank is None else f"fusion_rank={args.fusion_rank}, "
        captured = ", ".join(f"{branch} with torch.{how}" for branch, how in captures.items())
        print(f"{args.primary} + {', '.join(args.aux)} (mode={args.mode}, taps={taps}, {rank}"
              f"{len(net.connections())} connections; captured {captured})\n")
        print(costs)
    return 0


def _tap_table(taps: list[Tap], stage_names: set[str]) -> str:
    from .demo.compare import format_table

    rows = [("#", "fusion point", "kind", "layout", "shape", "stage end")]
    rows += [(str(i), t.name, t.kind, t.layout, "x".join(map(str, t.shape[1:])), "yes" if t.name in stage_names else "")
             for i, t in enumerate(taps)]
    return format_table(rows, indent="  ")
