"""The iteration loop every iterative solver shares: stopping rule, NaN/Inf detection, history.

A method describes one run as an :class:`IterationState`; :func:`iterate` drives it. The residual
is read back every iteration (one device synchronisation), so a NaN stops the solve where it
appears and an exact solution stops it before a division by zero. A batch of independent rows
(the samples of a deep equilibrium model) is judged row by row: each row stops on its own. Per
iteration only the stopping test runs (a comparison per running row, on the values read back);
the rest of the record (each row's returned residual, the history) is computed once, at the end.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import torch

from ._options import check_nonnegative, check_positive_int, options
from ._records import SolveRecord, Status, relative

Number = float | torch.Tensor


class IterationState(abc.ABC):
    """One run of an iterative method, on one vector or on a batch of independent rows.

    ``step`` makes one iteration and returns ``(residual, scale)``: numbers or 0-d tensors for
    one vector, 1-D tensors with one entry per row for a batch (new tensors, which the loop
    keeps). ``result`` returns the current iterate, or with ``returns_best`` the one of smallest
    residual seen (per row). The loop calls ``freeze(rows)`` with a boolean mask of the rows
    that failed (NaN/Inf), and ``settle(rows)`` with the rows that converged: from then on the
    state must leave frozen rows at their current iterate and return it (or the point it makes
    of it, such as a forward solver's final step). Settled rows are frozen too, unless the
    state ``refines``: it then steps them on with the others and returns, per row, the iterate
    of smallest residual from the one that converged on. A method that finds it cannot go on
    (a breakdown that is not a NaN) sets ``stopped`` to the status to report.
    """

    returns_best: bool = False
    refines: bool = False
    stopped: Status | None = None

    @abc.abstractmethod
    def step(self) -> tuple[Number, Number]: ...

    @abc.abstractmethod
    def result(self) -> torch.Tensor: ...

    def freeze(self, rows: torch.Tensor) -> None:  # noqa: B027 (a default, not abstract)
        """Keep ``rows`` where they are (a single-vector method stops anyway: nothing to do)."""

    def settle(self, rows: torch.Tensor) -> None:
        """``rows`` converged: frozen, unless the state ``refines``."""
        self.freeze(rows)


def read_back_is_free(device: torch.device) -> bool:
    """On the CPU, reading a scalar back costs no synchronisation."""
    return device.type == "cpu"


def _as_float(value: Number) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _stop_status(residual: float, scale: float) -> Status:
    """Why a row that stopped stopped: it converged, or a NaN/Inf appeared."""
    finite = math.isfinite(residual) and math.isfinite(scale)
    return Status.CONVERGED if finite else Status.NONFINITE


def _relative(residual: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`relative`, entry by entry."""
    zero_scale = torch.where(residual == 0, 0.0, math.inf)
    return torch.where(scale > 0, residual / scale, zero_scale)


def precision_floor(first: float, eps: float | None, tol: float) -> float:
    """The residual below which iterating gains nothing: ``eps`` times the first residual.

    Where the solution is at (or next to) zero, ``tol * ||w||`` vanishes with it and the
    relative rule alone never stops; once the residual has fallen by the dtype's whole precision
    from where it started, the iterate is as exact as the dtype can say relative to the
    problem's own size. With ``tol = 0`` (run the whole budget) there is no floor, nor for a
    linear solve (``floor=False``): its scale ``||b||`` never vanishes, and a poor warm start
    would make the first residual a false measure of the problem."""
    if tol == 0 or eps is None or not math.isfinite(first):
        return 0.0
    return eps * first


class _Vector:
    """The judge of one vector: Python floats, one read-back per iteration."""

    per_row = False

    def __init__(self, state: IterationState, tol: float, atol: float, floor: bool):
        self.state, self.tol, self.atol, self.uses_floor = state, tol, atol, floor
        self.floor: float | None = None  # eps times the first residual (see precision_floor)
        self.final = (math.inf, 1.0)  # (residual, scale) of the iterate returned
        self.history: list[float] = []
        self.status: Status | None = None

    def __call__(self, pair: tuple[Number, Number], iteration: int) -> bool:
        """Judge one iteration's ``(residual, scale)``; True once the vector is done."""
        residual, scale = pair
        eps = torch.finfo(residual.dtype).eps if isinstance(residual, torch.Tensor) else None
        if isinstance(residual, torch.Tensor) and isinstance(scale, torch.Tensor):
            residual, scale = torch.stack((residual, scale.to(residual.dtype))).tolist()
        else:
            residual, scale = _as_float(residual), _as_float(scale)
        if self.floor is None:
            self.floor = precision_floor(residual, eps, self.tol) if self.uses_floor else 0.0
        self.history.append(relative(residual, scale))
        # not (threshold < residual < inf): converged, or a NaN/Inf in either
        threshold = max(self.atol + self.tol * scale, self.floor)
        done = not threshold < residual < math.inf
        # the state keeps the smallest residual when it returns_best (NaN is never smaller)
        if done or not self.state.returns_best or residual < self.final[0]:
            self.final = (residual, scale)
        if done:
            self.status = _stop_status(residual, scale)
            self.state.freeze(torch.ones(1, dtype=torch.bool))
        return done

    def outcome(self) -> tuple[list[tuple[float, float]], list[float], list[int], list]:
        """Per row: ``(residual, scale)`` returned, iterations, status; and the history."""
        return [self.final], self.history, [], [self.status]


class _Rows:
    """The judge of a batch of independent rows (1-D residuals and scales, one entry a row).

    Each iteration reads the residuals and scales back (one synchronisation) and compares each
    running row in Python; the rows that stop are settled (converged) or frozen (NaN/Inf). The
    residual tensors are kept, and the record's bookkeeping (each row's returned residual, the
    worst row's history) is done on them once, at the end.
    """

    per_row = True

    def __init__(
        self, state: IterationState, tol: float, atol: float, first: int, rows: int, floor: bool
    ):
        self.state, self.tol, self.atol, self.first = state, tol, atol, first
        self.uses_floor = floor
        self.residuals: list[torch.Tensor] = []  # per iteration judged, from ``first`` on
        self.scales: list[torch.Tensor] = []
        self.running = list(range(rows))
        self.counts = [first] * rows  # per row: the iteration it stopped at
        self.statuses: list[Status | None] = [None] * rows
        self.floors: list[float] | None = None  # eps times each row's first residual

    def __call__(self, pair: tuple[torch.Tensor, torch.Tensor], iteration: int) -> bool:
        """Judge one iteration's residuals and scales; True once every row is done."""
        residual, scale = pair
        self.residuals.append(residual)
        self.scales.append(scale)
        residuals, scales = torch.stack((residual, scale)).tolist()
        tol, atol = self.tol, self.atol
        if self.floors is None:
            eps = torch.finfo(residual.dtype).eps
            floor = self.uses_floor
            self.floors = [precision_floor(r, eps, tol) if floor else 0.0 for r in residuals]
        floors = self.floors
        done = [
            r
            for r in self.running
            if not max(atol + tol * scales[r], floors[r]) < residuals[r] < math.inf
        ]
        if done:
            for row in done:
                self.counts[row] = iteration
                self.statuses[row] = _stop_status(residuals[row], scales[row])
            self.running = [row for row in self.running if self.statuses[row] is None]
            failed = [row for row in done if self.statuses[row] is Status.NONFINITE]
            converged = [row for row in done if self.statuses[row] is Status.CONVERGED]
            for rows, stop in ((converged, self.state.settle), (failed, self.state.freeze)):
                if rows:
                    mask = torch.zeros(len(self.statuses), dtype=torch.bool)
                    mask[rows] = True
                    stop(mask)
        return not self.running

    def outcome(self) -> tuple[list[tuple[float, float]], list[float], list[int], list]:
        """Per row: ``(residual, scale)`` returned, iterations, status; and the history."""
        last = self.first + len(self.residuals) - 1
        for row in self.running:  # judged up to the last iteration
            self.counts[row] = last
        RS = torch.stack(self.residuals + self.scales).double().view(2, len(self.residuals), -1)
        ratios = _relative(*RS)
        counts = torch.tensor(self.counts, device=RS.device)
        index = counts - self.first  # the iterate returned: the one a row stopped at, or last
        steps = torch.arange(len(self.residuals), device=RS.device)[:, None]
        # a row returns its smallest residual from ``since`` on where the state tracks it: a
        # converged row it refines from where it converged, a row still running (max_iter)
        # from the start if it returns_best; NaN is never smallest
        converged = torch.tensor([s is Status.CONVERGED for s in self.statuses], device=RS.device)
        running = torch.tensor([s is None for s in self.statuses], device=RS.device)
        tracked = converged & self.state.refines | running & self.state.returns_best
        since = torch.where(converged, index, 0)
        candidates = torch.where((steps >= since) & ~RS[0].isnan(), RS[0], math.inf)
        index = torch.where(tracked, candidates.argmin(0), index)
        final = RS.gather(1, index.expand(2, 1, -1))[:, 0].tolist()
        judged = torch.arange(self.first, last + 1, device=RS.device)[:, None] <= counts
        # each iteration: a running row's relative residual, a stopped row's returned one
        entries = torch.where(judged, ratios, ratios.gather(0, index[None]))
        worst = torch.where(entries.isnan(), math.inf, entries).argmax(1, keepdim=True)
        history = entries.gather(1, worst)[:, 0].tolist()
        return list(zip(*final)), history, self.counts, self.statuses


def iterate(
    state: IterationState,
    *,
    method: str,
    max_iter: int,
    tol: float,
    atol: float,
    products: Callable[[], int],
    initial: tuple[Number, Number] | None = None,
    floor: bool = True,
) -> tuple[torch.Tensor, SolveRecord]:
    """Run ``state`` until every row has ``residual <= atol + tol * scale`` (or a NaN/Inf), or
    ``max_iter`` steps; a row that is done is frozen while the others go on.

    ``initial`` is the residual and scale before the first step, where it is known for free.
    The record describes the worst row; on rows (1-D residuals, even a single row) it also
    holds each row's iterations, relative residual and convergence.
    """
    iterations, pair = (0, initial) if initial is not None else (1, state.step())
    residual = pair[0]
    if isinstance(residual, torch.Tensor) and residual.ndim == 1:
        judge: Any = _Rows(state, tol, atol, iterations, len(residual), floor)
    else:
        judge = _Vector(state, tol, atol, floor)
    while not judge(pair, iterations) and state.stopped is None and iterations < max_iter:
        iterations += 1
        pair = state.step()

    final, history, counts, statuses = judge.outcome()
    if state.stopped is not None:
        status = state.stopped
    elif Status.NONFINITE in statuses:
        status = Status.NONFINITE
    elif None in statuses:
        status = Status.MAX_ITER
    else:
        status = Status.CONVERGED
    ratios = [relative(r, s) for r, s in final]
    worst = max(range(len(final)), key=lambda row: _order(ratios[row]))
    residual, scale = final[worst]
    per_row = judge.per_row
    record = SolveRecord(
        method=method,
        iterations=iterations,
        products=products(),
        residual=residual,
        relative_residual=ratios[worst],
        tol=tol,
        atol=atol,
        status=status,
        history=tuple(history),
        sample_iterations=tuple(counts) if per_row else (),
        sample_residuals=tuple(ratios) if per_row else (),
        sample_converged=tuple(s is Status.CONVERGED for s in statuses) if per_row else (),
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
    (``max_iter=100, tol=1e-6, atol=0``) serves every method. With ``tol > 0`` it also stops
    once the residual has fallen to ``eps`` (the dtype's) times the first one measured: at a
    solution at zero ``tol * ||w||`` vanishes too, and the relative rule alone would never stop
    (the record's relative residual is then of order 1, which is all a zero solution allows).
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
        floor: bool = True,
    ) -> tuple[torch.Tensor, SolveRecord]:
        """:func:`iterate` with these options; ``atol`` is divided by ``unit``, the factor the
        problem was scaled by; ``floor`` as :func:`precision_floor` (off for linear solves)."""
        return iterate(
            state,
            method=type(self).__name__,
            max_iter=self.max_iter,
            tol=self.tol,
            atol=self.atol / unit,
            products=products,
            initial=initial,
            floor=floor,
        )
