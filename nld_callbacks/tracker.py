"""NoetherTracker: per-step Noether charges of a plain PyTorch optimizer, no Lightning needed.

The tracker hangs on an optimizer's step hooks (physics.md §3.3):

1. the **pre-hook** needs θ_t-only quantities (Q_t, and P_t = B(θ_t, v_t) with momentum). Under
   Lightning's automatic optimization it runs *before* the closure, so it never reads a gradient.
   Between tracked steps it reads nothing: θ_t and v_t are the previous post-hook's θ_{t+1} and
   v_{t+1}, whose sums it reuses while no tensor was touched in between;
2. the optimizer runs (closure, clipping, unscaling happen inside);
3. the **post-hook** reads g_t (the gradient actually consumed), v_{t+1} and θ_{t+1}, evaluates the
   exact identity, the residual decomposition, the effective learning rate and the angular update
   for every group in a fixed number of batched float64 ops (on the CPU, a few calls of the
   compiled kernel, :mod:`~nld_callbacks.kernel`), and folds them into device-side accumulators;
4. only on a logging step are the accumulators moved to the host, once, and written.

Nothing here changes the parameters, the gradients or the optimizer state.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from nld_callbacks import NoetherTracker
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> with NoetherTracker(model, opt, example_input=x, log_every_n_steps=10) as tracker:
    ...     for _ in range(10):
    ...         opt.zero_grad()
    ...         nn.functional.cross_entropy(model(x), y).backward()
    ...         opt.step()
    >>> tracker.step, abs(tracker.logged[-1]["nld/scale/0/residual"]) < 10
    (10, True)
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import statistics
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import kernel as _kernel
from . import theory
from .charges import AdamDirection, ChargeLayout, Restricted, host_to_device
from .optim import Hyper, OptimizerModel, adam_bias_corrections, adaptive_tensors, optimizer_model, stepped_batches
from .symmetries import SymmetryGroup, SymmetryReport, find_symmetries
from .tensorboard import Dashboard, bin_on_device, tag, write_scalars

__all__ = ["NoetherTracker", "StepRecord", "every_n_steps"]

log = logging.getLogger(__name__)

Schedule = Callable[[int], bool]


def check_sample_every(sample_every: object) -> None:
    """Raise ``ValueError`` unless ``sample_every`` is a positive int or ``"auto"``."""
    if sample_every != "auto" and (not isinstance(sample_every, int) or isinstance(sample_every, bool)
                                   or sample_every < 1):
        raise ValueError(f"Expected `sample_every` to be a positive int or 'auto' but got {sample_every!r}")


def every_n_steps(n: int) -> Schedule:
    """A schedule that is true on steps n, 2n, 3n, ... (steps count from 1).

    Raises:
        ValueError: if ``n`` is not a positive int.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"Expected `log_every_n_steps` to be a positive int but got {n!r}")
    return lambda step: step % n == 0


# Rows of the accumulator matrix (each row has one entry per group).
_WIN_E, _WIN_B, _CHARGE, _PRED, _EFF, _ANGLE, _START, _SUM_OBS, _SUM_SYM, _SUM_BRK, _RUN_E, _BAD = range(12)
# Σ over the group's neurons of the residual scale D_t of the last step (physics.md §3.2): the
# half-width of the dashboard's tolerance band around the prediction.
_TOL = 12
# Last values of the continuous law (§2.2), the equilibrium Q* / angle / relaxation time (§2.4), the
# RMSProp correspondence (§2.3), the radial share of adaptive updates and the metric charge (§2.1).
(_NLD, _QSTAR, _ANGLE_STAR, _RELAX, _RMS_DECAY, _RMS_ACC, _RADIAL, _METRIC, _METRIC_PRED) = range(13, 22)
# Rows that are per-group means over neurons, and (22..28) how many neurons each mean is over: the
# weights that merge the ranks' means when the groups sit on FSDP row shards.
_MEANS = [_EFF, _ANGLE, _RADIAL, _ANGLE_STAR, _RELAX, _RMS_DECAY, _RMS_ACC]
_COUNTS = list(range(22, 29))
_N_ROWS = 29
# How the ranks' rows combine (row shards): maxima, and sums (every other row but the means)
_MAX_ROWS = [_WIN_E, _WIN_B, _RUN_E, _BAD]
_SUM_ROWS = [r for r in range(22) if r not in _MEANS and r not in _MAX_ROWS]
# The rows every tracked step writes, in the order NoetherTracker._accumulate assembles them:
# window and run maxima, running sums, the means of the coefficients' constants and their counts.
_EXTREMES = [_WIN_E, _WIN_B, _RUN_E]
_CONST_MEANS = [_ANGLE_STAR, _RELAX, _RMS_DECAY]
_STEP_UPDATE = (_EXTREMES + [_SUM_OBS, _SUM_SYM, _SUM_BRK] + _CONST_MEANS
                + [_COUNTS[_MEANS.index(r)] for r in _CONST_MEANS])
# The last-value rows: written from the held rows of the last valid step when the accumulators are
# read (NoetherTracker._write_last), not at every step.
_LAST_MEANS = [_EFF, _ANGLE, _RADIAL, _RMS_ACC]
_LAST_UPDATE = ([_CHARGE, _PRED, _TOL, _NLD, _QSTAR, _METRIC, _METRIC_PRED] + _LAST_MEANS
                + [_COUNTS[_MEANS.index(r)] for r in _LAST_MEANS])
# Per-neuron state (NoetherTracker._dyn), one masked write per tracked step: the continuous laws and
# equilibrium averages ("on": a valid step was seen), then what the last-value rows are made of.
_DYN_KEYS = ("nld", "nld_rate", "on", "ema_x", "ema_w")
_HELD_KEYS = ("q0", "q1", "pred", "tol", "step_sq", "eff_factor", "eq_coef", "adaptive", "rmsprop")
_STATE_KEYS = _DYN_KEYS + _HELD_KEYS
# held too where an adaptive rule gives them (rows added at its first step, NaN until a valid one)
_ADAPTIVE_KEYS = ("radial", "metric_charge", "metric_pred")
# The compiled step's (kernel.nld_step) output rows, its input rows' order, and the accumulator rows
# it writes: _STEP_UPDATE, then the invalid steps' count.
_OUT_KEYS = ("q0", "q1", "pred", "tol", "step_sq", "nld", "nld_rate", "ema_x", "ema_w", *_ADAPTIVE_KEYS,
             "brk", "r", "b", "e", "obs", "sym")
_N_OUT = len(_OUT_KEYS)
_RECORD_KEYS = ("q0", "q1", "brk", "r", "b", "e")  # (what a step's record keeps of them)
_REST_KEYS = tuple(k for k in _OUT_KEYS if k not in _RECORD_KEYS)
_STEP_ACC_ROWS = (ctypes.c_int64 * 13)(*_STEP_UPDATE, _BAD)
_LAST_ACC_ROWS = (ctypes.c_int64 * 15)(*_LAST_UPDATE)
_FAMILY_CODE = {"sgd": 0.0, "heavy_ball": 1.0, "nesterov": 2.0, "sgdw": 3.0, "adam": 4.0}
# nld_terms' input rows (kernel.TERMS_INPUTS) and its families' codes
_TERMS_INPUTS = ("Q0", "Q1", "P0", "X", "G", "Y", "K", "Z", "T0", "T1", "S0", "SG", "L1", "A1", "UNIT", "LR", "WD",
                 "MOM", "C", "SIGN", "FAM", "U", "UU", "DECAY")
_TERMS_FAMILIES = {f: int(code) for f, code in _FAMILY_CODE.items()}
_TRUE, _FALSE = torch.tensor(True), torch.tensor(False)  # a compiled step's validity (read-only)


@dataclass
class StepRecord:
    """The last tracked step, per group neuron (groups concatenated; split with ``layout.split``).

    All tensors are float64 and stay on the parameters' device. ``charge`` is Q = B(θ, θ) for
    quadratic groups and T = ⟨c, θ⟩ for linear (translation) groups. The optional fields are NaN
    where no law applies to the optimizer: ``nld`` (the continuous law of physics.md §2.2, streamed
    from the start), ``equilibrium`` (Q* of §2.4, scale groups), ``metric_charge`` and
    ``metric_predicted`` (Σ G θ² of adaptive rules without momentum, §2.1), ``radial_update``
    (cos(θ_t, u_t) of adaptive updates, the KSB signature). On a step marked invalid (a non-finite
    value) only the charges and the residuals are the step's; every other field is NaN.
    """

    step: int
    charge_before: Tensor
    charge: Tensor
    predicted: Tensor
    breaking: Tensor
    drift_residual: Tensor
    breaking_share: Tensor
    residual: Tensor
    effective_lr: Tensor
    angular_update: Tensor
    nld: Tensor | None = None
    equilibrium: Tensor | None = None
    metric_charge: Tensor | None = None
    metric_predicted: Tensor | None = None
    radial_update: Tensor | None = None


# Per-reduction coefficient rows of NoetherTracker._coefficients (then 6 + 6 propagator rows); the
# first eight are what the per-step identities read.
_COEF_ROWS = ("lr", "wd", "momentum", "c", "sign", "decay", "family", "metric", "eff_factor", "adaptive",
              "eq_coef", "eq_numel", "eq_angle", "relax", "rms_decay")
_STEP_ROWS = _COEF_ROWS[:8]


def _coefficient_table(combos: Sequence[tuple[Hyper, bool, bool]]) -> Tensor:
    """Host float64 table ``(len(_COEF_ROWS) + 12, H)`` of coefficients for each (hyper, first, active).

    NaN marks a quantity that has no law for that optimizer (continuous law, equilibrium), so it is
    logged as absent rather than wrong. Only the laws of the families present are evaluated: under
    an lr schedule the table is made again at every step.
    """
    f64 = torch.float64
    # torch skips a parameter without a gradient entirely (no decay, no momentum): η = 0 makes every
    # identity read "unchanged", which is exact. `eta` is the schedule's η, for laws that describe
    # the group over time.
    lr, eta, wd, beta, tau, c, sign, decay, fam, metric = torch.tensor(
        [[h.lr if a else 0.0, h.lr, h.wd, h.momentum, h.dampening, 1.0 if f else 1.0 - h.dampening,
          -1.0 if h.maximize else 1.0, h.wd if (h.family == "adam" and h.decoupled) else 0.0,
          _FAMILY_CODE[h.family], 1.0 if h.metric else 0.0] for h, f, a in combos], dtype=f64).T
    nan = torch.full_like(lr, float("nan"))
    families = {h.family for h, _, _ in combos}
    is_sgd, is_hb, is_adam = fam == 0, fam == 1, fam == 4
    adamw = is_adam & (decay > 0)
    cases = [(is_sgd, "sgd" in families), (is_hb, "heavy_ball" in families),
             (adamw, any(h.family == "adam" and h.decoupled and h.wd > 0 for h, _, _ in combos))]

    def law(*branches: Callable[[], Tensor] | None) -> Tensor:
        # the value of each family's law where that family is (the masks are disjoint), NaN elsewhere
        out = nan
        for (mask, present), fn in zip(cases, branches):
            if present and fn is not None:
                out = torch.where(mask, fn(), out)
        return out

    one = torch.ones_like(eta)
    eff_factor = torch.where(is_sgd, lr / (1.0 - lr * wd), torch.where(is_adam, lr, lr / (1.0 - beta)))
    adaptive = is_adam.to(f64)
    # §2.4: Q*² = eq_coef · ⟨X⟩ with X = Q|g|² (SGD), Q·|v|² (heavy ball), C² (AdamW: Q* = ηC/(2λ))
    eq_coef = law(lambda: theory.equilibrium_sgd(eta, wd, one) ** 2,
                  lambda: theory.equilibrium_heavy_ball(eta, wd, beta, one, tau), lambda: (eta / (2.0 * wd)) ** 2)
    eq_numel = adamw.to(f64)
    eq_angle = law(lambda: theory.equilibrium_angle_sgd(eta, wd),
                   lambda: theory.equilibrium_angle_heavy_ball(eta, wd, beta, tau),
                   lambda: theory.equilibrium_angle_adamw(eta, wd, beta))
    relax = law(lambda: theory.relaxation_steps_sgd(eta, wd),
                lambda: theory.relaxation_steps_heavy_ball(eta, wd, beta, tau),
                lambda: theory.relaxation_steps_adamw(eta, wd))
    # §2.3: |w|⁴ is an RMSProp accumulator with decay (1−ηλ)⁴ (SGD), ≈ 1 − 4η(1−τ)λ/(1−β) (heavy ball)
    rms_decay = law(lambda: (1.0 - eta * wd) ** 4, lambda: 1.0 - 4.0 * eta * (1.0 - tau) * wd / (1.0 - beta), None)
    rows = [lr, wd, beta, c, sign, decay, fam, metric, eff_factor, adaptive, eq_coef, eq_numel, eq_angle, relax,
            rms_decay]
    # §2.2 continuous laws, one step each: first-order for SGD, damped oscillator for heavy ball;
    # quadratic then linear charges (the two oscillators in one batch)
    nan_prop = nan[:, None, None].expand(-1, 2, 3)
    first_order: tuple[Tensor, ...] = (nan_prop, nan_prop)
    osc: tuple[Tensor, ...] = (nan_prop, nan_prop)
    if cases[0][1]:
        first_order = tuple(theory.first_order_propagator(theory.nld_sgd_coefficients(lr, wd, linear=linear))
                            for linear in (False, True))
    if cases[1][1]:
        gamma, omega2 = theory.nld_heavy_ball_coefficients(lr, wd, beta, tau)
        _, omega2_lin = theory.nld_heavy_ball_coefficients(lr, wd, beta, tau, linear=True)
        osc = theory.oscillator_propagator(torch.cat([gamma, gamma]), torch.cat([omega2, omega2_lin])).split(len(lr))
    for fo, os_ in zip(first_order, osc):
        prop = torch.where(is_sgd[:, None, None], fo, torch.where(is_hb[:, None, None], os_, nan_prop))
        rows.extend(prop.reshape(-1, 6).T)
    return torch.stack(rows)


@dataclass
class _Step:
    """Everything :meth:`NoetherTracker._terms` evaluated for one step, per reduction neuron."""

    quad: theory.StepTerms | None
    linear: theory.StepTerms | None
    T1: Tensor | None
    abs1: Tensor | None
    coef: dict[str, Any]  # per-reduction vectors; "groups": the per-neuron ones
    drive: Tensor
    eq_drive: Tensor
    UU: Tensor | None
    metric: tuple[Tensor, Tensor] | None
    fresh: bool


@dataclass
class _LastStep:
    """One tracked step's per-neuron values, from which :attr:`NoetherTracker.last` is made when read.

    ``identities``: the step was predicted (an optimizer the tracker models).
    """

    step: int
    identities: bool
    ok: Tensor  # the step was valid: the held state is this step's
    values: Mapping[str, Tensor]  # q0, q1 and the residuals
    held: dict[str, Tensor]  # views of the held state (rows of its buffer)
    info: _TheoryLayout


class _OutRows(Mapping[str, Tensor]):
    """The compiled step's record of a step (q0, q1 and the residuals): rows of its output, made when read."""

    _ROWS = {k: i for i, k in enumerate(_RECORD_KEYS)}

    def __init__(self, out: Tensor) -> None:
        self._out = out  # (len(_RECORD_KEYS), n)

    def __getitem__(self, key: str) -> Tensor:
        return self._out[self._ROWS[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ROWS)

    def __len__(self) -> int:
        return len(self._ROWS)


class _StepPlan:
    """The tables of the compiled step (``kernel.nld_step``) for one set of coefficients, held rows and kind of step.

    Every address but the step's own rows (mapped and output) is fixed while they hold; :meth:`place`
    writes those in before each call.
    """

    def __init__(self, cg: dict[str, Any], rows: Tensor, flags: tuple[int, ...], lib: Any, inputs: Sequence[Any],
                 commit: Sequence[tuple[Any, Any, int]], held: dict[str, Tensor]) -> None:
        self.cg, self.rows, self.flags, self.lib, self.held = cg, rows, flags, lib, held  # (held: its rows' views)
        self.c_flags = (ctypes.c_int64 * len(flags))(*flags)
        fixed = [x if isinstance(x, tuple) and isinstance(x[0], int) else (0, 1 if x else 0) for x in inputs]
        self.inputs = (ctypes.c_int64 * len(inputs))(*(a for a, _ in fixed))
        self.strides = (ctypes.c_int64 * len(inputs))(*(st for _, st in fixed))
        self.placed = [(k, x[0], x[1]) for k, x in enumerate(inputs) if x is not None and isinstance(x[0], str)]
        self.n_commit = len(commit)
        self.commit = (ctypes.c_int64 * (3 * len(commit)))(
            *(v for d, src, st in commit for v in (d, 0 if isinstance(src, tuple) else src, st)))
        self.out_slots = [(3 * c + 1, src[1]) for c, (_, src, _) in enumerate(commit) if isinstance(src, tuple)]
        self.out = (ctypes.c_int64 * len(_OUT_KEYS))()

    def place(self, signed: Tensor, unsigned: Tensor, record: Tensor, rest: Tensor) -> Any:
        """Write this step's row addresses into the tables; the output rows' addresses (``_OUT_KEYS``).

        ``record``: the rows of ``_RECORD_KEYS``, ``rest``: room for the others.
        """
        base = {"s": (signed.data_ptr(), 8 * signed.stride(0)), "u": (unsigned.data_ptr(), 8 * unsigned.stride(0))}
        inputs = self.inputs
        for k, which, r in self.placed:
            b, step = base[which]
            inputs[k] = b + r * step
        rec, r_step, other, o_step = record.data_ptr(), 8 * record.stride(0), rest.data_ptr(), 8 * rest.stride(0)
        out = self.out
        for j, key in enumerate(_OUT_KEYS):
            out[j] = (rec + _RECORD_KEYS.index(key) * r_step if key in _RECORD_KEYS
                      else other + _REST_KEYS.index(key) * o_step)
        commit = self.commit
        for c, r in self.out_slots:
            commit[c] = out[r]
        return out


@dataclass
class _Carry:
    """What a tracked post-step read of θ_{t+1} and v_{t+1}, for the next pre-step (physics.md §3.3).

    ``Q`` = B(θ, θ), ``P`` = B(θ, v) (momentum), ``T``/``S`` the linear sums of θ and v; ``key``
    is every tensor's storage address and version counter when they were read.
    """

    step: int
    key: tuple[Any, ...]
    Q: Tensor
    P: Tensor | None
    linear: tuple[Tensor, Tensor | None] | None


@dataclass
class _Mapped:
    """One step's per-reduction rows on the group neurons (:meth:`NoetherTracker._to_neurons`).

    ``signed`` rows: Q_t, Q_{t+1} [, T_t, T_{t+1}], then per part (quadratic, linear) the observed,
    symmetric, breaking and force terms, the two drives [, B(u, u)] [, the metric charge and its
    prediction]; ``unsigned`` rows: per part the coefficient, the terms' scale and |Δθ|², then the
    rounding floors. ``coef`` (the coefficients per group neuron) is ``None`` for a step with no
    identities (an optimizer that is not modelled).
    """

    signed: Tensor | None
    unsigned: Tensor | None
    parts: int
    quad: bool
    UU: bool
    metric: bool
    abs1: bool
    coef: dict[str, Any] | None
    fresh: bool

    def take(self) -> tuple[Tensor, Tensor | None]:
        """The mapped rows, handed over: this record holds them no longer (they go with their last view)."""
        rows, self.signed, self.unsigned = (self.signed, self.unsigned), None, None
        assert rows[0] is not None, "the mapped rows were taken already"
        return rows[0], rows[1]


def _merge(out: Mapping[str, theory.StepTerms], family: Tensor | None) -> theory.StepTerms:
    """One StepTerms per reduction from the families present.

    Param groups of different families: each tensor gets its own family's terms.
    """
    first = next(iter(out.values()))
    if len(out) == 1 or family is None:
        return first
    merged = {}
    for f in theory.StepTerms.__dataclass_fields__:
        v = getattr(first, f)
        for name, t in out.items():
            v = torch.where(family == _FAMILY_CODE[name], getattr(t, f), v)
        merged[f] = v
    return theory.StepTerms(**merged)


def _abs(tensors: Mapping[str, Tensor | None]) -> dict[str, Tensor | None]:
    """|x| of every tensor in one fused op, whatever their number (``None`` stays ``None``)."""
    present = {n: t for n, t in tensors.items() if t is not None}
    out: dict[str, Tensor | None] = dict.fromkeys(tensors)
    if present:
        out.update(zip(present, torch._foreach_abs(list(present.values()))))
    return out


def _update_direction(h: Hyper, theta: Tensor, grad: Tensor | None, buf: Tensor | None,
                      update: Tensor | None) -> Tensor | None:
    """u_t = (θ_t − θ_{t+1})/η of one tensor, from post-step values only (for the linear residual scale)."""
    if grad is None:
        return None
    fam = h.family
    g = -grad if h.maximize else grad
    if fam == "adam":
        if update is None:
            return None
        lam, d = (h.wd if h.decoupled else 0.0), update
    elif fam == "heavy_ball":
        return buf
    elif fam == "sgd":
        lam, d = h.wd, g
    elif fam == "nesterov":
        lam, d = h.wd, g if buf is None else g + h.momentum * buf
    else:  # sgdw
        lam, d = h.wd, buf if buf is not None else g
    if lam == 0.0:
        return d
    return (d + lam * theta) / (1.0 - h.lr * lam)


@dataclass
class _TheoryLayout:
    """Per-group-neuron facts about a ChargeLayout that the predictions need (built once per layout)."""

    layout: ChargeLayout
    keys: list[str]
    linear: Tensor  # bool: the neuron's charge is linear (translation)
    scale: Tensor  # bool: the neuron belongs to a scale group
    count: Tensor  # reductions feeding the neuron
    numel_sq: Tensor  # C², C the parameter entries in the neuron (physics.md §2.4)
    linear_params: tuple[str, ...]
    owned: Tensor | None  # bool: the neuron is on this rank (None: every neuron is, no sharding)
    partial: Tensor | None  # bool: the neuron's sums are partial on this rank (None: no such neuron)
    ones: Tensor  # 1 and NaN on every neuron (read-only: one value, expanded)
    nan: Tensor
    bounds: Tensor  # int64 on the host: each group's first neuron, then the number of neurons

    @property
    def has_linear(self) -> bool:
        return bool(self.linear_params)

    @property
    def has_quadratic(self) -> bool:
        return any(not g.linear for g in self.layout.groups)

    @classmethod
    def build(cls, lay: ChargeLayout, params: Mapping[str, Tensor],
              partial_keys: AbstractSet[str] = frozenset()) -> _TheoryLayout:
        dev = lay.device
        sizes = torch.tensor([g.n_neurons for g in lay.groups], dtype=torch.long)
        linear = host_to_device(torch.tensor([g.linear for g in lay.groups]).repeat_interleave(sizes), dev)
        scale = host_to_device(torch.tensor([g.kind == "scale" for g in lay.groups]).repeat_interleave(sizes), dev)
        per_red = torch.empty(lay.n_reductions, dtype=torch.float64)
        for p, reds in lay.reductions.items():
            for r in reds:
                per_red[r.start : r.start + r.size] = params[p].numel() / r.size
        ones = torch.ones(lay.n_reductions, dtype=torch.float64, device=dev)
        lin_params = tuple(dict.fromkeys(m.param for g in lay.groups if g.linear for m in g.members))
        # row shards (FSDP): the neurons of the other ranks get no reduction
        owned = lay.covered
        partial = None
        if any(g.key in partial_keys for g in lay.groups):
            flags = torch.tensor([g.key in partial_keys for g in lay.groups], dtype=torch.bool)
            partial = host_to_device(flags.repeat_interleave(sizes), dev)
        one, nan = (torch.full((), v, dtype=torch.float64, device=dev).expand(lay.n_neurons) for v in (1.0, math.nan))
        return cls(lay, [g.key for g in lay.groups], linear, scale, lay.to_groups(ones, unsigned=True),
                   lay.to_groups(host_to_device(per_red, dev), unsigned=True).square(), lin_params,
                   None if lay.covers_all else host_to_device(owned, dev), partial, one, nan,
                   torch.tensor([*lay.group_offsets, lay.n_neurons], dtype=torch.int64))


def _is_sharded(p: Tensor) -> bool:
    """A DTensor parameter whose placements shard it (FSDP2), or an FSDP1 flat parameter."""
    placements = getattr(p, "placements", None)
    if placements is not None:
        return any(type(pl).__name__ != "Replicate" for pl in placements)
    return bool(getattr(p, "_is_flat_param", False))


def _local(t: Any) -> Any:
    """The rank's own entries of a DTensor (its local shard, no copy); any other tensor as is."""
    return t.to_local() if t is not None and hasattr(t, "placements") else t


def _row_shard(p: Tensor) -> tuple[int, int] | None:
    """Rows ``lo:hi`` (dim 0) of a parameter sharded by FSDP2 on dim 0 that this rank holds.

    ``None`` for any other layout (FSDP1 flat parameters, other placements, meshes of several
    dimensions). FSDP2 splits dim 0 as ``torch.chunk`` does: ⌈n / world⌉ rows per rank.
    """
    placements = getattr(p, "placements", None)
    if placements is None or len(placements) != 1 or type(placements[0]).__name__ != "Shard" \
            or placements[0].dim != 0 or p.dim() == 0:
        return None
    mesh = p.device_mesh  # type: ignore[attr-defined]
    world, rank = mesh.size(), mesh.get_local_rank()
    n = p.shape[0]
    per = -(-n // world)
    lo = min(rank * per, n)
    hi = min(lo + per, n)
    return (lo, hi) if _local(p).shape[0] == hi - lo else None


def _local_mesh_group(p: Any) -> Any:
    """The process group of a DTensor parameter's (1-D) device mesh."""
    return p.device_mesh.get_group()


def _shard_group(g: SymmetryGroup, named: Mapping[str, Tensor]) -> tuple[SymmetryGroup, bool] | None:
    """This rank's part of a group over FSDP2 row-sharded parameters, and whether it is partial.

    A member whose neurons are dim-0 rows (a layer's rows and bias) covers the rank's rows only: it
    moves to the rows' offset. Any other member (columns, a whole tensor) covers every neuron with
    a partial sum over the rank's rows. A group of the first kind only, all on the same rows, has
    each neuron whole on one rank (``partial`` False); otherwise every neuron's sums are partial
    on each rank (``partial`` True) and add up across ranks. ``None`` when a member is not a
    dim-0 shard (FSDP1 flat parameters, other placements, an unsharded member beside sharded ones,
    blocked neurons on dim 0).
    """
    members, rows_seen, partial = [], set(), False
    for m in g.members:
        p = named.get(m.param)
        rows = None if p is None else _row_shard(p)
        if rows is None:
            return None
        assert p is not None
        if m.axis is not None and m.axis % p.dim() == 0:
            if m.blocks is not None:
                return None
            members.append(dataclasses.replace(m, offset=m.offset + rows[0]))
            rows_seen.add((m.offset, rows))
        else:
            members.append(m)
            partial = True
    partial = partial or len(rows_seen) != 1
    return dataclasses.replace(g, members=tuple(members)), partial


_STEP_WRAPPER = torch.optim.Optimizer.profile_hook_step(lambda *a, **k: None).__code__


class AutoSampler:
    """Picks the sampling interval k of ``sample_every="auto"`` from measured times.

    After every tracked step: k = ⌈own / (max_overhead · plain − idle)⌉, between 1 and
    ``max_every`` (200: the longest interval whose NLD-law accuracy README "Overhead" states), where
    *own* is the median time inside the tracker's hooks over the last few tracked steps, *plain* the
    median of the rest of a step (the time from one step's end to the next's, less the hooks' time)
    over the last steps, and *idle* the mean hook time of the untracked steps so far (their logging
    steps' writes included: a cost no k reduces); the next tracked step is k steps later. The
    first ``warmup`` tracked steps (they build the reduction plans) run one after the other, the
    next one after a gap of 2 (it builds the plans of a step whose predecessor was not tracked);
    none of them is timed, nor is any later step that built a plan. The choice follows the
    machine's speed, so which steps are tracked can differ between runs.

    Example:
        >>> ticks = iter([0.0, 0.5, 0.5, 1.0, 101.0, 101.5, 101.5, 102.0])  # seconds, two tracked steps
        >>> s = AutoSampler(max_overhead=0.002, warmup=1, clock=lambda: next(ticks))
        >>> for step in (1, 2):  # the pre-hook's time, then the post-hook's, then the step's end
        ...     t = s.clock(); _ = s.spent(t); t = s.clock(); s.step_end(step, True, s.spent(t))
        >>> s.k, s.next  # own 1.0 s per tracked step, plain 100.0 s: k = ⌈1 / (0.002 · 100)⌉
        (5, 7)
    """

    def __init__(self, max_overhead: float = 0.01, *, max_every: int = 200, warmup: int = 3, window: int = 5,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not 0.0 < max_overhead < 1.0:
            raise ValueError(f"Expected `max_overhead` to be in (0, 1) but got {max_overhead!r}")
        self.max_overhead, self.max_every, self.warmup, self.clock = max_overhead, max_every, warmup, clock
        self.k = 1  #: the current interval
        self.next = 1  #: the next step to track
        self._own: deque[float] = deque(maxlen=window)
        self._plain: deque[float] = deque(maxlen=4 * window + 1)
        self._tracked = 0
        self._idle = [0.0, 0]  # hook time and count of the untracked steps
        self._hooks = 0.0  # time inside the hooks since the last step's end
        self._last_end: float | None = None

    def spent(self, since: float) -> float:
        """Add the time from ``since`` to now to this step's hook time; returns now."""
        now = self.clock()
        self._hooks += now - since
        return now

    def step_end(self, step: int, tracked: bool, now: float, *, one_time: bool = False) -> None:
        """Close optimizer step ``step`` (ended at ``now``) and plan the next tracked step.

        ``one_time``: the step's hooks did one-time work (built a reduction plan): its time is
        not a sample of the tracking cost.
        """
        if self._last_end is not None:
            self._plain.append(now - self._last_end - self._hooks)
        if not tracked:
            self._idle[0] += self._hooks
            self._idle[1] += 1
        else:
            self._tracked += 1
            if self._tracked > self.warmup and not one_time:
                self._own.append(self._hooks)
            if self._own and self._plain:
                idle = self._idle[0] / self._idle[1] if self._idle[1] else 0.0
                room = self.max_overhead * statistics.median(self._plain) - idle
                need = math.ceil(statistics.median(self._own) / room - 1e-9) if room > 0 else self.max_every
                self.k = min(max(1, need), self.max_every)
            elif self._tracked >= self.warmup:  # one gap first: a tracked step after a gap builds its plans
                self.k = 2
            self.next = step + self.k
        self._hooks, self._last_end = 0.0, now


class _GradOff:
    """``torch.no_grad()`` for the hooks, without its Python machinery.

    The hooks run twice per step right after the backward pass, where entering ``no_grad`` costs
    about 25 µs (its code is cold) and switching the mode directly about 8 µs.
    """

    __slots__ = ("prev",)

    def __enter__(self) -> None:
        self.prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)

    def __exit__(self, *exc: object) -> None:
        torch._C._set_grad_enabled(self.prev)


def _nested_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether this hook call comes from a ``step()`` nested in another ``step()``.

    Torch wraps every class's ``step`` with the hooks, so ``super().step()`` of the same optimizer
    fires them again. Stateless, so an exception inside a step can never leave the tracker deaf.
    """
    frame: FrameType | None = sys._getframe(2)
    calls = 0
    while frame is not None:
        if frame.f_code is _STEP_WRAPPER and frame.f_locals.get("self") is optimizer:
            calls += 1
            if calls > 1:
                return True
        frame = frame.f_back
    return False


class NoetherTracker:
    """Measure Noether charges at every optimizer step and compare them with the exact identities.

    Between two tracked steps the pre-hook reads nothing: θ_t and v_t are what the previous
    post-hook read as θ_{t+1} and v_{t+1}, and their sums are reused while every tensor's storage
    and version counter are unchanged (any in-place change in between makes the pre-hook read
    again; writes through ``.data`` are not seen).

    Sharded parameters (FSDP2's ``fully_shard``, dim-0 shards): each rank evaluates its own
    shards and the ranks' accumulators are merged by one ``all_gather`` per logging step (every
    rank must step the tracker on the same steps); :meth:`summary` is then a collective too, and
    :meth:`state_dict` is per rank. A group whose neurons are whole rows of the shards (a layer's
    rows and bias feeding a normalization) is tracked in full; a group whose neurons span the
    shards (columns of the next layer) from partial sums: charges, predictions, ΔQ sums and laws
    (they add up across ranks) and the residual per shard, without per-neuron ratios (breaking
    share, effective lr, angle, equilibrium). Other sharded layouts are left out, with a note in
    the report and one warning.

    Args:
        model: the network whose parameters the optimizer updates.
        optimizer: the optimizer to hook. ``torch.optim.SGD`` (every form), :class:`~nld_callbacks.optim.SGDW`,
            ``Adam``/``AdamW`` and ``RMSprop`` are modelled exactly (see :mod:`nld_callbacks.optim`);
            any other is measured only, with predictions marked absent and one warning.
        symmetries: groups to track (from :func:`~nld_callbacks.find_symmetries`); with neither
            this nor ``example_input`` the tracker waits for :meth:`set_symmetries`.
        example_input: run :func:`~nld_callbacks.find_symmetries` on it.
        writer: where logging steps go: a ``SummaryWriter`` (anything with ``add_scalar``) or a
            callable ``(metrics: dict[str, float], step: int) -> None``. ``None`` keeps the values in
            :attr:`logged` only.
        log_every_n_steps: an int n (log on steps n, 2n, ...) or a ``Callable[[int], bool]``.
        include: glob patterns over ``kind/layer`` keys to keep.
        exclude: glob patterns over ``kind/layer`` keys to drop.
        float64_accumulation: upcast tensors to float64 before every product and sum (exact charges
            of low-precision weights, at several times the cost); by default sums run in the
            weights' dtype, whose rounding the residual's 4·u_w·M floor already allows for (on
            the CPU, where the compiled kernel of :mod:`nld_callbacks.kernel` sums float32 and
            float64 tensors, products are exact and sums float64 either way).
        sample_every: track one optimizer step in k (steps k, 2k, ...); the hooks of the other
            steps return at once, reading nothing. Sampled steps are exact (their per-step
            identities and residuals are the same numbers as with k = 1); the accumulated ΔQ sums
            cover the sampled steps only; the continuous NLD law is advanced over all k steps with
            the sampled step's drive held constant (a piecewise-constant drive: its error is the
            drive's variation within k steps; on a toy BN MLP at batch 16, up to 2e-3 relative for
            SGD at k = 10 to 50, and up to 10 % for heavy ball, whose drive 2η²|v|² carries the
            minibatch noise; README "Overhead"). The first two tracked steps build the reduction
            plans (a one-time cost). ``"auto"``: k chosen and revised as training runs so that the
            time inside the hooks stays near ``max_overhead`` of the step time (:class:`AutoSampler`;
            the current k is ``tracker.auto.k``).
        max_overhead: with ``sample_every="auto"``, the fraction of the step time the hooks may
            take (default 1 %).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        symmetries: SymmetryReport | Sequence[SymmetryGroup] | None = None,
        *,
        example_input: Any = None,
        writer: Any = None,
        log_every_n_steps: int | Schedule = 50,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        float64_accumulation: bool = False,
        sample_every: int | Literal["auto"] = 1,
        max_overhead: float = 0.01,
    ) -> None:
        check_sample_every(sample_every)
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be a torch.nn.Module but got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Expected `optimizer` to be a torch.optim.Optimizer but got {type(optimizer).__name__}")
        if writer is not None and not (hasattr(writer, "add_scalar") or callable(writer)):
            raise TypeError(f"Expected `writer` to have add_scalar or be callable but got {type(writer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.writer = writer
        self.schedule: Schedule = log_every_n_steps if callable(log_every_n_steps) else every_n_steps(log_every_n_steps)
        self.include, self.exclude = include, exclude
        self.float64_accumulation = float64_accumulation
        self.sample_every = sample_every
        #: the interval chooser of ``sample_every="auto"`` (None otherwise)
        self.auto: AutoSampler | None = AutoSampler(max_overhead) if sample_every == "auto" else None
        self._span = 1  # optimizer steps the tracked step stands for (sample_every)
        self._tracked_before = False
        self._since = 0  # untracked optimizer steps since the last tracked one
        self._plans = 0  # reduction plans built so far (auto sampling: a step that builds one is not timed)
        self.opt_model: OptimizerModel = optimizer_model(optimizer)
        if not self.opt_model.supported:
            warnings.warn(
                f"NoetherTracker: {self.opt_model.reason}; charges are measured, predictions are marked absent.",
                stacklevel=2,
            )
        self.step = 0
        self.skipped_steps = 0
        self._sharded_warned = False
        self._sharded = False  # some tracked group sits on FSDP2 row shards (per-rank partial sums)
        self._partial_keys: set[str] = set()  # groups whose neurons span the shards
        self._process_group: Any = None
        # A subclass whose step() calls super().step() runs the hooks once per class: only the
        # outermost call is a step.
        self._may_nest = any("step" in vars(c) for c in type(optimizer).__mro__[1:]
                             if c is not torch.optim.Optimizer) and "step" in vars(type(optimizer))
        self.logged: list[dict[str, float]] = []
        self._last_step: _LastStep | None = None
        self._step_plan: _StepPlan | None = None
        self._hyper_cache: tuple[tuple[Hyper, ...], tuple[tuple[int, ...], ...], dict[str, Hyper], set[str]] | None
        self._hyper_cache = None
        self._last_record: StepRecord | None = None
        self.report: SymmetryReport | None = None
        self._signature: tuple[int, int] | None = None
        self.layout: ChargeLayout | None = None
        self._handles: list[Any] = []
        self._pre: tuple[Tensor, Tensor | None, dict[str, bool]] | None = None
        self._acc_rows: Tensor | None = None  # the accumulators, per group (read them through _acc)
        self._held_pending = False  # the held state has a step the last-value rows do not show yet
        self._held_cache: dict[str, Tensor] | None = None  # _derived of the held state
        self._started = False
        self._bad_warned = False
        self._coef_cache: tuple[Any, dict[str, Tensor]] | None = None
        self._shares: tuple[Any, Tensor] | None = None  # _setting_shares
        self._pre_linear: tuple[Tensor, Tensor | None] | None = None
        # θ_{t+1}-quantities of the last tracked step (Q, P, T, S) and the storages/versions they
        # were read from: the next pre-hook reuses them while nothing touched those tensors
        self._carry: _Carry | None = None
        self._rows: dict[str, Tensor] = {}  # the products one hook read in its fused batch (_read)
        self._theory_cache: _TheoryLayout | None = None
        self._dyn: dict[str, Tensor] = {}
        #: where the dashboard goes (layout, text panel, histograms): the writer itself when it is a
        #: SummaryWriter; the Lightning callback adds its loggers' experiments
        self.dashboards: list[Dashboard] = [Dashboard(writer)] if Dashboard.supports(writer) else []
        self.histogram_bins = 30
        if symmetries is None and example_input is not None:
            symmetries = find_symmetries(model, example_input)
        if symmetries is not None:
            self.set_symmetries(symmetries)
        self.attach()

    # ------------------------------------------------------------------ set-up
    def set_symmetries(self, symmetries: SymmetryReport | Sequence[SymmetryGroup], *, quiet: bool = False) -> None:
        """Track these groups from the next step on.

        Groups on parameters this optimizer does not update are left out, with a note. Groups
        tracked before keep their accumulated values (re-detection after parameters were added).

        Args:
            symmetries: the groups.
            quiet: do not log a warning when no group is left.
        """
        report = symmetries if isinstance(symmetries, SymmetryReport) else SymmetryReport(groups=list(symmetries))
        report = report.select(self.include, self.exclude)
        named = dict(self.model.named_parameters())
        in_opt = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        groups = []
        sharded = {n for n, p in named.items() if _is_sharded(p)}
        left_out = 0
        partial: set[str] = set()
        for g in report.groups:
            if not all(m.param in named and id(named[m.param]) in in_opt for m in g.members):
                report.notes.append(f"{g.key}: not every parameter is updated by this optimizer; left out")
            elif any(m.param in sharded for m in g.members):
                local = _shard_group(g, named)
                if local is None:
                    left_out += 1
                    report.notes.append(f"{g.key}: sharded parameters (FSDP) other than dim-0 shards, or mixed with "
                                        "unsharded ones; left out")
                else:
                    groups.append(local[0])
                    if local[1]:
                        partial.add(g.key)
                        report.notes.append(f"{g.key}: its neurons span the shards (FSDP): charges, predictions, "
                                            "laws and per-shard residuals only")
            else:
                groups.append(g)
        if left_out and not self._sharded_warned:
            warnings.warn(f"NoetherTracker: {left_out} group(s) over sharded parameters (FSDP) are not tracked: "
                          "only FSDP2 dim-0 shards are (see the report's notes). Use DDP to monitor them.",
                          stacklevel=2)
            self._sharded_warned = True
        self._partial_keys = partial
        self._sharded = any(m.param in sharded for g in groups for m in g.members)
        if self._sharded and self.auto is not None:
            raise ValueError("sample_every='auto' times each rank on its own clock, but ranks that hold shards "
                             "of one layer must track the same steps: give a fixed sample_every with FSDP")
        self._process_group = next((_local_mesh_group(named[m.param]) for g in groups for m in g.members
                                    if m.param in sharded), None)
        report = dataclasses.replace(report, groups=groups)
        self.report = report
        self._signature = self.parameter_signature()
        self._params = {n: named[n] for n in {m.param for g in groups for m in g.members}}
        self._hyper_cache = None  # (its answer is per tracked tensor)
        if not groups:
            self.layout = None
            if not quiet:
                log.warning("NoetherTracker: no symmetry group to track on %s; training goes on unmonitored.",
                            type(self.model).__name__)
            return
        old_keys = [g.key for g in self.groups]
        old_acc = self._acc  # the last values written in, while the old layout is there to write them
        device = _local(next(iter(self._params.values()))).device
        self.layout = ChargeLayout(groups, {n: _local(p).shape for n, p in self._params.items()}, device,
                                   float64_accumulation=self.float64_accumulation)
        self._params = {n: named[n] for n in self.layout.params}
        self._hyper_cache = None  # (its answer is per tracked tensor)
        u = torch.tensor([theory.unit_roundoff(p.dtype) for p in self._params.values()], dtype=torch.float64)
        # the unit roundoff of each reduction's tensor: one number (0-dim) where every tensor has one dtype
        self._unit_r = u[0].to(device) if bool((u == u[0]).all()) else (
            u.to(device).index_select(0, self.layout.param_of_reduction))
        acc = torch.zeros(_N_ROWS, len(groups), dtype=torch.float64, device=device)
        self._step_rows = torch.tensor(_STEP_UPDATE, device=device)
        self._last_rows = torch.tensor(_LAST_UPDATE, device=device)
        self._extreme_rows = torch.tensor(_EXTREMES, device=device)
        self._bad_row, self._one_row = torch.tensor([_BAD], device=device), acc.new_ones(1, len(groups))
        kept = [(i, old_keys.index(g.key)) for i, g in enumerate(groups) if g.key in old_keys]
        if old_acc is not None and kept:
            new_i, old_i = (torch.tensor(v, device=device) for v in zip(*kept))
            acc[:, new_i] = old_acc.to(device)[:, old_i]
        self._acc = acc
        self._started = bool(kept) and self._started
        self._coef_cache = None
        self._pre = None
        self._carry = None
        for d in self.dashboards:
            d.expect(self)
            d.write_symmetries(report, self.step)

    def parameter_signature(self) -> tuple[int, int]:
        """(param groups, trainable parameters) of the optimizer.

        It changes when a fine-tuning run unfreezes layers or adds a param group, which calls for
        reading the symmetries again.
        """
        groups = self.optimizer.param_groups
        return len(groups), sum(1 for g in groups for p in g["params"] if p.requires_grad)

    @property
    def needs_symmetries(self) -> bool:
        """True before groups are set and after the optimizer's parameters changed."""
        return self.report is None or self._signature != self.parameter_signature()

    def attach(self) -> NoetherTracker:
        """Register the optimizer step hooks (done by the constructor)."""
        if not self._handles:
            self._handles = [
                self.optimizer.register_step_pre_hook(self._pre_hook),
                self.optimizer.register_step_post_hook(self._post_hook),
            ]
        return self

    def detach(self) -> None:
        """Remove the hooks; the tracker keeps its values."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> NoetherTracker:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def groups(self) -> list[SymmetryGroup]:
        """The tracked groups, in layout order."""
        return [] if self.layout is None else self.layout.groups

    # ------------------------------------------------------------------ per-step coefficients
    def _hypers(self) -> dict[str, Hyper]:
        """Each tracked tensor's hyperparameters now (the same dict, and objects, while they do not change)."""
        groups = self.optimizer.param_groups
        hyp = tuple(self.opt_model.hyper(g) for g in groups)
        members = tuple(tuple(map(id, g["params"])) for g in groups)
        cached = self._hyper_cache
        if cached is not None and cached[0] == hyp and cached[1] == members:
            return cached[2]
        pg_of = {p: i for i, ids in enumerate(members) for p in ids}
        out = {n: hyp[pg_of[id(p)]] for n, p in self._params.items()}
        self._hyper_cache = (hyp, members, out, {h.family for h in out.values()})
        return out

    def _families(self) -> set[str]:
        """The optimizer families of the tracked tensors (of :meth:`_hypers`' last answer)."""
        assert self._hyper_cache is not None
        return self._hyper_cache[3]

    def _coefficients(self, hyp: Mapping[str, Hyper], first: Mapping[str, bool],
                      active: Mapping[str, bool]) -> dict[str, Any]:
        """Per-reduction float64 vectors of every hyperparameter-derived coefficient.

        η, λ, β, c_t, the sign of ``maximize``, the NLD propagators, the equilibrium coefficients:
        computed on the host once per distinct (hyperparameters, first step, active) combination
        and cached while nothing changes (one host-to-device copy when something does). Where every
        tensor has one combination the step's coefficients are one 0-dim number each: they
        broadcast, and a term made of them alone is expanded to its row in :meth:`_to_neurons`.
        """
        assert self.layout is not None
        key = tuple((hyp[n], first[n], active[n]) for n in self._params)
        if self._coef_cache is not None and self._coef_cache[0] == key:
            return self._coef_cache[1]
        combos = list(dict.fromkeys(key))
        table = _coefficient_table(combos)  # (F, H)
        which = [combos.index(k) for k in key]  # each parameter's column
        per_param = host_to_device(table.index_select(1, torch.tensor(which)).contiguous(), self.layout.device)
        # kept per reduction: what the step identities read (the sign only under `maximize`, the
        # family only when several mix, decay and metric only for adaptive rules); the rest is
        # needed per group neuron only, mapped there straight from the parameters
        families = {h.family for h, _, _ in combos}
        names = [n for n in _STEP_ROWS if not (
            (n == "sign" and not any(h.maximize for h, _, _ in combos))
            or (n == "family" and len(families) == 1)
            or (n in ("decay", "metric") and "adam" not in families))]
        kept = torch.stack([per_param[_STEP_ROWS.index(n)] for n in names])  # (views: no index copied to the device)
        if len(combos) == 1:
            # one combination for every tensor: each coefficient is one number (a 0-dim tensor that
            # broadcasts; no per-reduction copy, 0.66 MB on the wide MLP's 20,480 reductions)
            rows = kept[:, 0]
        else:
            rows = kept.index_select(1, self.layout.param_of_reduction)
        coef: dict[str, Any] = dict(zip(names, rows))
        coef["groups"] = self._group_coefficients(table, which)
        self._coef_cache = (key, coef)
        return coef

    def _theory(self) -> _TheoryLayout:
        """Per-neuron facts of the current layout; (re)creates the per-neuron state of the laws.

        The state holds the continuous laws and the equilibrium averages; groups kept across a
        re-detection keep theirs.
        """
        lay = self.layout
        assert lay is not None
        old = self._theory_cache
        if old is not None and old.layout is lay:
            return old
        info = _TheoryLayout.build(lay, {n: _local(p) for n, p in self._params.items()}, self._partial_keys)
        keys = _STATE_KEYS + tuple(k for k in _ADAPTIVE_KEYS if k in self._dyn)
        self._dyn_rows = torch.zeros(len(keys), lay.n_neurons, dtype=torch.float64, device=lay.device)
        dyn = dict(zip(keys, self._dyn_rows))  # views: one masked write updates every row
        for k in _ADAPTIVE_KEYS:
            if k in dyn:
                dyn[k].fill_(torch.nan)
        if old is not None and self._dyn:
            where = {k: (o, g.n_neurons) for k, o, g in zip(old.keys, old.layout.group_offsets, old.layout.groups)}
            for k, o, g in zip(info.keys, lay.group_offsets, lay.groups):
                if k in where and where[k][1] == g.n_neurons:
                    oo = where[k][0]
                    for name, v in dyn.items():
                        v[o : o + g.n_neurons] = self._dyn[name][oo : oo + g.n_neurons].to(lay.device)
        self._dyn = dyn
        self._theory_cache = info
        self._held_cache = None
        return info

    def _add_state_rows(self, keys: AbstractSet[str]) -> None:
        """Rows for more held quantities (an adaptive rule's): NaN (absent) until a valid step."""
        rows = torch.cat([self._dyn_rows, self._dyn_rows.new_full((len(keys), self._dyn_rows.shape[1]), torch.nan)])
        self._dyn_rows = rows
        self._dyn = dict(zip([*self._dyn, *sorted(keys)], rows))
        self._held_cache = None

    def _linear_sums(self, theta: Mapping[str, Tensor], bufs: Mapping[str, Tensor | None],
                     T: Tensor | None = None) -> tuple[Tensor, Tensor | None] | None:
        """Sums of the linear charges: T = red(θ) (unless given), and S = red(v) with momentum (§2.1)."""
        info = self._theory()
        if not info.has_linear:
            return None
        assert self.layout is not None
        if T is None:
            T = self._product("T", {n: theta[n] for n in info.linear_params})
        lin_bufs = {n: bufs.get(n) for n in info.linear_params}
        S = self._product("S", lin_bufs) if any(b is not None for b in lin_bufs.values()) else None
        return T, S

    # ------------------------------------------------------------------ hooks
    def _sampled(self, step: int) -> bool:
        if self.auto is not None:
            return step >= self.auto.next
        return self.sample_every == 1 or step % self.sample_every == 0  # type: ignore[operator]

    def _state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Tensor | None]]:
        """θ and the momentum buffers v (``None`` where there is none) of the tracked tensors."""
        if self._sharded:
            theta = {n: _local(p).detach() for n, p in self._params.items()}
            bufs = {n: _local(self.opt_model.momentum_buffer(optimizer, p)) for n, p in self._params.items()}
            return theta, bufs if self.opt_model.supported else {}
        theta = dict(self._params)  # the parameters themselves: the hooks run under no_grad
        if not self.opt_model.supported:
            return theta, {}
        return theta, {n: self.opt_model.momentum_buffer(optimizer, p) for n, p in self._params.items()}

    def _grads(self) -> dict[str, Tensor | None]:
        if self._sharded:
            return {n: _local(p.grad) for n, p in self._params.items()}
        return {n: p.grad for n, p in self._params.items()}

    @staticmethod
    def _key(theta: Mapping[str, Tensor], bufs: Mapping[str, Tensor | None]) -> tuple[Any, ...]:
        # storage address and version counter: any in-place change (optimizer, user, a buffer reset)
        # bumps the version or swaps the tensor; writes through `.data` are not seen
        return tuple(None if t is None else (t.data_ptr(), t._version) for t in (*theta.values(), *bufs.values()))

    def _fused_pairs(self, theta: Mapping[str, Tensor], bufs: Mapping[str, Tensor | None],
                     grads: Mapping[str, Tensor | None] | None, optimizer: torch.optim.Optimizer, *,
                     carry: bool = False) -> dict[str, tuple[Any, Any]]:
        """The products and linear sums the coming hook will ask for (``grads`` None: the pre-hook's).

        Named as :meth:`_product` asks for them: ``θθ`` = B(θ, θ), ``θg``, ``θv``, ``vg``, ``vv``,
        ``gg`` (Adam: ``θu`` and ``uu`` of its update u instead, see :meth:`_adam_direction`), and
        the linear charges' sums ``T`` (of θ), ``Sg`` (of g), ``S`` (of v). With
        ``carry`` also B(θ, v) and S, for the next step. They are evaluated in one fused batch
        (:meth:`ChargeLayout.reduce_many`); a product missing here is still computed when asked for.
        """
        pairs: dict[str, tuple[Any, Any]] = {"θθ": (theta, theta)}
        supported = self.opt_model.supported
        momentum = supported and any(b is not None for b in bufs.values())
        pre = grads is None
        if supported and pre and momentum:
            pairs["θv"] = (theta, bufs)
        elif supported and grads is not None and self.opt_model.rule in ("adam", "rmsprop"):
            # an adaptive rule's identities read its update u: Adam's formed inside this read (on
            # the CPU kernel; elsewhere _terms makes it)
            direction = self._adam_direction(optimizer, self._hypers(), grads)
            if direction is not None:
                pairs.update({"θu": (theta, direction), "uu": (direction, direction)})
        elif supported and grads is not None:
            pairs["θg"] = (theta, grads)
            nesterov = any(g.get("nesterov", False) for g in optimizer.param_groups)
            if momentum:
                pairs.update(vg=(bufs, grads), vv=(bufs, bufs))
                if nesterov or carry:
                    pairs["θv"] = (theta, bufs)
            if nesterov or not momentum:
                pairs["gg"] = (grads, grads)
        info = self._theory()
        if info.has_linear:  # the linear charges' sums T, ⟨c, g⟩ and S join the batch
            def lin(d: Mapping[str, Tensor | None]) -> Restricted:
                return Restricted(d, info.linear_params)  # the same tensors: read with d's products

            pairs["T"] = (lin(theta), None)
            if supported and grads is not None:
                pairs["Sg"] = (lin(grads), None)
            if momentum and (pre or carry):
                pairs["S"] = (lin(bufs), None)
        return pairs

    def _read(self, pairs: Mapping[str, tuple[Any, Any]]) -> None:
        """Evaluate the hook's products in one fused batch; :meth:`_product` serves them until the hook ends."""
        assert self.layout is not None
        self._rows = dict(zip(pairs, self.layout.reduce_many(list(pairs.values()))))

    def _product(self, name: str, X: Mapping[str, Tensor | None],
                 Y: Mapping[str, Tensor | None] | None = None) -> Tensor:
        """The hook's row ``name`` (see :meth:`_fused_pairs`): read with the others, else now from ``X`` and ``Y``.

        Inside one hook nothing changes the tensors between the fused read and this call.
        """
        row = self._rows.get(name)
        if row is not None:
            return row
        assert self.layout is not None
        return self.layout.reduce(X, Y)

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._may_nest and _nested_step(optimizer):
            return
        if self.layout is None or not self._sampled(self.step + 1):
            return  # an unsampled step (sample_every) reads nothing
        t = self.auto.clock() if self.auto is not None else 0.0
        with _GradOff():
            self._pre_tracked(optimizer)
        if self.auto is not None:
            self.auto.spent(t)

    def _pre_tracked(self, optimizer: torch.optim.Optimizer) -> None:
        assert self.layout is not None
        theta, bufs = self._state(optimizer)
        carry, self._carry = self._carry, None
        if carry is not None and carry.step == self.step and carry.key == self._key(theta, bufs):
            # θ_t and v_t are what the last post-step read: its sums are this step's (no reads)
            self._pre = (carry.Q, carry.P, {n: b is None for n, b in bufs.items()})
            self._pre_linear = carry.linear
            return
        self._read(self._fused_pairs(theta, bufs, None, optimizer))
        try:
            self._pre_step(theta, bufs)
        finally:
            self._rows = {}

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._may_nest and _nested_step(optimizer):
            return
        auto = self.auto
        t = auto.clock() if auto is not None else 0.0
        if self.layout is not None and self._pre is None and not self._sampled(self.step + 1):
            self.step += 1  # unsampled: counted; a log step writes the last sampled values
            self._since += 1
            if self.schedule(self.step):
                with _GradOff():
                    self.flush()
            if auto is not None:
                auto.step_end(self.step, False, auto.spent(t))
            return
        tracked = self._pre is not None
        with _GradOff():
            self._post_tracked(optimizer)
        if auto is not None:
            plans, self._plans = self._plans, 0 if self.layout is None else self.layout.n_plans
            auto.step_end(self.step, tracked, auto.spent(t), one_time=self._plans != plans)

    def _post_tracked(self, optimizer: torch.optim.Optimizer) -> None:
        if self.layout is None or self._pre is None:
            self._post_step(optimizer)
            return
        # the optimizer steps since the last tracked one, this one included (counted by the hooks:
        # a step a GradScaler skipped is not one)
        self._span = self._since + 1 if self._tracked_before else 1
        self._tracked_before, self._since = True, 0
        theta, bufs = self._state(optimizer)
        grads = self._grads()
        # the last record goes before this step's products: it is this step's from here on
        self._last_step = self._last_record = self._held_cache = None
        # the next step is tracked: keep this one's θ-sums
        carry = self.auto.k == 1 if self.auto is not None else self._sampled(self.step + 2)
        self._read(self._fused_pairs(theta, bufs, grads, optimizer, carry=carry))
        try:
            self._post_step(optimizer, theta, bufs, grads, carry=carry)
        finally:
            self._rows = {}

    def _pre_step(self, theta: Mapping[str, Tensor], bufs: Mapping[str, Tensor | None]) -> None:
        assert self.layout is not None
        Q0 = self._product("θθ", theta, theta)
        P0 = self._product("θv", theta, bufs) if any(b is not None for b in bufs.values()) else None
        first = {n: b is None for n, b in bufs.items()} if self.opt_model.supported else {}
        self._pre = (Q0, P0, first)
        self._pre_linear = self._linear_sums(theta, bufs)

    def _post_step(self, optimizer: torch.optim.Optimizer, theta: Mapping[str, Tensor] | None = None,
                   bufs: Mapping[str, Tensor | None] | None = None, grads: Mapping[str, Tensor | None] | None = None,
                   *, carry: bool = False) -> None:
        if self.layout is None or self._pre is None or theta is None or bufs is None or grads is None:
            # no groups yet, or they were set inside this step (Lightning's first closure): the
            # step is counted, tracking starts with the next one
            self.step += 1
            return
        Q0, P0, first = self._pre
        self._pre = None
        Q1 = self._product("θθ", theta, theta)
        compiled = (self._compiled_terms(optimizer, Q0, Q1, P0, first, theta, grads, bufs)
                    if self.opt_model.supported else None)
        if compiled is not None:
            mapped, T1 = compiled
        else:
            terms = self._terms(optimizer, Q0, Q1, P0, first, theta, grads, bufs) if self.opt_model.supported else None
            T1 = terms.T1 if terms is not None else None
            mapped = self._to_neurons(Q0, Q1, terms)
            del terms  # on the neurons now: the per-reduction rows go before the per-neuron work
        if carry:
            self._carry = self._carried(theta, bufs, Q1, T1)
        del Q1, T1  # what the step's products give is on the neurons or carried: they go too
        self._rows = {}
        self._accumulate(mapped)
        self.step += 1
        if self.schedule(self.step):
            self.flush()

    def _carried(self, theta: Mapping[str, Tensor], bufs: Mapping[str, Tensor | None], Q1: Tensor,
                 T1: Tensor | None) -> _Carry:
        """What the next pre-step would read of θ_{t+1} and v_{t+1}: B(θ, θ), B(θ, v), the linear sums."""
        assert self.layout is not None
        P1 = self._product("θv", theta, bufs) if any(b is not None for b in bufs.values()) else None
        linear = self._linear_sums(theta, bufs, T1)
        # one copy of the carried rows: a view would keep every product of the step alive
        rows = [Q1, P1, *(linear if linear is not None else (None, None))]
        kept = iter(torch.stack([r for r in rows if r is not None]).unbind())
        Qc, Pc, Tc, Sc = (None if r is None else next(kept) for r in rows)
        assert Qc is not None
        return _Carry(self.step + 1, self._key(theta, bufs), Qc, Pc, None if Tc is None else (Tc, Sc))

    def _terms(self, optimizer: torch.optim.Optimizer, Q0: Tensor, Q1: Tensor, P0: Tensor | None,
               first: Mapping[str, bool], theta: Mapping[str, Tensor], grads: Mapping[str, Tensor | None],
               state_bufs: Mapping[str, Tensor | None]) -> _Step:
        """Every exact identity of physics.md §2.1 for this step, per reduction neuron.

        One batched evaluation per optimizer family present, merged per tensor.
        """
        lay = self.layout
        assert lay is not None
        info = self._theory()
        hyp = self._hypers()
        active = {n: g is not None for n, g in grads.items()}
        coef = self._coefficients(hyp, first, active)
        families = self._families()
        lr, fam = coef["lr"], coef.get("family")

        def signed(t: Tensor) -> Tensor:  # g → −g on tensors of a `maximize` group
            return coef["sign"] * t if "sign" in coef else t

        zeros = torch.zeros_like(Q0)
        bufs = state_bufs if families & {"heavy_ball", "nesterov", "sgdw"} else {}
        adaptive = None
        update: Mapping[str, Tensor | None] = {}
        formed = "uu" in self._rows  # Adam's u formed inside the fused read (_fused_pairs): B(θ, u), B(u, u)
        if formed:  # u as tensors only for the linear charges' sums
            linear = {n: self._params[n] for n in info.linear_params}
            adaptive = adaptive_tensors(optimizer, linear, hyp, grads)
        elif "adam" in families:
            # the optimizer's own tensors: DTensors when sharded (their updates are made local below)
            dgrads = {n: p.grad for n, p in self._params.items()} if self._sharded else grads
            adaptive = adaptive_tensors(optimizer, self._params, hyp, dgrads)
            if self._sharded:
                def local(d: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
                    return {n: _local(t) for n, t in d.items()}

                a = adaptive
                adaptive = dataclasses.replace(a, update=local(a.update),
                                               metric=None if a.metric is None else local(a.metric),
                                               drive=None if a.drive is None else local(a.drive))
            update = adaptive.update
        quad: dict[str, theory.StepTerms] = {}
        G = K = UU = None
        metric = None
        if info.has_quadratic:
            P = P0 if P0 is not None else zeros
            if families - {"adam"}:
                # the sign of `maximize` enters every product with g (per tensor)
                X = signed(self._product("θg", theta, grads))
                if families & {"sgd", "nesterov"}:
                    G = gg = self._product("gg", grads, grads)
                if bufs:
                    Y, vv = signed(self._product("vg", bufs, grads)), self._product("vv", bufs, bufs)
                    K = vv
                kw = dict(Q0=Q0, Q1=Q1, lr=lr, wd=coef["wd"])
                if "sgd" in families:
                    quad["sgd"] = theory.sgd_step(X=X, G=gg, **kw)
                if "heavy_ball" in families:
                    quad["heavy_ball"] = theory.heavy_ball_step(P0=P, X=X, Y=Y, K=vv, momentum=coef["momentum"],
                                                                c=coef["c"], **kw)
                if "nesterov" in families:
                    Z = self._product("θv", theta, bufs)
                    quad["nesterov"] = theory.nesterov_step(P0=P, X=X, G=gg, Y=Y, K=vv, Z=Z,
                                                            momentum=coef["momentum"], c=coef["c"], **kw)
                if "sgdw" in families:
                    quad["sgdw"] = theory.sgdw_step(P0=P, X=X, Y=Y, K=vv, momentum=coef["momentum"], **kw)
            if adaptive is not None:
                if formed:
                    U, UU = self._rows["θu"], self._rows["uu"]
                else:
                    U, UU = lay.reduce_many([(theta, update), (update, update)])
                quad["adam"] = theory.adaptive_step(Q0=Q0, Q1=Q1, U=U, UU=UU, lr=lr, decay=coef["decay"])
                if adaptive.metric is not None and adaptive.drive is not None:
                    gtheta = {n: None if m is None else m * theta[n] for n, m in adaptive.metric.items()}
                    QG1 = lay.reduce(gtheta, theta)
                    _, pred = theory.metric_step(QG1=QG1, XD=lay.reduce(theta, adaptive.drive),
                                                 DU=lay.reduce(adaptive.drive, adaptive.update), Q0=Q0,
                                                 lr=lr, decay=coef["decay"], coupled_wd=coef["wd"] - coef["decay"])
                    ok = coef["metric"] > 0
                    metric = (torch.where(ok, QG1, torch.nan), torch.where(ok, pred, torch.nan))
        # §2.2 drives (per step): η²B(g, g) for SGD, 2η²B(v, v) for heavy ball; the scale-free
        # equilibrium drive of §2.4 multiplies the same B(g, g) or B(v, v) by Q.
        Gz = G if G is not None else zeros
        Kz = K if K is not None else zeros
        if families == {"sgd"}:
            eq_drive, drive = Gz, lr * lr * Gz
        elif families == {"heavy_ball"}:
            eq_drive, drive = Kz, 2.0 * lr * lr * Kz
        elif fam is None:  # one family without a continuous law
            eq_drive = drive = zeros
        else:
            eq_drive = torch.where(fam == 0, Gz, torch.where(fam == 1, Kz, zeros))
            drive = torch.where(fam == 0, lr * lr * Gz, torch.where(fam == 1, 2.0 * lr * lr * Kz, zeros))
        lin = None
        T1 = A1 = None
        if info.has_linear:
            T1, A1, T0, S0, Sg, L1 = self._linear_inputs(hyp, theta, grads, bufs, adaptive)
            S = S0 if S0 is not None else zeros
            Sg = signed(Sg)
            kw = dict(T0=T0, T1=T1, L1=L1, lr=lr)
            lin_out: dict[str, theory.StepTerms] = {}
            if "sgd" in families:
                lin_out["sgd"] = theory.linear_sgd_step(Sg=Sg, wd=coef["wd"], **kw)
            if "heavy_ball" in families:
                lin_out["heavy_ball"] = theory.linear_heavy_ball_step(S0=S, Sg=Sg, wd=coef["wd"],
                                                                      momentum=coef["momentum"], c=coef["c"], **kw)
            if "nesterov" in families:
                lin_out["nesterov"] = theory.linear_nesterov_step(S0=S, Sg=Sg, wd=coef["wd"],
                                                                  momentum=coef["momentum"], c=coef["c"], **kw)
            if "sgdw" in families:
                lin_out["sgdw"] = theory.linear_sgdw_step(S0=S, Sg=Sg, wd=coef["wd"], momentum=coef["momentum"], **kw)
            if adaptive is not None:
                Su = lay.reduce({n: adaptive.update[n] for n in info.linear_params})
                lin_out["adam"] = theory.linear_adaptive_step(Su=Su, decay=coef["decay"], **kw)
            lin = _merge(lin_out, fam)
        return _Step(quad=_merge(quad, fam) if quad else None, linear=lin, T1=T1, abs1=A1, coef=coef, drive=drive,
                     eq_drive=eq_drive, UU=UU, metric=metric, fresh=all(first.values()) if first else True)

    def _linear_inputs(self, hyp: Mapping[str, Hyper], theta: Mapping[str, Tensor], grads: Mapping[str, Tensor | None],
                       bufs: Mapping[str, Tensor | None], adaptive: Any) -> tuple[Tensor, Tensor, Tensor, Tensor | None,
                                                                                   Tensor, Tensor]:
        """The linear charges' sums of a step: T_{t+1}, Σ|θ|, T_t, S_t (None before a buffer), ⟨c, g⟩ and Σ|u|."""
        lay, info = self.layout, self._theory()
        assert lay is not None
        lt = {n: theta[n] for n in info.linear_params}
        T1 = self._product("T", lt)
        A1 = lay.reduce(_abs(lt))
        T0, S0 = self._pre_linear if self._pre_linear is not None else (T1, None)
        Sg = self._product("Sg", {n: grads[n] for n in info.linear_params})
        steps = {n: _update_direction(hyp[n], theta[n], grads[n], bufs.get(n),
                                      None if adaptive is None else adaptive.update.get(n))
                 for n in info.linear_params}
        return T1, A1, T0, S0, Sg, lay.reduce(_abs(steps))

    def _compiled_terms(self, optimizer: torch.optim.Optimizer, Q0: Tensor, Q1: Tensor, P0: Tensor | None,
                        first: Mapping[str, bool], theta: Mapping[str, Tensor], grads: Mapping[str, Tensor | None],
                        state_bufs: Mapping[str, Tensor | None]) -> tuple[_Mapped, Tensor | None] | None:
        """:meth:`_terms` and :meth:`_to_neurons` in one call of the compiled kernel (``nld_terms``).

        For the heavy-ball family of rules (SGD, heavy ball, Nesterov, SGDW), and for Adam(W) where
        its update's sums were formed in the read (no metric identity), on float64 CPU rows with
        the kernel loaded; ``None`` elsewhere. The same bits as the torch ops and maps; the
        per-reduction rows are never stored. Returns the mapped rows and T_{t+1} (the linear
        charges' sums, or None).
        """
        lay, info = self.layout, self._theory()
        if lay is None or not lay.compiled or self._sharded or Q0.dtype is not torch.float64 or not Q0.is_cpu:
            return None
        hyp = self._hypers()
        families = self._families()
        adaptive = families == {"adam"}
        if not families <= _TERMS_FAMILIES.keys() or (adaptive and "uu" not in self._rows) or (
                "adam" in families and not adaptive):
            return None
        coef = self._coefficients(hyp, first, {n: g is not None for n, g in grads.items()})
        bufs = state_bufs if families & {"heavy_ball", "nesterov", "sgdw"} else {}
        rows: dict[str, Tensor | None] = dict(Q0=Q0, Q1=Q1, UNIT=self._unit_r, LR=coef["lr"], WD=coef["wd"],
                                              MOM=coef["momentum"], C=coef["c"], SIGN=coef.get("sign"),
                                              FAM=coef.get("family"))
        if info.has_quadratic and adaptive:  # Adam's u, formed in the read (_fused_pairs)
            rows.update(U=self._rows["θu"], UU=self._rows["uu"], DECAY=coef["decay"])
        elif info.has_quadratic:
            rows.update(P0=P0, X=self._product("θg", theta, grads))
            if families & {"sgd", "nesterov"}:
                rows["G"] = self._product("gg", grads, grads)
            if bufs:
                rows.update(Y=self._product("vg", bufs, grads), K=self._product("vv", bufs, bufs))
            if "nesterov" in families:
                rows["Z"] = self._product("θv", theta, bufs)
        T1 = None
        if info.has_linear:
            # (an adaptive rule's u as tensors, on the linear charges' tensors only, as _terms makes it)
            upd = adaptive_tensors(optimizer, {n: self._params[n] for n in info.linear_params}, hyp, grads) \
                if adaptive else None
            T1, A1, T0, S0, Sg, L1 = self._linear_inputs(hyp, theta, grads, bufs, upd)
            if upd is not None:  # the force ⟨c, u⟩ in place of ⟨c, g⟩
                Sg = lay.reduce({n: upd.update[n] for n in info.linear_params})
            rows.update(T0=T0, T1=T1, S0=S0, SG=Sg, L1=L1, A1=A1, DECAY=coef["decay"] if adaptive else None)
        quad, lin = int(info.has_quadratic), int(info.has_linear)
        parts = quad + lin
        n = lay.n_reductions
        inputs = [rows.get(k) for k in _TERMS_INPUTS]
        assert len(inputs) == _kernel.TERMS_INPUTS
        if not all(t is None or (t.dtype is torch.float64 and t.is_cpu and t.numel() in (1, n) and t.is_contiguous())
                   for t in inputs):
            return None  # (rows the kernel cannot read where they are: the torch ops take the step)
        self._pre_linear = None
        # (several families: each reduction's from its row, as _merge takes it)
        uu = int(adaptive and info.has_quadratic)  # B(u, u) mapped too, for the radial share (_accumulate)
        flags = (quad, lin, _TERMS_FAMILIES[next(iter(families))] if len(families) == 1 else -1, uu)
        signed = torch.empty(2 + 2 * lin + 4 * parts + 2 + uu, lay.n_neurons, dtype=torch.float64)
        unsigned = torch.empty(3 * parts + 1 + lin, lay.n_neurons, dtype=torch.float64)
        runs, sign, usign = lay.map_runs()
        lay.kernel.nld_terms(lay.n_neurons, (ctypes.c_int64 * 4)(*flags),
                             (ctypes.c_int64 * len(inputs))(*(0 if t is None else t.data_ptr() for t in inputs)),
                             (ctypes.c_int64 * len(inputs))(*(0 if t is None or t.numel() == 1 else 1 for t in inputs)),
                             len(runs), runs.data_ptr(), sign.data_ptr(), usign.data_ptr(), signed.data_ptr(),
                             unsigned.data_ptr())
        mapped = _Mapped(signed, unsigned, parts=parts, quad=bool(quad), UU=bool(uu), metric=False, abs1=bool(lin),
                         coef=coef["groups"], fresh=all(first.values()) if first else True)
        return mapped, T1

    def _adam_direction(self, optimizer: torch.optim.Optimizer, hyp: Mapping[str, Hyper],
                        grads: Mapping[str, Tensor | None]) -> AdamDirection | None:
        """Adam's u of every stepped tensor, for the compiled kernel to form as it reads m and v.

        ``None`` where the tensors are made instead (:func:`~nld_callbacks.optim.adaptive_tensors`):
        off the CPU kernel, under sharding, for RMSprop, or where the metric identity needs G and d
        (β1 = 0). The bias corrections are those of ``adaptive_tensors``: the same torch ops on
        the step counts, per param group, nothing read on the host.
        """
        lay = self.layout
        if lay is None or not lay.compiled or self._sharded or any(
                h.rule != "adam" or h.metric for h in hyp.values()):
            return None
        m: dict[str, Tensor] = {}
        v: dict[str, Tensor] = {}
        scalars: dict[str, tuple[Tensor, Tensor, float]] = {}
        for h, names in stepped_batches(optimizer, self._params, hyp, grads).items():
            states = [optimizer.state[self._params[n]] for n in names]
            for n, st, b1, b2 in zip(names, states, *adam_bias_corrections(states, h)):
                m[n], v[n] = st["exp_avg"], st["max_exp_avg_sq" if h.amsgrad else "exp_avg_sq"]
                scalars[n] = (b1, b2, h.eps)
        return AdamDirection(m, v, scalars)

    def _group_coefficients(self, table: Tensor, which: Sequence[int]) -> dict[str, Tensor]:
        """Group-neuron means of the per-parameter coefficients (once per coefficient change).

        ``table``: the host's coefficient table, one column per setting (:func:`_coefficient_table`,
        ending in the 6 + 6 propagator rows of quadratic and linear charges); ``which``: each
        parameter's column. A neuron's mean is Σ_h w_h c_h over the settings h of its reductions,
        with the shares w_h of :meth:`_setting_shares` (made once per assignment of settings to
        parameters, so an lr schedule's every step costs a few operations). With one setting each
        mean is that setting's value: the rates are 0-dim and nothing is mapped.
        """
        lay, info = self.layout, self._theory()
        assert lay is not None
        names = ("adaptive", "eff_factor", "eq_numel", "relax", "eq_coef", "eq_angle", "rms_decay")
        rows = [_COEF_ROWS.index(n) for n in names] + list(range(len(_COEF_ROWS), len(table)))
        cols = host_to_device(table.index_select(0, torch.tensor(rows)), lay.device)
        k = len(names)
        if cols.shape[1] == 1 and info.owned is None:  # (another rank's neurons take no reduction: NaN)
            col = cols[:, 0]
            g = dict(zip(names, col))
            per_neuron = col[:, None]  # broadcasts over the neurons
        else:
            shares = self._setting_shares(which, cols.shape[1])
            # a setting's NaN (no law for its rule) reaches only the neurons it has a share in
            per_neuron = torch.where(shares[0] > 0, cols[:, :1] * shares[0], 0.0)
            for c, w in zip(cols.T[1:], shares[1:]):
                per_neuron += torch.where(w > 0, c[:, None] * w, 0.0)
            if info.owned is not None:
                per_neuron = torch.where(info.count > 0, per_neuron, torch.nan)
            g = dict(zip(names, per_neuron))
        rms_decay = torch.where(info.scale, g["rms_decay"], torch.nan)
        # per-group means of the constants (equilibrium angle, relaxation time, RMSProp decay)
        const = torch.stack(torch.broadcast_tensors(g["eq_angle"], g["relax"], rms_decay))
        if info.owned is not None:
            const = torch.where(info.owned, const, torch.nan)
        # kept per neuron while the coefficients hold: only what every step reads
        rates = torch.stack([g["eff_factor"], 1.0 / g["relax"].clamp_min(1.0), g["eq_coef"]])
        prop = torch.where(info.linear, per_neuron[k + 6 : k + 12], per_neuron[k : k + 6])
        flags = torch.stack(torch.broadcast_tensors(g["adaptive"] > 0.5, torch.isfinite(rms_decay)))
        eq_numel = g["eq_numel"] > 0.5
        del g, per_neuron, rms_decay  # the all-rows table goes before the means (the first step's peak)
        # (the held rows' values per neuron: one number expanded, made once here rather than every step)
        eff_factor, eq_coef = (r.expand(lay.n_neurons) for r in (rates[0], rates[2]))
        means = self._finite_mean(const)
        return {"adaptive": flags[0], "eq_numel": eq_numel, "flags": flags.to(torch.float64),
                "eff_factor": eff_factor, "alpha": rates[1], "eq_coef": eq_coef, "prop": prop,
                "means": means, "means_rows": torch.cat(means)}

    def _setting_shares(self, which: Sequence[int], n_settings: int) -> Tensor:
        """(settings, group neurons): the share of each neuron's reductions on tensors of each setting.

        Kept while the same parameters share a setting (an lr schedule changes the settings'
        values, not which parameters share one).
        """
        lay, info = self.layout, self._theory()
        assert lay is not None
        key = (lay, tuple(which))
        if self._shares is None or self._shares[0] != key:
            onehot = torch.tensor([[float(h == i) for h in which] for i in range(n_settings)], dtype=torch.float64)
            self._shares = (key, lay.params_to_groups(host_to_device(onehot, lay.device)) / info.count)
        return self._shares[1]

    def _no_means(self) -> tuple[Tensor, Tensor]:
        """The constant means' rows when nothing is predicted: absent, over no neuron."""
        acc = self._acc_rows
        assert acc is not None
        n = acc.shape[1]
        return acc.new_full((3, n), float("nan")), acc.new_zeros(3, n)

    def _to_neurons(self, Q0: Tensor, Q1: Tensor, terms: _Step | None) -> _Mapped:
        """Every per-reduction quantity of the step on the group neurons, in two batched maps."""
        lay = self.layout
        assert lay is not None
        info = self._theory()
        lin_pre, self._pre_linear = self._pre_linear, None
        signed: list[Tensor] = [Q0, Q1]
        unsigned: list[Tensor] = []
        if info.has_linear:  # linear charges T = ⟨c, θ⟩ replace the quadratic sums on their neurons
            if terms is not None and terms.T1 is not None:
                T1 = terms.T1
            else:
                T1 = self._product("T", {n: _local(p).detach() for n, p in self._params.items()
                                          if n in info.linear_params})
            signed += [lin_pre[0] if lin_pre is not None else T1, T1]
        parts: list[theory.StepTerms] = []
        if terms is not None:
            parts = [t for t in (terms.quad, terms.linear) if t is not None]
            for t in parts:
                signed += [t.observed, t.symmetric, t.breaking, t.force]
                unsigned += [t.coeff, t.terms, t.step_sq]
            signed += [terms.drive, terms.eq_drive]
            signed += [terms.UU] if terms.UU is not None else []
            signed += list(terms.metric) if terms.metric is not None else []
            # rounding floor u_w·M (quadratic) or u_w·Σ|θ_k| (linear), physics.md §3.2
            unsigned += [self._unit_r * Q0] + ([self._unit_r * terms.abs1] if terms.abs1 is not None else [])
        # a term made of coefficients only is one number where every tensor has one setting
        signed = [r if r.dim() else r.expand_as(Q0) for r in signed]
        unsigned = [r if r.dim() else r.expand_as(Q0) for r in unsigned]
        if terms is None:  # measured only: the charges, no identities
            return _Mapped(lay.to_groups(signed), None, parts=0, quad=False, UU=False, metric=False, abs1=False,
                           coef=None, fresh=True)
        return _Mapped(lay.to_groups(signed), lay.to_groups(unsigned, unsigned=True), parts=len(parts),
                       quad=terms.quad is not None, UU=terms.UU is not None, metric=terms.metric is not None,
                       abs1=terms.abs1 is not None, coef=terms.coef["groups"], fresh=terms.fresh)

    def _accumulate(self, m: _Mapped) -> None:
        lay, acc = self.layout, self._acc_rows
        assert lay is not None and acc is not None
        info = self._theory()
        signed, unsigned = m.take()  # the mapped rows live while a view of them is needed, no longer
        if self._compiled_step(signed, unsigned, m, info):
            return
        S = iter(signed.unbind())
        U = iter(() if unsigned is None else unsigned.unbind())
        del signed, unsigned
        cg, parts, fresh = m.coef, m.parts, m.fresh
        has_quad, has_UU, has_metric, has_abs1 = m.quad, m.UU, m.metric, m.abs1
        q0, q1 = next(S), next(S)
        if info.has_linear:
            t0, t1 = next(S), next(S)
            q0, q1 = torch.where(info.linear, t0, q0), torch.where(info.linear, t1, q1)
            del t0, t1
        else:  # copies: the record of the step keeps them, not every mapped row
            q0, q1 = torch.stack([q0, q1]).unbind()
        nan = info.nan
        if not self._started:
            acc[_START] = lay.per_group(q0)
            self._started = True
        dyn = self._dyn
        # this step's per-neuron state; a key left out keeps its row
        new: dict[str, Tensor] = {"q0": q0, "q1": q1, "on": info.ones}
        if cg is None:
            obs = q1 - q0
            sym = brk = r = b = e = torch.full_like(q0, float("nan"))  # (the step record's own)
        else:
            # quadratic and linear charges sit on disjoint neurons: each neuron takes its kind's terms
            split = [(next(S), next(S), next(S), next(S), next(U), next(U), next(U)) for _ in range(parts)]
            if len(split) == 1:
                obs, sym, brk, force, coeff, scale_terms, step_sq = split[0]
            else:
                obs, sym, brk, force, coeff, scale_terms, step_sq = (
                    torch.where(info.linear, lin, quad) for quad, lin in zip(*split))
            quad_force = split[0][3] if has_quad else nan
            drive_g, eq_drive_g = next(S), next(S)
            UU = next(S) if has_UU else None
            metric = (next(S), next(S)) if has_metric else None
            rounding = next(U)
            if has_abs1:
                rounding = torch.where(info.linear, next(U), rounding)
            del split, S, U
            # what still reads the mapped rows, first: then they can go (a few MiB on a wide model)
            radial = metric_charge = metric_pred = nan
            if UU is not None:
                radial = torch.where(cg["adaptive"] & info.scale, quad_force / (q0 * UU).clamp_min(0).sqrt(), nan)
            if metric is not None:
                metric_charge = torch.where(info.linear, nan, metric[0])
                metric_pred = torch.where(info.linear, nan, metric[1])
            drive = torch.where(info.linear, 0.0, drive_g)  # §2.2: the continuous law's drive
            # §2.4: Q*² = coefficient · EMA of the scale-free drive, averaged over one relaxation time
            X = torch.where(cg["eq_numel"], info.numel_sq, q0 * eq_drive_g)
            del quad_force, drive_g, eq_drive_g, UU, metric
            count = info.count
            # Tensors of one group with different coefficients (mixed lr/wd): only Σ s_i R_i = 0 is a
            # symmetry; the rest of Σ s_i(−k_i R_i) is a real drift and belongs to the prediction
            # (physics.md §2.1, per-tensor form). k̄ = the mean coefficient of the neuron's tensors.
            brk_sym = -(coeff / count) * force
            sym = sym + (brk - brk_sym)
            brk = brk_sym
            r, b, e = theory.residual_decomposition(obs, sym, brk, scale_terms, rounding)
            tol = scale_terms + 4.0 * rounding  # D_t per neuron (§3.2)
            # §2.2: the continuous law, one exact step of its propagator per optimizer step
            prop = cg["prop"]
            on = dyn["on"] > 0
            Qn, dQn = theory.propagate(torch.where(on, dyn["nld"], q0), torch.where(on, dyn["nld_rate"], 0.0), prop,
                                       drive)
            if self._span > 1:  # sample_every: the steps since the last sample, same drive
                Qs, dQs = theory.propagate_steps(Qn, dQn, prop, drive, self._span - 1)
                Qn, dQn = torch.where(on, Qs, Qn), torch.where(on, dQs, dQn)
            if not fresh:  # started mid-run with a filled buffer: Q'(t0) = the observed step
                Qn, dQn = torch.where(on, Qn, q1), torch.where(on, dQn, q1 - q0)
            # §2.4: the EMA of X over one relaxation time, per sampled step the weight of its span
            alpha = cg["alpha"] if self._span == 1 else 1.0 - (1.0 - cg["alpha"]) ** self._span
            # (written out: torch.lerp fuses the multiply-add on its vectorised entries only)
            ema_x = dyn["ema_x"] + alpha * (X - dyn["ema_x"])
            ema_w = dyn["ema_w"] + alpha * (1.0 - dyn["ema_w"])
            # the last-value inputs: the rates, angles and means are made of them only when read
            new.update(pred=q0 + sym, tol=tol, step_sq=step_sq, nld=Qn, nld_rate=dQn, ema_x=ema_x, ema_w=ema_w,
                       eff_factor=cg["eff_factor"], eq_coef=cg["eq_coef"], adaptive=cg["flags"][0],
                       rmsprop=cg["flags"][1])
            if has_UU:
                new["radial"] = radial
            if has_metric:
                new.update(metric_charge=metric_charge, metric_pred=metric_pred)
        # A non-finite step (NaN/inf gradient) is marked invalid and kept out of the accumulators,
        # without a host sync: the decision is a device-side mask.
        extremes = torch.stack([e, b, e]).abs()
        checked = torch.stack([obs, e]) if cg is not None else obs
        summed = torch.stack([obs, sym, brk])
        if info.owned is not None:  # another rank's neurons: neutral in every per-group statistic
            extremes = torch.where(info.owned, extremes, 0.0)
            checked = torch.where(info.owned, checked, 0.0)
            summed = torch.where(info.owned, summed, 0.0)
        ok = (checked - checked).eq(0).all()  # x − x is 0 for every finite x, NaN for ±inf and NaN
        const, const_counts = cg["means"] if cg is not None else self._no_means()
        # the rows every step writes, in one write (_STEP_UPDATE order); the last-value rows are
        # written from the held state when the accumulators are read (_write_last)
        updated = acc.index_copy(0, self._step_rows, torch.cat([
            torch.fmax(acc.index_select(0, self._extreme_rows), lay.per_group(extremes, "amax")),
            acc[_SUM_OBS : _SUM_BRK + 1] + lay.per_group(summed), const, const_counts]))
        # an invalid step leaves every row as it was, and is counted
        torch.where(ok, updated, acc.index_add(0, self._bad_row, self._one_row), out=acc)
        # ... and the held state too: the laws advance, and the last values move, on a valid step only
        if not new.keys() <= dyn.keys():
            self._add_state_rows(new.keys() - dyn.keys())
        rows, held = self._dyn_rows, self._dyn
        torch.where(ok, torch.stack([new.get(k, row) for k, row in held.items()]), rows, out=rows)
        self._held_pending = True
        self._held_cache = None
        self._last_step = _LastStep(self.step + 1, cg is not None, ok, {"q0": q0, "q1": q1, "brk": brk, "r": r,
                                                                         "b": b, "e": e}, dict(held), info)
        self._last_record = None

    def _compiled_step(self, signed: Tensor, unsigned: Tensor | None, m: _Mapped, info: _TheoryLayout) -> bool:
        """:meth:`_accumulate` in one call of the compiled kernel (``nld_step``); ``False`` where it does not apply.

        It applies to a predicted step on float64 CPU rows with the kernel loaded, after the first
        tracked step, one optimizer step per tracked step and every neuron on this rank. The kernel
        takes the same operations in the same order as the torch ops below: the same bits (square
        roots: the IEEE ones, see :mod:`~nld_callbacks.kernel`).
        """
        lay, acc, cg = self.layout, self._acc_rows, m.coef
        if (cg is None or unsigned is None or not self._started or self._span != 1 or info.owned is not None
                or lay is None or acc is None or not lay.compiled or signed.dtype is not torch.float64
                or not signed.is_cpu or signed.stride(1) != 1 or unsigned.stride(1) != 1):
            return False
        flags = (int(info.has_linear), m.parts, int(m.quad), int(m.UU), int(m.metric), int(m.abs1), int(m.fresh))
        plan = self._step_plan
        if plan is None or plan.cg is not cg or plan.rows is not self._dyn_rows or plan.flags != flags:
            plan = self._step_plan = self._plan_step(cg, info, flags)
        n = lay.n_neurons
        # the step record's rows apart: they are kept to the next step, the others go after this call
        record = torch.empty(len(_RECORD_KEYS), n, dtype=torch.float64)
        rest = torch.empty(_N_OUT - len(_RECORD_KEYS), n, dtype=torch.float64)
        rows = plan.place(signed, unsigned, record, rest)
        ok = plan.lib.nld_step(n, plan.c_flags, plan.inputs, plan.strides, rows, plan.n_commit, plan.commit,
                               acc.data_ptr(), acc.shape[1], info.bounds.data_ptr(), _STEP_ACC_ROWS,
                               cg["means_rows"].data_ptr())
        del rest
        self._held_pending = True
        self._held_cache = None
        self._last_step = _LastStep(self.step + 1, True, _TRUE if ok else _FALSE, _OutRows(record), plan.held, info)
        self._last_record = None
        return True

    def _plan_step(self, cg: dict[str, Any], info: _TheoryLayout, flags: tuple[int, ...]) -> _StepPlan:
        """The compiled step's tables for these coefficients, held rows and kind of step (kept while they hold)."""
        has_linear, parts, _, has_uu, has_metric, has_abs1, _ = flags
        keys = {"radial"} if has_uu else set()
        keys |= {"metric_charge", "metric_pred"} if has_metric else set()
        if not keys <= self._dyn.keys():
            self._add_state_rows(keys - self._dyn.keys())
        held = self._dyn

        def row(t: Tensor) -> tuple[int, int]:  # address and stride (0: one number for every neuron)
            return t.data_ptr(), t.stride(-1) if t.dim() else 0

        # input slots: (address, stride), or ("signed" | "unsigned", row) placed per step, or None
        S: list[Any] = [("s", 0), ("s", 1), *((("s", 2), ("s", 3)) if has_linear else (None, None))]
        s0 = 4 if has_linear else 2
        for part in range(2):
            S += [*(("s", s0 + 4 * part + j) for j in range(4)), *(("u", 3 * part + j) for j in range(3))] \
                if part < parts else [None] * 7
        i = s0 + 4 * parts
        S += [("s", i), ("s", i + 1), ("s", i + 2) if has_uu else None]
        i += 2 + has_uu
        S += [("s", i), ("s", i + 1)] if has_metric else [None, None]
        S += [("u", 3 * parts), ("u", 3 * parts + 1) if has_abs1 else None]
        S += [row(info.count), row(info.numel_sq), row(cg["alpha"]), *(row(r) for r in cg["prop"].unbind())]
        S += [row(held[k]) for k in ("on", "nld", "nld_rate", "ema_x", "ema_w")]
        S += [row(info.linear), row(info.scale), row(cg["adaptive"]), row(cg["eq_numel"])]
        assert len(S) == _kernel.STEP_INPUTS
        # the held rows a valid step writes: this step's (out rows), or the coefficients' (one number or a row)
        const = dict(on=info.ones, eff_factor=cg["eff_factor"], eq_coef=cg["eq_coef"], adaptive=cg["flags"][0],
                     rmsprop=cg["flags"][1])
        commit: list[Any] = []
        for k, dst in held.items():
            if k in const:
                commit.append((dst.data_ptr(), *row(const[k])))
            elif k in _OUT_KEYS[:12] and (k not in _ADAPTIVE_KEYS or k in keys):
                commit.append((dst.data_ptr(), ("o", _OUT_KEYS.index(k)), 1))
        assert self.layout is not None
        return _StepPlan(cg, self._dyn_rows, flags, self.layout.kernel, S, commit, dict(held))

    @staticmethod
    def _derived(v: Mapping[str, Tensor], info: _TheoryLayout) -> dict[str, Tensor]:
        """The per-neuron rates, angle and equilibrium of the held state ``v``."""
        q0, q1 = v["q0"], v["q1"]
        nan = torch.full_like(q0, float("nan"))
        # a neuron of zero charge has no direction: its rate and angle are undefined (NaN) and
        # left out of the layer means
        norm = q0  # |w|², or |w| under an adaptive rule (whose rows are held where one is tracked)
        if "radial" in v:
            norm = torch.where(v["adaptive"] > 0, q0.clamp_min(0).sqrt(), q0)
        return {
            "eff": torch.where(q0 > 0, v["eff_factor"] / norm, nan),
            "angle": torch.where((q0 > 0) & (q1 > 0), theory.angular_update(q0, q1, v["step_sq"]), nan),
            "qstar": torch.where(info.scale, (v["eq_coef"] * v["ema_x"] / v["ema_w"]).sqrt(), nan),
            "rms_acc": torch.where(v["rmsprop"] > 0, q1 * q1, nan),  # §2.3: |w|⁴ = Q²
        }

    def _held_derived(self) -> dict[str, Tensor]:
        """:meth:`_derived` of the held state (kept to the end of a logging step at most)."""
        if self._held_cache is None:
            self._held_cache = self._compiled_derived() or self._derived(self._dyn, self._theory())
        return self._held_cache

    def _compiled_lib(self) -> Any:
        """The compiled kernel where the held state suits it (float64 CPU rows, every neuron on this rank)."""
        lay, info = self.layout, self._theory()
        if (lay is None or not lay.compiled or info.owned is not None or info.partial is not None
                or self._dyn_rows.dtype is not torch.float64 or not self._dyn_rows.is_cpu):
            return None
        return lay.kernel

    def _compiled_derived(self) -> dict[str, Tensor] | None:
        """:meth:`_derived` of the held state by the compiled kernel (``nld_derive``); None where it does not apply.

        The same bits but for the square roots (the kernel's are the IEEE ones, see :mod:`~nld_callbacks.kernel`).
        """
        lib = self._compiled_lib()
        if lib is None:
            return None
        h, info = self._dyn, self._theory()
        rows = [h[k] for k in ("q0", "q1", "step_sq", "adaptive", "eff_factor", "eq_coef", "ema_x", "ema_w", "rmsprop")]
        out = torch.empty(4, info.layout.n_neurons, dtype=torch.float64)
        lib.nld_derive(out.shape[1], (ctypes.c_int64 * 10)(*(r.data_ptr() for r in [*rows, info.scale])),
                       int("radial" in h), out.data_ptr())
        eff, angle, qstar, rms_acc = out.unbind()
        torch.asin(angle, out=angle)  # (the kernel gave its argument; the arcsine is torch's, as in _derived)
        angle.mul_(2.0)
        return {"eff": eff, "angle": angle, "qstar": qstar, "rms_acc": rms_acc}

    def _write_last(self) -> None:
        """Write the last-value rows of the last valid tracked step into the accumulators.

        From the held state (one masked write per step keeps it at the last valid step): the
        charge, prediction, tolerance, laws and metric charges summed over each group's neurons,
        and the means of the rates and angles. Groups with no valid step yet keep their rows.
        """
        self._held_pending = False
        lay, acc = self.layout, self._acc_rows
        if lay is None or acc is None:
            return
        info = self._theory()
        h = self._dyn
        q1 = h["q1"]
        lib = self._compiled_lib() if self.opt_model.supported else None
        if lib is not None:  # the same sums in one call (nld_last)
            d = self._held_derived()
            none = 0  # (a row of NaN)
            sums = [h["q1"], h["pred"], h["tol"], h["nld"], d["qstar"], h.get("metric_charge"), h.get("metric_pred")]
            means = [d["eff"], d["angle"], h.get("radial"), d["rms_acc"]]
            n = lay.n_neurons
            scratch = torch.empty(9, n, dtype=torch.float64)  # (held here while the kernel writes it)
            lib.nld_last(n, (ctypes.c_int64 * 7)(*(none if r is None else r.data_ptr() for r in sums)),
                         (ctypes.c_int64 * 4)(*(none if r is None else r.data_ptr() for r in means)),
                         h["on"].data_ptr(), scratch.data_ptr(), acc.data_ptr(), acc.shape[1], info.bounds.data_ptr(),
                         _LAST_ACC_ROWS)
            return
        if self.opt_model.supported:
            d = self._held_derived()
            eff, angle, qstar, rms_acc = d["eff"], d["angle"], d["qstar"], d["rms_acc"]
            pred, tol, nld = h["pred"], h["tol"], h["nld"]
            nan = torch.full_like(q1, float("nan"))
            radial, metric_charge, metric_pred = (h.get(k, nan) for k in _ADAPTIVE_KEYS)
        else:
            eff = angle = qstar = rms_acc = pred = tol = nld = radial = metric_charge = metric_pred = (
                torch.full_like(q1, float("nan")))
        averaged = torch.stack([eff, angle, radial, rms_acc])
        if info.partial is not None:  # partial sums (FSDP): no per-neuron ratio or root means anything
            averaged = torch.where(info.partial, torch.nan, averaged)
            qstar = torch.where(info.partial, torch.nan, qstar)
        if info.owned is not None:  # another rank's neurons: neutral in every per-group statistic
            averaged = torch.where(info.owned, averaged, torch.nan)
        finite = torch.isfinite(averaged)  # means over the neurons with a value (one map with the sums)
        summed = [q1, pred, tol, nld, qstar, metric_charge, metric_pred]
        # (and how many neurons have seen a valid step since their group was laid out)
        table = torch.stack([*summed, *torch.where(finite, averaged, 0.0), *finite.to(averaged.dtype), h["on"]])
        if info.owned is not None:  # (the averaged rows are 0 there already)
            table = torch.where(info.owned, table, 0.0)
        sums, totals, counts, valid = lay.per_group(table).split([len(summed), len(averaged), len(averaged), 1])
        del table
        rows = self._last_rows
        acc.index_copy_(0, rows, torch.where(valid > 0, torch.cat([sums, totals / counts, counts]),
                                             acc.index_select(0, rows)))

    @property
    def last(self) -> StepRecord | None:
        """The last tracked step, per group neuron (made when read).

        Its predictions, rates, angles and laws are those of the held state, which a valid step
        sets: NaN on a step that was marked invalid.
        """
        src = self._last_step
        if src is None:
            return None
        if self._last_record is None:
            v, h = src.values, src.held
            nan = torch.full_like(v["q0"], float("nan"))
            q = dict.fromkeys(("pred", "eff", "angle", "nld", "qstar", *_ADAPTIVE_KEYS), nan)
            if src.identities:
                q.update(self._derived(h, src.info), pred=h["pred"], nld=h["nld"])
                q.update({k: h[k] for k in _ADAPTIVE_KEYS if k in h})
                q = {k: torch.where(src.ok, x, nan) for k, x in q.items()}
            self._last_record = StepRecord(src.step, v["q0"], v["q1"], q["pred"], v["brk"], v["r"], v["b"], v["e"],
                                           q["eff"], q["angle"], nld=q["nld"], equilibrium=q["qstar"],
                                           metric_charge=q["metric_charge"], metric_predicted=q["metric_pred"],
                                           radial_update=q["radial"])
        return self._last_record

    @property
    def _acc(self) -> Tensor | None:
        """The per-group accumulators, the last-value rows of the last valid step written in."""
        if self._held_pending:
            self._write_last()
        return self._acc_rows

    @_acc.setter
    def _acc(self, value: Tensor | None) -> None:
        self._acc_rows = value
        self._held_pending = False

    def sync_step(self, step: int) -> None:
        """Align the step count with an external optimizer-step clock (a trainer's global step).

        Steps the clock counted but the hooks never saw (a ``GradScaler`` skipping an inf/nan step
        calls no hook) are added to :attr:`skipped_steps`; they never enter the accumulators.
        """
        if step > self.step:
            self.skipped_steps += step - self.step
            self.step = step

    def _finite_mean(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """Per-group mean over the neurons with a finite value (NaN where there is none), and their count."""
        assert self.layout is not None
        ok = torch.isfinite(values)
        sums = self.layout.per_group(torch.cat([torch.where(ok, values, 0.0), ok.to(values.dtype)]))
        total, count = sums.split(values.shape[0])
        return total / count, count

    # ------------------------------------------------------------------ logging
    def metrics(self, acc: Sequence[Sequence[float]] | None = None) -> dict[str, float]:
        """Flat ``{tag: value}`` of the accumulators (one host transfer when ``acc`` is None)."""
        if self.layout is None or self._acc is None:
            return {}
        vals = self._global_acc().cpu().tolist() if acc is None else acc
        out: dict[str, float] = {}
        predicted = self.opt_model.supported
        for i, g in enumerate(self.layout.groups):
            out[tag(g.kind, g.name, "charge")] = vals[_CHARGE][i]
            if predicted:
                out[tag(g.kind, g.name, "predicted")] = vals[_PRED][i]
                out[tag(g.kind, g.name, "band_lower")] = vals[_PRED][i] - vals[_TOL][i]
                out[tag(g.kind, g.name, "band_upper")] = vals[_PRED][i] + vals[_TOL][i]
                out[tag(g.kind, g.name, "residual")] = vals[_WIN_E][i]
                partial = g.key in self._partial_keys  # sums over a shard's rows (FSDP): no per-neuron ratios
                if not partial:
                    out[tag(g.kind, g.name, "breaking")] = vals[_WIN_B][i]
                if g.kind == "scale" and not partial:
                    out[tag(g.kind, g.name, "effective_lr")] = vals[_EFF][i]
                    out[tag(g.kind, g.name, "angular_update")] = vals[_ANGLE][i]
                # laws that exist only for some optimizers: logged where finite (NaN = no law)
                optional = [("nld", _NLD), ("metric_charge", _METRIC), ("metric_predicted", _METRIC_PRED)]
                if g.kind == "scale":
                    optional += [("equilibrium", _QSTAR), ("equilibrium_angle", _ANGLE_STAR),
                                 ("relaxation_steps", _RELAX), ("rmsprop_decay", _RMS_DECAY),
                                 ("rmsprop_accumulator", _RMS_ACC), ("radial_update", _RADIAL)]
                for q, row in optional:
                    if math.isfinite(vals[row][i]):
                        out[tag(g.kind, g.name, q)] = vals[row][i]
        return out

    def flush(self) -> dict[str, float]:
        """Move the accumulators to the host (one transfer), write them, reset the window."""
        if self._acc is None:
            return {}
        hist = self._histograms_on_device() if self.dashboards else None
        acc = self._global_acc()
        if hist is None:
            vals, hist_rows = acc.cpu().tolist(), None
        else:  # the histogram counts join the accumulators' one transfer
            flat = torch.cat([acc.reshape(-1), hist.reshape(-1)]).cpu()
            vals = flat[: acc.numel()].view(acc.shape).tolist()
            hist_rows = flat[acc.numel() :].view(hist.shape).tolist()
        m = self.metrics(vals)
        bad = vals[_BAD][0] if vals[_BAD] else 0.0
        if bad and not self._bad_warned:
            warnings.warn(f"NoetherTracker: {int(bad)} step(s) had non-finite values (NaN/inf gradients); "
                          "they were marked invalid and left out of every accumulator.", stacklevel=2)
            self._bad_warned = True
        self._acc[_WIN_E].zero_()
        self._acc[_WIN_B].zero_()
        self._held_cache = None  # (its rows: not kept between steps)
        self.logged.append(m)
        if self.writer is not None:
            if hasattr(self.writer, "add_scalar"):
                write_scalars(self.writer, m, self.step)
            else:
                self.writer(m, self.step)
        hists = self._histogram_tags(hist_rows)
        for d in self.dashboards:
            d.write(self, m, hists, self.step)
        return m

    def _global_acc(self) -> Tensor:
        """The accumulators over every rank's neurons.

        Without row shards every rank holds them all: this rank's. With groups on FSDP row shards
        each rank holds its neurons' partial rows; one ``all_gather`` (the logging step's only
        collective; every rank logs on the same steps) brings them together: sums add, maxima take
        the largest, means are weighted by their neuron counts.
        """
        acc = self._acc
        assert acc is not None
        if not self._sharded or self._process_group is None:
            return acc
        import torch.distributed as dist

        parts = [torch.empty_like(acc) for _ in range(dist.get_world_size(self._process_group))]
        dist.all_gather(parts, acc.contiguous(), group=self._process_group)
        ranks = torch.stack(parts)
        out = acc.clone()
        out[_SUM_ROWS] = ranks[:, _SUM_ROWS].sum(0)
        out[_MAX_ROWS] = ranks[:, _MAX_ROWS].amax(0)
        count = ranks[:, _COUNTS]
        out[_MEANS] = torch.where(count > 0, ranks[:, _MEANS] * count, 0.0).sum(0) / count.sum(0)
        out[_COUNTS] = count.sum(0)
        return out

    def _histograms_on_device(self) -> Tensor | None:
        """The last valid step's per-neuron charges and effective learning rates, binned on the device.

        Shape ``(2, G, 5 + bins)`` (see :func:`~nld_callbacks.tensorboard.bin_on_device`).
        """
        lay, src = self.layout, self._last_step
        if lay is None or src is None or src.info is not self._theory() or self._sharded:
            return None  # no step on this layout yet; row shards: each rank holds some neurons
        n = len(lay.groups)
        charge = self._dyn["q1"]
        eff = self._held_derived()["eff"] if self.opt_model.supported else torch.full_like(charge, torch.nan)
        # both vectors in one binning: the rates' groups numbered after the charges'
        both = bin_on_device(torch.cat([charge, eff]),
                             torch.cat([lay.group_index, lay.group_index + n]), 2 * n, self.histogram_bins)
        return both.view(2, n, -1)

    def _histogram_tags(self, rows: Sequence[Sequence[Sequence[float]]] | None) -> dict[str, Sequence[float]]:
        out: dict[str, Sequence[float]] = {}
        if rows is None or self.layout is None:
            return out
        for i, g in enumerate(self.layout.groups):
            out[tag(g.kind, g.name, "neuron_charge")] = rows[0][i]
            if g.kind == "scale" and self.opt_model.supported:
                out[tag(g.kind, g.name, "neuron_effective_lr")] = rows[1][i]
        return out

    def summary(self) -> list[dict[str, Any]]:
        """Per-group run summary (host sync; call at the end).

        Charge at start and now, observed and predicted total change, the breaking part, largest
        |e|, last effective learning rate, the continuous law's charge (``charge_nld``) and the
        predicted equilibrium charge (``equilibrium``, scale groups; NaN where no law applies).
        With groups on FSDP row shards it is a collective: call it on every rank.
        """
        if self.layout is None or self._acc is None:
            return []
        vals = self._global_acc().cpu().tolist()
        rows = []
        for i, g in enumerate(self.layout.groups):
            rows.append({
                "kind": g.kind, "layer": g.name, "neurons": g.n_neurons,
                "charge_start": vals[_START][i], "charge_end": vals[_CHARGE][i],
                "delta_observed": vals[_SUM_OBS][i], "delta_predicted": vals[_SUM_SYM][i],
                "delta_breaking": vals[_SUM_BRK][i], "max_residual": vals[_RUN_E][i],
                "effective_lr": vals[_EFF][i] if g.kind == "scale" else float("nan"),
                "charge_nld": vals[_NLD][i], "equilibrium": vals[_QSTAR][i] if g.kind == "scale" else float("nan"),
                "invalid_steps": int(vals[_BAD][i]),
            })
        return rows

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything the predictions need to resume: groups, step count, accumulators.

        With groups on FSDP row shards the state is this rank's (its neurons' partial rows and
        laws): save and restore it per rank.
        """
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "groups": [g.to_dict() for g in self.groups],
            "acc": None if self._acc is None else self._acc.detach().cpu().clone(),
            "started": self._started,
            "dynamics": {k: v.detach().cpu().clone() for k, v in self._dyn.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; sets the groups too when none are set yet."""
        if not self.groups and state.get("groups"):
            self.set_symmetries([SymmetryGroup.from_dict(d) for d in state["groups"]])
        saved = [d["kind"] + "/" + d["name"] for d in state.get("groups", [])]
        if saved != [g.key for g in self.groups]:
            raise ValueError(f"Expected the saved groups {saved} to equal the tracked groups "
                             f"{[g.key for g in self.groups]}")
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if state.get("acc") is not None and self.layout is not None:
            acc = state["acc"].to(self.layout.device, torch.float64)
            pad = acc.new_zeros(_N_ROWS - acc.shape[0], acc.shape[1])  # a state saved before the count rows
            self._acc = torch.cat([acc, pad])
        self._started = bool(state.get("started", False))
        if state.get("dynamics") and self.layout is not None:
            self._theory()
            for k, v in state["dynamics"].items():
                if k in self._dyn and self._dyn[k].shape == v.shape:
                    self._dyn[k].copy_(v)
            self._held_cache = None


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-layer run summary as a text table."""
    head = ("kind", "layer", "charge start", "charge end", "ΔQ observed", "ΔQ predicted", "ΔQ breaking",
            "max |e|", "eff. lr")
    lines = [head]
    for r in rows:
        lines.append((r["kind"], r["layer"], f"{r['charge_start']:.6g}", f"{r['charge_end']:.6g}",
                      f"{r['delta_observed']:+.6g}", f"{r['delta_predicted']:+.6g}", f"{r['delta_breaking']:+.3g}",
                      f"{r['max_residual']:.3g}",
                      "-" if r["effective_lr"] != r["effective_lr"] else f"{r['effective_lr']:.4g}"))
    w = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w[i]) if i > 1 else c.ljust(w[i]) for i, c in enumerate(row)) for row in lines]
    out.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(out)
