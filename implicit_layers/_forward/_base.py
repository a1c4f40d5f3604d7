"""The base of every forward solver: find ``w`` with ``f(w) = w``."""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable

import torch

from .._iteration import IterationState, IterativeMethod
from .._options import check_bool, options
from .._records import SolveRecord, measured_record, relative
from .._tree import FlatSpace
from .._user_callable import UserCallable

__all__ = [
    "ForwardSolver",
    "IterativeForwardSolver",
    "UserForwardSolver",
    "as_forward_solver",
    "RowState",
    "BestRowState",
    "row_norms",
    "step_towards",
    "replace_slot",
]

Map = Callable[[torch.Tensor], torch.Tensor]


class _CountingMap:
    def __init__(self, function: Map):
        self.function, self.evaluations = function, 0

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        return self.function(w)


class ForwardSolver(abc.ABC):
    """Finds a fixed point ``w = f(w)`` from ``w0``: a flat vector, or a ``(batch, n)`` matrix
    of independent rows (``f`` maps each row on its own, as a deep equilibrium model maps its
    samples), each of which stops when it converges."""

    @property
    def method(self) -> str:
        return type(self).__name__

    def solve(self, f: Map, w0: torch.Tensor) -> tuple[torch.Tensor, SolveRecord]:
        """Return the fixed point and the record of the solve (``products`` counts f's calls;
        for rows, the record also holds each row's iterations and residual)."""
        if w0.ndim not in (1, 2):
            raise ValueError(
                f"`w0` must be a flat vector or a (batch, n) matrix of rows, got shape "
                f"{tuple(w0.shape)}."
            )
        counted = _CountingMap(f)
        return self._run(counted, w0)

    @abc.abstractmethod
    def _run(self, f: _CountingMap, w0: torch.Tensor) -> tuple[torch.Tensor, SolveRecord]: ...


@options
class IterativeForwardSolver(IterativeMethod, ForwardSolver):
    """An iteration that stops once ``||f(w) - w|| <= atol + tol * ||w||`` or after
    ``max_iter`` evaluations of ``f`` (defaults 100, 1e-6, 0, as for every method).

    The iterate ``w`` it settles on (per row) is one whose residual ``g = f(w) - w`` was
    measured, never an unchecked extrapolation, and the record's residual is ``||g||``. With
    ``final_step=True`` (default) it returns one more step from ``w``, ``w + damping g``
    (``f(w)`` undamped), at no cost: ``f(w)`` is known. For a map that contracts with factor
    ``L``, ``f(w)`` is ``L`` times closer to the fixed point than ``w``, with
    ``||f(w) - w*|| <= L / (1 - L) ||g||``, and its own residual is at most ``L ||g||``: the
    record's residual bounds the returned point's. For a map that does not contract at its
    fixed point (Anderson and Broyden may still find it) the step can lose accuracy:
    ``final_step=False`` returns ``w``, whose residual is exactly the record's.

    On a batch of rows each row is judged on its own, and its ``sample_iterations`` count the
    evaluations until it met the tolerance. ``f`` runs on the whole batch until the last row
    is done, so with ``refine=True`` (default) a row that converged keeps stepping for free
    and returns its iterate of smallest residual from then on (never worse than where it
    converged; ``sample_residuals`` holds that iterate's). ``refine=False`` holds it where
    it converged, so that a row's result does not depend on the rows batched with it.
    """

    final_step: bool = True
    refine: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self, "final_step", self.final_step)
        check_bool(self, "refine", self.refine)

    def _run(self, f, w0):
        if w0.ndim == 2:
            state = self._start(f, w0)
            return self._iterate(state, products=lambda: f.evaluations + state.jacobian_products)
        state = self._start(lambda rows: f(rows[0]).unsqueeze(0), w0.unsqueeze(0))
        w, record = self._iterate(state, products=lambda: f.evaluations + state.jacobian_products)
        return w[0], record.without_rows()

    @abc.abstractmethod
    def _start(self, f: Map, w0: torch.Tensor) -> RowState:
        """The state of a run on the rows ``w0`` (``(batch, n)``); each step evaluates ``f``
        once, on every row."""


class RowState(IterationState):
    """A forward iteration on rows, under ``solver``'s ``final_step`` and ``refine``.

    Each step judges an iterate ``w`` by its residual and :meth:`offer`s the point to return
    for it (``w``, or the final step from it). Per row the state returns the point offered
    last, or for a *tracked* row the one offered for its iterate of smallest residual since
    tracking began: a state that ``returns_best`` tracks every row from the start, and one
    that ``refines`` tracks a row from when it converged (:meth:`settle`) while stepping it on.
    A frozen row stays at its iterate and returns the point offered when it froze.
    """

    jacobian_products = 0  # products with J besides the evaluations of f (Newton's)

    def __init__(self, w0: torch.Tensor, solver: IterativeForwardSolver):
        self.final_step, self.refines = solver.final_step, solver.refine
        self.w = w0
        self.proposal: torch.Tensor | None = None  # the next iterate, once a step proposed it
        self.frozen: torch.Tensor | None = None
        self.offered = w0  # the point offered for the iterate judged last, and its residual
        norms = w0.real.dtype  # residual norms are real, also for a complex w
        self.offered_residual = w0.new_full((w0.shape[0],), math.inf, dtype=norms)
        self.tracking = self.returns_best  # whether any row is tracked (no test per step)
        self.tracked = torch.full((w0.shape[0],), self.returns_best, device=w0.device)
        self.best_residual = w0.new_full((w0.shape[0],), math.inf, dtype=norms)
        self.chosen = w0  # per row, the point kept to return: a tracked or frozen row's

    def offer(self, w: torch.Tensor, step: torch.Tensor, residual: torch.Tensor) -> None:
        """The iterate ``w`` just judged, of residual norms ``residual``, and the final step
        ``step`` from it; a tracked row keeps the point if its residual is its smallest (a
        NaN never is)."""
        self.offered = step if self.final_step else w
        self.offered_residual = residual
        if self.tracking:
            better = self.tracked & (residual < self.best_residual)
            self.best_residual = torch.where(better, residual, self.best_residual)
            self.chosen = torch.where(better[:, None], self.offered, self.chosen)

    def settle(self, rows):
        if not self.refines:
            self.freeze(rows)
            return
        rows = rows.to(self.w.device)
        self.tracking = True
        self.tracked = self.tracked | rows
        self.best_residual = torch.where(rows, self.offered_residual, self.best_residual)
        self.chosen = torch.where(rows[:, None], self.offered, self.chosen)

    def freeze(self, rows):
        rows = rows.to(self.w.device)
        self.frozen = rows if self.frozen is None else self.frozen | rows
        self.tracked = self.tracked & ~rows
        if self.proposal is not None:
            self.proposal = self.keep(self.proposal)
        self.chosen = torch.where(rows[:, None], self.offered, self.chosen)

    def keep(self, proposal: torch.Tensor) -> torch.Tensor:
        """``proposal`` for the rows still stepping, the current iterate for the frozen ones."""
        if self.frozen is None:
            return proposal
        return torch.where(self.frozen[:, None], self.w, proposal)

    def result(self) -> torch.Tensor:
        if self.frozen is None and not self.tracking:
            return self.offered
        held = self.tracked if self.frozen is None else self.tracked | self.frozen
        return torch.where(held[:, None], self.chosen, self.offered)


class BestRowState(RowState):
    """A row iteration whose residual is not monotone: it returns, per row, the point offered
    for the iterate of smallest residual seen (a frozen row: for the iterate judged done)."""

    returns_best = True


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """Each row's norm, off the graph: it judges an iteration, it is never differentiated."""
    return torch.linalg.vector_norm(rows.detach(), dim=1)


def step_towards(w: torch.Tensor, fw: torch.Tensor, damping: float) -> torch.Tensor:
    """The damped fixed-point step ``w + damping (f(w) - w)``: ``f(w)`` itself when undamped."""
    return fw if damping == 1 else torch.lerp(w, fw, damping)


def replace_slot(history: torch.Tensor, slot: int, rows: torch.Tensor) -> torch.Tensor:
    """``history`` (``(batch, memory, n)``) with ``history[:, slot] = rows``: written in place,
    or out of place while autograd records a graph through them (unrolled differentiation)."""
    if rows.requires_grad or history.requires_grad:
        return torch.cat((history[:, :slot], rows.unsqueeze(1), history[:, slot + 1 :]), dim=1)
    history[:, slot] = rows
    return history


class UserForwardSolver(UserCallable, ForwardSolver):
    """A user callable ``solver(f, w0) -> w`` on the user's own tree structure.

    This is how an inner training loop becomes a layer. It has no tolerance of its own: the
    record has status ``UNCHECKED`` and the residual of the returned point, measured with one
    extra evaluation of ``f`` (counted in ``products``); for rows, the worst row's, and each
    row's in ``sample_residuals``.
    """

    def __init__(
        self, function: Callable, space: FlatSpace, handed: Map | None = None, params: tuple = ()
    ):
        super().__init__(function, space, params)
        self.handed = handed

    def _run(self, f, w0):
        space, shape = self.space, w0.shape
        flat = (lambda v: f(v.view(shape)).reshape(-1)) if w0.ndim == 2 else f
        given = self.handed or flat
        w = self._solve_on_tree(lambda w: space.unflatten(given(space.flatten(w))), w0.reshape(-1))
        w = w.view(shape)
        made = f.evaluations
        rows = (f(w) - w, w) if w0.ndim == 2 else ((f(w) - w)[None], w[None])
        residuals, scales = (row_norms(r).tolist() for r in rows)
        ratios = [relative(r, s) for r, s in zip(residuals, scales)]
        worst = max(range(len(ratios)), key=lambda row: ratios[row])
        record = measured_record(
            self.method,
            iterations=made,
            products=made + 1,
            residual=residuals[worst],
            scale=scales[worst],
        )
        if w0.ndim == 2 and shape[0] > 1:
            record = dataclasses.replace(record, sample_residuals=tuple(ratios))
        return w, record


def as_forward_solver(
    solver: ForwardSolver | Callable,
    space: FlatSpace,
    handed: Map | None = None,
    params: tuple = (),
) -> ForwardSolver:
    """The forward solver ``solver`` is, or a user callable wrapped as one; ``handed`` is the
    flat function a callable is given on the user's tree (default: the map ``f`` itself), and
    ``params`` the layer's, which a callable that takes them receives after ``w0``."""
    if isinstance(solver, ForwardSolver):
        return solver
    if callable(solver):
        return UserForwardSolver(solver, space, handed, params)
    raise TypeError(
        "`solver` must be a forward solver (FixedPoint(), Anderson()) or a callable "
        f"(f, w0) -> w; got {type(solver).__name__}."
    )
