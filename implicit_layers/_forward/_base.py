"""The base of every forward solver: find ``w`` with ``f(w) = w``."""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from .._iteration import IterationState, IterativeMethod
from .._records import SolveRecord, measured_record
from .._tree import FlatSpace
from .._user_callable import UserCallable

__all__ = ["ForwardSolver", "IterativeForwardSolver", "UserForwardSolver", "as_forward_solver"]

Map = Callable[[torch.Tensor], torch.Tensor]


class _CountingMap:
    def __init__(self, function: Map):
        self.function, self.evaluations = function, 0

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        return self.function(w)


class ForwardSolver(abc.ABC):
    """Finds a fixed point ``w = f(w)`` of a map on flat vectors, from ``w0``."""

    @property
    def method(self) -> str:
        return type(self).__name__

    def solve(self, f: Map, w0: torch.Tensor) -> tuple[torch.Tensor, SolveRecord]:
        """Return the fixed point and the record of the solve (``products`` counts f's calls)."""
        counted = _CountingMap(f)
        return self._run(counted, w0)

    @abc.abstractmethod
    def _run(self, f: _CountingMap, w0: torch.Tensor) -> tuple[torch.Tensor, SolveRecord]: ...


class IterativeForwardSolver(IterativeMethod, ForwardSolver):
    """An iteration that stops once ``||f(w) - w|| <= atol + tol * ||w||`` or after
    ``max_iter`` evaluations of ``f`` (defaults 100, 1e-6, 0, as for every method). The point
    returned is one whose residual was measured, never an unchecked extrapolation, and the
    record's residual is that point's."""

    def _run(self, f, w0):
        return self._iterate(self._start(f, w0), products=lambda: f.evaluations)

    @abc.abstractmethod
    def _start(self, f: Map, w0: torch.Tensor) -> IterationState:
        """The state of a run; each step evaluates ``f`` once at the current iterate."""


class UserForwardSolver(UserCallable, ForwardSolver):
    """A user callable ``solver(f, w0) -> w`` on the user's own tree structure.

    This is how an inner training loop becomes a layer. It has no tolerance of its own: the
    record has status ``UNCHECKED`` and the residual of the returned point, measured with one
    extra evaluation of ``f`` (counted in ``products``).
    """

    def _run(self, f, w0):
        space = self.space
        w = self._solve_on_tree(lambda w: space.unflatten(f(space.flatten(w))), w0)
        made = f.evaluations
        record = measured_record(
            self.method,
            iterations=made,
            products=made + 1,
            residual=float(torch.linalg.vector_norm(f(w) - w)),
            scale=float(torch.linalg.vector_norm(w)),
        )
        return w, record


def as_forward_solver(solver: ForwardSolver | Callable, space: FlatSpace) -> ForwardSolver:
    if isinstance(solver, ForwardSolver):
        return solver
    if callable(solver):
        return UserForwardSolver(solver, space)
    raise TypeError(
        "`solver` must be a forward solver (FixedPoint(), Anderson()) or a callable "
        f"(f, w0) -> w; got {type(solver).__name__}."
    )
