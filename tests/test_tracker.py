"""NoetherTracker against an independent float64 simulation of the real torch.optim.SGD step.

The reference below never uses the tracker's formulas: it clones θ_t and v_t before the real
``optimizer.step()``, reads the gradient the step consumed and v_{t+1} after it, and evaluates the
exact identities of physics.md §2.1 per tensor with plain loops.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from nld_callbacks import NoetherTracker, find_symmetries
from nld_callbacks import tracker as tracker_module
from nld_callbacks.optim import SGDW
from nld_callbacks.symmetries import Member, SymmetryGroup
from nld_callbacks.testing import MLPBN, forbid_host_sync, mlp_bn_groups, synthetic_classification, toy_problem

CASES = [
    dict(id="sgd", lr=0.1),
    dict(id="sgd_lr1", lr=1.0),
    dict(id="sgd_wd_batch", lr=0.1, wd=5e-3, batch=16),
    dict(id="sgdm", lr=0.05, momentum=0.9),
    dict(id="sgdm_wd", lr=0.05, momentum=0.9, wd=5e-3),
    dict(id="sgdm_damp", lr=0.05, momentum=0.9, dampening=0.5, wd=5e-3),
    dict(id="nesterov", lr=0.05, momentum=0.9, nesterov=True, wd=5e-3),
    dict(id="sgdm_wd_clip", lr=0.05, momentum=0.9, wd=5e-3, clip=0.1, batch=16),
    dict(id="sgd_wd_clip_value", lr=0.1, wd=5e-3, clip_value=0.01, batch=16),
    dict(id="mixed_wd", lr=0.1, wd=1e-2, mixed=True),
    dict(id="sgdm_mixed_lr_wd", lr=0.05, momentum=0.9, wd=1e-2, mixed=True),
    dict(id="maximize", lr=0.01, momentum=0.9, wd=5e-3, maximize=True, steps=12),
    dict(id="foreach_off", lr=0.05, momentum=0.9, wd=5e-3, foreach=False),
]


def _red(x, m):
    """Per-neuron sum, written independently of nld_callbacks.charges."""
    if m.axis == 0:
        return x.reshape(x.shape[0], -1).sum(1)
    assert m.axis == 1 and x.dim() == 2
    return x.sum(0)


def _B(group, X, Y):
    return sum(m.sign * _red(X[m.param] * Y[m.param], m) for m in group.members)


def _optimizer(model, case):
    kw = dict(lr=case["lr"], momentum=case.get("momentum", 0.0), dampening=case.get("dampening", 0.0),
              nesterov=case.get("nesterov", False), weight_decay=case.get("wd", 0.0),
              maximize=case.get("maximize", False))
    if case.get("foreach") is not None:
        kw["foreach"] = case["foreach"]
    if case.get("mixed"):
        # "no decay for the head, half the lr for BN": the rescale groups span both param groups
        head = [model.fc3.weight, model.fc3.bias]
        bn = [model.bn1.weight, model.bn1.bias]
        rest = [p for p in model.parameters() if all(p is not q for q in head + bn)]
        return torch.optim.SGD([{"params": rest}, {"params": head, "weight_decay": 0.0},
                                {"params": bn, "lr": case["lr"] / 2}], **kw)
    return torch.optim.SGD(model.parameters(), **kw)


def _hyper(opt, p):
    for g in opt.param_groups:
        if any(q is p for q in g["params"]):
            return g
    raise AssertionError


def _reference_step(groups, named, opt, theta0, buf0, grads, theta1, buf1, first):
    """Per group: (Q0, symmetric prediction ΔQ with R := 0 per tensor, full per-tensor ΔQ, M)."""
    out = []
    for g in groups:
        Q0 = _B(g, theta0, theta0)
        M = sum(_red(theta0[m.param] ** 2, m) for m in g.members)
        sym = torch.zeros_like(Q0)
        full = torch.zeros_like(Q0)
        for m in g.members:
            hp = _hyper(opt, named[m.param])
            eta, lam, beta, tau = hp["lr"], hp["weight_decay"], hp["momentum"], hp["dampening"]
            sgn = -1.0 if hp["maximize"] else 1.0
            th0, gr = theta0[m.param], sgn * grads[m.param]
            q0 = _red(th0 * th0, m)
            R = _red(th0 * gr, m)
            if beta == 0:
                a = 1 - eta * lam
                s = (a * a - 1) * q0 + eta**2 * _red(gr * gr, m)
                f = s - 2 * eta * a * R
            else:
                c = 1.0 if first[m.param] else 1 - tau
                v1 = buf1[m.param]
                P0 = _red(th0 * buf0[m.param], m) if buf0[m.param] is not None else torch.zeros_like(q0)
                if hp["nesterov"]:
                    u = gr + lam * th0 + beta * v1
                    s = -2 * eta * (lam * q0 + beta * (beta * P0 + c * lam * q0)) + eta**2 * _red(u * u, m)
                    f = s - 2 * eta * (1 + beta * c) * R
                else:
                    s = -2 * eta * (beta * P0 + c * lam * q0) + eta**2 * _red(v1 * v1, m)
                    f = s - 2 * eta * c * R
            sym += m.sign * s
            full += m.sign * f
        out.append((Q0, sym, full, M))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_predictions_match_float64_simulation(case, device):
    tracker = _check_against_simulation(case, device)
    if tracker.layout.compiled:  # every map of the step in the compiled kernel
        assert not tracker.layout._matrices


@pytest.mark.parametrize("case", [CASES[4], CASES[10]], ids=[CASES[4]["id"], CASES[10]["id"]])
def test_predictions_match_float64_simulation_with_torch_ops_only(case, monkeypatch):
    # the CPU path where no compiler is found: torch ops for the sums and torch's sparse maps
    monkeypatch.setenv("NLD_CALLBACKS_KERNEL", "0")
    tracker = _check_against_simulation(case, torch.device("cpu"))
    assert not tracker.layout.compiled and tracker.layout._matrices


def _check_against_simulation(case, device):
    torch.manual_seed(0)
    x, y = (t.to(device) for t in synthetic_classification(n=128, dtype=torch.float64))
    model = MLPBN().double().to(device)
    opt = _optimizer(model, case)
    groups = mlp_bn_groups()[:3]
    named = dict(model.named_parameters())
    tracker = NoetherTracker(model, opt, groups, log_every_n_steps=10)
    gen = torch.Generator().manual_seed(1)
    worst_e = 0.0
    for step in range(case.get("steps", 30)):
        if case.get("mixed") and step == 15:
            opt.param_groups[0]["lr"] *= 0.5  # a schedule: η_t is read at every step
        idx = torch.randperm(128, generator=gen)[: case["batch"]].to(device) if case.get("batch") else slice(None)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        if case.get("clip"):
            nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
        if case.get("clip_value"):
            nn.utils.clip_grad_value_(model.parameters(), case["clip_value"])
        theta0 = {n: p.detach().clone() for n, p in named.items()}
        buf0 = {n: (opt.state[p].get("momentum_buffer") if p in opt.state else None) for n, p in named.items()}
        buf0 = {n: None if b is None else b.clone() for n, b in buf0.items()}
        first = {n: b is None for n, b in buf0.items()}
        grads = {n: p.grad.clone() for n, p in named.items()}
        opt.step()
        theta1 = {n: p.detach().clone() for n, p in named.items()}
        buf1 = {n: opt.state[p].get("momentum_buffer") for n, p in named.items()}
        ref = _reference_step(groups, named, opt, theta0, buf0, grads, theta1, buf1, first)
        rec = tracker.last
        assert rec is not None and rec.step == step + 1
        for g, (Q0, sym, full, M), q0, q1, pred, brk, e in zip(
            groups, ref, *(tracker.layout.split(t) for t in (rec.charge_before, rec.charge, rec.predicted,
                                                              rec.breaking, rec.residual))):
            M1 = sum(_red(theta1[m.param] ** 2, m) for m in g.members)
            tol = dict(rtol=0.0, atol=1e-13 * float(torch.maximum(M, M1).max()))
            msg = f"{case['id']} step {step} {g.key}"
            torch.testing.assert_close(q0, Q0, **tol, msg=msg)
            torch.testing.assert_close(q1, _B(g, theta1, theta1), **tol, msg=msg)
            # exact identity, per tensor, with the measured breaking force
            torch.testing.assert_close(pred + brk, Q0 + full, **tol, msg=lambda m, msg=msg: f"{msg}: {m}")
            if not case.get("mixed"):
                # one (η, λ) per neuron: the symmetric prediction is the R := 0 identity itself
                torch.testing.assert_close(pred, Q0 + sym, **tol, msg=msg)
            worst_e = max(worst_e, float(e.abs().max()))
    assert worst_e < 4.0, f"unexplained residual |e| = {worst_e} above the float64 floor"
    return tracker


def test_breaking_share_measures_bn_eps():
    """With a large BN ε the scale symmetry is broken; b carries it and e stays at the floor."""
    torch.manual_seed(0)
    x, y = synthetic_classification(n=64, dtype=torch.float64)
    model = MLPBN(eps=1e-1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    tracker = NoetherTracker(model, opt, mlp_bn_groups()[:1], log_every_n_steps=5)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    m = tracker.logged[-1]
    assert m["nld/scale/fc1/breaking"] > 1e3 * max(m["nld/scale/fc1/residual"], 1e-12)
    assert m["nld/scale/fc1/residual"] < 4.0


def test_found_groups_track_a_plain_loop_in_float32():
    torch.manual_seed(0)
    x, y = synthetic_classification(n=64)
    model = MLPBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    report = find_symmetries(model, x)
    assert [g.key for g in report.groups if g.kind == "scale"] == ["scale/fc1"]
    logged = []
    with NoetherTracker(model, opt, report, writer=lambda m, s: logged.append((s, m)), log_every_n_steps=5):
        for _ in range(20):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert [s for s, _ in logged] == [5, 10, 15, 20]
    for _, m in logged:
        assert m["nld/scale/fc1/residual"] < 4.0  # float32 floor: |e| of order 1
        assert abs(m["nld/scale/fc1/charge"] - m["nld/scale/fc1/predicted"]) < 1e-3 * m["nld/scale/fc1/charge"]


@pytest.mark.parametrize("mixed", [False, True], ids=["one_setting", "mixed"])
def test_coefficients_of_one_setting_hold_no_row_per_reduction(mixed):
    """One optimizer setting for every tensor: η, λ, β, c are one number each (0-dim, broadcast).

    With mixed settings each reduction reads its own tensor's values. The predictions are checked
    against the float64 simulation for both (test_predictions_match_float64_simulation).
    """
    torch.manual_seed(0)
    x, y = synthetic_classification(n=32)
    model = MLPBN()
    case = dict(lr=0.1, momentum=0.9, wd=1e-2, mixed=mixed)
    opt = _optimizer(model, case)
    tracker = NoetherTracker(model, opt, find_symmetries(model, x), log_every_n_steps=10)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    coef = tracker._coef_cache[1]
    lay = tracker.layout
    names = lay.params
    per_reduction = {n: torch.tensor([_hyper(opt, dict(model.named_parameters())[names[i]])[k]
                                      for i in lay.param_of_reduction.tolist()], dtype=torch.float64)
                     for n, k in (("lr", "lr"), ("wd", "weight_decay"), ("momentum", "momentum"))}
    for n, want in per_reduction.items():
        got = coef[n] if mixed else coef[n].expand_as(want)
        assert coef[n].dim() == (1 if mixed else 0), n
        assert torch.equal(got, want), n
    tracker.detach()


@pytest.mark.parametrize("mixed", [False, True])
def test_group_coefficients_are_the_means_over_each_neurons_tensors(mixed):
    """The per-neuron coefficients are the mean of the table's value over the neuron's reductions.

    Reference: a loop over the layout's member runs, each reduction looked up in the one-setting
    table of its tensor's param group. With one setting the means are that setting's values
    exactly (0-dim, nothing mapped); with mixed settings they are rows.
    """
    from nld_callbacks.tracker import _COEF_ROWS, _coefficient_table

    torch.manual_seed(0)
    x, y = synthetic_classification(n=32)
    model = MLPBN()
    opt = _optimizer(model, dict(lr=0.1, momentum=0.9, wd=1e-2, mixed=mixed))
    tracker = NoetherTracker(model, opt, find_symmetries(model, x), log_every_n_steps=10)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    cg = tracker._coef_cache[1]["groups"]
    lay, info = tracker.layout, tracker._theory()
    hyp = tracker._hypers()
    column = {n: _coefficient_table([(hyp[n], False, True)])[:, 0] for n in lay.params}
    of_neuron: list[list[str]] = [[] for _ in range(lay.n_neurons)]
    for first, start, length in lay._runs.tolist():
        for i in range(length):
            of_neuron[first + i].append(lay.params[lay.param_of_reduction[start + i]])
    assert all(of_neuron)

    def mean(row: int | slice) -> torch.Tensor:
        def of(values: list[torch.Tensor]) -> torch.Tensor:  # (the mean of equal values is that value)
            return values[0] if all(torch.equal(v, values[0]) for v in values) else sum(values) / len(values)

        return torch.stack([of([column[n][row] for n in ns]) for ns in of_neuron], -1)

    k = len(_COEF_ROWS)
    want = {"eff_factor": mean(_COEF_ROWS.index("eff_factor")), "eq_coef": mean(_COEF_ROWS.index("eq_coef")),
            "alpha": 1.0 / mean(_COEF_ROWS.index("relax")).clamp_min(1.0),
            "prop": torch.where(info.linear, mean(slice(k + 6, k + 12)), mean(slice(k, k + 6)))}
    for name, w in want.items():
        got = cg[name]
        # one setting: one number (0-dim, or expanded over the neurons without a copy), a row per neuron
        # where settings mix (and for the propagators, which differ between quadratic and linear charges)
        one_number = got.dim() == 0 or (got.dim() == 1 and got.stride() == (0,))
        assert one_number == (not mixed and name != "prop"), name
        torch.testing.assert_close(got.expand_as(w), w, rtol=1e-15, atol=0, msg=name)
        if not mixed:  # one setting: the value itself, not a mean that rounding can move
            assert torch.equal(got.expand_as(w), w), name
    tracker.detach()


@pytest.mark.parametrize("mixed", [False, True])
def test_rounding_floor_reads_each_reductions_dtype(mixed):
    """The rounding floor u_w·M of physics.md §3.2 takes u_w of each reduction's own tensor.

    One dtype: u_w is one number (0-dim). A float64 head beside float32 layers: the rescale group
    spans both, and each reduction has its tensor's u_w (looked up per reduction here). The
    identities close (|e| < 1) either way.
    """
    from nld_callbacks import theory

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
            if mixed:
                self.fc2.double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.bn(self.fc1(x))).to(self.fc2.weight.dtype))

    torch.manual_seed(0)
    model = Model()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    logged = []
    tracker = NoetherTracker(model, opt, example_input=x, writer=lambda m, s: logged.append(m), log_every_n_steps=1)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    lay = tracker.layout
    named = dict(model.named_parameters())
    want = torch.tensor([theory.unit_roundoff(named[lay.params[i]].dtype) for i in lay.param_of_reduction.tolist()],
                        dtype=torch.float64)
    assert tracker._unit_r.dim() == (1 if mixed else 0)
    assert torch.equal(tracker._unit_r.expand_as(want), want)
    assert (want == 2.0**-53).any() == mixed and {g.kind for g in tracker.groups} >= {"scale", "rescale"}
    residuals = [v for k, v in logged[-1].items() if k.endswith("/residual")]
    assert residuals and all(0 <= r < 1 for r in residuals)
    tracker.detach()


def test_coefficient_table_evaluates_each_setting_alone_and_by_hand():
    """The coefficient table of several settings: each column is the table of its setting alone
    (bitwise: only the laws of the families present are evaluated), and its laws are the closed
    forms of physics.md §2.2–2.4 written out here per family."""
    import math

    from nld_callbacks.optim import Hyper
    from nld_callbacks.tracker import _COEF_ROWS, _coefficient_table

    hypers = [Hyper(lr=0.1, wd=5e-4), Hyper(lr=0.05, wd=1e-3, momentum=0.9, dampening=0.1),
              Hyper(lr=0.05, wd=1e-3, momentum=0.9, nesterov=True), Hyper(lr=0.02, wd=1e-2, momentum=0.8, rule="sgdw",
                                                                          decoupled=True),
              Hyper(lr=1e-3, wd=1e-2, momentum=0.9, rule="adam", decoupled=True, beta2=0.999, eps=1e-8),
              Hyper(lr=1e-3, wd=0.0, momentum=0.9, rule="adam", beta2=0.999, eps=1e-8)]
    combos = [(h, f, a) for h in hypers for f, a in ((False, True), (True, True), (False, False))]
    table = _coefficient_table(combos)
    row = {n: table[i] for i, n in enumerate(_COEF_ROWS)}
    k = len(_COEF_ROWS)
    nan = float("nan")
    for j, (h, f, a) in enumerate(combos):
        alone = _coefficient_table([(h, f, a)])[:, 0]
        col = table[:, j]
        assert torch.equal(alone.isnan(), col.isnan()) and torch.equal(alone.nan_to_num(), col.nan_to_num())
        lr, eta, lam, beta, tau = (h.lr if a else 0.0), h.lr, h.wd, h.momentum, h.dampening
        fam = h.family
        if fam == "sgd":
            want = dict(eff_factor=lr / (1 - lr * lam), eq_coef=eta / (lam * (2 - eta * lam)),
                        eq_angle=math.acos(1 - eta * lam), relax=1 / (-4 * math.log1p(-eta * lam)),
                        rms_decay=(1 - eta * lam) ** 4)
        elif fam == "heavy_ball":
            want = dict(eff_factor=lr / (1 - beta), eq_coef=(1 + beta) * eta / (2 * (1 - tau) * lam),
                        eq_angle=math.sqrt(2 * eta * (1 - tau) * lam / (1 + beta)),
                        relax=(1 - beta) / (4 * eta * (1 - tau) * lam),
                        rms_decay=1 - 4 * eta * (1 - tau) * lam / (1 - beta))
        elif fam == "adam" and h.decoupled and lam > 0:
            want = dict(eff_factor=lr, eq_coef=(eta / (2 * lam)) ** 2,
                        eq_angle=math.sqrt(2 * eta * lam * (1 - beta) / (1 + beta)), relax=1 / (2 * eta * lam),
                        rms_decay=nan)
        else:  # no continuous law or equilibrium (Nesterov, SGDW, Adam without decay)
            want = dict(eff_factor=lr if fam == "adam" else lr / (1 - beta), eq_coef=nan, eq_angle=nan, relax=nan,
                        rms_decay=nan)
        for name, w in want.items():
            got = float(row[name][j])
            assert (math.isnan(w) and math.isnan(got)) or math.isclose(got, w, rel_tol=1e-14), (fam, name)
        # one step of the law: (Q, Q', f) → (Q, Q') for quadratic, then linear, charges
        for linear, prop in ((False, table[k : k + 6, j]), (True, table[k + 6 : k + 12, j])):
            if fam == "sgd":
                r = (1 if linear else 2) * lr * lam
                gain = -math.expm1(-r) / r if r else 1.0  # (→ 1 as r → 0: an inactive tensor, η = 0)
                want_prop = torch.tensor([math.exp(-r), 0.0, gain, 0.0, 0.0, 0.0], dtype=torch.float64)
            elif fam == "heavy_ball":
                w2 = (2 if linear else 4) * lr * (1 - tau) * lam / (1 + beta)
                gen = torch.tensor([[0.0, 1.0, 0.0], [-w2, -2 * (1 - beta) / (1 + beta), 1.0], [0.0, 0.0, 0.0]],
                                   dtype=torch.float64)
                want_prop = torch.linalg.matrix_exp(gen)[:2].reshape(6)
            else:
                assert prop.isnan().all(), fam
                continue
            torch.testing.assert_close(prop, want_prop, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_pre_step_sums_are_carried_unless_the_tensors_changed(momentum):
    """Between tracked steps the pre-hook reuses what the post-hook read of θ_{t+1} (and v_{t+1});
    an in-place change between steps (here a rescale of every weight and buffer) makes it read
    again, so the identity still closes at the float32 floor (a stale Q_t would leave |e| ≫ 1)."""
    torch.manual_seed(0)
    x, y = synthetic_classification(n=64)
    model = MLPBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=5e-4)
    logged = []
    tracker = NoetherTracker(model, opt, example_input=x, writer=lambda m, s: logged.append(m), log_every_n_steps=1)
    reads = []
    read = tracker._read
    tracker._read = lambda pairs: reads.append(len(pairs)) or read(pairs)

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(4):
        step()
    assert len(reads) == 1 + 4  # the first pre-hook reads; later ones reuse the post-hook's sums
    carry = tracker._carry
    carried = [t for t in (carry.Q, carry.P, *(carry.linear or ())) if t is not None]
    assert len(carried) == (4 if momentum else 2)  # Q and T, with momentum also P and S
    # one copy of the carried rows: no view keeps the step's other products alive
    assert {t.untyped_storage().nbytes() for t in carried} == {len(carried) * tracker.layout.n_reductions * 8}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
        for st in opt.state.values():
            if "momentum_buffer" in st:
                st["momentum_buffer"].mul_(0.5)
    step()
    assert len(reads) == 5 + 2  # the change was seen: pre and post both read
    step()
    assert len(reads) == 7 + 1
    for m in logged:
        for k, v in m.items():
            if k.endswith("/residual"):
                assert v < 4.0, (k, v)


def test_hooks_never_change_training(device):
    def run(track):
        torch.manual_seed(0)
        x, y = (t.to(device) for t in synthetic_classification(n=64))
        model = MLPBN().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
        tracker = NoetherTracker(model, opt, example_input=x, log_every_n_steps=3) if track else None
        for _ in range(12):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if tracker is not None:
            tracker.detach()
        return [p.detach().clone() for p in model.parameters()], [b.clone() for b in model.buffers()]

    (p_a, b_a), (p_b, b_b) = run(False), run(True)
    if device.type == "cuda":  # the comparison means something only if plain training repeats bitwise
        p_c, _ = run(False)
        assert all(torch.equal(a, c) for a, c in zip(p_a, p_c)), "plain CUDA training does not repeat bitwise"
    assert all(torch.equal(a, b) for a, b in zip(p_a, p_b))
    assert all(torch.equal(a, b) for a, b in zip(b_a, b_b))


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad_on", "grad_off"])
def test_hooks_leave_grad_mode_as_found_and_build_no_graph(grad_mode):
    prob = toy_problem("mlp_bn", momentum=0.9)
    opt = prob.make_optimizer(prob.model.parameters())
    tracker = NoetherTracker(prob.model, opt, example_input=prob.x, log_every_n_steps=2)
    seen = []  # the mode right after the tracker's hooks, inside the caller's mode

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(prob.model(prob.x), prob.y).backward()
        with torch.set_grad_enabled(grad_mode):
            try:
                opt.step()
            finally:
                seen.append(torch.is_grad_enabled())

    for _ in range(3):
        step()
    rec = tracker.last
    assert rec is not None and rec.step == 3
    assert not any(t.requires_grad for t in (rec.charge_before, rec.charge, rec.predicted, rec.residual))
    # a failure inside a tracked step still gives the mode back
    tracker._post_step = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        step()
    assert seen == [grad_mode] * 4


class _SignSGD(torch.optim.Optimizer):
    """A custom rule the tracker has no model of: θ ← θ − η sign(g)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def test_unsupported_optimizer_is_measured_only():
    torch.manual_seed(0)
    x, y = synthetic_classification(n=64)
    model = MLPBN()
    opt = _SignSGD(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="no exact per-step model for _SignSGD"):
        tracker = NoetherTracker(model, opt, example_input=x, log_every_n_steps=2, float64_accumulation=True)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    m = tracker.logged[-1]
    assert "nld/scale/fc1/charge" in m and all(k.endswith("/charge") for k in m), sorted(m)
    w, b = model.fc1.weight.detach().double(), model.fc1.bias.detach().double()
    assert m["nld/scale/fc1/charge"] == pytest.approx(float((w**2).sum() + (b**2).sum()), rel=1e-14)


class _LAMB(torch.optim.Adam):
    """LAMB-style per-layer scaling: Adam's direction rescaled by the trust ratio |w|/|u| per tensor.

    The step is written out (not ``super().step()``, whose own hook wrapper would fire the hooks a
    second time once ``Adam.step`` has been patched by another instance).
    """

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                st["m"].lerp_(p.grad, 1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                u = (st["m"] / (1 - b1 ** st["step"])) / ((st["v"] / (1 - b2 ** st["step"])).sqrt() + g["eps"])
                trust = p.norm() / u.norm() if u.norm() > 0 else 1.0
                p.add_(u, alpha=-g["lr"] * float(trust))


def _measured_only(opt_factory, name, *, closure=False, steps=3):
    """An optimizer the engine cannot model: one warning naming it, charges exact, no prediction anywhere."""
    torch.manual_seed(0)
    x, y = synthetic_classification(n=64, dtype=torch.float64)
    model = MLPBN().double()
    opt = opt_factory(model.parameters())
    groups = [*mlp_bn_groups()[:3], SymmetryGroup("translation", "fc3", (Member("fc3.weight", 1),
                                                              Member("fc3.bias", None, offset=16)), 17, "input", "t")]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tracker = NoetherTracker(model, opt, groups, log_every_n_steps=1)
        for _ in range(steps):
            def loss_fn():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            if closure:
                opt.step(loss_fn)
            else:
                loss_fn()
                opt.step()
    named = [str(w.message) for w in rec if "NoetherTracker" in str(w.message)]
    assert len(named) == 1 and name in named[0], named
    assert tracker.step == steps
    for m in tracker.logged:
        assert all(k.endswith("/charge") for k in m), sorted(m)
    rec = tracker.last
    for field in ("predicted", "residual", "breaking", "effective_lr", "angular_update", "nld", "equilibrium"):
        v = getattr(rec, field)
        assert v is None or bool(torch.isnan(v).all()), field
    theta = {n: p.detach() for n, p in model.named_parameters()}
    for g, q in zip(groups, tracker.layout.split(rec.charge)):
        if g.linear:
            W, b = theta["fc3.weight"], theta["fc3.bias"]
            torch.testing.assert_close(q, torch.cat([W.sum(0), b.sum().reshape(1)]), rtol=1e-14, atol=1e-15)
        else:
            torch.testing.assert_close(q, _B(g, theta, theta), rtol=1e-14, atol=0)


def test_custom_optimizer_gets_no_prediction():
    _measured_only(lambda ps: _SignSGD(ps, lr=1e-2), "_SignSGD")


def test_lamb_style_per_layer_scaling_gets_no_prediction():
    """A subclass of a modelled optimizer that overrides step() is never assumed to follow its parent."""
    _measured_only(lambda ps: _LAMB(ps, lr=1e-2), "_LAMB subclasses Adam but overrides step()")


def test_closure_lbfgs_gets_no_prediction():
    """LBFGS evaluates the closure several times inside one step: the hooks see one step, no model."""
    _measured_only(lambda ps: torch.optim.LBFGS(ps, lr=0.1, max_iter=4), "LBFGS", closure=True)


ADAPTIVE = [
    dict(id="adam_b1_0", make=lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.0, 0.99)), metric=True),
    dict(id="adam_b1_0_coupled", make=lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.0, 0.99), weight_decay=1e-2),
         metric=True),
    dict(id="adamw", make=lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), metric=False),
    dict(id="adamw_amsgrad_foreach", make=lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True,
                                                                       foreach=True), metric=False),
    dict(id="rmsprop", make=lambda ps: torch.optim.RMSprop(ps, lr=1e-2, weight_decay=1e-2), metric=True),
    dict(id="rmsprop_momentum", make=lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5), metric=False),
]


@pytest.mark.parametrize("case", ADAPTIVE, ids=[c["id"] for c in ADAPTIVE])
def test_adaptive_optimizers_against_the_real_step(case, device):
    """Adam/AdamW/RMSprop: the trivial identity closes at the float64 floor, the radial share and the
    metric charge are the ones an independent computation from θ_t, θ_{t+1} and the state gives.

    On the CPU kernel Adam's u (β1 > 0) is formed inside the kernel's read of m and v, never made.
    """
    tracker = _adaptive_against_the_real_step(case, device)
    formed = any((c or 0) >= 2 for key in tracker.layout._kplans for c in key[1])
    assert formed == (tracker.layout.compiled and "adamw" in case["id"])


@pytest.mark.parametrize("case", ADAPTIVE[2:4], ids=[c["id"] for c in ADAPTIVE[2:4]])
def test_adaptive_optimizers_against_the_real_step_with_torch_ops_only(case, monkeypatch):
    # where no compiler is found: u made by torch ops (as on a GPU), in place
    monkeypatch.setenv("NLD_CALLBACKS_KERNEL", "0")
    tracker = _adaptive_against_the_real_step(case, torch.device("cpu"))
    assert not tracker.layout.compiled


def _adaptive_against_the_real_step(case, device):
    torch.manual_seed(0)
    x, y = (t.to(device) for t in synthetic_classification(n=128, dtype=torch.float64))
    model = MLPBN(eps=1e-30).double().to(device)  # BN ε ≈ 0: R_t at the float64 floor
    opt = case["make"](model.parameters())
    groups = mlp_bn_groups()[:3]
    named = dict(model.named_parameters())
    tracker = NoetherTracker(model, opt, groups, log_every_n_steps=5)
    for _ in range(15):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        theta0 = {n: p.detach().clone() for n, p in named.items()}
        opt.step()
        theta1 = {n: p.detach().clone() for n, p in named.items()}
        rec = tracker.last
        g = groups[0]  # scale rows of fc1
        h = opt.param_groups[0]
        lr = h["lr"]
        lam_d = h["weight_decay"] if h.get("decoupled_weight_decay", False) else 0.0
        # u from the two parameter values: θ_{t+1} = (1 − ηλ_d)θ_t − ηu
        u = {n: ((1 - lr * lam_d) * theta0[n] - theta1[n]) / lr for n in named}
        cos = _B(g, theta0, u) / (_B(g, theta0, theta0) * _B(g, u, u)).sqrt()
        q0, q1 = _B(g, theta0, theta0), _B(g, theta1, theta1)
        M = torch.maximum(q0, q1)
        split = lambda v: tracker.layout.split(v)[0]  # noqa: E731
        torch.testing.assert_close(split(rec.predicted) + split(rec.breaking), q1, rtol=0,
                                   atol=1e-13 * float(M.max()))
        assert float(split(rec.residual).abs().max()) < 4.0
        torch.testing.assert_close(split(rec.radial_update), cos, rtol=1e-6, atol=1e-9)
        if case["metric"]:
            G = {}
            for n in ("fc1.weight", "fc1.bias"):
                st = opt.state[named[n]]
                if isinstance(opt, torch.optim.RMSprop):
                    G[n] = st["square_avg"].sqrt() + h["eps"]
                else:
                    G[n] = (st["exp_avg_sq"] / (1 - h["betas"][1] ** float(st["step"]))).sqrt() + h["eps"]
            QG1 = _B(g, G, {n: theta1[n] ** 2 for n in G})
            torch.testing.assert_close(split(rec.metric_charge), QG1, rtol=1e-13, atol=0)
            # the identity with R := 0 misses by the breaking term −2ηaR_t only (R_t ≈ 0 here)
            torch.testing.assert_close(split(rec.metric_predicted), QG1, rtol=1e-10, atol=0)
        else:
            assert rec.metric_charge is None or bool(torch.isnan(split(rec.metric_charge)).all())
    m = tracker.logged[-1]
    assert "nld/scale/fc1/radial_update" in m and "nld/scale/fc1/nld" not in m  # no continuous law for Adam
    assert ("nld/scale/fc1/metric_charge" in m) == case["metric"]
    return tracker


def test_translation_and_rescale_groups_are_tracked_exactly():
    """Linear charges under heavy ball with weight decay: T = ⟨c, θ⟩ measured and predicted."""
    torch.manual_seed(0)
    x, y = synthetic_classification(n=128, dtype=torch.float64)
    model = MLPBN().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3, dampening=0.2)
    trans = SymmetryGroup("translation", "fc3", (Member("fc3.weight", 1), Member("fc3.bias", None, offset=16)),
                          17, "input feature", "t")
    tracker = NoetherTracker(model, opt, [*mlp_bn_groups()[:3], trans], log_every_n_steps=10)
    T = S = None
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        T_now = torch.cat([model.fc3.weight.detach().sum(0), model.fc3.bias.detach().sum().reshape(1)])
        T = T_now if T is None else T
        opt.step()
        v = opt.state[model.fc3.weight]["momentum_buffer"], opt.state[model.fc3.bias]["momentum_buffer"]
        S_new = torch.cat([v[0].sum(0), v[1].sum().reshape(1)])
        T_after = torch.cat([model.fc3.weight.detach().sum(0), model.fc3.bias.detach().sum().reshape(1)])
        rec = tracker.last
        t_split = tracker.layout.split(rec.charge)[-1]
        W, b = model.fc3.weight.detach(), model.fc3.bias.detach()
        M = float(torch.cat([W.abs().sum(0), b.abs().sum().reshape(1)]).max())
        torch.testing.assert_close(t_split, T_after, rtol=0, atol=1e-13 * M)
        torch.testing.assert_close(tracker.layout.split(rec.predicted)[-1], T_after, rtol=0, atol=1e-13 * M)
        torch.testing.assert_close(T_after, T_now - 0.05 * S_new, rtol=0, atol=1e-13 * M)
        S = S_new
    m = tracker.logged[-1]
    assert m["nld/translation/fc3/residual"] < 4.0
    T_law, T_obs = m["nld/translation/fc3/nld"], m["nld/translation/fc3/charge"]
    assert abs(T_law - T_obs) < 0.05 * abs(T_obs)  # λ = 5e-3 over ηk = 1: the oscillator law, O(η)
    assert S is not None


def test_state_dict_resume_gives_the_same_values():
    def make():
        torch.manual_seed(0)
        model = MLPBN().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
        return model, opt

    x, y = synthetic_classification(n=64, dtype=torch.float64)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    model, opt = make()
    full = NoetherTracker(model, opt, mlp_bn_groups()[:3], log_every_n_steps=4)
    train(model, opt, 12)

    model, opt = make()
    first = NoetherTracker(model, opt, mlp_bn_groups()[:3], log_every_n_steps=4)
    train(model, opt, 6)
    saved = (model.state_dict(), opt.state_dict(), first.state_dict())
    first.detach()
    model2, opt2 = make()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    resumed = NoetherTracker(model2, opt2, log_every_n_steps=4)  # groups come back from the state
    resumed.load_state_dict(saved[2])
    train(model2, opt2, 6)
    assert resumed.step == full.step == 12
    assert resumed.logged[-1] == full.logged[-1]
    assert [r["max_residual"] for r in resumed.summary()] == [r["max_residual"] for r in full.summary()]


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.0, 0.99)),
    lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True, weight_decay=1e-3),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-3, weight_decay=1e-3, centered=True),
    lambda ps: SGDW(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3, dampening=0.1),
], ids=["adamw_b1_0", "adam_amsgrad", "rmsprop_centered", "sgdw", "sgdm"])
def test_new_rules_and_linear_charges_never_read_the_device_between_logs(make, device):
    torch.manual_seed(0)
    x, y = (t.to(device) for t in synthetic_classification(n=64))
    model = MLPBN().to(device)
    opt = make(model.parameters())
    trans = SymmetryGroup("translation", "fc3", (Member("fc3.weight", 1), Member("fc3.bias", None, offset=16)),
                          17, "input feature", "t")
    tracker = NoetherTracker(model, opt, [*mlp_bn_groups()[:3], trans], log_every_n_steps=4)
    forbid_host_sync(tracker)
    for _ in range(8):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert len(tracker.logged) == 2 and tracker.logged[-1]["nld/translation/fc3/residual"] < 4.0


_WINDOW_TAGS = ("residual", "breaking")  # the largest of the logging window; every other tag: the last value


@pytest.mark.parametrize("make,laws", [
    (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-3),
     ("nld", "equilibrium", "rmsprop_accumulator")),
    (lambda ps: torch.optim.RMSprop(ps, lr=1e-3, weight_decay=1e-3), ("metric_charge", "radial_update")),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-3), ("equilibrium", "radial_update")),
], ids=["sgdm_wd", "rmsprop", "adamw"])
@pytest.mark.parametrize("poison_at", [None, 6], ids=["valid", "non_finite_from_step_6"])
def test_a_logging_window_logs_what_logging_every_step_logs_at_its_end(make, laws, poison_at):
    """The last values are written when read: a window of 4 steps ends with every-step logging's values.

    A per-step learning-rate schedule changes the coefficients at every step. With a non-finite
    gradient at step 6 (every later step is invalid too) the window logs the last valid step's values.
    """
    x, y = synthetic_classification(n=64, dtype=torch.float64)

    def run(every):
        torch.manual_seed(0)
        model = MLPBN().double()
        opt = make(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.1 * t))
        tracker = NoetherTracker(model, opt, example_input=x, log_every_n_steps=every)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the non-finite steps' warning
            for t in range(1, 13):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                if t == poison_at:
                    model.fc1.weight.grad[0, 0] = float("inf")
                opt.step()
                sched.step()
                theta = {n: p.detach() for n, p in model.named_parameters()}
                charges.append({f"nld/{g.kind}/{g.name}/charge": float(_B(g, theta, theta).sum())
                                for g in tracker.groups if g.kind != "translation"})
        return tracker.logged

    charges: list[dict[str, float]] = []
    each = run(1)
    for t, (logged, ref) in enumerate(zip(each, charges), 1):  # every-step logging against plain sums
        for k, q in ref.items():
            expected = q if t < (poison_at or 13) else charges[poison_at - 2][k]  # then: the last valid step's
            assert logged[k] == pytest.approx(expected, rel=1e-13), (t, k)
    window = run(4)
    assert len(each) == 12 and len(window) == 3
    last_valid = 12 if poison_at is None else poison_at - 1
    for i, logged in enumerate(window):
        end = 4 * (i + 1)
        ref = each[min(end, last_valid) - 1]
        assert logged.keys() == ref.keys()
        quantities = {t.split("/")[-1] for t in ref}
        assert {"charge", "predicted", "band_upper", "effective_lr", "angular_update", *laws} <= quantities
        for t, v in logged.items():
            if t.split("/")[-1] in _WINDOW_TAGS:
                steps = range(end - 4, min(end, last_valid))  # the window's valid steps (none: 0)
                assert v == max((each[s][t] for s in steps), default=0.0), t
            else:
                assert v == ref[t], (t, v, ref[t])


COMPILED_STEP = [
    dict(id="sgd", make=lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=5e-3)),
    dict(id="heavy_ball", make=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-3, dampening=0.2)),
    dict(id="nesterov", make=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3)),
    dict(id="sgdw", make=lambda ps: SGDW(ps, lr=0.05, momentum=0.9, weight_decay=5e-3)),
    dict(id="mixed_settings", make=lambda ps: torch.optim.SGD(
        [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.02, "weight_decay": 0.0}], lr=0.05, momentum=0.9,
        weight_decay=1e-2)),
    dict(id="mixed_families", make=lambda ps: torch.optim.SGD(
        [{"params": ps[:3], "momentum": 0.0}, {"params": ps[3:], "nesterov": True}], lr=0.05, momentum=0.9,
        weight_decay=1e-2)),
    dict(id="maximize", make=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=5e-3, maximize=True)),
    dict(id="adamw", make=lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
    dict(id="adam_coupled_maximize", make=lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, maximize=True)),
    dict(id="adam_b1_0", make=lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.0, 0.99), weight_decay=1e-2)),
    dict(id="rmsprop", make=lambda ps: torch.optim.RMSprop(ps, lr=1e-2, weight_decay=1e-2)),
    dict(id="poisoned", make=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), poison_at=6),
    dict(id="attached_mid_run", make=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), attach_at=4),
    # its first tracked step invalid (the parameters restored after it): the laws start at the next
    # step, from the observed one
    dict(id="attached_mid_run_poisoned", make=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), attach_at=4,
         poison_at=4, restore=True),
    # a frozen zero bias (declared groups): its translation charge neither moves nor has a rounding
    # floor (D = 0)
    dict(id="frozen_zero_bias", make=lambda ps: torch.optim.SGD(ps, lr=0.1), frozen="fc1.bias"),
]


@pytest.mark.parametrize("case", COMPILED_STEP, ids=[c["id"] for c in COMPILED_STEP])
def test_the_compiled_step_gives_the_bits_of_the_torch_step(case, monkeypatch):
    """The kernel's identities (``nld_terms``), per-neuron step (``nld_step``) and last values
    (``nld_derive``, ``nld_last``) against the torch ops they stand for: the same bits, but for
    square roots.

    The same run twice, the second with the compiled calls switched off; every logged value, the
    held per-neuron state, the accumulators and the last step's record agree bit for bit (NaN where
    NaN), and to a few ulps what is made with a square root. Scale, translation (linear charges)
    and rescale groups, every optimizer family, mixed settings, a non-finite gradient and a tracker
    attached to a running optimizer.
    """
    from nld_callbacks import kernel

    if kernel.load() is None:
        pytest.skip("no C compiler: the kernel cannot be built")
    x, y = synthetic_classification(n=64, dtype=torch.float64)
    calls, terms_calls, derived_calls = [], [], []
    compiled_step, compiled_lib = NoetherTracker._compiled_step, NoetherTracker._compiled_lib
    compiled_terms, compiled_derived = NoetherTracker._compiled_terms, NoetherTracker._compiled_derived

    def run(compiled):
        def spy(self, *args):
            done = compiled and compiled_step(self, *args)
            calls.append(done)
            return done

        def terms_spy(self, *args):
            done = compiled_terms(self, *args) if compiled else None
            terms_calls.append(done is not None)
            return done

        def derived_spy(self):
            done = compiled_derived(self)
            derived_calls.append(done is not None)
            return done

        monkeypatch.setattr(NoetherTracker, "_compiled_step", spy)
        monkeypatch.setattr(NoetherTracker, "_compiled_lib", compiled_lib if compiled else lambda self: None)
        monkeypatch.setattr(NoetherTracker, "_compiled_terms", terms_spy)
        monkeypatch.setattr(NoetherTracker, "_compiled_derived", derived_spy)
        torch.manual_seed(0)
        model = MLPBN().double()
        found: dict = dict(example_input=x)
        if "frozen" in case:
            model.get_parameter(case["frozen"]).requires_grad_(False).zero_()
            found = dict(symmetries=[*mlp_bn_groups(), SymmetryGroup("translation", "fc1", (Member("fc1.bias", 0),),
                                                                       32, "output channel", "declared")])
        opt = case["make"](list(model.parameters()))
        tracker = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the non-finite step's warning
            for t in range(1, 11):
                if t == case.get("attach_at", 1):
                    tracker = NoetherTracker(model, opt, log_every_n_steps=1, **found)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                poisoned = t == case.get("poison_at")
                state = [x for p in model.parameters() for x in (p, opt.state[p]["momentum_buffer"])
                         ] if poisoned and case.get("restore") else []
                saved = [x.clone() for x in state]
                if poisoned:
                    model.fc1.weight.grad[0, 0] = float("nan")
                opt.step()
                with torch.no_grad():
                    for now, before in zip(state, saved):
                        now.copy_(before)
        assert tracker is not None
        rec = tracker.last
        assert rec is not None
        fields = [f.name for f in dataclasses.fields(rec) if isinstance(getattr(rec, f.name), torch.Tensor)]
        derived = tracker._held_derived()  # (the last values' rates and angles: nld_derive, or torch ops)
        return {**{f"log {t} {k}": torch.tensor(v, dtype=torch.float64) for t, m in enumerate(tracker.logged)
                   for k, v in m.items()},
                **{f"held {k}": v.clone() for k, v in tracker._dyn.items()},
                **{f"acc {r}": row.clone() for r, row in enumerate(tracker._acc_rows)},
                **{f"last {f}": getattr(rec, f) for f in fields}, **{f"derived {k}": v for k, v in derived.items()}}

    fast = run(True)
    assert calls and all(calls[1:]) and not calls[0]  # (the first tracked step starts the accumulators)
    # the identities: compiled, but for the adaptive rules whose update is not formed in the read
    # (β1 = 0, where the metric identity needs G and d; RMSprop): torch ops
    by_torch = case["id"] in ("adam_b1_0", "rmsprop")
    assert terms_calls and (not any(terms_calls) if by_torch else all(terms_calls))
    assert derived_calls and all(derived_calls)
    for c in (calls, terms_calls, derived_calls):
        c.clear()
    slow = run(False)
    assert calls and not any(calls) and not any(terms_calls) and not any(derived_calls)
    assert fast.keys() == slow.keys()
    assert sum(k.startswith("log 6 ") for k in fast) > 20  # every step logged
    for k in fast:
        # what goes through a square root: torch's float64 sqrt on the CPU (SLEEF's, 0.5001 ulp) is
        # one ulp off the IEEE square root on about 1% of the entries, the kernel's is the IEEE one
        where, name = k.split(" ")[0], k.split(" ")[-1].split("/")[-1]
        root = name in _ROOTED[where]
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-15 if root else 0, atol=0, equal_nan=True, msg=k)


# the quantities made with a square root: tags, held rows, accumulator rows (_EFF, _ANGLE, _QSTAR,
# _RADIAL), the record's fields and the derived rows
_ROOTED_TAGS = {"effective_lr", "angular_update", "radial_update", "equilibrium"}
_ROOTED = {"log": _ROOTED_TAGS, "last": _ROOTED_TAGS, "held": {"radial"}, "derived": {"eff", "angle", "qstar"},
           "acc": {str(r) for r in (tracker_module._EFF, tracker_module._ANGLE, tracker_module._QSTAR,
                                    tracker_module._RADIAL)}}
