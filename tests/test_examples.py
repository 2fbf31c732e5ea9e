"""Every numbered example runs, in its short mode, as a user would run it (a fresh process)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(args, cwd, timeout=300):
    env = {**os.environ, "NLD_QUICK": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _nld_tags(logdir):
    (run,) = {p.parent for p in Path(logdir).rglob("events.out.tfevents*")}
    acc = EventAccumulator(str(run))
    acc.Reload()
    return [t for t in acc.Tags()["scalars"] if t.startswith("nld/")], acc


def test_every_example_is_tested():
    names = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
    assert names == ["01_plain_pytorch.py", "02_lightning_trainer.py", "03_test_ci_regression.py",
                     "04_bn_weight_decay_rmsprop.py"]


def test_01_plain_pytorch(tmp_path):
    out = _run([str(EXAMPLES / "01_plain_pytorch.py"), "--quick", "--logdir", str(tmp_path / "plain")], tmp_path)
    assert "12 steps" in out and "ΔQ observed" in out
    tags, acc = _nld_tags(tmp_path / "plain")
    assert "nld/scale/0/charge" in tags
    assert acc.Tensors("custom_scalars__config__")


def test_02_lightning_trainer(tmp_path):
    out = _run([str(EXAMPLES / "02_lightning_trainer.py"), "--quick", "--save-dir", str(tmp_path)], tmp_path)
    assert "tensorboard --logdir" in out
    tags, acc = _nld_tags(tmp_path)
    assert {"nld/scale/net.0/charge", "nld/scale/net.3/charge"} <= set(tags)
    assert acc.Tensors("nld/symmetries/text_summary")


def test_03_ci_regression_file_passes_as_shipped(tmp_path):
    # run where the file lives so that its checked-in baseline is used, with no cache written there
    out = _run(["-m", "pytest", str(EXAMPLES / "03_test_ci_regression.py"), "-q", "-p", "no:cacheprovider"],
               tmp_path)
    assert re.search(r"\b6 passed\b", out), out


def test_04_bn_weight_decay_is_rmsprop(tmp_path):
    png = tmp_path / "04.png"
    out = _run([str(EXAMPLES / "04_bn_weight_decay_rmsprop.py"), "--quick", "--out", str(png)], tmp_path)
    rel = float(re.search(r"max relative difference, measured vs RMSProp recursion: (\S+)", out).group(1))
    assert rel < 1e-3  # float32 weights, BatchNorm ε: the recursion is exact up to both (physics.md §2.3)
    assert png.stat().st_size > 10_000
