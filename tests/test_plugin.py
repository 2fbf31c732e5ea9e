"""The CI side: toy problems, assertion helpers, JSON baselines, and the pytest plugin (via pytester)."""

from __future__ import annotations

import json

import pytest
import torch

from nld_callbacks import NoetherTracker
from nld_callbacks.symmetries import Member, SymmetryGroup
from nld_callbacks.testing import (
    Trajectory,
    assert_approaches_equilibrium,
    assert_conserved,
    assert_exact_identities,
    assert_matches_baseline,
    run_problem,
    sgd_equilibrium,
    toy_problem,
)

pytest_plugins = ["pytester"]


def _loop(problem, steps, symmetries=None, after_step=None, before_step=None, inside_step=None):
    """A plain tracked loop with hooks, logging every step."""
    traj = Trajectory()
    opt = problem.optimizer()
    if inside_step:  # an optimizer post-hook that runs before the tracker's
        opt.register_step_post_hook(lambda o, a, k: inside_step())
    kw = {} if symmetries is not None else {"example_input": problem.example_input}
    with NoetherTracker(problem.model, opt, symmetries, writer=traj, log_every_n_steps=1, **kw) as tracker:
        for i, (x, y) in enumerate(problem.batches(steps)):
            opt.zero_grad()
            problem.loss(x, y).backward()
            if before_step:
                before_step(i)
            opt.step()
            if after_step:
                after_step(i)
    traj.start = {f"{r['kind']}/{r['layer']}": r["charge_start"] for r in tracker.summary()}
    return traj


# ------------------------------------------------------------------------------------ toy problems
@pytest.mark.parametrize("name", ["mlp_bn", "mlp_ln", "relu_mlp", "bn_cnn"])
def test_toy_problems_are_seeded_and_fresh(name):
    a, b = toy_problem(name, seed=3), toy_problem(name, seed=3)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    assert a.model is not b.model
    x, y = next(iter(a.batches(1)))
    assert a.model(x).shape == (len(y), int(a.y.max()) + 1)
    assert toy_problem(name, seed=4).model.state_dict().keys() == a.model.state_dict().keys()


def test_minibatches_cover_the_data_in_a_fixed_order():
    p = toy_problem("mlp_bn", batch_size=32)
    first = [y.tolist() for _, y in p.batches(8)]
    assert first == [y.tolist() for _, y in p.batches(8)]
    assert sorted(sum(first[:4], [])) == sorted(p.y.tolist())  # one epoch = 4 batches of 32


def test_unknown_problem():
    with pytest.raises(ValueError, match="`name`.*'nope'"):
        toy_problem("nope")


# ------------------------------------------------------------------------------------ helpers
def test_exact_identities_hold_and_a_parameter_edit_is_caught():
    traj = run_problem(toy_problem("mlp_bn", lr=0.1, momentum=0.9, weight_decay=5e-3), 15)
    assert_exact_identities(traj)
    p = toy_problem("mlp_bn", lr=0.1, weight_decay=5e-3)
    calls = []

    def max_norm():  # a constraint applied inside the optimizer step on step 7: no SGD model explains it
        calls.append(1)
        if len(calls) == 7:
            with torch.no_grad():
                p.model.fc1.weight.mul_(0.999)

    broken = _loop(p, 10, inside_step=max_norm)
    assert_exact_identities(Trajectory(broken.steps[:6], broken.records[:6]))
    with pytest.raises(AssertionError) as err:
        assert_exact_identities(broken)
    msg = str(err.value)
    for part in ("layer 'fc1'", "at step 7", "measured ", "predicted ", "tolerance 1"):
        assert part in msg, msg


def _rescale_group():
    # BN (γ, β) of unit j against fc2's column j: ⟨θ_in, g_in⟩ = ⟨θ_out, g_out⟩ (physics.md §1.3)
    members = (Member("bn1.weight"), Member("bn1.bias"), Member("fc2.weight", axis=1, sign=-1))
    return SymmetryGroup("rescale", "bn1", members, 32, "hidden unit", "BatchNorm affine → ReLU → Linear")


def _rescale_charge(model):
    g, b, w = model.bn1.weight.detach(), model.bn1.bias.detach(), model.fc2.weight.detach()
    return float((g * g + b * b).sum() - (w * w).sum())


@pytest.mark.parametrize("lr", [1e-3, 0.3])
def test_conserved_against_the_charge_read_off_the_weights(lr):
    p = toy_problem("mlp_bn", lr=lr)
    direct = [_rescale_charge(p.model)]
    traj = _loop(p, 10, symmetries=[_rescale_group()], after_step=lambda i: direct.append(_rescale_charge(p.model)))
    steps, q = traj.series("rescale", "bn1", "charge")
    assert q == pytest.approx(direct[1:], rel=1e-12, abs=1e-12)
    assert traj.start["rescale/bn1"] == pytest.approx(direct[0], rel=1e-12)
    drift = max(abs(v - direct[0]) for v in direct[1:]) / abs(direct[0])
    assert drift > 0  # finite learning rate: conservation is broken at O(η²) (physics.md §2.1)
    assert_conserved(traj, "bn1", rtol=1.01 * drift)
    with pytest.raises(AssertionError, match=r"rescale charge of layer 'bn1' is not conserved at step \d+: measured"):
        assert_conserved(traj, "bn1", rtol=0.5 * drift)


def test_conservation_improves_as_the_learning_rate_shrinks():
    # R6 (physics.md §6): at a fixed time ηk the rescale drift falls ∝ η
    drifts = []
    for lr, steps in [(0.1, 10), (0.02, 50)]:
        p = toy_problem("mlp_bn", lr=lr)
        traj = _loop(p, steps, symmetries=[_rescale_group()])
        _, q = traj.series("rescale", "bn1", "charge")
        drifts.append(abs(q[-1] - traj.start["rescale/bn1"]))
    assert drifts[1] < 0.4 * drifts[0]  # 0.2 if exactly ∝ η


def test_equilibrium_from_the_trajectory_against_the_gradients():
    lr, wd = 0.2, 0.05
    p = toy_problem("mlp_bn", lr=lr, weight_decay=wd, batch_size=16)
    G = []

    def grad_sq(i):
        w, b = p.model.fc1.weight.grad, p.model.fc1.bias.grad
        G.append(float((w * w).sum() + (b * b).sum()))

    scale = SymmetryGroup("scale", "fc1", (Member("fc1.weight"), Member("fc1.bias")), 32, "output channel", "BN")
    traj = _loop(p, 200, symmetries=[scale], before_step=grad_sq)
    a2 = (1 - lr * wd) ** 2
    reference = lr * lr * sum(G[-50:]) / 50 / (1 - a2)  # Q* = η²⟨|g|²⟩/(1 − (1−ηλ)²), physics.md §2.4
    q_star = sgd_equilibrium(traj, "fc1", lr=lr, weight_decay=wd, window=50)
    assert q_star == pytest.approx(reference, rel=1e-9)
    assert_approaches_equilibrium(traj, "fc1", equilibrium=q_star, rtol=0.05, window=20)
    short = Trajectory(traj.steps[:20], traj.records[:20], traj.start)
    with pytest.raises(AssertionError, match=r"layer 'fc1' does not approach its equilibrium by step 20: measured"):
        assert_approaches_equilibrium(short, "fc1", equilibrium=q_star, rtol=0.05)


def test_equilibrium_needs_every_step():
    traj = run_problem(toy_problem("mlp_bn", weight_decay=0.01), 6, log_every_n_steps=2)
    with pytest.raises(ValueError, match="logged at every step"):
        sgd_equilibrium(traj, "fc1", lr=0.1, weight_decay=0.01)


def test_missing_layer_names_what_there_is():
    traj = run_problem(toy_problem("mlp_bn"), 2)
    with pytest.raises(AssertionError, match="no charge matching scale/fc9.*holds scale/fc1"):
        assert_conserved(traj, "fc9", kind="scale")


# ------------------------------------------------------------------------------------ baselines
def test_baseline_round_trip(tmp_path):
    path = tmp_path / "base.json"
    traj = run_problem(toy_problem("mlp_bn", lr=0.1, weight_decay=1e-3), 5)
    with pytest.raises(AssertionError, match="no baseline"):
        assert_matches_baseline(traj, path)
    stored = json.loads(path.read_text())
    assert stored["steps"] == [1, 2, 3, 4, 5]
    assert stored["series"]["scale/fc1/charge"] == [r["nld/scale/fc1/charge"] for r in traj.records]
    assert path.stat().st_size < 2_000
    assert_matches_baseline(traj, path)  # the same run passes
    other = run_problem(toy_problem("mlp_bn", lr=0.11, weight_decay=1e-3), 5)
    with pytest.raises(AssertionError, match=r"scale charge of layer 'fc1' left its baseline at step 1: measured"):
        assert_matches_baseline(other, path)
    assert_matches_baseline(other, path, update=True)
    assert_matches_baseline(other, path)


# ------------------------------------------------------------------------------------ the plugin
PASSING = """
from nld_callbacks.testing import assert_exact_identities, run_problem

def test_charges(nld_toy_problem, nld_baseline):
    traj = run_problem(nld_toy_problem("mlp_bn", lr=LR, momentum=0.9, weight_decay=5e-3), steps=8)
    assert_exact_identities(traj)
    nld_baseline(traj)
"""

BROKEN = """
import torch
from nld_callbacks import NoetherTracker
from nld_callbacks.testing import Trajectory, assert_exact_identities

def test_weights_edited_inside_the_step(nld_toy_problem):
    p = nld_toy_problem("mlp_bn", lr=0.1)
    opt, traj = p.optimizer(), Trajectory()

    def bump(optimizer, args, kwargs):  # a bug: parameters changed inside the optimizer step
        with torch.no_grad():
            p.model.fc1.bias.add_(0.01)

    opt.register_step_post_hook(bump)
    with NoetherTracker(p.model, opt, example_input=p.x, writer=traj, log_every_n_steps=1):
        for x, y in p.batches(6):
            opt.zero_grad()
            p.loss(x, y).backward()
            opt.step()
    assert_exact_identities(traj)
"""


def test_plugin_passing_then_regressing(pytester):
    pytester.makepyfile(test_user=PASSING.replace("LR", "0.1"))
    first = pytester.runpytest("-q", "-p", "no:cacheprovider")
    first.assert_outcomes(failed=1)  # no baseline yet: written, and the test says so
    first.stdout.fnmatch_lines(["*no baseline at*test_user__test_charges.json*"])
    baseline = pytester.path / "nld_baselines" / "test_user__test_charges.json"
    assert baseline.exists()
    pytester.runpytest("-q", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    # a changed training setup leaves the baseline: the message names layer, step, values, tolerance
    pytester.makepyfile(test_user=PASSING.replace("LR", "0.12"))
    broken = pytester.runpytest("-q", "-p", "no:cacheprovider")
    broken.assert_outcomes(failed=1)
    broken.stdout.fnmatch_lines(["*scale charge of layer 'fc1' left its baseline at step 1: measured *, baseline *"
                                 "tolerance *"])
    updated = pytester.runpytest("-q", "-p", "no:cacheprovider", "--nld-update-baselines")
    updated.assert_outcomes(passed=1)
    pytester.runpytest("-q", "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_plugin_catches_a_broken_training_loop(pytester):
    pytester.makepyfile(test_broken=BROKEN)
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the scale charge of layer 'fc1' does not follow the exact per-step identity at "
                                 "step 1: measured *, predicted *, unexplained residual |e| = * > tolerance 1*"])


def test_plugin_lists_its_option_and_fixtures(pytester):
    pytester.makepyfile(test_x="def test_x(nld_update_baselines, nld_toy_problem):\n"
                               "    assert not nld_update_baselines\n")
    pytester.runpytest("-q").assert_outcomes(passed=1)
    pytester.runpytest("--help").stdout.fnmatch_lines(["*--nld-update-baselines*"])
