"""Problems with known conditioning: the maps, losses and cells the strategies draw.

Every problem is built from a seed in float64, rounded to its dtype, and its known quantities
(the contraction factor of a map, the condition number of a Hessian) are computed in float64 from
the rounded numbers, so they hold for the very tensors the layer sees. Everything a layer needs
is passed as a param (nothing is closed over), so :func:`check_gradients` can promote a float32
problem to float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "FixedPointProblem",
    "ArgminProblem",
    "DEQProblem",
    "affine_phi",
    "tanh_phi",
    "quadratic_loss",
    "logistic_loss",
    "TanhCell",
    "affine_problem",
    "tanh_problem",
    "quadratic_problem",
    "logistic_problem",
    "deq_problem",
]

f64 = torch.float64


@dataclass(frozen=True, eq=False)  # tensors do not compare as booleans
class FixedPointProblem:
    """A map ``phi(w, *params)`` with ``||dphi/dw||_2 <= contraction < 1`` at every ``w``.

    ``inputs`` is ``(w0, *params)``, ready for ``fixed_point_layer(phi)(*inputs)``; the params
    that require grad are the ones a gradient check perturbs. ``condition`` bounds the 2-norm
    condition number of ``I - J``: ``(1 + rho) / (1 - rho)`` with ``rho = contraction``.

    >>> from hypothesis import find
    >>> from implicit_layers.testing import affine_maps
    >>> problem = find(affine_maps(), lambda p: p.dim == 3)
    >>> problem.inputs[0].shape, problem.contraction < 1
    (torch.Size([3]), True)
    """

    kind: str
    dim: int
    dtype: torch.dtype
    seed: int
    contraction: float
    condition: float
    phi: Callable[..., torch.Tensor] = field(repr=False)
    inputs: tuple[torch.Tensor, ...] = field(repr=False)


@dataclass(frozen=True, eq=False)  # tensors do not compare as booleans
class ArgminProblem:
    """A loss ``f(w, lam, *data)``, ``mu``-strongly convex and ``L``-smooth in ``w`` everywhere.

    ``lam`` is a per-feature log weight decay: ``f`` includes ``0.5 sum(exp(lam) * w**2)``.
    ``inputs`` is ``(w0, lam, *data)``, ready for ``argmin_layer(f)(*inputs)``.
    ``mu <= eig(H) <= L`` for the Hessian ``H`` in ``w`` at every ``w``, so
    ``condition = L / mu`` bounds its condition number; ``GradientDescent(lr=1 / L)`` converges
    like ``(1 - 1 / condition)^k``.

    >>> from hypothesis import find
    >>> from implicit_layers.testing import quadratic_problems
    >>> problem = find(quadratic_problems(), lambda p: p.dim == 3)
    >>> problem.condition == problem.smoothness / problem.strong_convexity
    True
    """

    kind: str
    dim: int
    dtype: torch.dtype
    seed: int
    strong_convexity: float
    smoothness: float
    condition: float
    f: Callable[..., torch.Tensor] = field(repr=False)
    inputs: tuple[torch.Tensor, ...] = field(repr=False)


@dataclass(frozen=True, eq=False)  # tensors do not compare as booleans
class DEQProblem:
    """A deep-equilibrium cell ``z = tanh(W z + U x + b)`` with ``||W||_2 = contraction < 1``.

    ``cell`` is an ``nn.Module`` called as ``cell(z, x)`` on rows ``z`` of shape
    ``(batch, dim)``; its ``W``, ``U`` and ``b`` require grad. ``inputs`` is ``(z0, x)``, ready
    for ``fixed_point_layer(cell)(*inputs)``, with ``x`` requiring grad. ``condition`` bounds the
    condition number of ``I - J``, ``(1 + rho) / (1 - rho)``.

    >>> from hypothesis import find
    >>> from implicit_layers.testing import deq_cells
    >>> problem = find(deq_cells(), lambda p: p.batch == 2)
    >>> problem.cell(*problem.inputs).shape == problem.inputs[0].shape
    True
    """

    dim: int
    batch: int
    dtype: torch.dtype
    seed: int
    contraction: float
    condition: float
    cell: nn.Module = field(repr=False)
    inputs: tuple[torch.Tensor, ...] = field(repr=False)


# ---------------------------------------------------------------------------------------------
# The maps, losses and cells


def affine_phi(w: torch.Tensor, A: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``Phi(w, A, c) = A w + c``; ``J = A``."""
    return A @ w + c


def tanh_phi(w: torch.Tensor, W: torch.Tensor, U: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Phi(w, W, U, x) = tanh(W w + U x)``; ``J = diag(1 - Phi^2) W``, so ``||J|| <= ||W||``."""
    return torch.tanh(W @ w + U @ x)


def quadratic_loss(
    w: torch.Tensor, lam: torch.Tensor, A: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """``f = 0.5 (w - c)^T A (w - c) + 0.5 sum(exp(lam) w^2)``; ``H = A + diag(exp(lam))``."""
    r = w - c
    return 0.5 * r @ (A @ r) + 0.5 * (lam.exp() * w * w).sum()


def logistic_loss(
    w: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """``f = mean(softplus(-y * X w)) + 0.5 sum(exp(lam) w^2)`` with labels ``y`` in {-1, 1};
    ``H = X^T diag(s) X / N + diag(exp(lam))`` with ``0 < s <= 1/4``."""
    return nn.functional.softplus(-y * (X @ w)).mean() + 0.5 * (lam.exp() * w * w).sum()


class TanhCell(nn.Module):
    """``cell(z, x) = tanh(z W^T + x U^T + b)`` on rows; ``J`` is block diagonal with blocks
    ``diag(1 - z_i^2) W``, so ``||J||_2 <= ||W||_2``."""

    def __init__(self, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.W, self.U, self.b = nn.Parameter(W), nn.Parameter(U), nn.Parameter(b)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


# ---------------------------------------------------------------------------------------------
# Builders: seed -> problem


def _contraction_matrix(n: int, rho: float, generator: torch.Generator) -> torch.Tensor:
    """A non-symmetric Gaussian matrix scaled to spectral norm ``rho``."""
    m = torch.randn(n, n, generator=generator, dtype=f64)
    return rho * m / torch.linalg.matrix_norm(m, 2)


def _spectral(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.to(f64), 2))


def _leaf(value: torch.Tensor, dtype: torch.dtype, requires_grad: bool) -> torch.Tensor:
    return value.to(dtype).requires_grad_(requires_grad)


def _fixed_point_condition(rho: float) -> float:
    return (1 + rho) / (1 - rho)


def affine_problem(
    seed: int, dim: int, contraction: float, dtype: torch.dtype
) -> FixedPointProblem:
    """``w = A w + c`` with ``||A||_2 = contraction``; ``A`` and ``c`` require grad."""
    g = torch.Generator().manual_seed(seed)
    A = _leaf(_contraction_matrix(dim, contraction, g), dtype, True)
    c = _leaf(torch.randn(dim, generator=g, dtype=f64), dtype, True)
    w0 = torch.randn(dim, generator=g, dtype=f64).to(dtype)
    rho = _spectral(A.detach())
    return FixedPointProblem(
        "affine", dim, dtype, seed, rho, _fixed_point_condition(rho), affine_phi, (w0, A, c)
    )


def tanh_problem(
    seed: int, dim: int, input_dim: int, contraction: float, dtype: torch.dtype
) -> FixedPointProblem:
    """``w = tanh(W w + U x)`` with ``||W||_2 = contraction``; ``W`` and ``x`` require grad.

    ``U x`` is about 0.5 in size, so ``tanh`` is far from saturation and ``J`` is not small.
    """
    g = torch.Generator().manual_seed(seed)
    W = _leaf(_contraction_matrix(dim, contraction, g), dtype, True)
    U = _leaf(
        0.5 * torch.randn(dim, input_dim, generator=g, dtype=f64) / input_dim**0.5, dtype, False
    )
    x = _leaf(torch.randn(input_dim, generator=g, dtype=f64), dtype, True)
    w0 = torch.zeros(dim, dtype=dtype)
    rho = _spectral(W.detach())
    return FixedPointProblem(
        "tanh", dim, dtype, seed, rho, _fixed_point_condition(rho), tanh_phi, (w0, W, U, x)
    )


def _weight_decay(dim: int, condition: float, generator: torch.Generator) -> torch.Tensor:
    """``lam`` with ``exp(lam)`` in ``[1, top]``, ``top = min(2, (1 + condition) / 2)``, one value
    per feature: the rest of the condition number, at least ``(condition - 1) / 2``, is left to
    the data term."""
    top = min(2.0, (1 + condition) / 2)
    return torch.log1p((top - 1) * torch.rand(dim, generator=generator, dtype=f64))


def quadratic_problem(seed: int, dim: int, condition: float, dtype: torch.dtype) -> ArgminProblem:
    """``f = 0.5 (w - c)^T A (w - c) + 0.5 sum(exp(lam) w^2)``, ``A = Q diag(s) Q^T`` with
    ``s`` in ``[0, condition - max exp(lam)]``, so ``cond(H) <= condition``; ``lam`` and ``c``
    require grad. The condition number stored is the exact one of the rounded ``H``."""
    g = torch.Generator().manual_seed(seed)
    lam = _weight_decay(dim, condition, g)
    Q = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=f64))[0]
    s = torch.rand(dim, generator=g, dtype=f64)
    s[0], s[-1] = 0.0, 1.0  # the spectrum spans [0, condition - max exp(lam)]
    s = s * (condition - float(lam.exp().max()))
    A = Q @ torch.diag(s) @ Q.T
    A = (A + A.T) / 2
    c = torch.randn(dim, generator=g, dtype=f64)
    lam, A, c = _leaf(lam, dtype, True), _leaf(A, dtype, False), _leaf(c, dtype, True)
    H = A.detach().to(f64) + torch.diag(lam.detach().to(f64).exp())
    eigenvalues = torch.linalg.eigvalsh((H + H.T) / 2)
    mu, L = float(eigenvalues[0]), float(eigenvalues[-1])
    w0 = torch.zeros(dim, dtype=dtype)
    return ArgminProblem(
        "quadratic", dim, dtype, seed, mu, L, L / mu, quadratic_loss, (w0, lam, A, c)
    )


def logistic_problem(seed: int, dim: int, condition: float, dtype: torch.dtype) -> ArgminProblem:
    """Logistic regression on ``N = 4 dim`` points with per-feature weight decay; ``X`` is scaled
    so that ``L = ||X||_2^2 / (4 N) + max exp(lam) = condition`` and ``mu = min exp(lam) >= 1``
    bound the Hessian at every ``w``. ``lam`` requires grad; the stored ``condition`` is the bound
    ``L / mu`` of the rounded data."""
    g = torch.Generator().manual_seed(seed)
    lam = _weight_decay(dim, condition, g)
    samples = 4 * dim
    X = torch.randn(samples, dim, generator=g, dtype=f64)
    truth = torch.randn(dim, generator=g, dtype=f64)
    noise = 0.5 * torch.randn(samples, generator=g, dtype=f64)
    y = torch.where(X @ truth + noise >= 0, 1.0, -1.0).to(f64)
    curvature = condition - float(lam.exp().max())  # wanted ||X||^2 / (4 N)
    X = X * math.sqrt(4 * samples * curvature) / torch.linalg.matrix_norm(X, 2)
    lam, X, y = _leaf(lam, dtype, True), _leaf(X, dtype, False), _leaf(y, dtype, False)
    decay = lam.detach().to(f64).exp()
    L = _spectral(X.detach()) ** 2 / (4 * samples) + float(decay.max())
    mu = float(decay.min())
    w0 = torch.zeros(dim, dtype=dtype)
    return ArgminProblem(
        "logistic", dim, dtype, seed, mu, L, L / mu, logistic_loss, (w0, lam, X, y)
    )


def deq_problem(
    seed: int, dim: int, input_dim: int, batch: int, contraction: float, dtype: torch.dtype
) -> DEQProblem:
    """A :class:`TanhCell` with ``||W||_2 = contraction`` and inputs ``x`` of shape
    ``(batch, input_dim)``; pre-activations are about 0.5 in size."""
    g = torch.Generator().manual_seed(seed)
    W = _contraction_matrix(dim, contraction, g)
    U = 0.5 * torch.randn(dim, input_dim, generator=g, dtype=f64) / input_dim**0.5
    b = 0.2 * torch.randn(dim, generator=g, dtype=f64)
    x = _leaf(torch.randn(batch, input_dim, generator=g, dtype=f64), dtype, True)
    cell = TanhCell(W.to(dtype), U.to(dtype), b.to(dtype))
    rho = _spectral(cell.W.detach())
    z0 = torch.zeros(batch, dim, dtype=dtype)
    return DEQProblem(dim, batch, dtype, seed, rho, _fixed_point_condition(rho), cell, (z0, x))
