"""NoetherTracker: per-step Noether charges of a plain PyTorch optimizer, no Lightning needed.

The tracker hangs on an optimizer's step hooks (physics.md §3.3):

1. the **pre-hook** reads θ_t-only quantities (Q_t, and P_t = B(θ_t, v_t) with momentum). Under
   Lightning's automatic optimization it runs *before* the closure, so it never reads a gradient;
2. the optimizer runs (closure, clipping, unscaling happen inside);
3. the **post-hook** reads g_t (the gradient actually consumed), v_{t+1} and θ_{t+1}, evaluates the
   exact identity, the residual decomposition, the effective learning rate and the angular update
   for every group in a fixed number of batched float64 ops, and folds them into device-side
   accumulators;
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

import dataclasses
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import theory
from .charges import ChargeLayout
from .optim import Hyper, OptimizerModel, optimizer_model
from .symmetries import SymmetryGroup, SymmetryReport, find_symmetries
from .tensorboard import Dashboard, bin_on_device, tag, write_scalars

__all__ = ["NoetherTracker", "StepRecord", "every_n_steps"]

log = logging.getLogger(__name__)

Schedule = Callable[[int], bool]


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
_N_ROWS = 13


@dataclass
class StepRecord:
    """The last tracked step, per group neuron (groups concatenated; split with ``layout.split``).

    All tensors are float64 and stay on the parameters' device.
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


class NoetherTracker:
    """Measure Noether charges at every optimizer step and compare them with the exact identities.

    Args:
        model: the network whose parameters the optimizer updates.
        optimizer: the optimizer to hook (``torch.optim.SGD`` is modelled exactly; any other is
            measured only, with predictions marked absent and one warning).
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
            weights' dtype, whose rounding the residual's 4·u_w·M floor already allows for.
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
    ) -> None:
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
        self.opt_model: OptimizerModel = optimizer_model(optimizer)
        if not self.opt_model.supported:
            warnings.warn(
                f"NoetherTracker: {self.opt_model.reason}; charges are measured, predictions are marked absent.",
                stacklevel=2,
            )
        self.step = 0
        self.skipped_steps = 0
        self.logged: list[dict[str, float]] = []
        self.last: StepRecord | None = None
        self.report: SymmetryReport | None = None
        self._signature: tuple[int, int] | None = None
        self.layout: ChargeLayout | None = None
        self._handles: list[Any] = []
        self._pre: tuple[Tensor, Tensor | None, dict[str, bool]] | None = None
        self._acc: Tensor | None = None
        self._started = False
        self._bad_warned = False
        self._coef_cache: tuple[Any, dict[str, Tensor]] | None = None
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
        for g in report.groups:
            if all(m.param in named and id(named[m.param]) in in_opt for m in g.members):
                groups.append(g)
            else:
                report.notes.append(f"{g.key}: not every parameter is updated by this optimizer; left out")
        report = dataclasses.replace(report, groups=groups)
        self.report = report
        self._signature = self.parameter_signature()
        self._params = {n: named[n] for n in {m.param for g in groups for m in g.members}}
        if not groups:
            self.layout = None
            if not quiet:
                log.warning("NoetherTracker: no symmetry group to track on %s; training goes on unmonitored.",
                            type(self.model).__name__)
            return
        old_keys = [g.key for g in self.groups]
        device = next(iter(self._params.values())).device
        self.layout = ChargeLayout(groups, {n: p.shape for n, p in self._params.items()}, device,
                                   float64_accumulation=self.float64_accumulation)
        self._params = {n: named[n] for n in self.layout.params}
        u = torch.tensor([theory.unit_roundoff(p.dtype) for p in self._params.values()], dtype=torch.float64)
        self._unit_r = u.to(device).index_select(0, self.layout.param_of_reduction)
        acc = torch.zeros(_N_ROWS, len(groups), dtype=torch.float64, device=device)
        kept = [(i, old_keys.index(g.key)) for i, g in enumerate(groups) if g.key in old_keys]
        if self._acc is not None and kept:
            new_i, old_i = (torch.tensor(v, device=device) for v in zip(*kept))
            acc[:, new_i] = self._acc.to(device)[:, old_i]
        self._acc = acc
        self._started = bool(kept) and self._started
        self._coef_cache = None
        self._pre = None
        for d in self.dashboards:
            d.expect(self)
            d.write_symmetries(report, self.step)

    def parameter_signature(self) -> tuple[int, int]:
        """(param groups, trainable parameters) of the optimizer: changes when a fine-tuning run
        unfreezes layers or adds a param group, which calls for reading the symmetries again."""
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
        pg_of = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        hyp = [self.opt_model.hyper(g) for g in self.optimizer.param_groups]
        return {n: hyp[pg_of[id(p)]] for n, p in self._params.items()}

    def _coefficients(self, hyp: Mapping[str, Hyper], first: Mapping[str, bool],
                      active: Mapping[str, bool]) -> dict[str, Tensor]:
        """Per-reduction float64 vectors of η, λ, β, c_t; cached while nothing changes."""
        assert self.layout is not None
        key = tuple((hyp[n], first[n], active[n]) for n in self._params)
        if self._coef_cache is not None and self._coef_cache[0] == key:
            return self._coef_cache[1]
        rows = []
        for n in self._params:
            h = hyp[n]
            # torch skips a parameter without a gradient entirely (no decay, no momentum): η = 0
            # makes every identity read "unchanged", which is exact.
            lr = h.lr if active[n] else 0.0
            c = 1.0 if first[n] else 1.0 - h.dampening
            rows.append((lr, h.wd, h.momentum, c))
        host = torch.tensor(rows, dtype=torch.float64).T.contiguous()
        if self.layout.device.type == "cuda":
            host = host.pin_memory()
        per_param = host.to(self.layout.device, non_blocking=True)
        vals = per_param.index_select(1, self.layout.param_of_reduction)
        coef = {"lr": vals[0], "wd": vals[1], "momentum": vals[2], "c": vals[3]}
        self._coef_cache = (key, coef)
        return coef

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.layout is None:
            return
        theta = {n: p.detach() for n, p in self._params.items()}
        Q0 = self.layout.reduce(theta, theta)
        P0, first = None, {}
        if self.opt_model.supported:
            bufs = {n: self.opt_model.momentum_buffer(optimizer, p) for n, p in self._params.items()}
            first = {n: b is None for n, b in bufs.items()}
            if any(b is not None for b in bufs.values()):
                P0 = self.layout.reduce(theta, bufs)
        self._pre = (Q0, P0, first)

    @torch.no_grad()
    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.layout is None or self._pre is None:
            # no groups yet, or they were set inside this step (Lightning's first closure): the
            # step is counted, tracking starts with the next one
            self.step += 1
            return
        Q0, P0, first = self._pre
        self._pre = None
        lay = self.layout
        theta = {n: p.detach() for n, p in self._params.items()}
        Q1 = lay.reduce(theta, theta)
        if self.opt_model.supported:
            grads = {n: p.grad for n, p in self._params.items()}
            terms = self._terms(optimizer, Q0, Q1, P0, first, theta, grads)
        else:
            terms = None
        self._accumulate(Q0, Q1, terms)
        self.step += 1
        if self.schedule(self.step):
            self.flush()

    def _terms(self, optimizer: torch.optim.Optimizer, Q0: Tensor, Q1: Tensor, P0: Tensor | None,
               first: Mapping[str, bool], theta: Mapping[str, Tensor],
               grads: Mapping[str, Tensor | None]) -> tuple[theory.StepTerms, dict[str, Tensor]]:
        lay = self.layout
        assert lay is not None
        hyp = self._hypers()
        active = {n: g is not None for n, g in grads.items()}
        coef = self._coefficients(hyp, first, active)
        families = {hyp[n].family for n in self._params}
        maximize = {hyp[n].maximize for n in self._params}
        if len(maximize) != 1:
            raise NotImplementedError("NoetherTracker: groups mixing maximize=True and False are not modelled")
        mx = maximize.pop()
        X = lay.reduce(theta, grads)
        need_g = families & {"sgd", "nesterov"}
        G = lay.reduce(grads, grads) if need_g else None
        out: dict[str, theory.StepTerms] = {}
        if families & {"heavy_ball", "nesterov"}:
            bufs = {n: self.opt_model.momentum_buffer(optimizer, p) for n, p in self._params.items()}
            Y, K = lay.reduce(bufs, grads), lay.reduce(bufs, bufs)
            P = P0 if P0 is not None else torch.zeros_like(Q0)
            if "heavy_ball" in families:
                out["heavy_ball"] = theory.heavy_ball_step(Q0=Q0, Q1=Q1, P0=P, X=X, Y=Y, K=K, lr=coef["lr"],
                                                           wd=coef["wd"], momentum=coef["momentum"], c=coef["c"],
                                                           maximize=mx)
            if "nesterov" in families:
                assert G is not None
                Z = lay.reduce(theta, bufs)
                out["nesterov"] = theory.nesterov_step(Q0=Q0, Q1=Q1, P0=P, X=X, G=G, Y=Y, K=K, Z=Z, lr=coef["lr"],
                                                       wd=coef["wd"], momentum=coef["momentum"], c=coef["c"],
                                                       maximize=mx)
        if "sgd" in families:
            assert G is not None
            out["sgd"] = theory.sgd_step(Q0=Q0, Q1=Q1, X=X, G=G, lr=coef["lr"], wd=coef["wd"], maximize=mx)
        if len(out) == 1:
            terms = next(iter(out.values()))
        else:  # param groups of different families: pick each tensor's own
            fam_of = torch.tensor([list(out).index(hyp[n].family) for n in self._params], device=Q0.device)
            which = fam_of.index_select(0, lay.param_of_reduction)
            fields = theory.StepTerms.__dataclass_fields__
            merged = {}
            for f in fields:
                v = getattr(out[next(iter(out))], f)
                for i, t in enumerate(out.values()):
                    v = torch.where(which == i, getattr(t, f), v)
                merged[f] = v
            terms = theory.StepTerms(**merged)
        eff_factor = torch.where(coef["momentum"] > 0, coef["lr"] / (1.0 - coef["momentum"]),
                                 coef["lr"] / (1.0 - coef["lr"] * coef["wd"]))
        return terms, {"eff_factor": eff_factor}

    def _accumulate(self, Q0: Tensor, Q1: Tensor,
                    terms: tuple[theory.StepTerms, dict[str, Tensor]] | None) -> None:
        lay, acc = self.layout, self._acc
        assert lay is not None and acc is not None
        q0, q1 = lay.to_groups(Q0), lay.to_groups(Q1)
        nan = torch.full_like(q0, float("nan"))
        if not self._started:
            acc[_START] = lay.per_group(q0)
            self._started = True
        if terms is None:
            obs = q1 - q0
            pred = sym = brk = r = b = e = eff = angle = nan
        else:
            t, extra = terms
            obs, sym, brk = lay.to_groups(t.observed), lay.to_groups(t.symmetric), lay.to_groups(t.breaking)
            # Tensors of one group with different η(1−ηλ) (mixed lr/wd): only Σ s_i R_i = 0 is a
            # symmetry; the rest of Σ s_i(−2 k_i R_i) is a real drift and belongs to the prediction
            # (physics.md §2.1, per-tensor form). k̄ = the mean coefficient of the neuron's tensors.
            count = lay.to_groups(torch.ones_like(t.coeff), unsigned=True)
            kbar = lay.to_groups(t.coeff, unsigned=True) / count
            brk_sym = -2.0 * kbar * lay.to_groups(t.force)
            sym = sym + (brk - brk_sym)
            brk = brk_sym
            rounding = lay.to_groups(self._unit_r * Q0, unsigned=True)
            r, b, e = theory.residual_decomposition(obs, sym, brk, lay.to_groups(t.terms, unsigned=True), rounding)
            tol = lay.to_groups(t.terms, unsigned=True) + 4.0 * rounding  # D_t per neuron (§3.2)
            pred = q0 + sym
            # a neuron of zero charge has no direction: its rate and angle are undefined (NaN) and
            # left out of the layer means
            eff = torch.where(q0 > 0, lay.to_groups(extra["eff_factor"], unsigned=True) / count / q0, nan)
            angle = torch.where((q0 > 0) & (q1 > 0),
                                theory.angular_update(q0, q1, lay.to_groups(t.step_sq, unsigned=True)), nan)
        # A non-finite step (NaN/inf gradient) is marked invalid and kept out of the accumulators,
        # without a host sync: the decision is a device-side mask.
        ok = torch.isfinite(obs).all() & (torch.isfinite(e).all() | (terms is None))
        g_e, g_b = lay.per_group(e.abs(), "amax"), lay.per_group(b.abs(), "amax")
        new = acc.clone()
        new[_WIN_E] = torch.fmax(acc[_WIN_E], g_e)
        new[_WIN_B] = torch.fmax(acc[_WIN_B], g_b)
        new[_RUN_E] = torch.fmax(acc[_RUN_E], g_e)
        new[_CHARGE] = lay.per_group(q1)
        new[_PRED] = lay.per_group(pred)
        new[_EFF] = self._finite_mean(eff)
        new[_ANGLE] = self._finite_mean(angle)
        new[_TOL] = lay.per_group(tol) if terms is not None else torch.full_like(acc[_TOL], float("nan"))
        new[_SUM_OBS] = acc[_SUM_OBS] + lay.per_group(obs)
        new[_SUM_SYM] = acc[_SUM_SYM] + lay.per_group(sym)
        new[_SUM_BRK] = acc[_SUM_BRK] + lay.per_group(brk)
        new[_BAD] = acc[_BAD]
        bad = acc.clone()
        bad[_BAD] += 1.0
        acc.copy_(torch.where(ok, new, bad))
        self.last = StepRecord(self.step + 1, q0, q1, pred, brk, r, b, e, eff, angle)

    def sync_step(self, step: int) -> None:
        """Align the step count with an external optimizer-step clock (a trainer's global step).

        Steps the clock counted but the hooks never saw (a ``GradScaler`` skipping an inf/nan step
        calls no hook) are added to :attr:`skipped_steps`; they never enter the accumulators.
        """
        if step > self.step:
            self.skipped_steps += step - self.step
            self.step = step

    def _finite_mean(self, values: Tensor) -> Tensor:
        """Per-group mean over the neurons with a finite value (NaN where there is none)."""
        assert self.layout is not None
        ok = torch.isfinite(values)
        total = self.layout.per_group(torch.where(ok, values, torch.zeros_like(values)))
        return total / self.layout.per_group(ok.to(values.dtype))

    # ------------------------------------------------------------------ logging
    def metrics(self, acc: Sequence[Sequence[float]] | None = None) -> dict[str, float]:
        """Flat ``{tag: value}`` of the accumulators (one host transfer when ``acc`` is None)."""
        if self.layout is None or self._acc is None:
            return {}
        vals = self._acc.cpu().tolist() if acc is None else acc
        out: dict[str, float] = {}
        predicted = self.opt_model.supported
        for i, g in enumerate(self.layout.groups):
            out[tag(g.kind, g.name, "charge")] = vals[_CHARGE][i]
            if predicted:
                out[tag(g.kind, g.name, "predicted")] = vals[_PRED][i]
                out[tag(g.kind, g.name, "band_lower")] = vals[_PRED][i] - vals[_TOL][i]
                out[tag(g.kind, g.name, "band_upper")] = vals[_PRED][i] + vals[_TOL][i]
                out[tag(g.kind, g.name, "residual")] = vals[_WIN_E][i]
                out[tag(g.kind, g.name, "breaking")] = vals[_WIN_B][i]
                if g.kind == "scale":
                    out[tag(g.kind, g.name, "effective_lr")] = vals[_EFF][i]
                    out[tag(g.kind, g.name, "angular_update")] = vals[_ANGLE][i]
        return out

    def flush(self) -> dict[str, float]:
        """Move the accumulators to the host (one transfer), write them, reset the window."""
        if self._acc is None:
            return {}
        hist = self._histograms_on_device() if self.dashboards else None
        if hist is None:
            vals, hist_rows = self._acc.cpu().tolist(), None
        else:  # the histogram counts join the accumulators' one transfer
            flat = torch.cat([self._acc.reshape(-1), hist.reshape(-1)]).cpu()
            vals = flat[: self._acc.numel()].view(self._acc.shape).tolist()
            hist_rows = flat[self._acc.numel() :].view(hist.shape).tolist()
        m = self.metrics(vals)
        bad = vals[_BAD][0] if vals[_BAD] else 0.0
        if bad and not self._bad_warned:
            warnings.warn(f"NoetherTracker: {int(bad)} step(s) had non-finite values (NaN/inf gradients); "
                          "they were marked invalid and left out of every accumulator.", stacklevel=2)
            self._bad_warned = True
        self._acc[_WIN_E].zero_()
        self._acc[_WIN_B].zero_()
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

    def _histograms_on_device(self) -> Tensor | None:
        """The last step's per-neuron charges and effective learning rates, binned per group on the
        device: ``(2, G, 5 + bins)`` (see :func:`~nld_callbacks.tensorboard.bin_on_device`)."""
        lay, last = self.layout, self.last
        if lay is None or last is None or last.charge.numel() != lay.n_neurons:
            return None
        n = len(lay.groups)
        return torch.stack([bin_on_device(last.charge, lay.group_index, n, self.histogram_bins),
                            bin_on_device(last.effective_lr, lay.group_index, n, self.histogram_bins)])

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
        """Per-group run summary (host sync; call at the end): charge at start and now, observed and
        predicted total change, the breaking part, largest |e|, last effective learning rate."""
        if self.layout is None or self._acc is None:
            return []
        vals = self._acc.cpu().tolist()
        rows = []
        for i, g in enumerate(self.layout.groups):
            rows.append({
                "kind": g.kind, "layer": g.name, "neurons": g.n_neurons,
                "charge_start": vals[_START][i], "charge_end": vals[_CHARGE][i],
                "delta_observed": vals[_SUM_OBS][i], "delta_predicted": vals[_SUM_SYM][i],
                "delta_breaking": vals[_SUM_BRK][i], "max_residual": vals[_RUN_E][i],
                "effective_lr": vals[_EFF][i] if g.kind == "scale" else float("nan"),
                "invalid_steps": int(vals[_BAD][i]),
            })
        return rows

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything the predictions need to resume: groups, step count, accumulators."""
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "groups": [g.to_dict() for g in self.groups],
            "acc": None if self._acc is None else self._acc.detach().cpu().clone(),
            "started": self._started,
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
            self._acc = state["acc"].to(self.layout.device, torch.float64).clone()
        self._started = bool(state.get("started", False))


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-layer run summary as a text table."""
    head = ("kind", "layer", "charge start", "charge end", "ΔQ observed", "ΔQ predicted", "ΔQ breaking",
            "max |e|", "eff. lr")
    lines = [head]
    for r in rows:
        lines.append((r["kind"], r["layer"], f"{r['charge_start']:.6g}", f"{r['charge_end']:.6g}",
                      f"{r['delta_observed']:+.6g}", f"{r['delta_predicted']:+.6g}", f"{r['delta_breaking']:+.3g}",
                      f"{r['max_residual']:.3g}", "-" if r["effective_lr"] != r["effective_lr"] else f"{r['effective_lr']:.4g}"))
    w = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w[i]) if i > 1 else c.ljust(w[i]) for i, c in enumerate(row)) for row in lines]
    out.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(out)
