"""Which timm architectures auxwrap handles: attach in both modes, one training step, prune, compare.

The population: every architecture ``timm.list_models()`` registers (random weights, ``pretrained=False``,
10 classes) with at most 100 M parameters (counted on the meta device) whose graph timm's own fx feature
extraction traces into graphs that run (``get_graph_node_names`` and ``create_feature_extractor`` with timm's
no-trace registries, train and eval mode, run once each). The others are listed as skipped, with the reason,
outside the pass rate.

Each model runs at 64 x 64 (``img_size=64`` where its config fixes the input size; else, if it does not run
there, at its config's ``min_input_size`` or ``input_size``), batch 2, the same architecture in both branches
(seeds 0 and 1). For mode in ``grad``, ``nas``:

1. ``attach``; both outputs exactly the originals' (I1, eval mode);
2. one SGD step on the sum of every output, lr 0.1, gradient norm clipped to 1 (unclipped, a random model's sum
   has gradients of norm ~5e3, and one step left EfficientNetV2 so ill-conditioned that its fp32 output was
   6e-4 off its fp64 value);
3. nas: the auxiliary -> primary gates cut, as the search's L1 ramp would end them;
4. ``auxwrap.prune`` (the primary detached, BatchNorm folded);
5. the deployed primary against the fused network's primary output, eval mode: relative error <= 1e-4.

Everything runs in fp32, except models whose fp32 output (random weights, eval mode) is more than 1e-6 off their
fp64 output: prune refuses a deployed module more than 1e-5 off the fused one (DESIGN I2), and rounding alone
would take such a model there, so these are checked in fp64 (column ``dtype``; ``fp32_noise`` is that distance).

A model passes when both modes do. Each model runs in its own forked process, one torch thread, under a CPU
time limit; a failure records the exception's class (an ``AuxwrapError`` subclass where auxwrap refused on
purpose), its message and the step it failed in.

    python benchmarks/timm_compat.py --sample 150 --seed 0      # a seeded random sample of the population
    python benchmarks/timm_compat.py --shard 0/4 --out X.csv    # every 4th architecture from the first
    python benchmarks/timm_compat.py --merge A.csv B.csv --out ALL.csv   # one report from shard CSVs
    python benchmarks/timm_compat.py --models resnet18,xcit_nano_12_p16_224
    python benchmarks/timm_compat.py --quick                    # a handful of small models (CI's slow job)

``python -m benchmarks.timm_compat ...`` works as well. Writes ``OUT.csv``, ``OUT.md`` and ``OUT.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import multiprocessing
import random
import resource
import signal
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python -m benchmarks.timm_compat` as well

import common  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from timm.models import _registry  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import auxwrap  # noqa: E402
from auxwrap.deploy import cut_links  # noqa: E402
from auxwrap.trace import kept_as_found  # noqa: E402

NAME = "timm_compat"
COLUMNS = ("name", "family", "params", "img_size", "dtype", "fp32_noise", "status", "error", "stage", "message",
           "zero_grad_fusions", "max_rel_error", "seconds", "cpu_s")
PASS, FAIL, TIMEOUT, SKIPPED = "pass", "fail", "timeout", "skipped"
MAX_PARAMS = 100_000_000
IMG, BATCH, CLASSES, LR, CLIP, TOL = 64, 2, 10, 0.1, 1.0, 1e-4
#: above this fp32 noise (relative, fp32 vs fp64 output of the random primary) a model is checked in float64: prune
#: refuses a deployed module more than 1e-5 off (DESIGN I2), and a random tf_efficientnetv2_m at 64 px is 0.69 off
#: in fp32 alone, so no fp32 recomputation (BN folding) can match it
NOISY = 1e-6
MODES = ("grad", "nas")
TARGET = 0.97
ZERO_HEAD = "its classifier starts at zero: at step 0 no gradient reaches any layer behind it"
QUICK = ("resnet10t", "mobilenetv3_small_050", "deit_tiny_patch16_224", "xcit_nano_12_p16_224", "efficientvit_m0")


# ---------------------------------------------------------------------- the population


def family(name: str) -> str:
    """The timm module an architecture comes from (``resnet``, ``vision_transformer``...)."""
    return _registry._model_to_module.get(name, "?")


def meta_params(name: str) -> int | None:
    """Parameters of ``name`` built on the meta device (no memory, no init), or None where that fails."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, num_classes=CLASSES)
    except Exception:
        return None
    return count(model)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def candidates(names: Sequence[str], shard: tuple[int, int], sample: int | None, seed: int) -> list[str]:
    """This shard's architectures (every n-th by name), in a seeded random order where sampling."""
    index, parts = shard
    mine = sorted(names)[index::parts]
    if sample is not None:
        random.Random(seed).shuffle(mine)
    return mine


# ---------------------------------------------------------------------- one model (in a child process)


class Failure(Exception):
    """A step failed: ``stage`` names it, ``__cause__`` is the exception."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(stage)
        self.stage, self.error = stage, error


class Skip(Exception):
    """The model is outside the population (timm's fx cannot trace it, it does not run on its own)."""


def sizes(name: str) -> list[tuple[tuple[int, int], dict]]:
    """(H, W) and ``create_model`` keyword arguments to try, in order: 64 first, ``img_size=64`` first where
    the config fixes the input size, then the config's minimum and default sizes."""
    cfg = timm.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    small = [((IMG, IMG), {}), ((IMG, IMG), {"img_size": IMG})]
    if cfg.get("fixed_input_size"):
        small.reverse()
    tries = small + [(tuple(cfg[k][-2:]), {}) for k in ("min_input_size", "input_size") if cfg.get(k)]
    unique = []
    for size, kwargs in tries:
        if (size, kwargs) not in unique:
            unique.append((size, kwargs))
    return unique


def build(name: str) -> tuple[nn.Module, torch.Tensor, dict]:
    """The model at the first size it runs at (train and eval forward), its input batch and build kwargs."""
    errors = []
    for size, kwargs in sizes(name):
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, num_classes=CLASSES, **kwargs)
            x = torch.randn(BATCH, 3, *size)
            # a train-mode probe moves BatchNorm statistics: a few batches of 2 at 64 px shrank them until
            # tf_efficientnet_lite4's fp32 output was 2e-5 off fp64, more than deployment may change it
            with torch.no_grad(), kept_as_found(model):
                model.train()(x)
                model.eval()(x)
            return model, x, kwargs
        except Exception as error:  # noqa: PERF203
            errors.append(f"{size} {kwargs}: {type(error).__name__}: {error}")
    raise Skip("does not run at any size tried: " + " | ".join(e[:200] for e in errors))


def fp32_noise(model: nn.Module, x: torch.Tensor) -> float:
    """How far the model's fp32 output (eval mode) is from its fp64 output: what rounding alone does to it."""
    with torch.no_grad():
        return relative_error(model.eval()(x), copy.deepcopy(model).double()(x.double()))


def timm_fx_traces(model: nn.Module, x: torch.Tensor) -> None:
    """timm's own fx feature extraction (its no-trace registries, train and eval graphs) up to the last node,
    run once in each mode: raises Skip where it cannot trace the model or its graph does not run (Hiera's
    ``mask=None`` traced as given)."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from timm.models._features_fx import get_graph_node_names
    from torchvision.models.feature_extraction import create_feature_extractor

    try:
        with kept_as_found(model):
            train_nodes, eval_nodes = get_graph_node_names(model)
            extractor = create_feature_extractor(
                model, train_return_nodes=train_nodes[-1:], eval_return_nodes=eval_nodes[-1:],
                tracer_kwargs={"leaf_modules": list(get_notrace_modules()),
                               "autowrap_functions": list(get_notrace_functions())})
            with torch.no_grad():
                extractor.train()(x)
                extractor.eval()(x)
    except Exception as error:
        raise Skip(f"timm fx cannot trace it: {type(error).__name__}: {' '.join(str(error).split())[:300]}") from error


def tensors(out: object) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def relative_error(got: object, want: object) -> float:
    """Largest norm-wise relative error over the output tensors (inf where the structures differ)."""
    a, b = tensors(got), tensors(want)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return float("inf")
    return max(float((x - y).norm() / y.norm().clamp_min(1e-12)) for x, y in zip(a, b, strict=True))


def step(stage: str, fn, *args):  # noqa: ANN001, ANN202
    try:
        return fn(*args)
    except Exception as error:
        raise Failure(stage, error) from error


def one_mode(primary: nn.Module, aux: nn.Module, x: torch.Tensor, mode: str) -> tuple[int, float]:
    """attach -> outputs at init = the originals' -> SGD step on the sum of all outputs -> (cut) -> prune ->
    compare; (fusions whose weight got an identically zero gradient, relative error of the deployed primary)."""
    net = step(f"attach-{mode}", lambda: auxwrap.attach(primary, aux, mode, example_inputs=(x,)))

    def identity() -> None:  # I1: zero-initialised fusions, the original outputs exactly (eval mode)
        for model in (net, primary, aux):
            model.eval()
        with torch.no_grad():
            out = net(x)
            same = [relative_error(out.primary, primary(x)), relative_error(out.aux[0], aux(x))]
        if any(e != 0 for e in same):
            raise AssertionError(f"the fused network's (primary, aux) outputs differ from the originals at "
                                 f"initialisation by {same[0]:.3g}, {same[1]:.3g} (relative)")

    step(f"identity-{mode}", identity)

    def train() -> int:
        net.train()
        optimizer = torch.optim.SGD(net.parameters(), lr=LR)
        loss = sum(t.sum() for t in tensors(net(x)))
        loss.backward()
        zero = sum(1 for f in net.fusions.values() if f.weight.weight.grad is None or not f.weight.weight.grad.any())
        nn.utils.clip_grad_norm_(net.parameters(), CLIP)  # a step of norm <= LR * CLIP: moved, not blown up
        optimizer.step()
        return zero

    zero = step(f"step-{mode}", train)

    def deploy() -> nn.Module:
        if mode == "nas":
            cut_links(net)  # where the search's L1 ramp ends; prune then measures a lossless cut
        return auxwrap.prune(net)

    deployed = step(f"prune-{mode}", deploy)

    def compare() -> float:
        net.eval()
        with torch.no_grad():
            return relative_error(deployed(x), net(x).primary)

    error = step(f"compare-{mode}", compare)
    if not error <= TOL:
        raise Failure(f"compare-{mode}", AssertionError(
            f"deployed primary differs from the fused primary: relative error {error:.3g} > {TOL:g}"))
    return zero, error


def new_row(name: str, params: int | None, status: str, **values: object) -> dict:
    """A CSV row of ``name``: every column empty but those given."""
    row = dict.fromkeys(COLUMNS, "")
    row.update(name=name, family=family(name), params="" if params is None else params, status=status, **values)
    return row


def check(name: str, params: int | None) -> dict:
    """Everything about one architecture, as a CSV row (without the times)."""
    row = new_row(name, params, PASS)
    try:
        primary, x, kwargs = build(name)
        if params is None:
            row["params"] = params = count(primary)
            if params > MAX_PARAMS:
                raise Skip(f"{params / 1e6:.0f} M parameters > {MAX_PARAMS / 1e6:.0f} M")
        row["img_size"] = "x".join(map(str, x.shape[-2:])) + (" (img_size)" if kwargs else "")
        timm_fx_traces(primary, x)
        torch.manual_seed(1)
        aux = timm.create_model(name, num_classes=CLASSES, **kwargs)
        noise = fp32_noise(primary, x)
        row["fp32_noise"] = f"{noise:.1e}"
        if noise > NOISY:  # rounding alone moves it near prune's tolerance: check the structure in fp64
            primary, aux, x = primary.double(), aux.double(), x.double()
        row["dtype"] = str(x.dtype).removeprefix("torch.")
        zeros, errors = [], []
        for mode in MODES:
            zero, error = one_mode(copy.deepcopy(primary), copy.deepcopy(aux), x, mode)
            zeros.append(zero)
            errors.append(error)
        row["zero_grad_fusions"] = "/".join(map(str, zeros))
        row["max_rel_error"] = f"{max(errors):.2e}"
        if any(zeros) and _zero_classifier(aux):
            row["message"] = ZERO_HEAD
    except Skip as why:
        row.update(status=SKIPPED, message=str(why))
    except Failure as failure:
        error = failure.error
        row.update(status=FAIL, error=type(error).__name__, stage=failure.stage, message=_message(error))
    return row


def _zero_classifier(model: nn.Module) -> bool:
    """The model's classifier weights start at zero (timm's MLP-Mixer): no gradient reaches anything behind it."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    weights = [p for p in head.parameters() if p.dim() > 1] if isinstance(head, nn.Module) else []
    return bool(weights) and not any(w.any() for w in weights)


def _message(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if not isinstance(error, auxwrap.AuxwrapError):  # where it came from, for errors auxwrap did not name
        frames = traceback.extract_tb(error.__traceback__)
        if frames:
            text += f" [at {Path(frames[-1].filename).name}:{frames[-1].lineno}]"
    return text[:600]


def _child(name: str, params: int | None, limit: float, connection) -> None:  # noqa: ANN001
    resource.setrlimit(resource.RLIMIT_CPU, (int(limit), int(limit) + 5))  # CPU seconds: fair on a busy machine
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        row = check(name, params)
    except BaseException as error:  # noqa: BLE001  (anything else: the benchmark's own fault, still a row)
        row = new_row(name, params, FAIL, error=type(error).__name__, stage="benchmark", message=_message(error))
    connection.send(row)
    connection.close()


def run_one(name: str, params: int | None, limit: float) -> dict:
    """:func:`check` in a forked process, stopped after ``limit`` CPU seconds (or 4 x ``limit`` wall seconds)."""
    started, cpu = time.perf_counter(), _children_cpu()
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(name, params, limit, send), daemon=True)
    process.start()
    send.close()
    row = None
    with contextlib.suppress(EOFError):  # the child died without a word: stopped at its CPU limit, or crashed
        row = receive.recv() if receive.poll(4 * limit) else None
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    if row is None:
        over = process.exitcode in (None, -signal.SIGKILL, -signal.SIGXCPU)
        why = f"over {limit:.0f} CPU seconds" if over else f"process exited with code {process.exitcode}"
        row = new_row(name, params, TIMEOUT if over else FAIL, error="timeout" if over else "crash", message=why)
    row["seconds"] = round(time.perf_counter() - started, 1)
    row["cpu_s"] = round(_children_cpu() - cpu, 1)
    return row


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(names: Iterable[str], want: int | None, limit: float, log=print) -> list[dict]:  # noqa: ANN001
    """Rows for ``names`` in order, until ``want`` of them are in the population (all where None)."""
    rows, tested = [], 0
    for name in names:
        if want is not None and tested >= want:
            break
        params = meta_params(name)
        if params is not None and params > MAX_PARAMS:
            row = new_row(name, params, SKIPPED, message=f"{params / 1e6:.0f} M parameters > {MAX_PARAMS / 1e6:.0f} M",
                          seconds=0.0, cpu_s=0.0)
        else:
            row = run_one(name, params, limit)
        rows.append(row)
        tested += row["status"] != SKIPPED
        if row["status"] != SKIPPED or log is not print:
            log(f"[{tested}{'/' + str(want) if want else ''}] {name}: {row['status']} {row['error']} "
                f"{row['stage']} {row['message'][:160]} ({row['seconds']} s)")
    return rows


# ---------------------------------------------------------------------- the report


def tested(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r["status"] != SKIPPED]


def pass_rate(rows: Sequence[dict]) -> float | None:
    population = tested(rows)
    return sum(r["status"] == PASS for r in population) / len(population) if population else None


def targets(rows: Sequence[dict]) -> list[common.Target]:
    rate = pass_rate(rows)
    population = tested(rows)
    named = [r for r in population if r["status"] != PASS and r["error"].startswith("Auxwrap")]
    unnamed = len(population) - sum(r["status"] == PASS for r in population) - len(named)
    return [
        common.Target("timm architectures that attach, train, prune and deploy exactly", f">= {TARGET:.0%}",
                      "-" if rate is None else f"{rate:.1%}",
                      common.NOT_MEASURED if rate is None else common.MET if rate >= TARGET else common.MISSED,
                      f"{len(population)} models"),
        common.Target("failures that are not a named AuxwrapError", "== 0", str(unnamed),
                      common.MET if unnamed == 0 else common.MISSED),
    ]


def report(rows: Sequence[dict]) -> str:
    population = tested(rows)
    status = Counter(r["status"] for r in rows)
    lines = ["## Summary", "",
             common.markdown_table(("status", "models"), [(s, status[s]) for s in (PASS, FAIL, TIMEOUT, SKIPPED)
                                                         if status[s]]), ""]
    rate = pass_rate(rows)
    if rate is not None:
        lines += [f"Pass rate: **{rate:.1%}** ({status[PASS]} of {len(population)} models in the population). "
                  f"Per model: median {_median([r['cpu_s'] for r in population])} CPU s, "
                  f"{_median([r['seconds'] for r in population])} wall s; in all "
                  f"{sum(float(r['cpu_s']) for r in rows) / 60:.1f} CPU minutes.", ""]
    failed = [r for r in population if r["status"] != PASS]
    if failed:
        groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for r in failed:
            groups[(r["family"], r["error"] or r["status"])].append(r)
        body = [(fam, f"`{err}`", len(rs), ", ".join(r["name"] + _chaotic(r) for r in rs),
                 f"{rs[0]['stage']}: {rs[0]['message']}") for (fam, err), rs in sorted(groups.items())]
        lines += ["## Failures, by family and error", "",
                  common.markdown_table(("family", "error", "models", "names", "first message (step: message)"), body,
                                        "llrll"), "",
                  "## Known not to work", "",
                  "Families with a failing architecture in this run: "
                  + ", ".join(f"`{fam}` ({err})" for fam, err in sorted(groups)) + ".", ""]
    else:
        lines += ["## Known not to work", "", "No architecture of the population failed in this run.", ""]
    zero = [r for r in population if r["status"] == PASS and any(int(z) for z in r["zero_grad_fusions"].split("/"))]
    lines += ["## Fusion weights without gradient", "",
              "Passing models where a fusion weight got an identically zero gradient after the step (grad/nas): "
              + (", ".join(f"{r['name']} ({r['zero_grad_fusions']}{'; ' + r['message'] if r['message'] else ''})"
                           for r in zero) or "none") + ".", ""]
    skipped: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["status"] == SKIPPED:
            skipped[r["message"].split(":")[0] if "timm fx" in r["message"] or "does not run" in r["message"]
                    else f"over {MAX_PARAMS / 1e6:.0f} M parameters"].append(r["name"])
    if skipped:
        lines += ["## Outside the population (skipped)", "",
                  common.markdown_table(("reason", "models", "names"),
                                        [(why, len(ns), ", ".join(ns)) for why, ns in sorted(skipped.items())], "lrl"),
                  ""]
    return "\n".join(lines)


def _chaotic(row: dict) -> str:
    """A note where rounding alone changes the random model's output by more than the tolerance."""
    noise = float(row.get("fp32_noise") or 0)
    return (f" (its own fp32 output is {noise:.2g} off its fp64 value: numerically chaotic at random init, checked "
            f"in {row['dtype']})") if noise > TOL else ""


def _median(values: Sequence[object]) -> float:
    numbers = sorted(float(v) for v in values)
    return round(numbers[len(numbers) // 2], 1) if numbers else 0.0


def write(rows: list[dict], out: Path, env: dict, settings: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    common.write_csv(out, COLUMNS, rows)
    record = common.Record(out.stem, "timm compatibility: attach, one training step, prune, deploy", env, settings,
                           targets(rows))
    record.notes.append(f"Per-model rows: {out.name}. A model passes when, in both modes, the deployed primary "
                        f"equals the fused network's primary (relative error <= {TOL:g}, fp32, eval mode).")
    record.write(out.parent, report(rows))
    record.print_summary(out.parent)


# ---------------------------------------------------------------------- command line


def _shard(text: str) -> tuple[int, int]:
    index, _, parts = text.partition("/")
    try:
        i, n = int(index), int(parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: use i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: i must be in [0, n)")
    return i, n


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--models", default=None, help="comma-separated architecture names instead of timm's list")
    p.add_argument("--sample", type=int, default=None, help="test this many models of the population, drawn at random")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--shard", type=_shard, default=(0, 1), help="i/n: every n-th architecture by name, from the i-th")
    p.add_argument("--limit", type=float, default=300.0,
                   help="CPU seconds per model before it is stopped ('timeout'); 4 x as many wall seconds at most")
    p.add_argument("--out", type=Path, default=None,
                   help=f"CSV to write (.md and .json beside it); default benchmarks/results/{NAME}.csv, "
                        f"with --quick {common.QUICK_RESULTS}/{NAME}.csv")
    p.add_argument("--merge", type=Path, nargs="+", default=None, help="CSVs of earlier runs (shards) to report as one")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    out = args.out or (common.QUICK_RESULTS if args.quick else common.RESULTS) / f"{NAME}.csv"
    started = time.perf_counter()
    env = common.environment(torch.device("cpu"))
    if args.merge:
        rows = [dict(r, seconds=float(r["seconds"]), cpu_s=float(r["cpu_s"])) for path in args.merge
                for r in common.read_csv(path)]
        settings = {"merged": ", ".join(str(path) for path in args.merge)}
    else:
        names = list(QUICK) if args.quick else args.models.split(",") if args.models else timm.list_models()
        order = candidates(names, args.shard, args.sample, args.seed) if not (args.quick or args.models) else names
        settings = {"models": "quick" if args.quick else "given" if args.models else "timm.list_models()",
                    "population": f"<= {MAX_PARAMS / 1e6:.0f} M parameters, traced by timm's fx",
                    "sample": args.sample, "seed": args.seed, "shard": "/".join(map(str, args.shard)),
                    "img": IMG, "batch": BATCH, "lr": LR, "clip": CLIP, "tol": TOL, "limit_s": args.limit}
        rows = run(order, args.sample, args.limit)
    write(rows, out, common.finish_environment(env, started), settings)
    return out


if __name__ == "__main__":
    main()
