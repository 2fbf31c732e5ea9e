"""Predictions as pure tensor functions: exact per-step identities, residuals, effective rates.

Everything here acts elementwise on float64 vectors (one entry per reduction neuron or per group
neuron) and on Python floats or tensors of hyperparameters; there is no I/O and no ``nn.Module``.
Formulas and their numerical evidence are in physics.md; each function cites its section.

Inputs of the per-step identities are the bilinear sums of one tensor's neurons (physics.md §0),
measured at two points:

* before the step (pre-hook): ``Q0 = red(θ_t²)``, ``P0 = red(θ_t v_t)``;
* after the step (post-hook): ``Q1 = red(θ_{t+1}²)``, ``X = red(θ_{t+1} g_t)``, ``G = red(g_t²)``,
  and with momentum ``Y = red(v_{t+1} g_t)``, ``K = red(v_{t+1}²)``, ``Z = red(θ_{t+1} v_{t+1})``.

θ_t-quantities that also need g_t (the breaking force R_t = B(θ_t, g_t)) are recovered from the
post-step values through the optimizer's own update rule (physics.md §3.3), so no parameter copy
is ever made.

Example (plain SGD, one neuron, exact arithmetic):
    >>> import torch
    >>> t = lambda x: torch.tensor([x], dtype=torch.float64)
    >>> lr, wd = 0.1, 0.0
    >>> w0 = torch.tensor([3.0, 4.0], dtype=torch.float64)
    >>> g = torch.tensor([0.8, -0.6], dtype=torch.float64)        # g ⟂ w: R = 0
    >>> w1 = w0 - lr * g
    >>> terms = sgd_step(Q0=t(25.0), Q1=t(float(w1 @ w1)), X=t(float(w1 @ g)), G=t(1.0), lr=lr, wd=wd)
    >>> float(terms.symmetric), abs(float(terms.observed - terms.symmetric)) < 1e-14
    (0.010000000000000002, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]

__all__ = [
    "StepTerms",
    "angular_update",
    "effective_lr_sgd",
    "heavy_ball_step",
    "nesterov_step",
    "residual_decomposition",
    "sgd_step",
]


@dataclass
class StepTerms:
    """One step of a quadratic charge, split as physics.md §3.2 does (per reduction neuron).

    Attributes:
        observed: ΔQ_obs = Q_{t+1} − Q_t.
        symmetric: ΔQ_sym, the exact identity with R_t := 0.
        breaking: ΔQ_break = −2 η c R_t, the measured symmetry-breaking term.
        terms: Σ |individual terms of ΔQ_sym| (the scale D_t is built from it).
        force: R_t = B(θ_t, g_t) itself.
        coeff: c·η, the factor of −2R_t in ``breaking`` (per tensor, for mixed groups).
        step_sq: |Δθ|² = red((θ_{t+1} − θ_t)²), for the angular update.
    """

    observed: Tensor
    symmetric: Tensor
    breaking: Tensor
    terms: Tensor
    force: Tensor
    coeff: Tensor
    step_sq: Tensor


def _t(x: Scalar, like: Tensor) -> Tensor:
    return x if isinstance(x, Tensor) else torch.full_like(like, float(x))


def sgd_step(*, Q0: Tensor, Q1: Tensor, X: Tensor, G: Tensor, lr: Scalar, wd: Scalar,
             maximize: bool = False) -> StepTerms:
    """``torch.optim.SGD`` without momentum, coupled weight decay (physics.md §2.1).

    θ_{t+1} = (1 − ηλ) θ_t − η g_t, hence exactly

        Q_{t+1} = (1 − ηλ)² Q_t + η² |g_t|² − 2η(1 − ηλ) R_t,
        R_t = B(θ_t, g_t) = (B(θ_{t+1}, g_t) + η |g_t|²) / (1 − ηλ).

    Args:
        Q0: red(θ_t²).  Q1: red(θ_{t+1}²).  X: red(θ_{t+1} g_t).  G: red(g_t²).
        lr: η_t.  wd: λ.  maximize: the optimizer ascends (g → −g).
    """
    eta, lam = _t(lr, Q0), _t(wd, Q0)
    if maximize:
        X = -X
    a = 1.0 - eta * lam
    R = (X + eta * G) / a
    decay = (a * a - 1.0) * Q0
    kinetic = eta * eta * G
    coeff = eta * a
    step_sq = eta * eta * (G + 2.0 * lam * R + lam * lam * Q0)
    return StepTerms(
        observed=Q1 - Q0,
        symmetric=decay + kinetic,
        breaking=-2.0 * coeff * R,
        terms=decay.abs() + kinetic,
        force=R,
        coeff=coeff,
        step_sq=step_sq,
    )


def heavy_ball_step(*, Q0: Tensor, Q1: Tensor, P0: Tensor, X: Tensor, Y: Tensor, K: Tensor, lr: Scalar,
                    wd: Scalar, momentum: Scalar, c: Scalar, maximize: bool = False) -> StepTerms:
    """``torch.optim.SGD`` with heavy-ball momentum β and dampening τ (physics.md §2.1).

    v_{t+1} = β v_t + c_t (g_t + λ θ_t), θ_{t+1} = θ_t − η v_{t+1}, c_t = 1 on the step that
    creates the buffer and 1 − τ afterwards. Exactly:

        A_t = B(θ_t, v_{t+1}) = β P_t + c_t (λ Q_t + R_t)
        Q_{t+1} = Q_t − 2η A_t + η² K_t,     R_t = B(θ_{t+1}, g_t) + η B(v_{t+1}, g_t)

    Args:
        Q0, P0: red(θ_t²), red(θ_t v_t) (0 before the buffer exists).
        Q1, X, Y, K: red(θ_{t+1}²), red(θ_{t+1} g_t), red(v_{t+1} g_t), red(v_{t+1}²).
        lr, wd, momentum: η_t, λ, β.  c: c_t.  maximize: g → −g.
    """
    eta, lam, beta, c = _t(lr, Q0), _t(wd, Q0), _t(momentum, Q0), _t(c, Q0)
    if maximize:
        X, Y = -X, -Y
    R = X + eta * Y
    radial = -2.0 * eta * beta * P0
    decay = -2.0 * eta * c * lam * Q0
    kinetic = eta * eta * K
    coeff = eta * c
    return StepTerms(
        observed=Q1 - Q0,
        symmetric=radial + decay + kinetic,
        breaking=-2.0 * coeff * R,
        terms=radial.abs() + decay.abs() + kinetic,
        force=R,
        coeff=coeff,
        step_sq=kinetic,
    )


def nesterov_step(*, Q0: Tensor, Q1: Tensor, P0: Tensor, X: Tensor, G: Tensor, Y: Tensor, K: Tensor, Z: Tensor,
                  lr: Scalar, wd: Scalar, momentum: Scalar, c: Scalar, maximize: bool = False) -> StepTerms:
    """``torch.optim.SGD(nesterov=True)`` (physics.md §2.1; torch requires τ = 0).

    u_t = d_t + β v_{t+1}, d_t = g_t + λθ_t, θ_{t+1} = θ_t − η u_t. From the post-step values,
    u_t = (g_t + β v_{t+1} + λ θ_{t+1}) / (1 − ηλ), and exactly

        B(θ_t, u_t) = λQ_t + R_t + β A_t,  A_t = β P_t + c_t(λQ_t + R_t)
        Q_{t+1} = Q_t − 2η B(θ_t, u_t) + η² B(u_t, u_t)

    Args:
        Z: red(θ_{t+1} v_{t+1}); the rest as in :func:`heavy_ball_step`, plus G = red(g_t²).
    """
    eta, lam, beta, c = _t(lr, Q0), _t(wd, Q0), _t(momentum, Q0), _t(c, Q0)
    if maximize:
        X, Y = -X, -Y
    a = 1.0 - eta * lam
    R = (X + eta * G + eta * beta * Y) / a
    uu = (G + beta * beta * K + lam * lam * Q1 + 2.0 * beta * Y + 2.0 * lam * X + 2.0 * beta * lam * Z) / (a * a)
    radial = -2.0 * eta * beta * beta * P0
    decay = -2.0 * eta * (1.0 + beta * c) * lam * Q0
    kinetic = eta * eta * uu
    coeff = eta * (1.0 + beta * c)
    return StepTerms(
        observed=Q1 - Q0,
        symmetric=radial + decay + kinetic,
        breaking=-2.0 * coeff * R,
        terms=radial.abs() + decay.abs() + kinetic,
        force=R,
        coeff=coeff,
        step_sq=kinetic,
    )


def residual_decomposition(observed: Tensor, symmetric: Tensor, breaking: Tensor, terms: Tensor,
                           rounding: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Drift residual r, symmetry-breaking share b and unexplained residual e (physics.md §3.2).

        D = Σ|terms of ΔQ_sym| + 4 u_w M,   r = (ΔQ_obs − ΔQ_sym)/D,   b = ΔQ_break/D,   e = r − b

    |e| ≲ 1 means the optimizer model explains the step up to rounding; |e| ≫ 1 means it does not.

    Args:
        observed, symmetric, breaking, terms: group-neuron values (see :class:`StepTerms`).
        rounding: u_w·M_t per neuron: the group size (all signs +) times the unit roundoff of the
            weights' dtype (2^-24 for float32), summed over tensors of different dtypes.

    Returns:
        ``(r, b, e)``.
    """
    D = terms + 4.0 * rounding
    D = torch.where(D > 0, D, torch.ones_like(D))
    r = (observed - symmetric) / D
    b = breaking / D
    return r, b, r - b


def effective_lr_sgd(lr: Scalar, wd: Scalar, Q: Tensor, momentum: Scalar = 0.0) -> Tensor:
    """Effective learning rate of a scale-invariant group (physics.md §2.3).

    SGD: η_eff = η / ((1 − ηλ) Q), exact for the direction ŵ. Heavy ball: the long-time
    η / ((1 − β) Q).
    """
    eta, lam, beta = _t(lr, Q), _t(wd, Q), _t(momentum, Q)
    denom = torch.where(beta > 0, 1.0 - beta, 1.0 - eta * lam) * Q
    return eta / denom


def angular_update(Q0: Tensor, Q1: Tensor, step_sq: Tensor) -> Tensor:
    """Measured angle between w_t and w_{t+1} of a scale group, 2·asin(|ŵ_{t+1} − ŵ_t|/2) (§2.3).

    Uses |â − b̂|² = (|a − b|² − (|a| − |b|)²) / (|a||b|), which keeps full precision for tiny
    angles where acos would lose it; |a − b|² = |Δθ|² comes from the optimizer's update rule.
    """
    n0, n1 = Q0.clamp_min(0).sqrt(), Q1.clamp_min(0).sqrt()
    dn = (Q1 - Q0) / (n0 + n1).clamp_min(torch.finfo(Q0.dtype).tiny)
    chord_sq = (step_sq - dn * dn).clamp_min(0) / (n0 * n1).clamp_min(torch.finfo(Q0.dtype).tiny)
    return 2.0 * torch.asin((chord_sq.sqrt() / 2.0).clamp(max=1.0))


def unit_roundoff(dtype: torch.dtype) -> float:
    """u_w = eps/2 of a floating dtype (2^-24 for float32, 2^-53 for float64, 2^-8 for bfloat16)."""
    return torch.finfo(dtype).eps / 2.0

