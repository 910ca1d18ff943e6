"""Step 3 — plan: which fusion point feeds which, in which direction.

Points of two branches are paired by relative depth: point ``i`` of a branch with ``n`` points sits
at depth ``(i + 1) / n``. A destination point reads the ``window`` deepest points of the other branch
that are no deeper than itself (for branches of equal depth: the same depth and the ``window - 1``
before it). Each source is read as its branch computed it before its own fusion, so the fused graph
stays acyclic. Connections only ever join the primary and one auxiliary (never two auxiliaries).
"""

from __future__ import annotations

from dataclasses import dataclass

from .analysis import NCHW, NHWC, TOKENS, VECTOR
from .errors import AuxwrapArgumentError, AuxwrapTapError
from .taps import Tap

PRIMARY = "primary"
TO_AUX, TO_PRIMARY = "primary->aux", "aux->primary"
MODES = ("grad", "nas")
_SPATIAL = (NCHW, NHWC, TOKENS)


def aux_branch(k: int) -> str:
    return f"aux{k}"


@dataclass(frozen=True)
class Connection:
    """One link: the output of ``source`` (before its fusion) flows into the fusion at ``dest``."""

    source_branch: str
    source: str        # tap name in the source branch
    dest_branch: str
    dest: str          # tap name in the destination branch
    direction: str     # "primary->aux" or "aux->primary"
    gate: float | None = None  # its gate value, filled in by ``FusedNet.connections()``


class AuxwrapPairingError(AuxwrapTapError):
    """The fusion points of two branches cannot be connected."""


def check_mode(mode: object) -> str:
    if mode not in MODES:
        raise AuxwrapArgumentError(f"unknown mode {mode!r}; use mode='grad' (Aux-G: primary -> auxiliary "
                                   "links only) or mode='nas' (Aux-NAS: links both ways, searched).")
    return mode


def check_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise AuxwrapArgumentError(f"window must be a positive int (the paper uses 3), got {window!r}.")
    return window


def can_pair(source: Tap, dest: Tap) -> bool:
    """Maps, tokens and channels-last maps fuse with each other; vectors only with vectors."""
    if source.layout == VECTOR or dest.layout == VECTOR:
        return source.layout == dest.layout
    return source.layout in _SPATIAL and dest.layout in _SPATIAL


def plan(taps: dict[str, list[Tap]], mode: str, window: int = 3) -> list[Connection]:
    """All connections between the primary and each auxiliary, in destination order.

    ``taps`` maps branch names (``"primary"``, ``"aux0"``, ``"aux1"``...) to their ordered points.
    """
    check_mode(mode)
    check_window(window)
    connections = []
    for branch, aux_taps in taps.items():
        if branch == PRIMARY:
            continue
        pair = _links(taps[PRIMARY], aux_taps, PRIMARY, branch, TO_AUX, window)
        if mode == "nas":
            pair += _links(aux_taps, taps[PRIMARY], branch, PRIMARY, TO_PRIMARY, window)
        if not pair:
            raise AuxwrapPairingError(_unpairable_message(taps[PRIMARY], aux_taps, branch))
        connections += pair
    return connections


def sources_of(dest_index: int, n_dest: int, n_source: int, window: int) -> list[int]:
    """Indices of the source points read by destination point ``dest_index`` (relative depth, window)."""
    reachable = [j for j in range(n_source) if (j + 1) * n_dest <= (dest_index + 1) * n_source]
    return reachable[-window:]


def _links(sources: list[Tap], dests: list[Tap], source_branch: str, dest_branch: str, direction: str,
           window: int) -> list[Connection]:
    links = []
    for i, dest in enumerate(dests):
        for j in sources_of(i, len(dests), len(sources), window):
            if can_pair(sources[j], dest):
                links.append(Connection(source_branch, sources[j].name, dest_branch, dest.name, direction))
    return links


def _unpairable_message(primary: list[Tap], aux: list[Tap], branch: str) -> str:
    def layouts(taps: list[Tap]) -> str:
        return ", ".join(sorted({t.layout for t in taps}))

    return (f"the fusion points of the primary ({layouts(primary)}) and of {branch} ({layouts(aux)}) cannot be "
            f"paired: maps and tokens fuse with each other, vectors only with vectors. Pass taps=... naming "
            f"points with spatial outputs in both, e.g. taps={{'primary': [...], '{branch}': [...]}}.")
