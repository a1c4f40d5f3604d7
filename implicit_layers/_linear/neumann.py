"""The Neumann series, as Richardson iteration."""

from __future__ import annotations

import torch

from .._iteration import IterationState
from .._options import check_in_interval, options
from ._base import IterativeLinearSolver


@options
class Neumann(IterativeLinearSolver):
    """Richardson iteration ``x <- x + step (b - A x)``: the truncated Neumann series.

    In a layer's backward, ``A = I - J^T`` and ``step = 1`` give ``x <- J^T x + b``, so from
    ``x0 = 0`` the k-th iterate is ``sum_{i<k} (J^T)^i b``. It converges when the spectral radius
    of ``I - step A`` is below 1 (for ``step = 1``: of ``J``), with error shrinking by that radius
    per iteration. ``step`` plays the role of the inner learning rate in hypergrad's and
    Betty's Neumann methods.

    One product per iteration. The residual follows the recurrence
    ``r <- r - step A r`` (the product), so every iterate's residual is known exactly and no
    product is spent on ``A @ 0``.

    >>> J_T = torch.tensor([[0.5, 0.0], [0.0, 0.5]]); b = torch.tensor([1.0, 1.0])
    >>> x, record = Neumann(max_iter=3, tol=0.0).solve(torch.eye(2) - J_T, b)
    >>> x, record.products  # b + J^T b + (J^T)^2 b
    (tensor([1.7500, 1.7500]), 3)
    """

    step: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_in_interval(self, "step", self.step, 0.0, float("inf"))

    def _start(self, operator, x, residual, b_norm):
        return _NeumannState(operator, x, residual, b_norm, self.step)


class _NeumannState(IterationState):
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
        self.r = self.r - self.step_size * self.operator.mv(self.r)
        return torch.linalg.vector_norm(self.r), self.b_norm

    def result(self) -> torch.Tensor:
        return self.x
