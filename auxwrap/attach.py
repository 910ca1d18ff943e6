"""``auxwrap.attach``: the way from two (or K+1) models to one fused training network.

trace each branch (train and eval graphs) -> find its fusion points -> plan the connections ->
build one graph per mode -> wrap in :class:`FusedNet`. Nothing of the user's modules is changed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .analysis import TOKENS
from .auxmodule import AuxModule
from .build import Site, fused_graph, sites
from .deploy import detach_primary
from .errors import AuxwrapArgumentError, AuxwrapTapError, argument_error, check_real
from .examples import as_input_tuple, default_example_inputs, device_and_dtype
from .fused import FusedNet
from .fusion import DEFAULT_GATE, Fusion, Point, check_fusion_rank, check_gate, token_grid
from .plan import (
    DEFAULT_WINDOW_FORM,
    PRIMARY,
    AuxwrapPairingError,
    Connection,
    aux_branch,
    check_mode,
    check_window,
    check_window_form,
    direction,
    plan,
)
from .taps import Tap, find_taps
from .trace import AUTO, EXPORT, Traced, check_capture, kept_as_found, trace

TapSpec = str | Sequence[str]

#: initial gates (aux_to_primary, primary_to_aux) in mode="nas": the authors' released config, the base of
#: benchmarks/ablation.py, which no variant beat by more than its paired spread (results/ablation/ablation.md)
DEFAULT_ALPHA_INIT = (0.001, 0.5)


def attach(
    primary: nn.Module,
    aux: nn.Module | Sequence[nn.Module],
    mode: str = "nas",
    *,
    taps: TapSpec | Mapping[str, TapSpec] = "layer",
    window: int = 3,
    window_form: str = DEFAULT_WINDOW_FORM,
    example_inputs: Any = None,
    alpha_init: float | tuple[float, float] = DEFAULT_ALPHA_INIT,
    gate: str = DEFAULT_GATE,
    fusion_rank: int | float | None = None,
    capture: str = AUTO,
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict[str, Any] | None = None,
) -> FusedNet:
    """Fuse ``primary`` with one or more auxiliary models into one training network.

    Args:
        primary: the model whose task you ship.
        aux: an auxiliary model, or a sequence (a list, an ``nn.ModuleList``) of K of them; each is called
            with the primary's inputs.
        mode: ``"grad"`` (Aux-G: primary -> auxiliary links only, gates fixed at 1) or ``"nas"``
            (Aux-NAS: links both ways, each with a learnable gate in [0, 1]).
        taps: ``"layer"``, ``"stage"``, a list of module paths / node names, or a dict giving one of
            those per branch (keys ``"primary"``, ``"aux"`` for every auxiliary, ``"aux0"``, ``"aux1"``...).
        window: each destination point reads up to this many points of the other branch (paper: 3).
        window_form: which points, and how they are read (DESIGN §2, :mod:`auxwrap.plan`): ``"paper"``
            (the strictly shallower ones, as layer outputs: after their fusion, norm and activation),
            ``"code"`` (the authors' code: the same depth, read before its own fusion, which at a
            conv -> norm -> activation unit is the raw conv output, and the shallower ones as layer
            outputs) or ``"group"`` (as ``"code"``, within consecutive groups of ``window`` points).
        example_inputs: a batch the primary takes, to learn shapes; inferred for timm models.
        alpha_init: initial gate value in mode="nas": one value for both directions (paper: 0.5), or
            ``(aux_to_primary, primary_to_aux)`` (the authors' released config: ``(0.001, 0.5)``). Checked
            in both modes (so a bad value fails the same way in each); mode="grad" does not use it, its
            gates are fixed at 1.
        gate: how a gate's value comes from its parameter in mode="nas": ``"sigmoid"`` (the authors') or
            ``"clamp"`` (straight-through clamp to [0, 1]); see :mod:`auxwrap.fusion`.
        fusion_rank: ``None`` (the default): every fusion's W is full rank (Eq. 13/14). Else a cheaper, low-rank
            W = B . A at every fusion: an int r >= 1 (rank r), or a float in (0, 1] (that fraction of the
            destination's channels C, rounded up: 0.25 is C/4; ``1`` is rank 1, ``1.0`` is C). A fusion where
            rank r would cost at least its full W keeps the full W, so no fusion costs more than at full rank.
            B is zero-initialised: step 0 still computes exactly the original branches.
        capture: how each model becomes a graph (:func:`auxwrap.trace`): ``"auto"`` (torch.fx, and non-strict
            torch.export for a model torch.fx cannot trace, with an :class:`auxwrap.AuxwrapCaptureWarning` naming
            it), ``"fx"`` or ``"export"``. Decided per model; ``net.captures`` says what each branch got. An
            exported branch takes inputs of the example inputs' size only (any batch size).
        leaf_modules: passed to :func:`auxwrap.trace` for every branch (modules kept as one opaque call); torch.fx only.
        autowrap_functions: passed to :func:`auxwrap.trace` for every branch (functions kept as one call);
            torch.fx only.
        concrete_args: passed to :func:`auxwrap.trace` for every branch (forward() arguments fixed to a value);
            torch.fx only.

    Returns:
        A :class:`FusedNet`; ``net(x)`` returns ``AuxOutput(primary=..., aux=(...))``.

    The user's modules are left as found, also when attach() fails: tracing and shape propagation run
    their forward, and whatever that stores or updates in place is restored (:func:`auxwrap.trace.kept_as_found`).
    Only an :class:`AuxModule` auxiliary is changed, bound to the primary's points once all else succeeded.
    """
    mode = check_mode(mode)
    window = check_window(window)
    window_form = check_window_form(window_form)
    gate_init = _check_alpha(alpha_init)  # (to the primary, to an auxiliary)
    gate_init = None if mode == "grad" else gate_init  # Aux-G's gates are fixed at 1
    gate = check_gate(gate)
    fusion_rank = check_fusion_rank(fusion_rank)
    capture = check_capture(capture)
    aux_models = _check_models(primary, aux)
    models = {PRIMARY: primary, **{aux_branch(k): m for k, m in enumerate(aux_models)}}
    _check_devices_and_dtypes(models)
    inputs = as_input_tuple(
        default_example_inputs(primary) if example_inputs is None else example_inputs, type(primary).__name__)
    trace_options = dict(leaf_modules=tuple(leaf_modules), autowrap_functions=tuple(autowrap_functions),
                         concrete_args=concrete_args)
    specs = _tap_specs(taps, list(models))

    readers = {b: m for b, m in models.items() if isinstance(m, AuxModule)}  # Liu et al.'s modules
    with kept_as_found(*models.values()):  # the user's forwards run below; what they store is undone
        with warnings.catch_warnings(record=True) as caught:  # told below, at the line that called attach()
            warnings.simplefilter("always")
            by_mode = _traced_branches({b: m for b, m in models.items() if b not in readers}, capture, inputs,
                                       trace_options)
        for warning in caught:
            warnings.warn(warning.message, stacklevel=2)
        points = _find_points(by_mode[False], inputs, specs)
        read_points = _reader_points(by_mode[False][PRIMARY], inputs, readers, specs)
        connections = plan(points, mode, window, window_form)
        fusion_sites = sites(connections, points)
        fusions = {site.name: _fusion(site, models, gate_init, gate, fusion_rank) for site in fusion_sites}
        _check_fusions(fusion_sites, fusions)

        prefixes = {PRIMARY: "primary", **{aux_branch(k): f"aux.{k}" for k in range(len(aux_models))}}
        graphs = {False: fused_graph(by_mode[False], prefixes, fusion_sites, _nodes_of(read_points))}
        if _graphs_differ(by_mode[False], by_mode[True]):
            train_points = _find_points(by_mode[True], inputs, specs)
            _check_same_points(points, train_points)
            train_reads = _reader_points(by_mode[True][PRIMARY], inputs, readers, specs)
            _check_same_points(read_points, train_reads)
            graphs[True] = fused_graph(by_mode[True], prefixes, _retarget(fusion_sites, train_points),
                                       _nodes_of(train_reads))
    device, dtype = device_and_dtype(primary)
    fusions = {name: f.to(device=device, dtype=dtype) for name, f in fusions.items()}
    for branch, module in readers.items():  # last: a failed attach() leaves the AuxModules unbound
        module.bind([_point(t, primary) for t in read_points[branch]])
        module.to(device=device, dtype=dtype)
    reads = [Connection(PRIMARY, t.name, b, f"adaptor{i}", direction(b)) for b, taps in read_points.items()
             for i, t in enumerate(taps)]
    captured = by_mode[False]
    net = FusedNet(primary, aux_models, fusions, graphs, mode, {**points, **read_points}, connections + reads,
                   fusion_sites, inputs, trace_options, detach=detach_primary,
                   captures={b: t.capture for b, t in captured.items()},
                   output_specs={b: t.output_spec for b, t in captured.items() if t.output_spec is not None})
    net.window, net.window_form = window, window_form  # the window the connections were planned with
    return net


def _traced_branches(models: dict[str, nn.Module], capture: str, inputs: tuple,
                     fx_options: dict[str, Any]) -> dict[bool, dict[str, Traced]]:
    """Each branch captured in eval mode (``False``) and train mode (``True``). ``capture="auto"`` is decided on
    the eval capture, once per model (one message), and the train capture uses what it decided."""
    def traced(model: nn.Module, training: bool, how: str) -> Traced:
        # the fx-only options reach trace() (which refuses them with capture="export"), but not a branch "auto" exported
        options = fx_options if how != EXPORT or capture == EXPORT else {}
        return trace(model, training=training, capture=how, example_inputs=inputs, **options)

    eval_mode = {b: traced(m, False, capture) for b, m in models.items()}
    return {False: eval_mode, True: {b: traced(m, True, eval_mode[b].capture) for b, m in models.items()}}


def _reader_points(primary: Traced, inputs: tuple, readers: dict[str, AuxModule],
                   specs: dict[str, TapSpec]) -> dict[str, list[Tap]]:
    """The primary's points each AuxModule reads: its own ``taps``, else the primary's."""
    return {b: find_taps(primary, inputs, m.taps if m.taps is not None else specs[PRIMARY])
            for b, m in readers.items()}


# ---------------------------------------------------------------------- argument checks

def _check_alpha(alpha_init: object) -> tuple[float, float]:
    """``(aux_to_primary, primary_to_aux)`` from one gate value or a pair, each a real number in [0, 1]."""
    allowed = "a gate value in [0, 1] or a pair (aux_to_primary, primary_to_aux) of them"
    fix = (f"pass e.g. alpha_init=0.5 (the paper's) or alpha_init={DEFAULT_ALPHA_INIT} (the authors' released "
           "config)")
    if not isinstance(alpha_init, (tuple, list)):
        value = check_real("alpha_init", alpha_init, 0.0, 1.0, allowed=allowed, fix=fix)
        return value, value
    if len(alpha_init) != 2:
        raise argument_error("alpha_init", alpha_init, allowed, fix=fix)
    return tuple(check_real(f"alpha_init[{i}]", v, 0.0, 1.0, allowed="a gate value in [0, 1]", fix=fix)
                 for i, v in enumerate(alpha_init))


def _aux_list(aux: object) -> list[object] | None:
    """The auxiliaries as a list: one module, a sequence of them, or an nn.ModuleList of them (which has no
    forward of its own: each of its modules is an auxiliary); None where ``aux`` is none of these."""
    if isinstance(aux, nn.ModuleDict):
        raise AuxwrapArgumentError(
            "aux is an nn.ModuleDict, whose keys attach() would lose (auxiliaries are numbered aux0, aux1... in "
            "order); pass aux=list(modules.values()).")
    if isinstance(aux, nn.ModuleList):
        return list(aux)
    if isinstance(aux, nn.Module):
        return [aux]
    return list(aux) if isinstance(aux, Sequence) and not isinstance(aux, str) else None


def _check_runnable(branch: str, model: nn.Module) -> None:
    """A branch must have a forward: an nn.ModuleList, nn.ModuleDict or bare nn.Module has none."""
    if type(model).forward is nn.Module.forward:
        raise AuxwrapArgumentError(
            f"{branch} ({type(model).__name__}) has no forward(), so it cannot be run or traced; pass the model "
            "that runs (e.g. nn.Sequential(*layers)), or, for several auxiliaries, aux=[model1, model2].")


def _check_models(primary: object, aux: object) -> list[nn.Module]:
    if not isinstance(primary, nn.Module):
        raise AuxwrapArgumentError(
            f"primary must be an nn.Module, got {type(primary).__name__}; pass the model instance "
            "(e.g. timm.create_model(...)), not its class, name or output.")
    _check_runnable("primary", primary)
    aux_models = _aux_list(aux)
    if not aux_models or not all(isinstance(m, nn.Module) for m in aux_models):
        raise AuxwrapArgumentError(
            f"aux must be an nn.Module or a non-empty sequence of them, got {aux!r:.80}; pass aux=model "
            "or aux=[model1, model2].")
    owners = {id(p): ("primary", name) for name, p in primary.named_parameters()}
    for k, model in enumerate(aux_models):
        _check_runnable(aux_branch(k), model)
        if isinstance(model, AuxModule) and model.bound:
            raise AuxwrapArgumentError(
                f"aux{k} is an AuxModule already attached to another network; create a new AuxModule.")
        if model is primary or any(model is other for other in aux_models[:k]):
            raise AuxwrapArgumentError(
                f"aux{k} is the same module instance as {'the primary' if model is primary else 'another auxiliary'}; "
                "each branch needs its own weights: pass copy.deepcopy(model) or a new instance.")
        for name, p in model.named_parameters():
            if id(p) in owners:
                branch, other = owners[id(p)]
                raise AuxwrapArgumentError(
                    f"aux{k} parameter {name!r} is the same tensor as {branch} parameter {other!r}; "
                    "branches must not share weights (Aux-NAS uses separate branches): pass a copy.")
            owners[id(p)] = (f"aux{k}", name)
    return aux_models


def _check_devices_and_dtypes(models: dict[str, nn.Module]) -> None:
    """One device for every branch, and one float dtype (:func:`auxwrap.examples.device_and_dtype`) for every
    branch with floating-point parameters: fusions add one branch's features to the other's. An AuxModule is
    left out of the dtype check: it is converted to the primary's dtype when bound."""
    devices = {b: {p.device for p in m.parameters()} for b, m in models.items()}
    everywhere = set().union(*devices.values())
    if len(everywhere) > 1:
        where = ", ".join(f"{b} on {', '.join(sorted(map(str, d)))}" for b, d in devices.items())
        raise AuxwrapArgumentError(
            f"the branches are on different devices ({where}); move every model to one device "
            "with .to(device) before attach().")
    dtypes = {b: device_and_dtype(m)[1] for b, m in models.items()
              if not isinstance(m, AuxModule) and any(p.is_floating_point() for p in m.parameters())}
    if len(set(dtypes.values())) > 1:
        which = ", ".join(f"{b} {dtype}" for b, dtype in dtypes.items())
        raise AuxwrapArgumentError(
            f"the branches have different dtypes ({which}), and a fusion adds one branch's features to the "
            f"other's; convert every model to one dtype with .to(dtype) before attach(), e.g. "
            f"aux.to({dtypes[PRIMARY] if PRIMARY in dtypes else next(iter(dtypes.values()))}).")


def _tap_specs(taps: object, branches: list[str]) -> dict[str, TapSpec]:
    if not isinstance(taps, Mapping):
        return dict.fromkeys(branches, taps)
    unknown = [key for key in taps if key not in branches and key != "aux"]
    if unknown:
        raise AuxwrapArgumentError(
            f"taps has unknown branch keys {unknown}; use 'primary', 'aux' (every auxiliary) or one of {branches[1:]}.")
    return {b: taps.get(b, taps.get("aux", "layer") if b != PRIMARY else "layer") for b in branches}


def _find_points(branches: dict[str, Traced], inputs: tuple, specs: dict[str, TapSpec]) -> dict[str, list[Tap]]:
    points = {}
    for branch, traced in branches.items():
        try:
            points[branch] = find_taps(traced, inputs, specs[branch])
        except AuxwrapArgumentError as error:  # say which branch did not take the primary's inputs
            raise AuxwrapArgumentError(f"{branch}: {error}") from error
    return points


# ---------------------------------------------------------------------- fusion modules

def _fusion(site: Site, models: dict[str, nn.Module], gate_init: tuple[float, float] | None, gate: str,
            rank: int | float | None = None) -> Fusion:
    sources = [_point(t, models[site.source_branch]) for t in site.sources]
    init = None if gate_init is None else gate_init[0] if site.dest_branch == PRIMARY else gate_init[1]
    return Fusion(sources, _point(site.dest, models[site.dest_branch]), init, gate, rank)


def _point(tap: Tap, model: nn.Module) -> Point:
    """What a fusion needs of ``tap``: layout, channels, and for tokens the prefix and grid the tap found in its
    tensor (:func:`auxwrap.find_taps`); a token tap made by hand without a grid gets ``model``'s
    ``num_prefix_tokens`` and a square grid where they fit."""
    if tap.layout != TOKENS:
        return Point(tap.layout, tap.channels)
    if tap.grid is not None:
        return Point(tap.layout, tap.channels, tap.prefix, tap.grid)
    try:
        prefix, grid = token_grid(tap.shape[1], getattr(model, "num_prefix_tokens", None))
    except ValueError:
        return Point(tap.layout, tap.channels, tap.prefix, None)
    return Point(tap.layout, tap.channels, prefix, grid)


def _check_fusions(fusion_sites: list[Site], fusions: dict[str, Fusion]) -> None:
    """Run each fusion once on zeros of the recorded shapes, so bad pairings fail here, by name."""
    for site in fusion_sites:
        dest = torch.zeros(site.dest.shape)
        sources = [torch.zeros(s.shape) for s in site.sources]
        try:
            with torch.no_grad():
                out = fusions[site.name](dest, *sources)
        except Exception as error:
            sources = [s.describe() for s in site.sources]
            raise AuxwrapPairingError(
                f"cannot fuse {site.source_branch} points {sources} into {site.dest_branch} point "
                f"{site.dest.describe()}: {error}; choose other points with taps=...") from error
        if out.shape != dest.shape:
            raise AuxwrapPairingError(f"fusion {site.name} changes the shape {tuple(dest.shape)} -> {tuple(out.shape)}")


# ---------------------------------------------------------------------- train and eval graphs

def _graphs_differ(eval_branches: dict[str, Traced], train_branches: dict[str, Traced]) -> bool:
    return any(eval_branches[b].graph_module.code != train_branches[b].graph_module.code for b in eval_branches)


def _check_same_points(eval_points: dict[str, list[Tap]], train_points: dict[str, list[Tap]]) -> None:
    for branch, taps in eval_points.items():
        ours = [(t.name, t.shape) for t in taps]
        theirs = [(t.name, t.shape) for t in train_points[branch]]
        if ours != theirs:
            raise AuxwrapTapError(
                f"the train-mode and eval-mode graphs of {branch} have different fusion points "
                f"({len(theirs)} vs {len(ours)}); name the points by module path with taps=[...].")


def _nodes_of(points: dict[str, list[Tap]]) -> dict[str, list[str]]:
    """Each branch's points as fx node names (how the graph builder is told what a reader reads)."""
    return {branch: [t.node for t in taps] for branch, taps in points.items()}


def _retarget(fusion_sites: list[Site], points: dict[str, list[Tap]]) -> list[Site]:
    """The same sites, with taps (and so node names) of the other mode's graphs."""
    by_name = {b: {t.name: t for t in taps} for b, taps in points.items()}
    return [dataclasses.replace(s, dest=by_name[s.dest_branch][s.dest.name],
                                sources=tuple(by_name[s.source_branch][t.name] for t in s.sources))
            for s in fusion_sites]

