"""nld_callbacks: Noether charges of neural-network symmetries, measured at every optimizer step.

Add :class:`NoetherMonitor` to a Lightning ``Trainer`` or wrap a plain loop in
:class:`NoetherTracker`; :func:`find_symmetries` tells which parameter groups carry a charge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .symmetries import Member, SymmetryGroup, SymmetryReport, find_symmetries
from .tracker import NoetherTracker

if TYPE_CHECKING:
    from .callback import NoetherMonitor

__all__ = ["Member", "NoetherMonitor", "NoetherTracker", "SymmetryGroup", "SymmetryReport", "find_symmetries"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lightning is imported only when the callback is asked for: the core works without it.
    if name == "NoetherMonitor":
        from .callback import NoetherMonitor

        return NoetherMonitor
    raise AttributeError(f"module 'nld_callbacks' has no attribute {name!r}")
