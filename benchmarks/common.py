"""What every benchmark shares: the run record, the output folder, CSV/Markdown writers and timing.

Each benchmark writes ``NAME.csv`` (the measurements), ``NAME.md`` (the human report) and
``NAME.json`` (the run record: machine, versions, exact command, load average, targets), so that
``benchmarks/readme.py`` can rebuild the results section of benchmarks/README.md from files, never by hand.

The training benchmarks (``accuracy.py``, ``ablation.py``) share :func:`train_grid`: runs of
:func:`auxwrap.demo.experiments.run` on worker processes, each single-task pretraining done once and sent to
every run that starts from it; and the paired differences and formats of their reports.

Timing follows one rule: configurations that are compared are timed in ONE process, their repeats
interleaved (round-robin, the order rotated every round), so that noise from other processes on a
shared machine hits all of them alike; on CUDA every timed call is bracketed by synchronisations.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auxwrap.demo.compare import (  # noqa: F401
    METRICS,
    PERCENT,
    cpu_model,
    fmt_delta,
    fmt_metric,
    mean_std,
    paired,
    train_grid,
    training_machine,
)
from auxwrap.demo.models import build_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "auxwrap-benchmarks-quick"

MET, MISSED, NOT_MEASURED = "met", "missed", "not measured"
NO_GPU = "not measured: no GPU in this session"


# ---------------------------------------------------------------------- models


@dataclass(frozen=True)
class Backbone:
    """A model by name (``"timm:resnet50"``, ``"torchvision:vgg16"``), the keyword arguments it is built with
    and its input size."""

    name: str
    spec: str
    size: int
    kwargs: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        """A new model, random weights (``pretrained=False``)."""
        return build_model(self.spec, **self.kwargs)


# ---------------------------------------------------------------------- command line


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick``, ``--out``, ``--device``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small models and inputs, under a minute on a CPU (written to a temporary folder)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: {RESULTS.relative_to(ROOT)} for full runs, "
                        f"{QUICK_RESULTS} with --quick)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    return p


def setup(args: argparse.Namespace) -> tuple[torch.device, Path]:
    """Apply ``--threads``, resolve ``--device``, create the output folder, seed torch."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return resolve_device(args.device), out_dir(args)


def out_dir(args: argparse.Namespace) -> Path:
    """Where results go: ``--out``, else benchmarks/results (full) or a temporary folder (quick), so that
    quick runs and tests never overwrite the committed results."""
    path = args.out if args.out is not None else (QUICK_RESULTS if args.quick else RESULTS)
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_device(name: str) -> torch.device:
    """``auto`` means the GPU when there is one; an explicit ``cuda`` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here")
    return device


# ---------------------------------------------------------------------- the run record


def loadavg() -> tuple[float, float, float] | None:
    """``os.getloadavg()`` (1, 5, 15 minutes), or None where the platform has none."""
    try:
        return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


def command_line() -> str:
    """The command that ran this benchmark, as one would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "auxwrap"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' (auxwrap/ modified)' if dirty else ''}" if head else "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """Machine, versions, device and load: what a reader needs to judge a number."""
    import timm
    import torchvision

    import auxwrap

    env = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": command_line(),
        "commit": _git_commit(),
        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "auxwrap": auxwrap.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "loadavg_before": loadavg(),
    }
    return env


def finish_environment(env: dict[str, Any], started: float) -> dict[str, Any]:
    """Add the load average after the run and the wall time."""
    env["loadavg_after"] = loadavg()
    env["wall_s"] = round(time.perf_counter() - started, 1)
    return env


def environment_markdown(env: Mapping[str, Any]) -> str:
    """The run record as a bullet list."""
    gpu = f" ({env['gpu']})" if env.get("gpu") else ""
    return "\n".join([
        f"- command: `{env['command']}`",
        f"- date (UTC): {env['date_utc']}; wall time {env.get('wall_s', '?')} s; commit {env['commit']}",
        f"- machine: {env['machine']}; {env['platform']}",
        f"- device: {env['device']}{gpu}",
        f"- versions: Python {env['python']}, torch {env['torch']}, torchvision {env['torchvision']}, "
        f"timm {env['timm']}, auxwrap {env['auxwrap']}",
        f"- load average (1, 5, 15 min) before: {env['loadavg_before']}, after: {env.get('loadavg_after')}",
    ])


# ---------------------------------------------------------------------- targets


@dataclass
class Target:
    """One target of the issue, with the measured value and whether it was met."""

    name: str
    threshold: str
    measured: str
    status: str  # met | missed | not measured
    note: str = ""


def check(name: str, value: float | None, limit: float, *, op: str = "<=", digits: int = 3,
          note: str = "", missing: str = NO_GPU) -> Target:
    """A target ``value op limit`` (op ``<=`` or ``==``); None means it could not be measured here."""
    threshold = f"{op} {limit:.{digits}f}"
    if value is None:
        return Target(name, threshold, "-", NOT_MEASURED, missing if not note else f"{missing}; {note}")
    met = value <= limit + 1e-12 if op == "<=" else abs(value - limit) <= 1e-12
    return Target(name, threshold, f"{value:.{digits}f}", MET if met else MISSED, note)


def targets_markdown(targets: Sequence[Target]) -> str:
    """The targets as a table, the status in bold (each benchmark's report and the summary in benchmarks/README.md)."""
    body = [(t.name, t.threshold, t.measured, f"**{t.status}**", t.note) for t in targets]
    return markdown_table(("target", "threshold", "measured", "status", "note"), body, "llrll")


# ---------------------------------------------------------------------- writers


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]], fill: str | None = None) -> None:
    """Rows with exactly ``columns`` (a missing or extra key is a bug in the benchmark), or with a column missing
    where ``fill`` is given (its value there: rows of different tasks have different metrics)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="raise", restval=fill or "")
        writer.writeheader()
        for row in rows:
            missing = set(columns) - set(row)
            if missing and fill is None:
                raise KeyError(f"row {row} lacks columns {sorted(missing)}")
            writer.writerow(row)


def columns_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every key of ``rows``, in the order first seen."""
    columns: dict[str, None] = {}
    for row in rows:
        columns |= dict.fromkeys(row)
    return list(columns)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub table; ``align`` is one letter per column, ``l`` or ``r`` (default: first left, rest right)."""
    align = align or "l" + "r" * (len(columns) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Record:
    """What a benchmark leaves behind besides its CSV: run record, targets, settings, summary text."""

    name: str
    title: str
    env: dict[str, Any]
    settings: dict[str, Any]
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def write(self, folder: Path, body: str) -> None:
        """``NAME.md`` (title, run record, targets, ``body``) and ``NAME.json`` (everything but the body)."""
        parts = [f"# {self.title}", "", environment_markdown(self.env), "",
                 "Settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()), ""]
        if self.targets:
            parts += ["## Targets", "", targets_markdown(self.targets), ""]
        parts += [body.rstrip(), ""]
        if self.notes:
            parts += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        (folder / f"{self.name}.md").write_text("\n".join(parts))
        meta = {"name": self.name, "title": self.title, "env": self.env, "settings": self.settings,
                "targets": [asdict(t) for t in self.targets], "notes": self.notes}
        (folder / f"{self.name}.json").write_text(json.dumps(meta, indent=2) + "\n")

    def print_summary(self, folder: Path) -> None:
        """The targets, one line each, and the files written: how every benchmark ends its output."""
        for t in self.targets:
            print(f"{t.name}: {t.measured} ({t.threshold}) {t.status} {t.note}".rstrip())
        print(f"wrote {folder / self.name}.csv and {folder / self.name}.md")


# ---------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds of each timed call of one configuration, and of its parts where the call reports them."""

    seconds: list[float]
    parts: dict[str, list[float]] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def part(self, name: str) -> Timing:
        return Timing(self.parts[name])

    def quartiles(self) -> tuple[float, float]:
        if len(self.seconds) < 2:
            return self.seconds[0], self.seconds[0]
        q = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return q[0], q[2]


class PartTimer:
    """Times the parts of one call (e.g. the gate step and the weight step of a search iteration):
    ``with timer("gate-step"): ...``; CUDA-synchronised at each boundary. The call returns ``timer.done()``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> PartTimer:
        self._name = name
        return self

    def __enter__(self) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds[self._name] = time.perf_counter() - self._start

    def done(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return seconds


def time_once(fn: Callable[[], Any], device: torch.device) -> tuple[float, dict[str, float]]:
    """Seconds of one call of ``fn`` (synchronised before and after on CUDA), and the seconds of its
    parts if ``fn`` returns them as a dict (see :class:`PartTimer`)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    total = time.perf_counter() - start
    return total, result if isinstance(result, dict) else {}


def interleaved(fns: Mapping[str, Callable[[], Any]], device: torch.device, *, warmup: int, repeats: int,
                after: Callable[[str], Any] | None = None) -> dict[str, Timing]:
    """Time every configuration ``repeats`` times, interleaved, after ``warmup`` untimed calls each.

    Round r runs the configurations in an order rotated by r, so none always runs first or after the
    same neighbour. ``after(name)`` runs untimed after each call (e.g. to free gradients).
    Returns the per-call seconds of each; take :attr:`Timing.median`.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
            if after:
                after(name)
    synchronize(device)
    timings = {name: Timing([]) for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            total, parts = time_once(fns[name], device)
            timings[name].seconds.append(total)
            for part, seconds in parts.items():
                timings[name].parts.setdefault(part, []).append(seconds)
            if after:
                after(name)
    return timings


def flush_denormals(device: torch.device) -> bool:
    """On the CPU, treat denormal floats as zero (``torch.set_flush_denormal``); returns whether it is on.

    A training benchmark on random data drives its loss (and so its activations' gradients) towards 0;
    once values go denormal, x86 CPUs compute them in microcode, up to 80 times slower (measured here:
    a ViT-Tiny step went from 70 ms to 5.5 s after 100 Adam steps). GPUs have no such penalty. Flushing
    keeps the CPU timing about the arithmetic, the same for every configuration.
    """
    return device.type == "cpu" and torch.set_flush_denormal(True)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


# ---------------------------------------------------------------------- training reports (accuracy.py, ablation.py)

def produced_by(command: str, wall: float, jobs: int, loads: Sequence[float]) -> list[str]:
    """The first lines of a training report: command, date, wall time, workers, load, machine and versions."""
    return [f"Produced by `{command}` on {dt.date.today().isoformat()} in {wall / 60:.1f} min ({jobs} worker "
            f"processes, 1 thread each; load average {loads[0]:.1f} before, {loads[1]:.1f} after).",
            f"Machine: {training_machine()}."]
