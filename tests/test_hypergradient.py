"""hypergradient() for every method against dense float64 references; Nystrom's formula."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_layers import (
    CG,
    GMRES,
    LBFGS,
    Direct,
    FiniteDifference,
    Neumann,
    NormalCG,
    Nystrom,
    Status,
    StochasticAID,
    argmin_layer,
    hypergradient,
)
from implicit_layers._layers._residual import FIXED_POINT, ROOT, ImplicitOperator, ResidualGraph
from implicit_layers._operator import CountingOperator
from implicit_layers._tree import FlatSpace

f64 = torch.float64


def problem(kind: str, n: int, d: int, seed: int):
    """An inner loss with per-feature weight decay, its minimiser and an outer loss that also
    depends on ``lam`` directly (so the direct term is exercised)."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=generator, dtype=f64)
    X_val = torch.randn(n, d, generator=generator, dtype=f64)
    truth = torch.randn(d, generator=generator, dtype=f64)
    log_lam = torch.randn(d, generator=generator, dtype=f64) - 1.0
    if kind == "ridge":
        y, y_val = X @ truth + torch.randn(n, generator=generator, dtype=f64), X_val @ truth

        def data_loss(w, X, y):
            return 0.5 * ((X @ w - y) ** 2).mean()
    else:
        y, y_val = (X @ truth > 0).to(f64), (X_val @ truth > 0).to(f64)

        def data_loss(w, X, y):
            return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y)

    def inner(w, log_lam):
        return data_loss(w, X, y) + 0.5 * (log_lam.exp() * w * w).sum()

    def outer(w, log_lam):
        return data_loss(w, X_val, y_val) + 0.01 * (log_lam**2).sum()

    layer = argmin_layer(inner, solver=LBFGS(tol=1e-9, max_iter=1000), on_failure="ignore")
    w = layer(torch.zeros(d, dtype=f64), log_lam).detach()
    return inner, outer, w, log_lam


def dense_reference(inner, outer, w, log_lam):
    """``grad_lam g - (d grad_w f / d lam)^T H^{-1} grad_w g`` with dense float64 Jacobians."""
    H = torch.autograd.functional.hessian(lambda v: inner(v, log_lam), w)
    mixed = torch.func.jacrev(lambda lam: torch.func.grad(inner)(w, lam))(log_lam)
    g_w, g_lam = torch.func.grad(outer, argnums=(0, 1))(w, log_lam)
    return g_lam - mixed.T @ torch.linalg.solve(H, g_w), H


METHODS = {
    "CG": lambda H: CG(tol=1e-12),
    "GMRES": lambda H: GMRES(tol=1e-12, restart=50),
    "NormalCG": lambda H: NormalCG(tol=1e-12, max_iter=2000),
    "Direct": lambda H: Direct(),
    # Neumann/fixed point: step below 2 / lambda_max converges
    "Neumann": lambda H: Neumann(
        tol=1e-12, max_iter=20_000, step=1.0 / float(torch.linalg.eigvalsh(H)[-1])
    ),
    # full rank: exact up to the shift rho, which perturbs by ~rho / lambda_min ~ 1e-8 / 0.05,
    # and to Woodbury's rounding ~eps / rho ~ 2e-8
    "Nystrom": lambda H: Nystrom(rank=H.shape[0], rho=1e-8),
}


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from(["ridge", "logistic"]),
    n=st.integers(20, 60),
    d=st.integers(2, 8),
    seed=st.integers(0, 2**31 - 1),
    method=st.sampled_from(sorted(METHODS)),
)
def test_every_method_against_the_dense_reference(kind, n, d, seed, method):
    inner, outer, w, log_lam = problem(kind, n, d, seed)
    reference, H = dense_reference(inner, outer, w, log_lam)
    grad, record = hypergradient(inner, outer, w, log_lam, method=METHODS[method](H))
    assert record.converged or record.status is Status.UNCHECKED
    # same w on both sides: only the linear solve separates them (tol 1e-12, cond(H) <= ~1e4);
    # Nystrom's shift and rounding (above) allow 1e-5
    rtol = 1e-5 if method == "Nystrom" else 1e-6
    assert torch.allclose(grad, reference, rtol=rtol, atol=rtol * float(reference.abs().max()))


def test_pytrees_of_module_parameters():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, dtype=f64)
    X, y = torch.randn(40, 3, dtype=f64), torch.randn(40, 1, dtype=f64)
    decay = {"weight": torch.tensor(0.3, dtype=f64), "bias": torch.tensor(0.1, dtype=f64)}

    def inner(params, decay):
        out = torch.func.functional_call(model, params, (X,))
        penalty = sum(decay[k] * (params[k] ** 2).sum() for k in params)
        return ((out - y) ** 2).mean() + penalty

    def outer(params, decay):
        return (torch.func.functional_call(model, params, (X[:10],)) ** 2).mean()

    layer = argmin_layer(inner, solver=LBFGS(tol=1e-7, atol=1e-7, max_iter=1000))
    w = {k: v.detach() for k, v in layer(dict(model.named_parameters()), decay).items()}
    grad, _ = hypergradient(inner, outer, w, decay, method=CG(tol=1e-12))
    assert set(grad) == {"weight", "bias"}

    # reference: the same through the argmin layer's own backward, with decay requiring grad
    decay_vars = {k: v.clone().requires_grad_() for k, v in decay.items()}
    outer(layer(w, decay_vars), decay_vars).backward()
    for k in decay:
        assert torch.allclose(grad[k], decay_vars[k].grad, rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(4, 30),
    rank=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
    rho=st.floats(1e-3, 10.0),
)
def test_nystrom_matches_the_paper_formula(n, rank, seed, rho):
    """``x = (C W^+ C^T + rho I)^{-1} b`` for the sampled columns, computed densely."""
    generator = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=generator, dtype=f64)
    A = M @ M.T / n + 0.1 * torch.eye(n, dtype=f64)
    b = torch.randn(n, generator=generator, dtype=f64)
    solver = Nystrom(rank=rank, rho=rho, seed=seed % 1000)
    x, record = solver.solve(A, b)
    indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed % 1000))[:rank]
    C = A[:, indices]
    approximation = C @ torch.linalg.pinv(A[indices][:, indices]) @ C.T
    expected = torch.linalg.solve(approximation + rho * torch.eye(n, dtype=f64), b)
    assert torch.allclose(x, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))
    assert record.products == min(rank, n) + 1 and record.iterations == min(rank, n)


def test_nystrom_can_skip_its_residual():
    A = torch.diag(torch.arange(1.0, 6.0, dtype=f64))
    _, record = Nystrom(rank=2, measure_residual=False).solve(A, torch.ones(5, dtype=f64))
    assert record.products == 2 and record.status is Status.UNCHECKED


def test_cg_budget_counts_hessian_vector_products():
    inner, outer, w, log_lam = problem("logistic", 40, 6, 0)
    _, record = hypergradient(
        inner, outer, w, log_lam, method=CG(max_iter=3, tol=0.0), on_failure="ignore"
    )
    assert record.iterations == record.products == 3


def test_lam_must_be_floating_tensors():
    inner, outer, w, _ = problem("ridge", 20, 3, 0)
    with pytest.raises(TypeError, match="`lam` must be a floating-point tensor"):
        hypergradient(inner, outer, w, 0.5)


@settings(max_examples=10, deadline=None)
@given(
    kind=st.sampled_from(["ridge", "logistic"]),
    seed=st.integers(0, 2**31 - 1),
    step=st.floats(0.1, 2.0),
)
def test_finite_difference_is_the_same_approximation_by_differences(kind, seed, step):
    """Betty's method equals ``H^{-1} ~ step I`` with the mixed product by autograd, up to the
    central difference's error: zero for ridge (grad_lam f is linear in w), O(eps^2) else."""
    inner, outer, w, log_lam = problem(kind, 30, 5, seed)
    by_differences, record = hypergradient(
        inner, outer, w, log_lam, method=FiniteDifference(step=step)
    )
    by_autograd, _ = hypergradient(inner, outer, w, log_lam, method=lambda matvec, b: step * b)
    assert record.products == 2 and record.status is Status.UNCHECKED
    rtol = 1e-7 if kind == "ridge" else 1e-3
    scale = float(by_autograd.abs().max())
    assert torch.allclose(by_differences, by_autograd, rtol=rtol, atol=rtol * scale)


def test_stochastic_aid_converges_and_samples_afresh_for_every_product():
    inner, outer, w, log_lam = problem("ridge", 40, 4, 3)
    reference, H = dense_reference(inner, outer, w, log_lam)
    calls = []

    def counted_inner(w, log_lam):
        calls.append(1)
        return inner(w, log_lam)

    lr = 1.0 / float(torch.linalg.eigvalsh(H)[-1])
    method = StochasticAID(steps=400, optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    grad, record = hypergradient(counted_inner, outer, w, log_lam, method=method)
    assert len(calls) == record.products == 401  # one evaluation (one graph) per product
    assert torch.allclose(grad, reference, rtol=1e-6, atol=1e-9)
    assert record.history[-1] < 1e-6


def test_hypergradient_method_options_are_checked():
    with pytest.raises(ValueError, match="`radius` must lie in"):
        FiniteDifference(radius=0.0)
    with pytest.raises(ValueError, match="`steps` must be a positive integer"):
        StochasticAID(steps=0)


@pytest.mark.parametrize("form", [ROOT, FIXED_POINT], ids=["argmin", "fixed point"])
def test_a_batched_product_is_the_dense_transposed_jacobian_times_the_columns(form):
    """``ImplicitOperator.mm``: ``F_w^T V`` in one vectorised backward pass, on a pytree ``w``,
    for ``F = G`` (argmin) and ``F = w - G`` (fixed point); ``m`` columns count ``m``."""
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=generator, dtype=f64)
    lam = torch.randn(5, generator=generator, dtype=f64)

    def residual(w, lam):  # G as the leaves of w = {"a": (2,), "b": (3,)}
        g = torch.tanh(A @ torch.cat([w["a"], w["b"]])) * lam
        return [g[:2], g[2:]]

    space = FlatSpace({"a": torch.zeros(2, dtype=f64), "b": torch.zeros(3, dtype=f64)})
    w = torch.randn(5, generator=generator, dtype=f64)
    graph = ResidualGraph(residual, space, tuple, w, [lam], [True], form)
    operator = CountingOperator(ImplicitOperator(graph))
    V = torch.randn(5, 4, generator=generator, dtype=f64)
    batched = operator.mm(V)
    J = torch.func.jacrev(lambda v: torch.cat(residual(space.unflatten(v), lam)))(w)
    F_w = torch.eye(5, dtype=f64) - J if form is FIXED_POINT else J
    assert torch.allclose(batched, F_w.T @ V, rtol=1e-12, atol=1e-14)
    assert torch.allclose(batched, torch.stack([operator.mv(v) for v in V.T], dim=1))
    assert operator.products == 4 + 4


def test_resampled_neumann_is_unbiased_for_the_full_data_series():
    """Issue 18 item 2: with resample=True each product draws its own minibatch, so the series
    is a product of independent factors I - a H_i with E[H_i] = H: the mean of many draws is the
    full-data Neumann hypergradient (known answer), within a few standard errors."""
    generator = torch.Generator().manual_seed(0)
    n, d, batch, k, step = 40, 3, 8, 6, 0.3
    X = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = torch.randn(n, generator=generator, dtype=torch.float64)
    X_val, y_val = torch.randn(20, d, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    lam = torch.zeros(d, dtype=torch.float64)
    w = torch.linalg.solve(X.T @ X / n + torch.eye(d, dtype=torch.float64), X.T @ y / n)
    draws = torch.Generator().manual_seed(1)

    def minibatch_inner(w, lam):  # a fresh minibatch at every call
        rows = torch.randint(0, n, (batch,), generator=draws)
        return 0.5 * ((X[rows] @ w - y[rows]) ** 2).mean() + 0.5 * (lam.exp() * w * w).sum()

    def full_inner(w, lam):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w * w).sum()

    def outer(w, lam):
        return 0.5 * ((X_val @ w - y_val) ** 2).mean()

    method = Neumann(step=step, max_iter=k, tol=0.0)
    exact, _ = hypergradient(full_inner, outer, w, lam, method, on_failure="ignore")
    samples = torch.stack(
        [
            hypergradient(minibatch_inner, outer, w, lam, method, "ignore", resample=True)[0]
            for _ in range(400)
        ]
    )
    standard_error = samples.std(0) / 400**0.5
    assert bool(((samples.mean(0) - exact).abs() <= 4 * standard_error).all())
    assert bool((samples.std(0) > 0).all())  # the draws did differ
    with pytest.raises(ValueError, match="only Neumann's series averages correctly"):
        hypergradient(minibatch_inner, outer, w, lam, CG(), resample=True)
