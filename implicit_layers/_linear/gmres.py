"""Restarted GMRES for general non-singular systems."""

from __future__ import annotations

import cmath
import math

import torch

from .._options import check_positive_int, options
from ._base import IterativeLinearSolver, LinearSolverState, check_preconditioner
from .cg import Preconditioner


@options
class GMRES(IterativeLinearSolver):
    """Restarted GMRES(m) (Saad and Schultz, 1986) for a general non-singular ``A``.

    Each iteration adds ``A v_j`` to an orthonormal Krylov basis (classical Gram-Schmidt,
    repeated once) and picks the iterate of least residual ``||b - A x||`` in the span, so within
    a restart cycle it is never worse per product than :class:`Neumann`, whose iterates lie in
    the same space (restarts can slow it on hard systems: raise ``restart``). The basis holds
    ``restart + 1`` vectors; after ``restart`` iterations it restarts from the current iterate,
    with the residual taken from the Arnoldi relation ``b - A x = V_{m+1} (beta e_1 - H y)``, so
    a restart costs no product: ``k`` iterations are exactly ``k`` products. This is the default
    backward solver: it is valid for any map.

    ``preconditioner``, a callable ``v -> M v`` with ``M ~ A^{-1}``, preconditions on the right:
    GMRES runs on ``A M y = b`` and returns ``x = M y``. The residual it minimises and reports is
    still the true ``||b - A x||``; each iteration also applies ``M`` once.

    >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]]); b = torch.tensor([0.0, 1.0])
    >>> x, record = GMRES().solve(A, b)
    >>> torch.allclose(A @ x, b, atol=1e-5), record.iterations
    (True, 2)
    """

    restart: int = 20
    preconditioner: Preconditioner | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "restart", self.restart)
        check_preconditioner(self)

    def _start(self, operator, x, residual, b_norm):
        restart = min(self.restart, self.max_iter)
        return _GMRESState(operator, x, residual, b_norm, restart, self.preconditioner)


def _givens(a: complex, b: complex) -> tuple[float, complex, complex]:
    """``(c, s, r)`` with ``[[c, s], [-conj(s), c]] [a, b] = [r, 0]`` and ``c`` real: the rotation
    that zeroes the subdiagonal (real numbers: ``c = a / r``, ``s = b / r``, ``r = hypot(a, b)``).
    ``r = 0`` means ``A`` is singular on the Krylov space: the residual cannot fall this step."""
    if isinstance(a, complex) or isinstance(b, complex):
        radius = math.hypot(abs(a), abs(b))
        if a == 0:
            return 0.0, 1.0, b
        phase = a / abs(a)
        return abs(a) / radius, phase * b.conjugate() / radius, phase * radius
    radius = math.hypot(a, b)
    if radius == 0:
        return 0.0, 1.0, 0.0
    return a / radius, b / radius, radius


class _GMRESState(LinearSolverState):
    def __init__(self, operator, x, residual, b_norm, restart, preconditioner):
        self.operator, self.x, self.b_norm, self.restart = operator, x, b_norm, restart
        self.precondition = preconditioner or (lambda v: v)
        self.basis = residual.new_zeros(restart + 1, residual.numel())
        self._begin_cycle(residual)

    def _begin_cycle(self, residual: torch.Tensor) -> None:
        beta = torch.linalg.vector_norm(residual)
        self.beta = float(beta)
        if self.beta > 0:
            self.basis[0] = residual / beta
        self.hessenberg: list[list[float]] = []  # columns of H, before rotation
        self.triangle: list[list[float]] = []  # columns of R, after rotation
        self.rotations: list[tuple[float, float]] = []
        self.g = [self.beta]  # the rotated right-hand side beta e_1

    def step(self):
        j = len(self.hessenberg)
        if j == self.restart:
            self._restart()
            j = 0
        basis = self.basis[: j + 1]
        w = self.operator.mv(self.precondition(self.basis[j]))
        h = basis.conj() @ w  # V^H w: complex bases too
        w = w - basis.T @ h
        correction = basis.conj() @ w
        w = w - basis.T @ correction
        norm = torch.linalg.vector_norm(w)
        column = torch.cat((h + correction, norm[None])).tolist()
        if not all(map(cmath.isfinite, column)):
            return math.nan, self.b_norm
        if abs(column[-1]) > 0:
            self.basis[j + 1] = w / norm
        else:  # the Krylov space is exhausted: no new direction
            self.basis[j + 1] = 0
        self.hessenberg.append(list(column))
        for i, (c, s) in enumerate(self.rotations):
            upper, lower = column[i], column[i + 1]
            column[i], column[i + 1] = c * upper + s * lower, c * lower - s.conjugate() * upper
        c, s, column[j] = _givens(column[j], column[j + 1])
        self.rotations.append((c, s))
        self.triangle.append(column[: j + 1])
        self.g.append(-s.conjugate() * self.g[j])
        self.g[j] = c * self.g[j]
        return abs(self.g[j + 1]), self.b_norm

    def _coefficients(self) -> list[float]:
        """Back-substitution for ``R y = g``, the least-squares solution in the basis."""
        size = len(self.triangle)
        y = [0.0] * size
        for i in reversed(range(size)):
            total = self.g[i] - sum(self.triangle[k][i] * y[k] for k in range(i + 1, size))
            diagonal = self.triangle[i][i]
            y[i] = total / diagonal if diagonal != 0 else 0.0
        return y

    def _update(self) -> tuple[list[float], torch.Tensor]:
        y = self._coefficients()
        coefficients = torch.tensor(y, dtype=self.x.dtype, device=self.x.device)
        return y, self.x + self.precondition(self.basis[: len(y)].T @ coefficients)

    def _restart(self) -> None:
        y, self.x = self._update()
        self._begin_cycle(self._residual(y))

    def _residual(self, y: list[float]) -> torch.Tensor:
        """``b - A x`` for ``x`` updated by ``y``: ``V_{m+1} (beta e_1 - H y)``, from the
        Arnoldi relation ``A V_m = V_{m+1} H``."""
        combination = [0.0] * (len(y) + 1)
        combination[0] = self.beta
        for k, column in enumerate(self.hessenberg):
            for i, entry in enumerate(column):
                combination[i] -= entry * y[k]
        weights = torch.tensor(combination, dtype=self.x.dtype, device=self.x.device)
        return self.basis[: len(y) + 1].T @ weights

    def result(self) -> torch.Tensor:
        return self._update()[1] if self.triangle else self.x

    def residual_vector(self) -> torch.Tensor:
        return self._residual(self._coefficients())
