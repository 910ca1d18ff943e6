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
- ``--compile`` adds every configuration again under ``torch.compile`` (the model; the optimiser step stays
  eager), ``--amp bf16|fp16`` again under ``torch.autocast`` (fp16 with a GradScaler for the weight steps);
  both together give four variants (runtime x precision), timed in the same interleaved loop. A compiled
  configuration's first call, which compiles, is timed apart (``compile_s``). FLOPs are counted once, eager
  fp32: the arithmetic of a step does not depend on the variant.
- time / FLOPs: (fused time / sum of the separate times) / (fused FLOPs / sum of the separate FLOPs), per
  weight step: 1.0 means the fused step costs exactly its extra arithmetic, no overhead beyond it.

Each branch is a timm ViT with a dense linear head on its tokens (``num_classes=40, global_pool=''``),
as the anchor's stand-in for the DPT decoder; the loss is the sum over tasks of mean(out^2). The fused
configurations share the same branch modules (attach() leaves them unchanged; only timing is measured),
which keeps K = 1, 2, 3 in memory together.

    python benchmarks/train_step.py                 # GPU: ViT-Base 224, batch 20; CPU: ViT-Small 64, batch 8
    python benchmarks/train_step.py --quick         # ViT-Tiny 32, batch 4, K = 1, 2
    python benchmarks/train_step.py --quick --compile --amp bf16   # + compiled (backend aot_eager), + bf16
    # ViT-Base with the reference beside it on a CPU (K = 1 and 2 together did not fit in 24 GiB):
    python benchmarks/train_step.py --backbone vit_base_patch16_224 --img-size 224 --batch 1 --k 1 \
        --warmup 1 --repeats 5 --threads 1 --out benchmarks/results/vit_base_cpu
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import itertools
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
           "repeats", "gflops", "fusion_gflops", "over_separate", "peak_mib", "runtime", "precision", "compile_s",
           "flops_over_separate", "time_over_flops")
ANCHORS = ("shared/anchors/vit_pair_step.py",)  # relative to the repository's parent, then to /work
HEAD_CLASSES = 40
# The fusion layers by module name, for the FLOP split: the leaf conv/linear of each fusion. (FlopCounterMode
# attributes to a non-leaf module, here the Fusion, the backward FLOPs of everything upstream of it.)
AUXWRAP_FUSIONS = r"\.fusions\.[^.]+\.weight$"   # FusedNet.fusions.<site>.weight
REFERENCE_FUSIONS = r"\.to_[pa]\.\d+\.\d+$"     # Fused.to_p.<k>.<block> 1x1 convs
LR, GATE_TOTAL_STEPS = 1e-4, 10**6  # a long schedule: the L1 weight stays 0 and nothing is cut while timing
ANCHOR_WINDOW = 3  # the anchor's window(i): up to 3 blocks of the other branch, inside groups of 3 blocks
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TIME_OVER_FLOPS = 1.05  # the bound on (time ratio) / (FLOP ratio): no overhead beyond the arithmetic


@dataclass(frozen=True)
class Setting:
    backbone: str
    img_size: int
    batch: int
    ks: tuple[int, ...]
    warmup: int
    repeats: int
    window: int = 3  # attach(window=...): at most this many sources per fusion, in attach()'s default form
    depth: int | None = None  # ViT blocks (default: the model's own); fewer makes a quicker check of the script


GPU = Setting("vit_base_patch16_224", 224, 20, (1, 2, 3), 5, 20)
CPU = Setting("vit_small_patch16_224", 64, 8, (1, 2, 3), 3, 20)
QUICK = Setting("vit_tiny_patch16_224", 32, 4, (1, 2), 1, 3)


@dataclass(frozen=True)
class Variant:
    """How a configuration runs: eager or ``torch.compile``d, fp32 or under ``torch.autocast``."""

    runtime: str = "eager"     # eager | compiled
    precision: str = "fp32"    # fp32 | bf16 | fp16

    @property
    def suffix(self) -> str:
        """'' for eager fp32 (the paper's setting: names and target labels as before), else ' compiled bf16' etc."""
        return "" if self == BASE else f" {self.runtime} {self.precision}"

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=AMP_DTYPES[self.precision])


BASE = Variant()


def make_variants(compile: bool, amp: str | None) -> list[Variant]:
    """Eager fp32 first (it is what the FLOPs are counted and the profile taken on), then the others asked for."""
    runtimes = ("eager", "compiled") if compile else ("eager",)
    precisions = ("fp32", amp) if amp else ("fp32",)
    return [Variant(r, p) for p, r in itertools.product(precisions, runtimes)]


# ---------------------------------------------------------------------- configurations


def branch(setting: Setting, device: torch.device) -> nn.Module:
    """One task's model: a timm ViT with a linear head on every token (a light dense head)."""
    depth = {} if setting.depth is None else {"depth": setting.depth}
    model = timm.create_model(setting.backbone, pretrained=False, img_size=setting.img_size,
                              num_classes=HEAD_CLASSES, global_pool="", **depth)
    return model.to(device).train()


def task_loss(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(o.float().square().mean() for o in outputs)


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, auxwrap.AuxOutput):
        return [out.primary, *out.aux]
    return list(out) if isinstance(out, (list, tuple)) else [out]


def runner(model: nn.Module, variant: Variant, device: torch.device, backend: str) -> Callable[[torch.Tensor], Any]:
    """``model``'s forward as ``variant`` runs it: compiled (``torch.compile(model, backend)``: the same
    parameters) and/or under autocast."""
    forward = torch.compile(model, backend=backend) if variant.runtime == "compiled" else model

    def run(x: torch.Tensor) -> Any:
        with variant.autocast(device):
            return forward(x)
    return run


def grad_scaler(variant: Variant, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (bf16 and fp32 do not): what a user would run."""
    return torch.amp.GradScaler(device.type) if variant.precision == "fp16" else None


def weight_step(forward: Callable[[torch.Tensor], Any], opt: torch.optim.Optimizer, x: torch.Tensor,
                scaler: torch.amp.GradScaler | None = None) -> Callable[[], None]:
    """Forward, loss, backward, optimizer step: one training step on ``x`` (scaled where ``scaler`` is given)."""

    def step() -> None:
        loss = task_loss(_outputs(forward(x)))
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
            return
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
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
    variant: Variant = BASE

    @property
    def name(self) -> str:
        return (f"{self.impl}:{self.mode}" + (f":K{self.k}" if self.mode != "single" else "")
                + ("" if self.variant == BASE else f"@{self.variant.runtime}-{self.variant.precision}"))

    @property
    def key(self) -> tuple[str, str, int]:
        """What the configuration computes, whatever its variant: the key its FLOPs are counted under."""
        return self.impl, self.mode, self.k

    def call(self, timer: common.PartTimer) -> dict[str, float]:
        for part, fn in self.parts.items():
            with timer(part):
                fn()
        return timer.done()

    def free(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)


def auxwrap_configs(setting: Setting, device: torch.device, xs: tuple[torch.Tensor, torch.Tensor],
                    variants: Sequence[Variant] = (BASE,), backend: str = "inductor") -> list[Config]:
    """single, then grad K and nas K for every K, all over one set of K_max + 1 branches; each in every variant
    (its own optimisers, the same modules)."""
    branches = [branch(setting, device) for _ in range(max(setting.ks) + 1)]
    example = (xs[1][:2],)
    nets = [("grad", k, auxwrap.attach(branches[0], branches[1:k + 1], mode="grad", window=setting.window,
                                       example_inputs=example).train()) for k in setting.ks]
    nets += [("nas", k, auxwrap.attach(branches[0], branches[1:k + 1], mode="nas", window=setting.window,
                                       example_inputs=example).train()) for k in setting.ks]
    configs = []
    for variant in variants:
        configs.append(single_config("auxwrap", branches[0], runner(branches[0], variant, device, backend), xs[1],
                                     variant, device))
        configs += [fused_config(mode, k, net, runner(net, variant, device, backend), xs, variant, device)
                    for mode, k, net in nets]
    return configs


def single_config(impl: str, model: nn.Module, forward: Callable, x: torch.Tensor, variant: Variant,
                  device: torch.device) -> Config:
    """One branch alone: its weight step."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    return Config(impl, "single", 0, {"weight-step": weight_step(forward, opt, x, grad_scaler(variant, device))},
                  [opt], model, variant=variant)


def fused_config(mode: str, k: int, net: auxwrap.FusedNet, forward: Callable, xs: tuple[torch.Tensor, torch.Tensor],
                 variant: Variant, device: torch.device) -> Config:
    """An auxwrap fused network: a weight step (grad), or a gate step (``Search.step``) then a weight step (nas)."""
    xa, xw = xs
    opt = torch.optim.Adam(net.weight_parameters(), lr=LR)
    parts = {"weight-step": weight_step(forward, opt, xw, grad_scaler(variant, device))}
    optimizers = [opt]
    if mode == "nas":
        search = auxwrap.Search(net, total_steps=GATE_TOTAL_STEPS)

        def gate_step() -> None:
            search.step(task_loss(_outputs(forward(xa))))

        parts = {"gate-step": gate_step, **parts}
        optimizers.append(search.optimizer)
    return Config("auxwrap", mode, k, parts, optimizers, net, AUXWRAP_FUSIONS, {"connections": len(net.connections())},
                  variant)


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


def reference_configs(anchor: Any, setting: Setting, xs: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                      variants: Sequence[Variant] = (BASE,), backend: str = "inductor") -> list[Config]:
    """The anchor's Single and Fused(k) models with its two Adam optimisers, on our inputs and loss, in every
    variant (compiled and autocast from outside: its code is unchanged).

    Its iteration is as in its ``run()``: a gate step that backpropagates the whole loss (weights
    included) and steps Adam on the sigmoid gates, then a weight step.
    """
    xa, xw = xs
    single, fused = anchor.Single(), {k: anchor.Fused(k) for k in setting.ks}
    configs = []
    for variant in variants:
        configs.append(single_config("reference", single, runner(single, variant, device, backend), xw, variant,
                                     device))
        for k, model in fused.items():
            arch = [model.alpha_p, model.alpha_a]
            weights = [p for n, p in model.named_parameters() if not n.startswith("alpha")]
            w_opt, a_opt = torch.optim.Adam(weights, lr=LR), torch.optim.Adam(arch, lr=1e-2)
            forward = runner(model, variant, device, backend)
            parts = {"gate-step": weight_step(forward, a_opt, xa, grad_scaler(variant, device)),
                     "weight-step": weight_step(forward, w_opt, xw, grad_scaler(variant, device))}
            configs.append(Config("reference", "nas", k, parts, [w_opt, a_opt], model, REFERENCE_FUSIONS,
                                  variant=variant))
    return configs


# ---------------------------------------------------------------------- measuring


def first_calls(configs: list[Config], device: torch.device) -> dict[str, float]:
    """Seconds of the first call of each compiled configuration (it compiles: forward, backward and, for nas, the
    gate step's graph), before any timing; the steady-state steps are timed after warm-up."""
    seconds = {}
    for c in configs:
        if c.variant.runtime == "compiled":
            seconds[c.name], _ = common.time_once(lambda c=c: c.call(common.PartTimer(device)), device)
            c.free()
            print(f"{c.name}: first call {seconds[c.name]:.1f} s", flush=True)
    return seconds


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


def rows_of(configs: list[Config], timings: dict[str, common.Timing], flops: dict[tuple, dict],
            peaks: dict[str, float | None], setting: Setting, device: torch.device,
            compile_s: dict[str, float] | None = None) -> list[dict]:
    """One row per configuration and part (and the iteration of a two-part call). ``flops`` is keyed by
    :attr:`Config.key`; the separate steps a fused row is compared with are the single rows of its impl and
    variant."""
    rows, compile_s = [], compile_s or {}
    singles = {(c.impl, c.variant): timings[c.name].part("weight-step").median for c in configs if c.mode == "single"}
    single_flops = {c.impl: flops[c.key]["weight-step"][0] for c in configs if c.mode == "single"}
    for c in configs:
        timing = timings[c.name]
        parts = [(p, timing.part(p)) for p in c.parts]
        if len(parts) > 1:
            parts.append(("iteration", timing))
        for part, t in parts:
            q1, q3 = t.quartiles()
            gf = flops[c.key]
            total = sum(v[0] for v in gf.values()) if part == "iteration" else gf[part][0]
            fusion = sum(v[1] for v in gf.values()) if part == "iteration" else gf[part][1]
            over = t.median / ((c.k + 1) * singles[c.impl, c.variant])
            flop_ratio = total / ((c.k + 1) * single_flops[c.impl]) if part == "weight-step" else None
            rows.append({
                "device": device.type, "backbone": setting.backbone, "img_size": setting.img_size,
                "batch": setting.batch, "impl": c.impl, "mode": c.mode, "K": c.k, "part": part,
                "median_ms": common.ms(t.median), "q1_ms": common.ms(q1), "q3_ms": common.ms(q3),
                "repeats": len(t.seconds), "gflops": round(total / 1e9, 3), "fusion_gflops": round(fusion / 1e9, 3),
                "over_separate": "" if part == "gate-step" else round(over, 3),
                "peak_mib": "" if peaks.get(c.name) is None else peaks[c.name],
                "runtime": c.variant.runtime, "precision": c.variant.precision,
                "compile_s": round(compile_s[c.name], 1) if c.name in compile_s and part == "weight-step" else "",
                "flops_over_separate": "" if flop_ratio is None else round(flop_ratio, 3),
                "time_over_flops": "" if flop_ratio is None else round(over / flop_ratio, 3),
            })
    return rows


def _row(rows: list[dict], impl: str, mode: str, k: int, part: str, variant: Variant = BASE) -> dict | None:
    key = (impl, mode, k, part, variant.runtime, variant.precision)
    return next((r for r in rows if (r["impl"], r["mode"], r["K"], r["part"], r.get("runtime", "eager"),
                                     r.get("precision", "fp32")) == key), None)


def variants_of(rows: list[dict]) -> list[Variant]:
    """The variants ``rows`` hold, in their order."""
    return list(dict.fromkeys(Variant(r.get("runtime", "eager"), r.get("precision", "fp32")) for r in rows))


def time_over_flops_target(rows: list[dict], variant: Variant, dev: str, where: str) -> common.Target:
    """The largest (time ratio) / (FLOP ratio) over the fused weight steps (grad and nas, every K) of
    ``variant``: at most 1.05 means no overhead beyond the fusion layers' arithmetic."""
    fused = [r for r in rows if r["impl"] == "auxwrap" and r["mode"] in ("grad", "nas") and r["part"] == "weight-step"
             and Variant(r["runtime"], r["precision"]) == variant]
    worst = max(fused, key=lambda r: r["time_over_flops"])
    return common.check(f"(time / sum of separate) / (FLOPs / sum of separate), every fused weight step"
                        f"{variant.suffix} ({dev})", worst["time_over_flops"], TIME_OVER_FLOPS,
                        note=f"largest: {worst['mode']} K={worst['K']}; {where}")


def targets(rows: list[dict], setting: Setting, device: torch.device) -> list[common.Target]:
    """The issue's targets, for every variant the rows hold (eager fp32 first, labelled as before; the others
    with their runtime and precision in the label). Those stated for the GPU are one 'not measured' row each
    on a CPU, followed by the same ratios measured on this CPU (met/missed against the same threshold)."""
    gpu = device.type == "cuda"
    where = f"{device.type.upper()}, {setting.backbone} {setting.img_size}px batch {setting.batch}"
    if setting.window != 3:
        where += f", window {setting.window}"
    if setting.depth is not None:
        where += f", depth {setting.depth}"
    out = []
    if not gpu:
        out += [common.check("fused weight step / sum of separate steps, grad and nas, every K (GPU)", None, 1.10,
                             note="reference 1.29 on an H100; the CPU values follow"),
                common.check("search iteration / the reference's iteration, same GPU", None, 0.65,
                             note="the CPU values follow where the reference ran")]
    for variant in variants_of(rows):
        out += variant_targets(rows, setting, device, variant, where)
    if not gpu and 1 in setting.ks and 2 in setting.ks:
        out.append(common.check("search iteration(K=2) / iteration(K=1) (GPU)", None, 1.5))
    return out


def variant_targets(rows: list[dict], setting: Setting, device: torch.device, variant: Variant,
                    where: str) -> list[common.Target]:
    """The measured targets of one variant; with eager fp32 (the only variant before ``--compile``/``--amp``)
    the labels and order are those of the earlier runs, plus the time / FLOPs row."""
    gpu, dev, v = device.type == "cuda", device.type.upper(), variant.suffix
    out = []
    for mode in ("grad", "nas"):
        for k in setting.ks:
            r = _row(rows, "auxwrap", mode, k, "weight-step", variant)
            out.append(common.check(f"fused weight step / sum of separate steps, {mode}, K={k}{v} ({dev})",
                                    r["over_separate"], 1.10, note=where))
    out.append(time_over_flops_target(rows, variant, dev, where))
    for k in setting.ks:
        ours = _row(rows, "auxwrap", "nas", k, "iteration", variant)
        ref = _row(rows, "reference", "nas", k, "iteration", variant)
        if gpu or ref:
            out.append(common.check(f"search iteration / the reference's iteration, K={k}{v} (same {dev})",
                                    ours["median_ms"] / ref["median_ms"] if ref else None, 0.65, note=where,
                                    missing="not measured: the reference was not run (see notes)"))
    if 1 in setting.ks and 2 in setting.ks:
        for mode, part, label in (("nas", "iteration", "search iteration"), ("grad", "weight-step", "Aux-G step")):
            one, two = (_row(rows, "auxwrap", mode, k, part, variant) for k in (1, 2))
            note = f"{where}; reference 1.60 (H100), paper 1.65"
            ref1, ref2 = (_row(rows, "reference", "nas", k, "iteration", variant) for k in (1, 2))
            if mode == "nas" and ref1 and ref2:
                note += f"; the reference here: {ref2['median_ms'] / ref1['median_ms']:.3f}"
            out.append(common.check(f"{label}(K=2) / {label}(K=1){v} ({dev})",
                                    two["median_ms"] / one["median_ms"], 1.5, note=note))
    return out


def timing_table(rows: list[dict]) -> str:
    body = [(r["impl"], r["mode"], r["K"], r["part"], r["runtime"], r["precision"], f"{r['median_ms']:.1f}",
             f"{r['q1_ms']:.1f}-{r['q3_ms']:.1f}", r["compile_s"], r["gflops"],
             f"{100 * r['fusion_gflops'] / r['gflops']:.1f}" if r["gflops"] else "", r["over_separate"],
             r["time_over_flops"], r["peak_mib"]) for r in rows]
    return common.markdown_table(("impl", "mode", "K", "part", "runtime", "precision", "median ms", "IQR ms",
                                  "first call s", "GFLOPs", "fusion % of FLOPs", "time / sum of separate",
                                  "time / FLOPs (vs separate)", "peak MiB"), body, "llllllrrrrrrrr")


def why_table(rows: list[dict], setting: Setting) -> str:
    """Time ratio against FLOP ratio: where the time ratio follows the FLOP ratio, the extra time is the
    fusion layers' arithmetic, not overhead."""
    body = []
    for mode in ("grad", "nas"):
        for k in setting.ks:
            r = _row(rows, "auxwrap", mode, k, "weight-step")
            body.append((mode, k, f"{r['over_separate']:.3f}", f"{r['flops_over_separate']:.3f}",
                         f"{r['time_over_flops']:.3f}",
                         f"{100 * r['fusion_gflops'] / r['gflops']:.1f}"))
    return common.markdown_table(("mode", "K", "time / sum of separate", "FLOPs / sum of separate",
                                  f"time ratio / FLOP ratio (target <= {TIME_OVER_FLOPS})",
                                  "fusion layers' share of the step's FLOPs (%)"), body, "lrrrrr")


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
    for variant in variants_of(rows):
        for impl in ("auxwrap", "reference"):
            one, two = (_row(rows, impl, "nas", k, "iteration", variant) for k in (1, 2))
            if one and two:
                lines.append(f"{impl}{variant.suffix}: iteration(K=2) / iteration(K=1) = "
                             f"{two['median_ms'] / one['median_ms']:.3f} (FLOPs: {two['gflops'] / one['gflops']:.3f})")
        for k in setting.ks:
            ours, ref = (_row(rows, impl, "nas", k, "iteration", variant) for impl in ("auxwrap", "reference"))
            if ours and ref and ours["peak_mib"] != "" and ref["peak_mib"] != "":
                lines.append(f"peak memory{variant.suffix}, nas K={k}: ours {ours['peak_mib']} MiB / the reference's "
                             f"{ref['peak_mib']} MiB = {ours['peak_mib'] / ref['peak_mib']:.3f}")
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
    p.add_argument("--depth", type=int, help="ViT blocks per branch (default: the model's own; fewer: a quicker check)")
    p.add_argument("--compile", action="store_true",
                   help="also time every configuration under torch.compile (first call, which compiles, apart)")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES),
                   help="also time every configuration under torch.autocast with this dtype (fp16: with a GradScaler)")
    p.add_argument("--backend", default=None,
                   help="torch.compile backend (default inductor; aot_eager with --quick: no code generation)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    device, folder = common.setup(args)
    base = QUICK if args.quick else GPU if device.type == "cuda" else CPU
    setting = Setting(args.backbone or base.backbone, args.img_size or base.img_size, args.batch or base.batch,
                      tuple(args.k or base.ks), args.warmup if args.warmup is not None else base.warmup,
                      args.repeats or base.repeats, args.window, args.depth)
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    runs = make_variants(args.compile, args.amp)
    env = common.environment(device)
    flushed = common.flush_denormals(device)
    if device.type == "cuda":  # fp32 throughout, as the paper and the anchor (which also sets these at import)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    gen = torch.Generator().manual_seed(0)
    xs = tuple(torch.randn(setting.batch, 3, setting.img_size, setting.img_size, generator=gen).to(device)
               for _ in range(2))
    configs = auxwrap_configs(setting, device, xs, runs, backend)
    notes = []
    anchor_path = find_anchor()
    use_reference = (not args.no_reference and setting.backbone == "vit_base_patch16_224" and setting.img_size == 224
                     and setting.depth in (None, 12))
    if use_reference and anchor_path is not None:
        anchor = load_anchor(anchor_path, device)
        configs += reference_configs(anchor, setting, xs, device, runs, backend)
        notes.append(f"reference: {anchor_path} (its Fused/Single models and two Adam optimisers; our inputs and "
                     f"loss; built on {device}), timed in the same interleaved loop")
    else:
        notes.append("reference not timed: it needs ViT-Base at 224 px (--backbone vit_base_patch16_224 "
                     f"--img-size 224) and the anchor script ({'found' if anchor_path else 'not found'})"
                     + ("; --no-reference given" if args.no_reference else ""))
    print(f"{len(configs)} configurations on {device}; timing {setting}", flush=True)

    compile_s = first_calls(configs, device)
    timer = common.PartTimer(device)
    by_name = {c.name: c for c in configs}
    timings = common.interleaved({c.name: (lambda c=c: c.call(timer)) for c in configs}, device,
                                 warmup=setting.warmup, repeats=setting.repeats, after=lambda n: by_name[n].free())
    flops = {c.key: step_flops(c) for c in configs if c.variant == BASE}
    peaks = {c.name: peak_mib(c, device) for c in configs}
    k_prof = min(setting.ks)
    fused = next(c for c in configs if (c.impl, c.mode, c.k) == ("auxwrap", "nas", k_prof))
    single = configs[0]
    fused_ops = profile_ops(fused.parts["weight-step"], device)
    single_ops = profile_ops(single.parts["weight-step"], device, top=200)
    rows = rows_of(configs, timings, flops, peaks, setting, device, compile_s)
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
        f"time / FLOPs = (time / sum of separate) / (FLOPs / sum of separate), per weight step, against the single "
        f"step of the same runtime and precision; target <= {TIME_OVER_FLOPS}: no overhead beyond the arithmetic.",
    ]
    if runs != [BASE]:
        notes.append(f"variants: {', '.join(f'{v.runtime} {v.precision}' for v in runs)}. Compiled: torch.compile("
                     f"model, backend={backend!r}), default mode, the optimiser step eager; 'first call s' is the "
                     "first compiled call (compilation included), before warm-up. Autocast: torch.autocast on the "
                     "forward pass, loss in fp32" + (", fp16 weight steps with a GradScaler" if args.amp == "fp16"
                                                      else "") + ". FLOPs are counted eager fp32.")
    record = common.Record("train_step", "Training step: fused network vs separate single-task steps",
                           common.finish_environment(env, started),
                           {"device": device.type, "backbone": setting.backbone, "img_size": setting.img_size,
                            "batch": setting.batch, "K": list(setting.ks), "warmup": setting.warmup,
                            "repeats": setting.repeats, "window": setting.window, "threads": torch.get_num_threads(),
                            "flush_denormal": flushed, **({} if setting.depth is None else {"depth": setting.depth}),
                            **({"variants": [f"{v.runtime} {v.precision}" for v in runs], "backend": backend}
                               if runs != [BASE] else {})},
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
