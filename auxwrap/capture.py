"""Step 1, second path — capture a model with non-strict ``torch.export`` when torch.fx cannot trace it.

torch.fx traces symbolically: Python control flow on tensors or their shapes stops it (Hugging Face
transformers models, for one). ``torch.export.export(..., strict=False)`` runs the real ``forward`` on
fake tensors instead, and records every ATen operation it dispatches, with the stack of modules that
called it (``nn_module_stack``). :func:`exported_graph_module` turns that program into the graph module
:func:`auxwrap.trace` hands on for fx graphs too:

- it reads the user's own parameters and buffers by their module paths (``get_attr`` nodes), so a fused
  network built from it trains them (nothing is copied);
- its inputs are the model's positional inputs, with a dynamic batch dimension; every other dimension is
  fixed to the example inputs' size;
- it returns the model's own output structure (``ImageClassifierOutput``, a dict, a tuple), through the
  pytree code generation ``torch.export`` uses (its graph's ``output`` node holds the flat list of tensors).

One capture is one training mode: dropout's ``train`` flag and batch-norm's ``training`` flag are
constants of the graph, so a model is captured once per mode.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import TreeSpec

from .graphstate import graph_from_state, graph_state

FX, EXPORT, AUTO = "fx", "export", "auto"
CAPTURES = (AUTO, FX, EXPORT)

#: what ``torch.export`` puts in ``nn_module_stack`` for nodes made outside any module (shape reads)
_NO_MODULE = "_empty_nn_module_stack_from_metadata_hook"


class CaptureFailed(Exception):
    """``torch.export`` failed: the innermost module of the model that was running, and the cause."""

    def __init__(self, module_path: str, module_type: type, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {_first_lines(cause)}")
        self.module_path = module_path
        self.module_type = module_type
        self.cause = cause


def exported_graph_module(model: nn.Module, example_inputs: tuple) -> tuple[fx.GraphModule, list[str]]:
    """``model`` in its current training mode, captured by non-strict ``torch.export`` as a graph module that
    shares the model's parameters and buffers (each node's owning module path in :func:`module_path`), and the
    names of the tensor constants stored on the model root for it (see :func:`_store_lifted_constants`).

    Raises :class:`CaptureFailed` naming the module that was running where ``torch.export`` failed.
    """
    try:
        program = torch.export.export(model, example_inputs, strict=False,
                                      dynamic_shapes=_dynamic_batch(example_inputs))
    except Exception as error:  # torch.export raises UserError, GuardOnDataDependentSymNode, TypeError...
        path, cls = _innermost_module(model, error)
        raise CaptureFailed(path, cls, error) from error
    unlifted = _unlift(program)
    graph = unlifted.graph
    _drop_guard_calls(graph)
    stowed = _store_lifted_constants(model, unlifted, graph)
    graph_module = ExportedGraphModule(model, graph, class_name=f"Exported{type(model).__name__}")
    graph_module._in_spec, graph_module._out_spec = unlifted._in_spec, unlifted._out_spec
    return graph_module, stowed


class ExportedGraphModule(fx.GraphModule):
    """The graph module of a torch.export capture. It pickles its graph as a node list (:mod:`auxwrap.graphstate`):
    torch.fx's own pickling re-traces the generated code, which would turn the model's output structure
    (``ImageClassifierOutput``) into a plain dict, and cannot pickle ATen operators."""

    def __reduce__(self) -> tuple:
        body = self.__dict__.copy()
        body["_graph"] = graph_state(self.graph)
        return (_unpickle_exported, (body, type(self).__name__))


def _unpickle_exported(body: dict, class_name: str) -> ExportedGraphModule:
    graph = graph_from_state(body.pop("_graph"))
    module = ExportedGraphModule(_AttributeHolder(body), graph, class_name=class_name)
    for key, value in body.items():  # what the constructor did not take from the holder: the specs, the reports
        if not hasattr(module, key):
            setattr(module, key, value)
    return module


class _AttributeHolder(nn.Module):
    """A module with a given ``__dict__``, which the graph module's constructor copies the graph's attributes from."""

    def __init__(self, state: dict):
        super().__init__()
        self.__dict__ = state


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module that ran when ``torch.export`` recorded ``node`` ("" for the
    model's own ``forward``), from the node's ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return "" if path == _NO_MODULE else path


def output_spec(graph: fx.Graph) -> TreeSpec | None:
    """How a captured graph's flat outputs are put back into the model's output structure; None for a graph
    that returns its structure itself (torch.fx's)."""
    info = getattr(graph._codegen, "pytree_info", None)
    return None if info is None else info.out_spec


def batch_is_dynamic(graph_module: fx.GraphModule) -> bool:
    """Whether the captured graph takes any batch size (its first input's dimension 0 is symbolic)."""
    for node in graph_module.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return isinstance(value.shape[0], torch.SymInt)
    return True


def _dynamic_batch(example_inputs: tuple) -> tuple:
    """Dimension 0 of every tensor input left for torch.export to make dynamic where the model allows it."""
    return tuple({0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
                 for x in example_inputs)


def _unlift(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program as a graph module reading parameters and buffers as attributes (``get_attr``), without the
    input guards torch.export may add (the fused network checks its inputs itself)."""
    if "check_guards" in inspect.signature(program.module).parameters:
        return program.module(check_guards=False)
    return program.module()


def _drop_guard_calls(graph: fx.Graph) -> None:
    """Remove calls of the ``_guards_fn`` submodule some torch versions add after the inputs."""
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(node)


def _store_lifted_constants(model: nn.Module, unlifted: fx.GraphModule, graph: fx.Graph) -> list[str]:
    """The graph reads its attributes from the user's model: each ``get_attr`` target is one of its parameters or
    buffers, by module path. Tensors ``torch.export`` lifted out of ``forward`` (a ``torch.tensor(...)`` made
    there) are no attribute of the model: they are stored on its root, as torch.fx stores its constants, and
    their names returned."""
    stowed = []
    for node in graph.nodes:
        if node.op == "get_attr" and not _has_attribute(model, node.target):
            setattr(model, node.target, attribute(unlifted, node.target))
            stowed.append(node.target)
    return stowed


def _has_attribute(module: nn.Module, target: str) -> bool:
    try:
        attribute(module, target)
    except AttributeError:
        return False
    return True


def attribute(module: nn.Module, target: str) -> object:
    """What a ``get_attr`` target (``layer1.0.conv1.weight``) names in ``module``: a dotted path of submodules,
    then an attribute. Raises AttributeError where there is none."""
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _innermost_module(model: nn.Module, error: BaseException) -> tuple[str, type]:
    """The module of ``model`` whose ``forward`` is the deepest frame of ``error``'s traceback ("" and the
    model's class where none is)."""
    paths = {id(m): path for path, m in model.named_modules()}
    found = ("", type(model))
    for frame in _frames(error):
        module = frame.f_locals.get("self")
        if id(module) in paths:
            found = (paths[id(module)], type(module))
    return found


def _frames(error: BaseException) -> Iterator:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for frame, _ in traceback.walk_tb(error.__traceback__):
            yield frame
        error = error.__cause__ or error.__context__


def _first_lines(error: BaseException, count: int = 3) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return "\n".join(lines[:count]) + (" [...]" if len(lines) > count else "")
