"""DDP on CPU (gloo), two processes: the same charges on every rank, written once, no hang."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_two_cpu_processes(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "ddp"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == 2
    assert r0["logged"] and r0["logged"] == r1["logged"], "ranks disagree on the charges"
    assert r0["summary"] == r1["summary"]
    assert all(row["max_residual"] < 4.0 for row in r0["summary"])
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events  # written once, by rank 0
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("nld/scale/net.0/charge")]
    assert steps == [3, 6, 9]


def _fully_shard_available():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _fully_shard_available(), reason="needs torch.distributed.fsdp.fully_shard and gloo")
@pytest.mark.parametrize("rule, port", [("sgd", 29547), ("adamw", 29548)])
def test_fsdp_row_shards_all_gathered_once_per_logging_step(tmp_path, rule, port):
    """FSDP2 on 2 CPU processes: every rank evaluates its shards, and one collective per logging step
    merges the ranks. Groups whose neurons are whole rows of the dim-0 shards log exactly what an
    unsharded tracker of the same run logs; groups whose neurons span the shards (columns of the next
    layer) log the same charges, predictions and laws from partial sums, per-shard residuals at the
    rounding floor, and no per-neuron ratios.

    Under AdamW the sharded tracker makes Adam's u with torch ops on its shards, the unsharded one
    forms it in the compiled kernel (IEEE square roots): the two u can be one float32 ulp apart, so
    what is made of u (the breaking term, the radial and angular updates, the residual) agrees to
    that rounding only."""
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "fsdp_fit.py"), str(tmp_path), str(port), rule],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    whole, spanning = ("scale/fc1", "translation/fc1"), ("rescale/bn1", "rescale/fc2")
    for out in ranks:
        assert out["step"] == 6 and out["max_param_difference"] == 0.0  # FSDP trained as the reference did
        # fc1 rows (+ bias) feed the BatchNorm: each of its 33 neurons lies whole on one rank (17 + 16);
        # bn1 ↔ fc2 columns and fc2 rows ↔ fc3 columns reach every shard
        assert sorted(out["groups"]) == sorted(whole + spanning) and not out["warnings"]
        assert all(any(n.startswith(k) and "span the shards" in n for n in out["notes"]) for k in spanning)
        # one all_gather per logging step (steps 2, 4, 6), none on the other steps
        assert out["gathers_after_each_step"] == [0, 1, 1, 2, 2, 3]
        assert len(out["logged"]) == 3
        for got, ref in zip(out["logged"], out["reference"]):
            assert got.keys() <= ref.keys() and any(k.endswith("effective_lr") for k in got)
            for k, v in got.items():
                group = "/".join(k.split("/")[1:3])
                if group in whole and rule == "adamw" and k.endswith("/residual"):  # in units of the floor
                    assert abs(v - ref[k]) < 1e-4, (k, v, ref[k])
                elif group in whole and rule == "adamw" and k.endswith(("/breaking", "_update")):
                    assert math.isclose(v, ref[k], rel_tol=1e-6), (k, v, ref[k])
                elif group in whole and rule == "adamw" and k.endswith(("/band_upper", "/band_lower")):
                    predicted = k.rsplit("/", 1)[0] + "/predicted"  # the band's width is made of u
                    assert math.isclose(v - got[predicted], ref[k] - ref[predicted], rel_tol=1e-6), (k, v, ref[k])
                elif group in whole:
                    assert math.isclose(v, ref[k], rel_tol=1e-12, abs_tol=1e-15), (k, v, ref[k])
                elif k.endswith(("/charge", "/predicted", "/nld")):  # float32 sums in another order
                    assert math.isclose(v, ref[k], rel_tol=1e-6), (k, v, ref[k])
                elif k.endswith("/residual"):
                    assert v < 4.0, (k, v)
                elif k.endswith("/band_upper"):  # Σ over shards of |terms| ≥ |Σ terms|: a band as wide or wider
                    predicted = k.replace("band_upper", "predicted")
                    assert v - got[predicted] >= (ref[k] - ref[predicted]) * (1 - 1e-6), k
            for group in spanning:  # per-neuron ratios of partial sums mean nothing: not logged
                assert f"nld/{group}/breaking" not in got and f"nld/{group}/breaking" in ref
        ref_rows = {(r["kind"], r["layer"]): r for r in out["reference_summary"]}
        for row in out["summary"]:
            ref = ref_rows[(row["kind"], row["layer"])]
            assert row["invalid_steps"] == 0 and row["max_residual"] < 4.0
            exact = f"{row['kind']}/{row['layer']}" in whole
            rel = 1e-12 if exact else 1e-6
            for k in ("charge_start", "charge_end", "delta_predicted", "charge_nld"):
                made_of_u = rule == "adamw" and k == "delta_predicted"
                no_law = math.isnan(row[k]) and math.isnan(ref[k])  # Adam's: no continuous law
                assert no_law or math.isclose(row[k], ref[k], rel_tol=1e-6 if made_of_u else rel, abs_tol=1e-15), \
                    (k, row[k], ref[k])
            assert math.isclose(row["delta_observed"], ref["delta_observed"],
                                rel_tol=1e-12 if exact else 0.0, abs_tol=1e-15 if exact else 1e-6 * ref["charge_start"])
    assert ranks[0]["logged"] == ranks[1]["logged"]
    for out in ranks:  # fc1.weight sharded on dim 1 instead: its group is left out, with a note and one warning
        other = out["other_placements"]
        assert "scale/fc1" not in other["groups"] and "rescale/bn1" in other["groups"]
        assert any(n.startswith("scale/fc1") and "other than dim-0 shards" in n for n in other["notes"])
        assert len(other["warnings"]) == 1
        assert "must track the same steps" in out["auto_error"]
