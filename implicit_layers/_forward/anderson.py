"""Anderson acceleration (type II) with a residual-scaled regularisation."""

from __future__ import annotations

import torch

from .._options import check_in_interval, check_nonnegative, check_positive_int, options
from ._base import BestRowState, IterativeForwardSolver, replace_slot, row_norms, step_towards


@options
class Anderson(IterativeForwardSolver):
    """Anderson acceleration (Anderson 1965; Walker and Ni 2011) of ``w <- f(w)``.

    With residuals ``g_i = f(w_i) - w_i`` and the differences ``dG``, ``dW`` of the last
    ``memory`` iterates, each step solves the small least-squares problem
    ``gamma = argmin ||g_k - dG gamma||^2 + reg ||gamma||^2`` and moves to
    ``w_{k+1} = w_k + damping g_k - (dW + damping dG) gamma``. The Tikhonov weight is
    ``reg = regularization * ||dG dG^T||_F``, relative to the residuals, so it neither
    swamps the step early nor vanishes against them late. Anderson's residual is not
    monotone: the iterate ``w`` of smallest residual is the one settled on, and the point
    returned is ``w + damping g`` (``final_step=True``, see :class:`IterativeForwardSolver`)
    or ``w``. One evaluation per iteration; the small solve runs in float64.

    >>> w, record = Anderson(tol=1e-8).solve(lambda w: torch.cos(w), torch.zeros(1))
    >>> round(float(w), 6), record.iterations < 15
    (0.739085, True)
    """

    memory: int = 5
    damping: float = 1.0
    regularization: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "memory", self.memory)
        check_in_interval(self, "damping", self.damping, 0.0, 1.0)
        check_nonnegative(self, "regularization", self.regularization)

    def _start(self, f, w0):
        return _AndersonState(f, w0, self)


class _AndersonState(BestRowState):
    def __init__(self, f, w0, solver):
        super().__init__(w0, solver)
        self.f, self.damping, self.regularization = f, solver.damping, solver.regularization
        (rows, n), memory = w0.shape, solver.memory
        self.dX = w0.new_zeros(rows, memory, n)  # differences of x = w + damping g
        self.dG = w0.new_zeros(rows, memory, n)  # differences of g = f(w) - w
        self.eye = torch.eye(memory, dtype=torch.float64, device=w0.device)
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, g)
        self.filled = 0  # differences stored so far

    def step(self):
        if self.proposal is not None:
            self.w = self.proposal
        w = self.w
        fw = self.f(w)
        g = fw - w
        x = step_towards(w, fw, self.damping)
        residual = row_norms(g)
        self.offer(w, x, residual)
        if self.previous is not None:
            slot = self.filled % self.dX.shape[1]
            self.dX = replace_slot(self.dX, slot, x - self.previous[0])
            self.dG = replace_slot(self.dG, slot, g - self.previous[1])
            self.filled += 1
        self.previous = (x, g)
        self.proposal = self.keep(x if self.filled == 0 else self._mixed(x, g))
        return residual, row_norms(w)

    def _mixed(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``x - dX^T gamma``, each row's ``gamma`` solving the regularised least squares on
        ``dG``. Slots not yet filled are zero and get ``gamma = 0``, so the whole (contiguous)
        history is used. The products with ``g`` and ``gamma`` are row-vector times matrix
        ones: a batched matrix-vector product is several times slower on the CPU."""
        wide = torch.complex128 if g.is_complex() else torch.float64
        conjugated = self.dG.conj().transpose(1, 2)  # <a, b> = a^H b: complex rows too
        gram = (self.dG @ conjugated).conj().to(wide)
        weight = self.regularization * torch.linalg.matrix_norm(gram) + torch.finfo(wide).tiny
        system = gram + weight[:, None, None] * self.eye
        gamma = torch.linalg.solve(system, (g[:, None] @ conjugated)[:, 0].to(wide))
        # solve's result is column-major, on which a batched product loops over the rows
        gamma = gamma.to(g.dtype, memory_format=torch.contiguous_format)
        return torch.baddbmm(x[:, None], gamma[:, None], self.dX, alpha=-1)[:, 0]
