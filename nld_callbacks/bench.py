"""Overhead benchmark: what leaving the monitor on costs.

Costs are set against the physical floor and two reference instrumentations.

``nld bench`` trains the same model with and without instrumentation, in interleaved rounds
(plain, instrumented, ..., then the reverse order in the next round), every run from the same
seed on the same batches, warm-up steps excluded (the sampled mode warms up over its first two
tracked steps, which build the reduction plans), with a fixed number of torch threads. Per round
each instrumentation's step time is divided by the plain run's; the table shows the median ratio
over rounds and its interquartile range (IQR). Instrumentations:

* ``nld``: :class:`~nld_callbacks.NoetherTracker` hooks (logging every step and every 50 steps,
  and the sampled mode), and :class:`~nld_callbacks.NoetherMonitor` on the Lightning CNN;
* ``floor``: one fused ``torch._foreach_norm`` per step over exactly the monitored parameters,
  gradients and momentum buffers, the least any exact per-step identity must read;
* ``nld sums only``: the float64 sums of products a tracked step reads (θ·θ, θ·g, v·g, v·v, θ·v per
  neuron, the linear charges' sums), by the tracker's own layout and kernel, every step, without
  the identities, laws and maps made of them: how much of the tracker's time is that read;
* ``grad_norm``: Lightning's ``lightning.pytorch.utilities.grad_norm`` every step;
* ``item``: a per-parameter norm logger (``.item()`` on every weight and gradient norm, :func:`item_norms`).

In plain loops the two references and the tracker compute their values and write them nowhere;
under Lightning every arm has a TensorBoard logger, and the references are logged every step with
``self.log_dict`` from ``on_before_optimizer_step``, as Lightning users log them.

Beside the A/B ratios each instrumented arm reports its *own* time: the wall-clock time spent inside
its hooks (for the monitor under Lightning: its per-step callback hooks and its trackers' optimizer
hooks) over the plain run's step time. Run-to-run variation of the training step itself (several
per cent between two identical Lightning runs on a shared 2-core machine) blurs the A/B ratio; the
own time measures the added work directly.

Peak memory is the peak of torch's CPU allocator (allocation and free events recorded by
``torch.profiler`` with ``profile_memory=True``, over one run from model creation on), or
``torch.cuda.max_memory_allocated`` on CUDA. ``nld bench detect`` times
:func:`~nld_callbacks.find_symmetries` on a 50-layer BatchNorm CNN against one plain
forward+backward pass.

Example:
    >>> r = Stats.of([1.0, 1.2, 1.1, 1.3])
    >>> round(r.median, 2), round(r.q1, 3), round(r.q3, 3)
    (1.15, 1.075, 1.225)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import kernel
from .symmetries import SymmetryReport, find_symmetries
from .testing import cuda_sync_errors
from .tracker import NoetherTracker

__all__ = ["Stats", "count_ops", "main", "resnet_cnn", "wide_mlp", "bn_cnn_deep"]

Batch = tuple[Tensor, Tensor]
#: a tracker's sampling interval (``NoetherTracker(sample_every=...)``)
SampleEvery = int | Literal["auto"]


# --------------------------------------------------------------------------------------------
# models


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def resnet_cnn(widths: Sequence[int] = (16, 32, 64), blocks: int = 1, classes: int = 10) -> nn.Module:
    """A BatchNorm ResNet for 32×32 RGB inputs.

    A 3×3 stem, one stage of basic blocks per width (stride 2 from the second stage on), global
    average pooling and a linear head.
    """
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    c = widths[0]
    for i, w in enumerate(widths):
        for j in range(blocks):
            layers.append(_BasicBlock(c, w, 2 if i > 0 and j == 0 else 1))
            c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


def wide_mlp(width: int = 1024, depth: int = 4, d_in: int = 256, classes: int = 10) -> nn.Module:
    """``depth`` blocks of Linear → BatchNorm1d → ReLU, then a linear head."""
    layers: list[nn.Module] = []
    c = d_in
    for _ in range(depth):
        layers += [nn.Linear(c, width), nn.BatchNorm1d(width), nn.ReLU()]
        c = width
    layers.append(nn.Linear(c, classes))
    return nn.Sequential(*layers)


def bn_cnn_deep(depth: int = 50, width: int = 32, classes: int = 10) -> nn.Module:
    """``depth`` conv → BatchNorm2d → ReLU layers (3×3, ``width`` channels), pooling, a head."""
    layers: list[nn.Module] = []
    c = 3
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


@dataclass
class Workload:
    """A model factory and the batches every run of it trains on."""

    name: str
    describe: str
    make: Callable[[], nn.Module]
    batches: list[Batch]
    lr: float = 0.05
    #: an lr that changes at every step (``--lr-schedule``): η_k = η / (1 + k/100)
    schedule: bool = False
    #: ``sgd`` (heavy ball, coupled weight decay) or ``adamw`` (``--optimizer``)
    rule: str = "sgd"

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The plainly configured optimizer of every run.

        SGD with heavy ball and coupled weight decay at lr 0.05, or AdamW at lr 1e-3 with decoupled
        weight decay 0.05 (its default betas).
        """
        if self.rule == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)

    def scheduler(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The run's lr schedule, stepped after every optimizer step; ``None`` for a constant lr."""
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + k / 100)) if self.schedule else None


def _batches(shape: tuple[int, ...], n: int, classes: int, device: torch.device, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(shape, generator=gen)
        y = torch.randint(0, classes, (shape[0],), generator=gen)
        out.append((x.to(device), y.to(device)))
    return out


# --------------------------------------------------------------------------------------------
# instrumentations


class _Instrument:
    """One instrumentation attached to one run; the plain run is this base class."""

    label = "none"
    every: int | None = None
    #: seconds spent inside the instrumentation's own code during the timed steps
    spent = 0.0
    timing = False

    def attach(self, model: nn.Module, opt: torch.optim.Optimizer, report: SymmetryReport) -> None:
        """Hook into the run before its first step."""

    def warmup(self, steps: int) -> int:
        """Untimed steps this instrumentation needs: its one-time set-up stays out of the timing."""
        return steps

    def after_backward(self, model: nn.Module) -> None:
        """Called between ``backward()`` and ``optimizer.step()``."""

    def close(self) -> None:
        """Remove every hook."""


def _clocked(tracker: NoetherTracker, inst: Any) -> list[Any]:
    """Clock hooks around the tracker's own optimizer hooks (hooks run in registration order).

    The time between them goes to ``inst.spent`` while ``inst.timing`` is set. Returns the handles.
    """
    opt = tracker.optimizer
    tracker.detach()
    t0 = [0.0]

    def start(*_: Any) -> None:
        t0[0] = time.perf_counter()

    def stop(*_: Any) -> None:
        if inst.timing:
            inst.spent += time.perf_counter() - t0[0]

    handles = [opt.register_step_pre_hook(start), opt.register_step_post_hook(start)]
    tracker.attach()
    return handles + [opt.register_step_pre_hook(stop), opt.register_step_post_hook(stop)]


def _warmup_steps(sample_every: SampleEvery, steps: int) -> int:
    """Untimed steps for a tracker sampling every ``sample_every`` steps: its one-time set-up stays out."""
    if sample_every == "auto":  # long enough for the interval to be measured and used
        return max(steps, 100)
    # the first two tracked steps build the reduction plans: with sampling they come late
    return max(steps, 2 * sample_every) if sample_every != 1 else steps


@contextmanager
def _torch_ops_only() -> Iterator[None]:
    """What is built inside does without the compiled kernel (``NLD_CALLBACKS_KERNEL=0``)."""
    old = os.environ.get("NLD_CALLBACKS_KERNEL")
    os.environ["NLD_CALLBACKS_KERNEL"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["NLD_CALLBACKS_KERNEL"]
        else:
            os.environ["NLD_CALLBACKS_KERNEL"] = old


class _Tracker(_Instrument):
    """``NoetherTracker``; ``compiled=False``: its charge sums and maps by torch ops (the fallback)."""

    every: int

    def __init__(self, every: int, sample_every: SampleEvery = 1, compiled: bool = True) -> None:
        self.every, self.sample_every, self.compiled = every, sample_every, compiled
        self.label = "nld" if sample_every == 1 else f"nld sampled {_sampling(sample_every)}"
        if not compiled:
            self.label += ", torch ops"
        self.tracker: NoetherTracker | None = None

    def warmup(self, steps: int) -> int:
        return _warmup_steps(self.sample_every, steps)

    def attach(self, model: nn.Module, opt: torch.optim.Optimizer, report: SymmetryReport) -> None:
        with contextlib.nullcontext() if self.compiled else _torch_ops_only():  # (the layout is made here)
            self.tracker = NoetherTracker(model, opt, report, log_every_n_steps=self.every,
                                          sample_every=self.sample_every)
        self.handles = _clocked(self.tracker, self)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.detach()
            for h in self.handles:
                h.remove()


def _monitored(model: nn.Module, report: SymmetryReport) -> list[nn.Parameter]:
    named = dict(model.named_parameters())
    return [named[n] for n in dict.fromkeys(m.param for g in report.groups for m in g.members)]


class _AfterStep(_Instrument):
    """A read after every optimizer step (:meth:`read`, its result kept as ``last``), timed while ``timing``."""

    every = 1

    def attach(self, model: nn.Module, opt: torch.optim.Optimizer, report: SymmetryReport) -> None:
        self.prepare(model, opt, report)

        @torch.no_grad()
        def post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            t0 = time.perf_counter()
            self.last = self.read(optimizer)
            if self.timing:
                self.spent += time.perf_counter() - t0

        self.handle = opt.register_step_post_hook(post)

    def prepare(self, model: nn.Module, opt: torch.optim.Optimizer, report: SymmetryReport) -> None:
        """Everything the reads need, made before the first step."""

    def read(self, optimizer: torch.optim.Optimizer) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        self.handle.remove()


class _Floor(_AfterStep):
    """One fused ``torch._foreach_norm`` over the monitored θ, g and the optimizer's buffers after every step.

    The buffers: every state tensor of a monitored parameter's shape (SGD's momentum buffer v,
    Adam's m and v).
    """

    label = "floor"

    def prepare(self, model: nn.Module, opt: torch.optim.Optimizer, report: SymmetryReport) -> None:
        self.params = _monitored(model, report)

    def read(self, optimizer: torch.optim.Optimizer) -> Any:
        params = self.params
        grads = [p.grad for p in params if p.grad is not None]
        bufs = [b for p in params for k, b in optimizer.state.get(p, {}).items()
                if k != "step" and isinstance(b, Tensor) and b.shape == p.shape]
        return torch._foreach_norm(params + grads + bufs)


class _Sums(_AfterStep):
    """The sums a tracked step reads, nothing else: one fused read of θ, g and v after every step.

    The products and linear sums :class:`NoetherTracker`'s post-step hook reads (its pre-step hook
    takes them over from the last post-step), by the same layout and kernel, with no identities,
    laws or maps: the part of a tracked step that no per-neuron work can avoid. Under Adam: θ, m and
    v, the update u formed as they are read (on the compiled kernel).
    """

    label = "nld sums only"

    def prepare(self, model: nn.Module, opt: torch.optim.Optimizer, report: SymmetryReport) -> None:
        self.tracker = NoetherTracker(model, opt, report)
        self.tracker.detach()  # its layout and its choice of sums only: no hooks of its own

    def read(self, optimizer: torch.optim.Optimizer) -> Any:
        tracker = self.tracker
        theta, bufs = tracker._state(optimizer)
        pairs = tracker._fused_pairs(theta, bufs, tracker._grads(), optimizer, carry=True)
        assert tracker.layout is not None
        return tracker.layout.reduce_many(list(pairs.values()))


class _GradNorm(_Instrument):
    """Lightning's ``grad_norm`` utility, every step, turned into logged floats."""

    label = "grad_norm"
    every = 1

    def attach(self, model: nn.Module, opt: torch.optim.Optimizer, report: SymmetryReport) -> None:
        from lightning.pytorch.utilities import grad_norm

        self.fn = grad_norm
        self.logged: dict[str, float] = {}

    def after_backward(self, model: nn.Module) -> None:
        self.logged = {k: float(v) for k, v in self.fn(model, norm_type=2).items()}


def item_norms(model: nn.Module) -> dict[str, float]:
    """Every parameter's weight norm and gradient norm, one ``.item()`` each (the reference logger).

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[3.0, 4.0]]))
        >>> item_norms(net)
        {'weight_norm/weight': 5.0}
    """
    out = {}
    for n, p in model.named_parameters():
        out[f"weight_norm/{n}"] = p.detach().norm().item()
        if p.grad is not None:
            out[f"grad_norm/{n}"] = p.grad.norm().item()
    return out


class _ItemLogger(_Instrument):
    """Per-parameter weight and gradient norms with one ``.item()`` each, every step."""

    label = "item"
    every = 1

    def after_backward(self, model: nn.Module) -> None:
        self.logged = item_norms(model)


# --------------------------------------------------------------------------------------------
# measuring


@dataclass(frozen=True)
class Stats:
    """Median and interquartile range of a sample."""

    median: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        """Median and quartiles (linear interpolation, as ``numpy.percentile``)."""
        v = sorted(values)
        if not v:
            return cls(math.nan, math.nan, math.nan, 0)

        def q(p: float) -> float:
            x = p * (len(v) - 1)
            lo = int(math.floor(x))
            hi = min(lo + 1, len(v) - 1)
            return v[lo] + (v[hi] - v[lo]) * (x - lo)

        return cls(q(0.5), q(0.25), q(0.75), len(v))

    def fmt(self, digits: int = 3) -> str:
        """``median [q1, q3]``."""
        return f"{self.median:.{digits}f} [{self.q1:.{digits}f}, {self.q3:.{digits}f}]"


@dataclass
class Timing:
    """Mean wall-clock and CPU seconds per timed step of one run.

    ``own`` is the instrumentation's own wall-clock seconds per step (time inside its hooks and
    calls), a direct measurement of the added work that other load on the machine blurs less.
    """

    wall: float
    cpu: float
    own: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(work: Workload, inst: _Instrument, report: SymmetryReport, steps: int, warmup: int,
           device: torch.device, check_sync: bool = False) -> Timing:
    """One run: fresh model from the seed, ``warmup`` untimed steps, ``steps`` timed ones.

    The instrumentation may ask for more untimed steps (:meth:`_Instrument.warmup`).
    """
    warmup = inst.warmup(warmup)
    torch.manual_seed(0)
    model = work.make().to(device)
    opt = work.optimizer(model)
    sched = work.scheduler(opt)
    inst.attach(model, opt, report)
    loss_fn = nn.functional.cross_entropy
    t0 = c0 = 0.0
    try:
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                t0, c0 = time.perf_counter(), time.thread_time()
                inst.timing, inst.spent = True, 0.0
            x, y = work.batches[i % len(work.batches)]
            guard = check_sync and i >= warmup and inst.every is not None and (i + 1) % inst.every != 0
            with cuda_sync_errors(guard and device.type == "cuda"):
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                ta = time.perf_counter()
                inst.after_backward(model)
                if inst.timing:
                    inst.spent += time.perf_counter() - ta
                opt.step()
                if sched is not None:
                    sched.step()
        _sync(device)
        return Timing((time.perf_counter() - t0) / steps, (time.thread_time() - c0) / steps, inst.spent / steps)
    finally:
        inst.close()


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes held by torch's allocator while ``fn`` runs (from the first allocation on).

    CPU: the running sum of the allocation/free events ``torch.profiler`` records with
    ``profile_memory=True`` (torch has no CPU allocator statistics). CUDA:
    ``torch.cuda.max_memory_allocated`` above what was allocated before.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    cur = peak = 0
    for s in cpu_allocations(fn):
        cur += s
        peak = max(peak, cur)
    return peak


def cpu_allocations(fn: Callable[[], Any]) -> list[int]:
    """Bytes torch's CPU allocator hands out (+) and takes back (−) while ``fn`` runs, in time order.

    From the allocation events ``torch.profiler`` records with ``profile_memory=True``; their sum
    is what ``fn`` left allocated.

    Example:
        >>> kept = []
        >>> cpu_allocations(lambda: kept.append(torch.empty(1000, dtype=torch.float64)) or torch.ones(10))
        [8000, 40, -40]
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation:
            sizes.append((ev.start_time_ns, ev.extra_fields.alloc_size))
        stack.extend(ev.children)
    return [s for _, s in sorted(sizes)]


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> Counter[str]:
    """Number of aten operations ``fn`` dispatches, by name (a fused ``_foreach_*`` counts once).

    Example:
        >>> xs = [torch.ones(3), torch.ones(4)]
        >>> c = count_ops(lambda: torch._foreach_norm(xs))
        >>> sum(c.values()), sorted(c)
        (1, ['_foreach_norm'])
    """
    with _OpCounter() as mode:
        fn()
    return mode.ops


def _hook_ops(work: Workload, report: SymmetryReport, device: torch.device, *, warmup: int = 3) -> tuple[int, int]:
    """Aten ops the tracker's hooks add to one non-logging ``optimizer.step()``, and its sum passes.

    The sum passes are what the charge reductions of that step ran in: the compiled kernel's jobs
    (one pass over one reduction of one tensor for all of its products), or with torch ops the
    scratch-buffer fills.
    """
    batches = 0

    def step_ops(track: bool) -> int:
        nonlocal batches
        torch.manual_seed(0)
        model = work.make().to(device)
        opt = work.optimizer(model)
        tracker = NoetherTracker(model, opt, report, log_every_n_steps=10**9) if track else None
        for i in range(warmup + 1):
            x, y = work.batches[i % len(work.batches)]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            if i == warmup:
                n = sum(count_ops(opt.step).values())
            else:
                opt.step()
        if tracker is not None:
            tracker.detach()
            lay = tracker.layout
            if lay is not None:
                batches = (sum(len(dp.batches) for plan in lay._plans.values() for dp in plan.dtypes)
                           + sum(kp.n_jobs for kp in lay._kplans.values() if kp is not None))
        return n

    ops = step_ops(True) - step_ops(False)
    return ops, batches


# --------------------------------------------------------------------------------------------
# experiments


@dataclass
class Row:
    """One instrumentation on one workload: ratios over interleaved rounds."""

    model: str
    label: str
    every: str
    plain_ms: float
    time: Stats
    cpu: Stats
    added_ms: Stats
    mem: float = math.nan
    added_cpu_ms: Stats = field(default_factory=lambda: Stats.of([]))
    own: Stats = field(default_factory=lambda: Stats.of([]))  # 1 + own time / plain step time
    own_ms: Stats = field(default_factory=lambda: Stats.of([]))


@dataclass
class Config:
    """How long and how often to measure."""

    rounds: int = 5
    steps: int = 50
    warmup: int = 5
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    threads: int = 1
    quick: bool = False
    #: the models' lr changes at every step (:attr:`Workload.schedule`)
    schedule: bool = False
    #: the models' optimizer (:attr:`Workload.rule`)
    optimizer: str = "sgd"


def _interleaved(work: Workload, insts: Sequence[_Instrument], report: SymmetryReport, cfg: Config,
                 memory: bool = True) -> list[Row]:
    """Rounds of plain, instrumented..., alternating the order; ratios against the round's plain run."""
    runs: list[list[Timing]] = [[] for _ in range(len(insts) + 1)]
    order = list(range(len(insts) + 1))
    arms: list[_Instrument] = [_Instrument(), *insts]
    for r in range(cfg.rounds):
        for i in order if r % 2 == 0 else order[::-1]:
            runs[i].append(_train(work, _fresh(arms[i]), report, cfg.steps, cfg.warmup, cfg.device))
    mem = [math.nan] * len(arms)
    if memory:
        msteps = min(cfg.steps, 6)
        for i, arm in enumerate(arms):
            def train(a: _Instrument = arm) -> Timing:
                return _train(work, _fresh(a), report, msteps, 2, cfg.device)

            mem[i] = peak_memory(train, cfg.device)
    rows = []
    base = runs[0]
    for i, arm in enumerate(arms):
        t = [a.wall / b.wall for a, b in zip(runs[i], base)]
        c = [a.cpu / b.cpu for a, b in zip(runs[i], base)]
        added = [1e3 * (a.wall - b.wall) for a, b in zip(runs[i], base)]
        added_cpu = [1e3 * (a.cpu - b.cpu) for a, b in zip(runs[i], base)]
        every = "-" if arm.every is None else str(arm.every)
        own = [1.0 + a.own / b.wall for a, b in zip(runs[i], base)] if i else []  # the plain run has none
        rows.append(Row(work.name, arm.label, every, 1e3 * statistics.median(b.wall for b in base), Stats.of(t),
                        Stats.of(c), Stats.of(added), mem[i] / mem[0] if mem[0] else math.nan, Stats.of(added_cpu),
                        Stats.of(own), Stats.of([1e3 * a.own for a in runs[i]] if i else [])))
    return rows


def _fresh(inst: _Instrument) -> _Instrument:
    """A new instance with the same settings (instrumentations hold per-run state)."""
    if isinstance(inst, _Tracker):
        return _Tracker(inst.every or 1, inst.sample_every, inst.compiled)
    return type(inst)()


def _sync_check(work: Workload, report: SymmetryReport, cfg: Config) -> str:
    """One tracked run with ``torch.cuda.set_sync_debug_mode("error")`` on every non-logging step."""
    try:
        _train(work, _Tracker(50), report, cfg.steps, cfg.warmup, cfg.device, check_sync=True)
    except RuntimeError as err:
        return f"host synchronisation on a non-logging step: {err}"
    return f"host synchronisations on {cfg.steps - cfg.steps // 50} non-logging steps: none (sync debug mode 'error')"


def _workloads(cfg: Config) -> tuple[Workload, Workload]:
    dev = cfg.device
    if cfg.quick:
        cnn = Workload("cnn", "ResNet-style BN CNN (8,16) on 32x32, batch 8",
                       lambda: resnet_cnn((8, 16)), _batches((8, 3, 32, 32), 2, 10, dev))
        mlp = Workload("mlp", "BN MLP 128 wide x 2, batch 8", lambda: wide_mlp(128, 2, 64),
                       _batches((8, 64), 2, 10, dev))
    else:
        cnn = Workload("cnn", "ResNet-style BN CNN (16,32,64) on 32x32, batch 16",
                       lambda: resnet_cnn((16, 32, 64)), _batches((16, 3, 32, 32), 4, 10, dev))
        mlp = Workload("mlp", "BN MLP 1024 wide x 4, batch 16", lambda: wide_mlp(1024, 4, 256),
                       _batches((16, 256), 4, 10, dev))
    cnn.schedule = mlp.schedule = cfg.schedule
    cnn.rule = mlp.rule = cfg.optimizer
    return cnn, mlp


def _report_of(work: Workload) -> SymmetryReport:
    torch.manual_seed(0)
    model = work.make().to(work.batches[0][0].device)
    return find_symmetries(model, work.batches[0][0])


def _sampling(sample_every: SampleEvery) -> str:
    """How a sampled arm is named: ``1/k`` or ``auto``."""
    return "auto" if sample_every == "auto" else f"1/{sample_every}"


def _sample_every_arg(text: str) -> SampleEvery:
    if text == "auto":
        return "auto"
    k = int(text)
    if k < 1:
        raise ValueError(text)
    return k


def _instruments(sample_every: SampleEvery, torch_ops: bool = False) -> list[_Instrument]:
    ours: list[_Instrument] = [_Tracker(1), _Tracker(50), _Tracker(50, sample_every)]
    if torch_ops:  # the same tracker without the compiled kernel, side by side
        ours += [_Tracker(1, compiled=False), _Tracker(50, compiled=False)]
    return [*ours, _Sums(), _Floor(), _GradNorm(), _ItemLogger()]


# ------------------------------------------------------------------- Lightning


def _lightning_rows(work: Workload, cfg: Config, sample_every: SampleEvery) -> list[Row]:
    """The CNN under a Lightning Trainer (TensorBoard logger in every arm), NoetherMonitor on/off."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities import grad_norm
    from torch.utils.data import DataLoader, Dataset

    from .callback import NoetherMonitor

    class Module(pl.LightningModule):
        def __init__(self, reference: str | None) -> None:
            super().__init__()
            self.net = work.make()
            self.reference = reference

        def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.log("train/loss", loss)
            return loss

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            # the reference instrumentations, logged every step the way Lightning users log them
            if self.reference == "grad_norm":
                self.log_dict(grad_norm(self, norm_type=2))
            elif self.reference == "item":
                self.log_dict(item_norms(self))

        def configure_optimizers(self) -> Any:
            opt = work.optimizer(self)
            sched = work.scheduler(opt)
            return opt if sched is None else {"optimizer": opt,
                                              "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Timed(NoetherMonitor):
        """The monitor with its own time measured: its per-step Lightning hooks and its trackers' hooks."""

        timing = False
        spent = 0.0

        @contextmanager
        def _clock(self) -> Iterator[None]:
            t0 = time.perf_counter()
            yield
            if self.timing:
                self.spent += time.perf_counter() - t0

        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            super().on_fit_start(trainer, pl_module)
            self.handles = [h for t in self.trackers for h in _clocked(t, self)]

        def on_train_batch_start(self, *args: Any) -> None:
            with self._clock():
                super().on_train_batch_start(*args)

        def on_before_backward(self, *args: Any) -> None:
            with self._clock():
                super().on_before_backward(*args)

        def on_train_batch_end(self, *args: Any) -> None:
            with self._clock():
                super().on_train_batch_end(*args)

        def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            super().on_fit_end(trainer, pl_module)
            for h in self.handles:
                h.remove()

    class Clock(pl.Callback):
        def __init__(self, warmup: int, timed: list[Timed]) -> None:
            self.warmup, self.timed = warmup, timed
            self.t0 = self.c0 = 0.0
            self.wall = self.cpu = 0.0

        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == self.warmup:
                _sync(cfg.device)
                self.t0, self.c0 = time.perf_counter(), time.thread_time()
                for m in self.timed:
                    m.timing = True

        def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
            _sync(cfg.device)
            self.wall = (time.perf_counter() - self.t0) / cfg.steps
            self.cpu = (time.thread_time() - self.c0) / cfg.steps
            for m in self.timed:
                m.timing = False

    batches = [(x.cpu(), y.cpu()) for x, y in work.batches]
    accel = "gpu" if cfg.device.type == "cuda" else "cpu"
    # label, log every, monitor arguments (None: no monitor), reference logged by the module
    arms: list[tuple[str, str, dict[str, Any] | None, str | None]] = [
        ("none", "-", None, None),
        ("NoetherMonitor", "1", {"log_every_n_steps": 1}, None),
        ("NoetherMonitor", "50", {"log_every_n_steps": 50}, None),
        (f"NoetherMonitor sampled {_sampling(sample_every)}", "50",
         {"log_every_n_steps": 50, "sample_every": sample_every}, None),
        ("grad_norm", "1", None, "grad_norm"),
        ("item", "1", None, "item"),
    ]
    # every arm runs as long as the longest warm-up asks (the automatic interval settles first)
    warmup = max(_warmup_steps(a[2].get("sample_every", 1), cfg.warmup) for a in arms if a[2] is not None)
    data = [batches[i % len(batches)] for i in range(warmup + cfg.steps)]
    runs: list[list[Timing]] = [[] for _ in arms]
    tmp = tempfile.mkdtemp(prefix="nld_bench_")

    def run(i: int) -> Timing:
        label, every, kwargs, reference = arms[i]
        torch.manual_seed(0)
        monitors = [] if kwargs is None else [Timed(verbose=False, **kwargs)]
        clock = Clock(warmup, monitors)
        trainer = pl.Trainer(
            max_steps=warmup + cfg.steps, accelerator=accel, devices=1,
            logger=TensorBoardLogger(tmp, name=f"arm{i}"), log_every_n_steps=int(every) if every != "-" else 50,
            callbacks=[*monitors, clock], enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        )
        loader = DataLoader(cast("Dataset[Batch]", data), batch_size=None, shuffle=False)  # a list works as a Dataset
        trainer.fit(Module(reference), loader)
        return Timing(clock.wall, clock.cpu, sum(m.spent for m in monitors) / cfg.steps)

    import logging

    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "nld_callbacks")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            order = list(range(len(arms)))
            for r in range(cfg.rounds):
                for i in order if r % 2 == 0 else order[::-1]:
                    runs[i].append(run(i))
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    base = runs[0]
    rows = []
    for i, (label, every, _, _) in enumerate(arms):
        t = [a.wall / b.wall for a, b in zip(runs[i], base)]
        c = [a.cpu / b.cpu for a, b in zip(runs[i], base)]
        added = [1e3 * (a.wall - b.wall) for a, b in zip(runs[i], base)]
        added_cpu = [1e3 * (a.cpu - b.cpu) for a, b in zip(runs[i], base)]
        own = [1.0 + a.own / b.wall for a, b in zip(runs[i], base)] if arms[i][2] is not None else []
        rows.append(Row(work.name + " (Lightning)", label, every, 1e3 * statistics.median(b.wall for b in base),
                        Stats.of(t), Stats.of(c), Stats.of(added), math.nan, Stats.of(added_cpu), Stats.of(own),
                        Stats.of([1e3 * a.own for a in runs[i]] if own else [])))
    return rows


# ------------------------------------------------------------------- depth


@dataclass
class DepthRow:
    """Cost growth on one MLP depth."""

    depth: int
    params: int
    tensors: int
    plain_ms: float
    added_ms: Stats
    floor_ms: Stats
    ops: int
    batches: int
    added_cpu_ms: Stats = field(default_factory=lambda: Stats.of([]))
    floor_cpu_ms: Stats = field(default_factory=lambda: Stats.of([]))
    own_ms: Stats = field(default_factory=lambda: Stats.of([]))
    floor_own_ms: Stats = field(default_factory=lambda: Stats.of([]))


def _depth_rows(cfg: Config, depths: Sequence[int], width: int) -> list[DepthRow]:
    rows = []
    for d in depths:
        # a small learning rate keeps the 128-layer net finite (a diverging run would time NaN paths)
        work = Workload(f"mlp{d}", f"BN MLP {width} wide x {d}", partial(wide_mlp, width, d, width),
                        _batches((16, width), 2, 10, cfg.device), lr=0.002)
        report = _report_of(work)
        r = _interleaved(work, [_Tracker(50), _Floor()], report, cfg, memory=False)
        params = _monitored(work.make(), report)
        ops, nb = _hook_ops(work, report, cfg.device)
        rows.append(DepthRow(d, sum(p.numel() for p in params), len(params), r[0].plain_ms, r[1].added_ms,
                             r[2].added_ms, ops, nb, r[1].added_cpu_ms, r[2].added_cpu_ms, r[1].own_ms, r[2].own_ms))
    return rows


# ------------------------------------------------------------------- printing


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    w = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(head)).rstrip(),
             "  ".join("-" * x for x in w)]
    lines += ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)


def _overhead_table(rows: Sequence[Row]) -> str:
    head = ("model", "instrumentation", "log every", "plain ms/step", "time ratio [IQR]", "added ms/step",
            "cpu-time ratio [IQR]", "added cpu ms", "own ms/step", "1 + own/plain [IQR]", "peak mem ratio")
    body = []
    for r in rows:
        own = ("-", "-") if r.own.n == 0 else (f"{r.own_ms.median:.3f}", r.own.fmt(4))
        body.append((r.model, r.label, r.every, f"{r.plain_ms:.2f}", r.time.fmt(), f"{r.added_ms.median:+.3f}",
                     r.cpu.fmt(), f"{r.added_cpu_ms.median:+.3f}", *own, "-" if math.isnan(r.mem) else f"{r.mem:.3f}"))
    return _table(head, body)


def _depth_table(rows: Sequence[DepthRow]) -> str:
    head = ("layers", "monitored params", "tensors", "plain ms/step", "nld added ms (cpu)", "floor added ms (cpu)",
            "nld own ms", "floor own ms", "nld own us per M params", "hook ops/step", "sum passes")
    body = []
    for r in rows:
        per = 1e3 * r.own_ms.median / (r.params / 1e6)
        body.append((str(r.depth), f"{r.params:,}", str(r.tensors), f"{r.plain_ms:.2f}",
                     f"{r.added_ms.median:+.3f} ({r.added_cpu_ms.median:+.3f})",
                     f"{r.floor_ms.median:+.3f} ({r.floor_cpu_ms.median:+.3f})", f"{r.own_ms.median:.3f}",
                     f"{r.floor_own_ms.median:.3f}", f"{per:.0f}", str(r.ops), str(r.batches)))
    return _table(head, body)


def _find(rows: Sequence[Row], model: str, label: str, every: str) -> Row | None:
    return next((r for r in rows if r.model == model and r.label == label and r.every == every), None)


def _verdicts(rows: Sequence[Row], depth: Sequence[DepthRow], sample_every: SampleEvery) -> list[str]:
    """Each target of the overhead budget, met or missed.

    Two verdicts per line: on the interleaved A/B wall-clock median (first) and on the
    instrumentation's own time (second; ``-`` where it is not measured); the CPU-time A/B figure
    stands beside them.
    """
    out = []

    def mark(ok: bool | None) -> str:
        return "-     " if ok is None else ("met   " if ok else "MISSED")

    def check(name: str, wall: float, cpu: float, own: float | None, limit: float, unit: str = "x") -> None:
        def num(v: float) -> str:  # NaN: a ratio over a reference that added no time (noise)
            return "n/a" if math.isnan(v) else f"{v:.3f}{unit}"

        def ok(v: float | None) -> bool | None:
            return None if v is None or math.isnan(v) else v <= limit

        own_s = "" if own is None else f", {num(own)} own"
        out.append(f"{mark(ok(wall))} {mark(ok(own))}  {name}: "
                   f"{num(wall)} wall, {num(cpu)} cpu{own_s} (target <= {limit:g}{unit})")

    def over(a: Stats, b: Stats) -> float:
        return a.median / b.median if b.median > 0 else math.nan

    def against_references(some: Sequence[Row], model: str, label: str) -> None:
        ours = _find(some, model, label, "1")
        for ref in ("grad_norm", "item"):
            rr = _find(some, model, ref, "1")
            if ours is not None and rr is not None:
                own = ours.own_ms.median - rr.own_ms.median if ours.own.n and rr.own.n else None
                check(f"{model}, added ms of {label} every step minus {ref} every step",
                      ours.added_ms.median - rr.added_ms.median, ours.added_cpu_ms.median - rr.added_cpu_ms.median,
                      own, 0.0, " ms")

    sampled = f"nld sampled {_sampling(sample_every)}"
    for model in ("cnn", "mlp"):
        if model == "cnn":
            for every, limit in (("1", 1.02), ("50", 1.01)):
                r = _find(rows, model, "nld", every)
                if r is not None:
                    check(f"cnn, nld logging every {every} step(s): time ratio", r.time.median, r.cpu.median,
                          r.own.median, limit)
        r1, fl = _find(rows, model, "nld", "1"), _find(rows, model, "floor", "1")
        if model == "mlp" and r1 is not None and fl is not None:
            check("mlp, nld added time / floor added time (every step)", over(r1.added_ms, fl.added_ms),
                  over(r1.added_cpu_ms, fl.added_cpu_ms), over(r1.own_ms, fl.own_ms), 2.0)
        s = _find(rows, model, sampled, "50")
        if s is not None:
            check(f"{model}, sampled mode {_sampling(sample_every)}: time ratio", s.time.median, s.cpu.median,
                  s.own.median, 1.03)
        for r in rows:
            # (the torch-ops and sums-only arms are comparisons, not the instrument the targets are for)
            compared = "torch ops" in r.label or r.label == _Sums.label
            if r.model == model and r.label.startswith("nld") and not compared and not math.isnan(r.mem):
                out.append(f"{mark(r.mem <= 1.02)} -       {model}, {r.label} every {r.every}: "
                           f"peak memory ratio {r.mem:.3f}x (target <= 1.02x)")
        against_references(rows, model, "nld")
    lt = [r for r in rows if r.model.endswith("(Lightning)")]
    for label, every, limit in (("NoetherMonitor", "1", 1.02), ("NoetherMonitor", "50", 1.01),
                                (f"NoetherMonitor sampled {_sampling(sample_every)}", "50", 1.03)):
        r = _find(lt, lt[0].model, label, every) if lt else None
        if r is not None:
            check(f"cnn (Lightning), {label} every {every}: time ratio", r.time.median, r.cpu.median,
                  r.own.median if r.own.n else None, limit)
    if lt:  # both references log through the trainer every step, as the monitor does
        against_references(lt, lt[0].model, "NoetherMonitor")
    if len(depth) >= 2:
        a, b = depth[0], depth[-1]

        def growth(x: float, y: float) -> float:
            return (y / x) / (b.params / a.params) if x > 0 else math.inf

        check(f"depth {a.depth}->{b.depth}: overhead growth / parameter growth",
              growth(a.added_ms.median, b.added_ms.median), growth(a.added_cpu_ms.median, b.added_cpu_ms.median),
              growth(a.own_ms.median, b.own_ms.median), 1.0)
        out.append(f"info   -       depth {a.depth}->{b.depth}: hook ops/step {a.ops} -> {b.ops} "
                   f"({b.ops / max(a.ops, 1):.2f}x), sum passes {a.batches} -> {b.batches}, "
                   f"ops per sum pass {a.ops / max(a.batches, 1):.1f} -> {b.ops / max(b.batches, 1):.1f}")
    return out


# ------------------------------------------------------------------- detect


def detect(argv: Sequence[str]) -> int:
    """``nld bench detect``: find_symmetries on a deep BatchNorm CNN vs one forward+backward."""
    p = argparse.ArgumentParser(prog="nld bench detect", description=detect.__doc__)
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    ns = p.parse_args(list(argv))
    if ns.quick:
        ns.depth, ns.repeats, ns.batch = min(ns.depth, 6), min(ns.repeats, 2), 2
    torch.set_num_threads(ns.threads)
    dev = torch.device(ns.device)
    torch.manual_seed(0)
    model = bn_cnn_deep(ns.depth).to(dev)
    x = torch.randn(ns.batch, 3, 32, 32, device=dev)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        _sync(dev)

    groups = 0

    def det() -> None:
        nonlocal groups
        groups = len(find_symmetries(model, x))
        _sync(dev)

    fwd_bwd()
    det()  # warm-up
    tf: list[float] = []
    td: list[float] = []
    for _ in range(ns.repeats):
        for fn, acc in ((fwd_bwd, tf), (det, td)):
            t0 = time.perf_counter()
            fn()
            acc.append(1e3 * (time.perf_counter() - t0))
    f, d = Stats.of(tf), Stats.of(td)
    print(f"nld bench detect: torch {torch.__version__}, {dev}, {ns.threads} thread(s), median of {ns.repeats} runs")
    print(_table(("model", "groups", "forward+backward ms [IQR]", "find_symmetries ms [IQR]", "ratio"),
                 [(f"{ns.depth}-layer BN CNN, batch {ns.batch}, 32x32", str(groups), f.fmt(1), d.fmt(1),
                   f"{d.median / f.median:.2f}x")]))
    return 0


# ------------------------------------------------------------------- entry point


def _load() -> str:
    """The machine's load averages: other work on the cores shows up in wall-clock ratios."""
    try:
        one, five, fifteen = os.getloadavg()
        return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count() or 0} cores"
    except OSError:  # pragma: no cover - not on every platform
        return "load average unknown"



def main(argv: Sequence[str]) -> int:
    """``nld bench [--quick] [--device cuda] ...`` and ``nld bench detect ...``."""
    argv = list(argv)
    if argv and argv[0] == "detect":
        return detect(argv[1:])
    p = argparse.ArgumentParser(prog="nld bench", description="Overhead of NoetherMonitor/NoetherTracker against "
                                "the plain run, the physical floor and two reference instrumentations.")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (fixed for every run)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 50)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 5)")
    p.add_argument("--sample-every", type=_sample_every_arg, default=10,
                   help="the sampled mode's k, or 'auto' (give it --steps of several hundred: its k can reach 200)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: plain,lightning,depth,detect")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run with tiny models")
    p.add_argument("--torch-ops", action="store_true",
                   help="also time the tracker with its charge sums and maps by torch ops, the fallback without "
                        "the compiled kernel (CPU; plain loops)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="every arm's optimizer: SGD with heavy ball and weight decay (default) or AdamW")
    p.add_argument("--lr-schedule", action="store_true",
                   help="the CNN and the MLP train with an lr that changes at every step, lr/(1 + k/100), in every "
                        "arm (plain loops and Lightning): the tracker's coefficients are made again at every step")
    ns = p.parse_args(argv)
    dev = torch.device(ns.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("nld bench: --device cuda asked for, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    cfg = Config(device=dev, threads=ns.threads, quick=ns.quick, schedule=ns.lr_schedule, optimizer=ns.optimizer)
    if ns.quick:
        cfg.rounds, cfg.steps, cfg.warmup = 1, 4, 2
    cfg.rounds = ns.rounds or cfg.rounds
    cfg.steps = ns.steps or cfg.steps
    cfg.warmup = ns.warmup if ns.warmup is not None else cfg.warmup
    skip = {s.strip() for s in ns.skip.split(",") if s.strip()}
    torch.set_num_threads(cfg.threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    t_start = time.perf_counter()
    print(f"nld bench: torch {torch.__version__}, {dev}, {cfg.threads} thread(s), {cfg.rounds} interleaved "
          f"round(s), {cfg.steps} timed steps after {cfg.warmup} warm-up steps per run"
          f" (sampled arms and, under Lightning, every arm: {_warmup_steps(ns.sample_every, cfg.warmup)}); {_load()}")
    if cfg.optimizer != "sgd":
        print("optimizer: AdamW(lr=1e-3, weight_decay=0.05) in every arm (cnn, mlp and Lightning; not the depth MLPs)")
    if cfg.schedule:
        print("lr schedule: lr/(1 + k/100), stepped after every optimizer step (cnn, mlp and Lightning; "
              "not the depth MLPs)")
    if dev.type == "cpu":
        lib = kernel.load()
        print("charge sums: " + (f"compiled kernel ({lib._name})" if lib is not None else
                                 "torch ops (the compiled kernel is off or cannot be built: nld_callbacks.kernel)"))
    print("time ratio = instrumented / plain run of the same round (wall clock per step), median [IQR] over rounds;")
    print("cpu-time = the same with this thread's CPU time (time.thread_time; all work runs on it at 1 thread);")
    print("peak mem = peak bytes of torch's " + ("CUDA allocator (max_memory_allocated)" if dev.type == "cuda" else
          "CPU allocator (torch.profiler allocation events), one run each"))
    cnn, mlp = _workloads(cfg)
    rows: list[Row] = []
    if "plain" not in skip:
        for work in (cnn, mlp):
            report = _report_of(work)
            print(f"\n[{work.name}] {work.describe}: {len(report.groups)} groups, "
                  f"{sum(p.numel() for p in _monitored(work.make(), report)):,} monitored parameters")
            part = _interleaved(work, _instruments(ns.sample_every, ns.torch_ops and dev.type == "cpu"), report, cfg)
            rows += part
            print(_overhead_table(part))
            if dev.type == "cuda":
                print(_sync_check(work, report, cfg))
    if "lightning" not in skip:
        print(f"\n[cnn (Lightning)] {cnn.describe}, Trainer with a TensorBoardLogger in every arm")
        lcfg = Config(rounds=max(1, cfg.rounds - 2), steps=cfg.steps, warmup=cfg.warmup, device=dev,
                      threads=cfg.threads, quick=cfg.quick)
        part = _lightning_rows(cnn, lcfg, ns.sample_every)
        rows += part
        print(_overhead_table(part))
    depth: list[DepthRow] = []
    if "depth" not in skip:
        depths, width = ((2, 4, 8), 32) if cfg.quick else ((8, 32, 128), 256)
        print(f"\n[cost growth] BN MLPs {width} wide, batch 16, nld logging every 50 steps; hook ops/step = aten ops "
              "the hooks add to one non-logging optimizer.step() (TorchDispatchMode)")
        dcfg = Config(rounds=max(1, cfg.rounds - 2), steps=cfg.steps, warmup=cfg.warmup, device=dev,
                      threads=cfg.threads, quick=cfg.quick)
        depth = _depth_rows(dcfg, depths, width)
        print(_depth_table(depth))
    print("\n[targets]")
    for line in _verdicts(rows, depth, ns.sample_every):
        print(line)
    if "detect" not in skip:
        print()
        detect(["--quick"] if cfg.quick else ["--device", str(dev), "--threads", str(cfg.threads)])
    print(f"\nnld bench: done in {time.perf_counter() - t_start:.0f} s; {_load()}")
    return 0
