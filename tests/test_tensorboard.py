"""The NLD dashboard: tags, layout, histograms and text, read back from real event files."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from nld_callbacks import NoetherTracker
from nld_callbacks.symmetries import Member, SymmetryGroup
from nld_callbacks.tensorboard import (
    bin_on_device,
    custom_scalars_layout,
    histogram_kwargs,
    layer_regex,
    layout_tags,
    parse_tag,
    tag,
)
from nld_callbacks.testing import MLPBN, synthetic_classification

SIZES = {"scalars": 0, "tensors": 0, "histograms": 0}


# ------------------------------------------------------------------------------------ pure parts
@pytest.mark.parametrize("layer", ["0", "features.0", "block.1.conv", "a/b"])
def test_tag_round_trip(layer):
    assert parse_tag(tag("scale", layer, "charge")) == ("scale", layer, "charge")


def test_parse_tag_ignores_other_tags():
    assert parse_tag("train/loss") is None
    assert parse_tag("nld/scale/charge") is None


@pytest.mark.parametrize("arg", ["kind", "layer", "quantity"])
def test_tag_rejects_empty(arg):
    kw = {"kind": "scale", "layer": "fc", "quantity": "charge", arg: ""}
    with pytest.raises(ValueError, match=arg):
        tag(**kw)


def test_regex_with_dots_matches_only_its_own_layer():
    # unescaped, "a.0" would also match "ax0"; unanchored, "charge" would match "charge_x"
    layers = ["a.0", "ax0", "a.0.b", "a.01"]
    tags = [tag("scale", lay, q) for lay in layers for q in ("charge", "charge_x")]
    for lay in layers:
        hits = [t for t in tags if re.match(layer_regex("scale", lay, "charge"), t)]
        assert hits == [tag("scale", lay, "charge")]


def _written(layers, quantities):
    return [tag(k, lay, q) for k, lay in layers for q in quantities]


def test_layout_lists_each_written_tag_in_exactly_one_multiline_chart():
    qs = ["charge", "predicted", "band_lower", "band_upper", "residual", "breaking", "effective_lr",
          "angular_update", "nld", "equilibrium", "radial_update"]
    tags = _written([("scale", "net.0"), ("scale", "net0"), ("rescale", "fc.1")], qs) + ["train/loss"]
    layout = custom_scalars_layout(tags)
    assert [c["title"] for c in layout["category"]] == ["NLD scale net.0", "NLD scale net0", "NLD rescale fc.1"]
    multiline = [rx for c in layout["category"] for ch in c["chart"] if "multiline" in ch for rx in ch["multiline"]]
    margin = [t for c in layout["category"] for ch in c["chart"] if "margin" in ch for t in ch["margin"].values()]
    for t in tags[:-1]:
        in_margin = t in margin and parse_tag(t)[2].startswith("band_")
        assert sum(bool(re.match(rx, t)) for rx in multiline) + in_margin == 1, t
    assert not any(re.match(rx, "train/loss") for rx in multiline)
    charts = layout_tags(layout, tags)
    assert charts["net.0: charge, measured vs predicted"] == [tag("scale", "net.0", q)
                                                              for q in ("charge", "predicted", "nld")]
    assert charts["net.0: predicted ± tolerance band"] == [tag("scale", "net.0", q)
                                                           for q in ("predicted", "band_lower", "band_upper")]
    assert charts["net.0: equilibrium charge Q*"] == [tag("scale", "net.0", "equilibrium")]
    assert charts["net.0: radial_update"] == [tag("scale", "net.0", "radial_update")]  # any other: a chart of its own


def test_layout_without_prediction_has_no_margin_chart():
    layout = custom_scalars_layout(_written([("scale", "fc")], ["charge"]))
    (cat,) = layout["category"]
    assert [list(ch) for ch in cat["chart"]] == [["title", "multiline"]]


def test_bin_on_device_matches_numpy_histogram():
    gen = torch.Generator().manual_seed(1)
    sizes = [7, 1, 40, 3]
    values = torch.randn(sum(sizes), generator=gen, dtype=torch.float64).exp()
    values[9] = float("nan")  # left out
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    out = bin_on_device(values, index, len(sizes), bins=5)
    for g, v in enumerate(values.split(sizes)):
        v = v[torch.isfinite(v)].numpy()
        row = out[g].tolist()
        assert row[:5] == pytest.approx([v.min(), v.max(), len(v), v.sum(), (v * v).sum()], rel=1e-12)
        if v.min() < v.max():
            counts, edges = np.histogram(v, bins=5, range=(v.min(), v.max()))
            assert row[5:] == counts.tolist()
            kw = histogram_kwargs(row)
            assert kw["bucket_limits"] == pytest.approx(edges[1:].tolist(), rel=1e-12)
        else:
            assert histogram_kwargs(row)["bucket_counts"] == [1.0]


def test_bin_on_device_empty_group_gives_no_histogram():
    out = bin_on_device(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 1]), 2, bins=4)
    assert histogram_kwargs(out[0].tolist()) is None
    with pytest.raises(ValueError, match="bins"):
        bin_on_device(torch.ones(2), torch.zeros(2, dtype=torch.long), 1, bins=0)


# ------------------------------------------------------------------------------------ event files
def _read(logdir):
    acc = EventAccumulator(str(logdir), size_guidance=SIZES)
    acc.Reload()
    return acc


def _layout(acc):
    (ev,) = acc.Tensors("custom_scalars__config__")  # written exactly once
    return layout_pb2.Layout.FromString(ev.tensor_proto.string_val[0])


def _assert_layout_lists_exactly_the_written_tags(acc):
    written = {t for t in acc.Tags()["scalars"] if parse_tag(t)}
    assert written
    layout = _layout(acc)
    listed = set()
    for cat in layout.category:
        for ch in cat.chart:
            if ch.HasField("multiline"):
                for rx in ch.multiline.tag:
                    hits = [t for t in acc.Tags()["scalars"] if re.match(rx, t)]
                    assert len(hits) == 1, (rx, hits)
                    listed.update(hits)
            else:
                for s in ch.margin.series:
                    for t in (s.value, s.lower, s.upper):
                        assert t in written
                        listed.add(t)
    assert listed == written
    return layout


def _plain_run(logdir, *, steps=12, every=4, dtype=torch.float64, lr=0.2, wd=0.01):
    torch.manual_seed(0)
    model = MLPBN(eps=1e-30).to(dtype)  # eps ≈ 0: the scale symmetry is exact (physics.md §4.13)
    x, y = synthetic_classification(64, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    group = SymmetryGroup("scale", "fc1", (Member("fc1.weight"), Member("fc1.bias")), 32, "output channel", "test")
    u = torch.finfo(dtype).eps / 2
    expected_tol = {}
    writer = SummaryWriter(str(logdir))
    with NoetherTracker(model, opt, [group], writer=writer, log_every_n_steps=every) as tracker:
        for step in range(1, steps + 1):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            # independent reference for the band: D = Σ_c |(1−ηλ)² − 1| Q_c + η²|g_c|² + 4 u Q_c
            w, b = model.fc1.weight.detach(), model.fc1.bias.detach()
            gw, gb = model.fc1.weight.grad, model.fc1.bias.grad
            Q = (w * w).sum(1) + b * b
            G = (gw * gw).sum(1) + gb * gb
            a = 1 - lr * wd
            expected_tol[step] = float((abs(a * a - 1) * Q + lr * lr * G + 4 * u * Q).sum())
            expected_tol["Q_before_last"] = Q.numpy().copy()
            opt.step()
    writer.close()
    return tracker, model, expected_tol


def test_plain_tracker_writes_the_dashboard(tmp_path):
    tracker, model, expected_tol = _plain_run(tmp_path)
    acc = _read(tmp_path)
    layout = _assert_layout_lists_exactly_the_written_tags(acc)
    assert [c.title for c in layout.category] == ["NLD scale fc1"]
    kinds = [("margin" if ch.HasField("margin") else "multiline") for ch in layout.category[0].chart]
    assert kinds.count("margin") == 1
    # band = predicted ± Σ_c D_c of the logged step, from the hand-computed reference
    pred = {e.step: e.value for e in acc.Scalars("nld/scale/fc1/predicted")}
    lo = {e.step: e.value for e in acc.Scalars("nld/scale/fc1/band_lower")}
    hi = {e.step: e.value for e in acc.Scalars("nld/scale/fc1/band_upper")}
    charge = {e.step: e.value for e in acc.Scalars("nld/scale/fc1/charge")}
    assert sorted(pred) == [4, 8, 12]
    for s, m in zip(sorted(pred), tracker.logged):  # the float64 values behind the float32 events
        p = m["nld/scale/fc1/predicted"]
        assert m["nld/scale/fc1/band_upper"] - p == pytest.approx(expected_tol[s], rel=1e-12)
        assert p - m["nld/scale/fc1/band_lower"] == pytest.approx(expected_tol[s], rel=1e-12)
        assert m["nld/scale/fc1/band_lower"] <= m["nld/scale/fc1/charge"] <= m["nld/scale/fc1/band_upper"]
        assert (lo[s], pred[s], hi[s], charge[s]) == pytest.approx(
            (m["nld/scale/fc1/band_lower"], p, m["nld/scale/fc1/band_upper"], m["nld/scale/fc1/charge"]), rel=1e-6)
    # text panel: the symmetry table with the coverage line
    (text,) = acc.Tensors("nld/symmetries/text_summary")
    body = text.tensor_proto.string_val[0].decode()
    assert "| scale | fc1 | 32 |" in body and "parameters covered" in body
    # histograms: per-neuron charges of the last step, against the model's own weights
    hist = acc.Histograms("nld/scale/fc1/neuron_charge")
    assert [h.step for h in hist] == [4, 8, 12]
    w, b = model.fc1.weight.detach(), model.fc1.bias.detach()
    q = ((w * w).sum(1) + b * b).numpy()
    last = hist[-1].histogram_value
    assert (last.num, sum(last.bucket)) == (32, 32)
    assert (last.min, last.max, last.sum) == pytest.approx((q.min(), q.max(), q.sum()), rel=1e-12)
    eff = acc.Histograms("nld/scale/fc1/neuron_effective_lr")[-1].histogram_value
    # η_eff = η/((1−ηλ) Q_c) per channel, Q_c before the step (physics.md §2.3)
    q0 = expected_tol["Q_before_last"]
    a = 1 - 0.2 * 0.01
    assert (eff.min, eff.max) == pytest.approx((0.2 / (a * q0.max()), 0.2 / (a * q0.min())), rel=1e-12)
    assert eff.num == 32


def test_plain_tracker_without_writer_computes_no_histograms():
    torch.manual_seed(0)
    model = MLPBN()
    x, y = synthetic_classification(32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with NoetherTracker(model, opt, example_input=x, log_every_n_steps=2) as tracker:
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert tracker.dashboards == []
    assert "nld/scale/fc1/band_upper" in tracker.logged[-1]


def test_lightning_monitor_writes_the_dashboard_once(tmp_path):
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from nld_callbacks import NoetherMonitor
    from nld_callbacks.cli import Classifier, DigitsDataModule

    seed_everything(0, verbose=False)
    tb = TensorBoardLogger(tmp_path, name="run")
    trainer = Trainer(max_steps=12, logger=[tb, CSVLogger(tmp_path, name="csv")],
                      callbacks=[monitor := NoetherMonitor(verbose=False)],
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      log_every_n_steps=4, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(Classifier(lr=0.1, momentum=0.9, weight_decay=5e-4), DigitsDataModule(batch_size=32))
    acc = _read(tb.log_dir)
    layout = _assert_layout_lists_exactly_the_written_tags(acc)
    titles = [c.title for c in layout.category]
    assert titles[:3] == ["NLD scale net.0", "NLD scale net.3", "NLD scale net.7"]
    assert len(titles) == len(monitor.trackers[0].groups)  # one category per tracked group
    (text,) = acc.Tensors("nld/symmetries/text_summary")
    assert "parameters covered" in text.tensor_proto.string_val[0].decode()
    for layer in ("net.0", "net.3", "net.7"):
        steps = [h.step for h in acc.Histograms(f"nld/scale/{layer}/neuron_effective_lr")]
        assert steps == [4, 8, 12]
    # hyperparameters through the logger, not add_hparams (which would add a run directory)
    assert tb.hparams["nld"]["groups"] == len(monitor.report.groups)
    assert tb.hparams["nld"]["optimizers"] == "SGD"
    dirs = {os.path.relpath(d, tb.log_dir) for d, _, files in os.walk(tb.log_dir)
            if any(f.startswith("events.out.tfevents") for f in files)}
    assert dirs == {"."}
    # a logger other than TensorBoard gets the same values through log_metrics
    (csv,) = [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]
    with open(os.path.join(csv.log_dir, "metrics.csv")) as f:
        header = f.readline().strip().split(",")
    assert {"nld/scale/net.0/charge", "nld/scale/net.0/residual"} <= set(header)


def test_one_histogram_event_per_step_reads_back_as_add_histogram_raw_writes(tmp_path):
    from nld_callbacks.tensorboard import write_histograms

    rows = {"nld/scale/a/neuron_charge": [0.5, 3.0, 4.0, 6.0, 14.0, 1.0, 1.0, 2.0],
            "nld/scale/b.c/neuron_effective_lr": [2.0, 2.0, 3.0, 6.0, 12.0, 3.0, 0.0, 0.0]}
    hists = {t: histogram_kwargs(r) for t, r in rows.items()}
    for name in ("one", "each"):
        with SummaryWriter(tmp_path / name) as w:
            for step in (3, 6):
                if name == "one":
                    write_histograms(w, hists, step)
                else:
                    for t, kw in hists.items():
                        w.add_histogram_raw(t, global_step=step, **kw)
    one, each = _read(tmp_path / "one"), _read(tmp_path / "each")
    assert sorted(one.Tags()["histograms"]) == sorted(each.Tags()["histograms"]) == sorted(rows)
    for t in rows:
        got, want = one.Histograms(t), each.Histograms(t)
        assert [(e.step, e.histogram_value) for e in got] == [(e.step, e.histogram_value) for e in want]
        assert got[0].histogram_value.bucket == hists[t]["bucket_counts"]

    class Raw:  # a SummaryWriter-like object: one add_histogram_raw per tag
        def __init__(self):
            self.calls = []

        def add_histogram_raw(self, tag, global_step, **kw):
            self.calls.append((tag, global_step, kw))

    raw = Raw()
    write_histograms(raw, hists, 9)
    assert raw.calls == [(t, 9, kw) for t, kw in hists.items()]


def test_one_event_per_step_reads_back_as_add_scalar_writes(tmp_path):
    from nld_callbacks.tensorboard import write_scalars

    metrics = {"nld/scale/a/charge": 1.25, "nld/scale/a/residual": 3e-3, "nld/rescale/b.c/predicted": -7.5}
    for name, write in (("one", write_scalars), ("each", None)):
        with SummaryWriter(tmp_path / name) as w:
            for step in (2, 4):
                if write is not None:
                    write(w, {k: v * step for k, v in metrics.items()}, step)
                else:
                    for k, v in metrics.items():
                        w.add_scalar(k, v * step, global_step=step)
    one, each = _read(tmp_path / "one"), _read(tmp_path / "each")
    assert sorted(one.Tags()["scalars"]) == sorted(each.Tags()["scalars"]) == sorted(metrics)
    for k in metrics:
        assert [(e.step, e.value) for e in one.Scalars(k)] == [(e.step, e.value) for e in each.Scalars(k)]
