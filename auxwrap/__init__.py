"""auxwrap: auxiliary labels make the primary model better, at single-task inference cost.

The way through the code (DESIGN §5): :mod:`auxwrap.trace` (model -> fx graph with module paths) ->
:mod:`auxwrap.taps` (ordered fusion points with shapes) -> plan -> build -> train -> prune/detach -> count.

The public names are imported on first use (PEP 562): ``import auxwrap`` and ``python -m auxwrap --help``
do not import torch; ``auxwrap.attach`` or ``from auxwrap import attach`` imports what it needs.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

#: public name -> the submodule that defines it (``mto`` is a submodule itself)
_EXPORTS = {
    "AuxModule": "auxmodule",
    "AuxOutput": "fused",
    "AuxwrapArgumentError": "errors",
    "AuxwrapDeployError": "deploy",
    "AuxwrapError": "errors",
    "AuxwrapMissingDependencyError": "optional",
    "AuxwrapPairingError": "plan",
    "AuxwrapPruneError": "deploy",
    "AuxwrapPruneWarning": "deploy",
    "AuxwrapTapError": "errors",
    "AuxwrapTraceError": "errors",
    "Balancer": "mto",
    "Connection": "plan",
    "FoldReport": "fold",
    "FusedNet": "fused",
    "GateHistory": "search",
    "HalfSampler": "search",
    "Search": "search",
    "SearchSummary": "search",
    "Tap": "taps",
    "Traced": "trace",
    "AuxwrapCaptureWarning": "trace",
    "Unit": "taps",
    "attach": "attach",
    "count_flops": "flops",
    "count_norm_layers": "flops",
    "count_parameters": "flops",
    "cut_error": "search",
    "default_example_inputs": "examples",
    "export": "deploy",
    "export_onnx": "deploy",
    "find_taps": "taps",
    "fold_batchnorm": "fold",
    "plot_gates": "plot",
    "prune": "deploy",
    "report": "flops",
    "search_loaders": "search",
    "trace": "trace",
}
_SUBMODULES = ("mto",)

# a literal list, for tools that read it without running the code; tests/test_cli.py checks it against _EXPORTS
__all__ = [
    "AuxModule",
    "AuxOutput",
    "AuxwrapArgumentError",
    "AuxwrapDeployError",
    "AuxwrapError",
    "AuxwrapMissingDependencyError",
    "AuxwrapPairingError",
    "AuxwrapPruneError",
    "AuxwrapPruneWarning",
    "AuxwrapTapError",
    "AuxwrapTraceError",
    "AuxwrapCaptureWarning",
    "Balancer",
    "Connection",
    "FoldReport",
    "FusedNet",
    "GateHistory",
    "HalfSampler",
    "Search",
    "SearchSummary",
    "Tap",
    "Traced",
    "Unit",
    "__version__",
    "attach",
    "count_flops",
    "count_norm_layers",
    "count_parameters",
    "cut_error",
    "default_example_inputs",
    "export",
    "export_onnx",
    "find_taps",
    "fold_batchnorm",
    "mto",
    "plot_gates",
    "prune",
    "report",
    "search_loaders",
    "trace",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use, then keep it in the module's namespace; ``auxwrap.deploy`` and the
    other submodules load on first use too, as they did when ``import auxwrap`` imported them all."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES or (not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}")):
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``auxwrap`` itself: the functions ``attach`` and ``trace`` keep their names over their submodules'.

    Importing a submodule binds it on its package (``auxwrap.trace = <module auxwrap.trace>``); that would
    hide the public function of the same name, which is looked up lazily. Such a binding is skipped.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from . import mto
    from .attach import attach
    from .auxmodule import AuxModule
    from .deploy import AuxwrapDeployError, AuxwrapPruneError, AuxwrapPruneWarning, export, export_onnx, prune
    from .errors import AuxwrapArgumentError, AuxwrapError, AuxwrapTapError, AuxwrapTraceError
    from .examples import default_example_inputs
    from .flops import count_flops, count_norm_layers, count_parameters, report
    from .fold import FoldReport, fold_batchnorm
    from .fused import AuxOutput, FusedNet
    from .mto import Balancer
    from .optional import AuxwrapMissingDependencyError
    from .plan import AuxwrapPairingError, Connection
    from .plot import plot_gates
    from .search import GateHistory, HalfSampler, Search, SearchSummary, cut_error, search_loaders
    from .taps import Tap, Unit, find_taps
    from .trace import AuxwrapCaptureWarning, Traced, trace
