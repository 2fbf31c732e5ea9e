"""Charges as pure functions: per-neuron bilinear sums B(X, Y) and linear sums ⟨c, X⟩.

For a group with members i (parameter tensor, neuron axis, sign s_i), physics.md §0 defines

    B(X, Y)[j] = Σ_i s_i · red_i(X_i ⊙ Y_i)[j],        T(X)[j] = Σ_i s_i · red_i(X_i)[j]

where ``red_i`` sums a tensor over every axis but the member's neuron axis. The charge is
Q = B(θ, θ); the identities of §2.1 also need R = B(θ, g), K = B(v, v), P = B(θ, v), ...

Two implementations, one obviously right and one fast, tested against each other:

* :func:`bilinear_reference` / :func:`linear_reference`: a per-group, per-member loop on float64
  copies;
* :class:`ChargeLayout`: built once per model; reduces each parameter once per product into one
  flat float64 vector of *reduction neurons* (one entry per (tensor, neuron)), then maps those onto
  the groups' neurons with one gather and one ``index_add`` per quantity, whatever the depth.

Example:
    >>> import torch
    >>> from nld_callbacks.symmetries import Member, SymmetryGroup
    >>> g = SymmetryGroup("scale", "fc", (Member("w", axis=0),), 2, "output channel", "example")
    >>> w = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    >>> bilinear_reference(g, {"w": w}, {"w": w})
    tensor([25.,  1.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .symmetries import Member, SymmetryGroup

__all__ = ["ChargeLayout", "bilinear_reference", "linear_reference", "reduce_member"]


def reduce_member(x: torch.Tensor, member: Member) -> torch.Tensor:
    """Sum ``x`` (shaped like the member's parameter) onto the member's neurons.

    The sum runs in ``x``'s dtype (torch's cascade summation: about one unit roundoff of relative
    error, inside the residual floor of physics.md §3.2) and the per-neuron result is returned as
    float64; pass float64 ``x`` for float64 accumulation.

    Args:
        x: an elementwise quantity of the parameter's shape (θ², θ·g, θ, ...).
        member: which axis holds the neurons and how they are blocked.

    Returns:
        A float64 vector of ``member.n_neurons(x.shape)`` entries.
    """
    if member.axis is None:
        return x.sum().to(torch.float64).reshape(1)
    axis = member.axis % x.dim()
    dims = tuple(d for d in range(x.dim()) if d != axis)
    out = (x.sum(dim=dims) if dims else x).to(torch.float64)
    if member.blocks is not None:
        out = out.reshape(member.blocks, -1).sum(dim=1)
    return out


def _combine(group: SymmetryGroup, parts: Sequence[tuple[Member, torch.Tensor]], unsigned: bool) -> torch.Tensor:
    out = torch.zeros(group.n_neurons, dtype=torch.float64, device=parts[0][1].device)
    for m, v in parts:
        out[m.offset : m.offset + v.numel()] += v if unsigned else m.sign * v
    return out


def bilinear_reference(
    group: SymmetryGroup,
    X: Mapping[str, torch.Tensor],
    Y: Mapping[str, torch.Tensor],
    *,
    unsigned: bool = False,
) -> torch.Tensor:
    """B(X, Y) per neuron of ``group``, by a plain loop over members on float64 copies.

    Args:
        group: the symmetry group.
        X: parameter name → tensor.
        Y: parameter name → tensor.
        unsigned: use +1 for every member (the group size M of physics.md §0 when X = Y = θ).
    """
    parts = [(m, reduce_member(X[m.param].double() * Y[m.param].double(), m)) for m in group.members]
    return _combine(group, parts, unsigned)


def linear_reference(group: SymmetryGroup, X: Mapping[str, torch.Tensor], *, absolute: bool = False) -> torch.Tensor:
    """T(X) = ⟨c, X⟩ per neuron (c = the all-ones generator on each member); ``absolute`` sums |X|."""
    parts = [(m, reduce_member(X[m.param].double().abs() if absolute else X[m.param].double(), m)) for m in group.members]
    return _combine(group, parts, unsigned=absolute)


@dataclass(frozen=True)
class _Reduction:
    param: str
    axis: int | None
    blocks: int | None
    start: int
    size: int


class ChargeLayout:
    """Index plan that evaluates every group's bilinear sums with a fixed number of batched ops.

    The flat *reduction* vector holds one float64 entry per (parameter, neuron-axis, neuron);
    :meth:`to_groups` maps any per-reduction quantity onto the flat *group-neuron* vector (groups
    concatenated in order) with the members' signs, and :meth:`per_group` aggregates group-neuron
    values per group.

    Args:
        groups: the symmetry groups to evaluate.
        shapes: parameter name → shape (or tensor) for every parameter the groups name.
        device: where the index tensors live (the parameters' device).
        float64_accumulation: upcast every tensor to float64 before multiplying and summing
            (exact products, float64 sums; several times slower on low-precision tensors). By
            default products and per-neuron sums run in the tensors' own dtype.
    """

    def __init__(
        self,
        groups: Sequence[SymmetryGroup],
        shapes: Mapping[str, Sequence[int] | torch.Tensor],
        device: torch.device | str = "cpu",
        *,
        float64_accumulation: bool = False,
    ) -> None:
        self.groups = list(groups)
        self.float64_accumulation = float64_accumulation
        self.device = torch.device(device)
        shape = {n: tuple(s.shape if isinstance(s, torch.Tensor) else s) for n, s in shapes.items()}
        missing = sorted({m.param for g in groups for m in g.members} - shape.keys())
        if missing:
            raise ValueError(f"Expected every grouped parameter to exist in the model, but {missing} do not")
        index: dict[tuple[str, int | None, int | None], _Reduction] = {}
        src, dst, sign, goff = [], [], [], []
        start = 0
        gstart = 0
        for gi, g in enumerate(self.groups):
            goff.append(gstart)
            for m in g.members:
                key = (m.param, None if m.axis is None else m.axis % len(shape[m.param]), m.blocks)
                if key not in index:
                    n = m.n_neurons(shape[m.param])
                    index[key] = _Reduction(m.param, key[1], m.blocks, start, n)
                    start += n
                r = index[key]
                if m.offset + r.size > g.n_neurons:
                    raise ValueError(
                        f"Group {g.key!r}: member {m.param!r} gives {r.size} neurons at offset {m.offset}, "
                        f"more than the group's n_neurons={g.n_neurons}"
                    )
                src.extend(range(r.start, r.start + r.size))
                dst.extend(range(gstart + m.offset, gstart + m.offset + r.size))
                sign.extend([float(m.sign)] * r.size)
            gstart += g.n_neurons
        self.n_reductions = start
        self.n_neurons = gstart
        # parameter name -> its reductions, in first-seen order
        self.reductions: dict[str, list[_Reduction]] = {}
        for r in index.values():
            self.reductions.setdefault(r.param, []).append(r)
        self.params = list(self.reductions)
        dev = self.device
        self._src = torch.tensor(src, dtype=torch.long, device=dev)
        self._dst = torch.tensor(dst, dtype=torch.long, device=dev)
        self._sign = torch.tensor(sign, dtype=torch.float64, device=dev)
        self.group_index = torch.repeat_interleave(
            torch.arange(len(self.groups), device=dev),
            torch.tensor([g.n_neurons for g in self.groups], dtype=torch.long, device=dev),
        )
        self.group_offsets = goff
        # which parameter each reduction entry belongs to (for per-tensor coefficients)
        owner = torch.empty(start, dtype=torch.long)
        for pi, p in enumerate(self.params):
            for r in self.reductions[p]:
                owner[r.start : r.start + r.size] = pi
        self.param_of_reduction = owner.to(dev)

    def reduce(self, tensors: Mapping[str, torch.Tensor | None], other: Mapping[str, torch.Tensor | None] | None = None,
               *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-reduction float64 sums of ``tensors ⊙ other`` (or of ``tensors`` alone if linear).

        Args:
            tensors: parameter name → X (a missing or ``None`` entry counts as zeros).
            other: parameter name → Y; ``None`` reduces X itself (linear charges).
            out: optional preallocated float64 vector of ``n_reductions`` entries.
        """
        if out is None:
            out = torch.empty(self.n_reductions, dtype=torch.float64, device=self.device)
        for p, reds in self.reductions.items():
            x, y = tensors.get(p), None if other is None else other.get(p)
            if x is None or (other is not None and y is None):  # no gradient / no buffer: zero
                for r in reds:
                    out[r.start : r.start + r.size] = 0.0
                continue
            square = y is x
            if self.float64_accumulation:
                x = x.double()
                y = x if square else (None if y is None else y.double())
            prod = x if y is None else (x * x if square else x * y)
            for r in reds:
                out[r.start : r.start + r.size] = reduce_member(prod, Member(p, r.axis, blocks=r.blocks))
        return out

    def to_groups(self, values: torch.Tensor, *, unsigned: bool = False) -> torch.Tensor:
        """Map per-reduction values (last dim) onto the group-neuron vector, applying signs."""
        v = values.index_select(-1, self._src)
        if not unsigned:
            v = v * self._sign
        out = torch.zeros((*values.shape[:-1], self.n_neurons), dtype=values.dtype, device=values.device)
        return out.index_add_(-1, self._dst, v)

    def per_group(self, values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Aggregate group-neuron values (last dim) per group: ``sum``, ``mean``, ``amax``, ``amin``."""
        shape = (*values.shape[:-1], len(self.groups))
        out = torch.zeros(shape, dtype=values.dtype, device=values.device)
        idx = self.group_index.expand_as(values)
        return out.scatter_reduce_(-1, idx, values, reduce=reduce, include_self=False)

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Split a group-neuron vector into one tensor per group."""
        return list(values.split([g.n_neurons for g in self.groups], dim=-1))
