"""Symmetry detection against an independent float64 check: L(ψ_α θ) = L(θ) (physics.md §1).

Every proposed group is checked by transforming the parameters directly (a per-member loop
written here, not the package's charge code) and comparing the loss on fresh random batches;
every claim that something is *not* a symmetry is checked the same way the other way round.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nld_callbacks import symmetries as sym
from nld_callbacks.symmetries import (
    Homogeneous,
    Member,
    Normalizes,
    Opaque,
    SymmetryGroup,
    SymmetryReport,
    find_symmetries,
    register,
    rule_for,
    support_table,
    symmetries_from_graph,
)

sys.path.insert(0, str(Path(__file__).parent))
import zoo  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Toy models run fastest on one thread (and do not fight a busy machine for a second one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


EXACT = 1e-10  # relative loss change allowed for an exact symmetry in float64 (ε ≈ 0)
BROKEN = 1e-6  # relative loss change a non-symmetry must show


# --------------------------------------------------------------------------------------------
# The independent check
# --------------------------------------------------------------------------------------------


def transform(model: nn.Module, group: SymmetryGroup, alphas: torch.Tensor) -> None:
    """Apply ψ_α in place: neuron j of every member scaled by α_j (out-side: 1/α_j) or shifted by α_j."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for m in group.members:
            p = params[m.param]
            if m.axis is None:
                a = alphas[m.offset].expand(p.shape)
            else:
                size = p.shape[m.axis]
                per = size // (m.blocks or size)
                idx = torch.tensor([m.offset + i // per for i in range(size)])
                shape = [1] * p.dim()
                shape[m.axis] = size
                a = alphas[idx].reshape(shape)
            if group.kind == "translation":
                p.add_(a)
            elif m.sign > 0:
                p.mul_(a)
            else:
                p.div_(a)


def worst_change(model: nn.Module, group: SymmetryGroup, loss_of, *, batches=(1, 2), draws=2, scale=1.0) -> float:
    """max over batches and random α of |L(ψ_α θ) - L(θ)| / |L(θ)|."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    worst = 0.0
    for b in batches:
        base = float(loss_of(model, b).detach())
        gen = torch.Generator().manual_seed(100 + b)
        for _ in range(draws):
            z = scale * torch.randn(group.n_neurons, generator=gen, dtype=torch.float64)
            transform(model, group, z if group.kind == "translation" else torch.exp(z))
            worst = max(worst, abs(float(loss_of(model, b).detach()) - base) / abs(base))
            model.load_state_dict(state)
    return worst


def case_loss(case: zoo.Case):
    return lambda model, b: zoo.loss_of(case, model, b)


def find(case: zoo.Case, model: nn.Module, **kw) -> SymmetryReport:
    x, g = zoo.batch(case, 0)
    return find_symmetries(model, x, loss_fn=lambda out: case.loss(out, g), **kw)


def group(report: SymmetryReport, key: str) -> SymmetryGroup:
    found = {g.key: g for g in report.groups}
    assert key in found, f"{key} not in {sorted(found)}"
    return found[key]


def by_members(model: nn.Module, kind: str, *members: Member) -> SymmetryGroup:
    """A group written by hand (for the negative checks)."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    n = max(m.offset + m.n_neurons(shapes[m.param]) for m in members)
    return SymmetryGroup(kind, "hand", tuple(members), n, "hand", "hand")


def assert_invariant(model, g, loss_of, **kw):
    w = worst_change(model, g, loss_of, **kw)
    assert w < EXACT, f"{g.key}: relative loss change {w:.2e} under ψ_α"


def assert_broken(model, g, loss_of, **kw):
    w = worst_change(model, g, loss_of, **kw)
    assert w > BROKEN, f"{g.key}: relative loss change only {w:.2e}: it is a symmetry after all"


def ce_loss(x_of, classes: int):
    """Cross-entropy of a plain model on random float64 batch ``b`` (inputs, then targets, from one seed)."""

    def loss_of(model, b):
        gen = torch.Generator().manual_seed(b)
        x = x_of(gen)
        torch.manual_seed(1000 + b)  # the same dropout mask for every evaluation of batch b
        out = model(x)
        return F.cross_entropy(out, torch.randint(0, classes, (out.shape[0],), generator=gen))

    loss_of.x_of, loss_of.classes = x_of, classes  # type: ignore[attr-defined]
    return loss_of


def vectors(d: int, n: int = 16):
    return lambda gen: torch.randn(n, d, generator=gen, dtype=torch.float64)


def images(c: int = 3, s: int = 6, n: int = 8):
    return lambda gen: torch.randn(n, c, s, s, generator=gen, dtype=torch.float64)


def detect(model: nn.Module, loss_of, **kw) -> SymmetryReport:
    """find_symmetries on batch 0 of a ``ce_loss``."""
    gen = torch.Generator().manual_seed(0)
    x = loss_of.x_of(gen)

    def loss_fn(out):
        return F.cross_entropy(out, torch.randint(0, loss_of.classes, (out.shape[0],), generator=gen))

    return find_symmetries(model, x, loss_fn=loss_fn, **kw)


def model64(module: nn.Module, seed: int = 0) -> nn.Module:
    return module.double().train()


# --------------------------------------------------------------------------------------------
# The zoo: no false positives, and the claims that matter on each architecture
# --------------------------------------------------------------------------------------------

# (keys that must be found, keys that must not be found) per zoo entry
EXPECT: dict[str, tuple[list[str], list[str]]] = {
    "mlp_layernorm": (["scale/body.0.0", "scale/body.1.0", "translation/body.0.0", "translation/head",
                       "rescale/body.0.1", "rescale/body.1.1"], []),
    "postact_resnet": (["scale/stem.0", "scale/layers.0.conv1", "scale/layers.0.conv2", "scale/layers.1.shortcut.0",
                        "rescale/layers.0.bn1", "rescale/layers.1.bn1"],
                       ["rescale/layers.0.bn2", "rescale/stem.1", "rescale/layers.1.bn2"]),
    "preact_resnet": (["translation/stem", "translation/blocks.0.conv2", "translation/blocks.1.conv2",
                       "translation/blocks.1.shortcut", "scale/blocks.0.conv1", "rescale/blocks.1.bn1"],
                      ["scale/stem", "scale/blocks.0.conv2", "scale/blocks.1.conv2"]),
    "groupnorm_cnn": (["scale/conv1", "scale/conv2", "translation/conv1", "translation/conv2", "rescale/gn1"], []),
    "transformer_postln": (["translation/transformer.encoder.layers.0.self_attn.out_proj",
                            "translation/transformer.encoder.layers.0.linear2",
                            "rescale/transformer.encoder.layers.0.linear1"],
                           ["translation/src_emb", "translation/pos", "scale/transformer.encoder.layers.0.linear2",
                            "rescale/transformer.encoder.layers.0.norm1"]),
    "transformer_preln": (["translation/src_emb", "translation/tgt_emb", "translation/pos",
                           "translation/transformer.encoder.layers.0.self_attn.out_proj",
                           "translation/transformer.decoder.layers.0.linear2",
                           "rescale/transformer.encoder.layers.0.norm1", "rescale/transformer.decoder.norm"], []),
    "tied_lm": (["rescale/fc1"], []),
    "untraceable": (["scale/inp", "translation/inp", "rescale/blocks.0", "rescale/blocks.2"], []),
    "functional_cnn": (["scale/w1", "translation/b1", "translation/w2", "rescale/gamma"], []),
    "nested_custom": (["scale/features.block.0.0", "rescale/features.block.1.0", "rescale/classifier.1"], []),
    "two_inputs": (["scale/conv", "scale/mlp", "translation/head"], []),
    "ws_weightnorm": (["scale/conv1", "scale/conv2", "translation/conv1", "scale/fc1", "rescale/fc1"], []),
    "gpt_preln": (["translation/tok", "translation/pos", "translation/blocks.0.attn.k", "translation/blocks.1.proj",
                   "rescale/blocks.0.attn.q", "rescale/blocks.0.attn.v", "rescale/blocks.0.ln1"],
                  ["translation/blocks.0.attn.q", "translation/blocks.0.attn.v"]),
    "gpt_qknorm": (["scale/blocks.0.attn.q", "scale/blocks.0.attn.k"], []),
    "convnext": (["rescale/pw2", "rescale/ln"], ["scale/pw2", "scale/stem"]),
    "rmsnorm_mlp": (["scale/fc1", "rescale/rms"], ["translation/fc1"]),
    "instancenorm_cnn": (["scale/conv", "translation/conv", "rescale/inorm"], []),
    "sigmoid_head": ([], ["translation/fc2"]),
}


def test_zoo_has_every_style():
    assert len(zoo.ZOO) >= 10
    assert set(EXPECT) == {c.name for c in zoo.ZOO}


@pytest.mark.parametrize("case", zoo.ZOO, ids=lambda c: c.name)
def test_zoo_every_group_is_an_exact_symmetry(case):
    model = zoo.build(case)
    report = find(case, model)
    assert report.refuted == [], [(g.key, g.violation) for g in report.refuted]
    assert len({g.key for g in report.groups}) == len(report.groups)
    must, must_not = EXPECT[case.name]
    keys = {g.key for g in report.groups}
    assert set(must) <= keys, sorted(set(must) - keys)
    assert not set(must_not) & keys
    for g in report.groups:
        assert g.exact and g.confirmed in (True, None)
        assert_invariant(model, g, case_loss(case))


def test_zoo_pre_ln_transformers_have_no_scale_groups():
    """physics.md §1.1: weights writing into a pre-LN residual stream are not scale invariant."""
    for name in ("transformer_preln", "gpt_preln"):
        case = next(c for c in zoo.ZOO if c.name == name)
        model = zoo.build(case)
        assert find(case, model).by_kind("scale") == []
    model = zoo.build(next(c for c in zoo.ZOO if c.name == "gpt_preln"))
    loss_of = case_loss(next(c for c in zoo.ZOO if c.name == "gpt_preln"))
    for writer in ("blocks.0.attn.o", "blocks.0.proj"):
        g = by_members(model, "scale", Member(f"{writer}.weight", None), Member(f"{writer}.bias", None))
        assert_broken(model, g, loss_of)


def test_zoo_model_fx_cannot_trace_is_still_read():
    case = next(c for c in zoo.ZOO if c.name == "untraceable")
    model = zoo.build(case)
    with pytest.raises((TypeError, torch.fx.proxy.TraceError)):  # data-dependent control flow
        torch.fx.symbolic_trace(model)
    assert len(find(case, model).groups) >= 5


def test_zoo_tied_embeddings_never_get_the_head_translation():
    """physics.md §1.2: the column translation W + 1aᵀ of a tied output matrix is not a symmetry."""
    case = next(c for c in zoo.ZOO if c.name == "tied_lm")
    model = zoo.build(case)
    report = find(case, model)
    assert not any(m.param == "emb.weight" and m.axis == 1 for g in report.by_kind("translation") for m in g.members)
    assert_broken(model, by_members(model, "translation", Member("emb.weight", 1)), case_loss(case))


def test_zoo_packed_attention_key_bias_is_noted_not_tracked():
    """physics.md §1.4: only the key third of a packed in_proj_bias has zero gradient."""
    case = next(c for c in zoo.ZOO if c.name == "transformer_preln")
    model = zoo.build(case)
    report = find(case, model)
    bias = "transformer.encoder.layers.0.self_attn.in_proj_bias"
    assert any(n.startswith(f"{bias}: entries 16-31 of 48 keep a translation symmetry") for n in report.notes)
    assert not any(bias in g.params for g in report.groups if g.kind == "translation")
    loss_of = case_loss(case)
    thirds = SymmetryGroup("translation", "thirds", (Member(bias, 0, blocks=3),), 3, "", "")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = float(loss_of(model, 1).detach())
    for third in range(3):  # shift one third of the packed bias (q, k, v) by 0.7
        transform(model, thirds, torch.eye(3, dtype=torch.float64)[third] * 0.7)
        change = abs(float(loss_of(model, 1).detach()) - base) / base
        model.load_state_dict(state)
        assert (change < EXACT) == (third == 1), (third, change)


# --------------------------------------------------------------------------------------------
# physics.md §1.1: scale groups, row by row
# --------------------------------------------------------------------------------------------


class Stack(nn.Module):
    """layer → middle → norm → ReLU → head, every piece replaceable."""

    def __init__(self, layer, middle, norm, head, flatten=False):
        super().__init__()
        self.layer, self.middle, self.norm, self.head = layer, middle, norm, head
        self.flatten = flatten

    def forward(self, x):
        h = F.relu(self.norm(self.middle(self.layer(x))))
        if self.flatten:
            h = h.mean(tuple(range(2, h.dim())))
        return self.head(h)


def test_linear_then_batchnorm_scale_per_channel_bias_translation():
    torch.manual_seed(0)
    model = model64(Stack(nn.Linear(6, 8), nn.Identity(), nn.BatchNorm1d(8, eps=1e-30), nn.Linear(8, 3)))
    loss_of = ce_loss(vectors(6), 3)
    report = detect(model, loss_of)
    s, t = group(report, "scale/layer"), group(report, "translation/layer")
    assert s.members == (Member("layer.weight", 0), Member("layer.bias", 0)) and s.n_neurons == 8
    assert t.members == (Member("layer.bias", 0),) and t.n_neurons == 8
    for g in (s, t):
        assert_invariant(model, g, loss_of)
    # γ and β are not scale invariant: they are the in-side of a rescale (§1.1, second row)
    assert_broken(model, by_members(model, "scale", Member("norm.weight", 0), Member("norm.bias", 0)), loss_of)
    r = group(report, "rescale/norm")
    assert {m.param: m.sign for m in r.members} == {"norm.weight": 1, "norm.bias": 1, "head.weight": -1}
    assert_invariant(model, r, loss_of)


@pytest.mark.parametrize("middle, passes", [
    (nn.ReLU(), True), (nn.LeakyReLU(0.2), True), (nn.Identity(), True), (nn.Dropout(0.3), True),
    (nn.GELU(), False), (nn.SiLU(), False), (nn.Tanh(), False), (nn.Sigmoid(), False), (nn.Softplus(), False),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_scale_passes_only_positively_homogeneous_ops(middle, passes):
    torch.manual_seed(0)
    model = model64(Stack(nn.Linear(6, 8), middle, nn.BatchNorm1d(8, eps=1e-30), nn.Linear(8, 3)))
    loss_of = ce_loss(vectors(6), 3)
    report = detect(model, loss_of)
    rows = by_members(model, "scale", Member("layer.weight", 0), Member("layer.bias", 0))
    assert ("scale/layer" in {g.key for g in report}) == passes
    (assert_invariant if passes else assert_broken)(model, rows, loss_of)
    # a bias before the activation is translation invariant only through the identity (§1.1, third row)
    shift = by_members(model, "translation", Member("layer.bias", 0))
    translated = "translation/layer" in {g.key for g in report}
    assert translated == isinstance(middle, nn.Identity)
    (assert_invariant if translated else assert_broken)(model, shift, loss_of)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(3),
                                  nn.Upsample(scale_factor=2)], ids=str)
def test_conv_scale_passes_pooling(pool):
    torch.manual_seed(0)
    model = model64(Stack(nn.Conv2d(3, 6, 3, padding=1), pool, nn.BatchNorm2d(6, eps=1e-30), nn.Linear(6, 3),
                          flatten=True))
    loss_of = ce_loss(images(), 3)
    g = group(detect(model, loss_of), "scale/layer")
    assert g.n_neurons == 6 and g.granularity == "output channel"
    assert_invariant(model, g, loss_of)


def test_groupnorm_scale_per_norm_group_not_per_filter():
    torch.manual_seed(0)
    model = model64(Stack(nn.Conv2d(3, 8, 3, padding=1), nn.Identity(), nn.GroupNorm(2, 8, eps=1e-30),
                          nn.Linear(8, 3), flatten=True))
    loss_of = ce_loss(images(), 3)
    report = detect(model, loss_of)
    s, t = group(report, "scale/layer"), group(report, "translation/layer")
    assert s.members == (Member("layer.weight", 0, blocks=2), Member("layer.bias", 0, blocks=2))
    assert t.members == (Member("layer.bias", 0, blocks=2),) and s.granularity == "norm group"
    assert_invariant(model, s, loss_of)
    assert_invariant(model, t, loss_of)
    assert_broken(model, by_members(model, "scale", Member("layer.weight", 0), Member("layer.bias", 0)), loss_of)
    assert_broken(model, by_members(model, "translation", Member("layer.bias", 0)), loss_of)


@pytest.mark.parametrize("norm", ["layernorm", "groupnorm1", "layernorm_chw"])
def test_layernorm_scales_the_whole_matrix_not_rows(norm):
    torch.manual_seed(0)
    if norm == "layernorm":
        model = model64(Stack(nn.Linear(6, 8), nn.Identity(), nn.LayerNorm(8, eps=1e-30), nn.Linear(8, 3)))
        loss_of = ce_loss(vectors(6), 3)
    else:
        n = nn.GroupNorm(1, 4, eps=1e-30) if norm == "groupnorm1" else nn.LayerNorm([4, 6, 6], eps=1e-30)
        model = model64(Stack(nn.Conv2d(3, 4, 3, padding=1), nn.Identity(), n, nn.Linear(4, 3), flatten=True))
        loss_of = ce_loss(images(), 3)
    report = detect(model, loss_of)
    s = group(report, "scale/layer")
    assert s.n_neurons == 1 and all(m.axis is None for m in s.members)
    assert_invariant(model, s, loss_of)
    assert_broken(model, by_members(model, "scale", Member("layer.weight", 0), Member("layer.bias", 0)), loss_of)
    if norm == "layernorm":  # Σ_j g_W[j, :] = 0 and Σ_j g_b[j] = 0 (§1.1): W + 1aᵀ, b + α1
        t = group(report, "translation/layer")
        assert t.members == (Member("layer.weight", 1), Member("layer.bias", None, offset=6)) and t.n_neurons == 7
        assert_invariant(model, t, loss_of)


def test_rmsnorm_scale_but_no_translation():
    torch.manual_seed(0)
    model = model64(Stack(nn.Linear(6, 8), nn.Identity(), nn.RMSNorm(8, eps=1e-30), nn.Linear(8, 3)))
    loss_of = ce_loss(vectors(6), 3)
    report = detect(model, loss_of)
    assert_invariant(model, group(report, "scale/layer"), loss_of)
    assert "translation/layer" not in {g.key for g in report}
    assert_broken(model, by_members(model, "translation", Member("layer.weight", 1),
                                    Member("layer.bias", None, offset=6)), loss_of)


def test_instancenorm_scale_per_channel():
    torch.manual_seed(0)
    model = model64(Stack(nn.Conv2d(3, 5, 3), nn.Identity(), nn.InstanceNorm2d(5, eps=1e-30), nn.Linear(5, 3),
                          flatten=True))
    loss_of = ce_loss(images(), 3)
    report = detect(model, loss_of)
    s = group(report, "scale/layer")
    assert s.n_neurons == 5
    assert_invariant(model, s, loss_of)
    assert_invariant(model, group(report, "translation/layer"), loss_of)


def test_weight_standardization_and_weight_norm():
    case = next(c for c in zoo.ZOO if c.name == "ws_weightnorm")
    model = zoo.build(case)
    report = find(case, model)
    loss_of = case_loss(case)
    ws = group(report, "scale/conv1")
    assert ws.members == (Member("conv1.weight", 0),) and ws.n_neurons == 8  # per filter, whatever follows
    assert group(report, "translation/conv1").members == (Member("conv1.weight", 0),)  # Σ g_W[c] = 0
    v = group(report, "scale/fc1")
    assert v.members == (Member("fc1.parametrizations.weight.original1", 0),)  # v per output unit
    for g in (ws, v):
        assert_invariant(model, g, loss_of)
    # g of the weight norm is not scale invariant; it is the in-side of a rescale with fc2
    g_only = by_members(model, "scale", Member("fc1.parametrizations.weight.original0", 0))
    assert_broken(model, g_only, loss_of)
    assert not any(g.params == ("fc1.parametrizations.weight.original0",) for g in report)


def test_residual_add_breaks_scale():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.layer = nn.Linear(6, 8), nn.Linear(8, 8)
            self.norm, self.head = nn.LayerNorm(8, eps=1e-30), nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.head(F.relu(self.norm(h + self.layer(h))))

    torch.manual_seed(0)
    model = model64(Res())
    loss_of = ce_loss(vectors(6), 3)
    report = detect(model, loss_of)
    assert "scale/layer" not in {g.key for g in report}
    assert_broken(model, by_members(model, "scale", Member("layer.weight", None), Member("layer.bias", None)), loss_of)
    # the sum itself, both branches scaled together, is invariant: inp and layer's bias ride along
    assert_invariant(model, group(report, "scale/inp"), loss_of)


def test_eval_mode_batchnorm_never_yields_a_symmetry():
    torch.manual_seed(0)
    model = model64(Stack(nn.Linear(6, 8), nn.Identity(), nn.BatchNorm1d(8), nn.Linear(8, 3)))
    with torch.no_grad():
        model(torch.randn(32, 6, dtype=torch.float64))  # running statistics
    model.eval()
    loss_of = ce_loss(vectors(6), 3)
    report = detect(model, loss_of)
    assert not any(p.startswith(("layer.", "norm.")) for g in report for p in g.params)
    assert any("eval mode (norm)" in n for n in report.notes)
    assert_broken(model, by_members(model, "scale", Member("layer.weight", 0), Member("layer.bias", 0)), loss_of)
    assert_broken(model, by_members(model, "translation", Member("layer.bias", 0)), loss_of)


def test_batchnorm_eps_is_allowed_for_and_a_shrunk_layer_is_refuted():
    """physics.md §1.1/§1.4: BN ε breaks the scale geometry by ~ε/(σ²+ε); confirmation allows the
    ordinary size of it and refutes it where it is large (a layer shrunk far below √ε)."""
    torch.manual_seed(0)
    model = Stack(nn.Linear(6, 8), nn.Identity(), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    report = find_symmetries(model, x, loss_fn=lambda o: F.cross_entropy(o, y))
    ok = group(report, "scale/layer")
    assert ok.confirmed and 0 < ok.violation < 1e-3
    with torch.no_grad():
        model.layer.weight.mul_(1e-3)
        model.layer.bias.mul_(1e-3)
    report = find_symmetries(model, x, loss_fn=lambda o: F.cross_entropy(o, y))
    bad = next(g for g in report.refuted if g.key == "scale/layer")
    assert bad.confirmed is False and bad.violation > 1e-2
    assert "scale/layer" not in {g.key for g in report}
    assert "REFUTED" in report.table()


class Written(nn.Module):
    """Normalizations and activations written out as tensor ops."""

    def __init__(self, kind: str, eps: float = 1e-30):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.layer, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.layer(x)
        if self.kind == "rms":
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        elif self.kind == "layernorm":
            h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, keepdim=True, unbiased=False) + self.eps)
        elif self.kind == "soft":  # not a normalization: the constant is not small
            h = h / (h.norm(dim=-1, keepdim=True) + 1.0)
        elif self.kind == "clamp0":
            h = h.clamp_min(0)
        elif self.kind == "clamp1":
            h = h.clamp_min(0.1)
        return self.head(F.relu(h) if self.kind in ("rms", "layernorm", "soft") else h)


@pytest.mark.parametrize("kind, key, symmetric", [
    ("rms", "scale/layer", True), ("layernorm", "scale/layer", True), ("layernorm", "translation/layer", True),
    ("rms", "translation/layer", False), ("clamp0", "rescale/layer", True), ("clamp1", "rescale/layer", False),
])
def test_ops_written_out(kind, key, symmetric):
    torch.manual_seed(0)
    model = model64(Written(kind))
    loss_of = ce_loss(vectors(6), 3)
    report = detect(model, loss_of)
    assert (key in {g.key for g in report}) == symmetric
    if symmetric:
        assert_invariant(model, group(report, key), loss_of)


def test_a_large_constant_in_a_denominator_is_caught_by_the_gradients():
    """x / (|x| + 1) is read as a normalization with ε = 1 by the graph rules (the constant is not
    visible in the graph); confirmation measures the violation and refutes it."""
    torch.manual_seed(0)
    model = model64(Written("soft"))
    loss_of = ce_loss(vectors(6), 3)
    gen = torch.Generator().manual_seed(0)
    x = loss_of.x_of(gen)
    assert "scale/layer" in {g.key for g in symmetries_from_graph(model, model(x).sum())}
    report = detect(model, loss_of)
    assert "scale/layer" not in {g.key for g in report}
    assert next(g for g in report.refuted if g.key == "scale/layer").violation > 1e-2
    assert_broken(model, by_members(model, "scale", Member("layer.weight", None), Member("layer.bias", None)),
                  loss_of)


def test_frozen_batchnorm_bias_is_not_assumed_absent():
    torch.manual_seed(0)
    model = model64(Stack(nn.Linear(6, 8), nn.Identity(), nn.BatchNorm1d(8, eps=1e-30), nn.Linear(8, 3)))
    model.norm.bias.requires_grad_(False)
    with torch.no_grad():
        model.norm.bias.normal_()
    loss_of = ce_loss(vectors(6), 3)
    report = detect(model, loss_of)
    assert "rescale/norm" not in {g.key for g in report} | {g.key for g in report.refuted}
    assert_broken(model, by_members(model, "rescale", Member("norm.weight", 0), Member("head.weight", 1, sign=-1)),
                  loss_of)
    assert_invariant(model, group(report, "scale/layer"), loss_of)


# --------------------------------------------------------------------------------------------
# physics.md §1.2: translations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss, symmetric", [
    ("ce", True), ("ce_label_smoothing", True), ("ce_class_weights", True), ("nll_log_softmax", True),
    ("bce", False), ("z_loss", False), ("soft_cap", False), ("mse", False),
])
def test_softmax_head_translation_and_the_losses_without_it(loss, symmetric):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4)).double()

    def loss_fn(out, gen):
        y = torch.randint(0, 4, (out.shape[0],), generator=gen)
        if loss == "ce":
            return F.cross_entropy(out, y)
        if loss == "ce_label_smoothing":
            return F.cross_entropy(out, y, label_smoothing=0.1)
        if loss == "ce_class_weights":
            return F.cross_entropy(out, y, weight=torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=out.dtype))
        if loss == "nll_log_softmax":
            return F.nll_loss(F.log_softmax(out, -1), y)
        if loss == "bce":
            return F.binary_cross_entropy_with_logits(out, F.one_hot(y, 4).to(out.dtype))
        if loss == "z_loss":
            return F.cross_entropy(out, y) + 1e-2 * torch.logsumexp(out, -1).pow(2).mean()
        if loss == "soft_cap":
            return F.cross_entropy(5 * torch.tanh(out / 5), y)
        return F.mse_loss(out, F.one_hot(y, 4).to(out.dtype))

    def loss_of(m, b):
        gen = torch.Generator().manual_seed(b)
        x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
        return loss_fn(m(x), gen)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    report = find_symmetries(model, x, loss_fn=lambda out: loss_fn(out, gen))
    head = by_members(model, "translation", Member("2.weight", 1), Member("2.bias", None, offset=7))
    if symmetric:
        g = group(report, "translation/2")
        assert g.members == head.members and g.n_neurons == 8
        assert_invariant(model, g, loss_of)
    else:
        assert "translation/2" not in {g.key for g in report}
        assert_broken(model, head, loss_of)


def test_translation_needs_the_loss_not_the_output():
    """Without a loss, groups must leave the output itself unchanged: no head translation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))
    x = torch.randn(16, 5)
    assert "translation/2" not in {g.key for g in find_symmetries(model, x)}
    y = torch.randint(0, 4, (16,))
    assert "translation/2" in {g.key for g in find_symmetries(model, x, loss_fn=lambda o: F.cross_entropy(o, y))}


def test_attention_key_bias_has_zero_gradient():
    case = next(c for c in zoo.ZOO if c.name == "gpt_preln")
    model = zoo.build(case)
    report = find(case, model)
    k = group(report, "translation/blocks.0.attn.k")
    assert k.members == (Member("blocks.0.attn.k.bias", 0),) and k.n_neurons == 16
    zoo.loss_of(case, model, 3).backward()
    assert model.blocks[0]["attn"].k.bias.grad.abs().max() < 1e-13 * model.blocks[0]["attn"].q.bias.grad.abs().max()
    assert_broken(model, by_members(model, "translation", Member("blocks.0.attn.q.bias", 0)), case_loss(case))


# --------------------------------------------------------------------------------------------
# physics.md §1.3: rescale
# --------------------------------------------------------------------------------------------


def test_rescale_through_relu_next_bias_not_involved():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.LeakyReLU(0.1), nn.Linear(6, 3)).double()
    loss_of = ce_loss(vectors(5), 3)
    report = detect(model, loss_of)
    r0, r2 = group(report, "rescale/0"), group(report, "rescale/2")
    assert r0.members == (Member("0.weight", 0), Member("0.bias", 0), Member("2.weight", 1, sign=-1))
    assert r2.members == (Member("2.weight", 0), Member("2.bias", 0), Member("4.weight", 1, sign=-1))
    assert "2.bias" not in {m.param for m in r0.members}
    for g in (r0, r2):
        assert_invariant(model, g, loss_of)
    with_bias = by_members(model, "rescale", *r0.members, Member("2.bias", 0, sign=-1))
    assert_broken(model, with_bias, loss_of)


def test_rescale_conv_to_flatten_linear_uses_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    model = model.double()
    loss_of = ce_loss(images(), 3)
    g = group(detect(model, loss_of), "rescale/0")
    assert g.members[-1] == Member("4.weight", 1, sign=-1, blocks=4) and g.granularity == "channel"
    assert_invariant(model, g, loss_of)


def test_rescale_holds_inside_a_residual_branch_not_across_the_skip():
    case = next(c for c in zoo.ZOO if c.name == "postact_resnet")
    model = zoo.build(case)
    loss_of = case_loss(case)
    report = find(case, model)
    assert_invariant(model, group(report, "rescale/layers.0.bn1"), loss_of)
    across = by_members(model, "rescale", Member("layers.0.bn2.weight", 0), Member("layers.0.bn2.bias", 0),
                        Member("layers.1.conv1.weight", 1, sign=-1), Member("layers.1.shortcut.0.weight", 1, sign=-1))
    assert_broken(model, across, loss_of)


# --------------------------------------------------------------------------------------------
# physics.md §1.4: further exact symmetries
# --------------------------------------------------------------------------------------------


def test_residual_stream_writers_translate_along_ones_when_layernorm_reads_everything():
    case = next(c for c in zoo.ZOO if c.name == "gpt_preln")
    model = zoo.build(case)
    report = find(case, model)
    for key, first in [("translation/blocks.0.attn.o", Member("blocks.0.attn.o.weight", 1)),
                       ("translation/blocks.1.proj", Member("blocks.1.proj.weight", 1)),
                       ("translation/tok", Member("tok.weight", 0)), ("translation/pos", Member("pos.weight", 0))]:
        assert group(report, key).members[0] == first


def test_preact_biases_read_only_by_batchnorm_have_zero_gradient():
    case = next(c for c in zoo.ZOO if c.name == "preact_resnet")
    model = zoo.build(case)
    zoo.loss_of(case, model, 4).backward()
    for name in ("stem.bias", "blocks.0.conv2.bias", "blocks.1.conv2.bias"):
        grad = dict(model.named_parameters())[name].grad
        assert grad.abs().max() < 1e-13 * model.fc.weight.grad.abs().max(), name


@pytest.mark.parametrize("key, inside, outside", [
    ("rescale/blocks.0.attn.v", "blocks.0.attn.v", "blocks.0.attn.o"),
    ("rescale/blocks.0.attn.q", "blocks.0.attn.q", "blocks.0.attn.k"),
])
def test_linear_paths_rescale_with_any_nonzero_alpha(key, inside, outside):
    case = next(c for c in zoo.ZOO if c.name == "gpt_preln")
    model = zoo.build(case)
    g = group(find(case, model), key)
    assert "any α ≠ 0" in g.why and {m.param.rsplit(".", 1)[0] for m in g.members} == {inside, outside}
    assert_invariant(model, g, case_loss(case))
    # a linear path allows α < 0: ψ with α_j = -exp(z_j)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = float(zoo.loss_of(case, model, 1).detach())
    transform(model, g, -torch.exp(torch.randn(g.n_neurons, dtype=torch.float64)))
    assert abs(float(zoo.loss_of(case, model, 1).detach()) - base) < EXACT * base
    model.load_state_dict(state)


def test_embedding_column_against_the_next_matrix_and_layer_scale():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(9, 5), nn.Linear(5, 3)

        def forward(self, idx):
            return self.fc(self.emb(idx).mean(1))

    torch.manual_seed(0)
    model = Bag().double()

    def loss_of(m, b):
        gen = torch.Generator().manual_seed(b)
        idx = torch.randint(0, 9, (6, 4), generator=gen)
        return F.cross_entropy(m(idx), torch.randint(0, 3, (6,), generator=gen))

    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 9, (6, 4), generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    g = group(find_symmetries(model, idx, loss_fn=lambda o: F.cross_entropy(o, y)), "rescale/emb")
    assert g.members == (Member("emb.weight", 1), Member("fc.weight", 1, sign=-1))
    assert_invariant(model, g, loss_of)
    case = next(c for c in zoo.ZOO if c.name == "convnext")
    model = zoo.build(case)
    g = group(find(case, model), "rescale/pw2")
    assert g.members[-1] == Member("gamma", 0, sign=-1)
    assert_invariant(model, g, case_loss(case))


def test_dead_units_are_reported_as_degenerate_not_as_evidence():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[0].bias[2] = -1e3  # unit 2 never fires
    loss_of = ce_loss(vectors(5), 3)
    g = group(detect(model, loss_of), "rescale/0")
    assert g.confirmed and 2 in g.degenerate
    # in a tanh net a dead unit passes any gradient test, but no structural rule claims it
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        net[2].weight[1] = 0.0
        net[2].bias[1] = -1e3
    report = detect(net, loss_of)
    assert not any("2.weight" in g.params and g.kind == "scale" for g in report)
    hand = SymmetryGroup("scale", "dead", (Member("2.weight", 0, blocks=6), Member("2.bias", 0, blocks=6)), 6, "u",
                         "declared by hand")
    declared = detect(net, loss_of, declare=[hand])
    refuted = {g.key: g for g in declared.refuted}
    assert "scale/dead" in refuted and 1 in refuted["scale/dead"].degenerate


# --------------------------------------------------------------------------------------------
# Confirmation, user control, the report
# --------------------------------------------------------------------------------------------


def test_confirmed_refuted_unconfirmed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(16, 4)
    wrong = SymmetryGroup("scale", "0", (Member("3.weight", 0),), 2, "output channel", "a wrong guess")
    report = find_symmetries(model, x, declare=[wrong])
    assert all(g.confirmed for g in report)
    refuted = {g.key: g for g in report.refuted}
    assert refuted["scale/0[weight]"].confirmed is False and refuted["scale/0[weight]"].violation > 0.05
    unchecked = find_symmetries(model, x, confirm=False)
    assert [g.confirmed for g in unchecked] == [None] * len(unchecked) and unchecked.refuted == []


def test_more_batches_confirm_units_one_batch_leaves_dead():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[0].weight[2] = torch.ones(5, dtype=torch.float64)
        model[0].bias[2] = -3.0  # fires only for large inputs
    small = 0.01 * torch.randn(16, 5, dtype=torch.float64)
    large = 10 * torch.randn(16, 5, dtype=torch.float64)
    assert 2 in group(find_symmetries(model, small), "rescale/0").degenerate
    g = group(find_symmetries(model, small, extra_inputs=[large]), "rescale/0")
    assert g.confirmed and 2 not in g.degenerate


@pytest.mark.parametrize("dtype, floor", [(torch.float64, 1e-8), (torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_tolerance_per_dtype(dtype, floor):
    assert sym._tolerance(dtype) == floor
    assert sym._tolerance(dtype, eps_limited=True) >= 1e-3


def test_float32_defaults_confirm_every_group():
    from nld_callbacks.testing import MLPBN, synthetic_classification

    torch.manual_seed(0)
    x, y = synthetic_classification(n=64)
    report = find_symmetries(MLPBN(), x, loss_fn=lambda o: F.cross_entropy(o, y))
    assert report.refuted == [] and all(g.confirmed for g in report)
    assert {g.key for g in report} == {"scale/fc1", "translation/fc1", "translation/fc3", "rescale/bn1",
                                       "rescale/fc2"}


def test_include_exclude_and_declare():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(16, 4)
    assert {g.kind for g in find_symmetries(model, x, include=["scale/*"])} == {"scale"}
    assert "translation/0" not in {g.key for g in find_symmetries(model, x, exclude=["translation/*"])}
    mine = SymmetryGroup("scale", "mine", (Member("0.weight", None), Member("0.bias", None)), 1, "layer", "")
    report = find_symmetries(model, x, declare=[mine])
    g = group(report, "scale/mine")
    assert g.why == "declared by hand" and g.confirmed
    with pytest.raises(ValueError, match="nope"):
        find_symmetries(model, x, declare=[SymmetryGroup("scale", "x", (Member("nope", 0),), 1, "", "")])
    with pytest.raises(ValueError, match="n_neurons=2"):
        find_symmetries(model, x, declare=[SymmetryGroup("scale", "x", (Member("0.weight", 0),), 2, "", "")])
    with pytest.raises(TypeError, match="SymmetryGroup"):
        find_symmetries(model, x, declare=["scale/0"])  # type: ignore[list-item]


def test_report_table_and_plain_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    report = find_symmetries(model, torch.randn(4, 3, 6, 6))
    text = report.table()
    assert text.splitlines()[0].split() == ["kind", "layer", "neurons", "granularity", "parameters", "confirmed", "why"]
    assert f"parameters covered: {report.covered:,} of {report.n_params:,}" in text
    assert report.covered == sum(p.numel() for n, p in model.named_parameters() if n != "4.bias")
    d = json.loads(json.dumps(report.to_dict()))
    assert [SymmetryGroup.from_dict(g) for g in d["groups"]] == report.groups
    assert d["coverage"] == pytest.approx(report.coverage)


def test_graph_route_from_the_loss_matches_find_symmetries():
    """The Lightning callback reads the groups off the first training loss, before any backward."""
    for case in zoo.ZOO[:6]:
        model = zoo.build(case, eps=1e-5)
        x, g = zoo.batch(case, 0)
        loss = case.loss(zoo.call(model, x), g)
        graph = symmetries_from_graph(model, loss)
        assert all(p.grad is None for p in model.parameters())
        found = find(case, model, confirm=False)
        assert [h.key for h in graph] == [h.key for h in found]
    with pytest.raises(ValueError, match="no grad_fn"):
        symmetries_from_graph(model, torch.zeros(()))


def test_detection_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 4)
    rng = torch.get_rng_state()
    find_symmetries(model, x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_rule_that_fails_proposes_nothing_and_says_so(monkeypatch):
    def broken(run, node, ins):
        raise RuntimeError("boom")

    monkeypatch.setitem(sym._OPS, "ReluBackward0", broken)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    report = find_symmetries(model, torch.randn(8, 4))
    assert "scale/0" in {g.key for g in report} and "rescale/1" not in {g.key for g in report}
    assert any("ReluBackward0 (RuntimeError: boom)" in n for n in report.notes)


def test_bad_inputs_name_what_was_expected():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"expects inputs of shape \(N, 4\)"):
        find_symmetries(model, torch.randn(3, 5))
    with pytest.raises(ValueError, match="scalar"):
        find_symmetries(model, torch.randn(3, 4), loss_fn=lambda out: out)
    with pytest.raises(TypeError, match="Module"):
        find_symmetries("model", torch.randn(3, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="probes"):
        find_symmetries(model, torch.randn(3, 4), probes=0)


# --------------------------------------------------------------------------------------------
# The support matrix and custom module types
# --------------------------------------------------------------------------------------------


class _Standardize(torch.autograd.Function):
    """A fused normalization the autograd graph cannot see into."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True, unbiased=False)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            y = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True, unbiased=False)
            return torch.autograd.grad(y, x, g)[0]


class FusedNorm(nn.Module):
    def forward(self, x):
        return _Standardize.apply(x)


class FusedNormV2(FusedNorm):
    pass


def test_support_table_walks_the_mro():
    assert rule_for(zoo.MyConv(3, 4, 3)) is rule_for(nn.Conv2d(3, 4, 3))
    assert rule_for(nn.BatchNorm2d(3)) is sym._SUPPORT[nn.modules.batchnorm._BatchNorm]
    assert rule_for(FusedNorm()) is sym._SUPPORT[nn.Module]
    table = support_table()
    assert "nn.Linear | SeeThrough" in table and "nn._BatchNorm | SeeThrough" in table


def test_register_a_custom_normalization():
    torch.manual_seed(0)
    model = model64(nn.Sequential(nn.Linear(5, 8), FusedNormV2(), nn.ReLU(), nn.Linear(8, 3)))
    loss_of = ce_loss(vectors(5), 3)
    before = detect(model, loss_of)
    assert "scale/0" not in {g.key for g in before}
    assert any("_StandardizeBackward" in n for n in before.notes)
    register(FusedNorm, Normalizes(over=(-1,), shift=True))
    try:
        with pytest.raises(ValueError, match="already has a rule"):
            register(FusedNorm, Opaque())
        assert rule_for(FusedNormV2()) == Normalizes(over=(-1,), shift=True)  # through the MRO
        after = detect(model, loss_of)
        for key in ("scale/0", "translation/0"):
            assert_invariant(model, group(after, key), loss_of)
        with sym.module_calls(model) as calls:  # the graph route (Lightning) sees registered rules too
            out = model(loss_of.x_of(torch.Generator().manual_seed(0)))
        assert "scale/0" in {g.key for g in symmetries_from_graph(model, out.sum(), calls=calls)}
        assert "scale/0" not in {g.key for g in symmetries_from_graph(model, out.sum())}
        register(FusedNorm, Opaque(), overwrite=True)
        assert "scale/0" not in {g.key for g in detect(model, loss_of)}
    finally:
        sym.unregister(FusedNorm)
    with pytest.raises(TypeError, match="subclass of torch.nn.Module"):
        register(int, Opaque())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="register"):
        sym.unregister(nn.Linear)


def test_register_a_homogeneous_activation():
    class _Relu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clamp_min(0)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (x > 0)

    class MyReLU(nn.Module):
        def forward(self, x):
            return _Relu.apply(x)

    torch.manual_seed(0)
    model = model64(nn.Sequential(nn.Linear(5, 8), MyReLU(), nn.Linear(8, 3)))
    loss_of = ce_loss(vectors(5), 3)
    assert "rescale/0" not in {g.key for g in detect(model, loss_of)}
    register(MyReLU, Homogeneous())
    try:
        assert_invariant(model, group(detect(model, loss_of), "rescale/0"), loss_of)
    finally:
        sym.unregister(MyReLU)
