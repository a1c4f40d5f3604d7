"""Conjugate gradients for symmetric positive definite systems."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._iteration import read_back_is_free
from .._options import options
from .._records import Status
from ._base import IterativeLinearSolver, LinearSolverState, check_preconditioner

Preconditioner = Callable[[torch.Tensor], torch.Tensor]


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^H b``, real: the inner products of CG are real for a Hermitian ``A`` (and ``M``)."""
    return torch.vdot(a, b).real


@options
class CG(IterativeLinearSolver):
    """Conjugate gradients (Hestenes and Stiefel) for ``A x = b`` with ``A`` symmetric positive
    definite.

    In a layer's backward ``A = (I - J)^T``; that is SPD when ``Phi = w - a grad f(w)`` is a
    gradient step with ``a > 0`` on a strongly convex ``f`` (then ``I - J = a H``).
    For a general map ``I - J`` is not symmetric and CG's answer is wrong: use :class:`GMRES`.
    A direction of non-positive curvature, ``p.A p <= 0``, proves ``A`` is not positive
    definite: CG stops there with status ``INDEFINITE`` (a failure, reported by the
    ``on_failure`` policy) and returns its last iterate.

    One product per iteration (none for the initial residual when ``x0`` is ``None``); the
    direction is updated with the new residual, ``p <- r_new + (r_new.r_new / r.r) p``, so the
    error falls as in the textbook, ``2 ((sqrt(k) - 1)/(sqrt(k) + 1))^i`` in the A-norm.

    ``preconditioner``, a callable ``r -> M r`` with ``M ~ A^{-1}`` symmetric positive definite,
    gives preconditioned CG (``z = M r``, ``p <- z_new + (r_new.z_new / r.z) p``): then ``k``
    is the condition number of ``M A``. It costs one application of ``M`` per iteration and no
    extra product; the residual reported stays the true ``||b - A x||``.

    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]]); b = torch.tensor([1.0, 2.0])
    >>> x, record = CG(tol=1e-6).solve(A, b)
    >>> torch.allclose(A @ x, b, atol=1e-5), record.products
    (True, 2)
    """

    preconditioner: Preconditioner | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_preconditioner(self)

    def _start(self, operator, x, residual, b_norm):
        return CGState(operator, x, residual, b_norm, self.preconditioner)


class CGState(LinearSolverState):
    """CG's recurrences; :meth:`products` is the one place that touches the operator.

    ``rz`` is ``r.z`` with ``z = M r`` the preconditioned residual (``z = r`` without ``M``).
    """

    def __init__(self, operator, x, residual, b_norm, preconditioner=None):
        self.operator, self.x, self.r, self.b_norm = operator, x, residual, b_norm
        self.preconditioner = preconditioner
        z = self._precondition(residual)
        self.p = z.clone()
        self.rz = inner(residual, z)

    def _precondition(self, r: torch.Tensor) -> torch.Tensor:
        return r if self.preconditioner is None else self.preconditioner(r)

    def products(self, p: torch.Tensor):
        """``(A p, direction of the x update, curvature p.A p)``."""
        q = self.operator.mv(p)
        return q, p, inner(p, q)

    def step(self):
        q, direction, curvature = self.products(self.p)
        if read_back_is_free(self.x.device):
            return self._step_on_cpu(q, direction, curvature.item())
        # Where p.A p <= 0 the system is not SPD: take no step (alpha = 0) and stop below. The
        # sign is read together with the residual, in the one synchronisation of an iteration.
        alpha = torch.where(curvature <= 0, torch.zeros_like(curvature), self.rz / curvature)
        self.x.addcmul_(direction, alpha)
        self.r.addcmul_(q, alpha, value=-1)
        z = self._precondition(self.r)
        rz_new = inner(self.r, z)
        self.p.mul_(rz_new / self.rz).add_(z)
        self.rz = rz_new
        residual = rz_new.sqrt() if self.preconditioner is None else self.r.norm()
        curvature, residual = torch.stack((curvature, residual)).tolist()
        if curvature <= 0:
            self.stopped = Status.INDEFINITE
        return residual, self.b_norm

    def _step_on_cpu(self, q: torch.Tensor, direction: torch.Tensor, curvature: float):
        """The same step with the scalars as Python floats: on the CPU a read-back costs
        nothing, and the kernels of the one-synchronisation form above would."""
        if curvature <= 0:
            self.stopped = Status.INDEFINITE
            return self._residual_value(), self.b_norm
        alpha = self.rz.item() / curvature
        self.x.add_(direction, alpha=alpha)
        self.r.add_(q, alpha=-alpha)
        z = self._precondition(self.r)
        rz_new = inner(self.r, z)
        self.p.mul_(rz_new.item() / self.rz.item()).add_(z)
        self.rz = rz_new
        return self._residual_value(), self.b_norm

    def _residual_value(self) -> float:
        if self.preconditioner is None:
            return math.sqrt(max(self.rz.item(), 0.0))
        return self.r.norm().item()

    def result(self) -> torch.Tensor:
        return self.x

    def residual_vector(self) -> torch.Tensor:
        return self.r
