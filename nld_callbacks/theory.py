"""Predictions as pure tensor functions: exact per-step identities, residuals, continuous laws, equilibria.

Everything here acts elementwise on float64 vectors (one entry per reduction neuron or per group
neuron) and on Python floats or tensors of hyperparameters; there is no I/O and no ``nn.Module``.
Formulas and their numerical evidence are in physics.md; each function cites its section.

Inputs of the per-step identities are the bilinear sums of one tensor's neurons (physics.md §0),
measured at two points:

* before the step (pre-hook, or the previous step's post-hook values of the same tensors):
  ``Q0 = red(θ_t²)``, ``P0 = red(θ_t v_t)``; for linear charges ``T0 = red(θ_t)``, ``S0 = red(v_t)``;
* after the step (post-hook): ``Q1 = red(θ_{t+1}²)``, ``X = red(θ_{t+1} g_t)``, ``G = red(g_t²)``,
  and with momentum ``Y = red(v_{t+1} g_t)``, ``K = red(v_{t+1}²)``, ``Z = red(θ_{t+1} v_{t+1})``;
  for adaptive optimizers ``U = red(θ_{t+1} u_t)``, ``UU = red(u_t²)`` with u_t the update direction.

θ_t-quantities that also need g_t (the breaking force R_t = B(θ_t, g_t)) are recovered from the
post-step values through the optimizer's own update rule (physics.md §3.3), so no parameter copy
is ever made.

Sections:

* §2.1 exact identities: :func:`sgd_step`, :func:`heavy_ball_step`, :func:`nesterov_step`,
  :func:`sgdw_step`, :func:`adaptive_step` (Adam/AdamW/RMSprop: trivial identity + radial share),
  :func:`metric_step` (β1 = 0), and the linear (translation) forms ``linear_*_step``;
* §3.2 :func:`residual_decomposition`;
* §2.2 continuous laws as one-step propagators: :func:`first_order_propagator`,
  :func:`oscillator_propagator`, :func:`propagate`; their coefficients :func:`nld_sgd_coefficients`,
  :func:`nld_heavy_ball_coefficients`;
* §2.3 :func:`effective_lr_sgd`, :func:`effective_lr_momentum`, :func:`effective_lr_adaptive`,
  :func:`angular_update`, :func:`rmsprop_correspondence`, :func:`spherical_rmsprop_step`;
* §2.4 ``equilibrium_*``, ``equilibrium_angle_*``, ``relaxation_steps_*``.

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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]  # noqa: UP007 (a runtime alias)

__all__ = [
    "RMSPropForm",
    "StepTerms",
    "adaptive_step",
    "angular_update",
    "effective_lr_adaptive",
    "effective_lr_momentum",
    "effective_lr_sgd",
    "equilibrium_adamw",
    "equilibrium_angle_adamw",
    "equilibrium_angle_heavy_ball",
    "equilibrium_angle_sgd",
    "equilibrium_from_update",
    "equilibrium_heavy_ball",
    "equilibrium_heavy_ball_walk",
    "equilibrium_sgd",
    "exponential_lr_equivalent",
    "first_order_propagator",
    "heavy_ball_recursion",
    "heavy_ball_step",
    "linear_adaptive_step",
    "linear_heavy_ball_step",
    "linear_nesterov_step",
    "linear_sgd_step",
    "linear_sgdw_step",
    "metric_step",
    "nesterov_recursion",
    "nesterov_step",
    "nld_heavy_ball_coefficients",
    "nld_sgd_coefficients",
    "oscillator_propagator",
    "propagate",
    "relaxation_steps_adamw",
    "relaxation_steps_heavy_ball",
    "relaxation_steps_sgd",
    "residual_decomposition",
    "rmsprop_correspondence",
    "sgd_step",
    "sgdw_recursion",
    "sgdw_step",
    "spherical_rmsprop_step",
    "unit_roundoff",
]


@dataclass
class StepTerms:
    """One step of a charge, split as physics.md §3.2 does (per reduction neuron).

    Attributes:
        observed: ΔQ_obs = Q_{t+1} − Q_t (ΔT for a linear charge).
        symmetric: ΔQ_sym, the exact identity with the symmetry's force set to 0.
        breaking: ΔQ_break = −coeff · force, the measured symmetry-breaking term (for the adaptive
            rules: the radial share of the update, the signature of kinetic symmetry breaking).
        terms: the residual scale without rounding: Σ |individual terms of ΔQ_sym| (quadratic), or
            η Σ|u_k| (linear; u the update direction).
        force: R_t = B(θ_t, g_t) (quadratic), ⟨c, g_t⟩ (linear), or the radial ⟨θ_t, u_t⟩ /
            ⟨c, u_t⟩ (adaptive rules).
        coeff: the factor of −force in ``breaking`` (2ηc quadratic, ηc linear; per tensor, for
            groups that mix learning rates or weight decays).
        step_sq: |Δθ|² = red((θ_{t+1} − θ_t)²), for the angular update (zero for linear charges).
    """

    observed: Tensor
    symmetric: Tensor
    breaking: Tensor
    terms: Tensor
    force: Tensor
    coeff: Tensor
    step_sq: Tensor

    @classmethod
    def of(cls, *, Q0: Tensor, Q1: Tensor, parts: Sequence[Tensor], force: Tensor, coeff: Tensor,
           step_sq: Tensor) -> StepTerms:
        """Assemble the split of physics.md §3.2 from the symmetric prediction's individual terms.

        observed = Q1 − Q0, symmetric = Σ parts, terms = Σ |parts|, breaking = −coeff·force.
        """
        stacked = torch.stack(list(parts))
        return cls(observed=Q1 - Q0, symmetric=stacked.sum(0), breaking=-coeff * force, terms=stacked.abs().sum(0),
                   force=force, coeff=coeff, step_sq=step_sq)


def _t(x: Scalar, like: Tensor) -> Tensor:
    return x if isinstance(x, Tensor) else torch.full_like(like, float(x))


# --------------------------------------------------------------------------------------------
# §2.1 exact per-step identities, quadratic charges Q = B(θ, θ)


def sgd_step(*, Q0: Tensor, Q1: Tensor, X: Tensor, G: Tensor, lr: Scalar, wd: Scalar,
             maximize: bool = False) -> StepTerms:
    """``torch.optim.SGD`` without momentum, coupled weight decay (physics.md §2.1).

    θ_{t+1} = (1 − ηλ) θ_t − η g_t, hence exactly

        Q_{t+1} = (1 − ηλ)² Q_t + η² |g_t|² − 2η(1 − ηλ) R_t,
        R_t = B(θ_t, g_t) = (B(θ_{t+1}, g_t) + η |g_t|²) / (1 − ηλ).

    Args:
        Q0: red(θ_t²).
        Q1: red(θ_{t+1}²).
        X: red(θ_{t+1} g_t).
        G: red(g_t²).
        lr: η_t.
        wd: λ.
        maximize: the optimizer ascends (g → −g).
    """
    eta, lam = _t(lr, Q0), _t(wd, Q0)
    if maximize:
        X = -X
    a = 1.0 - eta * lam
    R = (X + eta * G) / a
    decay = (a * a - 1.0) * Q0
    kinetic = eta * eta * G
    coeff = 2.0 * eta * a
    step_sq = eta * eta * (G + 2.0 * lam * R + lam * lam * Q0)
    return StepTerms.of(Q0=Q0, Q1=Q1, parts=(decay, kinetic), force=R, coeff=coeff,
                        step_sq=step_sq)


def heavy_ball_step(*, Q0: Tensor, Q1: Tensor, P0: Tensor, X: Tensor, Y: Tensor, K: Tensor, lr: Scalar,
                    wd: Scalar, momentum: Scalar, c: Scalar, maximize: bool = False) -> StepTerms:
    """``torch.optim.SGD`` with heavy-ball momentum β and dampening τ (physics.md §2.1).

    v_{t+1} = β v_t + c_t (g_t + λ θ_t), θ_{t+1} = θ_t − η v_{t+1}, c_t = 1 on the step that
    creates the buffer and 1 − τ afterwards. Exactly:

        A_t = B(θ_t, v_{t+1}) = β P_t + c_t (λ Q_t + R_t)
        Q_{t+1} = Q_t − 2η A_t + η² K_t,     R_t = B(θ_{t+1}, g_t) + η B(v_{t+1}, g_t)

    Args:
        Q0: red(θ_t²).
        Q1: red(θ_{t+1}²).
        P0: red(θ_t v_t) (0 before the buffer exists).
        X: red(θ_{t+1} g_t).
        Y: red(v_{t+1} g_t).
        K: red(v_{t+1}²).
        lr: η_t.
        wd: λ.
        momentum: β.
        c: c_t.
        maximize: g → −g.
    """
    eta, lam, beta, c = _t(lr, Q0), _t(wd, Q0), _t(momentum, Q0), _t(c, Q0)
    if maximize:
        X, Y = -X, -Y
    R = X + eta * Y
    radial = -2.0 * eta * beta * P0
    decay = -2.0 * eta * c * lam * Q0
    kinetic = eta * eta * K
    coeff = 2.0 * eta * c
    return StepTerms.of(Q0=Q0, Q1=Q1, parts=(radial, decay, kinetic), force=R, coeff=coeff,
                        step_sq=kinetic)


def nesterov_step(*, Q0: Tensor, Q1: Tensor, P0: Tensor, X: Tensor, G: Tensor, Y: Tensor, K: Tensor, Z: Tensor,
                  lr: Scalar, wd: Scalar, momentum: Scalar, c: Scalar, maximize: bool = False) -> StepTerms:
    """``torch.optim.SGD(nesterov=True)`` (physics.md §2.1; torch requires τ = 0).

    u_t = d_t + β v_{t+1}, d_t = g_t + λθ_t, θ_{t+1} = θ_t − η u_t. From the post-step values,
    u_t = (g_t + β v_{t+1} + λ θ_{t+1}) / (1 − ηλ), and exactly

        B(θ_t, u_t) = λQ_t + R_t + β A_t,  A_t = β P_t + c_t(λQ_t + R_t)
        Q_{t+1} = Q_t − 2η B(θ_t, u_t) + η² B(u_t, u_t)

    Args:
        Q0: red(θ_t²).
        Q1: red(θ_{t+1}²).
        P0: red(θ_t v_t) (0 before the buffer exists).
        X: red(θ_{t+1} g_t).
        G: red(g_t²).
        Y: red(v_{t+1} g_t).
        K: red(v_{t+1}²).
        Z: red(θ_{t+1} v_{t+1}).
        lr: η_t.
        wd: λ.
        momentum: β.
        c: c_t.
        maximize: g → −g.
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
    coeff = 2.0 * eta * (1.0 + beta * c)
    return StepTerms.of(Q0=Q0, Q1=Q1, parts=(radial, decay, kinetic), force=R, coeff=coeff,
                        step_sq=kinetic)


def sgdw_step(*, Q0: Tensor, Q1: Tensor, P0: Tensor, X: Tensor, Y: Tensor, K: Tensor, lr: Scalar, wd: Scalar,
              momentum: Scalar, maximize: bool = False) -> StepTerms:
    """SGD with momentum and decoupled weight decay (SGDW, physics.md §2.1).

    v_{t+1} = β v_t + g_t, θ_{t+1} = (1 − ηλ) θ_t − η v_{t+1}. With a = 1 − ηλ, exactly

        Q_{t+1} = a² Q_t − 2ηa (β P_t + R_t) + η² K_t,    P_{t+1} = a(β P_t + R_t) − η K_t,
        R_t = (B(θ_{t+1}, g_t) + η B(v_{t+1}, g_t)) / a.

    Args:
        Q0: red(θ_t²).
        Q1: red(θ_{t+1}²).
        P0: red(θ_t v_t) (0 before the buffer exists).
        X: red(θ_{t+1} g_t).
        Y: red(v_{t+1} g_t).
        K: red(v_{t+1}²).
        lr: η_t.
        wd: λ (decoupled).
        momentum: β.
        maximize: g → −g.
    """
    eta, lam, beta = _t(lr, Q0), _t(wd, Q0), _t(momentum, Q0)
    if maximize:
        X, Y = -X, -Y
    a = 1.0 - eta * lam
    R = (X + eta * Y) / a
    decay = (a * a - 1.0) * Q0
    radial = -2.0 * eta * a * beta * P0
    kinetic = eta * eta * K
    coeff = 2.0 * eta * a
    shrink = 1.0 - a  # = ηλ; Δθ = −ηλ θ_t − η v_{t+1}
    step_sq = shrink * shrink * Q0 + 2.0 * shrink * eta * (beta * P0 + R) + kinetic
    return StepTerms.of(Q0=Q0, Q1=Q1, parts=(decay, radial, kinetic), force=R, coeff=coeff,
                        step_sq=step_sq)


def adaptive_step(*, Q0: Tensor, Q1: Tensor, U: Tensor, UU: Tensor, lr: Scalar, decay: Scalar) -> StepTerms:
    """Adam, AdamW, RMSprop: the trivial identity, split into tangential and radial parts (§2.1, §2.5).

    θ_{t+1} = (1 − ηλ_d) θ_t − η u_t, with u_t the update direction read from the optimizer state
    and λ_d the decoupled decay (0 when λ enters the gradient). With a = 1 − ηλ_d, exactly

        Q_{t+1} = a² Q_t + η² B(u, u) − 2ηa B(θ_t, u),   B(θ_t, u) = (B(θ_{t+1}, u) + η B(u, u)) / a.

    The symmetry says nothing about B(θ_t, u): the update of an adaptive rule is not ⟂ θ even when
    g ⟂ θ (kinetic symmetry breaking). So ``symmetric`` is the tangential law a²Q + η²|u|², and
    ``breaking`` is the radial share −2ηa B(θ_t, u): its size is the KSB signature. A small
    unexplained residual e still certifies the model of the update (η, λ_d, the metric).

    Args:
        Q0: red(θ_t²).
        Q1: red(θ_{t+1}²).
        U: red(θ_{t+1} u_t).
        UU: red(u_t²).
        lr: η_t.
        decay: λ_d.
    """
    eta, lam = _t(lr, Q0), _t(decay, Q0)
    a = 1.0 - eta * lam
    radial = (U + eta * UU) / a
    dec = (a * a - 1.0) * Q0
    kinetic = eta * eta * UU
    coeff = 2.0 * eta * a
    shrink = 1.0 - a
    return StepTerms.of(Q0=Q0, Q1=Q1, parts=(dec, kinetic), force=radial, coeff=coeff,
                        step_sq=shrink * shrink * Q0 + 2.0 * shrink * eta * radial + kinetic)


def metric_step(*, QG1: Tensor, XD: Tensor, DU: Tensor, Q0: Tensor, lr: Scalar, decay: Scalar,
                coupled_wd: Scalar = 0.0) -> tuple[Tensor, Tensor]:
    """The metric charge Q_G = Σ G θ² of an adaptive step without momentum (Adam β1 = 0, RMSprop; §2.1).

    With the metric G_t = sqrt(v̂_t) + ε of the step (frozen), θ_{t+1} = aθ_t − η d/G, a = 1 − ηλ_d,
    and d = g (+ λ_c θ_t for a coupled decay λ_c), exactly

        Σ G θ_{t+1}² = a² Σ G θ_t² − 2ηa (R_t + λ_c Q_t) + η² Σ d²/G.

    The pre-step metric charge is not observable before the step's gradient exists (G_t needs
    g_t), so it is recovered through the update itself: Σ G θ_t² = (Q_G,1 + 2η Σθ_{t+1}d + η²Σd²/G)/a².
    The gap between the measured Σ G θ_{t+1}² and the prediction is then the breaking term
    −2ηa R_t (plus rounding); the update model itself is certified by the Euclidean residual of
    :func:`adaptive_step`, whose Q_t is measured before the step.

    Args:
        QG1: red(G θ_{t+1}²).
        XD: red(θ_{t+1} d).
        DU: red(d²/G) = red(d u).
        Q0: red(θ_t²) (Euclidean; enters with a coupled decay).
        lr: η.
        decay: λ_d.
        coupled_wd: λ_c.

    Returns:
        ``(Σ G θ_t², predicted Σ G θ_{t+1}² with R := 0)``.
    """
    eta, lam, lc = _t(lr, QG1), _t(decay, QG1), _t(coupled_wd, QG1)
    a = 1.0 - eta * lam
    QG0 = (QG1 + 2.0 * eta * XD + eta * eta * DU) / (a * a)
    pred = a * a * QG0 - 2.0 * eta * a * lc * Q0 + eta * eta * DU
    return QG0, pred


def heavy_ball_recursion(*, Q: Tensor, P: Tensor, R: Tensor, K: Tensor, lr: Scalar, wd: Scalar, momentum: Scalar,
                         c: Scalar) -> tuple[Tensor, Tensor]:
    """The exact (Q, P) recursion of heavy ball, forward from the state (physics.md §2.1).

        A_t = β P_t + c_t (λ Q_t + R_t),   Q_{t+1} = Q_t − 2η A_t + η² K_t,   P_{t+1} = A_t − η K_t

    P = B(θ, v) is NLD's Noether momentum: the charge carries a second state variable.

    Args:
        Q: Q_t.
        P: P_t (0 before the buffer exists).
        R: R_t = B(θ_t, g_t) (0 for an exact symmetry).
        K: B(v_{t+1}, v_{t+1}).
        lr: η_t.
        wd: λ.
        momentum: β.
        c: c_t (1 on the step that creates the buffer, 1 − τ after).

    Returns:
        ``(Q_{t+1}, P_{t+1})``.
    """
    eta, lam, beta, c = _t(lr, Q), _t(wd, Q), _t(momentum, Q), _t(c, Q)
    A = beta * P + c * (lam * Q + R)
    return Q - 2.0 * eta * A + eta * eta * K, A - eta * K


def nesterov_recursion(*, Q: Tensor, P: Tensor, R: Tensor, UU: Tensor, UV: Tensor, lr: Scalar, wd: Scalar,
                       momentum: Scalar, c: Scalar) -> tuple[Tensor, Tensor]:
    """The exact (Q, P) recursion of Nesterov SGD (physics.md §2.1).

        B(θ_t, u_t) = λQ_t + R_t + β A_t,   Q_{t+1} = Q_t − 2η B(θ_t, u_t) + η² B(u_t, u_t),
        P_{t+1} = A_t − η B(u_t, v_{t+1})

    Args:
        Q: Q_t.
        P: P_t.
        R: R_t.
        UU: B(u_t, u_t).
        UV: B(u_t, v_{t+1}).
        lr: η_t.
        wd: λ.
        momentum: β.
        c: c_t.

    Returns:
        ``(Q_{t+1}, P_{t+1})``.
    """
    eta, lam, beta, c = _t(lr, Q), _t(wd, Q), _t(momentum, Q), _t(c, Q)
    A = beta * P + c * (lam * Q + R)
    return Q - 2.0 * eta * (lam * Q + R + beta * A) + eta * eta * UU, A - eta * UV


def sgdw_recursion(*, Q: Tensor, P: Tensor, R: Tensor, K: Tensor, lr: Scalar, wd: Scalar,
                   momentum: Scalar) -> tuple[Tensor, Tensor]:
    """The exact (Q, P) recursion of SGDW (decoupled weight decay, physics.md §2.1).

        Q_{t+1} = a² Q_t − 2ηa(β P_t + R_t) + η² K_t,   P_{t+1} = a(β P_t + R_t) − η K_t,   a = 1 − ηλ

    Args:
        Q: Q_t.
        P: P_t.
        R: R_t.
        K: B(v_{t+1}, v_{t+1}).
        lr: η_t.
        wd: λ.
        momentum: β.

    Returns:
        ``(Q_{t+1}, P_{t+1})``.
    """
    eta, lam, beta = _t(lr, Q), _t(wd, Q), _t(momentum, Q)
    a = 1.0 - eta * lam
    A = beta * P + R
    return a * a * Q - 2.0 * eta * a * A + eta * eta * K, a * A - eta * K


# --------------------------------------------------------------------------------------------
# §2.1 exact per-step identities, linear charges T = ⟨c, θ⟩


def _linear(observed: Tensor, symmetric: Tensor, force: Tensor, coeff: Tensor, l1: Tensor) -> StepTerms:
    return StepTerms(observed=observed, symmetric=symmetric, breaking=-coeff * force, terms=l1,
                     force=force, coeff=coeff, step_sq=torch.zeros_like(observed))


def linear_sgd_step(*, T0: Tensor, T1: Tensor, Sg: Tensor, L1: Tensor, lr: Scalar, wd: Scalar,
                    maximize: bool = False) -> StepTerms:
    """Linear charge under ``torch.optim.SGD`` without momentum (physics.md §2.1).

        T_{t+1} = (1 − ηλ) T_t − η ⟨c, g_t⟩     (the symmetry says ⟨c, g⟩ = 0)

    Args:
        T0: red(θ_t).
        T1: red(θ_{t+1}).
        Sg: red(g_t).
        L1: red(|u_t|), u_t = Δθ/(−η), for the residual scale η Σ|u_k| of §3.2.
        lr: η.
        wd: λ.
        maximize: g → −g.
    """
    eta, lam = _t(lr, T0), _t(wd, T0)
    if maximize:
        Sg = -Sg
    return _linear(T1 - T0, -eta * lam * T0, Sg, eta, eta * L1)


def linear_heavy_ball_step(*, T0: Tensor, T1: Tensor, S0: Tensor, Sg: Tensor, L1: Tensor, lr: Scalar, wd: Scalar,
                           momentum: Scalar, c: Scalar, maximize: bool = False) -> StepTerms:
    """Linear charge under heavy-ball SGD (physics.md §2.1).

        S_{t+1} = β S_t + c_t (λ T_t + ⟨c, g_t⟩),   T_{t+1} = T_t − η S_{t+1}    (S = ⟨c, v⟩)

    Args:
        T0: red(θ_t).
        T1: red(θ_{t+1}).
        S0: red(v_t) (0 before the buffer exists).
        Sg: red(g_t).
        L1: red(|u_t|).
        lr: η.
        wd: λ.
        momentum: β.
        c: c_t.
        maximize: g → −g.
    """
    eta, lam, beta, c = _t(lr, T0), _t(wd, T0), _t(momentum, T0), _t(c, T0)
    if maximize:
        Sg = -Sg
    return _linear(T1 - T0, -eta * (beta * S0 + c * lam * T0), Sg, eta * c, eta * L1)


def linear_nesterov_step(*, T0: Tensor, T1: Tensor, S0: Tensor, Sg: Tensor, L1: Tensor, lr: Scalar, wd: Scalar,
                         momentum: Scalar, c: Scalar, maximize: bool = False) -> StepTerms:
    """Linear charge under Nesterov SGD: T_{t+1} = T_t − η(λT_t + ⟨c,g⟩ + β S_{t+1}) (physics.md §2.1)."""
    eta, lam, beta, c = _t(lr, T0), _t(wd, T0), _t(momentum, T0), _t(c, T0)
    if maximize:
        Sg = -Sg
    sym = -eta * (lam * T0 + beta * (beta * S0 + c * lam * T0))
    return _linear(T1 - T0, sym, Sg, eta * (1.0 + beta * c), eta * L1)


def linear_sgdw_step(*, T0: Tensor, T1: Tensor, S0: Tensor, Sg: Tensor, L1: Tensor, lr: Scalar, wd: Scalar,
                     momentum: Scalar, maximize: bool = False) -> StepTerms:
    """Linear charge under SGDW: T_{t+1} = (1 − ηλ)T_t − η(β S_t + ⟨c, g_t⟩) (physics.md §2.1)."""
    eta, lam, beta = _t(lr, T0), _t(wd, T0), _t(momentum, T0)
    if maximize:
        Sg = -Sg
    return _linear(T1 - T0, -eta * lam * T0 - eta * beta * S0, Sg, eta, eta * L1)


def linear_adaptive_step(*, T0: Tensor, T1: Tensor, Su: Tensor, L1: Tensor, lr: Scalar, decay: Scalar) -> StepTerms:
    """Linear charge under Adam/AdamW/RMSprop: T_{t+1} = (1 − ηλ_d)T_t − η⟨c, u_t⟩ (physics.md §2.1).

    A diagonal metric breaks translation kinetically: ⟨c, u⟩ ≠ 0 although ⟨c, g⟩ = 0, so
    ``breaking`` = −η⟨c, u⟩ is the drift itself [V: |ΔT| ≈ 0.6 × L1 of the update].

    Args:
        T0: red(θ_t).
        T1: red(θ_{t+1}).
        Su: red(u_t).
        L1: red(|u_t|).
        lr: η.
        decay: λ_d.
    """
    eta, lam = _t(lr, T0), _t(decay, T0)
    return _linear(T1 - T0, -eta * lam * T0, Su, eta, eta * L1)


# --------------------------------------------------------------------------------------------
# §3.2 residual decomposition


def residual_decomposition(observed: Tensor, symmetric: Tensor, breaking: Tensor, terms: Tensor,
                           rounding: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Drift residual r, symmetry-breaking share b and unexplained residual e (physics.md §3.2).

        D = Σ|terms of ΔQ_sym| + 4 u_w M,   r = (ΔQ_obs − ΔQ_sym)/D,   b = ΔQ_break/D,   e = r − b

    (linear charges: D = η Σ|u_k| + 4 u_w Σ|θ_k|). |e| ≲ 1 means the optimizer model explains the
    step up to rounding; |e| ≫ 1 means it does not.

    Args:
        observed: ΔQ_obs per group neuron (see :class:`StepTerms`).
        symmetric: ΔQ_sym.
        breaking: ΔQ_break.
        terms: Σ|terms of ΔQ_sym| (η Σ|u_k| for a linear charge).
        rounding: u_w·M_t per neuron: the group size (all signs +; Σ|θ_k| for a linear charge)
            times the unit roundoff of the weights' dtype, summed over tensors of different dtypes.

    Returns:
        ``(r, b, e)``.

    Example:
        >>> import torch
        >>> one = torch.ones(1, dtype=torch.float64)
        >>> r, b, e = residual_decomposition(3 * one, 1 * one, 2 * one, one, 0 * one)
        >>> float(r), float(b), float(e)
        (2.0, 2.0, 0.0)
    """
    D = terms + 4.0 * rounding
    D = torch.where(D > 0, D, torch.ones_like(D))
    r = (observed - symmetric) / D
    b = breaking / D
    return r, b, r - b


# --------------------------------------------------------------------------------------------
# §2.2 continuous NLD laws as streaming one-step propagators


def first_order_propagator(rate: Tensor) -> Tensor:
    """One step of Q' = −a Q + f (f constant over the step), in the ``(..., 2, 3)`` propagator form.

    Row 0 maps (Q, Q', f) to Q after one unit of time: e^{−a} Q + (1 − e^{−a})/a · f (→ Q + f at
    a = 0); row 1 is zero (a first-order law carries no velocity). See :func:`propagate`.
    """
    a = rate.to(torch.float64)
    small = a.abs() < 1e-8
    gain = torch.where(small, 1.0 - a / 2.0, -torch.expm1(-a) / torch.where(small, torch.ones_like(a), a))
    out = torch.zeros((*a.shape, 2, 3), dtype=torch.float64, device=a.device)
    out[..., 0, 0] = torch.exp(-a)
    out[..., 0, 2] = gain
    return out


def oscillator_propagator(gamma: Tensor, omega2: Tensor) -> Tensor:
    """One step of Q'' + 2γ Q' + ω² Q = f (f constant over the step), as ``(..., 2, 3)``.

    Exact for piecewise-constant drives: the first two rows of exp([[0, 1, 0], [−ω², −2γ, 1],
    [0, 0, 0]]) map (Q, Q', f) to (Q, Q') one step later. Covers the under-, critically and
    over-damped branches alike (physics.md §2.2).
    """
    gamma, omega2 = torch.broadcast_tensors(gamma.to(torch.float64), omega2.to(torch.float64))
    M = torch.zeros((*gamma.shape, 3, 3), dtype=torch.float64, device=gamma.device)
    M[..., 0, 1] = 1.0
    M[..., 1, 0] = -omega2
    M[..., 1, 1] = -2.0 * gamma
    M[..., 1, 2] = 1.0
    return torch.linalg.matrix_exp(M)[..., :2, :]


def propagate(Q: Tensor, dQ: Tensor, prop: Tensor, drive: Tensor) -> tuple[Tensor, Tensor]:
    """Advance (Q, Q') by one step of a propagator.

    ``prop`` comes from :func:`first_order_propagator` or :func:`oscillator_propagator`: shape
    ``(n, 2, 3)``, or ``(6, n)`` with rows p00 p01 p02 p10 p11 p12. ``drive`` is f of that step.

    Example (no decay, constant drive: the first-order law adds the drive each step):
        >>> import torch
        >>> prop = first_order_propagator(torch.zeros(1, dtype=torch.float64))
        >>> Q, dQ = propagate(torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), prop,
        ...                   torch.full((1,), 0.5, dtype=torch.float64))
        >>> float(Q)
        1.5
    """
    if prop.dim() >= 2 and prop.shape[-2:] == (2, 3):
        p = prop.reshape(*prop.shape[:-2], 6).movedim(-1, 0)
    else:
        p = prop
    state = torch.stack(torch.broadcast_tensors(Q, dQ, drive))
    out = (p.reshape(2, 3, *p.shape[1:]) * state).sum(1)
    return out[0], out[1]


def propagate_steps(Q: Tensor, dQ: Tensor, prop: Tensor, drive: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``n`` steps of :func:`propagate` with the same propagator and drive, in O(log n) operations.

    One step is the affine map s ↦ A s + c of s = (Q, Q'), with A = [[p00, p01], [p10, p11]] and
    c = (p02, p12)·drive; its n-th power comes from repeated squaring (the powers of one map
    commute), so the cost does not grow with n.

    Example (agrees with n single steps):
        >>> import torch
        >>> prop = oscillator_propagator(torch.tensor([0.3], dtype=torch.float64),
        ...                              torch.tensor([0.02], dtype=torch.float64))
        >>> Q, dQ, f = (torch.tensor([v], dtype=torch.float64) for v in (2.0, 0.1, 0.05))
        >>> a, b = Q, dQ
        >>> for _ in range(37):
        ...     a, b = propagate(a, b, prop, f)
        >>> c, d = propagate_steps(Q, dQ, prop, f, 37)
        >>> bool(torch.allclose(a, c, rtol=1e-13) and torch.allclose(b, d, rtol=1e-13))
        True
    """
    if n < 0:
        raise ValueError(f"Expected `n` to be a non-negative int but got {n!r}")
    if prop.dim() >= 2 and prop.shape[-2:] == (2, 3):
        p = prop.reshape(*prop.shape[:-2], 6).movedim(-1, 0)
    else:
        p = prop
    # the map as A (2, 2, ...) and c (2, ...); the result starts as the identity
    A = torch.stack([torch.stack([p[0], p[1]]), torch.stack([p[3], p[4]])])
    c = torch.stack([p[2] * drive, p[5] * drive])
    R = torch.zeros_like(A)
    R[0, 0] = 1.0
    R[1, 1] = 1.0
    r = torch.zeros_like(c)

    def compose(A2: Tensor, c2: Tensor, A1: Tensor, c1: Tensor) -> tuple[Tensor, Tensor]:
        # (A2, c2) ∘ (A1, c1) = (A2 A1, A2 c1 + c2), per neuron
        return (A2.unsqueeze(2) * A1.unsqueeze(0)).sum(1), (A2 * c1.unsqueeze(0)).sum(1) + c2

    while n:
        if n & 1:
            R, r = compose(A, c, R, r)
        n >>= 1
        if n:
            A, c = compose(A, c, A, c)
    return R[0, 0] * Q + R[0, 1] * dQ + r[0], R[1, 0] * Q + R[1, 1] * dQ + r[1]


def nld_sgd_coefficients(lr: Scalar, wd: Scalar, *, linear: bool = False) -> Tensor:
    """Per-step decay rate of NLD's first-order SGD law (physics.md §2.2).

    Quadratic: dQ/dt = −2λQ + η|g|² in t = kη, i.e. per step Q' = −2ηλ Q + η²B(g, g): rate 2ηλ,
    drive η²B(g, g). Linear: T' = −ηλ T (no drive). Returns the rate a.
    """
    lr_t = lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=torch.float64)
    return (1.0 if linear else 2.0) * lr_t * wd


def nld_heavy_ball_coefficients(lr: Scalar, wd: Scalar, momentum: Scalar, dampening: Scalar = 0.0, *,
                                linear: bool = False) -> tuple[Tensor, Tensor]:
    """γ_s and ω_s² of the per-step damped-oscillator law of heavy ball (physics.md §2.2).

        Q'' + 2γ_s Q' + ω_s² Q = 2η²|v|²,   γ_s = (1−β)/(1+β),   ω_s² = 4η(1−τ)λ/(1+β)

    A linear charge has ω_s² = 2η(1−τ)λ/(1+β) and no drive (NM-code ``translation.py``).
    """
    lr_t = lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=torch.float64)
    beta = momentum
    gamma = (1.0 - beta) / (1.0 + beta) + 0.0 * lr_t
    omega2 = (2.0 if linear else 4.0) * lr_t * (1.0 - dampening) * wd / (1.0 + beta)
    return gamma, omega2


# --------------------------------------------------------------------------------------------
# §2.3 implicit adaptive optimization


def effective_lr_sgd(lr: Scalar, wd: Scalar, Q: Tensor, momentum: Scalar = 0.0) -> Tensor:
    """Effective learning rate of a scale-invariant group (physics.md §2.3).

    SGD: η_eff = η / ((1 − ηλ) Q), exact for the direction ŵ. Heavy ball: the long-time
    η / ((1 − β) Q) (see :func:`effective_lr_momentum`).
    """
    eta, lam, beta = _t(lr, Q), _t(wd, Q), _t(momentum, Q)
    denom = torch.where(beta > 0, 1.0 - beta, 1.0 - eta * lam) * Q
    return eta / denom


def effective_lr_momentum(lr: Scalar, momentum: Scalar, Q: Tensor) -> Tensor:
    """Long-time effective learning rate of a scale-invariant group under momentum: η/((1 − β) Q) (§2.3)."""
    return _t(lr, Q) / ((1.0 - _t(momentum, Q)) * Q)


def effective_lr_adaptive(lr: Scalar, Q: Tensor) -> Tensor:
    """Adam/AdamW/RMSprop: the update is 0-homogeneous in w, so η_eff = η/|w| = η/sqrt(Q) (§2.3)."""
    return _t(lr, Q) / Q.clamp_min(0).sqrt()


def angular_update(Q0: Tensor, Q1: Tensor, step_sq: Tensor) -> Tensor:
    """Measured angle between w_t and w_{t+1} of a scale group, 2·asin(|ŵ_{t+1} − ŵ_t|/2) (§2.3).

    Uses |â − b̂|² = (|a − b|² − (|a| − |b|)²) / (|a||b|), which keeps full precision for tiny
    angles where acos would lose it; |a − b|² = |Δθ|² comes from the optimizer's update rule.
    """
    n0, n1 = Q0.clamp_min(0).sqrt(), Q1.clamp_min(0).sqrt()
    dn = (Q1 - Q0) / (n0 + n1).clamp_min(torch.finfo(Q0.dtype).tiny)
    chord_sq = (step_sq - dn * dn).clamp_min(0) / (n0 * n1).clamp_min(torch.finfo(Q0.dtype).tiny)
    return 2.0 * torch.asin((chord_sq.sqrt() / 2.0).clamp(max=1.0))


class RMSPropForm(NamedTuple):
    """SGD + coupled λ on a scale-invariant group, read as RMSProp on the sphere (physics.md §2.3).

    Attributes:
        decay: ρ = (1 − ηλ)⁴ ≈ 1 − 4ηλ, the accumulator's per-step decay (β2 of RMSProp).
        gain: 2(1 − ηλ)²η², the gain on the squared scale-free gradient |g̃|².
        kappa: κ = gain/(1 − ρ) ≈ η/(2λ): the accumulator v = |w|⁴ is κ times RMSProp's m2.
        lr: η/sqrt(κ) ≈ sqrt(2ηλ), RMSProp's learning rate (= the equilibrium angular update).
    """

    decay: float
    gain: float
    kappa: float
    lr: float


def rmsprop_correspondence(lr: float, wd: float) -> RMSPropForm:
    """The RMSProp hyperparameters that SGD + weight decay implies for a scale-invariant group (§2.3).

    Example:
        >>> f = rmsprop_correspondence(0.1, 1e-3)
        >>> round(f.decay, 6), round(f.kappa, 3), round(f.lr, 5)
        (0.9996, 49.997, 0.01414)
    """
    a = 1.0 - lr * wd
    decay = a**4
    gain = 2.0 * a * a * lr * lr
    kappa = gain / (1.0 - decay) if decay < 1.0 else math.inf
    return RMSPropForm(decay, gain, kappa, lr / math.sqrt(kappa) if kappa > 0 else math.inf)


def spherical_rmsprop_step(u: Tensor, v: Tensor, g_tilde: Tensor, lr: float, wd: float, *,
                           exact: bool = True) -> tuple[Tensor, Tensor]:
    """One step of the spherical RMSProp that SGD + coupled λ is, exactly, on a scale group (§2.3).

        û_{t+1} = normalize(û_t − η/((1−ηλ) sqrt(v_t)) · g̃_t)
        v_{t+1} = (1−ηλ)⁴ v_t + 2(1−ηλ)² η² |g̃_t|² + η⁴ |g̃_t|⁴ / v_t          (v = |w|⁴)

    Args:
        u: unit directions, ``(rows, n)`` (one group per row).
        v: accumulators |w|⁴, ``(rows,)``.
        g_tilde: the gradient at the unit vector û (the scale-free gradient), ``(rows, n)``.
        lr: η.
        wd: λ.
        exact: keep the η⁴ term (dropping it is RMSProp's usual form; it needs small angular steps).

    Returns:
        ``(û_{t+1}, v_{t+1})``.
    """
    a = 1.0 - lr * wd
    gt2 = (g_tilde * g_tilde).sum(-1)
    step = lr / (a * v.sqrt())
    nu = u - step.unsqueeze(-1) * g_tilde
    nu = nu / nu.norm(dim=-1, keepdim=True)
    v1 = a**4 * v + 2.0 * a * a * lr * lr * gt2
    if exact:
        v1 = v1 + lr**4 * gt2 * gt2 / v
    return nu, v1


# --------------------------------------------------------------------------------------------
# §2.4 equilibria and relaxation


def equilibrium_sgd(lr: Scalar, wd: Scalar, g_tilde_sq: Tensor) -> Tensor:
    """SGD + coupled λ: Q* = sqrt(η|g̃|² / (λ(2 − ηλ))), |g̃|² = Q|g|² the scale-free gradient (§2.4).

    The exact fixed point of §2.1 for constant |g̃|² (and Q* = η⟨|g|²⟩/(λ(2−ηλ)) as a stationary mean).
    """
    eta, lam = _t(lr, g_tilde_sq), _t(wd, g_tilde_sq)
    return (eta * g_tilde_sq / (lam * (2.0 - eta * lam))).sqrt()


def equilibrium_heavy_ball(lr: Scalar, wd: Scalar, momentum: Scalar, K: Tensor, dampening: Scalar = 0.0) -> Tensor:
    """Heavy ball, buffer form (any gradient correlation): ⟨Q⟩ = (1+β) η ⟨K⟩ / (2(1−τ)λ), K = |v|² (§2.4).

    The stationary mean of the exact (Q, P) recursion: ⟨ΔQ⟩ = 0 gives 2⟨A⟩ = η⟨K⟩, ⟨ΔP⟩ = 0 gives
    ⟨P⟩ = −η⟨K⟩/2, and A = βP + (1−τ)λQ. Pass ⟨Q K⟩ instead of ⟨K⟩ to get Q*² (scale-free form).
    """
    eta, lam, beta, tau = _t(lr, K), _t(wd, K), _t(momentum, K), _t(dampening, K)
    return (1.0 + beta) * eta * K / (2.0 * (1.0 - tau) * lam)


def equilibrium_heavy_ball_walk(lr: Scalar, wd: Scalar, momentum: Scalar, g_tilde_sq: Tensor) -> Tensor:
    """Heavy ball, uncorrelated gradients (random walk): Q* = sqrt(η|g̃|² / (2λ(1−β))) (§2.4)."""
    eta, lam, beta = _t(lr, g_tilde_sq), _t(wd, g_tilde_sq), _t(momentum, g_tilde_sq)
    return (eta * g_tilde_sq / (2.0 * lam * (1.0 - beta))).sqrt()


def equilibrium_adamw(lr: Scalar, wd: Scalar, numel: Tensor) -> Tensor:
    """AdamW (decoupled λ): Q* ≈ ηC/(2λ), C the number of entries, whatever the gradient scale (§2.4)."""
    return _t(lr, numel) * numel / (2.0 * _t(wd, numel))


def equilibrium_from_update(lr: Scalar, wd: Scalar, UU: Tensor, radial: Tensor) -> Tensor:
    """Q*_obs = ⟨η²|u|² − 2η(1−ηλ)⟨θ, u⟩⟩ / (ηλ(2−ηλ)) for any rule θ' = (1−ηλ)θ − ηu (§2.4).

    Args:
        lr: η.
        wd: λ (decoupled).
        UU: ⟨|u|²⟩.
        radial: ⟨⟨θ_t, u_t⟩⟩ (averaged over the same window).
    """
    eta, lam = _t(lr, UU), _t(wd, UU)
    return (eta * eta * UU - 2.0 * eta * (1.0 - eta * lam) * radial) / (eta * lam * (2.0 - eta * lam))


def equilibrium_angle_sgd(lr: Scalar, wd: Scalar) -> Tensor:
    """SGD + coupled λ at equilibrium: the angular update is exactly arccos(1 − ηλ) ≈ sqrt(2ηλ) (§2.4)."""
    eta = lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=torch.float64)
    return torch.arccos(1.0 - eta * wd)


def equilibrium_angle_heavy_ball(lr: Scalar, wd: Scalar, momentum: Scalar, dampening: Scalar = 0.0) -> Tensor:
    """Heavy ball, random walk: angular update sqrt(2η(1−τ)λ/(1+β)) (§2.4).

    physics.md states τ = 0; dampening only rescales the buffer, i.e. η → η(1−τ).
    """
    eta = lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=torch.float64)
    return (2.0 * eta * (1.0 - dampening) * wd / (1.0 + momentum)).sqrt()


def equilibrium_angle_adamw(lr: Scalar, wd: Scalar, beta1: Scalar) -> Tensor:
    """AdamW, random walk: angular update sqrt(2ηλ(1−β1)/(1+β1)) (§2.4)."""
    eta = lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=torch.float64)
    return (2.0 * eta * wd * (1.0 - beta1) / (1.0 + beta1)).sqrt()


def relaxation_steps_sgd(lr: Scalar, wd: Scalar) -> Tensor:
    """Steps for Q² − Q*² to shrink by e under SGD: 1/(−4 ln(1 − ηλ)) ≈ 1/(4ηλ) (§2.4; ∞ at λ = 0)."""
    eta = lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=torch.float64)
    return 1.0 / (-4.0 * torch.log1p(-eta * wd))


def relaxation_steps_heavy_ball(lr: Scalar, wd: Scalar, momentum: Scalar, dampening: Scalar = 0.0) -> Tensor:
    """Heavy ball (overdamped regime): (1 − β)/(4η(1−τ)λ) steps (§2.4)."""
    eta = lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=torch.float64)
    return (1.0 - momentum) / (4.0 * eta * (1.0 - dampening) * wd)


def relaxation_steps_adamw(lr: Scalar, wd: Scalar) -> Tensor:
    """AdamW: Q relaxes at ≈ 2ηλ per step, i.e. 1/(2ηλ) steps (§2.4; not verified in physics.md)."""
    eta = lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=torch.float64)
    return 1.0 / (2.0 * eta * wd)


def exponential_lr_equivalent(lr: float, wd: float, step: int) -> float:
    """Li–Arora: the no-decay learning rate η(1 − ηλ)^−(2t+1) equivalent to SGD + λ on step t (§2.4).

    On a fully scale-invariant net, SGD with λ at lr η equals SGD without weight decay at this lr on
    step t (counting from 0), with θ_t^wd = (1 − ηλ)^t θ̃_t.

    Example:
        >>> round(exponential_lr_equivalent(0.1, 0.01, 0), 6)
        0.1001
    """
    return lr * (1.0 - lr * wd) ** (-(2 * step + 1))


def unit_roundoff(dtype: torch.dtype) -> float:
    """u_w = eps/2 of a floating dtype (2^-24 for float32, 2^-53 for float64, 2^-8 for bfloat16)."""
    return torch.finfo(dtype).eps / 2.0
