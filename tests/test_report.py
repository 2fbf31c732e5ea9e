"""`nld report`: PNGs and the markdown table from event files alone."""

from __future__ import annotations

import matplotlib.image as mpimg
import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from nld_callbacks import NoetherTracker
from nld_callbacks.cli import main as cli_main
from nld_callbacks.report import load_runs, main, write_report
from nld_callbacks.symmetries import Member, SymmetryGroup
from nld_callbacks.testing import MLPBN, synthetic_classification


def _scale_fc1():
    return SymmetryGroup("scale", "fc1", (Member("fc1.weight"), Member("fc1.bias")), 32, "output channel", "BN")


def _plain_run(logdir, *, steps=12, every=4, lr=0.2, wd=0.01):
    torch.manual_seed(0)
    model = MLPBN(eps=1e-30).double()
    x, y = synthetic_classification(64, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    writer = SummaryWriter(str(logdir))
    with NoetherTracker(model, opt, [_scale_fc1()], writer=writer, log_every_n_steps=every):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    writer.close()
    return model


def _row(table, layer):
    (line,) = [ln for ln in table.splitlines() if f"| {layer} |" in ln or f"[{layer}]" in ln]
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_of_a_plain_tracker_run(tmp_path, capsys):
    model = _plain_run(tmp_path / "logs")
    assert main(str(tmp_path / "logs"), str(tmp_path / "out")) == 0
    printed = capsys.readouterr().out
    assert "Wrote 1 PNG(s)" in printed
    png = tmp_path / "out" / "scale_fc1.png"
    img = mpimg.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert png.stat().st_size < 300_000
    table = (tmp_path / "out" / "summary.md").read_text()
    row = _row(table, "fc1")
    # the last logged charge is the model's own Σ_c |w_c|² + b_c² after the last step
    w, b = model.fc1.weight.detach(), model.fc1.bias.detach()
    q = float(((w * w).sum(1) + b * b).sum())
    kind, layer, logs, first, last = row[:5]
    assert (kind, logs, last) == ("scale", "3", f"{q:.4g}")
    assert "(scale_fc1.png)" in layer
    # float64 with eps ≈ 0: the charge stays inside the band and |e| is far below 1
    assert float(row[6]) <= 1.0 and float(row[7]) < 1e-3


def test_report_reads_the_same_series_the_tracker_wrote(tmp_path):
    torch.manual_seed(0)
    model = MLPBN()
    x, y = synthetic_classification(32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    writer = SummaryWriter(str(tmp_path))
    with NoetherTracker(model, opt, [_scale_fc1()], writer=writer, log_every_n_steps=2) as tracker:
        for _ in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    writer.close()
    (ls,) = load_runs(tmp_path)
    steps, charge = ls.get("charge")
    assert steps == [2, 4, 6]
    assert charge == pytest.approx([m["nld/scale/fc1/charge"] for m in tracker.logged], rel=1e-6)
    assert set(ls.series) >= {"charge", "predicted", "band_lower", "band_upper", "residual", "effective_lr"}


def test_report_of_a_lightning_run_through_the_cli(tmp_path, capsys):
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from nld_callbacks import NoetherMonitor
    from nld_callbacks.cli import Classifier, DigitsDataModule

    seed_everything(0, verbose=False)
    trainer = Trainer(max_steps=10, logger=TensorBoardLogger(tmp_path / "runs", name="job"),
                      callbacks=[NoetherMonitor(verbose=False)], enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=5,
                      limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(Classifier(lr=0.1, weight_decay=5e-4), DigitsDataModule(batch_size=32))
    assert cli_main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    pngs = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert {"scale_net.0.png", "scale_net.3.png", "scale_net.7.png"} <= pngs
    table = (tmp_path / "out" / "summary.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| scale ") or ln.startswith("| translation ")
            or ln.startswith("| rescale ")]
    assert len(rows) == len(pngs)  # one row and one PNG per layer
    for layer in ("net.0", "net.3", "net.7"):
        (row,) = [r for r in rows if r.startswith(f"| scale | [{layer}]")]
        assert row.split("|")[3].strip() == "2"  # logged at steps 5 and 10


def test_several_runs_get_their_own_folders(tmp_path):
    _plain_run(tmp_path / "logs" / "a", steps=4, every=2)
    _plain_run(tmp_path / "logs" / "b", steps=4, every=2)
    rep = write_report(tmp_path / "logs", tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in rep.pngs) == ["a/scale_fc1.png",
                                                                                     "b/scale_fc1.png"]
    assert "| run |" in rep.table.read_text()


def test_no_nld_data_is_a_clear_message(tmp_path, capsys):
    assert main(str(tmp_path)) == 1
    assert "no event file was found" in capsys.readouterr().err
    w = SummaryWriter(str(tmp_path / "other"))
    w.add_scalar("train/loss", 1.0, 1)
    w.close()
    assert main(str(tmp_path)) == 1
    assert "none of the 1 run folder(s)" in capsys.readouterr().err
    assert main(str(tmp_path / "missing")) == 1
    assert "Expected `logdir` to be a directory" in capsys.readouterr().err
