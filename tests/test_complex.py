"""Complex fixed points and roots (complex64/128), with torch's conjugate-Wirtinger convention:
for a real loss the layer's gradient equals autograd's through a closed form (a dense complex
solve) or through a Newton iteration written out with differentiable dense solves. The maps
are holomorphic in ``w``, as the implicit function theorem over C asks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from registry import backward_solvers, by_name, forward_solvers

from implicit_layers import (
    CG,
    GMRES,
    Anderson,
    FixedPoint,
    Newton,
    Nystrom,
    argmin_layer,
    fixed_point_layer,
    root_layer,
)
from implicit_layers.nn import DEQ

c128, c64 = torch.complex128, torch.complex64
FORWARD = by_name(forward_solvers("contraction"))
BACKWARD = by_name(backward_solvers("contraction"))


def complex_problem(seed: int, n: int, m: int, rho: float, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=generator, dtype=c128)
    A = rho * A / torch.linalg.matrix_norm(A, 2)
    B = torch.randn(n, m, generator=generator, dtype=c128)
    G = torch.randn(n, generator=generator, dtype=c128)
    lam = torch.randn(m, generator=generator, dtype=c128)
    return A.to(dtype), B.to(dtype), G.to(dtype), lam.to(dtype).requires_grad_()


def real_loss(w: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """A real loss of a complex ``w``, neither holomorphic nor anti-holomorphic in it."""
    return (G.conj() * w).real.sum() + (w.abs() ** 2).sum()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(1, 6),
    m=st.integers(1, 3),
    rho=st.floats(0.1, 0.8),
    forward=st.sampled_from(sorted(FORWARD)),
    backward=st.sampled_from(sorted(BACKWARD)),
    dtype=st.sampled_from([c128, c64]),
)
def test_affine_complex_fixed_point_matches_autograd_of_the_closed_form(
    seed, n, m, rho, forward, backward, dtype
):
    A, B, G, lam = complex_problem(seed, n, m, rho, dtype)
    tol = 1e-12 if dtype is c128 else 1e-5
    layer = fixed_point_layer(
        lambda w, lam: A @ w + B @ lam,
        solver=FORWARD[forward].make(tol, 500),
        backward=BACKWARD[backward].make(tol, 500),
        on_failure="raise",
    )
    w = layer(torch.zeros(n, dtype=dtype), lam)
    (grad,) = torch.autograd.grad(real_loss(w, G), lam)
    exact_w = torch.linalg.solve(torch.eye(n, dtype=dtype) - A, B @ lam)
    (expected,) = torch.autograd.grad(real_loss(exact_w, G), lam)
    assert w.dtype == dtype and grad.dtype == dtype
    scale = float(torch.linalg.vector_norm(expected)) + 1.0
    assert float(torch.linalg.vector_norm(grad - expected)) <= 1e3 * tol * scale


def test_a_wrong_convention_would_be_caught():
    """The decoys: the gradient without the conjugate transpose (``(I - A)^{-T}``) and its
    conjugate are far from the expected one, so the comparison above can fail."""
    A, B, G, lam = complex_problem(0, 4, 2, 0.7, c128)
    exact_w = torch.linalg.solve(torch.eye(4, dtype=c128) - A, B @ lam)
    (expected,) = torch.autograd.grad(real_loss(exact_w, G), lam)
    b = G + 2 * exact_w.detach()  # dL/dconj(w), torch's convention
    transposed = B.T @ torch.linalg.solve((torch.eye(4, dtype=c128) - A).T, b)
    for decoy in (transposed, transposed.conj(), expected.conj()):
        assert float(torch.linalg.vector_norm(decoy - expected)) > 1e-3


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 5), rho=st.floats(0.1, 0.6))
def test_a_holomorphic_nonlinear_fixed_point_matches_autograd_through_converged_steps(seed, n, rho):
    A, B, G, lam = complex_problem(seed, n, 2, rho, c128)

    shift = 0.3 / float(torch.linalg.vector_norm(B @ lam.detach()))  # keeps |A w + ...| < 0.6

    def phi(w, lam):  # far from the poles of tanh, where it contracts with |tanh'| < 1.5
        return 0.5 * torch.tanh(A @ w + shift * (B @ lam))

    layer = fixed_point_layer(
        phi, solver=Anderson(tol=1e-13, max_iter=500), backward=GMRES(tol=1e-13)
    )
    (grad,) = torch.autograd.grad(real_loss(layer(torch.zeros(n, dtype=c128), lam), G), lam)
    w = torch.zeros(n, dtype=c128)
    for _ in range(300):  # contracts (0.5 * 1.5 * 0.6 < 1): converged to rounding
        w = phi(w, lam)
    (expected,) = torch.autograd.grad(real_loss(w, G), lam)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-11)


def test_cg_on_a_hermitian_positive_definite_complex_system():
    generator = torch.Generator().manual_seed(3)
    M = torch.randn(5, 5, generator=generator, dtype=c128)
    H = M @ M.mH / 10 + torch.eye(5, dtype=c128)  # Hermitian, eigenvalues >= 1
    step = 1 / float(torch.linalg.eigvalsh(H).max())
    c = torch.randn(5, generator=generator, dtype=c128, requires_grad=True)
    G = torch.randn(5, generator=generator, dtype=c128)
    layer = fixed_point_layer(  # a gradient step on 0.5 w^H H w - Re(c^H w): I - J = step H
        lambda w, c: w - step * (H @ w - c), solver=Anderson(tol=1e-13), backward=CG(tol=1e-13)
    )
    (grad,) = torch.autograd.grad(real_loss(layer(torch.zeros(5, dtype=c128), c), G), c)
    (expected,) = torch.autograd.grad(real_loss(torch.linalg.solve(H, c), G), c)
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-10)
    # Nystrom of full rank is (A + rho I)^{-1} by Woodbury, with conjugate transposes
    b = torch.randn(5, generator=generator, dtype=c128)
    x, _ = Nystrom(rank=5, rho=0.1).solve(H, b)
    torch.testing.assert_close(x, torch.linalg.solve(H + 0.1 * torch.eye(5, dtype=c128), b))


def newton_by_hand(F, jacobian, w, steps: int = 40):
    """Newton's iteration with dense, differentiable solves: autograd through it is a
    reference that shares nothing with the layer."""
    for _ in range(steps):
        w = w - torch.linalg.solve(jacobian(w), F(w))
    return w


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 5))
def test_a_complex_root_matches_autograd_through_a_hand_written_newton(seed, n):
    A, B, G, lam = complex_problem(seed, n, 2, 1.0, c128)
    K = torch.eye(n, dtype=c128) * 2 + A  # singular values in [1, 3]

    def F(w, lam):
        return K @ w + 0.1 * w * w - B @ lam

    def jacobian(w, lam=lam):
        return K + 0.2 * torch.diag(w)

    layer = root_layer(F, solver=Newton(tol=1e-13), backward=GMRES(tol=1e-13), on_failure="raise")
    w = layer(torch.zeros(n, dtype=c128), lam)
    (grad,) = torch.autograd.grad(real_loss(w, G), lam)
    reference = newton_by_hand(lambda v: F(v, lam), jacobian, torch.zeros(n, dtype=c128))
    torch.testing.assert_close(w.detach(), reference.detach(), rtol=1e-10, atol=1e-12)
    (expected,) = torch.autograd.grad(real_loss(reference, G), lam)
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-10)


def test_a_complex_deq_batch_is_judged_per_sample():
    A, B, G, _ = complex_problem(1, 3, 3, 0.5, c128)
    x = torch.randn(4, 3, dtype=c128, requires_grad=True)
    deq = DEQ(lambda z, x: z @ A.T + x, solver=Anderson(tol=1e-12), backward=GMRES(tol=1e-12))
    z = deq(x)
    (grad,) = torch.autograd.grad(real_loss(z.reshape(-1), G.repeat(4)), x)
    exact = torch.linalg.solve(torch.eye(3, dtype=c128) - A, x.T).T
    (expected,) = torch.autograd.grad(real_loss(exact.reshape(-1), G.repeat(4)), x)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-11)
    assert len(deq.last_forward.sample_iterations) == 4


def test_argmin_layer_refuses_a_complex_w_and_says_what_to_do():
    layer = argmin_layer(lambda w: (w.abs() ** 2).sum())
    with pytest.raises(TypeError, match="root_layer"):
        layer(torch.zeros(2, dtype=c128))


def non_holomorphic_problem():
    A, B, G, lam = complex_problem(0, 4, 4, 0.5, c128)

    def phi(w, c):  # conj and .real of w: only real-differentiable
        return A @ w.conj() + 0.3 * torch.tanh(w.real) + c

    w = torch.zeros(4, dtype=c128)
    for _ in range(300):  # contracts: autograd through converged steps is the reference
        w = phi(w, lam)
    (expected,) = torch.autograd.grad(real_loss(w, G), lam)
    return phi, G, lam, expected


@pytest.mark.parametrize(
    "entry", backward_solvers("contraction", real_linear=True), ids=lambda e: e.name
)
def test_a_map_that_is_not_holomorphic_gets_its_gradient_from_the_real_linear_solvers(entry):
    phi, G, lam, expected = non_holomorphic_problem()
    backward = entry.make(1e-13, 500)
    layer = fixed_point_layer(phi, solver=FixedPoint(tol=1e-14, max_iter=1000), backward=backward)
    (grad,) = torch.autograd.grad(real_loss(layer(torch.zeros(4, dtype=c128), lam), G), lam)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


COMPLEX_LINEAR = [e for e in backward_solvers("spd contraction") if not e.real_linear]


@pytest.mark.parametrize("entry", COMPLEX_LINEAR, ids=lambda e: e.name)
def test_a_map_that_is_not_holomorphic_is_refused_by_the_complex_linear_solvers(entry):
    """GMRES built its answer on complex linearity and would be 1e-2 off, in silence."""
    phi, G, lam, _ = non_holomorphic_problem()
    backward = entry.make(1e-13, 4)
    layer = fixed_point_layer(phi, solver=FixedPoint(tol=1e-14, max_iter=1000), backward=backward)
    w = layer(torch.zeros(4, dtype=c128), lam)
    with pytest.raises(ValueError, match=r"holomorphic in w .* backward=Neumann\(\)"):
        torch.autograd.grad(real_loss(w, G), lam)
