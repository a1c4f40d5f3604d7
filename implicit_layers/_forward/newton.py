"""Newton-Krylov iteration: each step solves the linearised equation with a linear solver."""

from __future__ import annotations

import torch

from .._graph import ForwardProducts
from .._linear import GMRES, LinearSolver
from .._operator import FunctionOperator
from .._options import options
from ._base import IterativeForwardSolver, RowState, row_norms


@options
class Newton(IterativeForwardSolver):
    """Newton's method for ``g(w) = f(w) - w = 0`` (for a root layer ``g = -F``), with the
    Newton system solved by ``linear_solver`` from Jacobian-vector products.

    Each iteration evaluates ``f`` once with a graph, judges ``||g(w)||``, and unless done
    solves ``(I - J) dw = g`` for ``J = df/dw`` at ``w`` (``-g_w dw = g``) and moves to
    ``w + dw``. The products ``(I - J) v`` come by reverse mode through that one graph (two
    vector-Jacobian products each, no forward-mode AD); the record's ``products`` counts the
    evaluations of ``f`` and these products. Near a root with a non-singular Jacobian the
    convergence is quadratic (linear at the rate of the inner tolerance when the inner solve
    is inexact), whatever the Jacobian's spectrum: unlike the fixed-point methods it needs no
    contraction, so it solves saddle-point systems such as KKT conditions. It is a local
    method (no line search): start it near the root. The default inner solver is
    :class:`GMRES`, valid for any non-singular Jacobian. It returns the iterate it judged
    (``final_step`` must stay False: there is no free step past it).

    >>> F = lambda w: torch.stack((w[0] ** 2 + w[1] - 3, w[0] - w[1] + 1))
    >>> w0 = torch.tensor([3.0, 0.0], dtype=torch.float64)
    >>> w, record = Newton(tol=1e-10).solve(lambda w: w - F(w), w0)
    >>> [round(v, 6) for v in w.tolist()], record.iterations
    ([1.0, 2.0], 6)
    >>> [f"{r:.0e}" for r in record.history[-3:]]  # the error squares at every step
    ['3e-03', '2e-06', '7e-13']
    """

    final_step: bool = False
    linear_solver: LinearSolver = GMRES(tol=1e-8)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.final_step:
            raise ValueError(
                "Newton: `final_step` must be False; its next step is a linear solve, not free."
            )
        if not isinstance(self.linear_solver, LinearSolver):
            raise TypeError(
                "Newton: `linear_solver` must be a linear solver such as GMRES(), got "
                f"{self.linear_solver!r:.60}."
            )

    def _start(self, f, w0):
        return _NewtonState(f, w0, self)


class _NewtonState(RowState):
    def __init__(self, f, w0, solver):
        super().__init__(w0, solver)
        self.f, self.linear_solver = f, solver.linear_solver
        self.linearised: tuple[ForwardProducts, torch.Tensor] | None = None

    def step(self):
        if self.linearised is not None:
            self.w = self.keep(self.w + self._newton_step(*self.linearised))
        w = self.w
        with torch.enable_grad():
            w_var = w.detach().requires_grad_()
            fw = self.f(w_var)
        g = (fw - w_var).detach()
        residual = row_norms(g)
        self.offer(w, w, residual)
        self.linearised = (ForwardProducts([fw], [w_var]), g)
        return residual, row_norms(w)

    def _newton_step(self, products: ForwardProducts, g: torch.Tensor) -> torch.Tensor:
        """``dw`` with ``(I - J) dw = g``; a frozen row's right-hand side is zero, so is its
        ``dw`` (the system is block-diagonal over the rows)."""
        shape = g.shape
        if self.frozen is not None:
            g = torch.where(self.frozen[:, None], 0.0, g)

        def minus_g_w(v: torch.Tensor) -> torch.Tensor:  # (I - J) v
            (jv,) = products([v.view(shape)])
            return v if jv is None else v - jv.reshape(-1)

        operator = FunctionOperator(minus_g_w, size=g.numel(), dtype=g.dtype, device=g.device)
        operator.rows = shape[0]
        dw, record = self.linear_solver.solve(operator, g.reshape(-1))
        self.jacobian_products += record.products
        return dw.view(shape)
