"""The base of every backward linear solver: ``A x = b`` with records, scaling and counting."""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from .._iteration import IterationState, IterativeMethod
from .._operator import CountingOperator, LinearOperator, as_operator
from .._records import SolveRecord, Status, measured_record, relative
from .._user_callable import UserCallable

__all__ = [
    "LinearSolver",
    "IterativeLinearSolver",
    "UserLinearSolver",
    "with_rows",
]


class LinearSolver(abc.ABC):
    """Solves ``A x = b``; in a layer's backward ``A = (I - J)^T`` and ``b = dL/dw*``.

    :meth:`solve` handles what every method shares: a zero ``b`` returns zero without a product;
    ``b`` is divided by its largest entry, so tiny float32 gradients neither underflow nor meet
    the tolerance early; every product is counted; a :class:`SolveRecord` comes back.

    ``complex_linear`` says whether the method relies on ``A (i v) = i A v`` (Krylov and direct
    methods do); a complex layer whose function is not holomorphic in ``w`` has a backward
    operator that is only real-linear, and is refused such a method.
    """

    complex_linear = True

    def solve(
        self,
        operator: LinearOperator | torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
        b: torch.Tensor,
        x0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, SolveRecord]:
        """Return ``x`` with ``A x ~= b`` and the record of the solve.

        ``operator`` is a :class:`LinearOperator`, a square matrix, or a function ``v -> A v``;
        ``b`` and the optional initial guess ``x0`` are flat vectors.
        """
        _check_vector(b, "b")
        if x0 is not None:
            _check_vector(x0, "x0", like=b)
        counted = CountingOperator(as_operator(operator, b))
        scale = torch.linalg.vector_norm(b, math.inf)  # the largest |b_i|
        scale_value = float(scale)
        if scale_value == 0:
            return torch.zeros_like(b), self._trivial_record(Status.CONVERGED, 0.0)
        if not math.isfinite(scale_value):
            return torch.full_like(b, math.nan), self._trivial_record(Status.NONFINITE, math.nan)
        x0_scaled = None if x0 is None else x0 / scale
        x_scaled, record = self._run(counted, b / scale, x0_scaled, scale_value)
        if record.status is Status.NONFINITE:  # never a finite made-up answer (GMRES: zero)
            x_scaled = torch.full_like(x_scaled, math.nan)
        unscaled = dataclasses.replace(
            record, residual=record.residual * scale_value, atol=getattr(self, "atol", None)
        )
        return x_scaled * scale, unscaled

    @property
    def method(self) -> str:
        return type(self).__name__

    def _trivial_record(self, status: Status, residual: float) -> SolveRecord:
        return SolveRecord(
            method=self.method,
            iterations=0,
            products=0,
            residual=residual,
            relative_residual=residual,
            tol=getattr(self, "tol", None),
            atol=getattr(self, "atol", None),
            status=status,
            history=(residual,),
        )

    @abc.abstractmethod
    def _run(
        self, operator: CountingOperator, b: torch.Tensor, x0: torch.Tensor | None, unit: float
    ) -> tuple[torch.Tensor, SolveRecord]:
        """Solve with ``b`` (and ``x0``) divided by ``unit``, the largest entry of ``b``."""


class IterativeLinearSolver(IterativeMethod, LinearSolver):
    """A Krylov or stationary method: subclasses describe one run with :meth:`_start`.

    Every iterative solver stops once ``||b - A x|| <= atol + tol * ||b||`` or after
    ``max_iter`` iterations (defaults 100, 1e-6, 0, as for every method).
    """

    def _run(self, operator, b, x0, unit):
        b_norm = float(torch.linalg.vector_norm(b))
        if x0 is None:  # r0 = b: no product is spent on A @ 0
            x, residual, residual_norm = torch.zeros_like(b), b.clone(), b_norm
        else:
            x, residual = scaled_start(x0, operator.mv(x0), b)
            residual_norm = float(torch.linalg.vector_norm(residual))
        state = self._start(operator, x, residual, b_norm)
        x, record = self._iterate(
            state,
            products=lambda: operator.products,
            initial=(residual_norm, b_norm),
            unit=unit,
            floor=False,
        )
        if operator.rows is not None:  # GMRES forms its residual vector only here
            record = with_rows(record, operator, state.residual_vector(), b)
        return x, record

    @abc.abstractmethod
    def _start(
        self,
        operator: CountingOperator,
        x: torch.Tensor,
        residual: torch.Tensor,
        b_norm: float,
    ) -> LinearSolverState:
        """The state of a run from iterate ``x`` with residual ``b - A x``."""


def scaled_start(
    x0: torch.Tensor, product: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The start ``alpha x0`` of least residual, and that residual ``b - alpha A x0``, from
    ``product = A x0``: ``alpha = (A x0)^H b / ||A x0||^2``.

    A warm start comes from another system, often of another scale (AMP rescales the loss;
    a gradient shrinks as training converges). Taken as it is, ``x0`` can be many times larger
    than the solution: the initial residual swamps ``b``, and the residual a Krylov method
    updates by its recurrences drifts from the true one, so a solve can report convergence at
    a wrong answer. Scaled, the start is never worse than zero (``||r0|| <= ||b||``), and a
    non-finite ``x0`` (an overflowed step) or one with ``A x0 = 0`` is dropped for zero."""
    energy = torch.vdot(product, product).real
    alpha = torch.vdot(product, b) / energy
    if not (bool(torch.isfinite(alpha)) and float(energy) > 0):
        return torch.zeros_like(b), b.clone()
    return alpha * x0, b - alpha * product


class LinearSolverState(IterationState):
    """The run of an iterative linear solver, which knows the residual vector it judges."""

    @abc.abstractmethod
    def residual_vector(self) -> torch.Tensor:
        """The residual vector whose norm the record holds (``b - A x`` for the ``x``
        returned, unless the method says otherwise), from its recurrences: no product."""


def with_rows(
    record: SolveRecord, operator: LinearOperator, residual: torch.Tensor, b: torch.Tensor
) -> SolveRecord:
    """On a batch of rows (``operator.rows``), ``record`` with each row's iterations (those of
    the batch), relative residual ``||r_i|| / ||b_i||`` and, if the solver has a tolerance,
    whether the row meets it on its own. The solver judged the batch as one system, so a
    CONVERGED solve may hold a row that does not. ``b`` and ``residual`` are in the units of
    ``record.atol``."""
    if operator.rows is None:
        return record
    rows = operator.rows
    norms = torch.linalg.vector_norm(torch.stack((residual, b)).view(2, rows, -1), dim=2)
    residuals, scales = norms.double().tolist()
    ratios = tuple(relative(r, s) for r, s in zip(residuals, scales))
    fields: dict[str, Any] = dict(
        sample_iterations=(record.iterations,) * rows, sample_residuals=ratios
    )
    if record.tol is not None:
        atol = record.atol or 0.0
        meets = (r <= atol + record.tol * s for r, s in zip(residuals, scales))
        fields["sample_converged"] = tuple(meets)
    return dataclasses.replace(record, **fields)


class UserLinearSolver(UserCallable, LinearSolver):
    """A user callable ``backward(matvec, b) -> x`` as a linear solver.

    It has no tolerance of its own, so its record has status ``UNCHECKED``; the residual is
    measured with one extra product, counted in the record.
    """

    complex_linear = False  # whatever it does, the residual is measured

    def _run(self, operator, b, x0, unit):
        x = self.function(operator.mv, b)
        _check_vector(x, f"the result of the backward callable `{self.method}`", like=b)
        made = operator.products
        residual = b - operator.mv(x)
        record = measured_record(
            self.method,
            iterations=made,
            products=made + 1,
            residual=float(torch.linalg.vector_norm(residual)),
            scale=float(torch.linalg.vector_norm(b)),
        )
        return x, with_rows(record, operator, residual, b)


def check_preconditioner(solver: Any) -> None:
    preconditioner = solver.preconditioner
    if preconditioner is not None and not callable(preconditioner):
        raise TypeError(
            f"{type(solver).__name__}: `preconditioner` must be a callable r -> M r with "
            f"M ~ A^-1, or None; got {type(preconditioner).__name__}."
        )


def _check_vector(vector, name: str, like: torch.Tensor | None = None) -> None:
    if not isinstance(vector, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(vector).__name__}.")
    if like is None:
        if vector.ndim != 1 or not (vector.is_floating_point() or vector.is_complex()):
            raise ValueError(
                f"`{name}` must be a flat floating-point (or complex) vector, got shape "
                f"{tuple(vector.shape)} and dtype {vector.dtype}."
            )
    elif vector.shape != like.shape or vector.dtype != like.dtype or vector.device != like.device:
        raise ValueError(
            f"`{name}` must match b: shape {tuple(like.shape)}, {like.dtype} on {like.device}; "
            f"got shape {tuple(vector.shape)}, {vector.dtype} on {vector.device}."
        )
