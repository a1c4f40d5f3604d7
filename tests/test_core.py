"""The composable core: every way to differentiate on every layer kind where it is valid, root
layers, pytree DEQs, and the records per thread. Each gradient is checked against a reference
computed without the library: autograd through the same steps written out by hand, or a dense
float64 solve of the implicit-function-theorem system."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_layers import (
    CG,
    GMRES,
    Anderson,
    Broyden,
    Direct,
    FixedPoint,
    JacobianFree,
    Newton,
    Phantom,
    Unrolled,
    argmin_layer,
    fixed_point_layer,
    root_layer,
)
from implicit_layers.nn import DEQ
from implicit_layers.nn import Phantom as NNPhantom
from implicit_layers.testing._problems import _contraction_matrix

f64 = torch.float64
TIGHT = FixedPoint(tol=1e-13, max_iter=2000)


def tanh_map(seed: int, n: int, rho: float):
    generator = torch.Generator().manual_seed(seed)
    A = _contraction_matrix(n, rho, generator)
    c = torch.randn(n, generator=generator, dtype=f64, requires_grad=True)
    g = torch.randn(n, generator=generator, dtype=f64)

    def phi(w, c):
        return torch.tanh(A @ w + c)

    return phi, c, g


# --- Phantom, JacobianFree and Unrolled on a fixed-point layer ---------------------------------


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(1, 6),
    rho=st.floats(0.1, 0.9),
    steps=st.integers(1, 6),
    damping=st.floats(0.05, 1.0),
)
def test_phantom_is_autograd_through_its_damped_steps_from_the_fixed_point(
    seed, n, rho, steps, damping
):
    phi, c, g = tanh_map(seed, n, rho)
    layer = fixed_point_layer(phi, solver=TIGHT, backward=Phantom(steps=steps, damping=damping))
    (grad,) = torch.autograd.grad(layer(torch.zeros(n, dtype=f64), c) @ g, c)
    w = fixed_point_layer(phi, solver=TIGHT)(torch.zeros(n, dtype=f64), c.detach())
    for _ in range(steps):  # the reference: the same steps, written out
        w = (1 - damping) * w + damping * phi(w, c)
    (expected,) = torch.autograd.grad(w @ g, c)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)
    assert layer.last_backward is None  # nothing was solved in the backward


def test_jacobian_free_is_one_undamped_step_and_phantom_tends_to_the_implicit_gradient():
    phi, c, g = tanh_map(0, 5, 0.6)
    w0 = torch.zeros(5, dtype=f64)
    implicit = fixed_point_layer(phi, solver=TIGHT, backward=GMRES(tol=1e-13))
    (exact,) = torch.autograd.grad(implicit(w0, c) @ g, c)
    w_star = implicit(w0, c).detach()
    (one_step,) = torch.autograd.grad(phi(w_star, c) @ g, c)
    free = fixed_point_layer(phi, solver=TIGHT, backward=JacobianFree())
    torch.testing.assert_close(torch.autograd.grad(free(w0, c) @ g, c)[0], one_step)
    errors = []
    for steps in (2, 8, 32, 128):
        layer = fixed_point_layer(phi, solver=TIGHT, backward=Phantom(steps=steps, damping=1.0))
        (grad,) = torch.autograd.grad(layer(w0, c) @ g, c)
        errors.append(float(torch.linalg.vector_norm(grad - exact)))
    assert errors[0] > errors[1] > errors[2] and errors[-1] < 1e-12 < errors[0]


@pytest.mark.parametrize("solver", [FixedPoint, Anderson, Broyden], ids=lambda s: s.__name__)
def test_unrolled_is_autograd_through_the_solver_run_with_a_graph(solver):
    phi, c, g = tanh_map(3, 4, 0.7)
    w0 = torch.zeros(4, dtype=f64)
    run = solver(max_iter=12, tol=0.0)
    layer = fixed_point_layer(phi, solver=run, backward=Unrolled(), on_failure="ignore")
    (grad,) = torch.autograd.grad(layer(w0, c) @ g, c)
    with torch.enable_grad():  # the reference: the solver itself, on a map with a live graph
        w, _ = run.solve(lambda w: phi(w, c), w0)
    (expected,) = torch.autograd.grad(w @ g, c)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    assert layer.last_forward.iterations == 12 and layer.last_backward is None


def test_stepping_ways_work_on_pytree_states_and_module_maps():
    lin = torch.nn.Linear(3, 3).double()
    with torch.no_grad():
        lin.weight.mul_(0.3 / torch.linalg.matrix_norm(lin.weight, 2))

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, w, c):
            return {"a": torch.tanh(self.lin(w["b"]) + c), "b": 0.5 * w["a"]}

    pair = Pair()
    c = torch.randn(3, dtype=f64, requires_grad=True)
    w0 = {"a": torch.zeros(3, dtype=f64), "b": torch.zeros(3, dtype=f64)}
    layer = fixed_point_layer(pair, solver=TIGHT, backward=Phantom(steps=3, damping=0.7))
    out = layer(w0, c)
    loss = out["a"].sum() + out["b"].square().sum()
    grads = torch.autograd.grad(loss, [c, lin.weight])
    w = {k: v.detach() for k, v in fixed_point_layer(pair, solver=TIGHT)(w0, c.detach()).items()}
    for _ in range(3):
        step = pair(w, c)
        w = {k: 0.3 * w[k] + 0.7 * step[k] for k in w}
    expected = torch.autograd.grad(w["a"].sum() + w["b"].square().sum(), [c, lin.weight])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_the_nn_names_are_the_top_level_ones():
    assert NNPhantom is Phantom


@pytest.mark.parametrize("way", [Phantom(), JacobianFree(), Unrolled()], ids=repr)
@pytest.mark.parametrize("make", [argmin_layer, root_layer], ids=["argmin", "root"])
def test_stepping_ways_are_refused_where_there_is_no_map(way, make):
    with pytest.raises(TypeError, match="does not have; differentiate it implicitly"):
        make(lambda w, c: (w * w).sum() if make is argmin_layer else w - c, backward=way)


def test_unrolled_names_the_solvers_it_can_run_differentiably():
    with pytest.raises(TypeError, match=r"only FixedPoint\(\), Anderson\(\) and Broyden\(\)"):
        fixed_point_layer(lambda w: w, solver=Newton(), backward=Unrolled())


def test_a_class_where_an_instance_is_expected_is_named():
    with pytest.raises(TypeError, match=r"pass `GMRES\(\)`, an instance"):
        fixed_point_layer(lambda w: w, backward=GMRES)
    with pytest.raises(TypeError, match=r"pass `Anderson\(\)`, an instance"):
        fixed_point_layer(lambda w: w, solver=Anderson)


def test_a_phantom_deq_carries_no_linear_solver():
    deq = DEQ(lambda z, x: torch.tanh(0.5 * z + x), backward=Phantom(steps=2))
    assert deq.differentiation == Phantom(steps=2)
    assert "GMRES" not in repr(deq)


# --- root layers ---------------------------------------------------------------------------


def root_system(seed: int, n: int, m: int, nonlinearity: float, symmetric_indefinite: bool):
    """``F(w, lam) = A w + eps tanh(w) - B lam``; ``A`` is non-symmetric, or symmetric and
    indefinite, with singular values in [1, 3] so that the Jacobian ``A + eps D`` (``D``
    diagonal in [0, 1], ``eps <= 0.5``) stays non-singular."""
    generator = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=f64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=f64))
    s = 1 + 2 * torch.rand(n, generator=generator, dtype=f64)
    if symmetric_indefinite:
        signs = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(f64)
        A = q1 @ torch.diag(s * signs) @ q1.T
    else:
        A = q1 @ torch.diag(s) @ q2.T
    B = torch.randn(n, m, generator=generator, dtype=f64)
    lam = torch.randn(m, generator=generator, dtype=f64, requires_grad=True)
    g = torch.randn(n, generator=generator, dtype=f64)

    def F(w, lam):
        return A @ w + nonlinearity * torch.tanh(w) - B @ lam

    def jacobian(w):
        return A + nonlinearity * torch.diag(1 - torch.tanh(w) ** 2)

    return F, A, B, lam, g, jacobian


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(1, 7),
    m=st.integers(1, 3),
    nonlinearity=st.sampled_from([0.0, 0.1, 0.5]),
    symmetric_indefinite=st.booleans(),
    backward=st.sampled_from(["GMRES", "Direct"]),
)
def test_root_layer_gradient_is_the_dense_implicit_gradient(
    seed, n, m, nonlinearity, symmetric_indefinite, backward
):
    F, A, B, lam, g, jacobian = root_system(seed, n, m, nonlinearity, symmetric_indefinite)
    solve_back = GMRES(tol=1e-12, restart=n) if backward == "GMRES" else Direct()
    layer = root_layer(F, solver=Newton(tol=1e-13), backward=solve_back, on_failure="raise")
    w = layer(torch.zeros(n, dtype=f64), lam)
    assert float(torch.linalg.vector_norm(F(w.detach(), lam.detach()))) < 1e-10
    (grad,) = torch.autograd.grad(w @ g, lam)
    # dL/dlam = -F_lam^T F_w^{-T} g = B^T F_w^{-T} g
    expected = B.T @ torch.linalg.solve(jacobian(w.detach()).T, g)
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-10)
    assert layer.last_forward.converged and layer.last_backward.converged


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(2, 5), batch=st.integers(1, 4))
def test_root_layer_judges_each_sample_of_a_batch_on_its_own(seed, n, batch):
    F, A, B, lam, g, jacobian = root_system(seed, n, 1, 0.3, False)
    scale = torch.logspace(0, 2, batch, dtype=f64)[:, None]  # the samples differ in difficulty

    def batched(w, lam):
        return w @ A.T + 0.3 * torch.tanh(w) - scale * (B @ lam)

    layer = root_layer(
        batched,
        solver=Newton(tol=1e-12),
        backward=GMRES(tol=1e-12),
        per_sample=True,
        on_failure="raise",
    )
    w = layer(torch.zeros(batch, n, dtype=f64), lam)
    record = layer.last_forward
    assert len(record.sample_iterations) == batch and all(record.sample_converged)
    (grad,) = torch.autograd.grad(w.sum(), lam)
    expected = sum(
        scale[i, 0] * B.T @ torch.linalg.solve(jacobian(w[i].detach()).T, torch.ones(n, dtype=f64))
        for i in range(batch)
    )
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-10)
    assert len(layer.last_backward.sample_residuals) == batch


def test_root_layer_solves_an_equality_constrained_qp_from_its_kkt_conditions():
    """``min 0.5 x.Q x - c.x`` s.t. ``A x = d``: the KKT Jacobian ``[[Q, A^T], [A, 0]]`` is
    indefinite, so no fixed-point iteration of ``w - F`` converges, but Newton does; the
    gradient with respect to ``c`` and ``d`` is the dense solve's."""
    generator = torch.Generator().manual_seed(0)
    n, k = 6, 2
    M = torch.randn(n, n, generator=generator, dtype=f64)
    Q = M @ M.T + torch.eye(n, dtype=f64)
    A = torch.randn(k, n, generator=generator, dtype=f64)
    c = torch.randn(n, generator=generator, dtype=f64, requires_grad=True)
    d = torch.randn(k, generator=generator, dtype=f64, requires_grad=True)

    @root_layer(backward=GMRES(tol=1e-12))
    def kkt(state, c, d):
        return {"x": Q @ state["x"] - c + A.T @ state["nu"], "nu": A @ state["x"] - d}

    start = {"x": torch.zeros(n, dtype=f64), "nu": torch.zeros(k, dtype=f64)}
    state = kkt(start, c, d)
    K = torch.cat((torch.cat((Q, A.T), 1), torch.cat((A, torch.zeros(k, k, dtype=f64)), 1)))
    exact = torch.linalg.solve(K, torch.cat((c, d)).detach())
    torch.testing.assert_close(torch.cat((state["x"], state["nu"])).detach(), exact)
    assert torch.linalg.eigvalsh(K).min() < 0  # indefinite
    g = torch.randn(n, generator=generator, dtype=f64)
    grads = torch.autograd.grad(state["x"] @ g, [c, d])
    adjoint = torch.linalg.solve(K.T, torch.cat((g, torch.zeros(k, dtype=f64))))
    torch.testing.assert_close(grads[0], adjoint[:n])
    torch.testing.assert_close(grads[1], adjoint[n:])
    assert kkt.last_forward.converged and kkt.last_forward.iterations == 2  # linear: one step


def test_a_callable_root_solver_is_handed_F():
    seen = []

    def solver(F, w0):
        seen.append(F(w0))
        return torch.linalg.solve(torch.tensor([[2.0]], dtype=f64), torch.ones(1, dtype=f64))

    b = torch.ones(1, dtype=f64, requires_grad=True)
    layer = root_layer(lambda w, b: 2 * w - b, solver=solver, backward=CG())
    w = layer(torch.zeros(1, dtype=f64), b)
    torch.testing.assert_close(seen[0], -torch.ones(1, dtype=f64))  # F(0) = -b
    w.backward()
    torch.testing.assert_close(b.grad, torch.tensor([0.5], dtype=f64))
    assert layer.last_forward.residual == 0.0


# --- DEQ with pytree states and inputs ------------------------------------------------------


class TwoStateCell(torch.nn.Module):
    """A DEQ-flow-like cell on ``z = (h, c)`` with input ``x = {"u": ..., "v": ...}``."""

    def __init__(self, hidden: int, inputs: int, generator: torch.Generator):
        super().__init__()
        self.W = torch.nn.Parameter(_contraction_matrix(hidden, 0.4, generator))
        self.U = torch.nn.Parameter(torch.randn(hidden, inputs, generator=generator, dtype=f64))
        self.V = torch.nn.Parameter(_contraction_matrix(2, 0.4, generator))

    def forward(self, z, x):
        h, c = z
        h_next = torch.tanh(h @ self.W.T + x["u"] @ self.U.T + c.sum(1, keepdim=True))
        c_next = 0.5 * torch.tanh(c @ self.V.T + x["v"])
        return (h_next, c_next)


def dense_deq_gradient(cell, z_star, x, weights):
    """``dL/dU`` for ``L = sum(h*) + sum(c*^2)`` by a dense float64 IFT solve, each sample's
    Jacobian from ``torch.autograd.functional``."""
    h, c = (t.detach() for t in z_star)
    batch, hidden = h.shape
    total = torch.zeros_like(cell.U)
    for i in range(batch):
        xi = {"u": x["u"][i : i + 1], "v": x["v"][i : i + 1]}

        def flat_map(v, U, xi=xi):
            out = torch.func.functional_call(
                cell, {"U": U}, ((v[:hidden][None], v[hidden:][None]), xi)
            )
            return torch.cat((out[0][0], out[1][0]))

        v = torch.cat((h[i], c[i]))
        J = torch.autograd.functional.jacobian(lambda v: flat_map(v, cell.U), v)
        dU = torch.autograd.functional.jacobian(lambda U, v=v: flat_map(v, U), cell.U.detach())
        b = torch.cat((torch.ones(hidden, dtype=f64), 2 * c[i]))
        x_adj = torch.linalg.solve((torch.eye(len(v), dtype=f64) - J).T, b)
        total += torch.einsum("k,kij->ij", x_adj, dU)
    return total


@pytest.mark.parametrize("backward", [GMRES(tol=1e-12), Anderson(tol=1e-12, max_iter=500)])
def test_deq_with_a_tuple_state_and_a_dict_input_matches_a_dense_reference(backward):
    generator = torch.Generator().manual_seed(1)
    batch, hidden, inputs = 3, 4, 2
    cell = TwoStateCell(hidden, inputs, generator)
    x = {
        "u": torch.randn(batch, inputs, generator=generator, dtype=f64),
        "v": torch.randn(batch, 2, generator=generator, dtype=f64),
    }
    z0 = (torch.zeros(batch, hidden, dtype=f64), torch.zeros(batch, 2, dtype=f64))
    deq = DEQ(cell, solver=Anderson(tol=1e-13, max_iter=500), backward=backward)
    h, c = deq(x, z0)
    (h.sum() + c.square().sum()).backward()
    record = deq.last_forward
    assert len(record.sample_iterations) == batch and all(record.sample_converged)
    assert len(deq.last_backward.sample_residuals) == batch
    expected = dense_deq_gradient(cell, (h, c), x, None)
    torch.testing.assert_close(cell.U.grad, expected, rtol=1e-8, atol=1e-10)
    penalty = deq.jacobian_penalty((h.detach(), c.detach()), x)
    assert penalty.ndim == 0 and penalty.requires_grad


def test_deq_pytree_samples_are_judged_alone():
    """A sample's result does not depend on its batch (``refine=False``): solved alone and in
    a batch, the tuple-state DEQ gives the same iterations and state for each sample."""
    generator = torch.Generator().manual_seed(2)
    cell = TwoStateCell(3, 2, generator)
    x = {"u": 3 * torch.randn(4, 2, generator=generator, dtype=f64)}
    x["v"] = torch.randn(4, 2, generator=generator, dtype=f64)
    z0 = (torch.zeros(4, 3, dtype=f64), torch.zeros(4, 2, dtype=f64))
    deq = DEQ(cell, solver=FixedPoint(tol=1e-10, max_iter=500, refine=False))
    with torch.no_grad():
        h, c = deq(x, z0)
        together = deq.last_forward.sample_iterations
        for i in range(4):
            xi = {k: v[i : i + 1] for k, v in x.items()}
            hi, ci = deq(xi, (z0[0][i : i + 1], z0[1][i : i + 1]))
            assert deq.last_forward.sample_iterations == (together[i],)
            torch.testing.assert_close(hi[0], h[i], rtol=0, atol=0)
            torch.testing.assert_close(ci[0], c[i], rtol=0, atol=0)


def test_deq_names_z0_and_z_init_when_the_default_state_does_not_fit():
    lin = torch.nn.Linear(5, 5).requires_grad_(False)
    proj = torch.nn.Linear(3, 5).requires_grad_(False)
    deq = DEQ(lambda z, x: torch.tanh(lin(z) + proj(x)))
    with pytest.raises(ValueError, match="`z0`.*`z_init`"):
        deq(torch.randn(2, 3))
    z = DEQ(lambda z, x: torch.tanh(lin(z) + proj(x)), z_init=lambda x: x.new_zeros(2, 5))(
        torch.randn(2, 3)
    )
    assert z.shape == (2, 5)


def test_per_sample_state_leaves_must_share_their_batch():
    layer = fixed_point_layer(lambda w: w, per_sample=True)
    with pytest.raises(ValueError, match="batch of samples in the first dimension"):
        layer((torch.zeros(2, 3), torch.zeros(3, 3)))


# --- records ---------------------------------------------------------------------------------


def test_a_copied_layer_starts_with_no_records_and_works():
    phi, c, g = tanh_map(0, 3, 0.5)
    layer = fixed_point_layer(phi, warm_start=True)
    layer(torch.zeros(3, dtype=f64), c).sum().backward()
    twin = copy.deepcopy(layer)
    assert twin.last_forward is None and twin.last_backward is None
    assert twin._latest.previous_backward is None
    twin(torch.zeros(3, dtype=f64), c)
    assert twin.last_forward.converged and layer.last_backward is not None


def test_nonfinite_forward_poisons_an_unrolled_output_with_its_graph():
    layer = fixed_point_layer(
        lambda w, c: w * 0 + math.inf * c,
        solver=FixedPoint(),
        backward=Unrolled(),
        on_failure="ignore",
    )
    c = torch.ones(2, requires_grad=True)
    w = layer(torch.zeros(2), c)
    assert torch.isnan(w).all() and w.requires_grad


# --- the documentation's examples of the core run --------------------------------------------


@pytest.mark.parametrize(
    "page, marker",
    [
        ("concepts.md", "Phantom(steps=4"),
        ("concepts.md", "def kkt"),
        ("concepts.md", "closed form"),
        ("deq.md", "TwoStates"),
    ],
)
def test_the_core_examples_in_the_docs_run(page, marker, capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / page).read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b]
    exec(compile(block, f"docs/{page}", "exec"), {})
    printed = capsys.readouterr().out
    expected = {"Phantom(steps=4": "True", "def kkt": "2", "closed form": "True"}
    expected = expected.get(marker, "4 GMRES")
    assert expected in printed, printed
