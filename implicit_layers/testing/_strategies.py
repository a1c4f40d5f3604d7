"""Hypothesis strategies that draw the problems of :mod:`._problems`.

Each strategy draws a dimension, a dtype, a seed and the conditioning (a contraction factor for
a map, a condition number for a loss) within the given ranges, and builds the problem from them;
hypothesis shrinks a failing example towards small dimensions, float32 before float64, seed 0 and
the lower end of each range.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hypothesis import strategies as st

from ._problems import (
    ArgminProblem,
    DEQProblem,
    FixedPointProblem,
    affine_problem,
    deq_problem,
    logistic_problem,
    quadratic_problem,
    tanh_problem,
)

__all__ = ["affine_maps", "tanh_maps", "quadratic_problems", "logistic_problems", "deq_cells"]

DTYPES = (torch.float32, torch.float64)
_SEEDS = st.integers(0, 2**32 - 1)


def _sizes(name: str, bounds: tuple[int, int], low: int = 1) -> st.SearchStrategy[int]:
    first, last = bounds
    if not low <= first <= last:
        raise ValueError(f"`{name}` must be (min, max) with {low} <= min <= max, got {bounds}.")
    return st.integers(first, last)


def _dtypes(dtypes: Sequence[torch.dtype]) -> st.SearchStrategy[torch.dtype]:
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise ValueError(f"`dtypes` must be a non-empty subset of {DTYPES}, got {dtypes}.")
    return st.sampled_from(tuple(dtypes))


def _contractions(bounds: tuple[float, float]) -> st.SearchStrategy[float]:
    first, last = bounds
    if not 0 < first <= last <= 0.99:
        raise ValueError(
            f"`contraction` must be (min, max) with 0 < min <= max <= 0.99, got {bounds}: a "
            "contraction factor of 1 leaves I - J singular."
        )
    return st.floats(first, last)


def _conditions(bounds: tuple[float, float]) -> st.SearchStrategy[float]:
    first, last = bounds
    if not 2 <= first <= last <= 1e6:
        raise ValueError(
            f"`condition` must be (min, max) with 2 <= min <= max <= 1e6, got {bounds}."
        )
    return st.floats(first, last)


def affine_maps(
    *,
    dims: tuple[int, int] = (2, 6),
    dtypes: Sequence[torch.dtype] = DTYPES,
    contraction: tuple[float, float] = (0.1, 0.9),
) -> st.SearchStrategy[FixedPointProblem]:
    """Affine maps ``Phi(w, A, c) = A w + c`` with ``||A||_2 = rho`` drawn in ``contraction``.

    ``inputs = (w0, A, c)``; ``A`` and ``c`` require grad. ``J = A`` everywhere, so the problem's
    ``contraction`` is ``||J||_2`` and ``condition = (1 + rho) / (1 - rho)`` bounds
    ``cond(I - J)``.

    >>> from hypothesis import given, settings
    >>> from implicit_layers.testing import affine_maps
    >>> @settings(max_examples=5)
    ... @given(affine_maps(dtypes=[torch.float64]))
    ... def test(problem):
    ...     w0, A, c = problem.inputs
    ...     assert torch.linalg.matrix_norm(A.detach(), 2) < 1
    >>> test()
    """
    return st.builds(
        affine_problem,
        seed=_SEEDS,
        dim=_sizes("dims", dims),
        contraction=_contractions(contraction),
        dtype=_dtypes(dtypes),
    )


def tanh_maps(
    *,
    dims: tuple[int, int] = (2, 6),
    input_dims: tuple[int, int] = (1, 3),
    dtypes: Sequence[torch.dtype] = DTYPES,
    contraction: tuple[float, float] = (0.1, 0.9),
) -> st.SearchStrategy[FixedPointProblem]:
    """Maps ``Phi(w, W, U, x) = tanh(W w + U x)`` with ``||W||_2 = rho`` drawn in ``contraction``.

    ``inputs = (w0, W, U, x)``; ``W`` and ``x`` require grad, ``U`` is data. Since
    ``J = diag(1 - Phi^2) W``, ``||J||_2 <= rho`` at every ``w``.

    >>> from hypothesis import find
    >>> from implicit_layers.testing import tanh_maps
    >>> problem = find(tanh_maps(contraction=(0.5, 0.5)), lambda p: True)
    >>> round(problem.contraction, 3), round(problem.condition, 3)
    (0.5, 3.0)
    """
    return st.builds(
        tanh_problem,
        seed=_SEEDS,
        dim=_sizes("dims", dims),
        input_dim=_sizes("input_dims", input_dims),
        contraction=_contractions(contraction),
        dtype=_dtypes(dtypes),
    )


def quadratic_problems(
    *,
    dims: tuple[int, int] = (2, 6),
    dtypes: Sequence[torch.dtype] = DTYPES,
    condition: tuple[float, float] = (2.0, 50.0),
) -> st.SearchStrategy[ArgminProblem]:
    """Strongly convex quadratics ``f(w, lam, A, c) = 0.5 (w - c)^T A (w - c) +
    0.5 sum(exp(lam) w^2)`` whose Hessian ``A + diag(exp(lam))`` has a condition number at most
    the one drawn in ``condition`` (the problem stores the exact one).

    ``inputs = (w0, lam, A, c)``; ``lam`` (per-feature log weight decay) and ``c`` require grad.

    >>> from hypothesis import find
    >>> from implicit_layers.testing import quadratic_problems
    >>> problem = find(quadratic_problems(condition=(10.0, 10.0)), lambda p: True)
    >>> problem.condition <= 10 + 1e-6
    True
    """
    return st.builds(
        quadratic_problem,
        seed=_SEEDS,
        dim=_sizes("dims", dims),
        condition=_conditions(condition),
        dtype=_dtypes(dtypes),
    )


def logistic_problems(
    *,
    dims: tuple[int, int] = (2, 6),
    dtypes: Sequence[torch.dtype] = DTYPES,
    condition: tuple[float, float] = (2.0, 50.0),
) -> st.SearchStrategy[ArgminProblem]:
    """L2-regularised logistic regression ``f(w, lam, X, y) = mean(softplus(-y X w)) +
    0.5 sum(exp(lam) w^2)`` on ``4 dim`` points, with the data scaled so that the Hessian bound
    ``L / mu`` (valid at every ``w``) equals the condition number drawn in ``condition``.

    ``inputs = (w0, lam, X, y)``; ``lam`` requires grad.

    >>> from hypothesis import find
    >>> from implicit_layers.testing import logistic_problems
    >>> problem = find(logistic_problems(), lambda p: p.dim == 4)
    >>> problem.inputs[2].shape
    torch.Size([16, 4])
    """
    return st.builds(
        logistic_problem,
        seed=_SEEDS,
        dim=_sizes("dims", dims),
        condition=_conditions(condition),
        dtype=_dtypes(dtypes),
    )


def deq_cells(
    *,
    dims: tuple[int, int] = (2, 6),
    input_dims: tuple[int, int] = (1, 3),
    batch: tuple[int, int] = (1, 3),
    dtypes: Sequence[torch.dtype] = DTYPES,
    contraction: tuple[float, float] = (0.1, 0.9),
) -> st.SearchStrategy[DEQProblem]:
    """Deep-equilibrium cells ``z = tanh(W z + U x + b)``, an ``nn.Module`` ``cell(z, x)`` with
    ``||W||_2 = rho`` drawn in ``contraction``, on a batch of rows.

    ``inputs = (z0, x)`` with ``x`` requiring grad; the cell's ``W``, ``U`` and ``b`` require
    grad too (a layer made from the cell passes them to its backward).

    >>> from hypothesis import find
    >>> from implicit_layers.testing import deq_cells
    >>> problem = find(deq_cells(batch=(3, 3)), lambda p: p.dim == 2)
    >>> problem.inputs[0].shape, sorted(name for name, _ in problem.cell.named_parameters())
    (torch.Size([3, 2]), ['U', 'W', 'b'])
    """
    return st.builds(
        deq_problem,
        seed=_SEEDS,
        dim=_sizes("dims", dims),
        input_dim=_sizes("input_dims", input_dims),
        batch=_sizes("batch", batch),
        contraction=_contractions(contraction),
        dtype=_dtypes(dtypes),
    )
