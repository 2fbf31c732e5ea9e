"""Every preset in configs/ runs through `nld fit` (a few steps) and logs the charges it promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nld_callbacks.cli import NETS, Classifier, main
from nld_callbacks.tensorboard import parse_tag

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# preset → the charge kinds its comment promises
PRESETS = {
    "digits_bn_sgd.yaml": {"scale"},
    "digits_bn_sgdm_wd.yaml": {"scale"},
    "digits_bn_nesterov_cosine.yaml": {"scale"},
    "digits_mlp_ln_adamw.yaml": {"scale"},
    "digits_relu_mlp_sgd.yaml": {"rescale", "translation"},
}


def test_every_preset_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_runs(name, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["nld"])  # as if run from the shell: `nld fit --config ...`
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    assert cfg["model"]["net"] in NETS
    assert any(c["class_path"] == "nld_callbacks.NoetherMonitor" for c in cfg["trainer"]["callbacks"])
    rc = main(["fit", "--config", str(CONFIGS / name), "--trainer.max_steps", "3",
               "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
               "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert rc == 0
    (run,) = {p.parent for p in tmp_path.rglob("events.out.tfevents*")}
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = [parse_tag(t) for t in acc.Tags()["scalars"]]
    kinds = {t[0] for t in tags if t and t[2] == "charge"}
    assert PRESETS[name] <= kinds, kinds
    steps = [e.step for e in acc.Scalars(next(f"nld/{k}/{lay}/charge" for k, lay, q in filter(None, tags)))]
    assert steps == [2, 3]  # the first step reads the graph, then every step is logged


def test_classifier_rejects_unknown_choices():
    with pytest.raises(ValueError, match="`optimizer`.*'lion'"):
        Classifier(optimizer="lion")
    with pytest.raises(ValueError, match="`net`"):
        Classifier(net="resnet")


def test_classifier_builds_the_optimizer_it_is_told():
    import torch

    adamw = Classifier(net="mlp_ln", optimizer="adamw", lr=1e-3, weight_decay=0.05, betas=(0.8, 0.99))
    opt = adamw.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    assert (opt.param_groups[0]["betas"], opt.param_groups[0]["weight_decay"]) == ((0.8, 0.99), 0.05)
    sgd = Classifier(momentum=0.9, nesterov=True).configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
