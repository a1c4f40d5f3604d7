"""A forward solver put to work on the backward system, as the fixed point ``x = b + (I - A) x``."""

from __future__ import annotations

import torch

from .._iteration import IterationState
from ._base import LinearSolver, scaled_start

__all__ = ["FixedPointIteration"]


class FixedPointIteration(LinearSolver):
    """Solves ``A x = b`` by running an iterative forward solver on ``x = b + (I - A) x``.

    For a layer's backward ``A = (I - J)^T`` this is ``x = J^T x + b``, the adjoint fixed point:
    :class:`FixedPoint` makes it the Neumann series and :class:`Anderson` or :class:`Broyden`
    accelerate it, as deep equilibrium models do. It converges when the spectral radius of ``J``
    is below 1 (or the accelerator copes). The first iterate, ``x = b``, is taken for free; each
    evaluation is one product. The forward solver's ``max_iter``, ``tol`` and ``atol`` apply to
    ``||b - A x|| <= atol + tol ||b||``. On an operator with ``rows`` (a batch of samples) each
    row is judged and recorded on its own.

    Made for you when a forward solver is passed as ``backward``.
    """

    complex_linear = False  # the residual of each iterate is measured, not inferred

    def __init__(self, solver):
        self.solver = solver

    @property
    def method(self) -> str:
        return self.solver.method

    def __repr__(self) -> str:
        return repr(self.solver)

    def _run(self, operator, b, x0, unit):
        rows = operator.rows or 1  # one vector runs as one row
        b_rows = b.view(rows, -1)

        def step(x: torch.Tensor) -> torch.Tensor:
            return b_rows + x - operator.mv(x.reshape(-1)).view(rows, -1)

        if x0 is None:
            start = b_rows.clone()
        else:  # the best multiple of x0, as for every linear solver: one product
            start = scaled_start(x0, operator.mv(x0), b)[0].view(rows, -1)
        scale = torch.linalg.vector_norm(b_rows, dim=1)
        state = _JudgedAgainst(self.solver._start(step, start), scale)
        x, record = self.solver._iterate(
            state, products=lambda: operator.products, unit=unit, floor=False
        )
        return x.reshape(-1), record if operator.rows else record.without_rows()


class _JudgedAgainst(IterationState):
    """A forward iteration whose residuals are judged against ``||b||`` rather than ``||x||``."""

    def __init__(self, inner: IterationState, scale: torch.Tensor):
        self.inner, self.scale = inner, scale
        self.returns_best, self.refines = inner.returns_best, inner.refines

    @property
    def stopped(self):
        return self.inner.stopped

    def step(self):
        residual, _ = self.inner.step()
        return residual, self.scale

    def freeze(self, rows):
        self.inner.freeze(rows)

    def settle(self, rows):
        self.inner.settle(rows)

    def result(self):
        return self.inner.result()
