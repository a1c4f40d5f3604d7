"""Linear operators: what a linear solver needs to know about ``A`` in ``A x = b``.

Iterative solvers only call ``mv`` (``A v``); ``NormalCG`` also calls ``rmv`` (``A^T v``),
``Nystrom`` calls ``mm`` (``A V`` for a few columns) and ``Direct`` calls ``as_matrix``. Every
application goes through :class:`CountingOperator`, so each solve reports exactly how many
products it spent (``A V`` counts one per column).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["LinearOperator", "MatrixOperator", "FunctionOperator", "as_operator"]


class LinearOperator:
    """An ``n x n`` linear map on flat vectors.

    Subclasses implement :meth:`mv` and, where they can, :meth:`rmv`. :meth:`mm` applies ``A``
    to the columns of a matrix one by one unless a subclass can do them at once;
    :meth:`as_matrix` is ``mm`` of the identity unless a subclass knows the matrix already.
    ``rows``, where set, says the map is block-diagonal over that many equal blocks of the
    vector (the samples of a batch, which do not mix, even a batch of one), so a solver may
    judge and record each block on its own; None (default) is one vector.
    """

    size: int
    dtype: torch.dtype
    device: torch.device
    rows: int | None = None

    def mv(self, vector: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rmv(self, vector: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no transpose product `rmv`; solvers on the normal "
            "equations need one. Pass a MatrixOperator or a FunctionOperator with `rmv`."
        )

    def mm(self, matrix: torch.Tensor) -> torch.Tensor:
        """``A V`` for an ``n x m`` matrix ``V``: ``m`` products."""
        return torch.stack([self.mv(column) for column in matrix.T], dim=1)

    def as_matrix(self) -> torch.Tensor:
        return self.mm(torch.eye(self.size, dtype=self.dtype, device=self.device))


class MatrixOperator(LinearOperator):
    """A dense matrix as an operator.

    >>> A = MatrixOperator(torch.tensor([[2.0, 1.0], [0.0, 3.0]]))
    >>> A.mv(torch.tensor([1.0, 1.0]))
    tensor([3., 3.])
    """

    def __init__(self, matrix: torch.Tensor):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"`matrix` must be square, got shape {tuple(matrix.shape)}.")
        self.matrix = matrix
        self.size = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device

    def mv(self, vector: torch.Tensor) -> torch.Tensor:
        return self.matrix @ vector

    def mm(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.matrix @ matrix

    def rmv(self, vector: torch.Tensor) -> torch.Tensor:
        return self.matrix.mH @ vector

    def as_matrix(self) -> torch.Tensor:
        return self.matrix


class FunctionOperator(LinearOperator):
    """An operator given by a matrix-vector product function (and optionally its transpose).

    >>> A = FunctionOperator(lambda v: 2 * v, size=3, dtype=torch.float32)
    >>> A.mv(torch.ones(3))
    tensor([2., 2., 2.])
    """

    def __init__(
        self,
        mv: Callable[[torch.Tensor], torch.Tensor],
        *,
        size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        rmv: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self._mv, self._rmv = mv, rmv
        self.size, self.dtype, self.device = size, dtype, torch.device(device)

    def mv(self, vector: torch.Tensor) -> torch.Tensor:
        return self._mv(vector)

    def rmv(self, vector: torch.Tensor) -> torch.Tensor:
        if self._rmv is None:
            return super().rmv(vector)
        return self._rmv(vector)


class CountingOperator(LinearOperator):
    """Wraps an operator and counts its products (``mv`` and ``rmv`` alike, ``mm`` one per
    column)."""

    def __init__(self, inner: LinearOperator):
        self.inner = inner
        self.size, self.dtype, self.device = inner.size, inner.dtype, inner.device
        self.rows = inner.rows
        self.products = 0

    def mv(self, vector: torch.Tensor) -> torch.Tensor:
        self.products += 1
        return self.inner.mv(vector)

    def mm(self, matrix: torch.Tensor) -> torch.Tensor:
        self.products += matrix.shape[1]
        return self.inner.mm(matrix)

    def rmv(self, vector: torch.Tensor) -> torch.Tensor:
        self.products += 1
        return self.inner.rmv(vector)

    def as_matrix(self) -> torch.Tensor:
        if type(self.inner).as_matrix is LinearOperator.as_matrix:
            return LinearOperator.as_matrix(self)  # built from counted products
        return self.inner.as_matrix()


def as_operator(operator: LinearOperator | torch.Tensor | Callable, b: torch.Tensor):
    """An operator from a :class:`LinearOperator`, a square matrix, or a function ``v -> A v``."""
    if isinstance(operator, LinearOperator):
        result = operator
    elif isinstance(operator, torch.Tensor):
        result = MatrixOperator(operator)
    elif callable(operator):
        result = FunctionOperator(operator, size=b.numel(), dtype=b.dtype, device=b.device)
    else:
        raise TypeError(
            "`operator` must be a LinearOperator, a square matrix or a function v -> A v; "
            f"got {type(operator).__name__}."
        )
    if result.size != b.numel():
        raise ValueError(
            f"`b` must have {result.size} entries to match the operator, got {b.numel()}."
        )
    return result
