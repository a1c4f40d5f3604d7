"""Stabilised biconjugate gradients for general non-singular systems."""

from __future__ import annotations

import torch

from .._options import options
from ._base import IterativeLinearSolver, LinearSolverState


@options
class BiCGSTAB(IterativeLinearSolver):
    """BiCGSTAB (van der Vorst, 1992) for a general non-singular ``A``.

    Two products per iteration and short recurrences (constant memory), against GMRES's one
    product and growing basis. Its residual is not monotone and it can break down (a NaN in the
    record); :class:`GMRES` is the robust default.

    >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]]); b = torch.tensor([1.0, 1.0])
    >>> x, record = BiCGSTAB(tol=1e-6).solve(A, b)
    >>> torch.allclose(A @ x, b, atol=1e-5)
    True
    """

    def _start(self, operator, x, residual, b_norm):
        return _BiCGSTABState(operator, x, residual, b_norm)


class _BiCGSTABState(LinearSolverState):
    def __init__(self, operator, x, residual, b_norm):
        self.operator, self.x, self.r, self.b_norm = operator, x, residual, b_norm
        self.shadow = residual.clone()
        self.p = torch.zeros_like(residual)
        self.v = torch.zeros_like(residual)
        one = residual.new_ones(())
        self.rho, self.alpha, self.omega = one, one, one

    def step(self):
        rho = torch.vdot(self.shadow, self.r)
        beta = (rho / self.rho) * (self.alpha / self.omega)
        self.p = self.r + beta * (self.p - self.omega * self.v)
        self.v = self.operator.mv(self.p)
        self.alpha = rho / torch.vdot(self.shadow, self.v)
        s = self.r - self.alpha * self.v
        t = self.operator.mv(s)
        tt = torch.vdot(t, t).real
        # s = 0 means the half step solved the system: omega = 0 keeps r = s = 0 finite.
        self.omega = torch.where(tt > 0, torch.vdot(t, s) / tt, torch.zeros_like(tt))
        self.x.addcmul_(self.p, self.alpha).addcmul_(s, self.omega)
        self.r = s - self.omega * t
        self.rho = rho
        return torch.linalg.vector_norm(self.r), self.b_norm

    def result(self) -> torch.Tensor:
        return self.x

    def residual_vector(self) -> torch.Tensor:
        return self.r
