"""Rewrite the results section of ``benchmarks/README.md`` from the files in ``benchmarks/results/``.

The section lies between ``<!-- results:start -->`` and ``<!-- results:end -->``; everything in it is
generated from ``flops.*``, ``train_step.*`` and ``deploy_latency.*`` (CSV for the numbers, JSON for
the run record and the targets), so the page never holds a typed number. Its links are relative to the
page's own folder, so they work wherever ``--readme`` puts it.

    python benchmarks/readme.py            # rewrite the section of benchmarks/README.md
    python benchmarks/readme.py --check    # exit 1 if the section is not what the files give
    python benchmarks/readme.py --readme OTHER.md   # another page with the same markers
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from common import RESULTS, ROOT, Target, markdown_table, read_csv, targets_markdown

START, END = "<!-- results:start -->", "<!-- results:end -->"
README = ROOT / "benchmarks" / "README.md"
BENCHMARKS = ("flops", "train_step", "deploy_latency")
#: the page's FLOPs columns: CSV model -> header; the Table 1 formula column goes after soft sharing
FLOPS_COLUMNS = {"single": "single N", "aux-g-deployed": "Aux-G deployed", "aux-nas-deployed": "Aux-NAS deployed",
                 "aux-module-deployed": "Aux-Module deployed", "fused-train-fwd": "fused train fwd",
                 "fused-train-fwdbwd": "fused train fwd+bwd", "soft-sharing": "soft sharing (K pairs)",
                 "aux-head": "Aux-Head (train fwd)", "aux-module-train-fwdbwd": "Aux-Module train fwd+bwd"}
FORMULA = "Table 1: (K+1)N + (K+1)KM/2"


def load(folder: Path, name: str) -> tuple[dict, list[dict[str, str]]] | None:
    meta, data = folder / f"{name}.json", folder / f"{name}.csv"
    if not (meta.is_file() and data.is_file()):
        return None
    return json.loads(meta.read_text()), read_csv(data)


def link(path: Path, readme: Path) -> str:
    """``path`` as a link target in ``readme``: relative to the folder the page is read from."""
    return Path(os.path.relpath(path, readme.parent)).as_posix()


def run_line(meta: dict, folder: Path, readme: Path) -> str:
    env = meta["env"]
    gpu = f" ({env['gpu']})" if env.get("gpu") else ""
    report = link(folder / f"{meta['name']}.md", readme)
    return (f"`{env['command']}` on {env['device']}{gpu}, {env['machine']}; torch {env['torch']}, timm {env['timm']}; "
            f"{env['date_utc']} UTC, {env.get('wall_s', '?')} s; load average {env['loadavg_before']} before, "
            f"{env.get('loadavg_after')} after. Full report: [{report}]({report}).")


def targets_section(metas: list[dict]) -> str:
    return targets_markdown([Target(**t) for meta in metas for t in meta["targets"]])


def flops_section(meta: dict, rows: list[dict[str, str]]) -> str:
    by = {(r["backbone"], int(r["K"]), r["model"]): r for r in rows}
    headers = list(FLOPS_COLUMNS.values())
    headers.insert(headers.index(FLOPS_COLUMNS["soft-sharing"]) + 1, FORMULA)
    body = []
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        ks = sorted({int(r["K"]) for r in rows if r["backbone"] == backbone})
        n = int(by[(backbone, ks[0], "single")]["flops"])
        pair = int(by[(backbone, 1, "soft-sharing")]["flops"]) - 2 * n if (backbone, 1, "soft-sharing") in by else 0
        for k in ks:
            cells = {header: f"{int(by[(backbone, k, model)]['flops']) / 1e9:.4g}" if (backbone, k, model) in by
                     else "-" for model, header in FLOPS_COLUMNS.items()}
            cells[FORMULA] = f"{((k + 1) * n + (k + 1) * k * pair / 2) / 1e9:.4g}"
            body.append((backbone, k, *(cells[h] for h in headers)))
    table = markdown_table(("backbone", "K", *headers), body, "lr" + "r" * len(headers))
    settings = meta["settings"]
    return "\n".join([f"GFLOPs (2 x GMACs), batch 1, {settings['backbones']}; taps=\"{settings['taps']}\", "
                      f"window={settings['window']}; M = soft sharing(K=1) - 2N. Parameters and MACs are in the "
                      "CSV.", "", table])


def train_section(meta: dict, rows: list[dict[str, str]]) -> str:
    """The step times; runs with ``--compile``/``--amp`` (a ``runtime`` column) also show runtime, precision, the
    first compiled call and time / FLOPs."""
    if rows and "runtime" in rows[0]:
        body = [(r["impl"], r["mode"], r["K"], r["part"], r["runtime"], r["precision"], f"{float(r['median_ms']):.1f}",
                 r["compile_s"], r["gflops"], r["over_separate"], r["time_over_flops"], r["peak_mib"]) for r in rows]
        table = markdown_table(("impl", "mode", "K", "part", "runtime", "precision", "median ms", "first call s",
                                "GFLOPs", "time / sum of separate", "time / FLOPs", "peak MiB"), body, "llllllrrrrrr")
    else:  # the runs made before the variants
        body = [(r["impl"], r["mode"], r["K"], r["part"], f"{float(r['median_ms']):.1f}", r["gflops"],
                 r["over_separate"], r["peak_mib"]) for r in rows]
        table = markdown_table(("impl", "mode", "K", "part", "median ms", "GFLOPs", "time / sum of separate",
                                "peak MiB"), body, "lllrrrrr")
    s = meta["settings"]
    return "\n".join([f"{s['device'].upper()}, {s['backbone']} at {s['img_size']} px, batch {s['batch']}, "
                      f"{s['repeats']} interleaved repeats after {s['warmup']} warm-up, torch threads: {s['threads']}.",
                      "",
                      table])


def latency_section(meta: dict, rows: list[dict[str, str]]) -> str:
    body = [(r["backbone"], r["model"], r["runtime"], f"{float(r['median_ms']):.2f}", r["over_original"],
             r["compile_s"]) for r in rows]
    s = meta["settings"]
    table = markdown_table(("backbone", "model", "runtime", "median ms", "/ original", "first compiled call s"), body,
                           "lllrrr")
    return "\n".join([f"{s['device'].upper()}, {s['backbones']}, batch {s['batch']}, torch.compile backend "
                      f"{s['backend']}, {s['repeats']} interleaved repeats, torch threads: {s['threads']}.", "", table])


SECTIONS = {"flops": ("FLOPs and parameters", flops_section), "train_step": ("Training step", train_section),
            "deploy_latency": ("Deployed latency", latency_section)}


def generate(folder: Path = RESULTS, readme: Path = README) -> str:
    """The section's Markdown (without the markers), its links relative to ``readme``'s folder."""
    loaded = {name: load(folder, name) for name in BENCHMARKS}
    present = {name: v for name, v in loaded.items() if v is not None}
    results = link(folder, readme)
    parts = [f"Generated by `python benchmarks/readme.py` from the files in [`{results}/`]({results}/); rerun a "
             "benchmark, then this script. Each benchmark takes `--quick` (a minute, written to a temporary folder) "
             "and `--device`."]
    missing = [name for name, v in loaded.items() if v is None]
    if missing:
        parts.append(f"No results yet for: {', '.join(missing)}.")
    if present:
        parts += ["", "**Targets**", "", targets_section([meta for meta, _ in present.values()])]
    for name, (meta, rows) in present.items():
        title, render = SECTIONS[name]
        parts += ["", f"### {title}", "", run_line(meta, folder, readme), "", render(meta, rows)]
        if meta.get("notes"):
            parts += [""] + [f"- {note}" for note in meta["notes"]]
    parts += other_runs(folder, readme)
    return "\n".join(parts)


def other_runs(folder: Path, readme: Path) -> list[str]:
    """Runs kept in sub-folders of the results, at any depth (other settings of a benchmark; ``gpu/`` and
    ``gpu/compiled/`` from ``gpu.py``): their run line and targets, and on a GPU their tables and notes too."""
    runs = [(sub, load(sub, name)) for sub in sorted(p for p in folder.rglob("*") if p.is_dir())
            for name in BENCHMARKS]
    runs = [(sub, loaded) for sub, loaded in runs if loaded is not None]
    if not runs:
        return []
    parts = ["", "### Other runs"]
    for sub, (meta, rows) in runs:
        parts += ["", f"**{meta['title']}**, `{sub.relative_to(folder).as_posix()}/`: {run_line(meta, sub, readme)}",
                  "", targets_section([meta])]
        if meta["env"]["device"].startswith("cuda"):
            parts += ["", SECTIONS[meta["name"]][1](meta, rows)]
            parts += [""] + [f"- {note}" for note in meta["notes"]] if meta.get("notes") else []
    return parts


def rewrite(readme: str, section: str, name: str = "README.md") -> str:
    """``readme`` with ``section`` between its markers; ``name`` (the page's path) is for the error."""
    if START not in readme or END not in readme:
        raise SystemExit(f"{name} has no {START} ... {END} markers; add them where the results go.")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{section}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmark files")
    p.add_argument("--readme", type=Path, default=README,
                   help=f"the page whose section is written (default: {README.relative_to(ROOT)})")
    p.add_argument("--check", action="store_true", help="exit 1 if the page's section is out of date")
    args = p.parse_args(argv)
    text = args.readme.read_text()
    updated = rewrite(text, generate(args.results, args.readme), str(args.readme))
    if args.check:
        if updated != text:
            print(f"{args.readme}: the results section is out of date; run python benchmarks/readme.py")
            return 1
        return 0
    if updated != text:
        args.readme.write_text(updated)
    print(f"{args.readme}: results section {'rewritten' if updated != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
