"""TensorBoard naming and writing: one pure function builds every tag.

Tags are flat scalars ``nld/{kind}/{layer}/{quantity}`` (design.md), with ``layer`` the module's
qualified name. :func:`custom_scalars_layout` pairs measured with predicted values per layer; its
regexes are escaped so that ``features.1`` matches only itself.

Example:
    >>> tag("scale", "features.0", "charge")
    'nld/scale/features.0/charge'
    >>> layer_regex("scale", "features.0", "charge")
    'nld/scale/features\\\\.0/charge$'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

__all__ = ["QUANTITIES", "custom_scalars_layout", "layer_regex", "parse_tag", "tag", "write_scalars"]

PREFIX = "nld"

#: Every per-layer scalar the tracker may write, and what it means.
QUANTITIES: dict[str, str] = {
    "charge": "measured charge after the step (Σ over the layer's neurons)",
    "predicted": "exact per-step identity with R_t = 0, carried from the last measured charge",
    "nld": "continuous NLD law integrated from the start of tracking",
    "residual": "largest |e| (unexplained residual, physics.md §3.2) since the last log",
    "breaking": "largest |b| (measured symmetry-breaking share) since the last log",
    "effective_lr": "η/((1−ηλ)Q), mean over the layer's channels (scale groups)",
    "angular_update": "measured 2·asin(|ŵ_{t+1} − ŵ_t|/2), mean over channels (scale groups)",
}


def tag(kind: str, layer: str, quantity: str) -> str:
    """The TensorBoard tag of one per-layer quantity.

    Raises:
        ValueError: for an empty ``kind``, ``layer`` or ``quantity``.
    """
    for arg, v in (("kind", kind), ("layer", layer), ("quantity", quantity)):
        if not v:
            raise ValueError(f"Expected a non-empty `{arg}` but got {v!r}")
    return f"{PREFIX}/{kind}/{layer}/{quantity}"


def parse_tag(t: str) -> tuple[str, str, str] | None:
    """Inverse of :func:`tag`: ``(kind, layer, quantity)``, or ``None`` for other tags."""
    parts = t.split("/")
    if len(parts) < 4 or parts[0] != PREFIX:
        return None
    return parts[1], "/".join(parts[2:-1]), parts[-1]


def layer_regex(kind: str, layer: str, quantity: str) -> str:
    """An anchored, escaped regex matching exactly one tag (TensorBoard matches by regex)."""
    return f"{re.escape(f'{PREFIX}/{kind}/{layer}/')}{re.escape(quantity)}$"


def custom_scalars_layout(layers: Iterable[tuple[str, str]], quantities: Iterable[str]) -> dict[str, Any]:
    """A custom-scalars layout as plain data: one category per kind, charts per layer.

    Per layer: a Multiline chart of ``charge`` with ``predicted`` (and ``nld`` when written), and one
    chart per remaining quantity. The dict converts with
    :func:`tensorboard.summary.custom_scalar_pb` style helpers in :func:`write_layout`.

    Args:
        layers: ``(kind, layer)`` pairs.
        quantities: the quantities actually written.
    """
    qs = list(quantities)
    cats: dict[str, list[dict[str, Any]]] = {}
    for kind, layer in layers:
        charts = cats.setdefault(kind, [])
        pair = [q for q in ("charge", "predicted", "nld") if q in qs]
        charts.append({"title": f"{layer} charge: measured vs predicted",
                       "multiline": [layer_regex(kind, layer, q) for q in pair]})
        for q in qs:
            if q not in pair:
                charts.append({"title": f"{layer} {q}", "multiline": [layer_regex(kind, layer, q)]})
    return {"category": [{"title": f"NLD {kind}", "chart": charts} for kind, charts in cats.items()]}


def write_layout(writer: Any, layout: Mapping[str, Any]) -> None:
    """Write a layout from :func:`custom_scalars_layout` through a ``SummaryWriter``."""
    writer.add_custom_scalars(
        {
            cat["title"]: {ch["title"]: ["Multiline", ch["multiline"]] for ch in cat["chart"]}
            for cat in layout["category"]
        }
    )


class ScalarWriter(Protocol):
    def add_scalar(self, tag: str, value: float, global_step: int) -> Any: ...


def write_scalars(writer: ScalarWriter, metrics: Mapping[str, float], step: int) -> None:
    """Write flat scalars (never ``add_scalars``, which creates extra runs)."""
    for k, v in metrics.items():
        writer.add_scalar(k, v, global_step=step)
