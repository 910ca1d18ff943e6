"""Step "train" of Aux-NAS: the gate search (paper Sect. 3.3, Eq. 10; Appendix C and F).

The architecture weights alpha (the gates of :class:`auxwrap.fusion.Fusion`) are learnt with their
own Adam optimiser, alternating with the user's weight steps on two disjoint halves of the data
(first-order, as in the paper and the authors' code). An L1 penalty on the auxiliary -> primary gates
alpha^P, ramped over training, weans the primary off the auxiliary features; the primary -> auxiliary
gates are not penalised. At the end of the ramp alpha^P are cut (exactly 0, and held there), so that
removing those links (and then the auxiliary branch) is lossless, and the remaining steps train the
weights of the network that will be shipped.

The L1 term, its schedule and why (DESIGN.md §2, requirements (1)-(3))::

    R_t(alpha^P) = lambda_t * sum(alpha^P)
    lambda_t     = 0 before ramp[0] of training, l1 after ramp[1], linear in between

- The term is part of the gate loss and goes through the gates' Adam with the task loss (the
  authors' form). Adam normalises each gate's step, so what matters is the L1 gradient of *one* gate,
  ``lambda_t`` times the gate's slope, against the task's pull on that gate. On the sum, that does not
  depend on the number of gates n (on a mean it would shrink as 1/n); and no gate moves by more than
  about ``lr`` per step, so the decline is gradual: a step-like collapse as with a proximal shrink
  ``lr * lambda_t / n`` cannot happen.
- ``decay="linear"`` also bounds alpha^P by ``1 - progress`` along the ramp (the fusions' ``ceiling``),
  so that they reach exactly 0 at the ramp's end for any number of steps, however hard the task pulls.
  With ``decay="l1"`` alone they reach ~0 only if the ramp is long enough for Adam to get there
  (~460 steps at lr 1e-2 for a sigmoid gate from 0.5 to 0.01); :attr:`Search.max_gate_at_cut` and a
  warning say how large they were at the cut.
- The cut (after ``cut``, by default the ramp's end) sets alpha^P to exactly 0 through the fusions'
  ``live`` masks, whatever their parameters: the paper sets them to 0 by hand before evaluation
  (Appendix F); here it happens while the weights can still adapt.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .deploy import cut_links, measure_cut
from .errors import AuxwrapArgumentError, check_choice, check_int, check_real
from .examples import as_input_tuple
from .fused import unwrap
from .plan import PRIMARY, TO_AUX, TO_PRIMARY, Connection

__all__ = [
    "GateHistory",
    "HalfSampler",
    "Search",
    "SearchSummary",
    "cut_error",
    "search_loaders",
]

#: a cut that removes gates larger than this is reported with a warning (the paper's are ~0.01 at most)
CUT_WARN = 0.01
#: how alpha^P are brought to 0: "l1" (the L1 ramp alone) or "linear" (also bounded by 1 - ramp progress)
DECAYS = ("l1", "linear")
DEFAULT_DECAY = "linear"


# ---------------------------------------------------------------------- measuring a cut

def cut_error(net: nn.Module, probe_inputs: Any) -> float:
    """How much zeroing every auxiliary -> primary gate changes the primary's output on a probe batch:
    ``||y_cut - y|| / ||y||`` in eval mode (0.0: the cut is lossless on this batch); ``net`` is left as
    it was. The measure :func:`auxwrap.prune` applies."""
    return measure_cut(unwrap(net), as_input_tuple(probe_inputs, "probe_inputs"))[0]


@dataclass
class GateHistory:
    """Gate values over the search: ``values[k][i]`` is gate ``i`` (``connections[i]``) after step ``steps[k]``.

    ``points`` lists each branch's fusion points in depth order (for drawing); ``lam[k]`` is the L1
    weight used at that step; ``cut_step`` the step after which alpha^P were held at 0 (None: not yet).
    """

    connections: list[Connection]
    points: dict[str, list[str]]
    steps: list[int] = field(default_factory=list)
    values: list[list[float]] = field(default_factory=list)
    lam: list[float] = field(default_factory=list)
    cut_step: int | None = None

    def append(self, step: int, values: list[float], lam: float) -> None:
        self.steps.append(step)
        self.values.append(values)
        self.lam.append(lam)

    def tensor(self) -> torch.Tensor:
        """The values as a ``[records, connections]`` tensor."""
        return torch.tensor(self.values, dtype=torch.float32).reshape(len(self.values), len(self.connections))

    @property
    def labels(self) -> list[str]:
        return [f"{c.source_branch}:{c.source} -> {c.dest_branch}:{c.dest}" for c in self.connections]

    @property
    def directions(self) -> list[str]:
        return [c.direction for c in self.connections]

    def final(self) -> list[Connection]:
        """The connections with their last recorded gate values."""
        last = self.values[-1] if self.values else [None] * len(self.connections)
        return [dataclasses.replace(c, gate=v) for c, v in zip(self.connections, last, strict=True)]


@dataclass
class SearchSummary:
    """Where a search stands: the final gates per connection and what cutting alpha^P changes."""

    steps: int
    total_steps: int
    lam: float                        # the L1 weight of the next step
    cut: bool                         # alpha^P have been set to 0 and are held there
    max_gate_at_cut: float | None     # the largest alpha^P when they were zeroed (None before the cut)
    connections: list[Connection]     # every connection with its gate value now
    cut_error: float | None           # cut_error() on the probe batch, if one was given

    @property
    def max_to_primary(self) -> float:
        """The largest auxiliary -> primary gate now."""
        return max((c.gate for c in self.connections if c.direction == TO_PRIMARY), default=0.0)

    def __str__(self) -> str:
        to_p = [c.gate for c in self.connections if c.direction == TO_PRIMARY]
        to_a = [c.gate for c in self.connections if c.direction == TO_AUX]
        lines = [f"gate search: step {self.steps}/{self.total_steps}, lambda {self.lam:g}, "
                 f"{'cut' if self.cut else 'not cut yet'}"
                 + (f" (largest alpha^P at the cut: {self.max_gate_at_cut:.3g})" if self.max_gate_at_cut is not None
                    else "")]
        if to_p:
            lines.append(f"  aux->primary: {len(to_p)} gates, max {max(to_p):.3g}, "
                         f"{sum(g == 0.0 for g in to_p)} exactly 0")
        if to_a:
            lines.append(f"  primary->aux: {len(to_a)} gates, min {min(to_a):.3g}, mean {sum(to_a) / len(to_a):.3g}, "
                         f"max {max(to_a):.3g}")
        if self.cut_error is not None:
            lines.append(f"  cut error (primary output, alpha^P -> 0): {self.cut_error:.3g}")
        return "\n".join(lines)


# ---------------------------------------------------------------------- the search

class Search:
    """The gate optimiser of Aux-NAS and the L1 schedule on the auxiliary -> primary gates.

    Alternating (first-order, the paper's scheme; two disjoint halves of the data, see
    :func:`search_loaders`)::

        search_loader, train_loader = auxwrap.search_loaders(dataset, batch_size=32)
        search = auxwrap.Search(net, total_steps=epochs * len(train_loader))
        opt = torch.optim.SGD(net.weight_parameters(), lr=0.01)
        for epoch in range(epochs):
            train_loader.sampler.set_epoch(epoch)             # a new partition of the data, both halves
            for (xa, *ya), (xw, *yw) in zip(search_loader, train_loader):
                search.step(task_loss(net(xa), *ya))          # the gates only
                loss = task_loss(net(xw), *yw)
                opt.zero_grad(); loss.backward(); opt.step()   # the weights only

    Joint (single-level): one optimiser holds weights and gates; add the L1 term to your loss and let
    :meth:`after_step` apply the projection, the schedule and the cut::

        opt = torch.optim.Adam([{"params": net.weight_parameters()}, search.param_group()], lr=1e-3)
        ...; (loss + search.penalty()).backward(); opt.step(); search.after_step()

    Args:
        net: the fused network of ``auxwrap.attach(..., mode="nas")``, or a DistributedDataParallel
            wrapping it.
        total_steps: the number of gate steps the whole training makes; the schedule is laid out on it.
        lr: learning rate of the gates' Adam (authors' code: 1e-2).
        l1: the final L1 weight on the sum of alpha^P (paper: 100 on the sum; authors' code: 1000 on the mean).
        ramp: the fractions of ``total_steps`` where the L1 weight leaves 0 and reaches ``l1``.
        cut: the fraction of ``total_steps`` after which alpha^P are set to exactly 0 and held there
            (default: ``ramp[1]``; 1.0 cuts at the very end).
        decay: ``"linear"`` (alpha^P also bounded by 1 - ramp progress, so they reach 0 at the ramp's end)
            or ``"l1"`` (the L1 ramp alone); see the module doc.
        betas: Adam's betas for the gates.
        record: keep every gate value after every step in :attr:`history` (for :func:`auxwrap.plot_gates`).
        process_group: where to average gate gradients in distributed training; default: the DDP
            wrapper's group, else the default group when ``torch.distributed`` is initialised.
    """

    def __init__(self, net: nn.Module, total_steps: int, lr: float = 1e-2, *, l1: float = 100.0,
                 ramp: tuple[float, float] = (0.5, 0.8), cut: float | None = None, decay: str = DEFAULT_DECAY,
                 betas: tuple[float, float] = (0.9, 0.999), record: bool = True,
                 process_group: Any = None):
        self.net = unwrap(net)
        if self.net.mode != "nas" or not self.net.arch_parameters():
            raise AuxwrapArgumentError(
                f"net was attached with mode={self.net.mode!r}, which has no gates to search (Aux-G's "
                "links are fixed at 1); attach with mode='nas' to search, or train a mode='grad' net "
                "without Search.")
        self.total_steps = check_int("total_steps", total_steps, 1, why="the number of gate steps of the whole "
                                     "training, e.g. epochs * len(search_loader)")
        self.lr = check_real("lr", lr, 0.0, low_open=True, why="the authors use 1e-2")
        self.l1 = check_real("l1", l1, 0.0, why="the paper uses 100 on the sum of the gates")
        self.decay = check_choice("decay", decay, DECAYS, fix="use 'linear' (alpha^P bounded by 1 - ramp progress, "
                                  "exactly 0 at the ramp's end) or 'l1' (the L1 ramp alone)")
        self.ramp = _ramp(ramp)
        self.cut_at = self.ramp[1] if cut is None else _fraction("cut", cut)
        self.cut_step = max(1, math.ceil(self.cut_at * self.total_steps - 1e-9))
        if process_group is None and isinstance(net, nn.parallel.DistributedDataParallel):
            process_group = net.process_group
        self.process_group = process_group

        self._gated = [fusion for _, fusion in self.net.gated_sites()]
        self._connections = self.net.gate_connections()  # one per gate entry of self._gated, in order
        self._to_primary = [fusion for _, fusion in self.net.gated_sites(PRIMARY)]
        self.n_to_primary = sum(f.gate.numel() for f in self._to_primary)
        self.gates = self.net.arch_parameters()
        self.optimizer = torch.optim.Adam(self.gates, lr=self.lr, betas=betas, weight_decay=0.0)
        self.steps_done = 0
        self.max_gate_at_cut: float | None = None
        self.record = bool(record)
        self.history = GateHistory(self._connections,
                                   {b: [t.name for t in taps] for b, taps in self.net.taps.items()})
        self._project()
        self._record(self.lam(0))

    # ---------------------------------------------------------------- schedule and penalty

    @property
    def is_cut(self) -> bool:
        """Whether alpha^P have been set to 0 (and are held there)."""
        return self.max_gate_at_cut is not None

    def lam(self, step: int | None = None) -> float:
        """The L1 weight lambda_t at gate step ``step`` (default: the next step)."""
        t = self.steps_done if step is None else step
        start, end = (r * self.total_steps for r in self.ramp)
        if t < start or self.l1 == 0.0:
            return 0.0
        if t >= end:
            return self.l1
        return self.l1 * (t - start) / (end - start)

    def penalty(self) -> torch.Tensor:
        """``lambda_t * sum(alpha^P)``: the L1 term of Eq. 10 at the next step, differentiable.

        :meth:`step` adds it to the gate loss; in the joint variant add it to your loss yourself.
        """
        return self.lam() * torch.cat([f.gate_values() for f in self._to_primary]).sum()

    def ceiling(self, step: int | None = None) -> float:
        """The bound on alpha^P at gate step ``step``: 1 - ramp progress with ``decay="linear"``, else 1."""
        if self.decay != "linear":
            return 1.0
        t = self.steps_done if step is None else step
        start, end = (r * self.total_steps for r in self.ramp)
        if t <= start:
            return 1.0
        return 0.0 if t >= end else 1.0 - (t - start) / (end - start)

    def param_group(self) -> dict:
        """The gates as an optimiser parameter group (the search's lr, no weight decay) for the joint variant."""
        return {"params": self.gates, "lr": self.lr, "weight_decay": 0.0}

    # ---------------------------------------------------------------- steps

    def step(self, loss: torch.Tensor) -> None:
        """One gate update from ``loss`` (the task losses of a search batch) plus :meth:`penalty`.

        Gradients are taken with ``torch.autograd.grad`` w.r.t. the gates only: no weight gradient
        is computed, no ``.grad`` is written, no weight changes. In distributed training the gate
        gradients are averaged over the ranks, so the gates stay identical everywhere.
        """
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise AuxwrapArgumentError(
                f"loss must be a scalar tensor (the summed task losses of one search batch), got "
                f"{type(loss).__name__}{tuple(loss.shape) if torch.is_tensor(loss) else ''}.")
        if not loss.requires_grad:
            raise AuxwrapArgumentError(
                "loss does not depend on the gates (no autograd graph): compute it from net(x) with "
                "gradients enabled, outside torch.no_grad(), on the net passed to Search.")
        if self.lam() > 0.0 and not self.is_cut:
            loss = loss.reshape(()) + self.penalty()
        grads = torch.autograd.grad(loss.reshape(()), self.gates, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.gates, grads, strict=True)]
        mean_over_ranks(grads, self.process_group)
        for p, g in zip(self.gates, grads, strict=True):
            p.grad = g
        self.optimizer.step()
        for p in self.gates:
            p.grad = None
        self.after_step()

    def after_step(self) -> None:
        """The end of a gate step: project the gates, advance the schedule (and cut at its end), record.

        :meth:`step` calls it; call it yourself after ``opt.step()`` in the joint variant.
        """
        lam = self.lam()
        self.steps_done += 1
        self._project()
        if not self.is_cut and self.steps_done >= self.cut_step:
            self.finish()
        self._record(lam)

    def finish(self) -> float:
        """Set every auxiliary -> primary gate to exactly 0 and hold them there; returns their largest value.

        Called automatically after ``cut * total_steps`` steps. Idempotent: a second call returns the
        value of the first.
        """
        if self.is_cut:
            return self.max_gate_at_cut
        largest = max(f.gates().max().item() for f in self._to_primary)
        cut_links(self.net)
        self.max_gate_at_cut = largest
        self.history.cut_step = self.steps_done
        if largest > CUT_WARN:
            warnings.warn(
                f"auxwrap.Search cut auxiliary -> primary gates as large as {largest:.3g} at step "
                f"{self.steps_done}/{self.total_steps}: the primary's output changed at the cut. Let the "
                "weights train on after it (cut < 1.0), or raise l1 / start the ramp earlier.", stacklevel=2)
        return largest

    def summary(self, probe_inputs: Any = None) -> SearchSummary:
        """The gates per connection now, and the cut error on ``probe_inputs`` if given."""
        return SearchSummary(self.steps_done, self.total_steps, self.lam(), self.is_cut, self.max_gate_at_cut,
                             self.net.connections(),
                             None if probe_inputs is None else cut_error(self.net, probe_inputs))

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """What a resumed run needs besides the network: step count, cut, Adam state, history.

        A run resumes bit for bit from this, the network's and the weight optimiser's state dicts and
        each loader's ``sampler.state_dict()`` (saved at the end of an epoch), loaded in any order."""
        return {"steps_done": self.steps_done, "max_gate_at_cut": self.max_gate_at_cut,
                "optimizer": self.optimizer.state_dict(), "history": dataclasses.asdict(self.history)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (plain Python types: loads with ``torch.load(weights_only=True)``).

        Also puts the network's gate ceiling and cut where they stand at that step, so the network's state
        may be loaded before or after this Search is built. A state of other gates changes nothing."""
        history = dict(state["history"])
        history["connections"] = [Connection(**c) for c in history["connections"]]
        history = GateHistory(**history)
        if history.connections != self._connections:
            raise AuxwrapArgumentError(
                f"state is of a search over other gates ({len(history.connections)} connections) than this "
                f"one ({len(self._connections)}); build the Search on a network attached like the saved one.")
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])
        self.max_gate_at_cut = state["max_gate_at_cut"]
        self.history = history
        self._project()
        if self.is_cut:
            cut_links(self.net)

    # ---------------------------------------------------------------- internals

    def _project(self) -> None:
        """Every gate's parameter back in range, and alpha^P's ceiling for the next step."""
        for f in self._gated:
            f.project()
        ceiling = self.ceiling()
        for f in self._to_primary:
            f.ceiling.fill_(ceiling)

    def _record(self, lam: float) -> None:
        if self.record:
            values = torch.cat([f.gates() for f in self._gated]).tolist()  # one sync
            self.history.append(self.steps_done, values, lam)

    def __repr__(self) -> str:
        return (f"Search(step {self.steps_done}/{self.total_steps}, {len(self._connections)} gates "
                f"({self.n_to_primary} aux->primary), lr={self.lr:g}, l1={self.l1:g}, ramp={self.ramp}, "
                f"decay={self.decay!r}, cut at {self.cut_step})")


def mean_over_ranks(tensors: list[torch.Tensor], group: Any = None) -> None:
    """Replace each tensor, in place, by its mean over the ranks of ``group`` (one all-reduce); nothing
    happens outside distributed training or with one rank."""
    if not tensors or not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _fraction(name: str, value: object) -> float:
    return check_real(name, value, 0.0, 1.0, why="a fraction of total_steps")


def _ramp(ramp: object) -> tuple[float, float]:
    if not isinstance(ramp, Sequence) or len(ramp) != 2:
        raise AuxwrapArgumentError(
            f"ramp must be (start, end), fractions of total_steps with 0 <= start <= end <= 1 "
            f"(authors' code: (0.5, 0.8)), got {ramp!r}.")
    start, end = _fraction("ramp[0]", ramp[0]), _fraction("ramp[1]", ramp[1])
    if start > end:
        raise AuxwrapArgumentError(f"ramp must have start <= end, got {ramp!r}; e.g. ramp=(0.5, 0.8).")
    return start, end


# ---------------------------------------------------------------------- two disjoint halves of the data

class _Split:
    """The state two :class:`HalfSampler` share: dataset size, seed, epoch, ranks."""

    def __init__(self, n: int, seed: int, num_replicas: int, rank: int):
        self.n, self.seed, self.num_replicas, self.rank = n, seed, num_replicas, rank
        self.epoch = 0

    def per_rank(self, which: int) -> int:
        """Samples each rank reads of half ``which`` (0: the first n // 2, 1: the rest): every rank the same
        count, the remainder left out (DDP would hang otherwise)."""
        part = self.n // 2 if which == 0 else self.n - self.n // 2
        return part // self.num_replicas

    def half(self, which: int, epoch: int, shuffle: int) -> list[int]:
        """Half ``which`` of the partition of ``epoch``, in the order of its pass number ``shuffle``."""
        perm = torch.randperm(self.n, generator=_generator(self.seed, epoch)).tolist()
        part = perm[:self.n // 2] if which == 0 else perm[self.n // 2:]
        order = torch.randperm(len(part), generator=_generator(self.seed, epoch, which, shuffle)).tolist()
        part = [part[i] for i in order]
        return part[self.rank:self.per_rank(which) * self.num_replicas:self.num_replicas]


def _generator(*key: int) -> torch.Generator:
    """A generator seeded from integers (``hash`` of a tuple of ints is the same in every process)."""
    return torch.Generator().manual_seed(hash(key) & (2**63 - 1))


class HalfSampler(Sampler[int]):
    """One half (0: search, 1: train) of a random partition of the dataset.

    The two halves of one :func:`search_loaders` call share the partition, so they are disjoint and
    together cover the dataset however the loaders are iterated (an extra ``iter()``, loaders of
    different lengths, one restarted while the other is mid-pass). The partition changes only with
    ``set_epoch(epoch)`` (on either sampler, DistributedSampler-style): call it before each epoch so
    that over the epochs the weights train on every sample. Each pass over a half visits it in a
    new order.
    """

    def __init__(self, split: _Split, which: int):
        self._split, self.which = split, which
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the partition of ``epoch`` for both halves (it is a function of ``seed + epoch`` alone)."""
        self._split.epoch = int(epoch)

    def indices(self, epoch: int | None = None) -> list[int]:
        """This half's indices in the order of its next pass (of ``epoch``'s partition, default the current)."""
        return self._split.half(self.which, self._split.epoch if epoch is None else epoch, self._passes)

    def __iter__(self) -> Iterator[int]:
        indices = self.indices()
        self._passes += 1
        return iter(indices)

    def __len__(self) -> int:
        return self._split.per_rank(self.which)

    def state_dict(self) -> dict[str, int]:
        """Where the data order stands: the epoch (shared by both halves) and this half's pass count.

        Save it with the training state: without it a resumed run visits the halves in other orders."""
        return {"epoch": self._split.epoch, "passes": self._passes}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume the data order of :meth:`state_dict` (the epoch is set for both halves)."""
        self._split.epoch, self._passes = int(state["epoch"]), int(state["passes"])


def search_loaders(dataset: Dataset, batch_size: int, seed: int = 0, *, num_replicas: int | None = None,
                   rank: int | None = None, **loader_kwargs: Any) -> tuple[DataLoader, DataLoader]:
    """Two loaders over disjoint halves of ``dataset``, re-split at random every epoch.

    The first feeds :meth:`Search.step` (gates), the second the weight steps: the paper trains alpha
    and w "alternatively by sampling two non-overlapped batches" (Appendix C). With an odd size the
    train half has the extra sample. Under ``torch.distributed`` (or with ``num_replicas`` / ``rank``)
    each rank reads its own share of both halves, all ranks the same number of samples.

    Call ``loader.sampler.set_epoch(epoch)`` on either loader before each epoch: that draws a new
    partition (both halves change together); without it the partition stays the same, so the halves
    are disjoint whatever order the loaders are iterated in, but the weights only ever see their half.

    ``loader_kwargs`` go to both :class:`~torch.utils.data.DataLoader` (``num_workers``,
    ``drop_last``, ``collate_fn``...), except ``shuffle`` and ``sampler``, which the split replaces.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    for key in ("shuffle", "sampler", "batch_sampler"):
        if key in loader_kwargs:
            raise AuxwrapArgumentError(
                f"search_loaders() makes its own samplers; drop {key}= (each epoch is a fresh random split).")
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as error:
        raise AuxwrapArgumentError(
            f"dataset must be a map-style dataset with a length, got {type(dataset).__name__}.") from error
    if n < 2:
        raise AuxwrapArgumentError(f"dataset has {n} samples; two halves need at least 2.")
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    num_replicas = check_int("num_replicas", num_replicas, 1, why="the number of processes sharing the data")
    rank = check_int("rank", rank, 0, num_replicas - 1, why=f"this process among num_replicas={num_replicas}")
    split = _Split(n, int(seed), num_replicas, rank)
    return (DataLoader(dataset, batch_size=batch_size, sampler=HalfSampler(split, 0), **loader_kwargs),
            DataLoader(dataset, batch_size=batch_size, sampler=HalfSampler(split, 1), **loader_kwargs))
