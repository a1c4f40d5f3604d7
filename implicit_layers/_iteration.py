"""The iteration loop every iterative solver shares: stopping rule, NaN/Inf detection, history.

A method describes one run as an :class:`IterationState`; :func:`iterate` drives it. The residual
is read back every iteration (one device synchronisation), so a NaN stops the solve where it
appears and an exact solution stops it before a division by zero.
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
    """One run of an iterative method.

    ``step`` makes one iteration and returns ``(residual, scale)`` of the iterate that ``result``
    returns after it; ``result_index`` says which entry of the history describes that iterate
    (``None``: the latest). A method that finds it cannot go on (a breakdown that is not a NaN)
    sets ``stopped`` to the status to report.
    """

    result_index: int | None = None
    stopped: Status | None = None

    @abc.abstractmethod
    def step(self) -> tuple[Number, Number]: ...

    @abc.abstractmethod
    def result(self) -> torch.Tensor: ...


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
    """Run ``state`` until ``residual <= atol + tol * scale``, a NaN/Inf, or ``max_iter`` steps.

    ``initial`` is the residual and scale before the first step, where it is known for free.
    """
    residuals: list[float] = []
    scales: list[float] = []

    def judge(pair: tuple[Number, Number]) -> Status | None:
        residual, scale = _as_float(pair[0]), _as_float(pair[1])
        residuals.append(residual)
        scales.append(scale)
        if not (math.isfinite(residual) and math.isfinite(scale)):
            return Status.NONFINITE
        if residual == 0 or residual <= atol + tol * scale:
            return Status.CONVERGED
        return None

    status = judge(initial) if initial is not None else None
    iterations = 0
    while status is None and iterations < max_iter:
        iterations += 1
        status = judge(state.step())
        if state.stopped is not None:
            status = state.stopped
    status = status or Status.MAX_ITER

    index = -1 if state.result_index is None else state.result_index
    residual, scale = residuals[index], scales[index]
    record = SolveRecord(
        method=method,
        iterations=iterations,
        products=products(),
        residual=residual,
        relative_residual=relative(residual, scale),
        tol=tol,
        atol=atol,
        status=status,
        history=tuple(relative(r, s) for r, s in zip(residuals, scales)),
    )
    return state.result(), record


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
