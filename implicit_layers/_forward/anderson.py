"""Anderson acceleration (type II) with a residual-scaled regularisation."""

from __future__ import annotations

import torch

from .._options import check_in_interval, check_nonnegative, check_positive_int, options
from ._base import BestRowState, IterativeForwardSolver, replace_slot, row_norms


@options
class Anderson(IterativeForwardSolver):
    """Anderson acceleration (Anderson 1965; Walker and Ni 2011) of ``w <- f(w)``.

    With residuals ``g_i = f(w_i) - w_i`` and the differences ``dG``, ``dW`` of the last
    ``memory`` iterates, each step solves the small least-squares problem
    ``gamma = argmin ||g_k - dG gamma||^2 + reg ||gamma||^2`` and moves to
    ``w_{k+1} = w_k + damping g_k - (dW + damping dG) gamma``. The Tikhonov weight is
    ``reg = regularization * ||dG dG^T||_F``, relative to the residuals, so it neither
    swamps the step early nor vanishes against them late. The iterate with the smallest
    residual is returned (Anderson's residual is not monotone). One evaluation per iteration;
    the small solve runs in float64.

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
        return _AndersonState(f, w0, self.memory, self.damping, self.regularization)


class _AndersonState(BestRowState):
    def __init__(self, f, w0, memory, damping, regularization):
        super().__init__(w0)
        self.f, self.damping, self.regularization = f, damping, regularization
        rows, n = w0.shape
        self.dW = w0.new_zeros(rows, memory, n)
        self.dG = w0.new_zeros(rows, memory, n)
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None
        self.filled = 0  # differences stored so far

    def step(self):
        if self.proposal is not None:
            self.w = self.proposal
        w = self.w
        g = self.f(w) - w
        residual = row_norms(g)
        self.track(w, residual)
        if self.previous is not None:
            slot = self.filled % self.dW.shape[1]
            self.dW = replace_slot(self.dW, slot, w - self.previous[0])
            self.dG = replace_slot(self.dG, slot, g - self.previous[1])
            self.filled += 1
        self.previous = (w, g)
        self.proposal = self.keep(w + self.damping * g - self._correction(g))
        return residual, row_norms(w)

    def _correction(self, g: torch.Tensor) -> torch.Tensor:
        count = min(self.filled, self.dW.shape[1])
        if count == 0:
            return torch.zeros_like(g)
        dG, dW = self.dG[:, :count], self.dW[:, :count]
        gram = (dG @ dG.transpose(1, 2)).double()
        weight = self.regularization * torch.linalg.matrix_norm(gram) + torch.finfo(gram.dtype).tiny
        eye = torch.eye(count, dtype=gram.dtype, device=gram.device)
        system = gram + weight[:, None, None] * eye
        gamma = torch.linalg.solve(system, (dG @ g.unsqueeze(2)).double()).to(g.dtype)
        return ((dW + self.damping * dG).transpose(1, 2) @ gamma).squeeze(2)
