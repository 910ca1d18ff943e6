"""auxwrap: auxiliary labels make the primary model better, at single-task inference cost.

The way through the code (DESIGN §5): :mod:`auxwrap.trace` (model -> fx graph with module paths) ->
:mod:`auxwrap.taps` (ordered fusion points with shapes) -> plan -> build -> train -> prune/detach -> count.
"""

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
from .plan import AuxwrapPairingError, Connection
from .plot import plot_gates
from .search import GateHistory, HalfSampler, Search, SearchSummary, cut_error, search_loaders
from .taps import Tap, Unit, find_taps
from .trace import Traced, trace

__version__ = "0.1.0.dev0"

__all__ = [
    "AuxModule",
    "AuxOutput",
    "AuxwrapArgumentError",
    "AuxwrapDeployError",
    "AuxwrapError",
    "AuxwrapPairingError",
    "AuxwrapPruneError",
    "AuxwrapPruneWarning",
    "AuxwrapTapError",
    "AuxwrapTraceError",
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
