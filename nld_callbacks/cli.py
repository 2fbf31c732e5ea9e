"""The ``nld`` command: ``nld fit`` (LightningCLI presets), ``nld report``, ``nld bench``.

``nld fit --config configs/digits_bn_sgd.yaml`` builds :class:`Classifier` and
:class:`DigitsDataModule` from the YAML (any ``LightningCLI`` argument works), trains with the
:class:`~nld_callbacks.NoetherMonitor` the config names, prints the per-layer summary and the
``tensorboard`` line to open the dashboard.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from . import testing

__all__ = ["Classifier", "DigitsDataModule", "main"]

#: The presets' networks, for 8×8 digits: name → classes → module.
NETS = {
    "bn_cnn": lambda classes: testing.BNCNN(classes=classes),
    "mlp_ln": lambda classes: testing.MLPLN(64, (128, 64), classes),
    "relu_mlp": lambda classes: testing.ReLUMLP(64, (64, 32), classes),
}
OPTIMIZERS = ("sgd", "adamw")


class Classifier(pl.LightningModule):
    """A toy classifier with a plainly configured optimizer (the presets' model).

    Args:
        net: which toy network: ``"bn_cnn"`` (BatchNorm CNN), ``"mlp_ln"`` (LayerNorm MLP),
            ``"relu_mlp"`` (ReLU MLP without normalization).
        classes: number of classes.
        lr: learning rate η.
        momentum: heavy-ball β (SGD).
        dampening: τ (SGD).
        nesterov: Nesterov momentum (SGD).
        weight_decay: λ: coupled for SGD, decoupled for AdamW.
        scheduler: ``None`` or ``"cosine"`` (per-step cosine decay over ``trainer.max_steps`` or the
            estimated number of steps).
        optimizer: ``"sgd"`` (``torch.optim.SGD``) or ``"adamw"`` (``torch.optim.AdamW``).
        betas: AdamW's (β1, β2).
    """

    def __init__(self, net: str = "bn_cnn", classes: int = 10, lr: float = 0.1, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 scheduler: str | None = None, optimizer: str = "sgd",
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        super().__init__()
        if net not in NETS:
            raise ValueError(f"Expected `net` to be one of {sorted(NETS)} but got {net!r}")
        if scheduler not in (None, "cosine"):
            raise ValueError(f"Expected `scheduler` to be None or 'cosine' but got {scheduler!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"Expected `optimizer` to be one of {list(OPTIMIZERS)} but got {optimizer!r}")
        self.save_hyperparameters()
        self.net: nn.Module = NETS[net](classes)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    @override
    def configure_optimizers(self) -> Any:
        hp = cast(AttributeDict, self.hparams)  # what save_hyperparameters() in __init__ stores
        opt: torch.optim.Optimizer
        if hp.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, dampening=hp.dampening,
                                  nesterov=hp.nesterov, weight_decay=hp.weight_decay)
        if hp.scheduler is None:
            return opt
        steps = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's bundled digits (no download), a fixed train/validation split.

    Args:
        batch_size: minibatch size.
        val_fraction: share of samples held out for validation.
        seed: seed of the split and of the shuffling.
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.15, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive int but got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"Expected `val_fraction` in [0, 1) but got {val_fraction}")
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed

    @override
    def setup(self, stage: str) -> None:
        x, y = testing.digits()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(self.val_fraction * len(y)))
        self.val = TensorDataset(x[perm[:n_val]], y[perm[:n_val]])
        self.train = TensorDataset(x[perm[n_val:]], y[perm[n_val:]])

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)


class _FitCLI(LightningCLI):
    def after_fit(self) -> None:
        logger = self.trainer.logger
        if logger is not None and getattr(logger, "log_dir", None) and self.trainer.is_global_zero:
            print(f"\nOpen the dashboard:  tensorboard --logdir {logger.log_dir}")


def fit(args: Sequence[str]) -> None:
    """Run ``LightningCLI`` ``fit`` with the presets' model and data module."""
    _FitCLI(Classifier, DigitsDataModule, args=["fit", *args], save_config_kwargs={"overwrite": True})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nld`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="nld", description="Noether charges of training runs.")
    sub = parser.add_subparsers(dest="command", metavar="{fit,report,bench}")
    sub.add_parser("fit", help="train a preset with NoetherMonitor (LightningCLI; see `nld fit --help`)",
                   add_help=False)
    rep = sub.add_parser("report", help="event files -> per-layer PNGs and a markdown table")
    rep.add_argument("logdir")
    rep.add_argument("--out", default=None, help="output folder (default: LOGDIR/nld_report)")
    sub.add_parser("bench", help="overhead benchmark (see `nld bench --help`)", add_help=False)
    if argv and argv[0] == "fit":
        fit(argv[1:])
        return 0
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    ns = parser.parse_args(argv)
    if ns.command == "report":
        from .report import main as report_main

        return report_main(ns.logdir, ns.out)
    parser.print_help()
    return 0 if argv else 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
