"""NoetherTracker(sample_every=k): exact on sampled steps, free on the others."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nld_callbacks import NoetherTracker
from nld_callbacks.bench import count_ops
from nld_callbacks.testing import MLPBN, synthetic_classification
from nld_callbacks.tracker import AutoSampler


def _run(k, *, steps=20, momentum=0.9, log_every=5, record=None):
    torch.manual_seed(0)
    x, y = synthetic_classification(n=64)
    model = MLPBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum, weight_decay=5e-3)
    tracker = NoetherTracker(model, opt, example_input=x, log_every_n_steps=log_every, sample_every=k)
    for step in range(1, steps + 1):
        opt.zero_grad()
        batch = slice(0, 16) if step % 2 else slice(16, 32)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
        if record is not None and tracker.last is not None and tracker.last.step == step:
            record[step] = tracker.last
    return tracker, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "heavy_ball"])
def test_sampled_steps_are_the_same_numbers(momentum):
    full, sampled = {}, {}
    t1, p1 = _run(1, momentum=momentum, record=full)
    t5, p5 = _run(5, momentum=momentum, record=sampled)
    assert all(torch.equal(a, b) for a, b in zip(p1, p5))  # training is untouched
    assert sorted(sampled) == [5, 10, 15, 20]
    for step, rec in sampled.items():
        for field in ("charge_before", "charge", "predicted", "breaking", "residual", "effective_lr"):
            torch.testing.assert_close(getattr(rec, field), getattr(full[step], field), rtol=0, atol=0,
                                       equal_nan=True, msg=f"{field} at step {step}")
    # logging steps that are not sampled still write (the last sampled values)
    t3, _ = _run(3, momentum=momentum, log_every=5)
    assert len(t3.logged) == 4 and t3.step == 20
    assert all(m.keys() == t1.logged[0].keys() for m in t3.logged)


def test_unsampled_steps_dispatch_no_tensor_op():
    torch.manual_seed(0)
    x, y = synthetic_classification(n=32)

    def step_ops(k):
        torch.manual_seed(0)
        model = MLPBN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        tracker = NoetherTracker(model, opt, example_input=x, log_every_n_steps=1000, sample_every=k) if k else None
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        n = sum(count_ops(opt.step).values())  # step 4: unsampled for k = 10
        assert tracker is None or tracker.step == 4
        return n

    assert step_ops(10) == step_ops(None)
    assert step_ops(1) > step_ops(None)


def test_continuous_law_over_sampled_drives_stays_close():
    """First-order SGD law fed one drive in k: within 1e-2 of the law fed every drive (measured
    ~1e-3 on this toy; the heavy-ball oscillator's error is the sampling noise of its drive)."""
    a, _ = _run(1, steps=60, momentum=0.0, log_every=30)
    b, _ = _run(10, steps=60, momentum=0.0, log_every=30)
    keys = [k for k in a.logged[-1] if k.endswith("/nld") and k.startswith("nld/scale")]
    assert keys
    for k in keys:
        ref = a.logged[-1][k]
        assert abs(b.logged[-1][k] - ref) <= 1e-2 * abs(ref), (k, ref, b.logged[-1][k])


def test_sample_every_is_validated():
    model = MLPBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="sample_every"):
            NoetherTracker(model, opt, sample_every=bad)


def test_monitor_passes_sample_every(tmp_path):
    from lightning.pytorch import Trainer, seed_everything

    from nld_callbacks import NoetherMonitor
    from nld_callbacks.cli import Classifier, DigitsDataModule

    with pytest.raises(ValueError, match="sample_every"):
        NoetherMonitor(sample_every=0)
    seed_everything(0, verbose=False)
    monitor = NoetherMonitor(log_every_n_steps=4, sample_every=4, verbose=False)
    trainer = Trainer(max_steps=12, logger=False, callbacks=[monitor], enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0)
    trainer.fit(Classifier(lr=0.1, momentum=0.9, weight_decay=5e-4), DigitsDataModule(batch_size=32))
    (tracker,) = monitor.trackers
    assert tracker.sample_every == 4 and tracker.step == 12
    assert tracker.last is not None and tracker.last.step == 12  # the last step was a sampled one
    assert monitor.summary and all(abs(r["max_residual"]) < 10 for r in monitor.summary)


class _Clock:
    """A fake clock the test moves: the loop adds the plain step time, the tracked hooks their own."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _timed(tracker, *, pre=5.0, post=5.0, flush=0.0):
    """Give the tracker's work fake durations on its auto sampler's clock."""
    clock = tracker.auto.clock = _Clock()
    def costing(f, cost):
        def run(*args, **kw):
            clock.t += cost
            return f(*args, **kw)

        return run

    for name, cost in (("_pre_tracked", pre), ("_post_tracked", post), ("flush", flush)):
        setattr(tracker, name, costing(getattr(tracker, name), cost))
    return clock


def _run_auto(max_overhead, *, steps=30, momentum=0.9, plain=100.0, flush=0.0, record=None):
    torch.manual_seed(0)
    x, y = synthetic_classification(n=64)
    model = MLPBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum, weight_decay=5e-3)
    tracker = NoetherTracker(model, opt, example_input=x, log_every_n_steps=10, sample_every="auto",
                             max_overhead=max_overhead)
    clock = _timed(tracker, flush=flush)
    tracked = []
    for step in range(1, steps + 1):
        clock.t += plain
        opt.zero_grad()
        batch = slice(0, 16) if step % 2 else slice(16, 32)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
        if tracker.last is not None and tracker.last.step == step:
            tracked.append(step)
            if record is not None:
                record[step] = tracker.last
    return tracker, tracked, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(("max_overhead", "k"), [(0.02, 5), (0.01, 10)])
def test_auto_interval_follows_the_measured_times(max_overhead, k):
    """A tracked step's hooks take 10 units (pre 5 + post 5), the rest of a step 100:
    k = ⌈10 / (max_overhead · 100)⌉. Steps 1–3 warm up, step 5 (after a gap of 2) builds the plans
    of a step whose predecessor was untracked; neither is timed. Step 7 is the first timed one."""
    full, sampled = {}, {}
    _, p_full = _run(1, steps=30, record=full)
    tracker, tracked, params = _run_auto(max_overhead, record=sampled)
    assert tracker.auto.k == k
    assert tracked == [1, 2, 3, 5, 7] + list(range(7 + k, 31, k))
    assert all(torch.equal(a, b) for a, b in zip(params, p_full))  # training is untouched
    for step, rec in sampled.items():  # tracked steps are the same numbers as with k = 1
        for field in ("charge_before", "charge", "predicted", "residual"):
            torch.testing.assert_close(getattr(rec, field), getattr(full[step], field), rtol=0, atol=0,
                                       msg=f"{field} at step {step}")


def test_auto_interval_leaves_room_for_the_logging_writes():
    """Writes of 5 units at the logging steps (every 10th) cost about 0.5 a step whatever k is:
    of the 2 units a step allowed (2 % of 100) the tracked steps get the rest, so k > 5."""
    tracker, tracked, _ = _run_auto(0.02, steps=40, flush=5.0)
    idle, n = tracker.auto._idle
    assert idle == 5.0 * len({10, 20, 30, 40} - set(tracked)) and n == 40 - len(tracked)
    # chosen at the last tracked step, with the writes seen by then; 5 without them
    assert 5 < tracker.auto.k <= math.ceil(10 / (2.0 - idle / n))


def test_auto_law_spans_the_untracked_steps():
    """The law advances over every step since the last tracked one (SGD: within 1e-2 of the law
    fed every step, as with a fixed k); advancing one step per tracked step would lag far behind."""
    full, sampled = {}, {}
    _run(1, steps=60, momentum=0.0, record=full)
    tracker, tracked, _ = _run_auto(0.01, steps=60, momentum=0.0, record=sampled)
    last = tracked[-1]
    assert tracker.auto.k > 1 and last > 30
    ref, got = full[last].nld, sampled[last].nld
    assert torch.isfinite(ref).all()
    assert ((got - ref).abs() <= 1e-2 * ref.abs() + 1e-12).all()


def test_auto_arguments_are_validated():
    model = MLPBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="positive int or 'auto'"):
        NoetherTracker(model, opt, [], sample_every="sometimes")
    with pytest.raises(ValueError, match="max_overhead"):
        NoetherTracker(model, opt, [], sample_every="auto", max_overhead=0.0)


def test_auto_steps_that_build_plans_are_not_timed():
    calls = []
    torch.manual_seed(0)
    x, y = synthetic_classification(n=32)
    model = MLPBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = NoetherTracker(model, opt, example_input=x, log_every_n_steps=100, sample_every="auto",
                             max_overhead=0.02)
    clock = _timed(tracker)
    end = tracker.auto.step_end
    tracker.auto.step_end = lambda step, tracked, now, one_time=False: (
        calls.append((step, tracked, one_time)), end(step, tracked, now, one_time=one_time))
    for _ in range(12):
        clock.t += 100.0
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    # step 1 builds the pre- and post-step plans, step 5 (the first after a gap) the unsampled ones
    assert [s for s, tracked, one_time in calls if one_time] == [1, 5]
    assert [s for s, tracked, _ in calls if tracked] == [1, 2, 3, 5, 7, 12]


def test_auto_sampler_leaves_one_time_work_out():
    ticks = iter([0.0, 1.0, 101.0, 151.0, 251.0, 252.0])  # three tracked steps: 1 s, 50 s (one-time), 1 s
    s = AutoSampler(max_overhead=0.01, warmup=0, clock=lambda: next(ticks))
    ks = []
    for step, one_time in ((1, False), (2, True), (3, False)):
        s.step_end(step, True, s.spent(s.clock()), one_time=one_time)
        ks.append(s.k)
    # no plain time after step 1 yet (one gap first); then own 1 s against plain 100 s: k = 1
    # (counting the 50 s step would make it 26)
    assert ks == [2, 1, 1] and s.next == 4


def test_law_spans_the_optimizer_steps_the_hooks_saw():
    """A step a GradScaler skips calls no optimizer hook; the trainer's clock still counts it
    (`sync_step`). The law then spans the k − 1 real steps, not k."""
    torch.manual_seed(0)
    x, y = synthetic_classification(n=32)
    model = MLPBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = NoetherTracker(model, opt, example_input=x, log_every_n_steps=100, sample_every=5)
    spans = {}
    for step in range(1, 11):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 7:
            tracker.sync_step(tracker.step + 1)  # skipped: no optimizer.step()
        else:
            opt.step()
        if tracker.last is not None and tracker.last.step == step:
            spans[step] = tracker._span
    assert spans == {5: 1, 10: 4} and tracker.skipped_steps == 1
