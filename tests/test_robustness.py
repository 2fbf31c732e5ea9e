"""Bad input: non-finite gradients, zero charges, host syncs on the hot path, skipped AMP steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from nld_callbacks import NoetherTracker, find_symmetries
from nld_callbacks.testing import BNCNN, MLPBN, HostSyncError, _NoHostSync, forbid_host_sync, synthetic_classification
from nld_callbacks.tracker import _BAD


def _step(model, opt, x, y, *, poison=None):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if poison is not None:
        model.fc1.weight.grad[0, 0] = poison
    opt.step()


def test_non_finite_step_is_marked_invalid_and_kept_out():
    torch.manual_seed(0)
    x, y = synthetic_classification(n=64)
    model = MLPBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = NoetherTracker(model, opt, example_input=x, log_every_n_steps=100)
    for _ in range(3):
        _step(model, opt, x, y)
    before = tracker._acc.clone()
    _step(model, opt, x, y, poison=float("inf"))  # the weights become non-finite from here on
    rec = tracker.last  # an invalid step's record: its charges and residuals, no prediction
    assert rec.step == 4 and not torch.isfinite(rec.charge).all() and torch.isfinite(rec.charge_before).all()
    assert rec.predicted.isnan().all() and rec.effective_lr.isnan().all() and rec.nld.isnan().all()
    _step(model, opt, x, y)
    rows = [i for i in range(before.shape[0]) if i != _BAD]
    torch.testing.assert_close(tracker._acc[rows], before[rows], rtol=0, atol=0, equal_nan=True,
                               msg="accumulators moved on an invalid step")
    assert set(tracker._acc[_BAD].tolist()) == {2.0}
    with pytest.warns(UserWarning, match="2 step\\(s\\) had non-finite values") as rec:
        m = tracker.flush()
    assert len(rec) == 1
    assert tracker.summary()[0]["invalid_steps"] == 2
    assert all(v == v for v in m.values()), "a NaN reached the logged values"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.flush()  # the warning is given once


def test_zero_charge_group_is_tracked_without_nan_in_the_layer_means():
    torch.manual_seed(0)
    x, y = synthetic_classification(n=64)
    model = MLPBN()
    with torch.no_grad():
        model.fc1.weight[:4] = 0.0
        model.fc1.bias[:4] = 0.0  # four channels of zero charge (BN output 0, zero gradient)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)
    tracker = NoetherTracker(model, opt, example_input=x, log_every_n_steps=5)
    for _ in range(5):
        _step(model, opt, x, y)
    m = tracker.logged[-1]
    assert m["nld/scale/fc1/residual"] < 4.0
    q = tracker.layout.split(tracker.last.charge)[0]
    assert torch.all(q[:4] == 0)
    rest = (model.fc1.weight[4:].detach().double() ** 2).sum(1) + model.fc1.bias[4:].detach().double() ** 2
    eff = 0.1 / ((1 - 0.1 * 1e-3) * tracker.layout.split(tracker.last.charge_before)[0][4:])
    assert m["nld/scale/fc1/charge"] == pytest.approx(float(rest.sum()), rel=1e-5)
    assert m["nld/scale/fc1/effective_lr"] == pytest.approx(float(eff.mean()), rel=1e-12)


@pytest.mark.parametrize("opt_kw", [dict(momentum=0.9, weight_decay=5e-4), dict(momentum=0.9, nesterov=True),
                                    dict(weight_decay=1e-3)], ids=["heavy_ball", "nesterov", "sgd"])
def test_no_host_sync_on_steps_that_do_not_log(opt_kw, device):
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8).to(device)
    y = torch.randint(0, 10, (32,)).to(device)
    model = BNCNN(channels=(4, 8, 8)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, **opt_kw)
    tracker = forbid_host_sync(NoetherTracker(model, opt, find_symmetries(model, x), log_every_n_steps=4))
    for _ in range(8):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert tracker.step == 8 and len(tracker.logged) == 2

    # the guard itself works: a sync inside it fails, and so, on any device, does what waits for a GPU
    with pytest.raises(HostSyncError, match="host sync"), _NoHostSync():
        torch.ones(1).item()
    for waits in (lambda: x[[0, 1]], lambda: x[x > 0], lambda: x.nonzero(), lambda: torch.where(x > 0),
                  lambda: y.unique()):
        with pytest.raises(HostSyncError, match="host sync"), _NoHostSync():
            waits()
    with _NoHostSync():  # and what does not wait passes
        x[0, :, 1:3], x[torch.zeros(2, dtype=torch.long, device=device)], torch.where(x > 0, x, 0.0)
    if device.type == "cuda":  # and on CUDA one that no Python call names (a blocking copy from the host)
        with pytest.raises(RuntimeError, match="synchronizing CUDA operation"), _NoHostSync(cuda=True):
            torch.tensor([0, 1]).to(device)


def test_grad_scaler_skipped_steps_are_not_counted(device):
    torch.manual_seed(0)
    x, y = (t.to(device) for t in synthetic_classification(n=64))
    model = MLPBN().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    tracker = NoetherTracker(model, opt, example_input=x, log_every_n_steps=100)
    seen = 0
    for i in range(6):
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if i in (2, 4):
            model.fc2.weight.grad[0, 0] = float("inf")  # the scaler skips this step
        scaler.step(opt)
        scaler.update()
        seen += i not in (2, 4)
        tracker.sync_step(i + 1)
    assert tracker.skipped_steps == 2 and tracker.step == 6
    row = tracker.summary()[0]
    assert row["invalid_steps"] == 0 and row["max_residual"] < 4.0
    assert seen == 4


def test_example_input_that_does_not_fit_names_what_the_model_expects():
    model = MLPBN(d=20)
    with pytest.raises(ValueError, match=r"does not fit MLPBN.*Tensor\(shape=\(4, 7\).*in_features=20.*\(N, 20\)"):
        find_symmetries(model, torch.randn(4, 7))
    # the failed probe left the model as it was
    assert model.bn1.num_batches_tracked.item() == 0


class _ScaledSGD(torch.optim.SGD):
    """A subclass whose step() calls super().step(): torch fires the step hooks once per class."""

    def step(self, closure=None):
        return super().step(closure)


def test_subclass_calling_super_step_is_one_step():
    torch.manual_seed(0)
    x, y = synthetic_classification(n=64)
    model = MLPBN()
    torch.optim.SGD(model.parameters(), lr=0.1)  # SGD.step is hooked once an SGD exists
    opt = _ScaledSGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="overrides step"):
        tracker = NoetherTracker(model, opt, example_input=x, log_every_n_steps=3)
    for _ in range(3):
        _step(model, opt, x, y)
    assert tracker.step == 3 and len(tracker.logged) == 1
    w, b = model.fc1.weight.detach().double(), model.fc1.bias.detach().double()
    assert tracker.logged[-1]["nld/scale/fc1/charge"] == pytest.approx(float((w**2).sum() + (b**2).sum()), rel=1e-6)
