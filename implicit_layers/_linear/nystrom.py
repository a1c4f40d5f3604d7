"""The Nystrom approximation of a symmetric positive semi-definite system."""

from __future__ import annotations

import math

import torch

from .._operator import CountingOperator
from .._options import check_in_interval, check_positive_int, options
from .._records import measured_record, unmeasured_record
from ._base import LinearSolver, with_rows


@options
class Nystrom(LinearSolver):
    """Nystrom approximation (Hataya and Yamada, AISTATS 2023) for symmetric positive
    semi-definite ``A``, as for a Hessian.

    ``rank`` columns ``C = A[:, K]`` at random indices ``K`` give ``A ~ C W^+ C^T`` with
    ``W = A[K, K]``; with the shift ``rho`` the Woodbury identity solves
    ``(C W^+ C^T + rho I) x = b`` as ``x = (b - C (rho W + C^T C)^{-1} C^T b) / rho``.
    The columns cost ``rank`` products, taken together (in a layer, one backward pass
    vectorised by ``torch.func.vmap``), the rest ``O(n rank^2)``. A larger ``rank`` captures
    more of the spectrum; ``rho`` regularises the small eigenvalues the sketch misses: too small
    and the neglected directions blow up by ``1 / rho``, too large and every direction is damped.
    The Woodbury form divides by ``rho``, so rounding grows like ``eps / rho``: keep ``rho``
    well above the working precision (float32: ``rho >= 1e-3`` or so).
    It is an approximation: its residual is measured with one extra product (skip it with
    ``measure_residual=False``, status ``UNCHECKED``) and reported, not judged.

    >>> A = torch.diag(torch.tensor([4.0, 3.0, 2.0], dtype=torch.float64))
    >>> b = torch.ones(3, dtype=torch.float64)
    >>> x, record = Nystrom(rank=3, rho=1e-6).solve(A, b)
    >>> torch.allclose(x, 1 / torch.diag(A), atol=1e-5), record.products
    (True, 4)
    """

    rank: int = 10
    rho: float = 0.1
    seed: int | None = 0
    measure_residual: bool = True

    def __post_init__(self) -> None:
        check_positive_int(self, "rank", self.rank)
        check_in_interval(self, "rho", self.rho, 0.0, math.inf)

    def _run(self, operator: CountingOperator, b, x0, unit):
        n = b.numel()
        rank = min(self.rank, n)
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        indices = torch.randperm(n, generator=generator)[:rank].tolist()
        units = b.new_zeros(n, rank)
        units[indices, range(rank)] = 1
        columns = operator.mm(units)  # C = A[:, K]: n x rank
        core = self.rho * columns[indices] + columns.mH @ columns  # rho W + C^H C
        core = 0.5 * (core + core.mH)
        try:
            x = (b - columns @ torch.linalg.solve(core, columns.mH @ b)) / self.rho
        except torch.linalg.LinAlgError as error:
            raise torch.linalg.LinAlgError(
                f"Nystrom: its {rank} x {rank} core matrix rho W + C^H C is singular in "
                f"{b.dtype} (rho = {self.rho}): the sketched columns are nearly dependent. "
                "Raise `rho`, lower `rank`, solve in float64, or use GMRES or Direct."
            ) from error
        if not self.measure_residual:
            finite = bool(torch.isfinite(x).all())
            return x, unmeasured_record(
                self.method, iterations=rank, products=operator.products, finite=finite
            )
        residual = b - operator.mv(x)
        record = measured_record(
            self.method,
            iterations=rank,
            products=operator.products,
            residual=float(torch.linalg.vector_norm(residual)),
            scale=float(torch.linalg.vector_norm(b)),
        )
        return x, with_rows(record, operator, residual, b)


__all__ = ["Nystrom"]
