"""Step 1 — capture a model as a torch.fx graph that remembers which module owns every node.

The graph module shares the user's parameters and submodules (nothing is copied). timm's no-trace
registries are applied automatically, so every model timm itself can trace traces here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import AuxwrapArgumentError, AuxwrapTraceError

#: ``node.meta`` key holding the dotted path of the module that owns the node ("" for the root).
MODULE_PATH = "auxwrap_module_path"


@dataclass
class Traced:
    """A traced model: the user's module, its fx graph module, and the node → module-path map."""

    model: nn.Module
    graph_module: fx.GraphModule
    training: bool
    modules: dict[str, nn.Module] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.modules = dict(self.model.named_modules())

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def name(self) -> str:
        return type(self.model).__name__

    def owner(self, node: fx.Node) -> str:
        """The dotted path of the module whose forward created ``node`` ("" for the root)."""
        return node.meta.get(MODULE_PATH, "")

    def owned_by(self, path: str) -> list[fx.Node]:
        """Nodes created inside module ``path`` or its descendants, in graph order."""
        prefix = path + "."
        return [n for n in self.graph.nodes if path == "" or self.owner(n) == path
                or self.owner(n).startswith(prefix)]

    def target_module(self, node: fx.Node) -> nn.Module | None:
        """The module a ``call_module`` node calls, else None."""
        if node.op != "call_module":
            return None
        return self.graph_module.get_submodule(node.target)


def default_leaf_modules() -> tuple[type[nn.Module], ...]:
    """Module classes kept opaque by default: timm's ``register_notrace_module`` registry."""
    from timm.layers import get_notrace_modules

    return tuple(get_notrace_modules())


def default_autowrap_functions() -> tuple[Callable, ...]:
    """Functions kept opaque by default: timm's ``register_notrace_function`` registry."""
    from timm.layers import get_notrace_functions

    return tuple(f for f in get_notrace_functions() if callable(f))


class _PathTracer(fx.Tracer):
    """An fx tracer that records the owning module path of every node and where tracing failed."""

    def __init__(self, leaf_modules: tuple[type, ...] = (), autowrap_functions: tuple[Callable, ...] = ()):
        # defaults: torch.fx re-creates the tracer class without arguments when it unpickles a GraphModule
        super().__init__(autowrap_functions=autowrap_functions)
        self._leaf_types = leaf_modules
        self._current_path = ""
        self.failed_at: tuple[str, type] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        outer = self._current_path
        self._current_path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:  # innermost module on the way out
                self.failed_at = (self._current_path, type(m))
            raise
        finally:
            self._current_path = outer

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:  # noqa: ANN001
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta[MODULE_PATH] = self._current_path
        return node


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict[str, Any] | None = None,
    training: bool | None = None,
) -> Traced:
    """Trace ``model`` with torch.fx, recording the owning module path of every node.

    Args:
        model: any ``nn.Module``; it is not modified.
        leaf_modules: module classes to keep as one opaque call (added to timm's registry).
        autowrap_functions: functions to record as one call instead of tracing through them.
        concrete_args: values for ``forward`` arguments that drive Python control flow.
        training: trace as in train (True) or eval (False) mode; Python code that reads
            ``self.training`` (timm's DropPath) is baked into the graph. Default: the current mode.
            Every module's flag is restored afterwards.

    Raises:
        AuxwrapArgumentError: ``model`` is not a traceable ``nn.Module`` or an option is malformed.
        AuxwrapTraceError: torch.fx failed; the message names the module and class at fault.
    """
    _check_model(model)
    leaves = _check_leaf_modules(leaf_modules) + default_leaf_modules()
    wrapped = _check_functions(autowrap_functions) + default_autowrap_functions()
    tracer = _PathTracer(leaves, wrapped)
    flags = {m: m.training for m in model.modules()}
    if training is not None:
        model.train(training)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
        graph_module = fx.GraphModule(model, graph, class_name=f"Traced{type(model).__name__}")
        return Traced(model=model, graph_module=graph_module, training=model.training)
    except Exception as error:  # torch.fx raises TraceError, TypeError, RuntimeError, ...
        path, cls = tracer.failed_at or ("", type(model))
        raise AuxwrapTraceError(_trace_failure_message(model, path, cls, error), path, cls) from error
    finally:
        for module, flag in flags.items():
            module.training = flag


def _check_model(model: object) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise AuxwrapArgumentError(
            f"{type(model).__name__} is a TorchScript module, which torch.fx cannot trace; "
            "pass the eager nn.Module it was scripted from.")
    if not isinstance(model, nn.Module):
        raise AuxwrapArgumentError(
            f"expected an nn.Module, got {type(model).__name__}; pass the model instance "
            "(e.g. timm.create_model(...) or torchvision.models.resnet50()), not its output or class.")


def _check_leaf_modules(leaf_modules: Iterable[type[nn.Module]]) -> tuple[type, ...]:
    if isinstance(leaf_modules, type):
        leaf_modules = (leaf_modules,)
    leaves = tuple(leaf_modules)
    for leaf in leaves:
        if not (isinstance(leaf, type) and issubclass(leaf, nn.Module)):
            raise AuxwrapArgumentError(
                f"leaf_modules must hold nn.Module classes, got {leaf!r}; "
                f"pass the class (type(m)) rather than an instance or a name.")
    return leaves


def _check_functions(functions: Iterable[Callable]) -> tuple[Callable, ...]:
    functions = tuple(functions)
    for function in functions:
        if not callable(function):
            raise AuxwrapArgumentError(
                f"autowrap_functions must hold module-level functions, got {function!r}.")
    return functions


def _trace_failure_message(model: nn.Module, path: str, cls: type, error: Exception) -> str:
    where = f"module '{path}' ({cls.__name__})" if path else f"{cls.__name__}.forward itself"
    fixes = [f"concrete_args={{...}}: fix the forward() argument whose value drives the "
             f"Python control flow of {cls.__name__}"]
    if path:
        fixes.insert(0, f"leaf_modules=[{cls.__name__}]: keep {cls.__name__} as one opaque call "
                        "(no fusion point can then sit inside it)")
        fixes.append(f"timm.layers.register_notrace_module({cls.__name__}): register the class once, "
                     "for timm and auxwrap alike")
    numbered = "\n".join(f"  {i}. {fix}" for i, fix in enumerate(fixes, 1))
    return (f"torch.fx could not trace {type(model).__name__}: it failed inside {where}: "
            f"{type(error).__name__}: {error}\nFixes to try, in order:\n{numbered}")
