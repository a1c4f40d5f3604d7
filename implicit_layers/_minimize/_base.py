"""The base of every inner minimizer: find ``w* = argmin_w f(w)`` from ``w0``.

Every minimizer stops on the size of its step relative to ``w``, as :class:`FixedPoint` does:
``||w_{k+1} - w_k|| <= atol + tol * ||w||``, so a warm start near the minimum stops at once.
``products`` counts gradient evaluations.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch

from .._compat import loss_gradients
from .._records import SolveRecord, measured_record
from .._tree import FlatSpace
from .._user_callable import UserCallable

__all__ = ["Minimizer", "UserMinimizer", "as_minimizer", "Objective"]

Objective = Callable[[torch.Tensor], torch.Tensor]  # flat w -> scalar loss


class CountingObjective:
    """An objective on flat vectors that returns ``(loss, gradient)`` and counts the calls."""

    def __init__(self, objective: Objective):
        self.objective, self.evaluations = objective, 0

    def __call__(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.evaluations += 1
        with torch.enable_grad():
            w = w.detach().requires_grad_()
            loss = self.objective(w)
            (grad,) = loss_gradients(loss, (w,))
            if grad is None:  # torch's own error: the loss does not depend on w
                (grad,) = torch.autograd.grad(loss, w)
        return loss.detach(), grad


class Minimizer(abc.ABC):
    """Finds a minimiser of a scalar objective on flat vectors, from ``w0``."""

    @property
    def method(self) -> str:
        return type(self).__name__

    def solve(self, objective: Objective, w0: torch.Tensor) -> tuple[torch.Tensor, SolveRecord]:
        """Return the minimiser and the record (``products``: gradient evaluations)."""
        return self._run(CountingObjective(objective), w0)

    @abc.abstractmethod
    def _run(
        self, objective: CountingObjective, w0: torch.Tensor
    ) -> tuple[torch.Tensor, SolveRecord]: ...


class UserMinimizer(UserCallable, Minimizer):
    """A user callable ``solver(f, w0) -> w`` on the user's tree structure, ``f(w)`` the loss.

    This is how a user's own inner training loop becomes an argmin layer. It has no tolerance:
    the record has status ``UNCHECKED`` and the stationarity ``||grad f(w)|| / ||grad f(w0)||``,
    measured with two extra gradient evaluations (counted in ``products``).
    """

    def _run(self, objective, w0):
        space, calls = self.space, []

        def loss(w: Any) -> torch.Tensor:
            calls.append(1)
            return objective.objective(space.flatten(w))

        w = self._solve_on_tree(loss, w0)
        made = len(calls)
        start, end = objective(w0)[1], objective(w)[1]
        record = measured_record(
            self.method,
            iterations=made,
            products=made + objective.evaluations,
            residual=float(torch.linalg.vector_norm(end)),
            scale=float(torch.linalg.vector_norm(start)),
        )
        return w.detach(), record


def as_minimizer(solver: Minimizer | Callable, space: FlatSpace, params: tuple = ()) -> Minimizer:
    """The minimizer ``solver`` is, or a user callable wrapped as one (``params`` as for
    :func:`as_forward_solver`)."""
    if isinstance(solver, Minimizer):
        return solver
    if callable(solver):
        return UserMinimizer(solver, space, params)
    raise TypeError(
        "`solver` must be a minimizer (GradientDescent(), LBFGS()) or a callable "
        f"(f, w0) -> w; got {type(solver).__name__}."
    )
