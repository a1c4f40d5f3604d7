"""Conjugate gradients for symmetric positive definite systems."""

from __future__ import annotations

import torch

from .._iteration import IterationState
from .._options import options
from ._base import IterativeLinearSolver


@options
class CG(IterativeLinearSolver):
    """Conjugate gradients (Hestenes and Stiefel) for ``A x = b`` with ``A`` symmetric positive
    definite.

    In a layer's backward ``A = (I - J)^T``; that is SPD when ``Phi = w - a grad f(w)`` is a
    gradient step with ``a > 0`` on a strongly convex ``f`` (then ``I - J = a H``).
    For a general map ``I - J`` is not symmetric and CG's answer is wrong: use :class:`GMRES`.

    One product per iteration (none for the initial residual when ``x0`` is ``None``); the
    direction is updated with the new residual, ``p <- r_new + (r_new.r_new / r.r) p``, so the
    error falls as in the textbook, ``2 ((sqrt(k) - 1)/(sqrt(k) + 1))^i`` in the A-norm.

    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]]); b = torch.tensor([1.0, 2.0])
    >>> x, record = CG(tol=1e-6).solve(A, b)
    >>> torch.allclose(A @ x, b, atol=1e-5), record.products
    (True, 2)
    """

    def _start(self, operator, x, residual, b_norm):
        return CGState(operator, x, residual, b_norm)


class CGState(IterationState):
    """CG's recurrences; :meth:`products` is the one place that touches the operator."""

    def __init__(self, operator, x, residual, b_norm):
        self.operator, self.x, self.r, self.b_norm = operator, x, residual, b_norm
        self.p = residual.clone()
        self.rr = residual.dot(residual)

    def products(self, p: torch.Tensor):
        """``(A p, direction of the x update, curvature p.A p)``."""
        q = self.operator.mv(p)
        return q, p, p.dot(q)

    def step(self):
        q, direction, curvature = self.products(self.p)
        alpha = self.rr / curvature
        self.x.addcmul_(direction, alpha)
        self.r.addcmul_(q, alpha, value=-1)
        rr_new = self.r.dot(self.r)
        self.p.mul_(rr_new / self.rr).add_(self.r)
        self.rr = rr_new
        return rr_new.sqrt(), self.b_norm

    def result(self) -> torch.Tensor:
        return self.x
