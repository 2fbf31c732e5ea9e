"""Symmetry detection: which parameter groups carry a Noether charge.

A *symmetry group* is a set of parameter slices on which a one-parameter transformation leaves the
loss unchanged (physics.md §1). Three kinds are modelled:

* ``"scale"``: θ_A → e^α θ_A, charge Q = |θ_A|² (weights feeding a normalization, §1.1);
* ``"translation"``: θ_A → θ_A + α c, charge T = ⟨c, θ_A⟩ (softmax logits, biases feeding a
  normalization, §1.2);
* ``"rescale"``: (θ_in, θ_out) → (e^α θ_in, e^-α θ_out), charge Q = |θ_in|² − |θ_out|² (units
  between two layers joined by a positively homogeneous activation, §1.3).

Detection reads the computation that actually ran: the autograd graph of one forward pass, from the
output (or the loss) down to the parameters' ``AccumulateGrad`` nodes. Module names are used only
to name the groups, never to decide what a group is. A rule proposes a group only where the
symmetry is exact; gradients then confirm it numerically (physics.md §3.1, tier 1).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                       nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    >>> report = find_symmetries(model, torch.randn(4, 3, 8, 8))
    >>> [(g.kind, g.name, g.n_neurons) for g in report.groups if g.kind == "scale"]
    [('scale', '0', 8)]
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "Member",
    "SymmetryGroup",
    "SymmetryReport",
    "find_symmetries",
    "symmetries_from_graph",
]

Kind = Literal["scale", "translation", "rescale"]
KINDS: tuple[Kind, ...] = ("scale", "translation", "rescale")


@dataclass(frozen=True)
class Member:
    """One parameter tensor's share of a symmetry group.

    The group's charge is a vector over *neurons* (output channels, hidden units, norm groups, ...).
    A member maps its tensor onto that vector: entries are summed over every axis except ``axis``;
    the ``axis`` entries are then summed in ``blocks`` contiguous blocks when ``blocks`` is set
    (GroupNorm: channels of one norm group), and written from neuron index ``offset`` on.

    Attributes:
        param: qualified parameter name, as in ``model.named_parameters()``.
        axis: the neuron axis of the tensor; ``None`` makes the whole tensor a single neuron.
        sign: +1 or -1, the sign of this member in the bilinear form B (rescale out-side: -1).
        blocks: number of contiguous blocks the ``axis`` is summed into; ``None`` for one neuron
            per index.
        offset: first neuron index this member contributes to (members side by side).
    """

    param: str
    axis: int | None = 0
    sign: int = 1
    blocks: int | None = None
    offset: int = 0

    def n_neurons(self, shape: Sequence[int]) -> int:
        """Number of neurons this member produces for a tensor of ``shape``."""
        if self.axis is None:
            return 1
        n = int(shape[self.axis])
        return int(self.blocks) if self.blocks is not None else n


@dataclass
class SymmetryGroup:
    """A set of parameter slices with one Noether charge per neuron.

    Attributes:
        kind: ``"scale"``, ``"translation"`` or ``"rescale"``.
        name: readable layer name: the qualified name of the module that owns the group's first
            parameter (``"features.0"``), unique per kind within a report.
        members: the parameter slices, see :class:`Member`.
        n_neurons: length of the per-neuron charge vector.
        granularity: what one neuron is (``"output channel"``, ``"norm group"``, ``"layer"``, ...).
        why: the rule that proposed the group, in words.
        confirmed: ``True`` when gradients confirmed the geometry, ``False`` when they refuted it,
            ``None`` when not checked.
        violation: the largest measured geometry violation (physics.md §3.1), if checked.
        exact: ``False`` for groups that hold only approximately (labelled, never predicted
            exactly).
    """

    kind: Kind
    name: str
    members: tuple[Member, ...]
    n_neurons: int
    granularity: str
    why: str
    confirmed: bool | None = None
    violation: float | None = None
    exact: bool = True

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the parameters the group covers, in member order, without repeats."""
        return tuple(dict.fromkeys(m.param for m in self.members))

    @property
    def linear(self) -> bool:
        """Whether the charge is linear in θ (translation) rather than quadratic."""
        return self.kind == "translation"

    @property
    def key(self) -> str:
        """``kind/name``: the group's identity in tags and state dicts."""
        return f"{self.kind}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        d = dataclasses.asdict(self)
        d["members"] = [dataclasses.asdict(m) for m in self.members]
        d["params"] = list(self.params)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SymmetryGroup:
        """Inverse of :meth:`to_dict`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["members"] = tuple(Member(**m) for m in d["members"])
        return cls(**kw)


@dataclass
class SymmetryReport(Sequence[SymmetryGroup]):
    """The groups found on a model, printable as a table.

    Attributes:
        groups: the accepted groups (confirmed or unconfirmed; refuted ones are in ``refuted``).
        refuted: groups a rule proposed and gradients refuted, with the measured violation.
        n_params: number of parameter entries in the model that require gradients.
        notes: what could not be modelled, in words.
    """

    groups: list[SymmetryGroup] = field(default_factory=list)
    refuted: list[SymmetryGroup] = field(default_factory=list)
    n_params: int = 0
    covered: int = 0
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, i):  # type: ignore[override]
        return self.groups[i]

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[SymmetryGroup]:
        return iter(self.groups)

    @property
    def coverage(self) -> float:
        """Fraction of trainable parameter entries that lie in at least one group."""
        return self.covered / self.n_params if self.n_params else 0.0

    def by_kind(self, kind: Kind) -> list[SymmetryGroup]:
        """Groups of one kind."""
        return [g for g in self.groups if g.kind == kind]

    def select(self, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None) -> SymmetryReport:
        """Keep groups whose ``kind/name`` key matches an ``include`` glob and no ``exclude`` glob."""
        inc, exc = list(include or []), list(exclude or [])
        keep = [
            g
            for g in self.groups
            if (not inc or any(fnmatch.fnmatchcase(g.key, p) for p in inc))
            and not any(fnmatch.fnmatchcase(g.key, p) for p in exc)
        ]
        return dataclasses.replace(self, groups=keep, refuted=list(self.refuted), notes=list(self.notes))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        return {
            "groups": [g.to_dict() for g in self.groups],
            "refuted": [g.to_dict() for g in self.refuted],
            "n_params": self.n_params,
            "covered": self.covered,
            "coverage": self.coverage,
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """The report as a fixed-width text table with a coverage line."""
        rows = [("kind", "layer", "neurons", "granularity", "parameters", "confirmed", "why")]
        for g in self.groups + self.refuted:
            conf = {True: "yes", False: "REFUTED", None: "-"}[g.confirmed]
            if g.violation is not None:
                conf += f" ({g.violation:.1e})"
            rows.append((g.kind, g.name, str(g.n_neurons), g.granularity, ", ".join(g.params), conf, g.why))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        counts = ", ".join(f"{len(self.by_kind(k))} {k}" for k in KINDS)
        lines.append(
            f"{len(self.groups)} groups ({counts}); parameters covered: "
            f"{self.covered:,} of {self.n_params:,} ({100 * self.coverage:.1f}%)"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------------------------
# Structural detection over the autograd graph
# --------------------------------------------------------------------------------------------

# Autograd nodes a scale transformation passes through unchanged up to a positive factor, per
# channel (physics.md §1.1: positively homogeneous, channel preserving).
_HOMOGENEOUS = {
    "ReluBackward0",
    "ReluBackward1",
    "LeakyReluBackward0",
    "LeakyReluBackward1",
    "MaxPool2DWithIndicesBackward0",
    "MaxPool1DWithIndicesBackward0",
    "MaxPool3DWithIndicesBackward0",
    "AvgPool2DBackward0",
    "AvgPool1DBackward0",
    "AvgPool3DBackward0",
    "AdaptiveAvgPool2DBackward0",
    "AdaptiveMaxPool2DBackward0",
    "CloneBackward0",
    "NativeDropoutBackward0",
}

_BATCH_NORMS = {"NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"}

# Producers: node name -> (input index of the weight path, input index of the bias, weight axis)
_CONV = "ConvolutionBackward0"
_ADDMM = "AddmmBackward0"


def _param_leaf(node: Any) -> Any | None:
    """The parameter behind an AccumulateGrad node, seen through a transpose/view."""
    while node is not None and type(node).__name__ in {"TBackward0", "ViewBackward0", "PermuteBackward0", "ToCopyBackward0"}:
        node = node.next_functions[0][0]
    if node is not None and type(node).__name__ == "AccumulateGrad":
        return node.variable
    return None


@dataclass
class _Graph:
    """Consumer counts of an autograd graph (how many edges point at each node)."""

    consumers: dict[Any, int]

    @classmethod
    def build(cls, root: Any) -> _Graph:
        consumers: dict[Any, int] = {}
        stack, seen = [root], {root}
        while stack:
            n = stack.pop()
            for nx, _ in n.next_functions:
                if nx is None:
                    continue
                consumers[nx] = consumers.get(nx, 0) + 1
                if nx not in seen:
                    seen.add(nx)
                    stack.append(nx)
        return cls(consumers)

    def nodes(self) -> Iterable[Any]:
        return self.consumers.keys()


def _producer_params(node: Any) -> tuple[Any | None, Any | None, str] | None:
    """(weight, bias, description) of a Conv/Linear autograd node, or None."""
    name = type(node).__name__
    nf = node.next_functions
    if name == _CONV:
        # next_functions: (input, weight, bias)
        w = _param_leaf(nf[1][0])
        b = _param_leaf(nf[2][0]) if len(nf) > 2 else None
        if w is None or getattr(node, "_saved_transposed", False) or getattr(node, "_saved_groups", 1) != 1:
            return None
        return w, b, "conv"
    if name == _ADDMM:
        # addmm(bias, input, weight.T): next_functions (bias, input, weightT)
        b = _param_leaf(nf[0][0])
        w = _param_leaf(nf[2][0]) if type(nf[2][0]).__name__ == "TBackward0" else None
        if w is None:
            return None
        return w, b, "linear"
    if name == "MmBackward0":
        w = _param_leaf(nf[1][0]) if type(nf[1][0]).__name__ == "TBackward0" else None
        return (w, None, "linear") if w is not None else None
    return None


def _scale_rules(graph: _Graph, names: Mapping[int, str]) -> list[SymmetryGroup]:
    """Scale groups: a Conv/Linear whose output reaches a train-mode BatchNorm (physics.md §1.1)."""
    groups: list[SymmetryGroup] = []
    for norm in graph.nodes():
        if type(norm).__name__ not in _BATCH_NORMS or not getattr(norm, "_saved_training", False):
            continue
        node, path = norm.next_functions[0][0], []
        while node is not None and type(node).__name__ in _HOMOGENEOUS and graph.consumers.get(node, 0) == 1:
            path.append(type(node).__name__.removesuffix("Backward0"))
            node = node.next_functions[0][0]
        if node is None or graph.consumers.get(node, 0) != 1:
            continue  # the producer's output also feeds something the norm does not remove
        found = _producer_params(node)
        if found is None:
            continue
        w, b, what = found
        wname = names.get(id(w))
        if wname is None:
            continue
        members = [Member(wname, axis=0)]
        if b is not None and id(b) in names:
            members.append(Member(names[id(b)], axis=0))
        via = " → ".join(["BatchNorm (train)"] + path[::-1])
        groups.append(
            SymmetryGroup(
                kind="scale",
                name=wname.rsplit(".", 1)[0],
                members=tuple(members),
                n_neurons=int(w.shape[0]),
                granularity="output channel",
                why=f"{what} output reaches {via.split(' → ')[0]}"
                + (f" through {', '.join(path[::-1])}" if path else " directly"),
            )
        )
    return groups


def symmetries_from_graph(model: nn.Module, root: torch.Tensor) -> SymmetryReport:
    """Propose symmetry groups from the autograd graph that produced ``root``.

    ``root`` is any tensor computed from the model's parameters with gradients enabled: the
    model's output, or the training loss (which lets loss-level rules see the head).

    Args:
        model: the module whose parameters are named in the report.
        root: a tensor whose ``grad_fn`` graph reaches the parameters.

    Returns:
        A :class:`SymmetryReport` with unconfirmed groups.

    Raises:
        ValueError: if ``root`` has no autograd graph.
    """
    if root.grad_fn is None:
        raise ValueError(
            "Expected `root` to be a tensor computed from the model's parameters with gradients "
            f"enabled, but it has no grad_fn (requires_grad={root.requires_grad}). Run the forward "
            "pass outside torch.no_grad() and with the model's parameters requiring gradients."
        )
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    graph = _Graph.build(root.grad_fn)
    groups = _scale_rules(graph, names)
    groups.sort(key=lambda g: (KINDS.index(g.kind), list(names.values()).index(g.members[0].param)))
    return _with_coverage(model, SymmetryReport(groups=groups))


def _with_coverage(model: nn.Module, report: SymmetryReport) -> SymmetryReport:
    params = dict(model.named_parameters())
    covered = {m.param for g in report.groups for m in g.members}
    report.n_params = sum(p.numel() for p in params.values() if p.requires_grad)
    report.covered = sum(params[n].numel() for n in covered if n in params)
    return report


def _geometry_violation(group: SymmetryGroup, params: Mapping[str, torch.Tensor]) -> float:
    """Largest per-neuron |R| / (|θ||g|) of a quadratic group (physics.md §3.1), in float64."""
    from .charges import bilinear_reference

    theta = {n: params[n].detach() for n in group.params}
    grad = {n: params[n].grad for n in group.params}
    if any(g is None for g in grad.values()):
        return math.nan
    r = bilinear_reference(group, theta, grad)  # type: ignore[arg-type]
    qq = bilinear_reference(group, theta, theta, unsigned=True)
    gg = bilinear_reference(group, grad, grad, unsigned=True)  # type: ignore[arg-type]
    denom = (qq * gg).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return float((r.abs() / denom).max())


def _tolerance(dtype: torch.dtype) -> float:
    """Geometry tolerance per dtype: fp32 forward/backward floor 1e-7, BN-eps breaking up to 3e-5
    (physics.md §1.4, §3.1), so 1e-3 in fp32 and bf16-sized below."""
    return {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}.get(dtype, 1e-3)


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            if isinstance(o, torch.Tensor) and o.grad_fn is not None:
                return o
    raise TypeError(f"Expected the model to return a tensor (or a tuple/dict of tensors) but got {type(out)}")


class _Preserved:
    """Saves and restores what a probing forward/backward pass would otherwise change: buffers
    (BatchNorm running statistics), ``.grad`` of every parameter, and the RNG states."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> _Preserved:
        self.buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        self.grads = {n: p.grad for n, p in self.model.named_parameters()}
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        for p in self.model.parameters():
            p.grad = None
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                b.copy_(self.buffers[n])
        for n, p in self.model.named_parameters():
            p.grad = self.grads[n]
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def find_symmetries(
    model: nn.Module,
    example_input: Any,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    confirm: bool = True,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> SymmetryReport:
    """Find the symmetry groups of ``model`` on ``example_input`` and confirm them from gradients.

    One forward and one backward pass are run with the model as it is (call ``model.train()``
    first: eval-mode BatchNorm has no scale symmetry). Buffers, gradients and RNG states are
    restored afterwards, so calling this never changes training.

    Args:
        model: the network.
        example_input: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        loss_fn: optional map from the model's output to a scalar loss; lets loss-level rules
            (softmax translation) see the head. Without it a random projection of the output is
            used for the gradient check, which confirms output-level symmetries only.
        confirm: check each proposed group's gradient geometry and drop refuted ones.
        include: glob patterns over ``kind/layer`` keys to keep (default: all).
        exclude: glob patterns over ``kind/layer`` keys to drop.

    Returns:
        The :class:`SymmetryReport`.

    Raises:
        ValueError: if the model cannot run on ``example_input``.
    """
    with _Preserved(model):
        try:
            out = _call(model, example_input)
        except Exception as err:  # a clear message naming what the model expected
            raise ValueError(_input_mismatch(model, example_input, err)) from err
        root = loss_fn(out) if loss_fn is not None else _first_tensor(out)
        report = symmetries_from_graph(model, root)
        if confirm and report.groups:
            if root.numel() != 1:
                gen = torch.Generator(device="cpu").manual_seed(0)
                proj = torch.randn(root.shape, generator=gen, dtype=root.dtype).to(root.device)
                root = (root * proj).sum()
            root.backward()
            params = dict(model.named_parameters())
            kept, refuted = [], []
            for g in report.groups:
                v = _geometry_violation(g, params)
                tol = _tolerance(params[g.members[0].param].dtype)
                g.violation = v
                g.confirmed = bool(v <= tol) if not math.isnan(v) else None
                (refuted if g.confirmed is False else kept).append(g)
            report.groups, report.refuted = kept, refuted
            for p in model.parameters():
                p.grad = None
    report = report.select(include, exclude)
    return _with_coverage(model, report)


def _input_mismatch(model: nn.Module, example_input: Any, err: Exception) -> str:
    def describe(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
        if isinstance(x, Mapping):
            return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in x.items()) + "}"
        if isinstance(x, tuple):
            return "(" + ", ".join(describe(v) for v in x) + ")"
        return type(x).__name__

    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    expect = ""
    if isinstance(first, nn.Linear):
        expect = f" Its first layer is Linear(in_features={first.in_features}): it expects inputs of shape (N, {first.in_features})."
    elif isinstance(first, nn.modules.conv._ConvNd):
        expect = f" Its first layer is {type(first).__name__}(in_channels={first.in_channels}): it expects (N, {first.in_channels}, ...)."
    return (
        f"`example_input` does not fit {type(model).__name__}: calling it on {describe(example_input)} "
        f"raised {type(err).__name__}: {err}.{expect}"
    )
