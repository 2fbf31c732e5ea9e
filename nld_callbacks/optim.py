"""Optimizer adapters: read each parameter's live hyperparameters and state at every step.

Hyperparameters are read from ``optimizer.param_groups`` at the step itself, never copied at
construction: schedulers change ``lr`` every step and users edit groups mid-run. An optimizer this
module cannot model still gets its charges measured; its predictions are marked absent (NaN) and
one warning names it.

Support matrix (one *rule* per optimizer class, found along the class's MRO; a subclass that
overrides ``step`` is never assumed to follow its parent's rule):

* ``torch.optim.SGD`` (rule ``sgd``): families ``sgd`` (β = 0), ``heavy_ball``, ``nesterov``, with
  coupled λ, dampening, ``maximize``, foreach and fused alike;
* :class:`SGDW` (rule ``sgdw``): ``sgdw``, and ``sgd`` when β = 0 (then identical to coupled λ);
* ``torch.optim.Adam`` / ``AdamW`` (rule ``adam``, family ``adam``): the trivial identity split into
  its tangential part and the radial (kinetic-symmetry-breaking) share; the metric identity
  Σ G θ² when β1 = 0; coupled or decoupled λ, AMSGrad, ``maximize``, foreach and fused;
* ``torch.optim.RMSprop`` (rule ``rmsprop``, family ``adam``): as Adam; the metric identity without
  momentum, centered or not;
* anything else (LBFGS, custom rules, LARS/LAMB-style subclasses): measured only.

**Decoupled weight decay for SGD.** ``torch.optim.SGD`` has no decoupled mode, and an extra
param-group key would be silently ignored by its step. So decoupled SGD is declared by the
optimizer's class: use :class:`SGDW` (physics.md §2.1: v_{t+1} = βv_t + g_t,
θ_{t+1} = (1 − ηλ)θ_t − ηv_{t+1}), or declare your own class with
``register_optimizer(MySGDW, "sgdw")`` when its ``step`` follows that rule with the param-group keys
``lr``, ``momentum``, ``weight_decay`` and the state key ``momentum_buffer``.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(3))
    >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4)
    >>> model = optimizer_model(opt)
    >>> model.family, model.reason
    ('heavy_ball', None)
    >>> h = model.hyper(opt.param_groups[0])
    >>> h.lr, h.wd, h.momentum, h.family
    (0.1, 0.0005, 0.9, 'heavy_ball')
    >>> optimizer_model(torch.optim.AdamW([p], betas=(0.0, 0.99))).family
    'adam'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor

__all__ = [
    "SGDW",
    "AdaptiveTensors",
    "Hyper",
    "OptimizerModel",
    "adam_bias_corrections",
    "adaptive_tensors",
    "optimizer_model",
    "register_optimizer",
    "stepped_batches",
]

Family = Literal["sgd", "heavy_ball", "nesterov", "sgdw", "adam"]
Rule = Literal["sgd", "sgdw", "adam", "rmsprop"]
RULES: tuple[Rule, ...] = ("sgd", "sgdw", "adam", "rmsprop")


class SGDW(torch.optim.Optimizer):
    """SGD with heavy-ball momentum and *decoupled* weight decay (physics.md §2.1, "SGDW").

    Per parameter: v_{t+1} = β v_t + g_t (the buffer starts at g_0), then
    θ_{t+1} = (1 − ηλ) θ_t − η v_{t+1}. With β = 0 this is exactly ``torch.optim.SGD`` with
    coupled weight decay. ``maximize`` ascends (g → −g).

    Args:
        params: parameters or param-group dicts.
        lr: η.
        momentum: β in [0, 1).
        weight_decay: λ ≥ 0 (decoupled).
        maximize: ascend instead of descend.

    Example:
        >>> p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = SGDW([p], lr=0.5, momentum=0.9, weight_decay=0.1)
        >>> p.grad = torch.tensor([1.0, 0.0])
        >>> _ = opt.step()
        >>> p.detach()  # (1 − 0.05)·θ − 0.5·g
        tensor([0.4500, 1.9000])
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0,
                 *, maximize: bool = False) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Expected `lr` to be a non-negative float but got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Expected `momentum` in [0, 1) but got {momentum!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Expected `weight_decay` to be a non-negative float but got {weight_decay!r}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "maximize": maximize})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One decoupled step for every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                d = g
                if beta != 0.0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = g.detach().clone()
                    else:
                        buf.mul_(beta).add_(g)
                    d = buf
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                p.add_(d, alpha=-lr)
        return loss


@dataclass(frozen=True)
class Hyper:
    """Hyperparameters of one param group at one step (physics.md §0 notation).

    Attributes:
        lr: η_t.
        wd: λ.
        momentum: β (SGD, SGDW, RMSprop's momentum) or β1 (Adam).
        dampening: τ (SGD).
        nesterov: Nesterov momentum (SGD).
        maximize: the optimizer ascends (g → −g).
        rule: the optimizer's update rule (see the module's support matrix).
        decoupled: weight decay acts as θ ← (1 − ηλ)θ (SGDW, AdamW); otherwise it enters the gradient.
        beta2: β2 (Adam) or α (RMSprop).
        eps: ε of the adaptive denominator.
        amsgrad: Adam's AMSGrad variant.
        centered: RMSprop's centered variant.
    """

    lr: float
    wd: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    rule: Rule = "sgd"
    decoupled: bool = False
    beta2: float = 0.0
    eps: float = 0.0
    amsgrad: bool = False
    centered: bool = False

    @property
    def family(self) -> Family:
        """Which exact identity of physics.md §2.1 applies."""
        if self.rule in ("adam", "rmsprop"):
            return "adam"
        if self.momentum == 0.0:
            return "sgd"  # SGDW without momentum is exactly coupled SGD
        if self.rule == "sgdw":
            return "sgdw"
        return "nesterov" if self.nesterov else "heavy_ball"

    @property
    def metric(self) -> bool:
        """Whether the metric identity Σ G θ² of physics.md §2.1 holds (adaptive rule without momentum)."""
        return self.rule in ("adam", "rmsprop") and self.momentum == 0.0


def _overrides_step(cls: type, base: type) -> bool:
    return getattr(cls, "step", None) is not getattr(base, "step", None)


def _as_float(x: Any, name: str) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise TypeError(f"Expected param group entry `{name}` to be a scalar but got a tensor of shape "
                            f"{tuple(x.shape)}")
        # A tensor lr (capturable/fused optimizers) usually lives on the host; reading it there is
        # not a device sync. Keep it a float for the arithmetic below.
        return float(x.detach().cpu())
    return float(x)


_REGISTRY: dict[type, Rule] = {
    torch.optim.SGD: "sgd",
    SGDW: "sgdw",
    torch.optim.Adam: "adam",
    torch.optim.AdamW: "adam",
    torch.optim.RMSprop: "rmsprop",
}


def register_optimizer(cls: type, rule: Rule, *, overwrite: bool = False) -> None:
    """Declare that ``cls.step`` follows one of the modelled update rules exactly.

    Use it for your own optimizer class whose step is algebraically one of the rules of the support
    matrix (for instance a decoupled SGD: ``register_optimizer(MySGDW, "sgdw")``). The param-group
    and state keys must be the ones the rule reads (see :class:`Hyper`).

    Raises:
        TypeError: if ``cls`` is not a ``torch.optim.Optimizer`` subclass.
        ValueError: for an unknown ``rule``, or a class already registered without ``overwrite``.
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"Expected `cls` to be a torch.optim.Optimizer subclass but got {cls!r}")
    if rule not in RULES:
        raise ValueError(f"Expected `rule` to be one of {RULES} but got {rule!r}")
    if cls in _REGISTRY and not overwrite:
        raise ValueError(f"{cls.__name__} is already registered as {_REGISTRY[cls]!r}; pass overwrite=True")
    _REGISTRY[cls] = rule


def _lookup(cls: type) -> tuple[Rule | None, type | None]:
    for base in cls.__mro__:
        if base in _REGISTRY:
            return _REGISTRY[base], base
    return None, None


@dataclass(frozen=True)
class AdaptiveTensors:
    """Per-parameter tensors of an adaptive step (Adam, AdamW, RMSprop), all from the post-step state.

    The update is θ_{t+1} = (1 − ηλ_d) θ_t − η u_t (λ_d: decoupled decay, else 0).

    Attributes:
        update: u_t, the update direction.
        metric: G_t = sqrt(v̂_t) + ε, the diagonal metric (``None`` unless the metric identity holds).
        drive: d_t = G_t ⊙ u_t, the (decayed, signed) gradient the metric divides (``None`` likewise).
    """

    update: dict[str, Tensor | None]
    metric: dict[str, Tensor | None] | None
    drive: dict[str, Tensor | None] | None


def stepped_batches(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], hyper: Mapping[str, Hyper],
                    grads: Mapping[str, Tensor | None]) -> dict[Hyper, list[str]]:
    """The parameters the step updated (a gradient and an optimizer state), by hyperparameters."""
    batches: dict[Hyper, list[str]] = {}
    for n, p in params.items():
        if grads[n] is not None and optimizer.state.get(p):
            batches.setdefault(hyper[n], []).append(n)
    return batches


def adam_bias_corrections(states: list[Mapping[str, Any]], h: Hyper) -> tuple[list[Tensor], list[Tensor]]:
    """Adam's bias corrections 1 − β1^t and sqrt(1 − β2^t) of each state.

    0-dim float64 tensors made from the state's step tensor as torch computes them (the step count
    is never read on the host).
    """
    steps = torch.stack([torch.as_tensor(st["step"]) for st in states]).to(torch.float64)
    return list((1.0 - h.momentum**steps).unbind()), list((1.0 - h.beta2**steps).sqrt().unbind())


def adaptive_tensors(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor],
                     hyper: Mapping[str, Hyper], grads: Mapping[str, Tensor | None]) -> AdaptiveTensors:
    """The update direction u (and the metric G where it applies) of each parameter, after the step.

    Adam/AdamW: u = m̂ / (sqrt(v̂) + ε) with torch's bias corrections (``max_exp_avg_sq`` under
    AMSGrad); the coupled decay is inside m. RMSprop: u = buffer with momentum, else
    u = (s·g + λθ_{t+1}) / (G − ηλ), which is (s·g + λθ_t)/G rewritten through the update itself
    (s = −1 under ``maximize``). Tensors of one param group are processed together with
    ``torch._foreach_*`` ops (a fixed number of dispatches per group, whatever the depth), and the
    step counts are never read on the host.

    Args:
        optimizer: the optimizer, after its step.
        params: name → parameter (θ_{t+1}).
        hyper: name → the param group's hyperparameters.
        grads: name → the gradient the step consumed (``None``: skipped this step).
    """
    update: dict[str, Tensor | None] = dict.fromkeys(params)
    metric: dict[str, Tensor | None] = dict.fromkeys(params)
    drive: dict[str, Tensor | None] = dict.fromkeys(params)
    any_metric = False
    u: list[Tensor] | tuple[Tensor, ...]  # the torch._foreach_* ops take lists and return tuples
    d: list[Tensor] | tuple[Tensor, ...]
    for h, names in stepped_batches(optimizer, params, hyper, grads).items():
        states = [optimizer.state[params[n]] for n in names]
        if h.rule == "adam":
            bc1, bc2_sqrt = adam_bias_corrections(states, h)
            G = torch._foreach_sqrt([st["max_exp_avg_sq" if h.amsgrad else "exp_avg_sq"] for st in states])
            torch._foreach_div_(G, bc2_sqrt)
            torch._foreach_add_(G, h.eps)
            m = [st["exp_avg"] for st in states]
            keep = h.metric
            if keep:  # G and d = m/(1 − β1^t) are the metric and the drive: both kept
                d = torch._foreach_div(m, bc1)
                u = torch._foreach_div(d, G)
            else:  # u = m / ((1 − β1^t) G), made in G's memory: one new tensor per parameter, not three
                torch._foreach_mul_(G, bc1)
                torch._foreach_reciprocal_(G)
                torch._foreach_mul_(G, m)
                u, d = G, G
        else:  # rmsprop
            sq: list[Tensor] | tuple[Tensor, ...] = [st["square_avg"] for st in states]
            if h.centered:
                ga = [st["grad_avg"] for st in states]
                sq = torch._foreach_addcmul(sq, ga, ga, value=-1.0)
            G = torch._foreach_sqrt(sq)
            torch._foreach_add_(G, h.eps)
            if h.momentum > 0.0:
                u, d, keep = [st["momentum_buffer"] for st in states], G, False
            else:
                g = cast("list[Tensor]", [grads[n] for n in names])  # stepped_batches: no None gradient
                d = torch._foreach_neg(g) if h.maximize else list(g)
                if h.wd:
                    # u (G − ηλ) = s·g + λθ_{t+1}; then d := G u = s·g + λθ_t
                    d = torch._foreach_add(d, [params[n].detach() for n in names], alpha=h.wd)
                    u = torch._foreach_div(d, torch._foreach_sub(G, h.lr * h.wd))
                    d = torch._foreach_mul(G, u)
                else:
                    u = torch._foreach_div(d, G)
                keep = True
        for n, gi, di, ui in zip(names, G, d, u):
            update[n] = ui
            metric[n], drive[n] = (gi, di) if keep else (None, None)
        any_metric = any_metric or keep
    return AdaptiveTensors(update, metric if any_metric else None, drive if any_metric else None)


@dataclass(frozen=True)
class OptimizerModel:
    """What the tracker knows about an optimizer.

    Attributes:
        name: the optimizer's class name.
        family: the family of the first param group, or ``None`` if the optimizer is not modelled.
        reason: why it is not modelled (``None`` when it is).
        rule: the update rule (``None`` if not modelled).
    """

    name: str
    family: Family | None
    reason: str | None
    rule: Rule | None = None

    @property
    def supported(self) -> bool:
        """Whether exact per-step predictions are available."""
        return self.reason is None

    def hyper(self, group: Mapping[str, Any]) -> Hyper:
        """Read one param group's hyperparameters now."""
        rule = self.rule or "sgd"
        lr = _as_float(group["lr"], "lr")
        wd = _as_float(group.get("weight_decay", 0.0), "weight_decay")
        mx = bool(group.get("maximize", False))
        if rule in ("sgd", "sgdw"):
            return Hyper(lr=lr, wd=wd, momentum=_as_float(group.get("momentum", 0.0), "momentum"),
                         dampening=_as_float(group.get("dampening", 0.0), "dampening"),
                         nesterov=bool(group.get("nesterov", False)), maximize=mx, rule=rule,
                         decoupled=rule == "sgdw")
        if rule == "adam":
            b1, b2 = group["betas"]
            return Hyper(lr=lr, wd=wd, momentum=_as_float(b1, "betas[0]"), maximize=mx, rule=rule,
                         decoupled=bool(group.get("decoupled_weight_decay", False)), beta2=_as_float(b2, "betas[1]"),
                         eps=_as_float(group["eps"], "eps"), amsgrad=bool(group.get("amsgrad", False)))
        return Hyper(lr=lr, wd=wd, momentum=_as_float(group.get("momentum", 0.0), "momentum"), maximize=mx,
                     rule=rule, beta2=_as_float(group["alpha"], "alpha"), eps=_as_float(group["eps"], "eps"),
                     centered=bool(group.get("centered", False)))

    def momentum_buffer(self, optimizer: torch.optim.Optimizer, p: Tensor) -> Tensor | None:
        """The heavy-ball buffer v of ``p`` (``None`` before the first step and for adaptive rules)."""
        if self.rule in ("adam", "rmsprop"):
            return None
        state = optimizer.state.get(p)
        return None if state is None else state.get("momentum_buffer")


def optimizer_model(optimizer: torch.optim.Optimizer) -> OptimizerModel:
    """Decide whether the optimizer's update rule is modelled exactly.

    A class registered (or one of its bases, when the subclass does not override ``step``) is
    modelled; anything else, including closure-driven optimizers like ``LBFGS`` and per-layer
    rescaling optimizers (LARS/LAMB-style subclasses that override ``step``), is measured only.
    """
    cls = type(optimizer)
    name = cls.__name__
    rule, base = _lookup(cls)
    if rule is None or base is None:
        supported = ", ".join(sorted(c.__name__ for c in _REGISTRY))
        return OptimizerModel(name, None, f"no exact per-step model for {name} (supported: {supported})")
    if cls is not base and _overrides_step(cls, base):
        return OptimizerModel(name, None, f"{name} subclasses {base.__name__} but overrides step()")
    probe = OptimizerModel(name, None, None, rule)
    fam = probe.hyper(optimizer.param_groups[0]).family
    return OptimizerModel(name, fam, None, rule)
