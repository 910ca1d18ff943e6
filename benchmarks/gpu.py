"""Every GPU measurement in one prepared run, under a time budget (8 minutes by default).

The parts run in this order, each as its own process with its own time budget (a part that would run past its
budget, or past the total, is stopped and reported; the next parts still run while time is left):

1. ``train_step``: ViT-Base 224 px, batch 20, K = 1 and 2, the reference (the anchor script) beside auxwrap,
   fp32 and bf16 (autocast), eager, peak memory: search iteration / the reference's, fused weight step / the
   separate steps, iteration K=2 / K=1, peak memory against the reference's.
2. ``deploy_latency``: the deployed primary against the original, eager and compiled (ResNet-50, ViT-Base).
3. ``train_step`` again, with ``--compile``: eager and compiled, fp32 and bf16, K = 1 and 2, without the
   reference (its compilations would not fit the budget), into ``OUT/compiled/``.
4. ``readme``: the results section of benchmarks/README.md (when OUT is under benchmarks/results), else a
   preview page ``OUT/README.md``.

Each part's command, elapsed time and status go to ``OUT/gpu.json`` and ``OUT/gpu.md``. ``--quick`` runs the
same sequence with tiny configurations (ViT-Tiny 32 px, 2 blocks; ResNet-18 and ViT-Tiny at 64 px; compiled
with backend ``aot_eager``), about two minutes on a CPU: what CI's slow job runs where there is no GPU.

    python benchmarks/gpu.py                   # on a GPU: into benchmarks/results/gpu/, then the README section
    python benchmarks/gpu.py --quick --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from common import RESULTS, ROOT, loadavg, markdown_table

HERE = Path(__file__).resolve().parent
BUDGET_S = 480.0   # the whole run: 8 minutes
README_S = 30.0    # kept for the last part, the README section, whatever the others take
VIT_BASE = ["--backbone", "vit_base_patch16_224", "--img-size", "224", "--batch", "20", "--k", "1", "2"]
TINY = ["--quick", "--k", "1", "2", "--depth", "2"]


@dataclass(frozen=True)
class Part:
    """One step of the run: a benchmark script, its arguments (``{out}``: the output folder) and its budget."""

    name: str
    script: str
    args: tuple[str, ...]
    budget_s: float

    def command(self, out: Path, device: str, threads: int | None) -> list[str]:
        args = [a.format(out=out) for a in self.args]
        if self.script != "readme.py":
            args += ["--device", device] + (["--threads", str(threads)] if threads else [])
        return [sys.executable, str(HERE / self.script), *args]


def parts(quick: bool, out: Path, readme: Path) -> list[Part]:
    """The sequence (see the module's docstring); ``--quick``: the same parts, tiny."""
    train = TINY if quick else VIT_BASE
    page = ["--results", str(RESULTS), "--readme", str(readme)] if out.is_relative_to(RESULTS) else \
        ["--results", "{out}", "--readme", str(readme)]
    return [
        Part("train_step", "train_step.py", (*train, "--amp", "bf16", "--out", "{out}"), 150.0),
        Part("deploy_latency", "deploy_latency.py", ("--quick",) * quick + ("--out", "{out}"), 150.0),
        Part("train_step_compiled", "train_step.py",
             (*train, "--compile", "--amp", "bf16", "--no-reference", "--out", "{out}/compiled"), BUDGET_S),
        Part("readme", "readme.py", tuple(page), README_S),
    ]


@dataclass
class Outcome:
    name: str
    command: str
    status: str       # done | failed (exit code N) | stopped: over budget | skipped: ...
    elapsed_s: float
    budget_s: float


def run_part(command: list[str], timeout: float) -> tuple[str, float]:
    """Run one part in its own process group; stop the group when ``timeout`` runs out."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
        status = "done" if code == 0 else f"failed (exit code {code})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        status = f"stopped: over its budget of {timeout:.0f} s"
    return status, round(time.perf_counter() - started, 1)


def run(sequence: Sequence[Part], out: Path, device: str, threads: int | None, budget: float) -> list[Outcome]:
    """Every part in order, each within min(its budget, what the total leaves after the README's reserve)."""
    started, outcomes = time.perf_counter(), []
    for part in sequence:
        left = budget - (time.perf_counter() - started)
        reserve = 0.0 if part.name == "readme" else README_S
        timeout = min(part.budget_s, left - reserve)
        command = part.command(out, device, threads)
        shown = " ".join(Path(c).relative_to(ROOT).as_posix() if c.startswith(str(ROOT)) else c
                         for c in ["python", *command[1:]])
        if timeout < 10:
            status = f"skipped: {max(left, 0):.0f} s left of the {budget:.0f} s budget"
            outcomes.append(Outcome(part.name, shown, status, 0.0, part.budget_s))
            print(f"[gpu] {part.name}: skipped, {max(left, 0):.0f} s left", flush=True)
            continue
        print(f"[gpu] {part.name}: {shown} (budget {timeout:.0f} s)", flush=True)
        status, elapsed = run_part(command, timeout)
        outcomes.append(Outcome(part.name, shown, status, elapsed, round(timeout, 1)))
        print(f"[gpu] {part.name}: {status} in {elapsed:.1f} s (total {time.perf_counter() - started:.1f} s)",
              flush=True)
    return outcomes


def write_record(out: Path, outcomes: list[Outcome], budget: float, wall: float, load: tuple) -> None:
    """``gpu.json`` (every part: command, status, elapsed, budget) and ``gpu.md`` (the same as a table)."""
    meta = {"budget_s": budget, "wall_s": round(wall, 1), "loadavg_before": load, "loadavg_after": loadavg(),
            "parts": [asdict(o) for o in outcomes]}
    (out / "gpu.json").write_text(json.dumps(meta, indent=2) + "\n")
    table = markdown_table(("part", "status", "elapsed s", "budget s", "command"),
                           [(o.name, o.status, o.elapsed_s, o.budget_s, f"`{o.command}`") for o in outcomes], "llrrl")
    (out / "gpu.md").write_text(f"# The GPU run\n\n`python benchmarks/gpu.py {' '.join(sys.argv[1:])}`: "
                                f"{wall:.1f} s of a {budget:.0f} s budget.\n\n{table}\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny configurations (about two minutes on a CPU)")
    p.add_argument("--out", type=Path, default=RESULTS / "gpu",
                   help=f"output folder (default {(RESULTS / 'gpu').relative_to(ROOT)})")
    p.add_argument("--device", default="auto", help="passed to each benchmark (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of each benchmark")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"the whole run's time budget (default {BUDGET_S:.0f} s; 900 s with --quick)")
    args = p.parse_args(argv)
    budget = args.budget_s or (900.0 if args.quick else BUDGET_S)
    out = args.out.resolve()
    if args.quick and out.is_relative_to(RESULTS):
        p.error("--quick writes tiny configurations: give an --out outside benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    readme = ROOT / "benchmarks" / "README.md" if out.is_relative_to(RESULTS) else out / "README.md"
    if not readme.is_file():
        readme.write_text("# Benchmarks (preview)\n\n<!-- results:start -->\n<!-- results:end -->\n")
    started, load = time.perf_counter(), loadavg()
    outcomes = run(parts(args.quick, out, readme), out, args.device, args.threads, budget)
    write_record(out, outcomes, budget, time.perf_counter() - started, load)
    print(f"[gpu] wrote {out / 'gpu.md'}; {readme} regenerated" if outcomes[-1].status == "done" else
          f"[gpu] wrote {out / 'gpu.md'}")
    return 0 if all(o.status == "done" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
