"""Training-step time: the fused network against the separate single-task steps of its branches.

One process builds every configuration, then times them with their repeats interleaved (so machine
noise hits all alike), CUDA-synchronised, after warm-up; medians are reported.

- ``single``: one branch alone (model + dense head), forward + backward + Adam step. The K+1 branches
  are copies of one architecture, so the separate single-task steps of a fused network sum to
  (K+1) x this step.
- ``grad K``: the Aux-G fused network (``attach(mode="grad")``), one weight step.
- ``nas K``: the Aux-NAS fused network, one search iteration: the gate step ``auxwrap.Search.step(loss)``
  on one batch, then the weight step on another; both parts are timed (synchronised between them).
- with ViT-Base at 224x224, also the authors' hand-written fusion (``shared/anchors/vit_pair_step.py``), side
  by side in the same interleaved loop (on a CPU its models are built there: the script's ``dev`` is set).

Each branch is a timm ViT with a dense linear head on its tokens (``num_classes=40, global_pool=''``),
as the anchor's stand-in for the DPT decoder; the loss is the sum over tasks of mean(out^2). The fused
configurations share the same branch modules (attach() leaves them unchanged; only timing is measured),
which keeps K = 1, 2, 3 in memory together.

    python benchmarks/train_step.py                 # GPU: ViT-Base 224, batch 20; CPU: ViT-Small 64, batch 8
    python benchmarks/train_step.py --quick         # ViT-Tiny 32, batch 4, K = 1, 2
    # ViT-Base with the reference beside it on a CPU (K = 1 and 2 together did not fit in 24 GiB):
    python benchmarks/train_step.py --backbone vit_base_patch16_224 --img-size 224 --batch 1 --k 1 \
        --warmup 1 --repeats 5 --threads 1 --out benchmarks/results/vit_base_cpu
"""

from __future__ import annotations

import gc
import importlib.util
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import auxwrap
from auxwrap.plan import DEFAULT_WINDOW_FORM, PRIMARY, aux_branch, sources_of

COLUMNS = ("device", "backbone", "img_size", "batch", "impl", "mode", "K", "part", "median_ms", "q1_ms", "q3_ms",
           "repeats", "gflops", "fusion_gflops", "over_separate", "peak_mib")
ANCHORS = ("shared/anchors/vit_pair_step.py",)  # relative to the repository's parent, then to /work
HEAD_CLASSES = 40
# The fusion layers by module name, for the FLOP split: the leaf conv/linear of each fusion. (FlopCounterMode
# attributes to a non-leaf module, here the Fusion, the backward FLOPs of everything upstream of it.)
AUXWRAP_FUSIONS = r"\.fusions\.[^.]+\.weight$"   # FusedNet.fusions.<site>.weight
REFERENCE_FUSIONS = r"\.to_[pa]\.\d+\.\d+$"     # Fused.to_p.<k>.<block> 1x1 convs
LR, GATE_TOTAL_STEPS = 1e-4, 10**6  # a long schedule: the L1 weight stays 0 and nothing is cut while timing
ANCHOR_WINDOW = 3  # the anchor's window(i): up to 3 blocks of the other branch, inside groups of 3 blocks


@dataclass(frozen=True)
class Setting:
    backbone: str
    img_size: int
    batch: int
    ks: tuple[int, ...]
    warmup: int
    repeats: int
    window: int = 3  # attach(window=...): at most this many sources per fusion, in attach()'s default form


GPU = Setting("vit_base_patch16_224", 224, 20, (1, 2, 3), 5, 20)
CPU = Setting("vit_small_patch16_224", 64, 8, (1, 2, 3), 3, 20)
QUICK = Setting("vit_tiny_patch16_224", 32, 4, (1, 2), 1, 3)


# ---------------------------------------------------------------------- configurations


def branch(setting: Setting, device: torch.device) -> nn.Module:
    """One task's model: a timm ViT with a linear head on every token (a light dense head)."""
    model = timm.create_model(setting.backbone, pretrained=False, img_size=setting.img_size,
                              num_classes=HEAD_CLASSES, global_pool="")
    return model.to(device).train()


def task_loss(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(o.float().square().mean() for o in outputs)


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, auxwrap.AuxOutput):
        return [out.primary, *out.aux]
    return list(out) if isinstance(out, (list, tuple)) else [out]


def weight_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> Callable[[], None]:
    """Forward, loss, backward, optimizer step: one training step on ``x``."""

    def step() -> None:
        loss = task_loss(_outputs(model(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


@dataclass
class Config:
    """One timed configuration: its parts run in order in each timed call."""

    impl: str                     # auxwrap | reference
    mode: str                     # single | grad | nas
    k: int
    parts: dict[str, Callable[[], None]]
    optimizers: list[torch.optim.Optimizer]
    model: nn.Module
    fusions: str | None = None    # regex for the module names of the fusion layers, for the FLOP split
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.impl}:{self.mode}" + (f":K{self.k}" if self.mode != "single" else "")

    def call(self, timer: common.PartTimer) -> dict[str, float]:
        for part, fn in self.parts.items():
            with timer(part):
                fn()
        return timer.done()

    def free(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)


def auxwrap_configs(setting: Setting, device: torch.device, xs: tuple[torch.Tensor, torch.Tensor]) -> list[Config]:
    """single, then grad K and nas K for every K, all over one set of K_max + 1 branches."""
    branches = [branch(setting, device) for _ in range(max(setting.ks) + 1)]
    xa, xw = xs
    example = (xw[:2],)
    single_opt = torch.optim.Adam(branches[0].parameters(), lr=LR)
    configs = [Config("auxwrap", "single", 0, {"weight-step": weight_step(branches[0], single_opt, xw)},
                      [single_opt], branches[0])]
    for k in setting.ks:
        net = auxwrap.attach(branches[0], branches[1:k + 1], mode="grad", window=setting.window,
                             example_inputs=example).train()
        opt = torch.optim.Adam(net.weight_parameters(), lr=LR)
        configs.append(Config("auxwrap", "grad", k, {"weight-step": weight_step(net, opt, xw)}, [opt], net,
                              AUXWRAP_FUSIONS, {"connections": len(net.connections())}))
    for k in setting.ks:
        net = auxwrap.attach(branches[0], branches[1:k + 1], mode="nas", window=setting.window,
                             example_inputs=example).train()
        search = auxwrap.Search(net, total_steps=GATE_TOTAL_STEPS)
        opt = torch.optim.Adam(net.weight_parameters(), lr=LR)

        def gate_step(net: nn.Module = net, search: auxwrap.Search = search) -> None:
            search.step(task_loss(_outputs(net(xa))))

        configs.append(Config("auxwrap", "nas", k, {"gate-step": gate_step, "weight-step": weight_step(net, opt, xw)},
                              [opt, search.optimizer], net, AUXWRAP_FUSIONS, {"connections": len(net.connections())}))
    return configs


def window_note(net: auxwrap.FusedNet, connections: str) -> str:
    """The note on what the fused networks read: sources per destination block by the library's own window rule
    (:func:`auxwrap.plan.sources_of`) at the window and form ``net`` was planned with, beside the anchor's."""
    n_dest, n_source = len(net.taps[aux_branch(0)]), len(net.taps[PRIMARY])

    def counts(window: int, form: str) -> list[int]:
        return [len(sources_of(i, n_dest, n_source, window, form)) for i in range(n_dest)]

    ours, anchor = counts(net.window, net.window_form), counts(ANCHOR_WINDOW, "group")
    default = " (attach()'s default)" if net.window_form == DEFAULT_WINDOW_FORM else ""
    return (f"auxwrap fused networks: taps='layer', window={net.window}, window_form={net.window_form!r}{default}: "
            f"sources per destination block {', '.join(map(str, ours))} ({sum(ours)} per direction and auxiliary); "
            f"connections {connections}. The anchor fuses inside groups of {ANCHOR_WINDOW} blocks (auxwrap's "
            f"window_form='group', window={ANCHOR_WINDOW}): {', '.join(map(str, anchor))} ({sum(anchor)}).")


# ---------------------------------------------------------------------- the authors' reference


def find_anchor() -> Path | None:
    for base in (common.ROOT.parent, Path("/work")):
        for rel in ANCHORS:
            if (base / rel).is_file():
                return base / rel
    return None


def load_anchor(path: Path, device: torch.device) -> Any:
    """Import the anchor script as a module (it reads a batch size from sys.argv at import: hide ours) and
    point its module-level device, which its model constructors read, at ``device``. Its code is unchanged."""
    spec = importlib.util.spec_from_file_location("vit_pair_step", path)
    module = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, [str(path)]
    try:
        spec.loader.exec_module(module)
    finally:
        sys.argv = argv
    module.dev = str(device)
    return module


def reference_configs(anchor: Any, setting: Setting, xs: tuple[torch.Tensor, torch.Tensor]) -> list[Config]:
    """The anchor's Single and Fused(k) models with its two Adam optimisers, on our inputs and loss.

    Its iteration is as in its ``run()``: a gate step that backpropagates the whole loss (weights
    included) and steps Adam on the sigmoid gates, then a weight step.
    """
    xa, xw = xs
    single = anchor.Single()
    opt = torch.optim.Adam(single.parameters(), lr=LR)
    configs = [Config("reference", "single", 0, {"weight-step": weight_step(single, opt, xw)}, [opt], single)]
    for k in setting.ks:
        fused = anchor.Fused(k)
        arch = [fused.alpha_p, fused.alpha_a]
        weights = [p for n, p in fused.named_parameters() if not n.startswith("alpha")]
        w_opt, a_opt = torch.optim.Adam(weights, lr=LR), torch.optim.Adam(arch, lr=1e-2)
        configs.append(Config("reference", "nas", k, {"gate-step": weight_step(fused, a_opt, xa),
                                                      "weight-step": weight_step(fused, w_opt, xw)},
                              [w_opt, a_opt], fused, REFERENCE_FUSIONS))
    return configs


# ---------------------------------------------------------------------- measuring


def step_flops(config: Config) -> dict[str, tuple[int, int]]:
    """FLOPs of each part of one call, and the part done by the fusion layers (by module name)."""
    result = {}
    for part, fn in config.parts.items():
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        fusion = 0
        if config.fusions:
            pattern = re.compile(config.fusions)
            fusion = sum(sum(v.values()) for key, v in counter.get_flop_counts().items() if pattern.search(key))
        result[part] = (counter.get_total_flops(), fusion)
    config.free()
    return result


def peak_mib(config: Config, device: torch.device) -> float | None:
    """What the configuration would need alone on the GPU: its parameters and Adam moments (3 x parameter
    bytes), plus the peak one call allocates above what was allocated before it."""
    if device.type != "cuda":
        return None
    config.free()
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    config.call(common.PartTimer(device))
    torch.cuda.synchronize(device)
    step = torch.cuda.max_memory_allocated(device) - before
    config.free()
    resident = 3 * sum(p.numel() * p.element_size() for p in config.model.parameters())
    return round((resident + step) / 2**20, 1)


def profile_ops(fn: Callable[[], None], device: torch.device, top: int = 12) -> list[tuple[str, float]]:
    """Self time (ms) per operator of one call, largest first (device time on CUDA, CPU time otherwise)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        common.synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, attr))
    return [(e.key, getattr(e, attr) / 1e3) for e in events[:top]]


# ---------------------------------------------------------------------- report


def rows_of(configs: list[Config], timings: dict[str, common.Timing], flops: dict[str, dict],
            peaks: dict[str, float | None], setting: Setting, device: torch.device) -> list[dict]:
    rows = []
    singles = {c.impl: timings[c.name].part("weight-step").median for c in configs if c.mode == "single"}
    for c in configs:
        timing = timings[c.name]
        parts = [(p, timing.part(p)) for p in c.parts]
        if len(parts) > 1:
            parts.append(("iteration", timing))
        for part, t in parts:
            q1, q3 = t.quartiles()
            gf = flops[c.name]
            total = sum(v[0] for v in gf.values()) if part == "iteration" else gf[part][0]
            fusion = sum(v[1] for v in gf.values()) if part == "iteration" else gf[part][1]
            separate = (c.k + 1) * singles[c.impl]
            rows.append({
                "device": device.type, "backbone": setting.backbone, "img_size": setting.img_size,
                "batch": setting.batch, "impl": c.impl, "mode": c.mode, "K": c.k, "part": part,
                "median_ms": common.ms(t.median), "q1_ms": common.ms(q1), "q3_ms": common.ms(q3),
                "repeats": len(t.seconds), "gflops": round(total / 1e9, 3), "fusion_gflops": round(fusion / 1e9, 3),
                "over_separate": "" if part == "gate-step" else round(t.median / separate, 3),
                "peak_mib": "" if peaks.get(c.name) is None else peaks[c.name],
            })
    return rows


def _row(rows: list[dict], impl: str, mode: str, k: int, part: str) -> dict | None:
    return next((r for r in rows if (r["impl"], r["mode"], r["K"], r["part"]) == (impl, mode, k, part)), None)


def targets(rows: list[dict], setting: Setting, device: torch.device) -> list[common.Target]:
    """The issue's targets. Those stated for the GPU are one 'not measured' row each on a CPU, followed by
    the same ratios measured on this CPU (met/missed against the same threshold)."""
    gpu = device.type == "cuda"
    where = f"{device.type.upper()}, {setting.backbone} {setting.img_size}px batch {setting.batch}"
    if setting.window != 3:
        where += f", window {setting.window}"
    out = []
    if not gpu:
        out += [common.check("fused weight step / sum of separate steps, grad and nas, every K (GPU)", None, 1.10,
                             note="reference 1.29 on an H100; the CPU values follow"),
                common.check("search iteration / the reference's iteration, same GPU", None, 0.65,
                             note="the CPU values follow where the reference ran")]
    for mode in ("grad", "nas"):
        for k in setting.ks:
            r = _row(rows, "auxwrap", mode, k, "weight-step")
            out.append(common.check(f"fused weight step / sum of separate steps, {mode}, K={k} ({device.type.upper()})",
                                    r["over_separate"], 1.10, note=where))
    for k in setting.ks:
        ours, ref = _row(rows, "auxwrap", "nas", k, "iteration"), _row(rows, "reference", "nas", k, "iteration")
        if gpu or ref:
            out.append(common.check(f"search iteration / the reference's iteration, K={k} (same {device.type.upper()})",
                                    ours["median_ms"] / ref["median_ms"] if ref else None, 0.65, note=where,
                                    missing="not measured: the reference was not run (see notes)"))
    if 1 in setting.ks and 2 in setting.ks:
        for mode, part, label in (("nas", "iteration", "search iteration"), ("grad", "weight-step", "Aux-G step")):
            one, two = _row(rows, "auxwrap", mode, 1, part), _row(rows, "auxwrap", mode, 2, part)
            note = f"{where}; reference 1.60 (H100), paper 1.65"
            ref1, ref2 = (_row(rows, "reference", "nas", k, "iteration") for k in (1, 2))
            if mode == "nas" and ref1 and ref2:
                note += f"; the reference here: {ref2['median_ms'] / ref1['median_ms']:.3f}"
            out.append(common.check(f"{label}(K=2) / {label}(K=1) ({device.type.upper()})",
                                    two["median_ms"] / one["median_ms"], 1.5, note=note))
        if not gpu:
            out.append(common.check("search iteration(K=2) / iteration(K=1) (GPU)", None, 1.5))
    return out


def timing_table(rows: list[dict]) -> str:
    body = [(r["impl"], r["mode"], r["K"], r["part"], f"{r['median_ms']:.1f}", f"{r['q1_ms']:.1f}-{r['q3_ms']:.1f}",
             r["gflops"], f"{100 * r['fusion_gflops'] / r['gflops']:.1f}" if r["gflops"] else "",
             r["over_separate"], r["peak_mib"]) for r in rows]
    return common.markdown_table(("impl", "mode", "K", "part", "median ms", "IQR ms", "GFLOPs", "fusion % of FLOPs",
                                  "time / sum of separate", "peak MiB"), body, "lllrrrrrrr")


def why_table(rows: list[dict], setting: Setting) -> str:
    """Time ratio against FLOP ratio: where the time ratio follows the FLOP ratio, the extra time is the
    fusion layers' arithmetic, not overhead."""
    single = _row(rows, "auxwrap", "single", 0, "weight-step")
    body = []
    for mode in ("grad", "nas"):
        for k in setting.ks:
            r = _row(rows, "auxwrap", mode, k, "weight-step")
            flop_ratio = r["gflops"] / ((k + 1) * single["gflops"])
            body.append((mode, k, f"{r['over_separate']:.3f}", f"{flop_ratio:.3f}",
                         f"{100 * r['fusion_gflops'] / r['gflops']:.1f}"))
    return common.markdown_table(("mode", "K", "time / sum of separate", "FLOPs / sum of separate",
                                  "fusion layers' share of the step's FLOPs (%)"), body, "lrrrr")


def explanation(rows: list[dict], setting: Setting, fused_ops: list[tuple[str, float]],
                single_ops: list[tuple[str, float]], k: int) -> list[str]:
    """What the measurements say about the targets: the FLOP ratios bound the time ratios of a device that
    is equally efficient on the fused and the separate steps; the profiler shows where the extra time is."""
    single = _row(rows, "auxwrap", "single", 0, "weight-step")
    lines = []
    for mode in ("grad", "nas"):
        ratios = {kk: _row(rows, "auxwrap", mode, kk, "weight-step")["gflops"] / ((kk + 1) * single["gflops"])
                  for kk in setting.ks}
        above = [f"K={kk}: {r:.3f}" for kk, r in ratios.items() if r > 1.10]
        if above:
            lines.append(f"{mode}: the fused weight step does more arithmetic than 1.10 x the separate steps "
                         f"({', '.join(above)}); the fusion linears are that extra. A device as efficient on the "
                         f"fused step as on the separate ones cannot reach 1.10 there with window={setting.window}"
                         + (" (a smaller --window means less fusion arithmetic)." if setting.window > 1 else
                            "; fewer fusion points (taps) is what remains."))
    one, two = _row(rows, "auxwrap", "nas", 1, "iteration"), _row(rows, "auxwrap", "nas", 2, "iteration")
    if one and two:
        flop_ratio, time_ratio = two["gflops"] / one["gflops"], two["median_ms"] / one["median_ms"]
        lines.append(f"iteration(K=2) / iteration(K=1): FLOPs {flop_ratio:.3f}, time {time_ratio:.3f}. K=2 adds a "
                     "third branch (x1.5) and doubles the fusion layers, so the arithmetic grows by more than 1.5 "
                     "((3N + 2F) / (2N + F) > 1.5 for N per branch and any fusion cost F > 0 per pair); "
                     + ("the time grows less than the arithmetic: part of a step does not grow with K (Python, "
                        "optimizer launches)." if time_ratio < flop_ratio else
                        "the time follows the arithmetic."))
    lines += reference_lines(rows, setting)
    fused, singles = dict(fused_ops), dict(single_ops)
    if "aten::mm" in fused:
        extra = fused["aten::mm"] - (k + 1) * singles.get("aten::mm", 0.0)
        step = _row(rows, "auxwrap", "nas", k, "weight-step")
        others = [op for op in fused if op != "aten::mm"]
        rest_fused = sum(fused[op] for op in others)
        rest_single = (k + 1) * sum(singles.get(op, 0.0) for op in others)
        lines.append(f"profiler (nas K={k}): `aten::mm` (the fusion linears are bias-free: mm, not addmm) takes "
                     f"{extra:.0f} ms more in the fused step than in {k + 1} single steps, "
                     f"{100 * extra / step['median_ms']:.0f}% of the fused step's median; the fusion layers' FLOP "
                     f"share is {100 * step['fusion_gflops'] / step['gflops']:.0f}%. The other operators of the "
                     f"table: {rest_fused:.0f} ms fused against {rest_single:.0f} ms separate.")
    return lines


def reference_lines(rows: list[dict], setting: Setting) -> list[str]:
    """Our search iteration against the reference's, part by part, in time and in FLOPs.

    Both alternate a gate step on one batch with a weight step on another (the paper's scheme). Ours
    differentiates the gate step w.r.t. the gates only (a forward and an input-gradient backward), the
    reference's also computes every weight gradient: in FLOPs about 2 + 3 against 3 + 3 forward passes.
    """
    lines = []
    for k in setting.ks:
        ours = {part: _row(rows, "auxwrap", "nas", k, part) for part in ("gate-step", "weight-step", "iteration")}
        ref = {part: _row(rows, "reference", "nas", k, part) for part in ("gate-step", "weight-step", "iteration")}
        if not all(ref.values()):
            continue
        parts = ", ".join(f"{part} {ours[part]['median_ms'] / ref[part]['median_ms']:.3f} "
                          f"(FLOPs {ours[part]['gflops'] / ref[part]['gflops']:.3f})" for part in ours)
        floor = (ours["gate-step"]["gflops"] + ref["weight-step"]["gflops"]) / ref["iteration"]["gflops"]
        gate_share = ours["gate-step"]["gflops"] / ours["weight-step"]["gflops"]
        lines.append(f"against the reference, nas K={k}, ours / theirs in time (and FLOPs): {parts}. Our gate step "
                     f"is {gate_share:.2f} of our weight step in FLOPs (a forward and an input-gradient backward, "
                     "no weight gradients). Even with a weight step as cheap as the reference's (its grouped window), "
                     f"the iteration would be {floor:.3f} of the reference's in FLOPs: alternating two batches (the "
                     "paper's scheme) needs a forward and a backward per batch, so 0.65 needs a device that runs our "
                     "program faster per FLOP than the reference's.")
    return lines


def profile_table(fused: list[tuple[str, float]], single: list[tuple[str, float]], k: int) -> str:
    singles = dict(single)
    body = [(f"`{op}`", f"{t:.1f}", f"{(k + 1) * singles.get(op, 0.0):.1f}") for op, t in fused]
    return common.markdown_table(("operator", "fused nas weight step, self ms", f"{k + 1} x single step, self ms"),
                                 body, "lrr")


def ratio_lines(rows: list[dict], setting: Setting) -> list[str]:
    lines = []
    for impl in ("auxwrap", "reference"):
        one, two = _row(rows, impl, "nas", 1, "iteration"), _row(rows, impl, "nas", 2, "iteration")
        if one and two:
            lines.append(f"{impl}: iteration(K=2) / iteration(K=1) = {two['median_ms'] / one['median_ms']:.3f} "
                         f"(FLOPs: {two['gflops'] / one['gflops']:.3f})")
    return lines


def main(argv: Sequence[str] | None = None) -> Path:
    p = common.parser(__doc__)
    p.add_argument("--backbone", help="timm ViT name (default: vit_base_patch16_224 on GPU, vit_small on CPU)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--k", type=int, nargs="+", help="numbers of auxiliaries (default 1 2 3)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--window", type=int, default=3,
                   help="attach(window=...): at most this many sources per fusion, in attach()'s default "
                        f"window_form ({DEFAULT_WINDOW_FORM!r}) (default 3)")
    p.add_argument("--no-reference", action="store_true", help="do not time the anchor script (ViT-Base 224 only)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    device, folder = common.setup(args)
    base = QUICK if args.quick else GPU if device.type == "cuda" else CPU
    setting = Setting(args.backbone or base.backbone, args.img_size or base.img_size, args.batch or base.batch,
                      tuple(args.k or base.ks), args.warmup if args.warmup is not None else base.warmup,
                      args.repeats or base.repeats, args.window)
    env = common.environment(device)
    flushed = common.flush_denormals(device)
    if device.type == "cuda":  # fp32 throughout, as the paper and the anchor (which also sets these at import)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    gen = torch.Generator().manual_seed(0)
    xs = tuple(torch.randn(setting.batch, 3, setting.img_size, setting.img_size, generator=gen).to(device)
               for _ in range(2))
    configs = auxwrap_configs(setting, device, xs)
    notes = []
    anchor_path = find_anchor()
    use_reference = not args.no_reference and setting.backbone == "vit_base_patch16_224" and setting.img_size == 224
    if use_reference and anchor_path is not None:
        anchor = load_anchor(anchor_path, device)
        configs += reference_configs(anchor, setting, xs)
        notes.append(f"reference: {anchor_path} (its Fused/Single models and two Adam optimisers; our inputs and "
                     f"loss; built on {device}), timed in the same interleaved loop")
    else:
        notes.append("reference not timed: it needs ViT-Base at 224 px (--backbone vit_base_patch16_224 "
                     f"--img-size 224) and the anchor script ({'found' if anchor_path else 'not found'})"
                     + ("; --no-reference given" if args.no_reference else ""))
    print(f"{len(configs)} configurations on {device}; timing {setting}", flush=True)

    timer = common.PartTimer(device)
    by_name = {c.name: c for c in configs}
    timings = common.interleaved({c.name: (lambda c=c: c.call(timer)) for c in configs}, device,
                                 warmup=setting.warmup, repeats=setting.repeats, after=lambda n: by_name[n].free())
    flops = {c.name: step_flops(c) for c in configs}
    peaks = {c.name: peak_mib(c, device) for c in configs}
    k_prof = min(setting.ks)
    fused = next(c for c in configs if (c.impl, c.mode, c.k) == ("auxwrap", "nas", k_prof))
    single = configs[0]
    fused_ops = profile_ops(fused.parts["weight-step"], device)
    single_ops = profile_ops(single.parts["weight-step"], device, top=200)
    rows = rows_of(configs, timings, flops, peaks, setting, device)
    common.write_csv(folder / "train_step.csv", COLUMNS, rows)

    connections = ", ".join(f"{c.mode} K={c.k}: {c.extra['connections']}" for c in configs if "connections" in c.extra)
    if flushed:
        notes.append("CPU: denormal floats flushed to zero (torch.set_flush_denormal(True)): this loss, mean(out^2) "
                     "on random data, drives values into the denormal range within ~100 steps, after which a CPU "
                     "step ran up to 80x slower (a GPU has no such penalty); see benchmarks/common.py.")
    notes += [
        window_note(next(c.model for c in configs if c.mode == "grad"), connections),
        "auxwrap.Search.step differentiates the loss w.r.t. the gates only (torch.autograd.grad): no weight "
        "gradients in the gate step; the anchor's gate step backpropagates into every weight.",
        "Search with its defaults (Adam lr 1e-2, record=True) and total_steps=1e6, so the L1 weight is 0 and "
        "nothing is cut while timing; weight optimiser Adam lr 1e-4 for every configuration.",
        "time / sum of separate = median step / ((K+1) x median single step); for an iteration (two batches, "
        "gate step + weight step) it is given for reference only.",
        "peak MiB (CUDA only): parameters + Adam moments of the configuration + the peak one call allocates above "
        "what was allocated before it, i.e. what it would need alone.",
    ]
    record = common.Record("train_step", "Training step: fused network vs separate single-task steps",
                           common.finish_environment(env, started),
                           {"device": device.type, "backbone": setting.backbone, "img_size": setting.img_size,
                            "batch": setting.batch, "K": list(setting.ks), "warmup": setting.warmup,
                            "repeats": setting.repeats, "window": setting.window, "threads": torch.get_num_threads(),
                            "flush_denormal": flushed},
                           targets(rows, setting, device), notes)
    body = "\n".join([
        "## Step times (medians of interleaved repeats)", "", timing_table(rows), "",
        *[f"- {line}" for line in ratio_lines(rows, setting)], "",
        "## Where the time goes", "",
        "The fused step does more arithmetic than the separate steps: every destination block adds a linear "
        f"layer from up to {setting.window} concatenated source blocks ({setting.window}C x C per token, against "
        "about 12C^2 for a ViT block), in the forward pass, the input-gradient and the weight-gradient passes. "
        "Time ratio against FLOP ratio:",
        "", why_table(rows, setting), "",
        f"Operators by self time, one nas K={k_prof} weight step against {k_prof + 1} single steps (profiler, "
        f"{'device' if device.type == 'cuda' else 'CPU'} time):", "",
        profile_table(fused_ops, single_ops, k_prof), "",
        *[f"- {line}" for line in explanation(rows, setting, fused_ops, single_ops, k_prof)],
    ])
    record.write(folder, body)
    record.print_summary(folder)
    return folder


if __name__ == "__main__":
    main()
