"""Conjugate gradients on the normal equations, for any non-singular system."""

from __future__ import annotations

from .._options import options
from ._base import IterativeLinearSolver
from .cg import CGState, inner


@options
class NormalCG(IterativeLinearSolver):
    """CG on the normal equations ``A A^H y = b``, ``x = A^H y`` (CGNE, Craig's method).

    Valid for any non-singular ``A``, but it converges as CG with the *squared* condition number
    of ``A``, so it is slow on ill-conditioned systems: it is the default of torchopt and jaxopt
    and exists here for comparison and for the rare system where GMRES stalls. Two products per
    iteration, one with ``A^T`` and one with ``A``; none at the start. In a layer's backward the
    ``A^T v = (I - J) v`` product is a Jacobian-vector product by forward-mode AD, so Phi must
    support forward-mode AD. The residual tracked is the true system's ``b - A x``.

    >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]]); b = torch.tensor([1.0, 1.0])
    >>> x, record = NormalCG(max_iter=2, tol=0.0).solve(A, b)
    >>> torch.allclose(A @ x, b, atol=1e-5), record.products
    (True, 4)
    """

    def _start(self, operator, x, residual, b_norm):
        return _NormalCGState(operator, x, residual, b_norm)


class _NormalCGState(CGState):
    """CG on ``M = A A^T`` in y, with ``x = A^T y`` updated along ``s = A^T p``."""

    def products(self, p):
        s = self.operator.rmv(p)
        return self.operator.mv(s), s, inner(s, s)
