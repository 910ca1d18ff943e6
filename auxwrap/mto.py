"""Optimisation-based multi-task / auxiliary-learning methods: one call replaces ``loss.backward()``.

```python
loss = auxwrap.mto.backward([primary_loss, aux_loss], net, method="gcs")   # instead of loss.backward()
optimizer.step()
```

``losses`` are scalars, the primary loss first, then one per auxiliary task. Two families:

- **loss weighting** (``"equal"``, ``"uncertainty"``, ``"dwa"``): one backward of ``sum_i w_i L_i``;
  every parameter gets the weighted sum of the task gradients.
- **gradient methods** (``"pcgrad"``, ``"pcgrad-aux"``, ``"gcs"``, ``"gcs-weighted"``, ``"cagrad"``):
  on the *shared* parameters (by default the primary branch of a :class:`~auxwrap.FusedNet`, the
  parameters that the auxiliary losses reach), each task's gradient is computed on its own, the
  gradients are combined by the method and the result is *added* to ``.grad``; every other parameter
  (auxiliary branches, fusion weights, gates, heads) gets the plain sum of the task gradients.

Each method is also a pure function on a ``[K, P]`` matrix of flattened task gradients (row 0 the
primary), so that it can be checked on hand-made vectors: :func:`pcgrad`, :func:`pcgrad_aux`,
:func:`gcs`, :func:`cagrad`. Stateful methods (learnable log-variances, loss history) live in a
:class:`Balancer`; the module-level :func:`backward` keeps one per (network, method).

Under ``DistributedDataParallel`` pass the wrapper as ``net``: every rank then makes the same update,
the one a single process makes on the whole batch (for mean losses over equal shards): the gradient
methods combine the task gradients averaged over the ranks, DWA weighs the losses averaged over the
ranks, the log-variances' gradients are averaged, and DDP averages the network's in its usual backward.
In ``no_sync()`` (gradient accumulation) the gradient methods combine each rank's own task gradients;
the synchronised call then averages everything accumulated.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .errors import AuxwrapArgumentError, check_choice, check_int, check_real, is_integer
from .fused import FusedNet
from .search import mean_over_ranks

WEIGHTING_METHODS = ("equal", "uncertainty", "dwa")
GRADIENT_METHODS = ("pcgrad", "pcgrad-aux", "gcs", "gcs-weighted", "cagrad")
METHODS = WEIGHTING_METHODS + GRADIENT_METHODS

# every option of every method with its default
DEFAULTS: dict[str, dict[str, Any]] = {
    "equal": {},
    "uncertainty": {"init": 0.0},
    "dwa": {"window": 20, "temperature": 2.0},
    "pcgrad": {"seed": None, "generator": None},
    "pcgrad-aux": {},
    "gcs": {},
    "gcs-weighted": {},
    "cagrad": {"c": 0.4, "rescale": 1},
}

# CAGrad's final division, as in the official code (Cranial-XIX/CAGrad, nyuv2/utils.py ``cagrad``:
# rescale 0 -> g, 1 -> g / (1 + alpha**2) (its default), 2 -> g / (1 + alpha))
_CAGRAD_RESCALE = {0: lambda c: 1.0, 1: lambda c: 1.0 + c * c, 2: lambda c: 1.0 + c}


# ---------------------------------------------------------------------------------------------- pure functions


def pcgrad(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"): the sum of the projected gradients.

    For each task gradient ``g_i`` (a row of ``grads``), in a random order over the other tasks ``j``:
    if ``g_i . g_j < 0``, ``g_i -= (g_i . g_j) / |g_j|^2 g_j``, always against the *original* ``g_j``
    (Algorithm 1 of the paper). ``generator`` (a CPU generator) makes the order reproducible.
    """
    _check_matrix(grads)
    k = grads.shape[0]
    norms_sq = (grads * grads).sum(1).clamp_min(torch.finfo(grads.dtype).tiny)
    projected = grads.clone()
    for i in range(k):
        for j in torch.randperm(k, generator=generator).tolist():
            if j != i:  # branch-free on the values: no device sync per pair
                dot = (projected[i] * grads[j]).sum()
                projected[i] -= dot.clamp(max=0) / norms_sq[j] * grads[j]
    return projected.sum(0)


def pcgrad_aux(grads: Tensor) -> Tensor:
    """PCGrad for auxiliary learning: the primary gradient (row 0) is never changed; each auxiliary
    gradient that conflicts with it (negative inner product) is projected onto the normal plane of the
    primary gradient. Returns their sum."""
    _check_matrix(grads)
    primary, aux = grads[0], grads[1:]
    coef = (aux @ primary).clamp(max=0) / (primary @ primary).clamp_min(torch.finfo(grads.dtype).tiny)
    return primary + (aux - coef[:, None] * primary).sum(0)


def gcs(grads: Tensor, weighted: bool = False) -> Tensor:
    """Gradient cosine similarity (Du et al. 2018, "Adapting Auxiliary Losses Using Gradient Similarity").

    Gated (default): ``g_p + sum_k [cos(g_p, g_k) > 0] g_k``, an auxiliary gradient is used only when it
    points the primary's way. Weighted: ``g_p + sum_k max(cos(g_p, g_k), 0) g_k``. Row 0 is the primary.
    """
    _check_matrix(grads)
    primary, aux = grads[0], grads[1:]
    cos = F.cosine_similarity(aux, primary[None], dim=1)  # 0 where either gradient is zero
    scale = cos.clamp(min=0) if weighted else (cos > 0).to(grads.dtype)
    return primary + scale @ aux


def cagrad(grads: Tensor, c: float = 0.4, *, rescale: int = 1) -> Tensor:
    """CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning").

    With ``g0`` the mean task gradient, CAGrad takes the direction ``d`` in the ball
    ``|d - g0| <= c |g0|`` that maximises the worst task's improvement ``min_i g_i . d``. By duality
    ``d = g0 + c |g0| / |g_w| g_w`` with ``g_w = sum_i w_i g_i`` and ``w`` the simplex point of
    :func:`cagrad_weights`. Since ``g0`` lies in the ball, ``min_i g_i . d >= min_i g_i . g0``; with
    ``c = 0`` it is plain gradient descent on the mean loss.

    Returns ``d`` divided by 1 (``rescale=0``), ``1 + c^2`` (``rescale=1``, the default of the official
    code, Cranial-XIX/CAGrad ``nyuv2/utils.py``, also LibMTL's) or ``1 + c`` (``rescale=2``), on the
    scale of the *mean* gradient: :func:`backward` multiplies it by K, as the official code does "to
    match the sum loss".
    """
    _check_matrix(grads)
    c = _check_c(c)
    rescale = _check_rescale(rescale)
    mean = grads.mean(0)
    if c == 0:
        return mean
    w = cagrad_weights(grads @ grads.T, c).to(grads)
    gw = w @ grads
    d = mean + c * mean.norm() / gw.norm().clamp_min(torch.finfo(grads.dtype).tiny) * gw
    return d / _CAGRAD_RESCALE[rescale](c)


def cagrad_weights(gram: Tensor, c: float, *, max_iter: int = 500, tol: float = 1e-9) -> Tensor:
    """The task weights ``w`` of CAGrad: on the simplex, minimise ``w^T G g0 + c |g0| |G^T w|``.

    Solved from the K x K Gram matrix ``G G^T`` alone (no scipy, where the official code uses
    ``scipy.optimize.minimize``): projected gradient descent with backtracking, in float64 on the CPU.
    The problem is convex; its minimiser does not change when ``G`` is scaled, so the Gram matrix is
    normalised first. ``|g0|^2`` is the mean of the Gram matrix.
    """
    a = gram.detach().to("cpu", torch.float64)
    k = a.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    scale = a.diagonal().mean()
    if not scale > 0:
        return w
    a = a / scale
    b = a.mean(1)  # G g0
    c0 = c * a.mean().clamp_min(0).sqrt()
    eps = 1e-12

    def objective(v: Tensor) -> Tensor:
        return v @ b + c0 * ((v @ a @ v).clamp_min(0) + eps).sqrt()

    def gradient(v: Tensor) -> Tensor:
        return b + c0 * (a @ v) / ((v @ a @ v).clamp_min(0) + eps).sqrt()

    value, step = objective(w), 1.0
    for _ in range(max_iter):
        grad = gradient(w)
        while True:  # backtracking: sufficient decrease of projected gradient descent
            candidate = _project_simplex(w - step * grad)
            delta = candidate - w
            new_value = objective(candidate)
            if new_value <= value + grad @ delta + (delta @ delta) / (2 * step) + 1e-15 or step < 1e-12:
                break
            step /= 2
        decrease = value - new_value
        w, value, step = candidate, new_value, step * 2
        if delta.abs().max() < tol or decrease <= 1e-13 * max(1.0, abs(float(value))):
            break
    return w


def _project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection onto the probability simplex (Duchi et al. 2008)."""
    u = torch.sort(v, descending=True).values
    cumulative = u.cumsum(0) - 1
    index = torch.arange(1, len(v) + 1, dtype=v.dtype)
    rho = int((u - cumulative / index > 0).nonzero().max())
    return (v - cumulative[rho] / (rho + 1)).clamp_min(0)


def dwa_weights(ratios: Tensor, temperature: float = 2.0) -> Tensor:
    """Dynamic Weight Average (Liu et al. 2019, MTAN): ``K * softmax(r / T)``, with ``r_i`` the ratio of
    task i's loss over the last period to the period before; the slower a loss falls, the larger its weight."""
    return len(ratios) * torch.softmax(ratios / temperature, dim=0)


def _check_matrix(grads: Tensor) -> None:
    if not isinstance(grads, Tensor) or grads.dim() != 2 or grads.shape[0] < 1:
        got = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
        raise AuxwrapArgumentError(f"grads must be a [K, P] tensor of flattened task gradients, got {got}")


# ---------------------------------------------------------------------------------------------- the balancer


class Balancer(nn.Module):
    """One method with its state, for ``num_tasks`` losses (primary first).

    ``Balancer("uncertainty", 2)`` has learnable log-variances: add ``balancer.parameters()`` to your
    optimizer (for the module-level :func:`backward`, ``balancer_for(net, "uncertainty", 2).parameters()``).
    It is an ``nn.Module``: ``.to(device)`` moves the log-variances, and ``state_dict()`` carries all of its
    state (log-variances, DWA loss history, PCGrad's generator state), so that a run resumes exactly; it
    loads with ``torch.load(weights_only=True)``.

    Options (defaults in :data:`DEFAULTS`):

    - ``"uncertainty"`` (Kendall et al. 2018): ``init`` (0.0). Combined loss ``sum_i exp(-s_i) L_i + s_i``
      with ``s_i = log sigma_i^2`` learnable; the paper's ``L / (2 sigma^2) + log sigma`` is half of it.
    - ``"dwa"`` (Liu et al. 2019): ``window`` (20 iterations, a library has no epochs), ``temperature``
      (2.0, the paper's). Each task's loss is averaged over consecutive windows of ``window`` calls;
      weights are :func:`dwa_weights` of the ratio of the last two full windows, equal before that.
    - ``"pcgrad"``: ``seed`` or ``generator`` (a CPU ``torch.Generator``) for a reproducible order.
    - ``"cagrad"``: ``c`` (0.4), ``rescale`` (1): see :func:`cagrad`.
    """

    def __init__(self, method: str = "equal", num_tasks: int = 2, **options: Any):
        super().__init__()
        self.method = _check_method(method)
        self.num_tasks = _check_num_tasks(num_tasks)
        self.options = _check_options(self.method, options)
        self.register_parameter("log_vars", None)
        if self.method == "uncertainty":
            self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(self.options["init"])))
        self._generator = self.options.get("generator")
        if self.method == "pcgrad" and self._generator is None and self.options["seed"] is not None:
            self._generator = torch.Generator().manual_seed(self.options["seed"])
        self._window_sum: Tensor | None = None
        self._window_count = 0
        self._window_means: list[Tensor] = []  # the last two full windows, oldest first

    @property
    def weights(self) -> Tensor:
        """The task weights the next :meth:`backward` applies (detached; ones for the gradient methods)."""
        if self.method == "uncertainty":
            return torch.exp(-self.log_vars.detach())
        if self.method == "dwa" and len(self._window_means) == 2:
            before, previous = self._window_means
            ratios = previous / before.clamp_min(torch.finfo(before.dtype).tiny)
            return dwa_weights(ratios, self.options["temperature"]).to(torch.get_default_dtype())
        return torch.ones(self.num_tasks)

    def backward(self, losses: Sequence[Tensor], net: nn.Module, shared: Iterable[Tensor] | None = None) -> Tensor:
        """Accumulate the method's gradients into ``.grad``, as ``loss.backward()`` would.

        ``shared``: the parameters whose per-task gradients a gradient method combines (ignored by the
        weighting methods); default :func:`shared_parameters`. Returns the combined loss, detached:
        ``sum_i w_i L_i`` (plus ``sum_i s_i`` for "uncertainty"), the plain sum for the gradient methods.
        """
        losses = _check_losses(losses, self.num_tasks)
        if not isinstance(net, nn.Module):
            raise AuxwrapArgumentError(f"net must be an nn.Module, got {type(net).__name__}")
        shared = None if shared is None else _check_shared(shared)
        with _no_autocast(losses[0].device):  # called inside torch.autocast: combine in the gradients' dtype
            if self.method in WEIGHTING_METHODS:
                return self._backward_weighted(losses, _ddp(net))
            return self._backward_gradients(losses, net, shared)

    def _backward_weighted(self, losses: list[Tensor], ddp: DistributedDataParallel | None) -> Tensor:
        """One backward of the weighted sum; DWA then records this call's losses. Under DDP the
        log-variances' gradients are averaged over the ranks, as DDP averages the network's."""
        device = losses[0].device
        if self.method == "uncertainty":
            s = self.log_vars.to(device)
            combined = sum(torch.exp(-s[i]) * loss + s[i] for i, loss in enumerate(losses))
        else:
            weights = self.weights.to(device=device, dtype=losses[0].dtype)
            combined = sum(w * loss for w, loss in zip(weights, losses, strict=True))
        if combined.requires_grad:
            combined.backward()
        if ddp is not None and ddp.require_backward_grad_sync:
            mean_over_ranks([p.grad for p in self.parameters() if p.grad is not None], ddp.process_group)
        if self.method == "dwa":
            self._record(losses, ddp)
        return combined.detach()

    def _record(self, losses: list[Tensor], ddp: DistributedDataParallel | None) -> None:
        """Add this call's losses to the window; a full window's mean is the mean over the ranks under DDP
        (one all-reduce per window, also in ``no_sync``), so that every rank weighs the tasks alike."""
        values = torch.stack([loss.detach().to(torch.float64) for loss in losses])
        self._window_sum = values if self._window_sum is None else self._window_sum.to(values.device) + values
        self._window_count += 1
        if self._window_count == self.options["window"]:
            if ddp is not None:
                mean_over_ranks([self._window_sum], ddp.process_group)
            means = [*self._window_means, self._window_sum / self._window_count][-2:]
            self._window_means = [m.to(values.device) for m in means]
            self._window_sum, self._window_count = None, 0

    def _backward_gradients(self, losses: list[Tensor], net: nn.Module, shared: list[Tensor] | None) -> Tensor:
        """Per-task gradients on the shared parameters, combined; one plain backward for the rest.

        Under DDP the task gradients are first averaged over the ranks (the whole batch's, as one process
        would combine them), and one ordinary backward of the sum, with the shared parameters' gradients
        replaced by the combined ones, lets DDP average every gradient as usual (``no_sync`` included).
        """
        ddp = _ddp(net)
        reached = [_reachable_leaves(loss) for loss in losses]
        if shared is None:
            shared = _default_shared(net, reached)
        shared_ids = {id(p) for p in shared}
        rest = list({id(t): t for leaves in reached for t in leaves.values() if id(t) not in shared_ids}.values())
        live = [loss for loss in losses if loss.requires_grad]
        combined: list[Tensor | None] = []
        if shared:
            grads, used = _task_gradients(losses, shared, free_graph=not rest and ddp is None)
            if ddp is not None and ddp.require_backward_grad_sync:
                mean_over_ranks([grads], ddp.process_group)
            combined = [g if u else None for g, u in zip(self._combine(grads).split([p.numel() for p in shared]),
                                                         used, strict=True)]
        if ddp is None:
            with torch.no_grad():
                _accumulate(shared, combined)
            if rest:
                torch.autograd.backward(sum(live), inputs=rest)
        elif live:
            handles = [p.register_hook(functools.partial(_replaced, g.view(p.shape).to(p.dtype)))
                       for p, g in zip(shared, combined, strict=True) if g is not None]
            try:
                torch.autograd.backward(sum(live))
            finally:
                for handle in handles:
                    handle.remove()
        return sum(loss.detach() for loss in losses)

    def _combine(self, grads: Tensor) -> Tensor:
        """The method on the [K, P] task gradients, on the scale of a sum over tasks."""
        if self.method == "pcgrad":
            return pcgrad(grads, self._generator)
        if self.method == "pcgrad-aux":
            return pcgrad_aux(grads)
        if self.method in ("gcs", "gcs-weighted"):
            return gcs(grads, weighted=self.method == "gcs-weighted")
        return grads.shape[0] * cagrad(grads, **self.options)

    def get_extra_state(self) -> dict[str, Any]:
        """The state besides the log-variances (``state_dict()``'s ``_extra_state``): the DWA loss history
        and the state of PCGrad's generator, with the method and number of tasks they belong to."""
        return {"method": self.method, "num_tasks": self.num_tasks, "window_sum": self._window_sum,
                "window_count": self._window_count, "window_means": list(self._window_means),
                "generator": None if self._generator is None else self._generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`get_extra_state`; a state of another method or number of tasks raises."""
        saved = (state.get("method"), state.get("num_tasks")) if isinstance(state, dict) else (None, None)
        if saved != (self.method, self.num_tasks):
            raise AuxwrapArgumentError(
                f"this state is of a {saved[0]!r} balancer for {saved[1]} losses; load it into "
                f"auxwrap.mto.Balancer({saved[0]!r}, {saved[1]}) (this one: {self.method!r} for {self.num_tasks})")
        self._window_sum, self._window_count = state["window_sum"], int(state["window_count"])
        self._window_means = list(state["window_means"])
        if state["generator"] is not None:
            if self._generator is None:
                self._generator = torch.Generator()
            self._generator.set_state(state["generator"])

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"method={self.method!r}, num_tasks={self.num_tasks}{options}"


# ---------------------------------------------------------------------------------------------- module level

_BALANCERS: weakref.WeakKeyDictionary[nn.Module, dict[str, Balancer]] = weakref.WeakKeyDictionary()


def balancer_for(net: nn.Module, method: str, num_tasks: int, **options: Any) -> Balancer:
    """The :class:`Balancer` that :func:`backward` uses for ``net`` and ``method``, created on first use
    (on the device of ``net``'s parameters) and kept as long as ``net`` lives.

    Call it before training to add the learnable log-variances of "uncertainty" to the optimizer:
    ``balancer_for(net, "uncertainty", 2).parameters()``. Options apply when it is created; options
    given later must match.
    """
    if not isinstance(net, nn.Module):
        raise AuxwrapArgumentError(f"net must be an nn.Module, got {type(net).__name__}")
    method = _check_method(method)
    per_net = _BALANCERS.setdefault(net, {})
    balancer = per_net.get(method)
    if balancer is None:
        balancer = Balancer(method, num_tasks, **options)
        first = next(net.parameters(), None)
        per_net[method] = balancer.to(first.device) if first is not None else balancer
        return per_net[method]
    if num_tasks != balancer.num_tasks:
        raise AuxwrapArgumentError(
            f"this network's {method!r} balancer is for {balancer.num_tasks} losses, got {num_tasks}; "
            f"create a separate auxwrap.mto.Balancer({method!r}, {num_tasks}) for a different task set")
    requested = _check_options(method, options)
    changed = sorted(k for k in options if requested[k] != balancer.options[k])
    if changed:
        raise AuxwrapArgumentError(
            f"this network's {method!r} balancer was created with "
            + ", ".join(f"{k}={balancer.options[k]!r}" for k in changed)
            + ", got " + ", ".join(f"{k}={requested[k]!r}" for k in changed)
            + f"; pass the same options every call, or use your own auxwrap.mto.Balancer({method!r}, ...)")
    return balancer


def backward(losses: Sequence[Tensor], net: nn.Module, method: str = "equal", *,
             shared: Iterable[Tensor] | None = None, **options: Any) -> Tensor:
    """Replace ``loss.backward()``: accumulate ``method``'s gradients of ``losses`` (primary first) into
    ``.grad`` and return the combined loss, detached, for logging.

    methods: "equal", "uncertainty", "dwa", "pcgrad", "pcgrad-aux", "gcs", "gcs-weighted", "cagrad";
    options: see :class:`Balancer`. State (log-variances, loss history, random generator) is kept per
    (``net``, ``method``) across calls: see :func:`balancer_for`.
    """
    losses = _check_losses(losses)
    return balancer_for(net, method, len(losses), **options).backward(losses, net, shared)


def shared_parameters(losses: Sequence[Tensor], net: nn.Module) -> list[Tensor]:
    """The parameters a gradient method manipulates by default: the primary branch of a
    :class:`~auxwrap.FusedNet` (``net.primary``, those with ``requires_grad``); for any other module,
    its parameters that receive gradients from at least two of ``losses``."""
    losses = _check_losses(losses)
    return _default_shared(net, [_reachable_leaves(loss) for loss in losses])


# ---------------------------------------------------------------------------------------------- machinery


def _reachable_leaves(loss: Tensor) -> dict[int, Tensor]:
    """The leaf tensors ``loss.backward()`` would write ``.grad`` to, by id: a walk of its autograd
    graph (no gradient is computed)."""
    if loss.grad_fn is None:
        return {id(loss): loss} if loss.requires_grad else {}
    leaves: dict[int, Tensor] = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf itself
        if variable is not None:
            leaves[id(variable)] = variable
        stack.extend(child for child, _ in node.next_functions)
    return leaves


def _ddp(net: nn.Module) -> DistributedDataParallel | None:
    """``net`` if it is a DistributedDataParallel wrapper (whose ranks must agree), else None."""
    return net if isinstance(net, DistributedDataParallel) else None


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    """Autocast off on ``device`` and the CPU, as ``loss.backward()`` outside the autocast block would run:
    inside it, the matrix products that combine the task gradients (CAGrad's Gram matrix, PCGrad-aux's and
    GCS's products) would drop to bfloat16 / float16."""
    with contextlib.ExitStack() as stack:
        for kind in dict.fromkeys((device.type, "cpu")):
            if torch.amp.is_autocast_available(kind):
                stack.enter_context(torch.autocast(kind, enabled=False))
        yield


def _replaced(gradient: Tensor, _: Tensor) -> Tensor:
    """A tensor hook that puts ``gradient`` in place of the one autograd computed."""
    return gradient


def _default_shared(net: nn.Module, reached: list[dict[int, Tensor]]) -> list[Tensor]:
    net = net.module if isinstance(net, DistributedDataParallel) else net
    if isinstance(net, FusedNet):
        return [p for p in net.primary.parameters() if p.requires_grad]
    return [p for p in net.parameters() if p.requires_grad and sum(id(p) in leaves for leaves in reached) >= 2]


def _task_gradients(losses: list[Tensor], params: list[Tensor], free_graph: bool) -> tuple[Tensor, list[bool]]:
    """``[K, P]``: row i the flattened gradient of ``losses[i]`` on ``params`` (zeros where a loss does not
    reach a parameter), and for each parameter whether any loss reaches it. One ``autograd.grad`` per
    task; the last one frees the graph when ``free_graph``."""
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
    sizes = [p.numel() for p in params]
    grads = torch.zeros(len(losses), sum(sizes), dtype=dtype, device=params[0].device)
    used = [False] * len(params)
    live = [i for i, loss in enumerate(losses) if loss.requires_grad]
    for i in live:
        retain = not (free_graph and i == live[-1])
        task = torch.autograd.grad(losses[i], params, retain_graph=retain, allow_unused=True)
        for j, (g, chunk) in enumerate(zip(task, grads[i].split(sizes), strict=True)):
            if g is not None:
                chunk.copy_(g.reshape(-1))
                used[j] = True
    return grads, used


def _accumulate(params: list[Tensor], grads: list[Tensor | None]) -> None:
    """Add each parameter's (flattened) gradient into ``.grad``, like autograd does: parameters no loss
    reaches (gradient None) are left alone."""
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        g = g.view(p.shape).to(p.dtype)
        if p.grad is None:
            p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
        else:
            p.grad.add_(g)


# ---------------------------------------------------------------------------------------------- argument checks


def _check_method(method: Any) -> str:
    name = method.lower().replace("_", "-") if isinstance(method, str) else method
    if name not in METHODS:  # spelt any way ("PCGrad_Aux") and still none of them: refuse what was given
        check_choice("method", method, METHODS)
    return name


def _check_num_tasks(num_tasks: Any) -> int:
    return check_int("num_tasks", num_tasks, 2, why="the primary and at least one auxiliary")


def _check_losses(losses: Any, num_tasks: int | None = None) -> list[Tensor]:
    if isinstance(losses, Tensor) or not isinstance(losses, Sequence):
        raise AuxwrapArgumentError(
            f"losses must be a list of scalar tensors (primary loss first, then one per auxiliary), "
            f"got {type(losses).__name__}")
    if len(losses) < 2:
        raise AuxwrapArgumentError(
            f"got {len(losses)} loss(es); pass the primary loss first, then at least one auxiliary loss")
    if num_tasks is not None and len(losses) != num_tasks:
        raise AuxwrapArgumentError(f"got {len(losses)} losses, this balancer is for {num_tasks}")
    for i, loss in enumerate(losses):
        if not isinstance(loss, Tensor):
            raise AuxwrapArgumentError(f"losses[{i}] must be a scalar tensor, got {type(loss).__name__}")
        if loss.numel() != 1 or not loss.is_floating_point():
            raise AuxwrapArgumentError(
                f"losses[{i}] must be a floating-point scalar, got shape {tuple(loss.shape)} and dtype {loss.dtype}; "
                f"reduce it first (e.g. .mean())")
    return [loss.reshape(()) for loss in losses]


def _check_shared(shared: Any) -> list[Tensor]:
    params = [shared] if isinstance(shared, Tensor) else list(shared)
    for p in params:
        if not isinstance(p, Tensor):
            raise AuxwrapArgumentError(f"shared must hold parameters (tensors), got a {type(p).__name__}")
    return list({id(p): p for p in params if p.requires_grad}.values())


def _check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    defaults = DEFAULTS[method]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) or "none"
        raise AuxwrapArgumentError(f"unknown option(s) {', '.join(unknown)} for method {method!r}; valid: {valid}")
    merged = {**defaults, **options}
    checks = {"init": _check_init, "window": _check_window, "temperature": _check_temperature,
              "seed": _check_seed, "generator": _check_generator, "c": _check_c, "rescale": _check_rescale}
    merged = {k: checks[k](v) for k, v in merged.items()}
    if merged.get("seed") is not None and merged.get("generator") is not None:
        raise AuxwrapArgumentError("pass seed or generator, not both")
    return merged


def _check_init(value: Any) -> float:
    return check_real("init", value, why="the initial log-variance of every task")


def _check_window(value: Any) -> int:
    return check_int("window", value, 1, why="iterations per DWA window")


def _check_temperature(value: Any) -> float:
    return check_real("temperature", value, 0.0, low_open=True, why="DWA's softmax temperature; the paper's is 2")


def _check_seed(value: Any) -> int | None:
    if value is not None and not is_integer(value):
        raise AuxwrapArgumentError(f"seed must be an int or None, got {value!r}")
    return value


def _check_generator(value: Any) -> torch.Generator | None:
    if value is not None and not isinstance(value, torch.Generator):
        raise AuxwrapArgumentError(f"generator must be a torch.Generator or None, got {type(value).__name__}")
    return value


def _check_c(value: Any) -> float:
    return check_real("c", value, 0.0, allowed=">= 0 and finite", why="CAGrad's ball radius, relative to |g0|")


def _check_rescale(value: Any) -> int:
    return check_int("rescale", value, min(_CAGRAD_RESCALE), max(_CAGRAD_RESCALE),
                     why="CAGrad's final division: by 1, 1 + c^2 or 1 + c")
