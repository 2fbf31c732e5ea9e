"""NoetherMonitor: the Lightning adapter over :class:`~nld_callbacks.NoetherTracker`."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from .symmetries import SymmetryReport, module_calls, symmetries_from_graph
from .tensorboard import Dashboard, write_scalars
from .tracker import NoetherTracker, check_sample_every, format_summary

__all__ = ["NoetherMonitor"]


class NoetherMonitor(Callback):
    r"""Log Noether charges, their exact predictions and the effective learning rates.

    On the first training step the monitor reads the symmetries off the loss's autograd graph (the
    computation that actually ran), prints the detected groups and the parameter coverage once, and
    from the next optimizer step on measures every group at every step. Values go to the trainer's
    loggers every ``log_every_n_steps`` optimizer steps; at the end of ``fit`` a per-layer summary
    table is printed and kept in :attr:`summary`.

    Logged Metrics:
        For each group, with ``layer`` the module's qualified name and ``kind`` one of ``scale``,
        ``translation``, ``rescale``:

        - ``nld/{kind}/{layer}/charge``: the measured charge (Σ over the layer's neurons).
        - ``nld/{kind}/{layer}/predicted``: the exact per-step identity with R_t = 0, from the last
          measured charge (physics.md §2.1).
        - ``nld/{kind}/{layer}/residual``: the largest unexplained residual |e| since the last log
          (physics.md §3.2; |e| ≲ 1 means the optimizer model explains the step up to rounding).
        - ``nld/{kind}/{layer}/breaking``: the largest measured symmetry-breaking share |b|.
        - ``nld/scale/{layer}/effective_lr``: η/((1−ηλ)Q), mean over channels (physics.md §2.3).
        - ``nld/scale/{layer}/angular_update``: the measured angle of the step, mean over channels.
        - ``nld/{kind}/{layer}/band_lower``, ``band_upper``: ``predicted`` ∓ D, D the residual
          scale of physics.md §3.2 summed over the layer's neurons (the dashboard's tolerance band).

        Where the optimizer has the law (physics.md §2.2–2.4; absent laws are not logged):

        - ``nld/{kind}/{layer}/nld``: the continuous NLD law integrated from the start of tracking.
        - ``nld/scale/{layer}/equilibrium``, ``equilibrium_angle``, ``relaxation_steps``: predicted
          equilibrium charge Q*, equilibrium angular update and relaxation time in steps.
        - ``nld/scale/{layer}/rmsprop_decay``, ``rmsprop_accumulator``: the RMSProp correspondence
          of normalization + weight decay (decay (1−ηλ)⁴, accumulator |w|⁴).
        - ``nld/scale/{layer}/radial_update``: radial share of an adaptive optimizer's update (the
          kinetic-symmetry-breaking signature of Adam/RMSprop).
        - ``nld/{kind}/{layer}/metric_charge``, ``metric_predicted``: the metric charge Σ G θ² of
          Adam with β1 = 0 / RMSprop, measured and predicted.

        Through a ``TensorBoardLogger`` (rank 0) also: the custom-scalars layout (once, from the tags
        written), the text panel ``nld/symmetries`` (detected groups and coverage), histograms
        ``nld/{kind}/{layer}/neuron_charge`` and ``nld/scale/{layer}/neuron_effective_lr`` at
        logging steps; through every logger, the monitor's settings as hyperparameters ``nld/...``.

        Predictions are logged only for optimizers modelled exactly (``torch.optim.SGD``, ``SGDW``,
        ``Adam``/``AdamW``, ``RMSprop``: see :mod:`nld_callbacks.optim`); for any other optimizer
        only ``charge`` is logged, after one warning.

    Args:
        log_every_n_steps: log every n optimizer steps; ``None`` uses the trainer's
            ``log_every_n_steps``.
        include: glob patterns over ``kind/layer`` keys to keep (``["scale/*"]``).
        exclude: glob patterns over ``kind/layer`` keys to drop.
        verbose: print the symmetry table at the start and the summary at the end.
        sample_every: track one optimizer step in k; the other steps cost nothing (see
            :class:`~nld_callbacks.NoetherTracker`: sampled steps are exact, the continuous law is
            fed the sampled drives). ``"auto"``: k chosen from measured times so that the
            tracking takes about ``max_overhead`` of the step time.
        max_overhead: with ``sample_every="auto"``, that fraction (default 0.01).

    Example::

        from lightning.pytorch import Trainer
        from nld_callbacks import NoetherMonitor

        trainer = Trainer(callbacks=[NoetherMonitor()])
        trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        verbose: bool = True,
        sample_every: int | Literal["auto"] = 1,
        max_overhead: float = 0.01,
    ) -> None:
        check_sample_every(sample_every)
        if not 0.0 < max_overhead < 1.0:
            raise ValueError(f"Expected `max_overhead` to be in (0, 1) but got {max_overhead!r}")
        if log_every_n_steps is not None and (
            not isinstance(log_every_n_steps, int) or isinstance(log_every_n_steps, bool) or log_every_n_steps < 1
        ):
            raise ValueError(f"Expected `log_every_n_steps` to be a positive int or None but got {log_every_n_steps!r}")
        for name, v in (("include", include), ("exclude", exclude)):
            if v is not None and (not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v)):
                raise TypeError(f"Expected `{name}` to be a list of glob strings but got {v!r}")
        self.log_every_n_steps = log_every_n_steps
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.verbose = verbose
        self.sample_every = sample_every
        self.max_overhead = max_overhead
        self.trackers: list[NoetherTracker] = []
        self.report: SymmetryReport | None = None
        self.summary: list[dict[str, Any]] = []
        self._pending_state: dict[str, Any] | None = None
        self._detect_attempts = 0
        self._recorder: module_calls | None = None
        self._calls: list[Any] = []
        self._dashboards: list[Dashboard] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(log_every_n_steps=self.log_every_n_steps, include=self.include,
                                        exclude=self.exclude)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not trainer.loggers:
            rank_zero_warn("NoetherMonitor: the Trainer has no logger (logger=False), so nothing is written; the "
                           "charges are still tracked and the summary is kept in `NoetherMonitor.summary`.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self._every(trainer)
        self._detect_attempts = 0
        self._dashboards = None
        self.trackers = [
            NoetherTracker(pl_module, opt, writer=self._sink(trainer), log_every_n_steps=every,
                           include=self.include, exclude=self.exclude, sample_every=self.sample_every,
                           max_overhead=self.max_overhead)
            for opt in trainer.optimizers
        ]
        if self._pending_state is not None:
            for tracker, state in zip(self.trackers, self._pending_state["trackers"]):
                tracker.load_state_dict(state)
            self._pending_state = None

    @staticmethod
    def _sink(trainer: pl.Trainer) -> Any:
        def write(metrics: dict[str, float], step: int) -> None:
            for logger in trainer.loggers:
                if not isinstance(logger, TensorBoardLogger):
                    logger.log_metrics(metrics, step=step)
                elif trainer.is_global_zero:  # one event per logging step (log_metrics: one per value)
                    write_scalars(logger.experiment, metrics, step)

        return write

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if loss.grad_fn is None:
            return
        changed = [t for t in self.trackers if t.groups and t.needs_symmetries]
        pending = [t for t in self.trackers if not t.groups]
        if changed:  # parameters were added or unfrozen: read the graph again, keep what was tracked
            report = symmetries_from_graph(pl_module, loss, calls=self._calls)
            for tracker in changed:
                tracker.set_symmetries(report, quiet=True)
            if self.verbose:
                rank_zero_info("NoetherMonitor: parameters changed, symmetries read again\n" + report.table())
        if not pending or self._detect_attempts >= 2 * len(self.trackers):
            return
        # Each backward shows the graph of one loss; with several optimizers (manual optimization)
        # a later loss may reach parameters an earlier one did not, so keep reading until every
        # optimizer has its groups or each had two chances.
        self._detect_attempts += 1
        report = symmetries_from_graph(pl_module, loss, calls=self._calls)
        found = []
        for tracker in pending:
            tracker.set_symmetries(report, quiet=True)
            found.extend(tracker.groups)
        self.report = report if self.report is None else self.report
        if found and self.verbose:
            rank_zero_info("NoetherMonitor: detected symmetries\n" + report.table())
        if found:
            self._start_dashboards(trainer, report)
        if all(t.groups for t in self.trackers):
            return
        if self._detect_attempts >= 2 * len(self.trackers):
            missing = [type(t.optimizer).__name__ for t in self.trackers if not t.groups]
            rank_zero_warn(f"NoetherMonitor: no symmetry found for the parameters of {', '.join(missing)} in "
                           f"{type(pl_module).__name__}; nothing to track there, training goes on.")

    def _every(self, trainer: pl.Trainer) -> int:
        """The logging interval: this callback's, else the trainer's."""
        return self.log_every_n_steps or trainer.log_every_n_steps  # type: ignore[attr-defined]

    def _start_dashboards(self, trainer: pl.Trainer, report: SymmetryReport) -> None:
        """Start the dashboards on rank 0.

        The symmetry text panel and the hyperparameters once, through every logger; the
        custom-scalars layout (after the first log, from the tags written) and the histograms through
        every logger whose experiment is a ``SummaryWriter``.
        """
        if not trainer.is_global_zero:
            return
        if self._dashboards is None:
            experiments = [lg.experiment for lg in trainer.loggers]  # type: ignore[attr-defined]
            self._dashboards = [Dashboard(e) for e in experiments if Dashboard.supports(e)]
            for d in self._dashboards:
                d.write_symmetries(report, trainer.global_step)
            hparams = {"log_every_n_steps": self._every(trainer),
                       "groups": len(report.groups), "coverage": round(report.coverage, 6),
                       "optimizers": ", ".join(type(t.optimizer).__name__ for t in self.trackers),
                       "include": ", ".join(self.include or []), "exclude": ", ".join(self.exclude or [])}
            for lg in trainer.loggers:
                lg.log_hyperparams({"nld": hparams})
        for t in self.trackers:
            for d in self._dashboards:
                if t.groups and d not in t.dashboards:
                    d.expect(t)
                    t.dashboards.append(d)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._recorder is None and any(t.needs_symmetries for t in self.trackers):
            # record calls of custom module types so that their registered rules apply
            self._recorder = module_calls(pl_module)
            self._calls = self._recorder.__enter__()

    def _stop_recording(self) -> None:
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
        self._recorder, self._calls = None, []

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._stop_recording()
        if pl_module.automatic_optimization and len(self.trackers) == 1:
            # Steps a GradScaler skipped (inf/nan) call no optimizer hook but do advance the global
            # step: count them, and keep the tracker's step aligned with the trainer's.
            self.trackers[0].sync_step(trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for tracker in self.trackers:
            if tracker.step and not tracker.schedule(tracker.step):
                tracker.flush()  # the last partial window
        self.summary = [row for t in self.trackers for row in t.summary()]
        if self.verbose and self.summary:
            rank_zero_info("NoetherMonitor: per-layer summary (|e| ≲ 1: the exact identity explains every step)\n"
                           + format_summary(self.summary))
        self._detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        self._stop_recording()
        for t in self.trackers:
            t.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"trackers": [t.state_dict() for t in self.trackers]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict

