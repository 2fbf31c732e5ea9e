"""NoetherMonitor end to end, the Lightning way: a tiny Trainer, event files read back."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nld_callbacks import NoetherMonitor
from nld_callbacks.cli import Classifier, DigitsDataModule


def _fit(tmp_path, monitor, *, steps=30, logger=True, device="cpu", **model_kw):
    seed_everything(0, verbose=False)
    model = Classifier(**{"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, **model_kw})
    trainer = Trainer(
        max_steps=steps, logger=TensorBoardLogger(tmp_path, name="run") if logger else False,
        callbacks=[monitor] if monitor is not None else [], enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=5,
        limit_val_batches=0, num_sanity_val_steps=0, deterministic=True,
        accelerator="gpu" if torch.device(device).type == "cuda" else "cpu", devices=1,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    return trainer, model


def test_event_file_has_tags_and_residuals_at_the_floor(tmp_path, device):
    monitor = NoetherMonitor()
    trainer, _ = _fit(tmp_path, monitor, device=device)
    acc = EventAccumulator(trainer.logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    layers = ["net.0", "net.3", "net.7"]
    for layer in layers:
        for q in ("charge", "predicted", "residual", "effective_lr"):
            assert f"nld/scale/{layer}/{q}" in tags
        residuals = [ev.value for ev in acc.Scalars(f"nld/scale/{layer}/residual")]
        charge = [ev.value for ev in acc.Scalars(f"nld/scale/{layer}/charge")]
        predicted = [ev.value for ev in acc.Scalars(f"nld/scale/{layer}/predicted")]
        steps = [ev.step for ev in acc.Scalars(f"nld/scale/{layer}/charge")]
        assert steps == [5, 10, 15, 20, 25, 30]
        assert max(residuals) < 4.0  # float32 floor, physics.md §3.2 units
        for c, p in zip(charge, predicted):
            assert abs(c - p) < 1e-3 * c
    # the first step is spent reading the graph; every later one is tracked
    assert [t.step for t in monitor.trackers] == [30]
    assert [r["layer"] for r in monitor.summary if r["kind"] == "scale"] == layers


def test_monitor_never_changes_training(tmp_path, device):
    _, plain = _fit(tmp_path / "a", None, steps=12, nesterov=True, device=device)
    _, monitored = _fit(tmp_path / "b", NoetherMonitor(log_every_n_steps=2), steps=12, nesterov=True, device=device)
    if device.type == "cuda":  # the comparison means something only if plain training repeats bitwise
        _, again = _fit(tmp_path / "c", None, steps=12, nesterov=True, device=device)
        assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), again.state_dict().values()))
    for (n, a), b in zip(plain.state_dict().items(), monitored.state_dict().values()):
        assert torch.equal(a, b), n


def test_no_logger_is_one_clear_message(tmp_path):
    monitor = NoetherMonitor()
    with pytest.warns(UserWarning, match="no logger"):
        _fit(tmp_path, monitor, steps=6, logger=False)
    assert [r["layer"] for r in monitor.summary if r["kind"] == "scale"] == ["net.0", "net.3", "net.7"]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_log_every_n_steps(bad):
    with pytest.raises(ValueError, match="log_every_n_steps"):
        NoetherMonitor(log_every_n_steps=bad)


def test_bad_include():
    with pytest.raises(TypeError, match="include"):
        NoetherMonitor(include="scale/*")  # type: ignore[arg-type]


def test_auto_sampling_through_the_monitor(tmp_path):
    monitor = NoetherMonitor(log_every_n_steps=5, sample_every="auto", max_overhead=0.5)
    trainer, _ = _fit(tmp_path, monitor, steps=30)
    (tracker,) = monitor.trackers
    assert tracker.auto is not None and tracker.auto.max_overhead == 0.5 and tracker.step == 30
    acc = EventAccumulator(trainer.logger.log_dir)
    acc.Reload()
    # every logging step writes (the last tracked step's values), residuals at the floor
    assert [ev.step for ev in acc.Scalars("nld/scale/net.3/charge")] == [5, 10, 15, 20, 25, 30]
    assert max(ev.value for ev in acc.Scalars("nld/scale/net.3/residual")) < 4.0
    with pytest.raises(ValueError, match="max_overhead"):
        NoetherMonitor(sample_every="auto", max_overhead=1.5)
