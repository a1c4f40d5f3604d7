"""argmin_layer against closed forms, dense float64 Hessians and fixed_point_layer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_layers import (
    CG,
    GMRES,
    LBFGS,
    ConvergenceError,
    Direct,
    FixedPoint,
    GradientDescent,
    Status,
    argmin_layer,
    fixed_point_layer,
)

f64 = torch.float64


def ridge_data(n: int, d: int, seed: int, dtype=f64):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=generator, dtype=f64) / d**0.5
    y = X @ torch.randn(d, generator=generator, dtype=f64) + 0.3 * torch.randn(
        n, generator=generator, dtype=f64
    )
    X_val = torch.randn(n, d, generator=generator, dtype=f64) / d**0.5
    y_val = X_val @ torch.randn(d, generator=generator, dtype=f64)
    log_lam = 0.5 * torch.randn(d, generator=generator, dtype=f64) - 1.0
    return [t.to(dtype) for t in (X, y, X_val, y_val, log_lam)]


def ridge_loss(X, y):
    def f(w, log_lam):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (log_lam.exp() * w * w).sum()

    return f


def ridge_reference(X, y, X_val, y_val, log_lam):
    """``w*`` and ``d L_val / d log_lam`` in closed form (float64)."""
    X, y, X_val, y_val, log_lam = (t.double() for t in (X, y, X_val, y_val, log_lam))
    lam = log_lam.exp()
    H = X.T @ X / len(y) + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ y / len(y))
    b = X_val.T @ (X_val @ w - y_val) / len(y_val)
    return w, -(lam * w) * torch.linalg.solve(H, b)


def validation_loss(w, X_val, y_val):
    return 0.5 * ((X_val @ w - y_val) ** 2).mean()


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(10, 40),
    d=st.integers(2, 12),
    seed=st.integers(0, 2**31 - 1),
    backward=st.sampled_from([CG(tol=1e-12), GMRES(tol=1e-12), Direct()]),
)
def test_ridge_hypergradient_matches_closed_form(n, d, seed, backward):
    X, y, X_val, y_val, log_lam = ridge_data(n, d, seed)
    layer = argmin_layer(ridge_loss(X, y), solver=LBFGS(tol=1e-7, max_iter=500), backward=backward)
    log_lam = log_lam.clone().requires_grad_()
    w = layer(torch.zeros(d, dtype=f64), log_lam)
    validation_loss(w, X_val, y_val).backward()
    w_ref, grad_ref = ridge_reference(X, y, X_val, y_val, log_lam.detach())
    # forward accurate to ~1e-7 relative in the gradient norm, times cond(H) <= ~1e3 here
    assert torch.allclose(w, w_ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(log_lam.grad, grad_ref, rtol=1e-4, atol=1e-7 * grad_ref.abs().max())


@settings(max_examples=15, deadline=None)
@given(n=st.integers(10, 40), d=st.integers(2, 10), seed=st.integers(0, 2**31 - 1))
def test_agrees_with_fixed_point_layer_on_the_gradient_step(n, d, seed):
    X, y, X_val, y_val, log_lam = ridge_data(n, d, seed)
    f = ridge_loss(X, y)
    lipschitz = float(torch.linalg.eigvalsh(X.T @ X / n + torch.diag(log_lam.exp()))[-1])
    step = 1.0 / lipschitz

    def gradient_step(w, log_lam):
        return w - step * (X.T @ (X @ w - y) / n + log_lam.exp() * w)

    grads = []
    for layer in (
        argmin_layer(
            f, solver=GradientDescent(lr=step, tol=1e-12, max_iter=50_000), backward=CG(tol=1e-12)
        ),
        fixed_point_layer(
            gradient_step, solver=FixedPoint(tol=1e-14, max_iter=50_000), backward=CG(tol=1e-12)
        ),
    ):
        lam = log_lam.clone().requires_grad_()
        validation_loss(layer(torch.zeros(d, dtype=f64), lam), X_val, y_val).backward()
        grads.append(lam.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-9 * grads[1].abs().max())


def test_logistic_regression_against_a_dense_hessian():
    generator = torch.Generator().manual_seed(0)
    n, d = 60, 5
    X = torch.randn(n, d, generator=generator, dtype=f64)
    labels = (X @ torch.randn(d, generator=generator, dtype=f64) > 0).to(f64)
    log_lam = torch.randn(d, generator=generator, dtype=f64, requires_grad=True)

    def f(w, log_lam):
        logits = X @ w
        data = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        return data + 0.5 * (log_lam.exp() * w * w).sum()

    # LBFGS's line search reaches relative gradients of ~sqrt(eps) = 1.5e-8, so tol=1e-7
    layer = argmin_layer(f, solver=LBFGS(tol=1e-7), backward=CG(tol=1e-12))
    w = layer(torch.zeros(d, dtype=f64), log_lam)
    g = torch.randn(d, generator=generator, dtype=f64)
    (w @ g).backward()
    ws = w.detach()
    H = torch.autograd.functional.hessian(lambda v: f(v, log_lam.detach()), ws)
    mixed = torch.autograd.functional.jacobian(
        lambda lam: torch.autograd.grad(f(ws.requires_grad_(), lam), ws, create_graph=True)[0],
        log_lam.detach(),
    )  # d (grad_w f) / d log_lam, shape (d, d)
    reference = -mixed.T @ torch.linalg.solve(H, g)
    assert layer.last_forward.converged and layer.last_backward.converged
    # both sides are evaluated at the same w*, so only the backward solve's 1e-12 separates them
    assert torch.allclose(log_lam.grad, reference, rtol=1e-8, atol=1e-12)


def test_float32_ridge_with_the_defaults():
    X, y, X_val, y_val, log_lam = ridge_data(30, 6, 1, dtype=torch.float32)
    lipschitz = float(torch.linalg.eigvalsh(X.T @ X / 30 + torch.diag(log_lam.exp()))[-1])
    layer = argmin_layer(ridge_loss(X, y), solver=GradientDescent(lr=1 / lipschitz, max_iter=5000))
    lam = log_lam.clone().requires_grad_()
    validation_loss(layer(torch.zeros(6), lam), X_val, y_val).backward()
    _, grad_ref = ridge_reference(X, y, X_val, y_val, log_lam)
    assert layer.last_forward.converged and layer.last_backward.method == "CG"
    # float32, tol 1e-6 on the gradient: ~1e-5 relative in w*, amplified by cond(H) ~ 10
    assert torch.allclose(lam.grad.double(), grad_ref, rtol=1e-3, atol=1e-4 * grad_ref.abs().max())


def test_user_inner_loop_and_pytree_weights():
    X, y, X_val, y_val, log_lam = ridge_data(30, 4, 2)

    def f(w, log_lam):
        prediction = X[:, :2] @ w["a"] + X[:, 2:] @ w["b"]
        penalty = (log_lam[:2].exp() * w["a"] ** 2).sum() + (log_lam[2:].exp() * w["b"] ** 2).sum()
        return 0.5 * ((prediction - y) ** 2).mean() + 0.5 * penalty

    def inner_sgd(loss, w0):
        w = {k: v.clone().requires_grad_() for k, v in w0.items()}
        optimizer = torch.optim.SGD(w.values(), lr=0.5)
        for _ in range(3000):
            optimizer.zero_grad()
            with torch.enable_grad():
                loss(w).backward()
            optimizer.step()
        return {k: v.detach() for k, v in w.items()}

    layer = argmin_layer(f, solver=inner_sgd)
    lam = log_lam.clone().requires_grad_()
    w = layer({"a": torch.zeros(2, dtype=f64), "b": torch.zeros(2, dtype=f64)}, lam)
    validation_loss(torch.cat([w["a"], w["b"]]), X_val, y_val).backward()
    _, grad_ref = ridge_reference(X, y, X_val, y_val, log_lam)
    record = layer.last_forward
    assert record.status is Status.UNCHECKED and record.method == "inner_sgd"
    assert record.iterations == 3000 and record.relative_residual < 1e-8
    assert torch.allclose(lam.grad, grad_ref, rtol=1e-6, atol=1e-10)


def test_gradient_descent_warm_started_at_the_minimum_stops_at_once():
    X, y, _, _, log_lam = ridge_data(30, 4, 5)
    layer = argmin_layer(ridge_loss(X, y), solver=GradientDescent(lr=0.5, tol=1e-10, max_iter=5000))
    w = layer(torch.zeros(4, dtype=f64), log_lam)
    cold = layer.last_forward.iterations
    layer(w.detach(), log_lam)
    assert layer.last_forward.converged and layer.last_forward.iterations == 1 < cold


def test_non_scalar_objective_is_a_clear_error():
    layer = argmin_layer(lambda w, c: (w - c) ** 2)
    with pytest.raises(ValueError, match="f must return a scalar tensor"):
        layer(torch.zeros(3), torch.ones(3))


def test_unknown_minimizer_option():
    with pytest.raises(TypeError, match="Did you mean `max_iter`"):
        GradientDescent(max_iters=3)
    with pytest.raises(TypeError, match="`solver` must be a Minimizer"):
        argmin_layer(lambda w: w.sum(), solver="lbfgs")


class RidgeModule(torch.nn.Module):
    """An inner objective whose own parameter (a log weight decay) is learnt."""

    def __init__(self, X, y):
        super().__init__()
        self.X, self.y = X, y
        self.log_lam = torch.nn.Parameter(torch.zeros(X.shape[1], dtype=X.dtype))

    def forward(self, w):
        data = 0.5 * ((self.X @ w - self.y) ** 2).mean()
        return data + 0.5 * (self.log_lam.exp() * w * w).sum()


def test_inner_loop_backward_touches_no_outer_gradient():
    """An inner loop calling .backward() must not accumulate into the module's parameters."""
    X, y, X_val, y_val, _ = ridge_data(30, 4, 3)
    module = RidgeModule(X, y)

    def inner_gd(loss, w0):
        w = w0.clone().requires_grad_()
        for _ in range(2000):
            w.grad = None
            with torch.enable_grad():
                loss(w).backward()
            w = (w - 0.5 * w.grad).detach().requires_grad_()
        return w.detach()

    layer = argmin_layer(module, solver=inner_gd)
    w = layer(torch.zeros(4, dtype=f64))
    assert module.log_lam.grad is None  # the forward left it alone
    validation_loss(w, X_val, y_val).backward()
    _, grad_ref = ridge_reference(X, y, X_val, y_val, module.log_lam.detach())
    assert torch.allclose(module.log_lam.grad, grad_ref, rtol=1e-6, atol=1e-10)


def test_backward_warm_start_saves_products_and_keeps_the_gradient():
    # CG must need many iterations for a warm start (one product for its initial residual) to
    # pay: 80 features with decays spread over ~3 orders of magnitude take ~35
    X, y, X_val, y_val, log_lam = ridge_data(200, 80, 7)
    log_lam = 3 * log_lam - 3
    grads, products = {}, {}
    for warm in (False, True):
        layer = argmin_layer(
            ridge_loss(X, y),
            solver=LBFGS(tol=1e-7, max_iter=1000),
            backward=CG(tol=1e-10, max_iter=500),
            warm_start=warm,
        )
        grads[warm], products[warm] = [], []
        for shift in (0.0, 1e-3, 2e-3):  # a slowly changing system, as in a training loop
            lam = (log_lam + shift).requires_grad_()
            validation_loss(layer(torch.zeros(80, dtype=f64), lam), X_val, y_val).backward()
            grads[warm].append(lam.grad)
            products[warm].append(layer.last_backward.products)
    assert products[True][0] == products[False][0]  # nothing to start from on the first call
    assert sum(products[True][1:]) < sum(products[False][1:])
    for cold, warm in zip(grads[False], grads[True]):
        assert torch.allclose(cold, warm, rtol=1e-7, atol=1e-12)


def disagreeing_loss(w, target):
    """A loss whose value has a term its gradient lacks, as when values and gradients disagree
    (a new minibatch per call): from ``w = 1`` every step along ``-grad`` raises the value."""
    return ((w - target) ** 2).sum() + 10 * (w.detach() - 1).abs().sum()


def test_lbfgs_stalled_line_search_is_a_failure_not_convergence():
    # The line search finds no decrease, so w never moves though the gradient is -4 per entry:
    # a zero step, formerly judged converged.
    target = torch.full((2,), 3.0, dtype=f64)
    w, record = LBFGS().solve(lambda w: disagreeing_loss(w, target), torch.ones(2, dtype=f64))
    assert torch.equal(w, torch.ones(2, dtype=f64))
    assert record.status is Status.INACCURATE and record.failed
    assert record.iterations == 1  # a stall is final: the next step would not move either
    assert record.residual == pytest.approx(4 * 2**0.5)  # the step proposed, lr ||d||, d = -g
    layer = argmin_layer(disagreeing_loss, solver=LBFGS(), on_failure="raise")
    with pytest.raises(ConvergenceError, match="forward solve LBFGS: did not converge.*stalled"):
        layer(torch.ones(2, dtype=f64), target)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_lbfgs_that_cannot_move_within_the_tolerance_or_the_loss_rounding_has_converged(dtype):
    def f(w):
        return ((w - 3) ** 2).sum() + w.prod() ** 2

    # tol=1e-12 is below what a line search on f resolves: at that floor the step proposed
    # promises a decrease within f's rounding, so the zero step is convergence, recorded with
    # the step proposed as its residual (what was reached, not 0)
    w, record = LBFGS(tol=1e-12).solve(f, torch.zeros(2, dtype=dtype))
    eps = torch.finfo(dtype).eps
    assert record.converged and 0 < record.relative_residual < eps**0.5
    assert torch.allclose(w, torch.full_like(w, 1.2134116612), rtol=1e-6)
    # at the minimum torch makes no direction at all (a zero gradient)
    _, record = LBFGS(tol=0.0).solve(lambda w: ((w - 3) ** 2).sum(), w.new_full((2,), 3.0))
    assert record.converged and record.iterations == 1 and record.residual == 0


def test_lbfgs_stalled_at_a_kink_is_a_failure():
    # |w|-like with a kink at its minimum 0: L-BFGS's last step is refused there, though the
    # decrease it promises is far above the loss's rounding
    def f(w):
        return (torch.relu(w) - 0.5 * w + 0.5 * torch.relu(-w)).sum()

    _, record = LBFGS(tol=1e-12).solve(f, torch.ones(1, dtype=f64))
    assert record.status is Status.INACCURATE
