"""L-BFGS by ``torch.optim.LBFGS``, one iteration at a time, recorded and judged."""

from __future__ import annotations

import torch

from .._iteration import IterationState, IterativeMethod
from .._options import check_in_interval, check_positive_int, options
from .._records import Status
from ._base import CountingObjective, Minimizer


@options
class LBFGS(IterativeMethod, Minimizer):
    """L-BFGS by ``torch.optim.LBFGS`` (strong-Wolfe line search by default).

    It stops as :class:`GradientDescent` and :class:`FixedPoint` do, on the size of its step:
    once ``||w_{k+1} - w_k|| <= atol + tol * ||w_{k+1}||``, or after ``max_iter`` iterations
    (defaults 100, 1e-6, 0). A quasi-Newton step approximates the distance to the minimum, so
    this asks for ``w`` accurate to about ``tol`` relative, and a warm start near the minimum
    stops at once. ``products`` counts gradient evaluations (the line search may make several
    per iteration; none is repeated at the point an iteration starts from).

    An iteration that does not move (the line search found no decrease, or the step is below
    rounding) is judged by the step it proposed, ``lr ||d||`` for the quasi-Newton direction
    ``d`` (zero at a zero gradient). Within the tolerance, it has converged; so it has where
    the decrease that step promises, ``lr |grad f . d|``, is within the rounding noise of the
    loss, taken as ``sqrt(eps) |f|`` since a loss sums many rounded terms (no line search on
    ``f`` can get closer to the minimum; the record then says converged, with that step as its
    residual: what was reached, even where it is above ``tol``). Else L-BFGS has stalled, and
    stops with status ``INACCURATE``, a failure, with that step as its residual: ``f`` is not
    smooth at ``w`` (a ReLU kink), or its values and gradients disagree (a loss that samples a
    new minibatch per call).

    >>> w, record = LBFGS(tol=1e-8).solve(lambda w: ((w - 3) ** 2).sum() + w.prod() ** 2,
    ...                                    torch.zeros(2, dtype=torch.float64))
    >>> record.converged, round(float(w[0]), 6)
    (True, 1.213412)
    """

    lr: float = 1.0
    history_size: int = 10
    line_search: str | None = "strong_wolfe"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_in_interval(self, "lr", self.lr, 0.0, float("inf"))
        check_positive_int(self, "history_size", self.history_size)
        if self.line_search not in ("strong_wolfe", None):
            raise ValueError(
                f"LBFGS: `line_search` must be 'strong_wolfe' or None, got {self.line_search!r}."
            )

    def _run(self, objective: CountingObjective, w0):
        state = _LBFGSState(objective, w0, self)
        return self._iterate(state, products=lambda: objective.evaluations)


_LINE_SEARCH_EVALUATIONS = 25  # the strong-Wolfe search's own limit in torch


class _LBFGSState(IterationState):
    """Drives ``torch.optim.LBFGS`` one iteration per step; its curvature memory persists
    between steps. The points the line search evaluated are remembered, so the evaluation
    each torch step begins with, at the point the last one accepted, is not repeated."""

    def __init__(self, objective: CountingObjective, w0: torch.Tensor, options: LBFGS):
        self.objective, self.options = objective, options
        self.w = w0.detach().clone().requires_grad_()
        self.optimizer = torch.optim.LBFGS(
            [self.w],
            lr=options.lr,
            max_iter=1,
            max_eval=_LINE_SEARCH_EVALUATIONS,  # torch's default, 5/4 of max_iter, would be 1
            tolerance_grad=0.0,
            tolerance_change=0.0,
            history_size=options.history_size,
            line_search_fn=options.line_search,
        )
        self.evaluated: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _evaluate(self, point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, grad f)`` at ``point``, from the last few points evaluated when it is one."""
        cached = [(loss, grad) for seen, loss, grad in self.evaluated if torch.equal(seen, point)]
        if cached:
            return cached[0]
        loss, grad = self.objective(point)
        self.evaluated = (self.evaluated + [(point.clone(), loss, grad)])[-4:]
        return loss, grad

    def _closure(self) -> torch.Tensor:
        loss, grad = self._evaluate(self.w.detach())
        self.w.grad = grad.clone()
        return loss

    def step(self):
        before = self.w.detach().clone()
        self.optimizer.step(self._closure)
        after = self.w.detach()
        moved, scale = torch.linalg.vector_norm(after - before), torch.linalg.vector_norm(after)
        if moved > 0:
            return moved, scale
        return self._unmoved(after, scale), scale

    def _unmoved(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The residual of an iteration that did not move: the step proposed, ``lr ||d||``, or
        0 where ``f`` cannot resolve it; above the tolerance, L-BFGS has stalled."""
        options = self.options
        loss, grad = self._evaluate(w)  # a cache hit: the torch step began there
        # the direction of the step not taken; a zero gradient makes torch stop before any
        d = self.optimizer.state[self.w]["d"] if grad.any() else grad
        proposed = options.lr * torch.linalg.vector_norm(d)
        if proposed <= options.atol + options.tol * scale:
            return proposed
        if options.lr * grad.dot(d).abs() <= torch.finfo(loss.dtype).eps ** 0.5 * loss.abs():
            # within f's rounding, no line search sees more: converged, at the residual reached
            self.stopped = Status.CONVERGED
            return proposed
        self.stopped = Status.INACCURATE  # stalled: the next step would not move either
        return proposed

    def result(self) -> torch.Tensor:
        return self.w.detach().clone()
