"""03 — a CI regression test file to copy into your test suite.

Installing nld_callbacks registers a pytest plugin (fixtures ``nld_toy_problem``, ``nld_baseline``,
option ``--nld-update-baselines``); ``nld_callbacks.testing`` has the assertion helpers. Every
failure names the layer, the step, the measured and predicted values and the tolerance.

    pytest examples/03_test_ci_regression.py
    pytest examples/03_test_ci_regression.py --nld-update-baselines   # after an intended change

The baseline of ``test_charge_trajectories_match_the_baseline`` lives next to this file, in
``nld_baselines/``; check it in.
"""

import pytest

from nld_callbacks.testing import (
    assert_approaches_equilibrium,
    assert_conserved,
    assert_exact_identities,
    run_problem,
    sgd_equilibrium,
)


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_charges_follow_the_exact_identities(nld_toy_problem, momentum, nesterov):
    # every step of every charge is explained up to float64 rounding (|e| ≤ 1)
    problem = nld_toy_problem("mlp_bn", lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=5e-3)
    assert_exact_identities(run_problem(problem, steps=10))


def test_translation_charge_is_conserved(nld_toy_problem):
    # SGD without weight decay: the softmax head's class sums never change (physics.md §1.2)
    traj = run_problem(nld_toy_problem("relu_mlp", lr=0.1), steps=10)
    assert_conserved(traj, kind="translation", rtol=1e-12, atol=1e-12)


def test_weight_decay_drives_the_norm_to_equilibrium(nld_toy_problem):
    # SGD + weight decay on a BatchNorm layer: |w|² relaxes to Q* = η²⟨|g|²⟩/(1 − (1−ηλ)²)
    lr, wd = 0.2, 0.05
    traj = run_problem(nld_toy_problem("mlp_bn", lr=lr, weight_decay=wd, batch_size=16), steps=200)
    q_star = sgd_equilibrium(traj, "fc1", lr=lr, weight_decay=wd)
    assert_approaches_equilibrium(traj, "fc1", equilibrium=q_star, rtol=0.05)


def test_charge_trajectories_match_the_baseline(nld_toy_problem, nld_baseline):
    traj = run_problem(nld_toy_problem("mlp_bn", lr=0.1, momentum=0.9, weight_decay=5e-3), steps=10)
    nld_baseline(traj, quantities=("charge", "predicted"), rtol=1e-6)
