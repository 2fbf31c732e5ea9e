"""The fast ChargeLayout path against the per-group reference loop."""

import pytest
import torch

from nld_callbacks.charges import ChargeLayout, bilinear_reference, linear_reference
from nld_callbacks.symmetries import Member, SymmetryGroup

SHAPES = {"conv.weight": (6, 3, 3, 3), "conv.bias": (6,), "fc.weight": (4, 6), "fc.bias": (4,), "gn.weight": (8, 5)}

GROUPS = [
    SymmetryGroup("scale", "conv", (Member("conv.weight", 0), Member("conv.bias", 0)), 6, "output channel", "t"),
    SymmetryGroup("rescale", "conv", (Member("conv.weight", 0), Member("conv.bias", 0), Member("fc.weight", 1, -1)),
                  6, "hidden unit", "t"),
    SymmetryGroup("scale", "gn", (Member("gn.weight", 0, blocks=2),), 2, "norm group", "t"),
    SymmetryGroup("scale", "fc", (Member("fc.weight", None), Member("fc.bias", None)), 1, "layer", "t"),
    SymmetryGroup("translation", "fc", (Member("fc.weight", 1), Member("fc.bias", None, offset=6)), 7,
                  "input feature", "t"),
]


def _tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_layout_matches_reference(dtype):
    X = {n: t.to(dtype) for n, t in _tensors(0).items()}
    Y = {n: t.to(dtype) for n, t in _tensors(1).items()}
    lay = ChargeLayout(GROUPS, SHAPES)
    fast = lay.split(lay.to_groups(lay.reduce(X, Y)))
    fast_unsigned = lay.split(lay.to_groups(lay.reduce(X, X), unsigned=True))
    fast_linear = lay.split(lay.to_groups(lay.reduce(X)))
    tol = {torch.float64: 1e-13, torch.float32: 1e-6}[dtype]
    for g, f, fu, fl in zip(GROUPS, fast, fast_unsigned, fast_linear):
        torch.testing.assert_close(f, bilinear_reference(g, X, Y), rtol=tol, atol=tol, msg=g.key)
        torch.testing.assert_close(fu, bilinear_reference(g, X, X, unsigned=True), rtol=tol, atol=tol, msg=g.key)
        torch.testing.assert_close(fl, linear_reference(g, X), rtol=tol, atol=tol, msg=g.key)


def test_reference_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    rows = SymmetryGroup("scale", "l", (Member("w", 0),), 3, "row", "t")
    cols = SymmetryGroup("rescale", "l", (Member("w", 1, sign=-1),), 2, "column", "t")
    assert bilinear_reference(rows, {"w": w}, {"w": v}).tolist() == [1.0, 4.0, 11.0]
    assert bilinear_reference(cols, {"w": w}, {"w": w}).tolist() == [-(1 + 9 + 25), -(4 + 16 + 36)]


def test_missing_tensor_counts_as_zero():
    lay = ChargeLayout(GROUPS[:1], SHAPES)
    X = _tensors(0)
    out = lay.reduce({**X, "conv.bias": None}, X)
    ref = lay.reduce({**X, "conv.bias": torch.zeros(6, dtype=torch.float64)}, X)
    assert torch.equal(out, ref)


def test_per_group_aggregates():
    lay = ChargeLayout(GROUPS, SHAPES)
    vals = torch.arange(lay.n_neurons, dtype=torch.float64)
    sums = lay.per_group(vals)
    maxes = lay.per_group(vals, "amax")
    for i, part in enumerate(lay.split(vals)):
        assert sums[i] == part.sum() and maxes[i] == part.max()


def test_unknown_parameter_is_a_clear_error():
    with pytest.raises(ValueError, match="exist in the model"):
        ChargeLayout(GROUPS, {"conv.weight": (6, 3, 3, 3)})
