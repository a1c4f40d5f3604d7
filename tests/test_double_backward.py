"""Second derivatives through layers: ``create_graph=True``, gradgradcheck, nesting, three levels.

References: ``torch.autograd.gradgradcheck`` (finite differences of our first derivative against
our second derivative), and double backpropagation through an unrolled, converged solver, which
shares nothing with the implicit machinery.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from implicit_layers import (
    CG,
    GMRES,
    ConvergenceWarning,
    Direct,
    FixedPoint,
    argmin_layer,
    fixed_point_layer,
)
from implicit_layers.nn import DEQ
from implicit_layers.testing import logistic_problems, tanh_maps

f64 = torch.float64
EXACT_FORWARD = FixedPoint(tol=1e-15, max_iter=5000)


def newton(f, w0: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Newton's method with the dense Hessian: an exact inner solver for small argmins."""
    w = w0.clone()
    for _ in range(steps):
        w = w - torch.linalg.solve(torch.func.hessian(f)(w), torch.func.grad(f)(w))
    return w


def unrolled_fixed_point(phi, w0: torch.Tensor, params, steps: int) -> torch.Tensor:
    """``steps`` iterations of ``w <- phi(w, *params)`` with a graph: twice differentiable."""
    w = w0
    for _ in range(steps):
        w = phi(w, *params)
    return w


def steps_to_converge(contraction: float) -> int:
    """Iterations for ``contraction ** k`` to fall below float64 round-off, with a margin
    (the derivatives of the iterates converge at the same rate, times a polynomial)."""
    return int(math.log(1e-18) / math.log(contraction)) + 40


def hessian_vector_product(loss_of, params, vector) -> list[torch.Tensor]:
    """``d/dparams <grad loss, vector>`` by double backpropagation."""
    grads = torch.autograd.grad(loss_of(*params), params, create_graph=True)
    inner = sum((g * v).sum() for g, v in zip(grads, vector))
    return list(torch.autograd.grad(inner, params))


# --- gradgradcheck ---------------------------------------------------------------------------


@pytest.mark.parametrize("backward", [GMRES(tol=1e-14), Direct()], ids=["GMRES", "Direct"])
def test_gradgradcheck_fixed_point(backward):
    torch.manual_seed(0)
    A = torch.randn(4, 4, dtype=f64)
    B = (0.6 * A / torch.linalg.matrix_norm(A, 2)).requires_grad_()
    lam = torch.randn(4, dtype=f64, requires_grad=True)
    layer = fixed_point_layer(
        lambda w, lam, B: B @ torch.tanh(w) + lam, solver=EXACT_FORWARD, backward=backward
    )

    def loss(lam, B):
        return torch.sin(layer(torch.zeros(4, dtype=f64), lam, B))

    assert torch.autograd.gradgradcheck(loss, (lam, B))


@pytest.mark.parametrize("backward", [CG(tol=1e-15), Direct()], ids=["CG", "Direct"])
def test_gradgradcheck_argmin(backward):
    torch.manual_seed(0)
    X, y = torch.randn(20, 4, dtype=f64), torch.randn(20, dtype=f64)
    lam = torch.randn(4, dtype=f64, requires_grad=True)

    def inner(w, lam):
        return ((X @ w - y) ** 2).mean() + (lam.exp() * w * w).sum() + 0.1 * (w**4).sum()

    layer = argmin_layer(inner, solver=newton, backward=backward)

    def loss(lam):
        return layer(torch.zeros(4, dtype=f64), lam) ** 2

    assert torch.autograd.gradgradcheck(loss, (lam,))


# --- against double backpropagation through a converged unrolled solver ----------------------


@settings(max_examples=15, deadline=None)
@given(problem=tanh_maps(dtypes=[f64], contraction=(0.1, 0.8)), seed=st.integers(0, 2**16))
def test_hessian_vector_product_matches_unrolled_fixed_point(problem, seed):
    w0, W, U, x = problem.inputs
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(problem.dim, generator=generator, dtype=f64)
    vector = [torch.randn(t.shape, generator=generator, dtype=f64) for t in (W, x)]
    layer = fixed_point_layer(problem.phi, solver=EXACT_FORWARD, backward=GMRES(tol=1e-15))
    steps = steps_to_converge(problem.contraction)

    def implicit(W, x):
        return (torch.sin(layer(w0, W, U, x)) * target).sum()

    def unrolled(W, x):
        return (torch.sin(unrolled_fixed_point(problem.phi, w0, (W, U, x), steps)) * target).sum()

    got = hessian_vector_product(implicit, [W, x], vector)
    expected = hessian_vector_product(unrolled, [W, x], vector)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11 * float(e.abs().max()) + 1e-14)


@settings(max_examples=6, deadline=None)
@given(problem=logistic_problems(dims=(2, 5), dtypes=[f64], condition=(2.0, 4.0)))
def test_hessian_vector_product_matches_unrolled_gradient_descent(problem):
    w0, lam, X, y = problem.inputs
    layer = argmin_layer(problem.f, solver=newton, backward=CG(tol=1e-15))
    lr = 1 / problem.smoothness
    steps = steps_to_converge(1 - 1 / problem.condition)

    def unrolled_minimum(lam):
        w = w0
        for _ in range(steps):
            (grad,) = torch.autograd.grad(problem.f(w, lam, X, y), w, create_graph=True)
            w = w - lr * grad
        return w

    def outer(w):
        return (w * torch.linspace(-1, 1, problem.dim, dtype=f64)).sum() + (w**2).sum()

    w0.requires_grad_()
    vector = [torch.linspace(0.5, 1.5, problem.dim, dtype=f64)]
    got = hessian_vector_product(lambda lam: outer(layer(w0, lam, X, y)), [lam], vector)
    expected = hessian_vector_product(lambda lam: outer(unrolled_minimum(lam)), [lam], vector)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-8, atol=1e-12)


class Cell(nn.Module):
    def __init__(self, n: int, rho: float = 0.5):
        super().__init__()
        self.linear = nn.Linear(n, n, dtype=f64)
        with torch.no_grad():
            self.linear.weight.mul_(rho / torch.linalg.matrix_norm(self.linear.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.linear(z) + x)


def test_deq_input_gradient_penalty_matches_unrolled():
    """A gradient penalty ``||dL/dx||^2``, backpropagated into the cell's parameters: the
    typical create_graph use of a DEQ (robust training, Lipschitz regularisation)."""
    torch.manual_seed(0)
    cell = Cell(5)
    deq = DEQ(cell, solver=EXACT_FORWARD, backward=GMRES(tol=1e-15))
    x = torch.randn(3, 5, dtype=f64, requires_grad=True)
    target = torch.randn(3, 5, dtype=f64)

    def penalty_grads(solve):
        cell.zero_grad()
        loss = ((solve(x) - target) ** 2).sum()
        (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
        grad_x.pow(2).sum().backward()
        return [p.grad.clone() for p in cell.parameters()]

    got = penalty_grads(deq)
    expected = penalty_grads(lambda x: unrolled_fixed_point(cell, torch.zeros_like(x), (x,), 120))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


# --- nesting ---------------------------------------------------------------------------------


def test_layer_inside_a_layer_matches_a_dense_reference():
    """The outer map contains an inner fixed point: ``u*(w) = B tanh(u*) + w`` and
    ``w* = A tanh(u*(w*)) + lam``; its first and second derivatives against unrolling both."""
    torch.manual_seed(1)
    A, B = (0.5 * M / torch.linalg.matrix_norm(M, 2) for M in torch.randn(2, 4, 4, dtype=f64))
    inner = fixed_point_layer(
        lambda u, w: B @ torch.tanh(u) + w, solver=EXACT_FORWARD, backward=GMRES(tol=1e-15)
    )
    zero = torch.zeros(4, dtype=f64)
    outer = fixed_point_layer(
        lambda w, lam: A @ torch.tanh(inner(zero, w)) + lam,
        solver=EXACT_FORWARD,
        backward=GMRES(tol=1e-15),
    )
    lam = torch.randn(4, dtype=f64, requires_grad=True)
    vector = [torch.randn(4, dtype=f64)]

    def unrolled(lam):
        def phi(w):
            return (
                A @ torch.tanh(unrolled_fixed_point(lambda u: B @ torch.tanh(u) + w, zero, (), 80))
                + lam
            )

        return torch.sin(unrolled_fixed_point(phi, zero, (), 80)).sum()

    got = hessian_vector_product(lambda lam: torch.sin(outer(zero, lam)).sum(), [lam], vector)
    expected = hessian_vector_product(unrolled, [lam], vector)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-9, atol=1e-12)


# --- records and failures --------------------------------------------------------------------


def test_second_order_solves_are_recorded_and_reported():
    A = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.3, 0.2], [0.0, 0.2, 0.4]], dtype=f64)
    lam = torch.ones(3, dtype=f64, requires_grad=True)
    layer = fixed_point_layer(
        lambda w, lam: A @ torch.tanh(w) + lam, solver=EXACT_FORWARD, backward=GMRES(max_iter=1)
    )
    w, info = layer.solve(torch.zeros(3, dtype=f64), lam)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        (grad,) = torch.autograd.grad(w.pow(3).sum(), lam, create_graph=True)
        grad.sum().backward()
    messages = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert any(m.startswith("backward solve") for m in messages)
    assert any(m.startswith("order-2 backward solve") for m in messages)
    assert info.adjoint is not None and info.adjoint.forward.method == "GMRES"
    assert info.adjoint.backward.iterations == 1 and not info.adjoint.backward.converged


# --- three levels ----------------------------------------------------------------------------


def three_level_data():
    generator = torch.Generator().manual_seed(3)
    truth = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=f64)

    def split(n):
        X = torch.randn(n, 4, generator=generator, dtype=f64)
        return X, X @ truth + 0.5 * torch.randn(n, generator=generator, dtype=f64)

    return split(12), split(10), split(10)


def newton_by_jacrev(f, w0: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """Newton's method whose Hessian comes from ``jacrev(jacrev(f))``: exact, and it works
    through an implicit layer inside ``f`` (reverse over reverse; vmap loops over columns)."""
    w = w0.clone()
    for _ in range(steps):
        hessian = torch.func.jacrev(torch.func.jacrev(f))(w)
        w = w - torch.linalg.solve(hessian, torch.func.grad(f)(w))
    return w


def test_three_level_gradient_matches_a_dense_reference():
    """A hyper-hyperparameter: ``mu`` sets how strongly per-feature weight decays ``lam`` are
    pulled to a common prior while ``lam`` minimises the validation loss of ridge weights
    ``w*(lam)``; the outer loss is the test loss. Written by nesting two argmin layers; the
    reference is the same problem in closed form, differentiated densely with autograd."""
    (X1, y1), (X2, y2), (X3, y3) = three_level_data()
    prior = torch.full((4,), -1.0, dtype=f64)

    def train_loss(w, lam):
        return ((X1 @ w - y1) ** 2).mean() + (lam.exp() * w * w).sum()

    weights = argmin_layer(train_loss, solver=newton, backward=CG(tol=1e-15))
    zero = torch.zeros(4, dtype=f64)

    def validation_objective(lam, mu, fit=lambda lam: weights(zero, lam)):
        return ((X2 @ fit(lam) - y2) ** 2).mean() + mu.exp() * ((lam - prior) ** 2).sum()

    decays = argmin_layer(validation_objective, solver=newton_by_jacrev, backward=GMRES(tol=1e-14))
    mu = torch.tensor(-1.0, dtype=f64, requires_grad=True)
    lam_star = decays(prior.clone(), mu)
    test_loss = ((X3 @ weights(zero, lam_star) - y3) ** 2).mean()
    (got,) = torch.autograd.grad(test_loss, mu)

    def ridge(lam):  # w*(lam) in closed form
        return torch.linalg.solve(X1.T @ X1 / 12 + torch.diag(lam.exp()), X1.T @ y1 / 12)

    mu0 = mu.detach()
    lam = prior.clone()
    for _ in range(30):
        objective = lambda lam: validation_objective(lam, mu0, ridge)  # noqa: E731
        H = torch.autograd.functional.hessian(objective, lam)
        lam = lam - torch.linalg.solve(H, torch.autograd.functional.jacobian(objective, lam))
    torch.testing.assert_close(lam_star.detach(), lam, rtol=1e-10, atol=1e-12)
    H = torch.autograd.functional.hessian(lambda lam: validation_objective(lam, mu0, ridge), lam)
    mixed = torch.autograd.functional.jacobian(
        lambda mu: torch.func.grad(lambda lam: validation_objective(lam, mu, ridge))(lam), mu0
    )
    dlam_dmu = -torch.linalg.solve(H, mixed)
    outer = torch.func.grad(lambda lam: ((X3 @ ridge(lam) - y3) ** 2).mean())(lam)
    torch.testing.assert_close(got, outer @ dlam_dmu, rtol=1e-9, atol=1e-13)
