"""A wrapper around ``torch.optim.LBFGS`` that records and judges its solve."""

from __future__ import annotations

import torch

from .._options import check_in_interval, check_nonnegative, check_positive_int, options
from .._records import measured_record
from ._base import CountingObjective, Minimizer


@options
class LBFGS(Minimizer):
    """L-BFGS by ``torch.optim.LBFGS`` (strong-Wolfe line search by default).

    Runs at most ``max_iter`` iterations; stops early once the largest gradient entry is below
    ``(atol + tol * ||grad f(w0)||) / sqrt(n)``, which guarantees the library's rule
    ``||grad f(w)|| <= atol + tol * ||grad f(w0)||``. The final gradient is then measured (one
    extra evaluation, counted) and judged by that rule: status ``CONVERGED`` or ``INACCURATE``.
    The rule is relative to the first gradient: when warm-starting close to the minimum, give
    an ``atol`` as well. The line search compares function values, so relative gradients much
    below ``sqrt(eps)`` (about 1e-8 in float64, 3e-4 in float32) may be out of reach: set
    ``tol`` above that.

    >>> w, record = LBFGS(tol=1e-8).solve(lambda w: ((w - 3) ** 2).sum() + w.prod() ** 2,
    ...                                    torch.zeros(2, dtype=torch.float64))
    >>> record.converged
    True
    """

    max_iter: int = 100
    tol: float = 1e-6
    atol: float = 0.0
    lr: float = 1.0
    history_size: int = 10
    line_search: str | None = "strong_wolfe"

    def __post_init__(self) -> None:
        check_positive_int(self, "max_iter", self.max_iter)
        check_nonnegative(self, "tol", self.tol)
        check_nonnegative(self, "atol", self.atol)
        check_in_interval(self, "lr", self.lr, 0.0, float("inf"))
        check_positive_int(self, "history_size", self.history_size)
        if self.line_search not in ("strong_wolfe", None):
            raise ValueError(
                f"LBFGS: `line_search` must be 'strong_wolfe' or None, got {self.line_search!r}."
            )

    def _run(self, objective: CountingObjective, w0):
        w = w0.detach().clone().requires_grad_()
        _, start = objective(w0)
        threshold = self.atol + self.tol * float(torch.linalg.vector_norm(start))
        optimizer = torch.optim.LBFGS(
            [w],
            lr=self.lr,
            max_iter=self.max_iter,
            max_eval=None,
            tolerance_grad=threshold / w.numel() ** 0.5,
            tolerance_change=0.0,
            history_size=self.history_size,
            line_search_fn=self.line_search,
        )

        def closure() -> torch.Tensor:
            loss, grad = objective(w)
            w.grad = grad
            return loss

        optimizer.step(closure)
        iterations = optimizer.state[w].get("n_iter", 0)
        w = w.detach()
        _, end = objective(w)
        record = measured_record(
            self.method,
            iterations=iterations,
            products=objective.evaluations,
            residual=float(torch.linalg.vector_norm(end)),
            scale=float(torch.linalg.vector_norm(start)),
            tol=self.tol,
            atol=self.atol,
        )
        return w, record
