"""``implicit_layers.nn.DEQ``: forward solvers on batches (each sample stops on its own),
every backward against a dense float64 implicit-function-theorem reference, memory, and the
Jacobian penalty."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from registry import FORWARD, backward_solvers

from implicit_layers import (
    GMRES,
    Anderson,
    Broyden,
    FixedPoint,
    Status,
)
from implicit_layers.nn import DEQ, JacobianFree, Phantom, Unrolled

f64 = torch.float64


class TanhCell(torch.nn.Module):
    """``z = tanh(W z + U x + b)`` with ``||W||_2 = rho``."""

    def __init__(self, n: int, m: int, rho: float, seed: int, dtype=f64):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=generator, dtype=f64)
        self.W = torch.nn.Parameter((rho * W / torch.linalg.matrix_norm(W, 2)).to(dtype))
        self.U = torch.nn.Parameter(torch.randn(n, m, generator=generator, dtype=f64).to(dtype))
        self.b = torch.nn.Parameter(0.1 * torch.randn(n, generator=generator, dtype=f64).to(dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def newton_fixed_point(cell: TanhCell, x: torch.Tensor) -> torch.Tensor:
    """``z*`` per sample to machine precision by Newton's method on ``z - cell(z, x)``."""
    W, U, b = (t.detach() for t in (cell.W, cell.U, cell.b))
    z = torch.zeros(x.shape[0], W.shape[0], dtype=f64)
    eye = torch.eye(W.shape[0], dtype=f64)
    for _ in range(50):
        pre = z @ W.T + x @ U.T + b
        residual = z - torch.tanh(pre)
        jac = eye - (1 - torch.tanh(pre) ** 2)[:, :, None] * W  # per sample, d residual / dz
        z = z - torch.linalg.solve(jac, residual.unsqueeze(2)).squeeze(2)
    return z


def reference_gradients(cell: TanhCell, x: torch.Tensor, G: torch.Tensor, jacobian_free=False):
    """``dL/d(W, U, b, x)`` for ``L = <G, z*>`` by the implicit function theorem, densely:
    ``u_i = (I - J_i)^{-T} g_i`` with ``J_i = diag(1 - z_i^2) W`` (``u = g`` for JFB)."""
    z = newton_fixed_point(cell, x)
    W = cell.W.detach()
    slope = 1 - z**2
    eye = torch.eye(W.shape[0], dtype=f64)
    if jacobian_free:
        u = G.clone()
    else:
        systems = (eye - slope[:, :, None] * W).transpose(1, 2)
        u = torch.linalg.solve(systems, G.unsqueeze(2)).squeeze(2)
    v = slope * u  # (d cell / d pre-activation)^T u
    return z, {"W": v.T @ z, "U": v.T @ x, "b": v.sum(0), "x": v @ cell.U.detach()}


def problem(rho=0.8, n=6, m=3, batch=4, seed=0):
    cell = TanhCell(n, m, rho, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, m, generator=generator, dtype=f64).requires_grad_()
    G = torch.randn(batch, n, generator=generator, dtype=f64)
    return cell, x, G


def make_deq(cell: TanhCell, **options) -> DEQ:
    """A DEQ on the cell with ``z0 = 0`` of the cell's width (not ``x``'s)."""
    return DEQ(cell, z_init=lambda x: x.new_zeros(x.shape[0], cell.W.shape[0]), **options)


def gradients(deq: DEQ, cell: TanhCell, x: torch.Tensor, G: torch.Tensor):
    cell.zero_grad()
    x.grad = None
    z = deq(x, torch.zeros(x.shape[0], cell.W.shape[0], dtype=f64))
    (z * G).sum().backward()
    return z, {"W": cell.W.grad, "U": cell.U.grad, "b": cell.b.grad, "x": x.grad}


TIGHT = dict(tol=1e-12, max_iter=500)
IMPLICIT_BACKWARDS = {e.name: e.make(1e-12, 500) for e in backward_solvers("contraction")}
FORWARD_SOLVERS = {  # the fixed-point iterations (their options are varied below)
    e.name: e.make(1e-12, 500) for e in FORWARD if e.needs == "contraction"
}


@pytest.mark.parametrize("backward", IMPLICIT_BACKWARDS, ids=str)
@pytest.mark.parametrize("solver", FORWARD_SOLVERS, ids=str)
def test_implicit_gradients_match_the_dense_reference(solver, backward):
    cell, x, G = problem()
    deq = make_deq(cell, solver=FORWARD_SOLVERS[solver], backward=IMPLICIT_BACKWARDS[backward])
    z, got = gradients(deq, cell, x, G)
    z_ref, expected = reference_gradients(cell, x.detach(), G)
    torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-9)
    assert deq.last_forward.converged and deq.last_backward.converged
    # every backward records each sample; the fixed-point ones judge each on its own, the
    # linear solvers the batch as one system (a sample may then miss the tolerance alone)
    assert len(deq.last_backward.sample_residuals) == len(deq.last_backward.sample_converged)
    assert len(deq.last_backward.sample_residuals) == x.shape[0]
    if backward.endswith("(adjoint)"):  # a forward solver judges each sample on its own
        assert all(deq.last_backward.sample_converged)
    # the decoy: JFB's gradient is far from the implicit one at this contraction
    _, decoy = reference_gradients(cell, x.detach(), G, jacobian_free=True)
    assert (decoy["W"] - expected["W"]).norm() > 1e-2 * expected["W"].norm()


def test_fixed_point_type_backwards_judge_and_record_each_sample():
    cell, x, G = problem(batch=5)
    deq = make_deq(cell, solver=Anderson(**TIGHT), backward=Anderson(tol=1e-9))
    gradients(deq, cell, x, G)
    record = deq.last_backward
    assert len(record.sample_iterations) == len(record.sample_residuals) == 5
    assert all(record.sample_converged) and max(record.sample_residuals) <= 1e-9


def test_jacobian_free_is_the_one_step_gradient():
    cell, x, G = problem()
    deq = make_deq(cell, solver=Anderson(**TIGHT), backward=JacobianFree())
    _, got = gradients(deq, cell, x, G)
    _, expected = reference_gradients(cell, x.detach(), G, jacobian_free=True)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-10)
    assert deq.last_backward is None


@pytest.mark.parametrize("damping", [1.0, 0.6])
def test_phantom_gradients_approach_the_implicit_ones_as_steps_grow(damping):
    cell, x, G = problem(rho=0.5)
    _, expected = reference_gradients(cell, x.detach(), G)
    errors = []
    for steps in (1, 5, 40):
        deq = make_deq(
            cell, solver=Anderson(**TIGHT), backward=Phantom(steps=steps, damping=damping)
        )
        _, got = gradients(deq, cell, x, G)
        errors.append(float((got["W"] - expected["W"]).norm() / expected["W"].norm()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-8


@pytest.mark.parametrize("solver", ["FixedPoint", "Anderson", "Broyden"])
def test_unrolled_gradients_match_the_implicit_ones_once_converged(solver):
    cell, x, G = problem()
    deq = make_deq(cell, solver=FORWARD_SOLVERS[solver], backward=Unrolled())
    _, got = gradients(deq, cell, x, G)
    _, expected = reference_gradients(cell, x.detach(), G)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-7, atol=1e-8)


def saved_bytes(deq: DEQ, x: torch.Tensor, z0: torch.Tensor) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        deq(x, z0)
    return total


def test_unrolled_fixed_point_saves_what_a_plain_autograd_loop_saves():
    cell, x, _ = problem(n=16, batch=4)
    z0 = torch.zeros(4, 16, dtype=f64)
    solver = FixedPoint(tol=0.0, max_iter=12)
    deq = make_deq(cell, solver=solver, backward=Unrolled(), on_failure="ignore")

    def loop(x, z):
        for _ in range(12):
            z = cell(z, x)
        return z

    assert saved_bytes(deq, x, z0) == saved_bytes(loop, x, z0)
    torch.testing.assert_close(deq(x, z0), loop(x, z0), rtol=0, atol=0)


@pytest.mark.parametrize("solver", ["Anderson", "Broyden"])
def test_the_history_written_in_place_or_not_gives_the_same_iterates(solver):
    """Without a graph the histories are written in place; under unrolled differentiation out
    of place, which autograd needs. Both make the same iteration."""
    cell, x, _ = problem(batch=5)
    make = type(FORWARD_SOLVERS[solver])
    in_place = make_deq(cell, solver=make(tol=1e-9))
    out_of_place = make_deq(cell, solver=make(tol=1e-9), backward=Unrolled())
    z = out_of_place(x)
    assert z.requires_grad
    torch.testing.assert_close(z.detach(), in_place(x), rtol=0, atol=0)
    assert out_of_place.last_forward == in_place.last_forward


@pytest.mark.parametrize("solver", ["FixedPoint", "Anderson", "Broyden"])
def test_the_final_step_makes_the_gradient_more_accurate(solver):
    """At a loose tolerance the forward error dominates the gradient's: returning ``f(w)``
    rather than ``w`` shrinks ``z``'s error by the contraction factor, and the gradient's."""
    rho = 0.8
    cell, x, G = problem(rho=rho, batch=6)
    z_ref, expected = reference_gradients(cell, x.detach(), G)
    expected = torch.cat([expected[name].reshape(-1) for name in ("W", "U", "b", "x")])
    z_errors, grad_errors = [], []
    for final_step in (False, True):
        forward = type(FORWARD_SOLVERS[solver])(tol=1e-4, final_step=final_step)
        deq = make_deq(cell, solver=forward, backward=GMRES(tol=1e-12))
        z, got = gradients(deq, cell, x, G)
        got = torch.cat([got[name].reshape(-1) for name in ("W", "U", "b", "x")])
        z_errors.append(float((z.detach() - z_ref).norm()))
        grad_errors.append(float((got - expected).norm() / expected.norm()))
    assert z_errors[1] <= rho * z_errors[0]
    assert grad_errors[1] < 0.5 * grad_errors[0]


@pytest.mark.parametrize("solver", ["FixedPoint", "Anderson", "Broyden"])
def test_refining_converged_samples_makes_z_and_the_gradient_more_accurate(solver):
    """Samples of different scales converge at different steps. Refined, those that converge
    early keep stepping while the batch runs: ``z``'s error shrinks in every sample, and with
    the adjoint solved the same way (judged per sample, refined too) so does the gradient's,
    at the same number of evaluations and products."""
    cell, x, G = problem(rho=0.8, batch=6)
    with torch.no_grad():
        x.mul_(torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 30.0], dtype=f64)[:, None])
    z_ref, expected = reference_gradients(cell, x.detach(), G)
    z_errors, grad_errors, records = [], [], []
    for refine in (False, True):
        method = type(FORWARD_SOLVERS[solver])(tol=1e-4, refine=refine)
        deq = make_deq(cell, solver=method, backward=method)
        z, got = gradients(deq, cell, x, G)
        z_errors.append((z.detach() - z_ref).norm(dim=1))
        grad_errors.append((got["x"] - expected["x"]).norm(dim=1) / expected["x"].norm(dim=1))
        records.append((deq.last_forward, deq.last_backward))
    (forward, backward), (refined_forward, refined_backward) = records
    assert len(set(forward.sample_iterations)) > 1
    assert refined_forward.sample_iterations == forward.sample_iterations
    assert (refined_forward.products, refined_backward.products) == (
        forward.products,
        backward.products,
    )
    assert bool((z_errors[1] <= z_errors[0] * (1 + 1e-9)).all())
    # x's gradient is per sample: it gains in the samples done before the last step both ways
    early = torch.tensor(forward.sample_iterations) < forward.iterations
    early &= torch.tensor(backward.sample_iterations) < backward.iterations
    assert bool((grad_errors[0][early] > 1e-9).any())
    assert bool((grad_errors[1][early] <= 0.5 * grad_errors[0][early] + 1e-12).all())


def test_a_batch_of_one_has_its_per_sample_fields_and_a_vector_none():
    cell, x, G = problem(batch=1)
    deq = make_deq(cell, solver=Anderson(tol=1e-10), backward=Anderson(tol=1e-10))
    gradients(deq, cell, x, G)
    for record in (deq.last_forward, deq.last_backward):
        assert record.sample_iterations == (record.iterations,)
        assert record.sample_residuals == (record.relative_residual,)
        assert record.sample_converged == (True,)
    z, record = Anderson(tol=1e-10).solve(lambda z: cell(z[None], x.detach())[0], x.new_zeros(6))
    assert record.converged and record.sample_iterations == record.sample_residuals == ()


def test_implicit_backward_saves_memory_independent_of_the_iterations():
    cell, x, _ = problem(rho=0.95, n=32, batch=8)
    z0 = torch.zeros(8, 32, dtype=f64)
    implicit, unrolled = [], []
    for iterations in (5, 40):
        solver = FixedPoint(max_iter=iterations, tol=0.0)
        implicit.append(saved_bytes(make_deq(cell, solver=solver, on_failure="ignore"), x, z0))
        deq = make_deq(cell, solver=solver, backward=Unrolled(), on_failure="ignore")
        unrolled.append(saved_bytes(deq, x, z0))
    assert implicit[0] == implicit[1]
    # z*, and references to x and the cell's parameters (no activations of any iteration)
    inputs = [x, *cell.parameters()]
    assert implicit[0] == 8 * 32 * 8 + sum(t.numel() * t.element_size() for t in inputs)
    assert unrolled[1] > 5 * unrolled[0]


def test_each_sample_stops_on_its_own_and_its_residual_is_its_own():
    cell, x, _ = problem(rho=0.9, batch=6)
    with torch.no_grad():
        x.mul_(torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 30.0], dtype=f64)[:, None])
    for make, refine in itertools.product((FixedPoint, Anderson, Broyden), (False, True)):
        deq = make_deq(cell, solver=make(tol=1e-10, final_step=False, refine=refine))
        with torch.no_grad():
            z = deq(x)
        record = deq.last_forward
        assert record.converged and len(set(record.sample_iterations)) > 1
        # without the final step the record's residual is the returned point's own
        true = (cell(z, x) - z).norm(dim=1) / z.norm(dim=1)
        assert record.sample_residuals == pytest.approx(true.tolist(), rel=1e-6, abs=1e-14)
        assert max(record.sample_iterations) == record.iterations
        if not refine:  # a sample alone follows the same iterates as in the batch
            alone = deq(x[2:3].detach())
            torch.testing.assert_close(alone, z[2:3], rtol=1e-12, atol=1e-13)


@st.composite
def row_problems(draw):
    rows = draw(st.integers(1, 5))
    n = draw(st.integers(1, 12))
    rho = draw(st.floats(0.1, 0.95))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, n, n, generator=generator, dtype=f64)
    W = rho * W / torch.linalg.matrix_norm(W, 2)[:, None, None]
    c = torch.randn(rows, n, generator=generator, dtype=f64)
    return W, c


@settings(max_examples=30, deadline=None)
@given(row_problems(), st.sampled_from(["FixedPoint", "Anderson", "Broyden"]), st.booleans())
def test_solvers_on_rows_find_each_rows_fixed_point(rows_problem, name, refine):
    W, c = rows_problem
    solver = type(FORWARD_SOLVERS[name])(tol=1e-10, max_iter=1000, refine=refine)
    z, record = solver.solve(lambda z: torch.tanh((W @ z.unsqueeze(2)).squeeze(2) + c), 0 * c)
    assert record.status is Status.CONVERGED
    true = (torch.tanh((W @ z.unsqueeze(2)).squeeze(2) + c) - z).norm(dim=1)
    assert bool((true <= 1e-10 * z.norm(dim=1) + 1e-300).all())


def test_broyden_solves_a_linear_fixed_point_in_at_most_2n_steps():
    generator = torch.Generator().manual_seed(3)
    n = 6
    A = torch.randn(n, n, generator=generator, dtype=f64)
    A = 0.9 * A / torch.linalg.matrix_norm(A, 2)
    c = torch.randn(n, generator=generator, dtype=f64)
    z0 = torch.zeros(n, dtype=f64)
    z, record = Broyden(tol=1e-11, memory=2 * n + 2).solve(lambda z: A @ z + c, z0)
    expected = torch.linalg.solve(torch.eye(n, dtype=f64) - A, c)
    torch.testing.assert_close(z, expected, rtol=1e-9, atol=1e-10)
    assert record.iterations <= 2 * n + 1
    # plain iteration needs far more at this contraction
    _, slow = FixedPoint(tol=1e-11, max_iter=1000).solve(lambda z: A @ z + c, z0)
    assert slow.iterations > 2 * record.iterations


def test_jacobian_penalty_estimates_the_mean_squared_singular_value():
    cell, x, _ = problem(n=8, batch=3)
    deq = make_deq(cell)
    z = newton_fixed_point(cell, x.detach())
    torch.manual_seed(0)
    estimate = deq.jacobian_penalty(z, x, samples=4000)
    slope = 1 - z**2
    exact = (
        sum(torch.linalg.matrix_norm(slope[i][:, None] * cell.W.detach()) ** 2 for i in range(3))
        / z.numel()
    )
    assert float(estimate.detach()) == pytest.approx(float(exact), rel=0.05)
    (grad,) = torch.autograd.grad(estimate, cell.W)
    assert float(grad.norm()) > 0


def test_bad_inputs_are_named():
    cell, x, _ = problem()
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor"):
        make_deq(cell)([1.0, 2.0])
    with pytest.raises(ValueError, match="`z0` and `x` must share their batch dimension"):
        make_deq(cell)(x, torch.zeros(3, 6, dtype=f64))
    with pytest.raises(ValueError, match="the cell's output must have the shape of `z0`"):
        DEQ(lambda z, x: torch.cat((cell(z, x), z[:, :1]), 1))(x, torch.zeros(4, 6, dtype=f64))
    with pytest.raises(ValueError, match="`steps` must be"):
        Phantom(steps=0)
    with pytest.raises(TypeError, match="`z_init` must be a callable"):
        DEQ(cell, z_init=3)
    with pytest.raises(ValueError, match="`samples` must be an int >= 1"):
        make_deq(cell).jacobian_penalty(x, x, samples=0)


def test_module_registers_the_cell_and_trains_with_an_optimizer():
    cell, x, G = problem()
    deq = make_deq(cell, solver=Anderson(tol=1e-8))
    assert {name for name, _ in deq.named_parameters()} == {"cell.W", "cell.U", "cell.b"}
    optimizer = torch.optim.SGD(deq.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        z = deq(x.detach())
        loss = ((z - 0.5) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert math.isfinite(losses[-1])


def _symmetric_tanh_deq(seed: int, n: int, batch: int, rho: float):
    """z = tanh(W z + x) with W symmetric: J = diag(1 - z*^2) W is similar to a symmetric
    matrix, so its eigenvalues are real and the power method converges to rho(J)."""
    generator = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=generator, dtype=f64)
    W = M + M.T
    W = rho * W / torch.linalg.eigvalsh(W).abs().max()
    x = 0.5 * torch.randn(batch, n, generator=generator, dtype=f64)

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Parameter(W)

        def forward(self, z, x):
            return torch.tanh(z @ self.W.T + x)

    return Cell(), x


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 8), rho=st.floats(0.2, 0.95))
def test_spectral_radius_matches_the_dense_eigenvalues_per_sample(seed, n, rho):
    cell, x = _symmetric_tanh_deq(seed, n, 3, rho)
    deq = DEQ(cell, solver=FixedPoint(tol=1e-12, max_iter=2000))
    z = deq(x).detach()
    torch.manual_seed(seed)
    estimate = deq.spectral_radius(z, x, iterations=400)
    for row in range(3):
        J = torch.diag(1 - z[row] ** 2) @ cell.W.detach()
        moduli = torch.linalg.eigvals(J).abs().sort(descending=True).values
        # the power method's error shrinks like (|lambda_2| / |lambda_1|)^k (times the
        # eigenvectors' conditioning, here that of diag(1 - z*^2)^(1/2), at most 1 / 0.05)
        ratio = float(moduli[1] / moduli[0])
        bound = 1e-6 + 20 * ratio**400
        assert float(estimate[row]) == pytest.approx(float(moduli[0]), rel=bound)
    assert estimate.shape == (3,) and not estimate.requires_grad


def test_eval_factor_raises_the_forward_budget_in_eval_mode_only():
    """torchdeq's eval_factor: the same DEQ, a larger iteration budget at test time."""
    cell, x = _symmetric_tanh_deq(0, 6, 2, 0.95)
    deq = DEQ(cell, solver=FixedPoint(tol=0.0, max_iter=10), eval_factor=2.5, on_failure="ignore")
    deq(x)
    assert deq.last_forward.iterations == 10 and deq.solver.max_iter == 10
    deq.eval()
    deq(x)
    assert deq.last_forward.iterations == 25  # int(10 * 2.5), as torchdeq rounds
    deq.train()
    deq(x)
    assert deq.last_forward.iterations == 10
    with pytest.raises(ValueError, match="`eval_factor` must be a positive number"):
        DEQ(cell, eval_factor=0)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_a_parametrized_cell_trains_with_the_implicit_gradient(norm):
    """The normalisation recipe of the DEQ guide: torch's own parametrizations inside a cell.
    The implicit gradient of the parametrization's tensors equals autograd through 300 plain
    steps of the same cell from z* (a contraction: the unrolled gradient converges to it).
    spectral_norm updates its power-iteration vector on every call in training mode, so the
    map would move under the solver: the recipe puts that module in eval mode for the solve
    (weight_norm has no state). Not ``parametrize.cached()``: its cache is filled by the first
    call, which runs under the forward's no_grad, and the backward then sees a weight with no
    graph to the parametrization's tensors."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 5).double()
    with torch.no_grad():
        linear.weight.mul_(0.6 / torch.linalg.matrix_norm(linear.weight, 2))
    linear = getattr(parametrizations, norm)(linear)
    if norm == "spectral_norm":
        linear.eval()  # a fixed u: W / sigma(W) is one map for the solver and the backward

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, z, x):
            return torch.tanh(0.8 * self.linear(z) + x)

    cell = Cell()
    x = torch.randn(3, 5, dtype=f64)
    deq = DEQ(cell, solver=FixedPoint(tol=1e-13, max_iter=1000), backward=GMRES(tol=1e-13))
    z = deq(x)
    z.pow(2).sum().backward()
    implicit = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    unrolled = z.detach()
    for _ in range(300):
        unrolled = cell(unrolled, x)
    unrolled.pow(2).sum().backward()
    for got, want in zip(implicit, [p.grad for p in cell.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_n_states_returns_the_iterates_of_the_solve_each_with_its_phantom_gradient():
    """torchdeq's n_states: the solver's iterates after 10 and 20 of 30 steps (FixedPoint:
    z_10 and z_20), each through one undamped step with a graph (so z_11 and z_21, with the
    gradient of that one step, as torchdeq's), then z* with the implicit gradient."""
    cell, x = _symmetric_tanh_deq(1, 5, 2, 0.9)
    solver = FixedPoint(tol=0.0, max_iter=30)
    deq = DEQ(cell, solver=solver, n_states=3, on_failure="ignore")
    states = deq(x)
    assert len(states) == 3
    iterates = [torch.zeros_like(x)]
    for _ in range(30):
        iterates.append(cell(iterates[-1], x).detach())
    torch.testing.assert_close(states[0], iterates[11])
    torch.testing.assert_close(states[1], iterates[21])
    torch.testing.assert_close(states[2], DEQ(cell, solver=solver, on_failure="ignore")(x))
    (got,) = torch.autograd.grad(states[0].pow(2).sum(), cell.W)
    (want,) = torch.autograd.grad(cell(iterates[10], x).pow(2).sum(), cell.W)
    torch.testing.assert_close(got, want)

    early = DEQ(cell, solver=FixedPoint(tol=1e-3, max_iter=30), n_states=2, indexing=[29])
    first, last = early(x)  # converged long before evaluation 29: z*'s step stands in
    torch.testing.assert_close(first, cell(last.detach(), x))
    for bad, match in (
        (dict(n_states=0), "`n_states` must be an int >= 1"),
        (dict(n_states=3, indexing=[5]), "`indexing` must hold n_states - 1 = 2"),
        (dict(n_states=2, solver=lambda f, z0: z0), "`n_states` > 1 records the iterates"),
        (dict(n_states=2, state_backward=GMRES()), "`state_backward` must be a Phantom"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            DEQ(cell, **bad)


def test_the_deq_features_agree_with_torchdeq():
    """Same cell: n_states' states (torchdeq's core='indexing', grad=1), the spectral radius
    (its sradius_mode, 100 power steps) and the eval-mode budget (its eval_factor)."""
    torchdeq = pytest.importorskip("torchdeq")
    cell, x = _symmetric_tanh_deq(1, 5, 2, 0.9)
    theirs = torchdeq.get_deq(
        core="indexing",
        n_states=3,
        f_solver="fixed_point_iter",
        f_max_iter=30,
        f_tol=1e-30,
        grad=1,
    )
    their_states, _ = theirs(lambda z: cell(z, x), torch.zeros_like(x))
    ours = DEQ(cell, solver=FixedPoint(tol=0.0, max_iter=30), n_states=3, on_failure="ignore")
    for mine, their in zip(ours(x)[:2], their_states[:2]):  # the last: z* here, by the IFT
        torch.testing.assert_close(mine, their, rtol=1e-12, atol=1e-14)

    radius = torchdeq.get_deq(f_solver="fixed_point_iter", f_max_iter=200, f_tol=1e-12).eval()
    _, info = radius(lambda z: cell(z, x), torch.zeros_like(x), sradius_mode=True)
    deq = DEQ(cell, solver=FixedPoint(tol=1e-12, max_iter=200))
    z = deq(x)
    torch.testing.assert_close(
        deq.spectral_radius(z, x, iterations=100), info["sradius"], rtol=1e-3, atol=0
    )

    budget = torchdeq.get_deq(
        f_solver="fixed_point_iter", f_max_iter=10, f_tol=1e-30, eval_factor=2.5
    ).eval()
    _, info = budget(lambda z: cell(z, x), torch.zeros_like(x))
    deq = DEQ(cell, solver=FixedPoint(tol=0.0, max_iter=10), eval_factor=2.5, on_failure="ignore")
    deq.eval()
    deq(x)
    assert deq.last_forward.iterations == int(info["nstep"].max()) == 25
