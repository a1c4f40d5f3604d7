"""The Neumann series, as Richardson iteration."""

from __future__ import annotations

import torch

from .._options import check_in_interval, options
from ._base import IterativeLinearSolver, LinearSolverState


@options
class Neumann(IterativeLinearSolver):
    """The truncated Neumann series ``x = step sum_{i=0}^{k} (I - step A)^i b`` from ``k``
    products: Richardson iteration ``x <- x + step (b - A x)``, whose first term is free. From
    an initial guess ``x0`` it is ``x0`` plus the same series on ``b - A x0`` (one more product).

    In a layer's backward, ``A = I - J^T`` and ``step = 1`` give ``x = sum_{i=0}^{k} (J^T)^i b``
    after ``k`` products, as in hypergrad's and Betty's Neumann methods (where ``step`` is the
    inner learning rate). It converges when the spectral radius of ``I - step A`` is below 1
    (for ``step = 1``: of ``J``), with error shrinking by that radius per product.

    One product per iteration, none for the first term. The product of iteration ``i`` makes
    the term ``t_i = (I - step A)^i b`` and is also the residual of the sum up to ``t_{i-1}``,
    so the residual recorded and judged, ``||t_k||``, is that of the sum before its last term:
    adding ``step t_k`` costs nothing and multiplies the residual by ``I - step A``, so where
    ``||I - step A|| <= 1`` (symmetric ``A`` with eigenvalues in ``[0, 2 / step]``, or a
    contraction ``J``) it bounds the residual of the ``x`` returned.

    >>> J_T = torch.tensor([[0.5, 0.0], [0.0, 0.5]]); b = torch.tensor([1.0, 1.0])
    >>> x, record = Neumann(max_iter=3, tol=0.0).solve(torch.eye(2) - J_T, b)
    >>> x, record.products  # b + J^T b + (J^T)^2 b + (J^T)^3 b
    (tensor([1.8750, 1.8750]), 3)
    """

    step: float = 1.0
    complex_linear = False  # it only adds and applies A: valid for a real-linear A too

    def __post_init__(self) -> None:
        super().__post_init__()
        check_in_interval(self, "step", self.step, 0.0, float("inf"))

    def _start(self, operator, x, residual, b_norm):
        return _NeumannState(operator, x, residual, b_norm, self.step)


class _NeumannState(LinearSolverState):
    def __init__(self, operator, x, residual, b_norm, step):
        self.operator, self.x, self.r, self.b_norm, self.step_size = (
            operator,
            x,
            residual,
            b_norm,
            step,
        )

    def step(self):
        self.x.add_(self.r, alpha=self.step_size)
        self.r = torch.add(self.r, self.operator.mv(self.r), alpha=-self.step_size)
        return torch.linalg.vector_norm(self.r), self.b_norm

    def result(self) -> torch.Tensor:
        # the last term, free: r = (I - step A)^k r_0
        return torch.add(self.x, self.r, alpha=self.step_size)

    def residual_vector(self) -> torch.Tensor:
        """The residual the record measures: that of the sum before its last term."""
        return self.r
