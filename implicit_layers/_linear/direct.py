"""A dense direct solve: the reference for small systems."""

from __future__ import annotations

import torch

from .._iteration import DEFAULT_TOL
from .._operator import CountingOperator
from .._options import check_nonnegative, options
from .._records import measured_record
from ._base import LinearSolver, with_rows


@options
class Direct(LinearSolver):
    """Builds the dense matrix of ``A`` and solves with ``torch.linalg.solve`` (LU).

    In a layer's backward the matrix costs ``n`` products (one per unit vector, all in one
    backward pass vectorised by ``torch.func.vmap``, which holds ``n`` copies of the
    intermediate tensors of one product) and the solve ``O(n^3)``: use it for small problems
    and as a reference. The achieved residual is judged against ``atol + tol * ||b||``; a
    singular matrix raises ``torch.linalg.LinAlgError``.

    >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]]); b = torch.tensor([1.0, 3.0])
    >>> x, record = Direct().solve(A, b)
    >>> x
    tensor([0., 1.])
    """

    tol: float = DEFAULT_TOL
    atol: float = 0.0

    def __post_init__(self) -> None:
        check_nonnegative(self, "tol", self.tol)
        check_nonnegative(self, "atol", self.atol)

    def _run(self, operator: CountingOperator, b, x0, unit):
        matrix = operator.as_matrix()
        try:
            x = torch.linalg.solve(matrix, b)
        except torch.linalg.LinAlgError as error:
            raise torch.linalg.LinAlgError(
                "Direct: the system matrix is singular, so the solution is not unique. In a "
                "backward that means w* is not isolated: for a fixed point 1 is an eigenvalue "
                "of dPhi/dw (I - J is singular), for an argmin the Hessian is singular."
            ) from error
        residual = b - matrix @ x
        record = measured_record(
            self.method,
            iterations=1,
            products=operator.products,
            residual=float(torch.linalg.vector_norm(residual)),
            scale=float(torch.linalg.vector_norm(b)),
            tol=self.tol,
            atol=self.atol / unit,
        )
        return x, with_rows(record, operator, residual, b)
