"""The iteration loop every iterative solver shares: stopping rule, NaN/Inf detection, history.

A method describes one run as an :class:`IterationState`; :func:`iterate` drives it. The residual
is read back every iteration (one device synchronisation), so a NaN stops the solve where it
appears and an exact solution stops it before a division by zero. A batch of independent rows
(the samples of a deep equilibrium model) is judged row by row: each row stops on its own.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch

from ._options import check_nonnegative, check_positive_int, options
from ._records import SolveRecord, Status, relative

Number = float | torch.Tensor


class IterationState(abc.ABC):
    """One run of an iterative method, on one vector or on a batch of independent rows.

    ``step`` makes one iteration and returns ``(residual, scale)``: numbers or 0-d tensors for
    one vector, 1-D tensors with one entry per row for a batch. ``result`` returns the current
    iterate, or with ``returns_best`` the one of smallest residual seen (per row). The loop calls
    ``freeze(rows)`` with a boolean mask of the rows that are done (converged, or NaN/Inf): from
    then on the state must leave those rows at their current iterate and return it. A method
    that finds it cannot go on (a breakdown that is not a NaN) sets ``stopped`` to the status
    to report.
    """

    returns_best: bool = False
    stopped: Status | None = None

    @abc.abstractmethod
    def step(self) -> tuple[Number, Number]: ...

    @abc.abstractmethod
    def result(self) -> torch.Tensor: ...

    def freeze(self, rows: torch.Tensor) -> None:  # noqa: B027 (a default, not abstract)
        """Keep ``rows`` where they are (a single-vector method stops anyway: nothing to do)."""


def _read(pair: tuple[Number, Number]) -> tuple[list[float], list[float]]:
    """Residuals and scales as Python lists, one entry per row, in one synchronisation."""
    residual, scale = pair
    if isinstance(residual, torch.Tensor) and isinstance(scale, torch.Tensor):
        rows = torch.stack((residual.reshape(-1), scale.reshape(-1).to(residual.dtype))).tolist()
        return rows[0], rows[1]
    if isinstance(residual, torch.Tensor):
        return residual.reshape(-1).tolist(), [_as_float(scale)] * residual.numel()
    return [float(residual)], [_as_float(scale)]


def _as_float(value: Number) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def iterate(
    state: IterationState,
    *,
    method: str,
    max_iter: int,
    tol: float,
    atol: float,
    products: Callable[[], int],
    initial: tuple[Number, Number] | None = None,
) -> tuple[torch.Tensor, SolveRecord]:
    """Run ``state`` until every row has ``residual <= atol + tol * scale`` (or a NaN/Inf), or
    ``max_iter`` steps; a row that is done is frozen while the others go on.

    ``initial`` is the residual and scale before the first step, where it is known for free.
    The record describes the worst row; with more than one row it also holds each row's
    iterations, relative residual and convergence.
    """
    history: list[list[float]] = []  # per iteration: each row's relative residual
    final: list[tuple[float, float]] = []  # per row: (residual, scale) of the iterate returned
    counts: list[int] = []  # per row: iterations while it was not done
    status_rows: list[Status | None] = []

    def judge(pair: tuple[Number, Number], iteration: int) -> None:
        residuals, scales = _read(pair)
        if not status_rows:
            status_rows.extend([None] * len(residuals))
            final.extend([(math.inf, 1.0)] * len(residuals))
            counts.extend([0] * len(residuals))
        entry, newly_done = [], []
        for row, (residual, scale) in enumerate(zip(residuals, scales)):
            if status_rows[row] is not None:  # frozen: its iterate no longer changes
                entry.append(relative(*final[row]))
                continue
            counts[row] = iteration
            entry.append(relative(residual, scale))
            if not (math.isfinite(residual) and math.isfinite(scale)):
                status_rows[row] = Status.NONFINITE
            elif residual == 0 or residual <= atol + tol * scale:
                status_rows[row] = Status.CONVERGED
            done = status_rows[row] is not None
            # the state keeps the smallest residual when it returns_best (NaN is never smaller)
            if done or not state.returns_best or residual < final[row][0]:
                final[row] = (residual, scale)
            if done:
                newly_done.append(row)
        history.append(entry)
        if newly_done:
            mask = torch.zeros(len(status_rows), dtype=torch.bool)
            mask[newly_done] = True
            state.freeze(mask)

    iterations = 0
    if initial is not None:
        judge(initial, 0)
    while (not status_rows or None in status_rows) and iterations < max_iter:
        iterations += 1
        judge(state.step(), iterations)
        if state.stopped is not None:
            break

    if state.stopped is not None:
        status = state.stopped
    elif Status.NONFINITE in status_rows:
        status = Status.NONFINITE
    elif None in status_rows:
        status = Status.MAX_ITER
    else:
        status = Status.CONVERGED
    ratios = [relative(r, s) for r, s in final]
    worst = max(range(len(final)), key=lambda row: _order(ratios[row]))
    residual, scale = final[worst]
    batched = len(final) > 1
    record = SolveRecord(
        method=method,
        iterations=iterations,
        products=products(),
        residual=residual,
        relative_residual=ratios[worst],
        tol=tol,
        atol=atol,
        status=status,
        history=tuple(max(entry, key=_order) for entry in history),
        sample_iterations=tuple(counts) if batched else (),
        sample_residuals=tuple(ratios) if batched else (),
        sample_converged=tuple(s is Status.CONVERGED for s in status_rows) if batched else (),
    )
    return state.result(), record


def _order(value: float) -> float:
    """NaN sorts above everything, so the worst row is the one that failed."""
    return math.inf if math.isnan(value) else value


DEFAULT_MAX_ITER = 100
DEFAULT_TOL = 1e-6


@options
class IterativeMethod:
    """The options every iterative solver shares, forward and backward alike.

    It stops once ``residual <= atol + tol * scale`` or after ``max_iter`` iterations; the
    scale is ``||w||`` for a forward solve and ``||b||`` for a linear solve. One set of defaults
    (``max_iter=100, tol=1e-6, atol=0``) serves every method.
    """

    max_iter: int = DEFAULT_MAX_ITER
    tol: float = DEFAULT_TOL
    atol: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int(self, "max_iter", self.max_iter)
        check_nonnegative(self, "tol", self.tol)
        check_nonnegative(self, "atol", self.atol)

    def _iterate(
        self,
        state: IterationState,
        products: Callable[[], int],
        initial: tuple[Number, Number] | None = None,
        unit: float = 1.0,
    ) -> tuple[torch.Tensor, SolveRecord]:
        """:func:`iterate` with these options; ``atol`` is divided by ``unit``, the factor the
        problem was scaled by."""
        return iterate(
            state,
            method=type(self).__name__,
            max_iter=self.max_iter,
            tol=self.tol,
            atol=self.atol / unit,
            products=products,
            initial=initial,
        )
