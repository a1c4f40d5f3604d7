"""Gradient descent with a fixed step."""

from __future__ import annotations

import torch

from .._iteration import IterationState, IterativeMethod
from .._options import check_in_interval, options
from ._base import CountingObjective, Minimizer


@options
class GradientDescent(IterativeMethod, Minimizer):
    """Gradient descent ``w <- w - lr grad f(w)``.

    It is :class:`FixedPoint` on the gradient step ``w - lr grad f(w)``, and stops as it does:
    once the step is small, ``lr ||grad f(w)|| <= atol + tol * ||w||``, or after ``max_iter``
    gradient evaluations (defaults 100, 1e-6, 0, as for every iterative method). The rule is
    relative to ``w``, not to the first gradient, so a warm start near the minimum stops at
    once. Returns the last point whose gradient was measured. Converges for an ``L``-smooth
    strongly convex ``f`` when ``0 < lr < 2 / L``.

    >>> w, record = GradientDescent(lr=0.5, tol=1e-8).solve(lambda w: ((w - 3) ** 2).sum(),
    ...                                                      torch.zeros(2))
    >>> w, record.converged
    (tensor([3., 3.]), True)
    """

    lr: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_in_interval(self, "lr", self.lr, 0.0, float("inf"))

    def _run(self, objective: CountingObjective, w0):
        return self._iterate(
            _DescentState(objective, w0, self.lr), products=lambda: objective.evaluations
        )


class _DescentState(IterationState):
    def __init__(self, objective, w0, lr):
        self.objective, self.w, self.lr = objective, w0, lr
        self.proposal = None

    def step(self):
        if self.proposal is not None:
            self.w = self.proposal
        _, grad = self.objective(self.w)
        step = self.lr * grad
        self.proposal = self.w - step
        return torch.linalg.vector_norm(step), torch.linalg.vector_norm(self.w)

    def result(self) -> torch.Tensor:
        return self.w
