"""pytest plugin (registered through the ``pytest11`` entry point): fixtures and options.

Fixtures:
    ``nld_update_baselines``: ``True`` when pytest runs with ``--nld-update-baselines``.
    ``nld_digits``: scikit-learn's digits as ``(x, y)`` tensors (see :func:`nld_callbacks.testing.digits`).
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nld", "Noether charge regression tests (nld_callbacks)")
    group.addoption("--nld-update-baselines", action="store_true", default=False,
                    help="rewrite the stored NLD charge baselines instead of comparing with them")


@pytest.fixture
def nld_update_baselines(request: pytest.FixtureRequest) -> bool:
    """Whether stored baselines should be rewritten."""
    return bool(request.config.getoption("--nld-update-baselines"))


@pytest.fixture(scope="session")
def nld_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits data set, loaded once per session."""
    from .testing import digits

    return digits()
