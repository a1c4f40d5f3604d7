"""Budgets are textbook budgets: with ``tol=0, max_iter=k`` every method makes exactly its
textbook number of products, counted by an autograd.Function inside Phi."""

from __future__ import annotations

import pytest
import torch

from implicit_layers import (
    CG,
    GMRES,
    Anderson,
    BiCGSTAB,
    Direct,
    FixedPoint,
    FunctionOperator,
    MatrixOperator,
    Neumann,
    NormalCG,
    Nystrom,
    fixed_point_layer,
)
from implicit_layers._operator import CountingOperator


class Counter(torch.autograd.Function):
    """The identity, counting evaluations, vector-Jacobian products and Jacobian-vector products."""

    evaluations = vjps = jvps = 0

    @staticmethod
    def forward(ctx, x):
        Counter.evaluations += 1
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        Counter.vjps += 1
        return grad

    @staticmethod
    def jvp(ctx, tangent):
        Counter.jvps += 1
        return tangent

    @classmethod
    def reset(cls) -> None:
        cls.evaluations = cls.vjps = cls.jvps = 0


def symmetric_problem(n: int = 12, seed: int = 0):
    """``Phi(w, lam) = A w + lam`` with ``A`` symmetric, eigenvalues in [-0.6, 0.8]: ``I - J``
    is symmetric positive definite, so every method (CG included) applies."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(-0.6, 0.8, n, dtype=torch.float64)
    A = q @ torch.diag(eigenvalues) @ q.T
    lam = torch.randn(n, generator=generator, dtype=torch.float64, requires_grad=True)
    return A, lam


def backward_counts(backward, k_expected_products: int, x_dim: int = 12):
    A, lam = symmetric_problem(x_dim)
    layer = fixed_point_layer(
        lambda w, lam: A @ Counter.apply(w) + lam,
        solver=FixedPoint(tol=1e-12, max_iter=500),
        backward=backward,
        on_failure="ignore",
    )
    w = layer(torch.zeros(x_dim, dtype=torch.float64), lam)
    Counter.reset()
    (w * torch.arange(1.0, x_dim + 1, dtype=torch.float64)).sum().backward()
    record = layer.last_backward
    return Counter.vjps, Counter.jvps, Counter.evaluations, record


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize(
    "make, vjps_per_iteration, transposed_per_iteration",
    [
        (lambda k: CG(max_iter=k, tol=0.0), 1, 0),
        (lambda k: Neumann(max_iter=k, tol=0.0), 1, 0),
        (lambda k: GMRES(max_iter=k, tol=0.0), 1, 0),
        (lambda k: GMRES(max_iter=k, tol=0.0, restart=2), 1, 0),  # restarts cost no product
        (lambda k: BiCGSTAB(max_iter=k, tol=0.0), 2, 0),
        (lambda k: NormalCG(max_iter=k, tol=0.0), 1, 1),
    ],
    ids=["CG", "Neumann", "GMRES", "GMRES-restart2", "BiCGSTAB", "NormalCG"],
)
def test_textbook_product_counts(make, vjps_per_iteration, transposed_per_iteration, k):
    vjps, jvps, evaluations, record = backward_counts(make(k), k)
    assert record.iterations == k
    # A transposed product (I - J) v is taken by reverse mode through the graph of J^T u, made
    # once by one more VJP through Phi; each product then runs the double-backward graph, which
    # the counter's backward (the identity) does not see. No forward-mode AD, no re-evaluation.
    setup = 1 if transposed_per_iteration else 0
    assert vjps == vjps_per_iteration * k + setup
    assert jvps == 0
    assert record.products == (vjps_per_iteration + transposed_per_iteration) * k
    assert evaluations == 1  # Phi is evaluated once with a graph for all products


def test_direct_builds_the_matrix_with_one_product_per_column():
    # the 9 products are taken in one backward pass, vectorised over the unit vectors
    vjps, jvps, evaluations, record = backward_counts(Direct(), 0, x_dim=9)
    assert (vjps, jvps, evaluations, record.products) == (1, 0, 1, 9)


@pytest.mark.parametrize("rank", [1, 4, 12])
def test_nystrom_takes_its_columns_in_one_pass_and_counts_each(rank):
    vjps, jvps, evaluations, record = backward_counts(Nystrom(rank=rank), 0)
    # the rank columns in one vectorised pass, then one product for the residual
    assert (vjps, jvps, evaluations, record.products) == (2, 0, 1, rank + 1)


@pytest.mark.parametrize("columns", [1, 3])
def test_a_product_with_m_columns_counts_m(columns):
    A, _ = symmetric_problem(6)
    V = torch.randn(6, columns, dtype=torch.float64)
    for operator in (MatrixOperator(A), FunctionOperator(lambda v: A @ v, size=6, dtype=A.dtype)):
        counted = CountingOperator(operator)
        assert torch.allclose(counted.mm(V), A @ V)
        assert counted.products == columns


def test_initial_guess_costs_one_product():
    A, _ = symmetric_problem(10)
    b = torch.randn(10, dtype=torch.float64)
    calls = []

    def matvec(v):
        calls.append(1)
        return v - A @ v

    _, record = CG(max_iter=4, tol=0.0).solve(matvec, b, x0=torch.ones(10, dtype=torch.float64))
    assert len(calls) == record.products == 5


def test_user_callable_backward_counts_its_products_and_one_residual_check():
    def three_neumann_terms(matvec, b):
        x = b.clone()
        term = b
        for _ in range(3):
            term = term - matvec(term)  # J^T term
            x = x + term
        return x

    vjps, _, _, record = backward_counts(three_neumann_terms, 0)
    assert record.iterations == 3 and record.products == 4 == vjps
    assert record.method == "three_neumann_terms"


def test_zero_gradient_costs_nothing():
    A, lam = symmetric_problem(8)
    layer = fixed_point_layer(lambda w, lam: A @ Counter.apply(w) + lam)
    w = layer(torch.zeros(8, dtype=torch.float64), lam)
    Counter.reset()
    (0.0 * w).sum().backward()
    assert (Counter.vjps, Counter.evaluations) == (0, 0)  # Phi is not even re-evaluated
    assert layer.last_backward.products == 0 and layer.last_backward.converged
    assert torch.equal(lam.grad, torch.zeros_like(lam))


@pytest.mark.parametrize("solver", [FixedPoint(max_iter=6, tol=0.0), Anderson(max_iter=6, tol=0.0)])
def test_forward_evaluations(solver):
    A, lam = symmetric_problem(8)
    layer = fixed_point_layer(
        lambda w, lam: A @ Counter.apply(w) + lam, solver=solver, on_failure="ignore"
    )
    Counter.reset()
    layer(torch.zeros(8, dtype=torch.float64), lam)
    assert Counter.evaluations == layer.last_forward.products == layer.last_forward.iterations == 6


def test_zero_iteration_budget_is_an_error():
    for make in (CG, GMRES, BiCGSTAB, Neumann, NormalCG, FixedPoint, Anderson):
        with pytest.raises(ValueError, match="max_iter.*positive integer"):
            make(max_iter=0)
