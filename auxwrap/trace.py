"""Step 1 — capture a model as a torch.fx graph that remembers which module owns every node.

Two ways (``capture=``): torch.fx symbolic tracing (``"fx"``), which keeps modules and functions as they
are written and takes inputs of any size; and non-strict ``torch.export`` (``"export"``,
:mod:`auxwrap.capture`), which records ATen operations and also captures models whose Python control flow
stops torch.fx (Hugging Face transformers). ``"auto"``, the default, uses torch.fx where it traces and
says so once where it falls back on torch.export. Both give a :class:`Traced` the later steps read alike.

The graph module shares the user's parameters and submodules (nothing is copied). timm's no-trace
registries are applied automatically, so every model timm itself can trace traces here too.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import capture as exporting
from .capture import AUTO, CAPTURES, EXPORT, FX, CaptureFailed
from .errors import AuxwrapArgumentError, AuxwrapTraceError, check_choice
from .examples import as_input_tuple, default_example_inputs

#: ``node.meta`` key holding the dotted path of the module that owns the node ("" for the root).
MODULE_PATH = "auxwrap_module_path"


@dataclass(frozen=True)
class _Guarding:
    """What the enclosing :func:`kept_as_found` blocks restore: the ids of their modules (nested blocks leave
    those to them), and the (module id, attribute) pairs added meanwhile that all of them keep."""

    modules: frozenset[int]
    kept: set[tuple[int, str]]


_GUARDING: ContextVar[_Guarding | None] = ContextVar("auxwrap_guarding", default=None)

#: instance attributes restored by content, in place: the parameter, buffer, submodule and hook tables
#: and the user's own lists, dicts and sets (``self.history.append(y)`` in a forward)
_CONTAINERS = (list, dict, OrderedDict, set)


@contextlib.contextmanager
def kept_as_found(*models: nn.Module) -> Iterator[None]:
    """Leave every module of ``models`` as found on the way out of the block, also when it fails.

    Tracing runs each ``forward`` on proxies and shape propagation on example inputs; a forward may
    store attributes (``self.last = y`` would keep an fx Proxy), add new ones, append to its lists or
    update buffers in place (``self.calls.add_(1)``). Restored for each module: its instance
    ``__dict__`` (the same objects under the same keys, keys added meanwhile removed, training flag
    included), the former contents of its lists, dicts and sets (parameter, buffer and submodule
    tables too), and the values of the tensors held there, copied back in place so that each tensor
    keeps its identity. The values are cloned on the way in: it costs one copy of the models' state.
    Kept: attributes added meanwhile and named to :func:`keep_attribute` (torch.fx's tensor constants).
    """
    outer = _GUARDING.get() or _Guarding(frozenset(), set())
    modules = {id(m): m for model in models for m in model.modules() if id(m) not in outer.modules}
    states = [_ModuleState(m) for m in modules.values()]
    values = _TensorValues(t for state in states for t in state.tensors())
    token = _GUARDING.set(_Guarding(outer.modules | modules.keys(), outer.kept))
    try:
        yield
    finally:
        _GUARDING.reset(token)
        for state in states:
            state.restore(outer.kept)
        values.restore()


def keep_attribute(module: nn.Module, name: str) -> None:
    """Let attribute ``name``, added to ``module`` inside :func:`kept_as_found` blocks, outlive all of them."""
    guarding = _GUARDING.get()
    if guarding is not None:
        guarding.kept.add((id(module), name))


def _members(value: object) -> Iterator[object]:
    """A value and, where it is a list, dict or set, what it holds (one level down)."""
    yield value
    if type(value) in _CONTAINERS:
        yield from (value.values() if isinstance(value, dict) else value)


class _ModuleState:
    """One module's instance attributes and the contents of its containers, as they were."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.attributes = dict(vars(module))
        self.contents = {k: v.copy() for k, v in self.attributes.items() if type(v) in _CONTAINERS}

    def tensors(self) -> Iterator[torch.Tensor]:
        for value in self.attributes.values():
            yield from (v for v in _members(value) if isinstance(v, torch.Tensor))

    def restore(self, kept: set[tuple[int, str]]) -> None:
        current = vars(self.module)
        for key in [k for k in current if k not in self.attributes and (id(self.module), k) not in kept]:
            del current[key]
        current.update(self.attributes)
        for key, content in self.contents.items():
            container = self.attributes[key]
            if isinstance(container, list):
                container[:] = content
            else:
                container.clear()
                container.update(content)


class _TensorValues:
    """The values of some tensors (each once), to copy back into the same tensor objects."""

    def __init__(self, tensors: Iterable[torch.Tensor]):
        lazy = nn.parameter.UninitializedTensorMixin  # no value yet: a lazy module's first run gives it one
        unique = {id(t): t for t in tensors if not t.is_meta and not isinstance(t, lazy)}
        with torch.no_grad():
            self.saved = [(t, t.detach().clone()) for t in unique.values()]

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, value in self.saved:
                if (tensor.shape, tensor.dtype, tensor.device) != (value.shape, value.dtype, value.device):
                    tensor.data = value  # resized or moved in place: the object keeps its identity
                elif not torch.equal(tensor, value):
                    tensor.copy_(value)


class AuxwrapCaptureWarning(UserWarning):
    """``capture="auto"``: torch.fx could not trace a model, so it was captured with torch.export."""


@dataclass
class Traced:
    """A traced model: the user's module, its fx graph module, and the node → module-path map.

    ``capture`` says how the graph was made: ``"fx"`` (torch.fx: modules are ``call_module`` nodes, the graph
    returns the model's output structure) or ``"export"`` (torch.export: ATen ``call_function`` nodes, the
    ``output`` node holds the flat outputs and :attr:`output_spec` their structure).
    """

    model: nn.Module
    graph_module: fx.GraphModule
    training: bool
    capture: str = FX
    modules: dict[str, nn.Module] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.modules = dict(self.model.named_modules())

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def name(self) -> str:
        return type(self.model).__name__

    @property
    def output_spec(self):  # noqa: ANN201 (a torch.utils._pytree.TreeSpec, or None)
        """How the flat outputs of an export capture make the model's output structure; None for torch.fx."""
        return exporting.output_spec(self.graph)

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


def is_fx_leaf(module: nn.Module, path: str = "") -> bool:
    """Whether torch.fx, with the default leaf modules, calls ``module`` as one opaque ``call_module`` (torch.nn's
    own modules, timm's no-trace registry): how a torch.export node is given the owner torch.fx would give it."""
    return _default_tracer().is_leaf_module(module, path)


@functools.cache
def _default_tracer() -> _PathTracer:
    return _PathTracer(default_leaf_modules())


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
        self.stowed: list[str] = []  # attributes torch.fx adds to the root to hold constants the graph reads

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

    def get_fresh_qualname(self, prefix: str) -> str:
        name = super().get_fresh_qualname(prefix)
        self.stowed.append(name)  # torch.fx then stores a tensor constant under it on the root
        return name

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:  # noqa: ANN001
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta[MODULE_PATH] = self._current_path
        return node


def trace(
    model: nn.Module,
    *,
    capture: str = AUTO,
    example_inputs: Any = None,
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict[str, Any] | None = None,
    training: bool | None = None,
) -> Traced:
    """Capture ``model`` as a graph, recording the owning module path of every node.

    Args:
        model: any ``nn.Module``; it is not modified.
        capture: ``"auto"`` (torch.fx, and torch.export where torch.fx fails, with an
            :class:`AuxwrapCaptureWarning` saying so), ``"fx"`` or ``"export"`` (non-strict ``torch.export``:
            the batch dimension stays dynamic, every other input dimension is fixed to ``example_inputs``').
        example_inputs: a tensor or tuple of ``forward`` inputs; torch.export runs the model on them (default:
            inferred from timm's ``pretrained_cfg`` or a transformers ``config``). torch.fx does not need them.
        leaf_modules: module classes to keep as one opaque call (added to timm's registry); torch.fx only.
        autowrap_functions: functions to record as one call instead of tracing through them; torch.fx only.
        concrete_args: values for ``forward`` arguments that drive Python control flow; torch.fx only.
        training: capture as in train (True) or eval (False) mode; Python code that reads
            ``self.training`` (timm's DropPath, dropout) is baked into the graph. Default: the current mode.

    The model is left as found (:func:`kept_as_found`): training flags, attributes, buffers. A forward
    that stores attributes (they would hold fx Proxies) or updates buffers in place outside the graph
    (torch.fx runs ``self.calls.add_(1)`` on the buffer itself) gets a warning naming them: the graph
    does not replay either. Only constants the graph reads are added to the model (torch.fx's
    ``_tensor_constant<N>``, torch.export's ``lifted_tensor_<N>``), where its forward creates tensors.

    Raises:
        AuxwrapArgumentError: ``model`` is not a traceable ``nn.Module`` or an option is malformed.
        AuxwrapTraceError: the capture failed; the message names the module and class at fault.
    """
    _check_model(model)
    capture = check_capture(capture)
    fx_options = dict(leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, concrete_args=concrete_args)
    if capture == EXPORT:
        _check_export_options(model, fx_options)
        return _export(model, example_inputs, training)
    try:
        return _fx_trace(model, training=training, **fx_options)
    except AuxwrapTraceError as error:
        if capture == FX:
            raise
        fx_error = error
    traced = _export(model, _inputs_to_fall_back_on(model, example_inputs, fx_error), training, fx_error=fx_error)
    warnings.warn(_fallback_message(model, fx_error, fx_options), AuxwrapCaptureWarning, stacklevel=2)
    return traced


def check_capture(capture: object) -> str:
    """``capture`` where it is one of ``"auto"``, ``"fx"``, ``"export"``."""
    return check_choice("capture", capture, CAPTURES,
                        fix="use 'auto' (torch.fx, else torch.export), 'fx' or 'export' (e.g. for Hugging Face "
                            "transformers models)")


def _fx_trace(model: nn.Module, *, leaf_modules: Iterable[type[nn.Module]], autowrap_functions: Iterable[Callable],
              concrete_args: dict[str, Any] | None, training: bool | None) -> Traced:
    """:func:`trace` with torch.fx."""
    leaves = _check_leaf_modules(leaf_modules) + default_leaf_modules()
    wrapped = _check_functions(autowrap_functions) + default_autowrap_functions()
    tracer = _PathTracer(leaves, wrapped)
    versions = {name: (buffer, buffer._version) for name, buffer in model.named_buffers()}
    with kept_as_found(model):
        if training is not None:
            model.train(training)
        traced_training = model.training
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
            graph_module = fx.GraphModule(model, graph, class_name=f"Traced{type(model).__name__}")
        except Exception as error:  # torch.fx raises TraceError, TypeError, RuntimeError, ...
            path, cls = tracer.failed_at or ("", type(model))
            raise AuxwrapTraceError(_trace_failure_message(model, path, cls, error), path, cls) from error
        stored = _proxies_stored(model)
        # torch.fx does not proxy buffers: ``self.calls.add_(1)`` runs on the buffer itself, outside the graph
        updated = [name for name, (buffer, version) in versions.items() if buffer._version != version]
        for name in tracer.stowed:  # the graph, and a fused network built from it, reads them from the model
            keep_attribute(model, name)
    if stored or updated:
        warnings.warn(_side_effects_message(model, stored, updated), stacklevel=3)
    return Traced(model=model, graph_module=graph_module, training=traced_training)


def _export(model: nn.Module, example_inputs: Any, training: bool | None,
            fx_error: AuxwrapTraceError | None = None) -> Traced:
    """:func:`trace` with non-strict torch.export (:mod:`auxwrap.capture`); ``fx_error``: why torch.fx was not
    used, for the message where torch.export fails too."""
    inputs = _export_inputs(model, example_inputs)
    with kept_as_found(model):
        if training is not None:
            model.train(training)
        traced_training = model.training
        try:
            graph_module, stowed = exporting.exported_graph_module(model, inputs)
        except CaptureFailed as failed:
            message = _export_failure_message(model, failed, fx_error)
            raise AuxwrapTraceError(message, failed.module_path, failed.module_type) from failed.cause
        for node in graph_module.graph.nodes:
            node.meta[MODULE_PATH] = exporting.module_path(node)
        for name in stowed:
            keep_attribute(model, name)
    if not exporting.batch_is_dynamic(graph_module):
        warnings.warn(f"torch.export fixed the batch size of {type(model).__name__} to {_batch_size(inputs)} (its "
                      "forward() uses the batch size as a number): the captured graph, and a network built from it, "
                      "takes batches of that size only.", AuxwrapCaptureWarning, stacklevel=3)
    return Traced(model=model, graph_module=graph_module, training=traced_training, capture=EXPORT)


def _inputs_to_fall_back_on(model: nn.Module, example_inputs: Any, fx_error: AuxwrapTraceError) -> Any:
    """The example inputs torch.export runs the model on after torch.fx failed; where there are none to give or
    infer, torch.fx's error, which says how to get them."""
    if example_inputs is not None:
        return example_inputs
    try:
        return default_example_inputs(model)
    except AuxwrapArgumentError:
        note = ("\ncapture='auto' would capture it with torch.export instead, which runs the model: pass "
                "example_inputs=(torch.randn(2, 3, H, W),) with the shape its forward() takes.")
        raise AuxwrapTraceError(str(fx_error) + note, fx_error.module_path, fx_error.module_type) from fx_error


def _export_inputs(model: nn.Module, example_inputs: Any) -> tuple:
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    return as_input_tuple(example_inputs, type(model).__name__, why="torch.export runs the model on them")


def _batch_size(inputs: tuple) -> int | str:
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    return tensors[0].shape[0] if tensors else "?"


def _check_export_options(model: nn.Module, fx_options: dict[str, Any]) -> None:
    given = [name for name, value in fx_options.items() if value]
    if given:
        raise AuxwrapArgumentError(
            f"{', '.join(given)} apply to torch.fx only, and capture='export' was asked for {type(model).__name__}; "
            "drop them (torch.export runs the real forward, so it needs no leaf modules or concrete values), or "
            "use capture='fx'.")


def _fallback_message(model: nn.Module, fx_error: AuxwrapTraceError, fx_options: dict[str, Any]) -> str:
    where = f"module '{fx_error.module_path}'" if fx_error.module_path else "its forward()"
    reason = str(fx_error.__cause__ or fx_error).splitlines()[0].split(". ")[0]
    ignored = [name for name, value in fx_options.items() if value]
    unused = f" ({', '.join(ignored)} apply to torch.fx only and were not used)" if ignored else ""
    return (f"{type(model).__name__}: torch.fx could not trace {where} ({reason}), so auxwrap captured it with "
            f"torch.export (non-strict){unused}. Pass capture='export' to skip the torch.fx attempt and this "
            "message, or capture='fx' to make a torch.fx failure an error.")


def _export_failure_message(model: nn.Module, failed: CaptureFailed, fx_error: AuxwrapTraceError | None) -> str:
    """torch.export's failure, after torch.fx's where "auto" tried both (its fixes stay the first to try)."""
    where = (f"module '{failed.module_path}' ({failed.module_type.__name__})" if failed.module_path
             else f"{type(model).__name__}.forward itself")
    if fx_error is not None:
        return (f"{fx_error}\ntorch.export (non-strict), tried next, could not capture it either: it failed inside "
                f"{where}: {failed}")
    fixes = "\n".join([
        "  1. where the error names a data-dependent value or guard, forward() branches on the values of a tensor: "
        "rewrite that branch with torch.cond, or move it out of forward()",
        "  2. pass example_inputs that forward() accepts: torch.export runs it on them",
        "  3. capture='fx' (or 'auto'), with leaf_modules=[...] or concrete_args={...} where torch.fx needs them"])
    return (f"torch.export (non-strict) could not capture {type(model).__name__}: it failed inside {where}: "
            f"{failed}\nFixes to try, in order:\n{fixes}")


def _proxies_stored(model: nn.Module) -> list[str]:
    """``self.<name>`` attributes (dotted from the model) that hold an fx Proxy: stored while traced."""
    return [f"{path}.{key}" if path else key for path, module in model.named_modules()
            for key, value in vars(module).items() if any(isinstance(v, fx.Proxy) for v in _members(value))]


def _side_effects_message(model: nn.Module, stored: list[str], updated: list[str]) -> str:
    effects = ([f"stores {', '.join(stored)}"] if stored else []) + (
        [f"updates the buffers {', '.join(updated)} in place with values the graph does not compute"] if updated
        else [])
    return (f"{type(model).__name__}.forward {' and '.join(effects)}; the traced graph (and so a fused network) "
            "does not replay this: these attributes and buffers are left as they were before tracing, and "
            "running the graph will not update them. Return such values from forward() instead.")


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
                f"autowrap_functions must hold module-level functions, got {function!r}; pass the functions "
                "themselves, e.g. autowrap_functions=[my_function].")
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
