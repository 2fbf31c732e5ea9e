"""pytest plugin (registered through the ``pytest11`` entry point): fixtures and options for CI.

Installing ``nld_callbacks`` makes these available in every test suite, with no ``conftest.py``:

Fixtures:
    ``nld_toy_problem``: a factory, ``nld_toy_problem("mlp_bn", lr=0.1, weight_decay=5e-3)`` returns a
        freshly initialised :class:`~nld_callbacks.testing.ToyProblem` (model, data, optimizer factory);
        see :func:`nld_callbacks.testing.toy_problem` for the names and arguments.
    ``nld_baseline``: a checker, ``nld_baseline(trajectory)`` compares a run's charge trajectories with
        the JSON baseline stored next to the test file (``nld_baselines/<module>__<test>.json``), see
        :func:`nld_callbacks.testing.assert_matches_baseline`.
    ``nld_update_baselines``: ``True`` when pytest runs with ``--nld-update-baselines``.
    ``nld_digits``: scikit-learn's digits as ``(x, y)`` tensors (see :func:`nld_callbacks.testing.digits`).

Option:
    ``--nld-update-baselines``: rewrite the stored baselines from this run instead of comparing.

Example test file::

    from nld_callbacks.testing import assert_exact_identities, run_problem

    def test_charges(nld_toy_problem, nld_baseline):
        traj = run_problem(nld_toy_problem("mlp_bn", lr=0.1, weight_decay=5e-3), steps=20)
        assert_exact_identities(traj)
        nld_baseline(traj)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--nld-update-baselines``."""
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


@pytest.fixture
def nld_toy_problem() -> Callable[..., Any]:
    """Factory of freshly initialised toy problems: ``nld_toy_problem(name, **kwargs)``."""
    from .testing import toy_problem

    return toy_problem


def baseline_path(test_file: Path, test_name: str, name: str | None = None) -> Path:
    """Where a test's baseline lives: ``<test dir>/nld_baselines/<module>__<test>[__<name>].json``.

    Example:
        >>> baseline_path(Path("tests/test_a.py"), "test_b[sgd-0.1]").as_posix()
        'tests/nld_baselines/test_a__test_b_sgd-0.1_.json'
    """
    stem = f"{test_file.stem}__{test_name}" + (f"__{name}" if name else "")
    return test_file.parent / "nld_baselines" / (re.sub(r"[^A-Za-z0-9._-]", "_", stem) + ".json")


@pytest.fixture
def nld_baseline(request: pytest.FixtureRequest, nld_update_baselines: bool) -> Callable[..., None]:
    """Compare a :class:`~nld_callbacks.testing.Trajectory` with the test's stored JSON baseline.

    Call it as ``nld_baseline(trajectory, name=None, quantities=("charge",), rtol=1e-5, atol=1e-10)``;
    ``name`` tells several baselines of one test apart.
    """
    from .testing import assert_matches_baseline

    def check(trajectory: Any, name: str | None = None, *, quantities: Sequence[str] = ("charge",),
              rtol: float = 1e-5, atol: float = 1e-10) -> None:
        path = baseline_path(Path(str(request.node.path)), request.node.name, name)
        assert_matches_baseline(trajectory, path, quantities=quantities, rtol=rtol, atol=atol,
                                update=nld_update_baselines)

    return check
