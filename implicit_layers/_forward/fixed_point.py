"""Plain and damped fixed-point iteration."""

from __future__ import annotations

from .._options import check_in_interval, options
from ._base import IterativeForwardSolver, RowState, row_norms, step_towards


@options
class FixedPoint(IterativeForwardSolver):
    """Picard iteration ``w <- w + damping (f(w) - w)``; ``damping = 1`` is ``w <- f(w)``.

    Converges linearly, by the contraction factor of ``f`` per step, whenever ``f`` is a
    contraction; damping below 1 can rescue a map whose Jacobian has eigenvalues beyond ``-1``.
    One evaluation of ``f`` per iteration. It returns the next iterate after the last one
    judged (``final_step=True``, see :class:`IterativeForwardSolver`), or that one itself.

    >>> w, record = FixedPoint(tol=1e-8).solve(lambda w: 0.5 * w + 1, torch.zeros(1))
    >>> round(float(w), 6), record.converged
    (2.0, True)

    Rows (a batch) are judged one by one; the first row below converges after 7 steps and,
    refined while the second runs (``refine=True``), ends with a residual of 0 in float32:

    >>> a = torch.tensor([[0.1], [0.5]])
    >>> w, record = FixedPoint(tol=1e-6).solve(lambda w: a * w + 1, torch.zeros(2, 1))
    >>> record.sample_iterations, record.sample_residuals[0]
    ((7, 20), 0.0)
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_in_interval(self, "damping", self.damping, 0.0, 1.0)

    def _start(self, f, w0):
        return _FixedPointState(f, w0, self)


class _FixedPointState(RowState):
    def __init__(self, f, w0, solver):
        super().__init__(w0, solver)
        self.f, self.damping = f, solver.damping

    def step(self):
        if self.proposal is not None:
            self.w = self.proposal
        w = self.w
        fw = self.f(w)
        residual = row_norms(fw - w)
        following = step_towards(w, fw, self.damping)
        self.offer(w, following, residual)
        self.proposal = self.keep(following)
        return residual, row_norms(w)
