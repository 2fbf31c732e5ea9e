"""NoetherMonitor in every setting a Lightning user trains in.

Each setup runs twice, with and without the monitor: the exact-identity residuals must stay at the
float32 floor (|e| of order 1, physics.md §3.2) and the parameters must be bitwise identical.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nld_callbacks import NoetherMonitor
from nld_callbacks.testing import BNCNN, digits

FLOOR = 4.0  # |e| bound for float32 weights, in physics.md §3.2 units


class Net(LightningModule):
    """A BatchNorm CNN whose optimisation is configured by keyword."""

    def __init__(self, *, manual: bool = False, two_optimizers: bool = False, mixed_groups: bool = False,
                 frozen: bool = False, unfreeze_at: int | None = None, scheduler: str | None = None,
                 nesterov: bool = False, manual_clip: float | None = None) -> None:
        super().__init__()
        self.net = BNCNN(channels=(8, 16, 16))
        self.automatic_optimization = not manual
        self.two_optimizers, self.mixed_groups, self.scheduler = two_optimizers, mixed_groups, scheduler
        self.nesterov, self.unfreeze_at, self.manual_clip = nesterov, unfreeze_at, manual_clip
        if frozen or unfreeze_at is not None:
            for p in self.net[0].parameters():
                p.requires_grad_(False)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:
            return nn.functional.cross_entropy(self(x), y)
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        for opt in opts:
            opt.zero_grad()
        loss = nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        if self.manual_clip is not None:
            for opt in opts:
                self.clip_gradients(opt, gradient_clip_val=self.manual_clip, gradient_clip_algorithm="norm")
        for opt in opts:
            opt.step()
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        if self.unfreeze_at is not None and self.global_step == self.unfreeze_at:
            # fine-tuning: unfreeze the stem and give it its own param group, mid-run
            params = list(self.net[0].parameters())
            for p in params:
                p.requires_grad_(True)
            self.trainer.optimizers[0].add_param_group({"params": params, "lr": 0.02})

    def configure_optimizers(self):
        kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=self.nesterov)
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.two_optimizers:
            stem = [p for m in list(self.net)[:4] for p in m.parameters() if p.requires_grad]
            rest = [p for m in list(self.net)[4:] for p in m.parameters() if p.requires_grad]
            return [torch.optim.SGD(stem, **kw), torch.optim.SGD(rest, lr=0.1)]
        if self.mixed_groups:
            norms = [p for m in self.net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
            decay = [p for p in trainable if all(p is not q for q in norms)]
            opt = torch.optim.SGD([{"params": decay}, {"params": norms, "weight_decay": 0.0, "lr": 0.02}], **kw)
        else:
            opt = torch.optim.SGD(trainable, **kw)
        if self.scheduler == "step":
            warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
            cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
            sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[5])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if self.scheduler == "epoch":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        return opt


def _loader(n=384, batch=32):
    x, y = digits()
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch, shuffle=False)


def _fit(tmp_path, monitors, *, model_kw=None, trainer_kw=None, ckpt_path=None, logger=True, device="cpu"):
    seed_everything(0, verbose=False)
    model = Net(**(model_kw or {}))
    kw = dict(max_steps=24, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
              log_every_n_steps=4, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
              accelerator="gpu" if torch.device(device).type == "cuda" else "cpu", devices=1)
    kw.update(trainer_kw or {})
    trainer = Trainer(logger=TensorBoardLogger(tmp_path, name="run") if logger else False, callbacks=monitors, **kw)
    trainer.fit(model, train_dataloaders=_loader(), ckpt_path=ckpt_path)
    return trainer, model


SETUPS = [
    dict(id="automatic"),
    dict(id="clip_norm", trainer=dict(gradient_clip_val=0.05, gradient_clip_algorithm="norm")),
    dict(id="clip_value", trainer=dict(gradient_clip_val=0.002, gradient_clip_algorithm="value")),
    dict(id="accumulate", trainer=dict(accumulate_grad_batches=3, max_steps=8)),
    dict(id="bf16_mixed", trainer=dict(precision="bf16-mixed")),
    # float16 with a GradScaler (CUDA only): the scaler skips the steps whose gradients overflow
    dict(id="fp16_mixed", trainer=dict(precision="16-mixed"), cuda_only=True),
    dict(id="scheduler_per_step", model=dict(scheduler="step")),
    dict(id="scheduler_per_epoch", model=dict(scheduler="epoch"), trainer=dict(max_steps=30)),
    dict(id="mixed_lr_wd_groups", model=dict(mixed_groups=True)),
    dict(id="nesterov", model=dict(nesterov=True)),
    dict(id="frozen_stem", model=dict(frozen=True)),
    dict(id="unfreeze_mid_run", model=dict(unfreeze_at=8)),
    dict(id="manual", model=dict(manual=True)),
    dict(id="manual_two_optimizers", model=dict(manual=True, two_optimizers=True)),
    dict(id="manual_clip", model=dict(manual=True, manual_clip=0.05)),
]


@pytest.mark.parametrize("setup", SETUPS, ids=[s["id"] for s in SETUPS])
def test_residuals_at_the_floor_and_training_unchanged(tmp_path, setup, device):
    if setup.get("cuda_only") and device.type != "cuda":
        pytest.skip("float16 mixed precision with a GradScaler is a CUDA setting")
    monitor = NoetherMonitor(verbose=False)
    kw = dict(model_kw=setup.get("model"), trainer_kw=setup.get("trainer"), device=device)
    trainer, monitored = _fit(tmp_path / "m", [monitor], **kw)
    _, plain = _fit(tmp_path / "p", [], **kw)
    for (name, a), b in zip(plain.state_dict().items(), monitored.state_dict().values()):
        assert torch.equal(a, b), f"{setup['id']}: {name} differs with the monitor attached"
    assert monitor.summary, f"{setup['id']}: nothing tracked"
    layers = {r["layer"] for r in monitor.summary if r["kind"] == "scale"}
    expected = {"net.3", "net.7"} if setup.get("model", {}).get("frozen") else {"net.0", "net.3", "net.7"}
    assert layers == expected, setup["id"]
    for row in monitor.summary:
        assert row["max_residual"] < FLOOR, f"{setup['id']}: {row}"
        assert row["invalid_steps"] == 0
    steps = [t.step for t in monitor.trackers]
    assert max(steps) == trainer.global_step or setup.get("model", {}).get("manual")


def test_unfrozen_layer_joins_mid_run(tmp_path):
    monitor = NoetherMonitor(verbose=False)
    _fit(tmp_path, [monitor], model_kw=dict(unfreeze_at=8))
    rows = {r["layer"]: r for r in monitor.summary if r["kind"] == "scale"}
    # the stem was frozen for 8 steps: its charge only moved once it joined
    assert rows["net.0"]["delta_observed"] != 0.0
    assert rows["net.0"]["max_residual"] < FLOOR


def _scalars(log_dir):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"] if t.startswith("nld/")}


def test_resume_from_checkpoint_logs_the_same_values(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    full, _ = _fit(tmp_path / "full", [NoetherMonitor(verbose=False)], trainer_kw=dict(max_epochs=2, max_steps=-1))
    first, _ = _fit(tmp_path / "first", [NoetherMonitor(verbose=False), ckpt],
                    trainer_kw=dict(max_epochs=1, max_steps=-1, enable_checkpointing=True))
    path = sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1]
    resumed, _ = _fit(tmp_path / "first", [NoetherMonitor(verbose=False)], ckpt_path=str(path),
                      trainer_kw=dict(max_epochs=2, max_steps=-1))
    a, b = _scalars(full.logger.log_dir), _scalars(resumed.logger.log_dir)
    epoch = first.global_step
    assert set(a) == set(b) and a
    for t in a:
        later = {s: v for s, v in a[t].items() if s > epoch}
        assert later and later == {s: v for s, v in b[t].items() if s > epoch}, t


def test_two_monitors_keep_separate_state(tmp_path):
    every4, stem_only = NoetherMonitor(verbose=False), NoetherMonitor(log_every_n_steps=3, include=["scale/net.0"],
                                                                      verbose=False)
    trainer, _ = _fit(tmp_path, [every4, stem_only], trainer_kw=dict(max_steps=6))
    assert every4.state_key != stem_only.state_key
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt)
    states = torch.load(ckpt, weights_only=False)["callbacks"]
    assert states[every4.state_key]["trackers"][0]["groups"] != states[stem_only.state_key]["trackers"][0]["groups"]
    assert [r["layer"] for r in stem_only.summary] == ["net.0"]


class _NoSymmetry(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), nn.functional.one_hot(y, 10).float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_model_without_symmetry_trains_on_with_one_message(tmp_path):
    monitor = NoetherMonitor(verbose=False)
    trainer = Trainer(max_steps=5, logger=False, callbacks=[monitor], enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="no symmetry found") as rec:
        trainer.fit(_NoSymmetry(), train_dataloaders=_loader(n=160))
    assert trainer.global_step == 5
    assert sum("no symmetry found" in str(w.message) for w in rec) == 1
    assert monitor.summary == []


def test_registered_rule_of_a_custom_module_applies_under_the_monitor(tmp_path):
    from nld_callbacks.symmetries import Homogeneous, register, unregister

    class Gate(nn.Module):
        """A custom op the graph reads as opaque unless its registered rule says otherwise."""

        def forward(self, x):
            return torch.where(x > 0, x, 0.5 * x)  # LeakyReLU written by hand: positively homogeneous

    class GatedNet(Net):
        def __init__(self):
            super().__init__()
            self.net[2] = Gate()

    def fit(rule):
        if rule:
            register(Gate, Homogeneous())
        try:
            monitor = NoetherMonitor(verbose=False)
            seed_everything(0, verbose=False)
            trainer = Trainer(max_steps=3, logger=False, callbacks=[monitor], enable_progress_bar=False,
                              enable_checkpointing=False, enable_model_summary=False)
            trainer.fit(GatedNet(), train_dataloaders=_loader(n=96))
            return {t.key for t in monitor.trackers[0].groups}
        finally:
            if rule:
                unregister(Gate)

    assert "rescale/net.1" in fit(rule=True)
    assert "rescale/net.1" not in fit(rule=False)
