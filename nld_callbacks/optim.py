"""Optimizer adapters: read each parameter's live hyperparameters and state at every step.

Hyperparameters are read from ``optimizer.param_groups`` at the step itself, never copied at
construction: schedulers change ``lr`` every step and users edit groups mid-run. An optimizer this
module cannot model still gets its charges measured; its predictions are marked absent (NaN) and
one warning names it.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(3))
    >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4)
    >>> model = optimizer_model(opt)
    >>> model.family, model.reason
    ('heavy_ball', None)
    >>> model.hyper(opt.param_groups[0])
    Hyper(lr=0.1, wd=0.0005, momentum=0.9, dampening=0.0, nesterov=False, maximize=False)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["Hyper", "OptimizerModel", "optimizer_model"]

Family = Literal["sgd", "heavy_ball", "nesterov"]


@dataclass(frozen=True)
class Hyper:
    """Hyperparameters of one param group at one step (physics.md §0 notation)."""

    lr: float
    wd: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    @property
    def family(self) -> Family:
        """Which exact identity of physics.md §2.1 applies."""
        if self.momentum == 0.0:
            return "sgd"
        return "nesterov" if self.nesterov else "heavy_ball"


def _overrides_step(cls: type, base: type) -> bool:
    return getattr(cls, "step", None) is not getattr(base, "step", None)


def _as_float(x: Any, name: str) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise TypeError(f"Expected param group entry `{name}` to be a scalar but got a tensor of shape {tuple(x.shape)}")
        # A tensor lr (capturable/fused optimizers) lives on the host for SGD; reading it is not a
        # device sync there. Keep it a float for the arithmetic below.
        return float(x.detach().cpu())
    return float(x)


@dataclass(frozen=True)
class OptimizerModel:
    """What the tracker knows about an optimizer.

    Attributes:
        name: the optimizer's class name.
        family: the family of the first param group, or ``None`` if the optimizer is not modelled.
        reason: why it is not modelled (``None`` when it is).
    """

    name: str
    family: Family | None
    reason: str | None

    @property
    def supported(self) -> bool:
        """Whether exact per-step predictions are available."""
        return self.reason is None

    def hyper(self, group: Mapping[str, Any]) -> Hyper:
        """Read one param group's hyperparameters now."""
        return Hyper(
            lr=_as_float(group["lr"], "lr"),
            wd=_as_float(group.get("weight_decay", 0.0), "weight_decay"),
            momentum=_as_float(group.get("momentum", 0.0), "momentum"),
            dampening=_as_float(group.get("dampening", 0.0), "dampening"),
            nesterov=bool(group.get("nesterov", False)),
            maximize=bool(group.get("maximize", False)),
        )

    @staticmethod
    def momentum_buffer(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor | None:
        """The heavy-ball buffer v of ``p`` (``None`` before the first step)."""
        state = optimizer.state.get(p)
        return None if state is None else state.get("momentum_buffer")


def optimizer_model(optimizer: torch.optim.Optimizer) -> OptimizerModel:
    """Decide whether the optimizer's update rule is modelled exactly.

    ``torch.optim.SGD`` (any momentum, dampening, Nesterov, coupled weight decay, ``maximize``,
    foreach or fused) is. A subclass that overrides ``step`` is not, nor is any other optimizer.
    """
    cls = type(optimizer)
    name = cls.__name__
    if isinstance(optimizer, torch.optim.SGD) and not _overrides_step(cls, torch.optim.SGD):
        fam = OptimizerModel(name, None, None).hyper(optimizer.param_groups[0]).family
        return OptimizerModel(name, fam, None)
    if isinstance(optimizer, torch.optim.SGD):
        return OptimizerModel(name, None, f"{name} subclasses torch.optim.SGD but overrides step()")
    return OptimizerModel(name, None, f"no exact per-step model for {name} (supported: torch.optim.SGD)")
