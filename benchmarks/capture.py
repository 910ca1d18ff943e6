"""What each capture path costs: seconds of ``auxwrap.trace(model, capture=...)`` with torch.fx and with non-strict
torch.export, in eval and in train mode (``attach()`` captures every branch in both).

Models (random weights, batch 2): timm resnet50, vit_base_patch16_224 and convnext_tiny at 224 x 224; a transformers
ViT of ViT-Base's default config at 224 (``hf:vit``, the command line's name) and a tiny one (2 blocks of width 32
on 32 x 32 images). torch.fx cannot trace the transformers models; for them the table gives ``capture="auto"``
too: the failed torch.fx attempt, then torch.export.

All configurations are timed in one process, their repeats interleaved (benchmarks/common.py), after one untimed
warm-up call each (torch.export's first call in a process also imports and sets up its machinery).

    python benchmarks/capture.py --threads 1            # writes benchmarks/results/capture.{csv,md,json}
    python benchmarks/capture.py --quick                # the tiny transformers ViT and timm resnet18 at 64
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

try:
    from benchmarks import common
except ImportError:  # run as a script: python benchmarks/capture.py
    import common  # type: ignore[no-redef]

import auxwrap
from auxwrap.cli import build_named_model

CAPTURES = ("fx", "export", "auto")
MODES = {"eval": False, "train": True}


@dataclass(frozen=True)
class Case:
    """A model to capture: a name for the table, how to build it, its input size and the captures to time."""

    name: str
    build: Callable[[], nn.Module]
    size: int
    captures: tuple[str, ...]


def tiny_hf_vit() -> nn.Module:
    """The transformers ViT of the tests and the README: 2 blocks of width 32 on 32 x 32 images."""
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32,
                                               num_attention_heads=2, intermediate_size=64, num_labels=5))


def cases(quick: bool) -> list[Case]:
    timm_case = lambda spec, size: Case(spec, lambda: build_named_model(spec, size), size, ("fx", "export"))  # noqa: E731
    tiny = Case("transformers ViT, tiny (2 x 32, 32 x 32)", tiny_hf_vit, 32, ("fx", "export", "auto"))
    if quick:
        return [timm_case("timm:resnet18", 64), tiny]
    return [timm_case("timm:resnet50", 224), timm_case("timm:vit_base_patch16_224", 224),
            timm_case("timm:convnext_tiny", 224),
            Case("hf:vit (ViT-Base config)", lambda: build_named_model("hf:vit", 224), 224, ("fx", "export", "auto")),
            tiny]


def capture_call(model: nn.Module, x: torch.Tensor, capture: str, training: bool) -> Callable[[], dict]:
    """One capture, warnings silenced (the "auto" fallback message); returns nothing timed in parts."""
    def call() -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auxwrap.trace(model, capture=capture, training=training, example_inputs=(x,))
        return {}
    return call


def probe(model: nn.Module, x: torch.Tensor, capture: str, training: bool) -> tuple[int | None, str]:
    """The node count of one capture, or the reason it failed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = auxwrap.trace(model, capture=capture, training=training, example_inputs=(x,))
    except auxwrap.AuxwrapError as error:
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:240]}"
    return len(traced.graph.nodes), "ok"


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--repeats", type=int, default=3, help="timed captures of each configuration")
    args = p.parse_args()
    device, folder = common.setup(args)
    started = time.perf_counter()
    env = common.environment(torch.device("cpu"))
    import transformers

    env["transformers"] = transformers.__version__
    rows: list[dict[str, Any]] = []
    calls: dict[str, Callable[[], Any]] = {}
    for case in cases(args.quick):
        model = case.build()
        x = torch.randn(2, 3, case.size, case.size, generator=torch.Generator().manual_seed(0))
        for capture in case.captures:
            for mode, training in MODES.items():
                nodes, status = probe(model, x, capture, training)
                key = f"{case.name}|{capture}|{mode}"
                rows.append({"model": case.name, "capture": capture, "mode": mode, "nodes": nodes, "status": status})
                if nodes is not None:
                    calls[key] = capture_call(model, x, capture, training)
    timings = common.interleaved(calls, torch.device("cpu"), warmup=1, repeats=args.repeats)
    for row in rows:
        timing = timings.get(f"{row['model']}|{row['capture']}|{row['mode']}")
        if timing is not None:
            q1, q3 = timing.quartiles()
            row.update(median_s=round(timing.median, 3), q1_s=round(q1, 3), q3_s=round(q3, 3))
    columns = ["model", "capture", "mode", "nodes", "median_s", "q1_s", "q3_s", "status"]
    common.write_csv(folder / "capture.csv", columns, rows, fill="")
    env = common.finish_environment(env, started)
    record = common.Record("capture", "Capture time: torch.fx and torch.export", env,
                           {"batch": 2, "repeats": args.repeats, "warmup": 1, "threads": torch.get_num_threads(),
                            "transformers": transformers.__version__})
    record.write(folder, _body(rows))
    print(_body(rows))
    record.print_summary(folder)


def _cell(rows: list[dict[str, Any]], model: str, capture: str, mode: str) -> str:
    row = next((r for r in rows if (r["model"], r["capture"], r["mode"]) == (model, capture, mode)), None)
    if row is None:
        return ""
    if row.get("median_s") is None:
        return "fails"
    return f"{row['median_s']:.2f} s ({row['nodes']} nodes)"


def _body(rows: list[dict[str, Any]]) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    header = ["model"] + [f"{c} {m}" for c in CAPTURES for m in MODES]
    table = common.markdown_table(header, [[name] + [_cell(rows, name, c, m) for c in CAPTURES for m in MODES]
                                           for name in models])
    failures = sorted({f"- {r['model']}, {r['capture']}: {r['status']}" for r in rows if r["status"] != "ok"})
    text = ("## Seconds per capture (median of the repeats; batch 2)\n\n" + table + "\n\n"
            "`auto` is timed where torch.fx fails: its failed attempt, then torch.export. An empty cell: not run "
            "(`auto` is `fx` where torch.fx traces).\n")
    if failures:
        text += "\n## Captures that failed\n\n" + "\n".join(failures) + "\n"
    return text


if __name__ == "__main__":
    main()
