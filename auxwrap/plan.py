"""Step 3 — plan: which fusion point feeds which, in which direction, and how each source is read.

Points of two branches are paired by relative depth: point ``i`` of a branch with ``n`` points sits
at depth ``(i + 1) / n``. Which of the other branch's points a destination reads is its *window*,
in one of three forms (DESIGN §2; :data:`DEFAULT_WINDOW_FORM` is the default):

- ``"paper"`` (Eq. 11/12): the ``window`` deepest source points strictly shallower than the
  destination (equal depths: ``i - window <= j <= i - 1``), each read as its branch's *layer
  output* A_j — after its own fusion, norm and activation, what its branch's next layer reads. The
  first point has no strictly shallower source and gets no fusion from that branch.
- ``"code"`` (the authors' released code): the ``window`` deepest source points no deeper than the
  destination (equal depths: ``i - window + 1 <= j <= i``). The one at the same depth is read
  *before* its own fusion at its entry node (otherwise the two would read each other); the earlier
  ones as layer outputs. At a conv -> norm -> activation unit what exists before the fusion is the
  raw conv output (the fusion enters before the norm), so that is what the same-depth read gives.
- ``"group"`` (the authors' ViT code, MTL-NAS): as ``"code"``, but never across a group boundary:
  the source points are split into consecutive groups of ``window`` by index, and a destination reads
  only the group of the deepest source point no deeper than itself (equal depths: 1, 2, 3, 1, 2, 3
  sources for ``window=3``).

Layer-output reads only ever look strictly shallower and before-fusion reads never wait on a
fusion, so the fused graph is acyclic in every form. Connections only ever join the primary and one
auxiliary (never two auxiliaries).
"""

from __future__ import annotations

from dataclasses import dataclass

from .analysis import NCHW, NHWC, TOKENS, VECTOR
from .errors import AuxwrapTapError, check_choice, check_int
from .taps import Tap

PRIMARY = "primary"
TO_AUX, TO_PRIMARY = "primary->aux", "aux->primary"
MODES = ("grad", "nas")
WINDOW_FORMS = ("paper", "code", "group")
#: the window form attach() uses unless told otherwise (to be set from the measured ablation)
DEFAULT_WINDOW_FORM = "paper"
#: how a source is read: its layer output (after its fusion, norm and activation), or its value at
#: its entry node before its own fusion (a unit's conv output, a block's unfused output)
OUTPUT, BEFORE = "output", "before"
_SPATIAL = (NCHW, NHWC, TOKENS)


def aux_branch(k: int) -> str:
    return f"aux{k}"


@dataclass(frozen=True)
class Connection:
    """One link: ``source`` (read as ``reads`` says) flows into the fusion at ``dest``."""

    source_branch: str
    source: str        # tap name in the source branch
    dest_branch: str
    dest: str          # tap name in the destination branch
    direction: str     # "primary->aux" or "aux->primary"
    gate: float | None = None  # its gate value, filled in by ``FusedNet.connections()``
    reads: str = OUTPUT  # "output": the source's layer output; "before": its entry value before its fusion


class AuxwrapPairingError(AuxwrapTapError):
    """The fusion points of two branches cannot be connected."""


def check_mode(mode: object) -> str:
    return check_choice("mode", mode, MODES, fix="use mode='grad' (Aux-G: primary -> auxiliary links only) or "
                        "mode='nas' (Aux-NAS: links both ways, searched)")


def check_window(window: object) -> int:
    """``window`` as an int: any positive integer, numpy's included (:func:`auxwrap.errors.is_integer`)."""
    return check_int("window", window, 1, allowed="a positive integer", fix="pass e.g. window=3 (the paper's)")


def check_window_form(window_form: object) -> str:
    return check_choice("window_form", window_form, WINDOW_FORMS,
                        fix="use 'paper' (strictly earlier layer outputs), 'code' (the same depth, read before its "
                        "fusion, and the earlier ones) or 'group' (as 'code', within groups of `window` points)")


def direction(dest_branch: str) -> str:
    """The direction of a link into ``dest_branch``: :data:`TO_PRIMARY` into the primary, else :data:`TO_AUX`."""
    return TO_PRIMARY if dest_branch == PRIMARY else TO_AUX


def can_pair(source: Tap, dest: Tap) -> bool:
    """Maps, tokens and channels-last maps fuse with each other; vectors only with vectors."""
    if source.layout == VECTOR or dest.layout == VECTOR:
        return source.layout == dest.layout
    return source.layout in _SPATIAL and dest.layout in _SPATIAL


def plan(taps: dict[str, list[Tap]], mode: str, window: int = 3,
         window_form: str = DEFAULT_WINDOW_FORM) -> list[Connection]:
    """All connections between the primary and each auxiliary, in destination order.

    ``taps`` maps branch names (``"primary"``, ``"aux0"``, ``"aux1"``...) to their ordered points.
    """
    check_mode(mode)
    window = check_window(window)
    check_window_form(window_form)
    connections = []
    for branch, aux_taps in taps.items():
        if branch == PRIMARY:
            continue
        pair = _links(taps[PRIMARY], aux_taps, PRIMARY, branch, window, window_form)
        if mode == "nas":
            pair += _links(aux_taps, taps[PRIMARY], branch, PRIMARY, window, window_form)
        if not pair:
            raise AuxwrapPairingError(_unpairable_message(taps[PRIMARY], aux_taps, branch, mode, window, window_form))
        connections += pair
    return connections


def window_of(dest_index: int, n_dest: int, n_source: int, window: int,
              window_form: str = DEFAULT_WINDOW_FORM) -> list[tuple[int, str]]:
    """The source points destination point ``dest_index`` reads, shallowest first, each with how it is
    read (:data:`OUTPUT` or :data:`BEFORE`): the window rule of every form, and its only definition."""
    # relative depths compared exactly: source j is at (j + 1) / n_source, the destination at (i + 1) / n_dest
    def depth(j: int) -> int:
        return (j + 1) * n_dest

    here = (dest_index + 1) * n_source
    if window_form == "paper":
        return [(j, OUTPUT) for j in range(n_source) if depth(j) < here][-window:]
    reachable = [j for j in range(n_source) if depth(j) <= here][-window:]
    if window_form == "group":
        group = group_of(dest_index, n_dest, n_source, window)
        reachable = [j for j in reachable if j // window == group]
    elif window_form != "code":
        check_window_form(window_form)
    return [(j, BEFORE if depth(j) == here else OUTPUT) for j in reachable]


def sources_of(dest_index: int, n_dest: int, n_source: int, window: int,
               window_form: str = DEFAULT_WINDOW_FORM) -> list[int]:
    """Indices of the source points read by destination point ``dest_index`` (see :func:`window_of`)."""
    return [j for j, _ in window_of(dest_index, n_dest, n_source, window, window_form)]


def group_of(dest_index: int, n_dest: int, n_source: int, window: int) -> int:
    """The group of the source branch (``index // window``) that destination ``dest_index`` falls in by
    relative depth: that of the deepest source point no deeper than it; -1 where there is none."""
    deepest = (dest_index + 1) * n_source // n_dest - 1
    return deepest // window if deepest >= 0 else -1


def _windowed(sources: list[Tap], dests: list[Tap], window: int, window_form: str) -> list[tuple[Tap, Tap, str]]:
    """Every (source, destination, how it is read) the window joins, whether or not their layouts fuse."""
    return [(sources[j], dest, reads) for i, dest in enumerate(dests)
            for j, reads in window_of(i, len(dests), len(sources), window, window_form)]


def _links(sources: list[Tap], dests: list[Tap], source_branch: str, dest_branch: str, window: int,
           window_form: str) -> list[Connection]:
    return [Connection(source_branch, source.name, dest_branch, dest.name, direction(dest_branch), reads=reads)
            for source, dest, reads in _windowed(sources, dests, window, window_form) if can_pair(source, dest)]


def _unpairable_message(primary: list[Tap], aux: list[Tap], branch: str, mode: str, window: int,
                        window_form: str) -> str:
    """Why no connection joins the primary and ``branch``, by case (layouts, window, depth), with its fix."""
    def points(taps: list[Tap]) -> str:
        return f"{len(taps)} point{'' if len(taps) == 1 else 's'}: {', '.join(sorted({t.layout for t in taps}))}"

    sides = f"the primary ({points(primary)}) and {branch} ({points(aux)})"
    by_hand = f"taps={{'primary': [...], '{branch}': [...]}}"
    if not any(can_pair(p, a) for p in primary for a in aux):  # no two points of any depths fuse
        return (f"no fusion point of {sides} can be paired with any of the other: maps and tokens fuse with each "
                f"other, vectors only with vectors, other layouts with nothing. Pass {by_hand} naming points "
                "with feature-map or token outputs (or vectors) in both.")
    directions = [(primary, aux, PRIMARY, branch)] + ([(aux, primary, branch, PRIMARY)] if mode == "nas" else [])
    joined = [(s_branch, source, d_branch, dest) for sources, dests, s_branch, d_branch in directions
              for source, dest, _ in _windowed(sources, dests, window, window_form)]
    if not joined:  # only "paper" can read nothing: a source branch of one point has nothing strictly shallower
        return (f"no connection between {sides} with window_form='paper': 'paper' reads only strictly shallower "
                "points of the other branch (point i of n sits at depth (i + 1) / n), and a source branch of one "
                "point has none. Pass taps=... naming more points, or window_form='code' (which also reads the "
                "point at the same depth).")
    shown = "; ".join(f"{d_branch} {dest.describe()} reads {s_branch} {source.describe()}"
                      for s_branch, source, d_branch, dest in joined[:3])
    more = f"; and {len(joined) - 3} more" if len(joined) > 3 else ""
    return (f"no connection between {sides}: the points the window pairs by relative depth (window={window}, "
            f"window_form={window_form!r}) have layouts that do not fuse ({shown}{more}); maps and tokens fuse "
            f"with each other, vectors only with vectors. Pass {by_hand} so that points of fusable layouts sit at "
            "matching depths in both branches (e.g. leave out the vector points), or a larger window.")
