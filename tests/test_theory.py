"""The theory engine against float64 simulations of the real optimizer step (physics.md §5 table B, §6).

The reference never uses the engine's formulas: it clones θ_t and v_t before the real ``step()``,
reads the gradient the step consumed, v_{t+1} and θ_{t+1} after it, and reduces every tensor with
its own loop. The engine gets the same inputs the tracker gives it (post-step products, θ_t only
through Q_t) and must reproduce the observed charge to the §6 floor, |res| ≤ 1e-13·M in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nld_callbacks import NoetherTracker, theory
from nld_callbacks.optim import SGDW, optimizer_model, register_optimizer
from nld_callbacks.testing import MLPBN, mlp_bn_groups, synthetic_classification

# tiny tensors: one intra-op thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

EPS0 = 1e-30  # torch rejects BN ε = 0 in train mode; 1e-30 is zero for O(1) variances in float64
TOL = 1e-13  # physics.md §6: exact identities in float64, |res| ≤ 1e-13·M


def _red(x, m):
    """Per-neuron sum onto the member's neurons, written independently of nld_callbacks.charges."""
    if m.axis is None:
        return x.sum().reshape(1)
    if m.axis == 0:
        return x.reshape(x.shape[0], -1).sum(1)
    assert m.axis == 1 and x.dim() == 2
    return x.sum(0)


def _place(group, m, v):
    out = torch.zeros(group.n_neurons, dtype=torch.float64)
    out[m.offset : m.offset + v.numel()] = v
    return out


def _B(group, X, Y):
    return sum(m.sign * _place(group, m, _red(X[m.param] * Y[m.param], m)) for m in group.members)


def _T(group, X):
    return sum(m.sign * _place(group, m, _red(X[m.param], m)) for m in group.members)


def _size(group, X):
    """M of physics.md §0 (quadratic: all signs +) or Σ|θ_k| (linear)."""
    if group.linear:
        return sum(_place(group, m, _red(X[m.param].abs(), m)) for m in group.members)
    return sum(_place(group, m, _red(X[m.param] ** 2, m)) for m in group.members)


def _group_of(opt, p):
    for g in opt.param_groups:
        if any(q is p for q in g["params"]):
            return g
    raise AssertionError


# ------------------------------------------------------------------------------------------------
# the simulation: real torch.optim steps, everything cloned


def _optimizer(model, case):
    if case.get("sgdw"):
        return SGDW(model.parameters(), lr=case["lr"], momentum=case.get("momentum", 0.0),
                    weight_decay=case.get("wd", 0.0))
    kw = dict(lr=case["lr"], momentum=case.get("momentum", 0.0), dampening=case.get("dampening", 0.0),
              nesterov=case.get("nesterov", False), weight_decay=case.get("wd", 0.0),
              maximize=case.get("maximize", False))
    for k in ("foreach", "fused"):
        if k in case:
            kw[k] = case[k]
    if case.get("mixed"):
        # "no decay for norms", and in one case half the lr for the head: every rescale group spans
        # tensors of different η(1−ηλ)
        bn = [model.bn1.weight, model.bn1.bias]
        head = [model.fc3.weight, model.fc3.bias]
        rest = [p for p in model.parameters() if all(p is not q for q in bn + head)]
        head_lr = case["lr"] / 2 if case.get("mixed") == "lr" else case["lr"]
        return torch.optim.SGD([{"params": rest}, {"params": bn, "weight_decay": 0.0},
                                {"params": head, "lr": head_lr}], **kw)
    return torch.optim.SGD(model.parameters(), **kw)


def _simulate(case, steps, *, eps=EPS0, dtype=torch.float64, autocast=False):
    """Yield one dict per real optimizer step: θ_t, v_t, the consumed (and the pre-clip) gradient,
    θ_{t+1}, v_{t+1}, the param group of every tensor and whether the buffer was created."""
    torch.manual_seed(0)
    x, y = synthetic_classification(n=128, dtype=dtype)
    model = MLPBN(eps=eps).to(dtype)
    opt = _optimizer(model, case)
    sched = None
    if case.get("warmup"):  # linear warmup then cosine, stepped after opt.step() as Lightning does
        w = case["warmup"]
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: min(1.0, (k + 1) / w) * 0.5 * (1 + math.cos(math.pi * k / steps)))
    named = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randperm(128, generator=gen)[: case["batch"]] if case.get("batch") else slice(None)
        opt.zero_grad()
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.float().backward()
        else:
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        raw = {n: p.grad.detach().double().clone() for n, p in named.items()}
        if case.get("clip"):
            nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
        th0 = {n: p.detach().double().clone() for n, p in named.items()}
        v0 = {n: opt.state[p].get("momentum_buffer") if p in opt.state else None for n, p in named.items()}
        v0 = {n: None if b is None else b.double().clone() for n, b in v0.items()}
        grads = {n: p.grad.detach().double().clone() for n, p in named.items()}
        hp = {n: dict(_group_of(opt, p)) for n, p in named.items()}  # η_t read before the scheduler steps
        opt.step()
        if sched is not None:
            sched.step()
        th1 = {n: p.detach().double().clone() for n, p in named.items()}
        v1 = {n: opt.state[p].get("momentum_buffer") if p in opt.state else None for n, p in named.items()}
        v1 = {n: None if b is None else b.double().clone() for n, b in v1.items()}
        yield dict(th0=th0, th1=th1, v0=v0, v1=v1, g=grads, raw=raw, hp=hp, opt=opt, model=model,
                   first={n: b is None for n, b in v0.items()})


# ------------------------------------------------------------------------------------------------
# the engine, fed per tensor exactly as the tracker feeds it (per-tensor form of §2.1)


def _engine_member(group, m, s):
    """theory.*_step for one member, from post-step products and Q_t only."""
    n = m.param
    hp = s["hp"][n]
    th1, g = s["th1"][n], s["g"][n]
    lr, wd = hp["lr"], hp["weight_decay"]
    beta, mx = hp["momentum"], hp.get("maximize", False)
    c = 1.0 if s["first"][n] else 1.0 - hp.get("dampening", 0.0)
    v1 = s["v1"][n]
    v0 = s["v0"][n]
    sgdw = isinstance(s["opt"], SGDW)
    if group.linear:
        T0, T1, Sg = _red(s["th0"][n], m), _red(th1, m), _red(g, m)
        L1 = _red((s["th1"][n] - s["th0"][n]).abs(), m) / lr
        S0 = _red(v0, m) if v0 is not None else torch.zeros_like(T0)
        kw = dict(T0=T0, T1=T1, Sg=Sg, L1=L1, lr=lr, wd=wd, maximize=mx)
        if beta == 0:
            return theory.linear_sgd_step(**kw)
        if sgdw:
            return theory.linear_sgdw_step(S0=S0, momentum=beta, **kw)
        if hp["nesterov"]:
            return theory.linear_nesterov_step(S0=S0, momentum=beta, c=c, **kw)
        return theory.linear_heavy_ball_step(S0=S0, momentum=beta, c=c, **kw)
    Q0, Q1 = _red(s["th0"][n] ** 2, m), _red(th1 * th1, m)
    X, G = _red(th1 * g, m), _red(g * g, m)
    if beta == 0:
        return theory.sgd_step(Q0=Q0, Q1=Q1, X=X, G=G, lr=lr, wd=wd, maximize=mx)
    P0 = _red(s["th0"][n] * v0, m) if v0 is not None else torch.zeros_like(Q0)
    Y, K, Z = _red(v1 * g, m), _red(v1 * v1, m), _red(th1 * v1, m)
    if sgdw:
        return theory.sgdw_step(Q0=Q0, Q1=Q1, P0=P0, X=X, Y=Y, K=K, lr=lr, wd=wd, momentum=beta, maximize=mx)
    if hp["nesterov"]:
        return theory.nesterov_step(Q0=Q0, Q1=Q1, P0=P0, X=X, G=G, Y=Y, K=K, Z=Z, lr=lr, wd=wd, momentum=beta, c=c,
                                    maximize=mx)
    return theory.heavy_ball_step(Q0=Q0, Q1=Q1, P0=P0, X=X, Y=Y, K=K, lr=lr, wd=wd, momentum=beta, c=c, maximize=mx)


def _engine(group, s):
    """Σ_i s_i of (observed, symmetric, breaking, coeff·R_true) over the group's members."""
    obs = sym = brk = brk_true = torch.zeros(group.n_neurons, dtype=torch.float64)
    for m in group.members:
        t = _engine_member(group, m, s)
        hp = s["hp"][m.param]
        sg = -1.0 if hp.get("maximize", False) else 1.0
        gr = sg * s["g"][m.param]
        R_true = _red(gr, m) if group.linear else _red(s["th0"][m.param] * gr, m)
        obs = obs + m.sign * _place(group, m, t.observed)
        sym = sym + m.sign * _place(group, m, t.symmetric)
        brk = brk + m.sign * _place(group, m, t.breaking)
        brk_true = brk_true + m.sign * _place(group, m, -t.coeff * R_true)
    return obs, sym, brk, brk_true


CASES = [
    dict(id="sgd", lr=0.1),
    dict(id="sgd_lr1", lr=1.0),
    dict(id="sgd_wd", lr=0.1, wd=5e-3),
    dict(id="sgd_wd_batch16", lr=0.1, wd=5e-3, batch=16),
    dict(id="sgdm", lr=0.05, momentum=0.9),
    dict(id="sgdm_wd", lr=0.05, momentum=0.9, wd=5e-3),
    dict(id="sgdm_dampening", lr=0.05, momentum=0.9, dampening=0.5, wd=5e-3),
    dict(id="nesterov", lr=0.05, momentum=0.9, nesterov=True, wd=5e-3),
    dict(id="sgdm_clip_batch16", lr=0.05, momentum=0.9, wd=5e-3, batch=16, clip=0.1),
    dict(id="sgd_clip_batch16", lr=0.1, wd=5e-3, batch=16, clip=0.05),
    dict(id="warmup_cosine", lr=0.05, momentum=0.9, wd=5e-3, warmup=20),
    dict(id="mixed_wd", lr=0.1, wd=5e-2, mixed="wd"),
    dict(id="sgdm_mixed_lr_wd", lr=0.05, momentum=0.9, wd=5e-2, mixed="lr"),
    dict(id="nesterov_mixed_lr_wd", lr=0.05, momentum=0.9, nesterov=True, wd=5e-2, mixed="lr"),
    dict(id="maximize", lr=0.01, momentum=0.9, wd=5e-3, maximize=True),
    dict(id="fused", lr=0.05, momentum=0.9, dampening=0.3, wd=5e-3, fused=True),
    dict(id="foreach", lr=0.05, momentum=0.9, nesterov=True, wd=5e-3, foreach=True),
    dict(id="sgdw", lr=0.05, momentum=0.9, wd=5e-3, sgdw=True),
    dict(id="sgdw_no_momentum", lr=0.1, wd=5e-2, sgdw=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_exact_identities_match_the_real_step(case):
    """Table B: scale, rescale and translation charges, one step at a time, at |res| ≤ 1e-13·M."""
    groups = mlp_bn_groups()
    worst = {g.key: 0.0 for g in groups}
    for step, s in enumerate(_simulate(case, 40)):
        for g in groups:
            th0, th1 = s["th0"], s["th1"]
            before = _T(g, th0) if g.linear else _B(g, th0, th0)
            after = _T(g, th1) if g.linear else _B(g, th1, th1)
            M = torch.maximum(_size(g, th0), _size(g, th1))
            obs, sym, brk, brk_true = _engine(g, s)
            msg = f"{case['id']} step {step} {g.key}"
            torch.testing.assert_close(obs, after - before, rtol=0, atol=TOL * float(M.max()), msg=msg)
            # the exact identity with the measured breaking force (per-tensor form)
            res = after - (before + sym + brk)
            assert float((res.abs() / M).max()) <= TOL, f"{msg}: |res|/M = {float((res.abs() / M).max()):.3g}"
            # the force the engine recovers from post-step values is the one θ_t actually had
            assert float(((brk - brk_true).abs() / M).max()) <= TOL, msg
            if not case.get("mixed"):
                # one (η, λ) per neuron: the symmetry alone (R := 0) predicts the step (BN ε ≈ 0)
                res_sym = after - (before + sym)
                worst[g.key] = max(worst[g.key], float((res_sym.abs() / M).max()))
    assert all(v <= TOL for v in worst.values()), worst


@pytest.mark.parametrize("case", [c for c in CASES if c.get("momentum") and not c.get("mixed")],
                         ids=[c["id"] for c in CASES if c.get("momentum") and not c.get("mixed")])
def test_radial_momentum_recursion(case):
    """Table B, "P-recursion": (Q, P) forward from the state with the measured drives."""
    g = mlp_bn_groups()[0]
    for step, s in enumerate(_simulate(case, 30)):
        n = "fc1.weight"
        hp = s["hp"][n]
        lr, wd, beta = hp["lr"], hp["weight_decay"], hp["momentum"]
        c = 1.0 if s["first"][n] else 1.0 - hp.get("dampening", 0.0)
        th0, th1, v1, gr = s["th0"], s["th1"], s["v1"], s["g"]
        if hp.get("maximize"):
            gr = {k: -v for k, v in gr.items()}
        zero = {k: torch.zeros_like(v) for k, v in th0.items()}
        v0 = {k: (zero[k] if v is None else v) for k, v in s["v0"].items()}
        Q, P, R, K = _B(g, th0, th0), _B(g, th0, v0), _B(g, th0, gr), _B(g, v1, v1)
        if case.get("sgdw"):
            Q1, P1 = theory.sgdw_recursion(Q=Q, P=P, R=R, K=K, lr=lr, wd=wd, momentum=beta)
        elif hp.get("nesterov"):
            u = {k: gr[k] + wd * th0[k] + beta * v1[k] for k in th0}
            Q1, P1 = theory.nesterov_recursion(Q=Q, P=P, R=R, UU=_B(g, u, u), UV=_B(g, u, v1), lr=lr, wd=wd,
                                               momentum=beta, c=c)
        else:
            Q1, P1 = theory.heavy_ball_recursion(Q=Q, P=P, R=R, K=K, lr=lr, wd=wd, momentum=beta, c=c)
        M = _size(g, th1)
        msg = f"{case['id']} step {step}"
        torch.testing.assert_close(Q1, _B(g, th1, th1), rtol=0, atol=TOL * float(M.max()), msg=msg)
        torch.testing.assert_close(P1, _B(g, th1, v1), rtol=0, atol=TOL * float(M.max()), msg=msg)


def test_mixed_weight_decay_needs_the_per_tensor_form():
    """Table B: BN (γ, β) without decay against a decayed fc2: one common (1−ηλ)² misses by ~19×|ΔQ|;
    the per-tensor form with the measured R_i is exact."""
    g = mlp_bn_groups()[2]
    naive = 0.0
    for s in _simulate(dict(lr=0.1, wd=5e-2, mixed="wd"), 40):
        th0, th1, gr = s["th0"], s["th1"], s["g"]
        lr, lam = 0.1, 5e-2
        dQ = _B(g, th1, th1) - _B(g, th0, th0)
        common = (1 - lr * lam) ** 2 * _B(g, th0, th0) + lr**2 * _B(g, gr, gr)
        naive = max(naive, float(((_B(g, th1, th1) - common).abs() / dQ.abs()).max()))
        obs, sym, brk, _ = _engine(g, s)
        M = _size(g, th1)
        assert float(((dQ - sym - brk).abs() / M).max()) <= TOL
    assert naive > 1.0, f"the naive common factor should fail here, got {naive:.3g}·|ΔQ|"


def test_clipping_needs_the_consumed_gradient():
    """Table B: with the pre-clip gradient the identity misses by ~17×|ΔQ|; with the consumed one it holds."""
    g = mlp_bn_groups()[0]
    pre = 0.0
    for s in _simulate(dict(lr=0.1, clip=0.05), 30):
        th0, th1 = s["th0"], s["th1"]
        dQ = _B(g, th1, th1) - _B(g, th0, th0)
        M = _size(g, th1)
        for grads, post in ((s["g"], True), (s["raw"], False)):
            t = sum(m.sign * _place(g, m, theory.sgd_step(
                Q0=_red(th0[m.param] ** 2, m), Q1=_red(th1[m.param] ** 2, m), X=_red(th1[m.param] * grads[m.param], m),
                G=_red(grads[m.param] ** 2, m), lr=0.1, wd=0.0).symmetric) for m in g.members)
            if post:
                assert float(((dQ - t).abs() / M).max()) <= TOL
            else:
                pre = max(pre, float(((dQ - t).abs() / dQ.abs()).max()))
    assert pre > 1.0


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "sgdm"])
def test_bn_eps_breaking_is_measured(momentum):
    """Table B, BN ε = 1e-3: the symmetric prediction misses by ~0.1 of its terms; adding the measured
    −2ηc R_t brings the residual to the float64 floor."""
    g = mlp_bn_groups()[0]
    sym_miss = 0.0
    for s in _simulate(dict(lr=0.05, wd=5e-3, momentum=momentum), 40, eps=1e-3):
        th0, th1 = s["th0"], s["th1"]
        dQ = _B(g, th1, th1) - _B(g, th0, th0)
        M = _size(g, th1)
        terms = torch.zeros_like(dQ)
        obs, sym, brk, brk_true = _engine(g, s)
        for m in g.members:
            terms = terms + _place(g, m, _engine_member(g, m, s).terms)
        sym_miss = max(sym_miss, float(((dQ - sym).abs() / terms).max()))
        assert float(((dQ - sym - brk).abs() / M).max()) <= TOL
        assert float(((brk - brk_true).abs() / M).max()) <= TOL
    assert sym_miss > 1e-2


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_float32_floor(autocast):
    """Table B: float32 weights (and bf16 autocast with fp32 weights), SGD λ = 5e-4: after adding the
    measured breaking term the residual is within 10·u_w·M (u_w = 2^-24), §6."""
    g = mlp_bn_groups()[0]
    u = theory.unit_roundoff(torch.float32)
    sym_miss = 0.0
    for s in _simulate(dict(lr=0.1, wd=5e-4), 40, eps=1e-5, dtype=torch.float32, autocast=autocast):
        th0, th1 = s["th0"], s["th1"]
        dQ = _B(g, th1, th1) - _B(g, th0, th0)
        M = _size(g, th1)
        obs, sym, brk, _ = _engine(g, s)
        terms = sum(_place(g, m, _engine_member(g, m, s).terms) for m in g.members)
        sym_miss = max(sym_miss, float(((dQ - sym).abs() / terms).max()))
        assert float(((dQ - sym - brk).abs() / M).max()) <= 10 * u
    assert sym_miss > (0.1 if autocast else 1e-3)  # the breaking term is what makes it hold


def test_sgdw_follows_its_rule():
    """SGDW (physics.md §2.1 as written): the class's step against a hand-written update."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, dtype=torch.float64))
    q = p.detach().clone()
    v = torch.zeros_like(q)
    opt = SGDW([p], lr=0.1, momentum=0.9, weight_decay=0.05)
    for _ in range(5):
        g = torch.randn(5, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        v = 0.9 * v + g
        q = (1 - 0.1 * 0.05) * q - 0.1 * v
        torch.testing.assert_close(p.detach(), q, rtol=1e-15, atol=0)
    assert optimizer_model(opt).family == "sgdw"
    assert optimizer_model(SGDW([p], lr=0.1, weight_decay=0.1)).family == "sgd"  # β = 0 is coupled SGD


def test_register_optimizer_declares_a_rule():
    class MySGDW(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0})

        def step(self, closure=None):
            return None

    p = nn.Parameter(torch.ones(2))
    assert not optimizer_model(MySGDW([p])).supported
    register_optimizer(MySGDW, "sgdw")
    assert optimizer_model(MySGDW([p])).family == "sgdw"
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer(MySGDW, "sgd")
    with pytest.raises(ValueError, match="Expected `rule`"):
        register_optimizer(MySGDW, "lion", overwrite=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Expected `cls`"):
        register_optimizer(int, "sgd")


# ------------------------------------------------------------------------------------------------
# adaptive optimizers: the metric identity (β1 = 0), the trivial identity and KSB


def _adaptive_run(make, steps=40):
    torch.manual_seed(0)
    x, y = synthetic_classification(n=128, dtype=torch.float64)
    model = MLPBN(eps=EPS0).double()
    opt = make(model.parameters())
    named = dict(model.named_parameters())
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        th0 = {n: p.detach().clone() for n, p in named.items()}
        grads = {n: p.grad.detach().clone() for n, p in named.items()}
        opt.step()
        th1 = {n: p.detach().clone() for n, p in named.items()}
        yield opt, named, th0, th1, grads


def _metric_reference(opt, p, grad, th0):
    """G_t, the applied direction d/G and d, computed from the state by the textbook formulas."""
    hp = _group_of(opt, p)
    st = opt.state[p]
    if isinstance(opt, torch.optim.RMSprop):
        avg = st["square_avg"]
        if hp["centered"]:
            avg = avg - st["grad_avg"] ** 2
        G = avg.sqrt() + hp["eps"]
        d = grad + hp["weight_decay"] * th0
    else:
        b1, b2 = hp["betas"]
        t = float(st["step"])
        G = (st["exp_avg_sq"] / (1 - b2**t)).sqrt() + hp["eps"]
        d = st["exp_avg"] / (1 - b1**t)
    return G, d


ADAPTIVE = [
    dict(id="adam_b1_0", make=lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.0, 0.99))),
    dict(id="adamw_b1_0", make=lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.0, 0.99), weight_decay=0.1)),
    dict(id="adam_b1_0_coupled", make=lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.0, 0.99), weight_decay=1e-2)),
    dict(id="adamw_b1_0_fused", make=lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.0, 0.99), weight_decay=0.1,
                                                                  fused=True)),
    dict(id="rmsprop", make=lambda ps: torch.optim.RMSprop(ps, lr=1e-2, weight_decay=1e-2)),
    dict(id="rmsprop_centered", make=lambda ps: torch.optim.RMSprop(ps, lr=1e-2, centered=True)),
]


@pytest.mark.parametrize("case", ADAPTIVE, ids=[c["id"] for c in ADAPTIVE])
def test_metric_identity_without_momentum(case):
    """Table B/C: Σ G θ² under Adam β1 = 0 and RMSprop, with the frozen metric G_t of the step.

    Reference: Σ G_t θ_{t+1}² from θ_t directly (a² Σ G θ_t² − 2ηa(R + λ_c Q) + η² Σ d²/G); the
    engine sees only post-step products and Q_t. The Euclidean tangential law fails at O(1) (KSB).
    """
    from nld_callbacks.optim import adaptive_tensors, optimizer_model

    g = mlp_bn_groups()[0]
    euclid = []
    for opt, named, th0, th1, grads in _adaptive_run(case["make"]):
        model = optimizer_model(opt)
        hyp = {n: model.hyper(_group_of(opt, p)) for n, p in named.items()}
        ad = adaptive_tensors(opt, named, hyp, grads)
        assert ad.metric is not None
        h = hyp["fc1.weight"]
        lr, lam_d = h.lr, (h.wd if h.decoupled else 0.0)
        lam_c = h.wd - lam_d
        a = 1 - lr * lam_d
        Gm, d = {}, {}
        for n in ("fc1.weight", "fc1.bias"):
            Gm[n], d[n] = _metric_reference(opt, named[n], grads[n], th0[n])
        QG0 = _B(g, Gm, {n: th0[n] ** 2 for n in Gm})
        QG1 = _B(g, Gm, {n: th1[n] ** 2 for n in Gm})
        R, Q0 = _B(g, th0, grads), _B(g, th0, th0)
        DU = _B(g, d, {n: d[n] / Gm[n] for n in d})
        reference = a * a * QG0 - 2 * lr * a * (R + lam_c * Q0) + lr**2 * DU
        MG = QG1.abs() + QG0.abs()
        assert float(((QG1 - reference).abs() / MG).max()) <= TOL
        # the engine, from post-step products
        QG1_e = _B(g, ad.metric, {n: th1[n] ** 2 for n in Gm})
        QG0_e, pred = theory.metric_step(QG1=QG1_e, XD=_B(g, th1, ad.drive), DU=_B(g, ad.drive, ad.update), Q0=Q0,
                                         lr=lr, decay=lam_d, coupled_wd=lam_c)
        assert float(((QG0_e - QG0).abs() / MG).max()) <= TOL
        assert float(((QG1 - pred + 2 * lr * a * R).abs() / MG).max()) <= TOL
        # trivial identity, split into tangential and radial (KSB) parts
        t = theory.adaptive_step(Q0=Q0, Q1=_B(g, th1, th1), U=_B(g, th1, ad.update), UU=_B(g, ad.update, ad.update),
                                 lr=lr, decay=lam_d)
        M = _size(g, th1)
        assert float(((t.observed - t.symmetric - t.breaking).abs() / M).max()) <= TOL
        euclid.append(float(((t.observed - t.symmetric).abs() / t.observed.abs()).median()))
    assert sorted(euclid)[len(euclid) // 2] > 0.3, "the Euclidean η²|u|² law should miss by O(1) under Adam"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_update_direction_against_the_textbook_formula(dtype, amsgrad):
    """u = m̂ / (sqrt(v̂) + ε) of every tensor after an Adam(W) step (β1 > 0: made in place, one new
    tensor each), against the formula evaluated in float64 from the optimizer's state."""
    from nld_callbacks.optim import adaptive_tensors, optimizer_model

    torch.manual_seed(0)
    x, y = synthetic_classification(n=64, dtype=dtype)
    model = MLPBN().to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, amsgrad=amsgrad)
    named = dict(model.named_parameters())
    hyp = {n: optimizer_model(opt).hyper(_group_of(opt, p)) for n, p in named.items()}
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ad = adaptive_tensors(opt, named, hyp, {n: p.grad for n, p in named.items()})
        assert ad.metric is None and ad.drive is None
        for n, p in named.items():
            st = opt.state[p]
            t = float(st["step"])
            v = (st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"]).double()
            want = (st["exp_avg"].double() / (1 - 0.9**t)) / ((v / (1 - 0.99**t)).sqrt() + 1e-8)
            got = ad.update[n]
            assert got.dtype == dtype and got.data_ptr() not in {q.data_ptr() for q in st.values()}
            torch.testing.assert_close(got.double(), want, rtol=4e-7 if dtype == torch.float32 else 1e-14, atol=0)


def test_adamw_momentum_trivial_identity_and_translation_drift():
    """Table C, AdamW β1 = 0.9: g ⟂ w still holds, the update is not ⟂ w (radial share), and the
    translation charge drifts by a sizeable part of the update's L1 (KSB by a diagonal metric)."""
    from nld_callbacks.optim import adaptive_tensors, optimizer_model

    gs, gt = mlp_bn_groups()[0], mlp_bn_groups()[3]
    drift, radial = 0.0, 0.0
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)  # noqa: E731
    for opt, named, th0, th1, grads in _adaptive_run(make):
        model = optimizer_model(opt)
        hyp = {n: model.hyper(_group_of(opt, p)) for n, p in named.items()}
        ad = adaptive_tensors(opt, named, hyp, grads)
        assert ad.metric is None
        cos_g = _B(gs, th0, grads).abs() / (_B(gs, th0, th0) * _B(gs, grads, grads)).sqrt()
        assert float(cos_g.max()) < 1e-12  # the loss geometry is the optimizer's business-free
        t = theory.adaptive_step(Q0=_B(gs, th0, th0), Q1=_B(gs, th1, th1), U=_B(gs, th1, ad.update),
                                 UU=_B(gs, ad.update, ad.update), lr=1e-2, decay=0.1)
        assert float(((t.observed - t.symmetric - t.breaking).abs() / _size(gs, th1)).max()) <= TOL
        u = ad.update
        radial = max(radial, float((t.force.abs() / (_B(gs, th0, th0) * _B(gs, u, u)).sqrt()).median()))
        # translation: T_{t+1} = (1−ηλ)T_t − η⟨c, u⟩
        lt = theory.linear_adaptive_step(T0=_T(gt, th0), T1=_T(gt, th1), Su=_T(gt, u),
                                         L1=_size(gt, u), lr=1e-2, decay=0.1)
        assert float(((lt.observed - lt.symmetric - lt.breaking).abs() / _size(gt, th1)).max()) <= TOL
        step_l1 = sum(_place(gt, m, _red((th1[m.param] - th0[m.param]).abs(), m)) for m in gt.members)
        drift = max(drift, float(((lt.observed - lt.symmetric).abs() / step_l1).max()))
    assert drift > 0.3, drift
    assert radial > 1e-3, radial


# ------------------------------------------------------------------------------------------------
# §2.3 implicit adaptive optimization


def test_effective_lr_moves_the_direction_exactly():
    """SGD + coupled λ: ŵ_{t+1} = normalize(ŵ_t − η_eff g̃_t) with η_eff = η/((1−ηλ)Q_t), g̃ = |w| g."""
    case = dict(lr=0.2, wd=1e-2)
    for s in _simulate(case, 20):
        W0 = torch.cat([s["th0"]["fc1.weight"], s["th0"]["fc1.bias"][:, None]], 1)
        W1 = torch.cat([s["th1"]["fc1.weight"], s["th1"]["fc1.bias"][:, None]], 1)
        G = torch.cat([s["g"]["fc1.weight"], s["g"]["fc1.bias"][:, None]], 1)
        Q = (W0 * W0).sum(1)
        eff = theory.effective_lr_sgd(0.2, 1e-2, Q)
        u0 = W0 / Q.sqrt()[:, None]
        g_tilde = G * Q.sqrt()[:, None]
        u1 = u0 - eff[:, None] * g_tilde
        u1 = u1 / u1.norm(dim=1, keepdim=True)
        torch.testing.assert_close(u1, W1 / W1.norm(dim=1, keepdim=True), rtol=0, atol=1e-14)
        # the measured angle (2·asin form) against an independent atan2 of the same two vectors
        step_sq = ((W1 - W0) ** 2).sum(1)
        ang = theory.angular_update(Q, (W1 * W1).sum(1), step_sq)
        a, b = W0 / W0.norm(dim=1, keepdim=True), W1 / W1.norm(dim=1, keepdim=True)
        ref = torch.atan2((a[:, :, None] * b[:, None, :] - a[:, None, :] * b[:, :, None]).pow(2).sum((1, 2)).div(2)
                          .sqrt(), (a * b).sum(1))
        torch.testing.assert_close(ang, ref, rtol=1e-9, atol=1e-15)


def test_effective_lr_forms():
    Q = torch.tensor([4.0], dtype=torch.float64)
    assert float(theory.effective_lr_sgd(0.1, 0.01, Q)) == pytest.approx(0.1 / (0.999 * 4))
    assert float(theory.effective_lr_momentum(0.1, 0.9, Q)) == pytest.approx(0.1 / (0.1 * 4))
    assert float(theory.effective_lr_adaptive(0.1, Q)) == pytest.approx(0.05)
    f = theory.rmsprop_correspondence(0.05, 0.02)
    assert f.decay == pytest.approx((1 - 1e-3) ** 4) and abs(f.decay - (1 - 4e-3)) < 1e-5
    assert f.kappa == pytest.approx(0.05 / (2 * 0.02), rel=2e-3)  # κ ≈ η/(2λ)
    assert f.lr == pytest.approx(math.sqrt(2 * 0.05 * 0.02), rel=2e-3)  # ≈ sqrt(2ηλ)


# ------------------------------------------------------------------------------------------------
# §2.2 continuous laws


def test_propagators_solve_their_equations():
    """One step of each propagator against closed-form solutions (constant drive)."""
    f = torch.tensor([0.3, 0.0, 1.0], dtype=torch.float64)
    a = torch.tensor([0.2, 1e-12, 0.0], dtype=torch.float64)
    Q, _ = theory.propagate(torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                            theory.first_order_propagator(a), f)
    exact = torch.tensor([math.exp(-0.2) + 0.3 * (1 - math.exp(-0.2)) / 0.2, math.exp(-1e-12), 2.0],
                         dtype=torch.float64)
    torch.testing.assert_close(Q, exact, rtol=1e-14, atol=1e-14)
    # oscillator Q'' + 2γQ' + ω²Q = f: under-, critically and over-damped, from (Q0, V0)
    Q0, V0, F = 1.3, -0.4, 0.7
    for gam, w2 in ((0.1, 0.5), (0.5, 0.25), (0.9, 0.1)):
        qp = F / w2
        disc = gam * gam - w2
        if disc < 0:
            wd = math.sqrt(-disc)
            A, B = Q0 - qp, (V0 + gam * (Q0 - qp)) / wd
            q = qp + math.exp(-gam) * (A * math.cos(wd) + B * math.sin(wd))
        elif disc == 0:
            A, B = Q0 - qp, V0 + gam * (Q0 - qp)
            q = qp + math.exp(-gam) * (A + B)
        else:
            r1, r2 = -gam + math.sqrt(disc), -gam - math.sqrt(disc)
            c1 = (V0 - r2 * (Q0 - qp)) / (r1 - r2)
            c2 = (Q0 - qp) - c1
            q = qp + c1 * math.exp(r1) + c2 * math.exp(r2)
        prop = theory.oscillator_propagator(torch.tensor([gam], dtype=torch.float64),
                                            torch.tensor([w2], dtype=torch.float64))
        out, _ = theory.propagate(torch.tensor([Q0], dtype=torch.float64), torch.tensor([V0], dtype=torch.float64),
                                  prop, torch.tensor([F], dtype=torch.float64))
        assert float(out) == pytest.approx(q, rel=1e-12)


def _nld_error(lr, momentum, wd, duration, second_half=False):
    """Max relative error of the tracker's streamed NLD law against the measured per-channel charge."""
    torch.manual_seed(0)
    x, y = synthetic_classification(n=128, dtype=torch.float64)
    model = MLPBN(eps=EPS0).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    tracker = NoetherTracker(model, opt, mlp_bn_groups()[:1], log_every_n_steps=10**9)
    steps = int(round(duration / lr))
    errs = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        rec = tracker.last
        errs.append(float(((rec.nld - rec.charge).abs() / rec.charge).max()))
    tracker.detach()
    return max(errs[len(errs) // 2 :] if second_half else errs)


def test_first_order_law_error_shrinks_in_proportion_to_lr():
    """§5 D: NLD's integral law for SGD (λ = 0.05, fixed time t = ηk = 20): error ∝ η, about 0.05·η."""
    errs = [_nld_error(lr, 0.0, 0.05, 20.0) for lr in (0.2, 0.1, 0.05)]
    for lr, e in zip((0.2, 0.1, 0.05), errs):
        assert e <= 0.06 * lr, errs
    for e1, e2 in zip(errs, errs[1:]):
        assert 1.6 <= e1 / e2 <= 2.5, errs


def test_oscillator_law_error_is_order_lr():
    """§5 D: the damped-oscillator law with the 2η²|v|² drive (SGDM β = 0.9, λ = 0.05, full batch, second
    half of ηk ≤ 8): 1.7e-2, 5.9e-3, 4.2e-3 at η = 0.04, 0.02, 0.01; the |g|² shortcut is off by O(1)."""
    errs = [_nld_error(lr, 0.9, 0.05, 8.0, second_half=True) for lr in (0.04, 0.02, 0.01)]
    for lr, e in zip((0.04, 0.02, 0.01), errs):
        assert e <= 0.5 * lr, errs
    assert errs[0] > errs[1] > errs[2], errs


def test_continuous_law_follows_a_schedule():
    """Time-varying η (warmup + cosine, read at every step): with λ = 0 the first-order law is the
    discrete identity itself, so the streamed law equals the measured charge; with λ > 0 it equals an
    independent integration of Q' = −2η_kλQ + η_k²|g_k|² step by step."""
    for wd in (0.0, 0.05):
        torch.manual_seed(0)
        x, y = synthetic_classification(n=128, dtype=torch.float64)
        model = MLPBN(eps=EPS0).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=wd)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: min(1.0, (k + 1) / 10) * 0.5 * (1 + math.cos(math.pi * k / 60)))
        tracker = NoetherTracker(model, opt, mlp_bn_groups()[:1], log_every_n_steps=10**9)
        W, b = model.fc1.weight, model.fc1.bias
        Q = ((W.detach() ** 2).sum(1) + b.detach() ** 2).clone()
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            lr = opt.param_groups[0]["lr"]
            G = (W.grad**2).sum(1) + b.grad**2
            a = 2 * lr * wd
            Q = Q * math.exp(-a) + (lr * lr * G) * ((1 - math.exp(-a)) / a if a else 1.0)
            opt.step()
            sched.step()
            rec = tracker.last
            torch.testing.assert_close(rec.nld, Q, rtol=1e-12, atol=0)
            if wd == 0.0:
                torch.testing.assert_close(rec.nld, rec.charge, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 49])
def test_propagate_steps_equals_n_single_steps(n):
    """The O(log n) power of the one-step map against n applications of it (first-order and
    oscillator propagators side by side, per neuron)."""
    gen = torch.Generator().manual_seed(n)
    rate = -torch.rand(3, generator=gen, dtype=torch.float64) * 1e-2
    gamma = torch.rand(3, generator=gen, dtype=torch.float64) * 0.5
    omega2 = torch.rand(3, generator=gen, dtype=torch.float64) * 0.05
    prop = torch.cat([theory.first_order_propagator(rate), theory.oscillator_propagator(gamma, omega2)])
    Q = torch.rand(6, generator=gen, dtype=torch.float64) + 1.0
    dQ = torch.randn(6, generator=gen, dtype=torch.float64) * 0.1
    drive = torch.rand(6, generator=gen, dtype=torch.float64) * 0.01
    a, b = Q, dQ
    for _ in range(n):
        a, b = theory.propagate(a, b, prop, drive)
    c, d = theory.propagate_steps(Q, dQ, prop, drive, n)
    torch.testing.assert_close(c, a, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(d, b, rtol=1e-13, atol=1e-15)
