"""Inference latency: the deployed primary against the original primary, eager and ``torch.compile``.

For each backbone: the original primary (eval mode), the deployed primary of an Aux-NAS network with
one auxiliary (``attach(mode="nas")``, the auxiliary -> primary gates cut with
``auxwrap.deploy.cut_links``, then ``detach_primary()``: BatchNorm folded), and the fused network itself
(both branches and every connection, as soft sharing would run it), each eager and under
``torch.compile``. Batch 1, no gradients; the six configurations of a backbone are timed with their
repeats interleaved, after warm-up (the first compiled call, timed separately, compiles).

    python benchmarks/deploy_latency.py           # CPU: ResNet-50 and ViT-Small at 224; GPU: ResNet-50, ViT-Base
    python benchmarks/deploy_latency.py --quick   # ResNet-18 and ViT-Tiny at 64, torch.compile backend "eager"
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import common
import torch
from common import Backbone
from torch import nn

import auxwrap
from auxwrap.deploy import cut_links

COLUMNS = ("device", "backbone", "img_size", "batch", "model", "runtime", "median_ms", "q1_ms", "q3_ms", "repeats",
           "over_original", "compile_s", "max_rel_error")


CPU = (Backbone("ResNet-50", "timm:resnet50", 224), Backbone("ViT-Small", "timm:vit_small_patch16_224", 224))
GPU = (Backbone("ResNet-50", "timm:resnet50", 224), Backbone("ViT-Base", "timm:vit_base_patch16_224", 224))
QUICK = (Backbone("ResNet-18", "timm:resnet18", 64),
         Backbone("ViT-Tiny", "timm:vit_tiny_patch16_224", 64, {"img_size": 64}))


def models(backbone: Backbone, x: torch.Tensor, device: torch.device) -> dict[str, nn.Module]:
    """Original primary, its deployed copy (Aux-NAS, K=1, links cut, BN folded) and the fused network, eval."""
    primary = backbone.build().to(device).eval()
    aux = copy.deepcopy(primary)
    net = auxwrap.attach(primary, aux, mode="nas", example_inputs=(x,))
    cut_links(net)  # exactly what prune() does once the search has driven the gates to 0
    deployed = net.detach_primary()
    return {"original": primary, "deployed": deployed.to(device).eval(), "fused-nas-K1": net.eval()}


def first_output(out: object) -> torch.Tensor:
    return out.primary if isinstance(out, auxwrap.AuxOutput) else out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@dataclass
class Prepared:
    fns: dict[str, Callable[[], torch.Tensor]]
    compile_s: dict[str, float]
    errors: dict[str, float]


def prepare(mods: dict[str, nn.Module], x: torch.Tensor, backend: str, device: torch.device) -> Prepared:
    """Eager and compiled callables for every model; compiles now (first call timed) and checks outputs."""
    fns, compile_s, errors = {}, {}, {}
    with torch.no_grad():
        reference = mods["original"](x)
        for name, module in mods.items():
            compiled = torch.compile(module, backend=backend)
            start = time.perf_counter()
            out = compiled(x)
            common.synchronize(device)
            compile_s[name] = round(time.perf_counter() - start, 1)
            eager_out = module(x)
            errors[(name, "eager")] = relative_error(first_output(eager_out), reference)
            errors[(name, "compile")] = relative_error(first_output(out), reference)
            fns[(name, "eager")] = _no_grad(module, x)
            fns[(name, "compile")] = _no_grad(compiled, x)
    return Prepared(fns, compile_s, errors)


def _no_grad(module: Callable, x: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.no_grad():
            return module(x)
    return call


def measure(backbone: Backbone, args: object, device: torch.device) -> tuple[list[dict], dict[str, int]]:
    """The CSV rows of one backbone, and the norm layers the original and the deployed primary run."""
    x = torch.randn(args.batch, 3, backbone.size, backbone.size, generator=torch.Generator().manual_seed(0)).to(device)
    mods = models(backbone, x, device)
    prepared = prepare(mods, x, args.backend, device)
    keys = list(prepared.fns)
    timings = common.interleaved({f"{m}/{r}": prepared.fns[(m, r)] for m, r in keys}, device,
                                 warmup=args.warmup, repeats=args.repeats)
    rows = []
    for model, runtime in keys:
        t = timings[f"{model}/{runtime}"]
        base = timings[f"original/{runtime}"].median
        q1, q3 = t.quartiles()
        rows.append({"device": device.type, "backbone": backbone.name, "img_size": backbone.size, "batch": args.batch,
                     "model": model, "runtime": runtime, "median_ms": common.ms(t.median), "q1_ms": common.ms(q1),
                     "q3_ms": common.ms(q3), "repeats": len(t.seconds), "over_original": round(t.median / base, 3),
                     "compile_s": prepared.compile_s[model] if runtime == "compile" else "",
                     "max_rel_error": f"{prepared.errors[(model, runtime)]:.2e}"})
    norms = {name: auxwrap.count_norm_layers(m) for name, m in mods.items() if name != "fused-nas-K1"}
    return rows, norms


def targets(rows: list[dict], device: torch.device) -> list[common.Target]:
    out = []
    for row in rows:
        if row["model"] == "deployed" and row["runtime"] == "eager":
            out.append(common.check(f"deployed / original latency, eager, {row['backbone']} ({device.type.upper()})",
                                    row["over_original"], 1.0, note=f"batch {row['batch']}, {row['img_size']} px"))
    if device.type != "cuda":
        out.append(common.check("deployed / original latency, eager (GPU)", None, 1.0))
    return out


def table(rows: list[dict]) -> str:
    body = [(r["backbone"], r["model"], r["runtime"], f"{r['median_ms']:.2f}", f"{r['q1_ms']:.2f}-{r['q3_ms']:.2f}",
             f"{r['over_original']:.3f}", r["compile_s"], r["max_rel_error"]) for r in rows]
    return common.markdown_table(("backbone", "model", "runtime", "median ms", "IQR ms", "/ original (same runtime)",
                                  "first compiled call s", "rel. error vs original"), body, "lllrrrrr")


def main(argv: Sequence[str] | None = None) -> Path:
    p = common.parser(__doc__)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; eager with --quick)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    device, folder = common.setup(args)
    args.backend = args.backend or ("eager" if args.quick else "inductor")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.repeats = args.repeats or (5 if args.quick else 30)
    backbones = QUICK if args.quick else GPU if device.type == "cuda" else CPU
    env = common.environment(device)
    rows, norms = [], {}
    for backbone in backbones:
        t = time.perf_counter()
        measured, norms[backbone.name] = measure(backbone, args, device)
        rows += measured
        print(f"{backbone.name}: {time.perf_counter() - t:.1f} s", flush=True)
    common.write_csv(folder / "deploy_latency.csv", COLUMNS, rows)
    notes = [
        "deployed = attach(primary, copy, mode='nas') -> cut_links -> detach_primary(): the module prune() returns "
        "once the auxiliary -> primary gates are 0 (BatchNorm folded into the convolutions).",
        "fused-nas-K1 = the fused network (eval, gates at their initial 0.5, every connection on): what soft sharing "
        "runs at inference; under torch.compile it is one compiled graph of both branches.",
        "norm layers run (original -> deployed): " + "; ".join(f"{b}: {n['original']} -> {n['deployed']}"
                                                           for b, n in norms.items()),
        f"torch.compile backend '{args.backend}', default mode; 'first compiled call s' includes compilation.",
        "rel. error vs original: ||y - y_original|| / ||y_original|| on the timed batch (primary output).",
    ]
    record = common.Record("deploy_latency", "Deployed primary latency", common.finish_environment(env, started),
                           {"device": device.type, "backbones": ", ".join(f"{b.name} {b.size}px" for b in backbones),
                            "batch": args.batch, "warmup": args.warmup, "repeats": args.repeats,
                            "backend": args.backend, "threads": torch.get_num_threads()},
                           targets(rows, device), notes)
    record.write(folder, "## Latency (medians of interleaved repeats)\n\n" + table(rows))
    record.print_summary(folder)
    return folder


if __name__ == "__main__":
    main()
