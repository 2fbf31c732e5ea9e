"""Toy models and problems for tests and presets, and assertion helpers.

Everything here is small enough for a CPU test suite and needs no download: synthetic data, or
scikit-learn's bundled ``load_digits`` (8×8 grey images, 10 classes, 1,797 samples).

Example:
    >>> x, y = digits()
    >>> tuple(x.shape), tuple(y.shape), int(y.max())
    ((1797, 1, 8, 8), (1797,), 9)
    >>> BNCNN()(x[:4]).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .tensorboard import parse_tag, tag

__all__ = [
    "BNCNN",
    "mlp_bn_groups",
    "HostSyncError",
    "cuda_sync_errors",
    "forbid_host_sync",
    "MLPBN",
    "MLPLN",
    "PROBLEMS",
    "ReLUMLP",
    "ToyProblem",
    "Trajectory",
    "assert_approaches_equilibrium",
    "assert_conserved",
    "assert_exact_identities",
    "assert_matches_baseline",
    "digits",
    "run_problem",
    "sgd_equilibrium",
    "synthetic_classification",
    "toy_problem",
]


def digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N, 1, 8, 8) images scaled to [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=dtype).unsqueeze(1) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    return x, y


def synthetic_classification(n: int = 128, d: int = 20, classes: int = 5, *, seed: int = 0,
                             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs with labels from a random linear teacher."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, classes, generator=gen, dtype=torch.float64)
    return x.to(dtype), (x @ w).argmax(1)


class BNCNN(nn.Sequential):
    """A small BatchNorm CNN for 8×8 digits: three conv → BN → ReLU blocks, a pool and a linear head."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 32), in_channels: int = 1, classes: int = 10) -> None:
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if i == 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
        super().__init__(*layers)


class MLPBN(nn.Module):
    """physics.md §5's MLP-BN: Linear(20,32) → BN → ReLU → Linear(32,16) → ReLU → Linear(16,5)."""

    def __init__(self, d: int = 20, hidden: tuple[int, int] = (32, 16), classes: int = 5, eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden[0])
        self.bn1 = nn.BatchNorm1d(hidden[0], eps=eps)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` (N, d)."""
        h = torch.relu(self.bn1(self.fc1(x)))
        return self.fc3(torch.relu(self.fc2(h)))


class MLPLN(nn.Sequential):
    """An MLP with LayerNorm after each hidden Linear: the whole matrix of each is one scale group.

    Flatten → Linear → LayerNorm → ReLU, twice, then a linear head.
    """

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (128, 64), classes: int = 10) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.LayerNorm(h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, classes))
        super().__init__(*layers)


class ReLUMLP(nn.Sequential):
    """A plain ReLU MLP without normalization: rescale charges per hidden unit, translation at the head.

    Flatten → (Linear → ReLU) per hidden width → Linear.
    """

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (64, 32), classes: int = 10) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, classes))
        super().__init__(*layers)


# --------------------------------------------------------------------------------------------
# Toy problems
# --------------------------------------------------------------------------------------------
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class ToyProblem:
    """A model, its data and an optimizer factory: everything a short tracked run needs.

    Attributes:
        name: the problem's name in :data:`PROBLEMS`.
        model: a freshly initialised network (seeded).
        x: all inputs.
        y: all integer labels.
        make_optimizer: parameters → optimizer.
        batch_size: minibatch size; ``None`` trains on the full batch.
        seed: seed of the initialisation and of the minibatch order.
    """

    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    make_optimizer: OptimizerFactory
    batch_size: int | None = None
    seed: int = 0

    def optimizer(self) -> torch.optim.Optimizer:
        """A new optimizer over the model's parameters."""
        return self.make_optimizer(self.model.parameters())

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the model on one batch."""
        return nn.functional.cross_entropy(self.model(x), y)

    def symmetries(self) -> Any:
        """:func:`~nld_callbacks.find_symmetries` on one batch, with the loss.

        With the loss the detection sees the softmax head's translation symmetry too.
        """
        from .symmetries import find_symmetries

        y = self.y[: len(self.example_input)]
        return find_symmetries(self.model, self.example_input,
                               loss_fn=lambda out: nn.functional.cross_entropy(out, y))

    @property
    def example_input(self) -> torch.Tensor:
        """One batch of inputs (for :func:`~nld_callbacks.find_symmetries`)."""
        return self.x[: self.batch_size or len(self.x)]

    def batches(self, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` minibatches in a fixed, seeded order (the full batch every step without a batch size)."""
        if self.batch_size is None:
            for _ in range(steps):
                yield self.x, self.y
            return
        gen = torch.Generator().manual_seed(self.seed)
        n, done = len(self.y), 0
        while done < steps:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - self.batch_size + 1, self.batch_size):
                if done == steps:
                    return
                idx = perm[i : i + self.batch_size]
                yield self.x[idx], self.y[idx]
                done += 1


def _sgd(lr: float, momentum: float, weight_decay: float, nesterov: bool) -> OptimizerFactory:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                          nesterov=nesterov)


def _digits_512(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits(dtype)
    return x[:512], y[:512]


#: name → (model factory, data factory, default dtype, default batch size)
PROBLEMS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.dtype], tuple[torch.Tensor, torch.Tensor]],
                          torch.dtype, int | None]] = {
    "mlp_bn": (lambda: MLPBN(eps=1e-30), lambda dt: synthetic_classification(128, 20, 5, dtype=dt),
               torch.float64, None),
    "mlp_ln": (lambda: MLPLN(20, (32, 16), 5), lambda dt: synthetic_classification(128, 20, 5, dtype=dt),
               torch.float64, None),
    "relu_mlp": (lambda: ReLUMLP(20, (32, 16), 5), lambda dt: synthetic_classification(128, 20, 5, dtype=dt),
                 torch.float64, None),
    "bn_cnn": (BNCNN, _digits_512, torch.float32, 64),
}


def toy_problem(
    name: str = "mlp_bn",
    *,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    optimizer: OptimizerFactory | None = None,
    batch_size: int | None | str = "default",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> ToyProblem:
    """A toy problem by name, freshly initialised with ``seed``.

    Problems: ``"mlp_bn"`` (physics.md §5's MLP-BN on 128 Gaussian samples, float64, full batch,
    BatchNorm ε = 1e-30 so that the scale symmetry is exact, physics.md §4.13),
    ``"mlp_ln"`` (LayerNorm MLP, same data), ``"relu_mlp"`` (ReLU MLP without normalization, same
    data), ``"bn_cnn"`` (the BatchNorm CNN on 512 digits, float32, batch 64).

    Args:
        name: a key of :data:`PROBLEMS`.
        lr: the learning rate of the ``torch.optim.SGD`` the problem's optimizer factory builds.
        momentum: its momentum.
        weight_decay: its (coupled) weight decay.
        nesterov: Nesterov momentum.
        optimizer: any other factory, parameters → optimizer (overrides the SGD arguments).
        batch_size: minibatch size; ``None`` for the full batch; ``"default"`` for the problem's own.
        dtype: the model's and the data's dtype (default: the problem's own).
        seed: initialisation and minibatch order.

    Raises:
        ValueError: for an unknown ``name``.

    Example:
        >>> p = toy_problem("mlp_bn", lr=0.05)
        >>> type(p.model).__name__, tuple(p.x.shape), p.optimizer().param_groups[0]["lr"]
        ('MLPBN', (128, 20), 0.05)
    """
    if name not in PROBLEMS:
        raise ValueError(f"Expected `name` to be one of {sorted(PROBLEMS)} but got {name!r}")
    make_model, make_data, default_dtype, default_batch = PROBLEMS[name]
    dt = dtype or default_dtype
    x, y = make_data(dt)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model().to(dt)
    factory = optimizer or _sgd(lr, momentum, weight_decay, nesterov)
    bs = default_batch if batch_size == "default" else batch_size
    return ToyProblem(name, model, x, y, factory, bs if not isinstance(bs, str) else None, seed)


# --------------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """Logged NLD values of a run, step by step; pass it as a tracker's ``writer`` to record.

    Example:
        >>> traj = Trajectory()
        >>> traj({"nld/scale/fc/charge": 2.0, "nld/scale/fc/predicted": 2.0}, 1)
        >>> traj.layers(), traj.series("scale", "fc", "charge")
        ([('scale', 'fc')], ([1], [2.0]))
    """

    steps: list[int] = field(default_factory=list)
    records: list[dict[str, float]] = field(default_factory=list)
    #: ``kind/layer`` → the charge before the first tracked step
    start: dict[str, float] = field(default_factory=dict)

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        """Record one logging step (the tracker's writer protocol)."""
        self.steps.append(int(step))
        self.records.append(dict(metrics))

    def layers(self) -> list[tuple[str, str]]:
        """``(kind, layer)`` pairs in the order they were first logged."""
        seen: dict[tuple[str, str], None] = {}
        for rec in self.records:
            for t in rec:
                p = parse_tag(t)
                if p is not None:
                    seen.setdefault((p[0], p[1]), None)
        return list(seen)

    def series(self, kind: str, layer: str, quantity: str) -> tuple[list[int], list[float]]:
        """Steps and values of one quantity (steps where it was not logged are left out)."""
        t = tag(kind, layer, quantity)
        pairs = [(s, r[t]) for s, r in zip(self.steps, self.records) if t in r]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def to_dict(self, quantities: Sequence[str] = ("charge",)) -> dict[str, Any]:
        """The JSON baseline form: steps and the selected quantities' series."""
        series = {}
        for kind, layer in self.layers():
            for q in quantities:
                steps, vals = self.series(kind, layer, q)
                if vals:
                    if steps != self.steps:
                        raise ValueError(f"{tag(kind, layer, q)} was not logged at every step; a baseline needs it")
                    series[f"{kind}/{layer}/{q}"] = vals
        return {"format": "nld-baseline/1", "steps": list(self.steps), "series": series}


def run_problem(problem: ToyProblem, steps: int, *, log_every_n_steps: int = 1,
                symmetries: Any = None) -> Trajectory:
    """Train ``problem`` for ``steps`` optimizer steps under a :class:`~nld_callbacks.NoetherTracker`.

    Args:
        problem: from :func:`toy_problem`.
        steps: number of optimizer steps.
        log_every_n_steps: how often the tracker logs (1: every step).
        symmetries: groups to track; by default :meth:`ToyProblem.symmetries`.

    Returns:
        The :class:`Trajectory`, with :attr:`Trajectory.start` filled.
    """
    from .tracker import NoetherTracker

    traj = Trajectory()
    opt = problem.optimizer()
    groups = problem.symmetries() if symmetries is None else symmetries
    with NoetherTracker(problem.model, opt, groups, writer=traj, log_every_n_steps=log_every_n_steps) as tracker:
        for x, y in problem.batches(steps):
            opt.zero_grad()
            problem.loss(x, y).backward()
            opt.step()
    traj.start = {f"{r['kind']}/{r['layer']}": r["charge_start"] for r in tracker.summary()}
    return traj


# --------------------------------------------------------------------------------------------
# Assertion helpers
# --------------------------------------------------------------------------------------------
def _select(traj: Trajectory, layer: str | None, kind: str | None) -> list[tuple[str, str]]:
    found = [(k, lay) for k, lay in traj.layers() if (layer is None or lay == layer) and (kind is None or k == kind)]
    if not found:
        have = ", ".join(f"{k}/{lay}" for k, lay in traj.layers()) or "nothing"
        want = f"{kind or '*'}/{layer or '*'}"
        raise AssertionError(f"nld: no charge matching {want} in the trajectory; it holds {have}")
    return found


def _g(x: float) -> str:
    return f"{x:.10g}"


def assert_exact_identities(traj: Trajectory, *, tolerance: float = 1.0, layer: str | None = None,
                            kind: str | None = None) -> None:
    """Every logged step is explained by the exact per-step identity (physics.md §2.1, §3.2).

    Checks the unexplained residual |e| (the largest over each logging window) against
    ``tolerance``. |e| is measured in units of the residual scale D, which includes the weights'
    rounding floor 4·u_w·M, so |e| ≲ 1 means "explained up to the dtype's rounding".

    Args:
        traj: the run.
        tolerance: the largest |e| allowed.
        layer: only this layer (default: all).
        kind: only this kind (default: all).

    Raises:
        AssertionError: naming the layer, the step, the measured and predicted charge and the tolerance.
    """
    for k, lay in _select(traj, layer, kind):
        steps, e = traj.series(k, lay, "residual")
        if not steps:
            raise AssertionError(f"nld: no prediction was logged for the {k} charge of layer {lay!r} (the optimizer "
                                 "is not modelled exactly), so the exact identity cannot be checked")
        charge = dict(zip(*traj.series(k, lay, "charge")))
        pred = dict(zip(*traj.series(k, lay, "predicted")))
        upper = dict(zip(*traj.series(k, lay, "band_upper")))
        for s, v in zip(steps, e):
            if not (v <= tolerance):  # NaN fails too
                D = upper.get(s, math.nan) - pred.get(s, math.nan)
                raise AssertionError(
                    f"nld: the {k} charge of layer {lay!r} does not follow the exact per-step identity at step {s}: "
                    f"measured {_g(charge.get(s, math.nan))}, predicted {_g(pred.get(s, math.nan))}, unexplained "
                    f"residual |e| = {v:.3g} > tolerance {tolerance:g} (|e| in units of the residual scale "
                    f"D = {D:.3g}; |e| ≲ 1 is rounding)"
                )


def assert_conserved(traj: Trajectory, layer: str | None = None, *, kind: str | None = None, rtol: float = 1e-6,
                     atol: float = 0.0) -> None:
    """The charge stays at its initial value: |Q_t − Q_0| ≤ atol + rtol·|Q_0| at every logged step.

    Q_0 is the charge before the first tracked step when the trajectory knows it (:func:`run_problem`),
    else the first logged value.

    Raises:
        AssertionError: naming the layer, the step, the measured value, the conserved (predicted)
            value and the tolerance.
    """
    for k, lay in _select(traj, layer, kind):
        steps, q = traj.series(k, lay, "charge")
        q0 = traj.start.get(f"{k}/{lay}", q[0])
        tol = atol + rtol * abs(q0)
        for s, v in zip(steps, q):
            if not (abs(v - q0) <= tol):
                raise AssertionError(
                    f"nld: the {k} charge of layer {lay!r} is not conserved at step {s}: measured {_g(v)}, "
                    f"predicted {_g(q0)} (its initial value), |difference| {abs(v - q0):.3g} > tolerance "
                    f"{tol:.3g} (atol {atol:g} + rtol {rtol:g} × |initial|)"
                )


def sgd_equilibrium(traj: Trajectory, layer: str, *, lr: float, weight_decay: float, kind: str = "scale",
                    window: int = 50) -> float:
    """The SGD equilibrium charge Q* = η²⟨|g|²⟩ / (1 − (1 − ηλ)²) (physics.md §2.4) from a trajectory.

    The fixed point of Q_{t+1} = (1−ηλ)² Q_t + η² |g_t|², with the drive η²|g_t|² read off the logged
    exact prediction: η²|g_t|² = predicted_{t+1} − (1−ηλ)² Q_t. Needs a trajectory logged at every
    step; averages the drive over the last ``window`` steps.

    Raises:
        ValueError: if the trajectory was not logged at every step or has no prediction.
    """
    steps, q = traj.series(kind, layer, "charge")
    psteps, pred = traj.series(kind, layer, "predicted")
    if not pred or psteps != steps or any(b - a != 1 for a, b in zip(steps, steps[1:])):
        raise ValueError(f"Expected the {kind} charge of {layer!r} with its prediction logged at every step, "
                         f"but got {len(pred)} predictions over steps {steps[:3]}...")
    a2 = (1.0 - lr * weight_decay) ** 2
    drive = [p - a2 * q_prev for p, q_prev in zip(pred[1:], q[:-1])][-window:]
    return sum(drive) / len(drive) / (1.0 - a2)


def assert_approaches_equilibrium(traj: Trajectory, layer: str, *, kind: str = "scale",
                                  equilibrium: float | None = None, rtol: float = 0.05, window: int = 10) -> None:
    """The charge ends near its predicted equilibrium Q*, and nearer than it started.

    Args:
        traj: the run.
        layer: the layer.
        kind: its kind.
        equilibrium: Q*; by default the mean of the logged ``equilibrium`` over the last ``window`` logs
            (the tracker's running estimate, physics.md §2.4), or see :func:`sgd_equilibrium`.
        rtol: allowed |mean charge − Q*| / Q* over the last ``window`` logs.
        window: number of final logs averaged.

    Raises:
        AssertionError: naming the layer, the last step, the measured and predicted value and the tolerance.
    """
    (k, lay), = _select(traj, layer, kind)
    steps, q = traj.series(k, lay, "charge")
    if equilibrium is None:
        _, eq = traj.series(k, lay, "equilibrium")
        if not eq:
            raise AssertionError(f"nld: no equilibrium was logged for the {k} charge of layer {lay!r}; "
                                 "pass `equilibrium=` (see sgd_equilibrium)")
        equilibrium = sum(eq[-window:]) / len(eq[-window:])
    end = sum(q[-window:]) / len(q[-window:])
    begin = traj.start.get(f"{k}/{lay}", q[0])
    tol = rtol * abs(equilibrium)
    if not (abs(end - equilibrium) <= tol) or abs(end - equilibrium) > abs(begin - equilibrium) + tol:
        raise AssertionError(
            f"nld: the {k} charge of layer {lay!r} does not approach its equilibrium by step {steps[-1]}: measured "
            f"{_g(end)} (mean of the last {len(q[-window:])} logs), predicted Q* = {_g(equilibrium)}, |difference| "
            f"{abs(end - equilibrium):.3g} > tolerance {tol:.3g} (rtol {rtol:g} × Q*); it started at {_g(begin)}"
        )


def assert_matches_baseline(traj: Trajectory, path: str | os.PathLike[str], *, quantities: Sequence[str] = ("charge",),
                            rtol: float = 1e-5, atol: float = 1e-10, update: bool = False) -> None:
    """Compare a run's trajectories with a JSON baseline; write the baseline when asked or missing.

    The baseline holds the logged steps and, per layer, the series of ``quantities``. A missing
    baseline is written and the check fails once (check the file in, then rerun); ``update=True``
    (pytest's ``--nld-update-baselines``) rewrites it and passes.

    Args:
        traj: the run.
        path: the JSON file.
        quantities: which logged quantities to store and compare.
        rtol: relative tolerance per value.
        atol: absolute tolerance per value.
        update: rewrite the baseline from this run.

    Raises:
        AssertionError: naming the layer, the step, the measured and baseline values and the tolerance.
    """
    path = Path(path)
    data = traj.to_dict(quantities)
    if update or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        data.update({"rtol": rtol, "atol": atol})
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        if not update:
            raise AssertionError(f"nld: no baseline at {path}; wrote one from this run. Check it in and rerun "
                                 "(pytest --nld-update-baselines rewrites baselines).")
        return
    base = json.loads(path.read_text(encoding="utf-8"))
    if base.get("steps") != data["steps"]:
        raise AssertionError(f"nld: the run logged steps {data['steps'][:5]}... but the baseline {path} has "
                             f"{base.get('steps', [])[:5]}...; rerun with --nld-update-baselines if that is intended")
    missing = sorted(set(base["series"]) ^ set(data["series"]))
    if missing:
        raise AssertionError(f"nld: series {missing} are in only one of the run and the baseline {path}; rerun with "
                             "--nld-update-baselines if the model changed on purpose")
    for key, ref in base["series"].items():
        kind, layer, q = key.split("/")[0], "/".join(key.split("/")[1:-1]), key.split("/")[-1]
        for s, v, b in zip(data["steps"], data["series"][key], ref):
            tol = atol + rtol * abs(b)
            if not (abs(v - b) <= tol):
                raise AssertionError(
                    f"nld: the {kind} {q} of layer {layer!r} left its baseline at step {s}: measured {_g(v)}, "
                    f"baseline {_g(b)}, |difference| {abs(v - b):.3g} > tolerance {tol:.3g} (atol {atol:g} + rtol "
                    f"{rtol:g} × |baseline|; {path})"
                )


class HostSyncError(AssertionError):
    """A tracker hook read a tensor's value on the host on a step that does not log."""


@contextmanager
def cuda_sync_errors(on: bool = True) -> Iterator[None]:
    """Inside: any CUDA host synchronisation raises (torch's sync debug mode set to ``"error"``).

    The mode in force before is restored after; torch's notice that the mode is a prototype is not
    repeated. ``on=False`` does nothing (for a check that applies only on some steps or devices).
    """
    if not on:
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype feature")
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def _sync_error(what: str) -> HostSyncError:
    return HostSyncError(f"host sync in a tracker hook on a non-logging step: {what}")


def _syncing_index(index: Any) -> str | None:
    """What in an index would make a GPU wait: a Python list (copied from the host) or a boolean mask."""
    for i in index if isinstance(index, tuple) else (index,):
        if isinstance(i, list):
            return "a Python list (its indices are copied from the host)"
        if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
            return "a boolean mask (its size is read back)"
    return None


class _NoHostSync(torch.overrides.TorchFunctionMode):
    """Fails on the calls that read a tensor on the host; with ``cuda``, on any CUDA synchronisation.

    On any device it also fails on the calls that synchronise once on a GPU (a boolean-mask or
    Python-list index, ``nonzero`` and the like), so that a CPU-only run finds them too. The CUDA
    check is torch's sync debug mode set to ``"error"``: it catches what no Python call names (a
    blocking copy from pageable memory, a sparse coalesce).
    """

    FORBIDDEN = frozenset({torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy,
                           torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__})
    #: calls whose output size depends on the values: on a GPU they wait for it
    SIZED_BY_VALUES = frozenset({torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere,
                                 torch.masked_select, torch.Tensor.masked_select, torch.unique,
                                 torch.Tensor.unique, torch.unique_consecutive, torch.Tensor.unique_consecutive})
    INDEXING = frozenset({torch.Tensor.__getitem__, torch.Tensor.__setitem__})

    def __init__(self, cuda: bool = False) -> None:
        super().__init__()
        self.cuda = cuda
        self._cuda: Any = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise _sync_error(func.__name__)
        if func in self.SIZED_BY_VALUES or (func is torch.where and len(args) + len(kwargs or {}) == 1):
            raise _sync_error(f"{func.__name__} (its output's size is read back from the device)")
        why = _syncing_index(args[1]) if func in self.INDEXING and len(args) > 1 else None
        if why is not None:
            raise _sync_error(f"an index with {why}")
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> _NoHostSync:
        self._cuda = cuda_sync_errors(self.cuda)  # a fresh one per use: the mode may be entered again
        self._cuda.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._cuda.__exit__(*exc)


def forbid_host_sync(tracker: Any) -> Any:
    """Make ``tracker``'s optimizer hooks fail on any host sync on steps that do not log.

    ``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()``, ``bool(t)``, ``float(t)`` and ``int(t)``
    raise :class:`HostSyncError` inside the hooks, except on the steps whose post-hook logs (the
    one transfer per logging step); so do the calls that wait for a GPU, on any device (an index
    with a boolean mask or a Python list, ``nonzero``, ``masked_select``, ``unique``). On CUDA any
    synchronisation does (torch's sync debug mode set to ``"error"`` inside the hooks), the first
    steps, which build the layout's maps, included. Returns the tracker, re-attached.

    Example:
        >>> import torch
        >>> from nld_callbacks import NoetherTracker
        >>> model = MLPBN()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> x, y = synthetic_classification(n=32)
        >>> tracker = forbid_host_sync(NoetherTracker(model, opt, example_input=x, log_every_n_steps=2))
        >>> for _ in range(4):
        ...     opt.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     opt.step()
        >>> len(tracker.logged)
        2
    """
    tracker.detach()
    pre, post = tracker._pre_hook, tracker._post_hook

    def guarded(hook: Callable[..., Any], logs: Callable[[], bool]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            if logs():
                return hook(*args)
            cuda = tracker.layout is not None and tracker.layout.device.type == "cuda"
            try:
                with _NoHostSync(cuda):
                    return hook(*args)
            except RuntimeError as err:
                if "synchronizing CUDA operation" not in str(err):
                    raise
                raise _sync_error(str(err)) from err

        return run

    tracker._pre_hook = guarded(pre, lambda: False)
    tracker._post_hook = guarded(post, lambda: tracker.schedule(tracker.step + 1))
    return tracker.attach()


def mlp_bn_groups() -> list[Any]:
    """The charges of :class:`MLPBN` declared by hand (physics.md §5's MLP-BN).

    fc1 rows (scale, 32), fc2 units against fc3 columns and BN (γ, β) against fc2 columns
    (rescale, 16 and 32), and the softmax translation of fc3 (class sums of W's 16 columns and of b).

    Example:
        >>> [(g.key, g.n_neurons) for g in mlp_bn_groups()]
        [('scale/fc1', 32), ('rescale/fc2', 16), ('rescale/bn1', 32), ('translation/fc3', 17)]
    """
    from .symmetries import Member, SymmetryGroup

    return [
        SymmetryGroup("scale", "fc1", (Member("fc1.weight", 0), Member("fc1.bias", 0)), 32, "output channel",
                      "declared"),
        SymmetryGroup("rescale", "fc2",
                      (Member("fc2.weight", 0), Member("fc2.bias", 0), Member("fc3.weight", 1, sign=-1)),
                      16, "hidden unit", "declared"),
        SymmetryGroup("rescale", "bn1",
                      (Member("bn1.weight", 0), Member("bn1.bias", 0), Member("fc2.weight", 1, sign=-1)),
                      32, "hidden unit", "declared"),
        SymmetryGroup("translation", "fc3", (Member("fc3.weight", 1), Member("fc3.bias", None, offset=16)),
                      17, "input feature", "declared"),
    ]
