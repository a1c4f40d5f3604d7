"""Every way to differentiate from the registry, on every layer kind whose system it can solve,
against a dense float64 reference: ``dL/dlam = -F_lam^T F_w^{-T} dL/dw*`` with both Jacobians
of the residual ``F`` taken by ``torch.autograd.functional`` at the layer's ``w*``.

The kinds and the systems their backward solves:

* fixed point ``w = tanh(A w + B lam)`` (non-symmetric ``A``, ``||A|| < 1``): a contraction;
* fixed point of a gradient step on a strongly convex quadratic: symmetric positive definite;
* argmin of ``0.5 w.Q w - lam.B^T w + 0.1 sum log cosh w``: SPD, ``I - H`` contracts;
* root of ``K w + 0.1 tanh(w) - B lam`` with ``K`` indefinite: general;
* a DEQ batch (per-sample rows) of the first map, and a complex one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from registry import backward_solvers, by_name, forward_solvers

from implicit_layers import LBFGS, Newton, argmin_layer, fixed_point_layer, root_layer
from implicit_layers.nn import DEQ

f64, c128 = torch.float64, torch.complex128
TOL, BUDGET = 1e-12, 200


@dataclass
class Case:
    """A layer kind on one drawn problem: the layer's factory, its residual ``F(w, lam)`` for
    the reference, ``w0``, ``lam`` and the loss weights."""

    make: Any  # (solver, backward) -> layer; solver None: the kind's own
    residual: Any
    w0: torch.Tensor
    lam: torch.Tensor
    G: torch.Tensor
    system: str


def orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=f64))[0]


def build(
    kind: str, seed: int, n: int, dtype=f64, reference: bool = False, on_failure: str = "raise"
) -> Case:
    """The problem, drawn in float64 and rounded to ``dtype``; with ``reference`` its tensors are
    those rounded values in float64 (the reference is then exact for what the layer saw)."""
    work = f64 if reference else dtype

    def rounded(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype).to(work)

    generator = torch.Generator().manual_seed(seed)
    B = rounded(torch.randn(n, 2, generator=generator, dtype=f64))
    lam = rounded(torch.randn(2, generator=generator, dtype=f64)).requires_grad_()
    G = rounded(torch.randn(n, generator=generator, dtype=f64))
    q = orthogonal(n, generator)
    spectrum = 0.2 + 1.3 * torch.rand(n, generator=generator, dtype=f64)  # in [0.2, 1.5]
    zeros = torch.zeros(n, dtype=work)
    if kind in ("fixed point", "DEQ"):
        A = torch.randn(n, n, generator=generator, dtype=f64)
        A = rounded(0.6 * A / torch.linalg.matrix_norm(A, 2))

        def phi(w, lam):  # lam: shared, or (a DEQ's input) one copy per row
            return torch.tanh(w @ A.T + lam @ B.T)

        def make(solver, backward):
            if kind == "DEQ":
                return _Rows(DEQ(phi, solver=solver, backward=backward, on_failure=on_failure))
            return fixed_point_layer(phi, solver=solver, backward=backward, on_failure=on_failure)

        if kind == "DEQ":
            zeros = torch.zeros(3, n, dtype=work)
            G = rounded(torch.randn(3, n, generator=generator, dtype=f64))
        return Case(make, lambda w, lam: w - phi(w, lam), zeros, lam, G, "contraction")
    if kind == "gradient step":
        Q = rounded(q @ torch.diag(spectrum) @ q.T)

        def step(w, lam):
            return w - (Q @ w - B @ lam)

        def make(solver, backward):
            return fixed_point_layer(step, solver=solver, backward=backward, on_failure=on_failure)

        residual = lambda w, lam: w - step(w, lam)  # noqa: E731
        return Case(make, residual, zeros, lam, G, "spd contraction")
    if kind == "argmin":
        Q = rounded(q @ torch.diag(spectrum - 0.1) @ q.T)  # Hessian eigenvalues in [0.1, 1.5]

        def f(w, lam):
            return 0.5 * w @ Q @ w - (B @ lam) @ w + 0.1 * torch.log(torch.cosh(w)).sum()

        def make(solver, backward):
            solver = solver or LBFGS(tol=1e-13, max_iter=500)
            return argmin_layer(f, solver=solver, backward=backward, on_failure=on_failure)

        residual = lambda w, lam: torch.func.grad(f)(w, lam)  # noqa: E731
        return Case(make, residual, zeros, lam, G, "spd contraction")
    if kind == "root":
        signs = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(f64)
        K = rounded(q @ torch.diag((1 + spectrum) * signs) @ q.T)  # symmetric, indefinite

        def F(w, lam):
            return K @ w + 0.1 * torch.tanh(w) - B @ lam

        def make(solver, backward):
            solver = solver or Newton(tol=1e-13)
            return root_layer(F, solver=solver, backward=backward, on_failure=on_failure)

        return Case(make, F, zeros, lam, G, "general")
    raise ValueError(kind)


class _Rows:
    """A DEQ called as ``layer(z0, lam)``: ``x`` is ``lam`` repeated on every row."""

    def __init__(self, deq: DEQ):
        self.deq = deq

    def __call__(self, z0: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return self.deq(lam.expand(z0.shape[0], -1), z0)

    @property
    def last_backward(self):
        return self.deq.last_backward


def dense_reference(case: Case, w_star: torch.Tensor) -> torch.Tensor:
    """``-F_lam^T F_w^{-T} G`` from dense Jacobians of the flattened residual."""
    w_star, lam = w_star.detach(), case.lam.detach()
    shape = w_star.shape
    flat = lambda v, lam: case.residual(v.view(shape), lam).reshape(-1)  # noqa: E731
    F_w = torch.autograd.functional.jacobian(lambda v: flat(v, lam), w_star.reshape(-1))
    F_lam = torch.autograd.functional.jacobian(lambda p: flat(w_star.reshape(-1), p), lam)
    return -F_lam.T @ torch.linalg.solve(F_w.T, case.G.reshape(-1))


KINDS = ("fixed point", "gradient step", "argmin", "root", "DEQ")


def cases():
    for kind in KINDS:
        system = build(kind, 0, 2).system
        for entry in backward_solvers(system):
            yield pytest.param(kind, entry, id=f"{kind}-{entry.name}")


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 6))
@pytest.mark.parametrize("kind, entry", list(cases()))
def test_every_implicit_backward_on_every_kind_matches_the_dense_reference(kind, entry, seed, n):
    case = build(kind, seed, n)
    fixed_point = kind not in ("argmin", "root")  # those two bring their own solvers
    solver = (
        by_name(forward_solvers(case.system))["Anderson"].make(1e-13, 500) if fixed_point else None
    )
    layer = case.make(solver, entry.make(TOL, max(BUDGET, 4 * n)))
    w = layer(case.w0, case.lam)
    (grad,) = torch.autograd.grad((w * case.G).sum(), case.lam)
    expected = dense_reference(case, w)
    scale = float(torch.linalg.vector_norm(expected)) + 1.0
    assert float(torch.linalg.vector_norm(grad - expected)) <= entry.rtol * scale, (grad, expected)
    assert layer.last_backward.status.name in ("CONVERGED", "UNCHECKED")


@pytest.mark.parametrize("entry", forward_solvers("contraction"), ids=lambda e: e.name)
@pytest.mark.parametrize("kind", ["fixed point", "DEQ"])
def test_every_forward_solver_on_the_fixed_point_kinds(kind, entry):
    case = build(kind, 7, 5)
    layer = case.make(entry.make(1e-13, 500), backward_solvers("general")[0].make(TOL, BUDGET))
    w = layer(case.w0, case.lam)
    (grad,) = torch.autograd.grad((w * case.G).sum(), case.lam)
    torch.testing.assert_close(grad, dense_reference(case, w), rtol=1e-8, atol=1e-10)


def test_the_registry_covers_every_public_solver():
    """A solver added to the package and not to the registry fails here."""
    from registry import ADJOINT, FORWARD, LINEAR

    import implicit_layers

    public = {
        name
        for name in implicit_layers.__all__
        if isinstance(getattr(implicit_layers, name), type)
        and issubclass(
            getattr(implicit_layers, name),
            (implicit_layers.LinearSolver, implicit_layers.ForwardSolver),
        )
        and name not in ("LinearSolver", "ForwardSolver")
    }
    registered = {e.name.split()[0] for e in LINEAR + ADJOINT + FORWARD}
    assert public <= registered, public - registered
