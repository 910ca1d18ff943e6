"""Drawing a gate search: gate values over steps, and the converged links as in the paper's Figure 1.

Uses matplotlib's object API (``matplotlib.figure.Figure``), not pyplot: no display, no global state,
safe under the Agg backend and in worker processes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import AuxwrapArgumentError
from .optional import require
from .plan import PRIMARY, TO_AUX, TO_PRIMARY

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .search import GateHistory

#: colours by direction: auxiliary features are orange in the paper's figures
COLORS = {TO_PRIMARY: "tab:orange", TO_AUX: "tab:blue"}
LABELS = {TO_PRIMARY: "auxiliary → primary (α^P)", TO_AUX: "primary → auxiliary (α^A)"}


def plot_gates(search_or_history: Any, net: nn.Module | None = None, path: str | os.PathLike | None = None,
               *, figsize: tuple[float, float] = (11.0, 4.5)) -> Figure:
    """Draw a gate search and return the matplotlib Figure (saved to ``path`` if given).

    Left: every gate over the gate steps, one line per connection, coloured by direction, with the
    L1 weight lambda_t (dashed, right axis) and the step where alpha^P were cut. Right: the links
    between the branches' fusion points (columns, in depth order, top to bottom), line width in
    proportion to the gate value; links at exactly 0 are dotted grey.

    Args:
        search_or_history: an :class:`auxwrap.Search` or its :class:`~auxwrap.search.GateHistory`.
        net: a fused network whose *current* gates the right panel shows (default: the last recorded ones).
        path: where to save the figure (format from the suffix, e.g. ``.png``, ``.pdf``).
    """
    figure = require("matplotlib.figure", extra="demo", purpose="auxwrap.plot_gates()")

    from .fused import unwrap
    from .search import GateHistory, Search

    history = search_or_history.history if isinstance(search_or_history, Search) else search_or_history
    if not isinstance(history, GateHistory):
        raise AuxwrapArgumentError(
            f"plot_gates() takes an auxwrap.Search or its .history, got {type(search_or_history).__name__}.")
    if not history.values:
        raise AuxwrapArgumentError("the search has recorded no gate values: create Search(..., record=True).")
    if net is not None:
        fused = unwrap(net)
        connections, points = fused.connections(), {b: [t.name for t in taps] for b, taps in fused.taps.items()}
    else:
        connections, points = history.final(), history.points

    fig = figure.Figure(figsize=figsize, layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1.6, 1.0))
    _draw_curves(left, history)
    _draw_links(right, connections, points)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _draw_curves(ax: Any, history: GateHistory) -> None:
    values = history.tensor()
    for i, direction in enumerate(history.directions):
        ax.plot(history.steps, values[:, i].tolist(), color=COLORS[direction], lw=1.0, alpha=0.7)
    for direction, color in COLORS.items():
        if direction in history.directions:
            ax.plot([], [], color=color, label=LABELS[direction])
    if history.cut_step is not None:
        ax.axvline(history.cut_step, color="k", lw=0.8, ls=":", label=f"α^P cut (step {history.cut_step})")
    ax.set_xlabel("gate step")
    ax.set_ylabel("gate α")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("gates over the search")
    if any(history.lam):
        lam_ax = ax.twinx()
        lam_ax.plot(history.steps, history.lam, color="0.4", ls="--", lw=1.0)
        lam_ax.set_ylabel("L1 weight λ_t (dashed)", color="0.4")
        lam_ax.tick_params(axis="y", colors="0.4")
    ax.legend(loc="best", fontsize=8, framealpha=0.8)


def _draw_links(ax: Any, connections: list, points: dict[str, list[str]]) -> None:
    from matplotlib.patches import FancyArrowPatch

    branches = [PRIMARY] + [b for b in points if b != PRIMARY]
    column = {b: i for i, b in enumerate(branches)}

    def position(branch: str, name: str) -> tuple[float, float]:
        names = points[branch]
        return float(column[branch]), -(names.index(name) + 1) / len(names)

    for branch in branches:
        xy = [position(branch, name) for name in points[branch]]
        color = "tab:green" if branch == PRIMARY else "tab:purple"
        ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=40, color=color, zorder=3)
        for name, (x, y) in zip(points[branch], xy, strict=True):
            side = -1 if column[branch] == 0 else 1
            ax.annotate(name, (x, y), xytext=(8 * side, 0), textcoords="offset points", fontsize=7,
                        ha="right" if side < 0 else "left", va="center")
        ax.text(column[branch], 0.06, branch, ha="center", fontsize=10, weight="bold")
    for c in connections:
        start, end = position(c.source_branch, c.source), position(c.dest_branch, c.dest)
        gate = float(c.gate or 0.0)
        rad = 0.15  # the same bend for both directions: a link and its reverse bow to opposite sides
        if gate == 0.0:
            style = dict(color="0.75", lw=0.6, linestyle=":", arrowstyle="-")
        else:
            style = dict(color=COLORS[c.direction], lw=0.4 + 5.0 * gate, alpha=0.8, arrowstyle="-|>")
        ax.add_patch(FancyArrowPatch(start, end, connectionstyle=f"arc3,rad={rad}", mutation_scale=8,
                                     shrinkA=4, shrinkB=4, **style))
    for direction, color in COLORS.items():
        ax.plot([], [], color=color, lw=2, label=LABELS[direction])
    ax.plot([], [], color="0.75", lw=1, ls=":", label="gate exactly 0 (cut)")
    ax.set_xlim(-0.6, len(branches) - 0.4)
    ax.set_ylim(-1.1, 0.15)
    ax.axis("off")
    ax.set_title("links (width ∝ gate), depth top to bottom")
    ax.legend(loc="lower center", fontsize=7, ncol=1, framealpha=0.8, bbox_to_anchor=(0.5, -0.12))
