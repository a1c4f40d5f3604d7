"""Each linear solver against an independent dense float64 reference of its textbook method."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from registry import LINEAR, choose

from implicit_layers import (
    CG,
    GMRES,
    BiCGSTAB,
    ConvergenceWarning,
    Direct,
    MatrixOperator,
    Neumann,
    NormalCG,
    Nystrom,
    Status,
)
from implicit_layers._records import report

f64 = torch.float64


@st.composite
def spd_systems(draw):
    """A symmetric positive definite ``A`` with condition number up to 1e3, and ``b``."""
    n = draw(st.integers(3, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    condition = draw(st.floats(1.5, 1e3))
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=f64))
    eigenvalues = torch.logspace(0, math.log10(condition), n, dtype=f64)
    A = q @ torch.diag(eigenvalues) @ q.T
    return A, torch.randn(n, generator=generator, dtype=f64)


@st.composite
def contractive_systems(draw):
    """``A = I - J^T`` with a non-symmetric ``J`` of spectral norm ``rho < 1``, and ``b``."""
    n = draw(st.integers(3, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    rho = draw(st.floats(0.05, 0.9))
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(n, n, generator=generator, dtype=f64)
    J = rho * J / torch.linalg.matrix_norm(J, 2)
    return torch.eye(n, dtype=f64) - J.T, torch.randn(n, generator=generator, dtype=f64)


def textbook_cg(A: torch.Tensor, b: torch.Tensor, k: int, old_residual: bool = False):
    """Hestenes-Stiefel CG written out independently: the direction is updated with the new
    residual. ``old_residual=True`` reproduces two peers' defect (the previous residual)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    for _ in range(k):
        Ap = A @ p
        alpha = (r @ r) / (p @ Ap)
        x = x + alpha * p
        r_new = r - alpha * Ap
        p = (r if old_residual else r_new) + ((r_new @ r_new) / (r @ r)) * p
        r = r_new
    return x


def minimal_residual(A: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """``min ||b - A x||`` over the Krylov space ``span{b, Ab, ..., A^{k-1} b}``, densely."""
    columns = [b / b.norm()]
    for _ in range(k - 1):
        v = A @ columns[-1]
        for c in columns:  # orthogonalise twice for a well-conditioned basis
            v = v - (c @ v) * c
        for c in columns:
            v = v - (c @ v) * c
        columns.append(v / v.norm())
    basis = torch.stack(columns, dim=1)
    y = torch.linalg.lstsq(A @ basis, b.unsqueeze(1)).solution.squeeze(1)
    return float((b - A @ basis @ y).norm())


def a_norm_error(A, x, exact):
    e = x - exact
    return float(torch.sqrt(e @ A @ e))


@settings(max_examples=30, deadline=None)
@given(spd_systems(), st.integers(1, 25))
def test_cg_is_the_textbook_method(system, k):
    A, b = system
    # Iterate by iterate, two float64 implementations agree only until the Krylov space nears
    # R^n: beyond that CG amplifies rounding (loss of orthogonality). Below that, they differ
    # by rounding amplified by the loss of orthogonality (seen up to 1e-10); an algorithmic
    # difference, such as a direction updated with the old residual, is O(1) after two steps.
    k = min(k, b.numel() // 2)
    x, record = CG(max_iter=k, tol=0.0).solve(A, b)
    reference = textbook_cg(A, b, min(k, record.iterations))
    assert float((x - reference).norm()) <= 1e-6 * float(reference.norm())
    old_residual_variant = textbook_cg(A, b, k, old_residual=True)
    if k >= 2:
        assert float((old_residual_variant - reference).norm()) > 1e-3 * float(reference.norm())


@settings(max_examples=30, deadline=None)
@given(spd_systems())
def test_cg_error_never_grows_with_k(system):
    """CG's A-norm error is non-increasing in k (the defect of two peers is that it grows)."""
    A, b = system
    exact = torch.linalg.solve(A, b)
    errors = [a_norm_error(A, CG(max_iter=k, tol=0.0).solve(A, b)[0], exact) for k in range(1, 16)]
    initial = float(torch.sqrt(exact @ A @ exact))
    for before, after in zip([initial] + errors, errors):
        assert after <= before * (1 + 1e-9) + 1e-12 * initial
    condition = float(torch.linalg.cond(A))
    bound = 2 * ((math.sqrt(condition) - 1) / (math.sqrt(condition) + 1)) ** 15 * initial
    assert errors[-1] <= bound * (1 + 1e-6) + 1e-10 * initial


@settings(max_examples=30, deadline=None)
@given(contractive_systems(), st.integers(1, 12))
def test_gmres_attains_the_minimal_residual_of_its_krylov_space(system, k):
    A, b = system
    n = b.numel()
    k = min(k, n - 1)
    x, record = GMRES(max_iter=k, tol=0.0, restart=50).solve(A, b)
    achieved = float((b - A @ x).norm())
    optimum = minimal_residual(A, b, k)
    assert achieved <= optimum * (1 + 1e-6) + 1e-12 * float(b.norm())
    assert achieved >= optimum * (1 - 1e-6) - 1e-12 * float(b.norm())
    # the record's residual is the true one
    assert record.residual == pytest.approx(achieved, rel=1e-6, abs=1e-12 * float(b.norm()))


@settings(max_examples=25, deadline=None)
@given(contractive_systems(), st.integers(1, 5))
def test_restarted_gmres_residual_is_monotone_and_true(system, restart):
    A, b = system
    x, record = GMRES(max_iter=40, tol=0.0, restart=restart).solve(A, b)
    history = record.history
    # Monotone up to rounding: once the Krylov space is exhausted the residual sits at ~1e-16.
    assert all(
        later <= earlier * (1 + 1e-9) + 1e-13 for earlier, later in zip(history, history[1:])
    )
    true = float((b - A @ x).norm() / b.norm())
    assert record.relative_residual == pytest.approx(true, rel=1e-4, abs=1e-13)


@settings(max_examples=30, deadline=None)
@given(contractive_systems(), st.integers(1, 20))
def test_neumann_is_the_truncated_series(system, k):
    """``k`` products give ``sum_{i=0}^{k} (I - A)^i b``, the series up to the k-th power, with
    the powers taken densely; the residual recorded is that of the sum up to the (k-1)-th."""
    A, b = system
    J_T = torch.eye(b.numel(), dtype=f64) - A
    x, record = Neumann(max_iter=k, tol=0.0).solve(A, b)
    powers = [torch.linalg.matrix_power(J_T, i) for i in range(k + 1)]
    assert record.products == record.iterations == k
    assert torch.allclose(x, sum(powers) @ b, rtol=1e-10, atol=1e-12)
    before_last = sum(powers[:-1]) @ b
    assert record.residual == pytest.approx(float((b - A @ before_last).norm()), rel=1e-6)
    # here ||I - A|| < 1: the recorded residual bounds the returned x's (up to rounding)
    assert float((b - A @ x).norm()) <= record.residual + 1e-13 * float(b.norm())


@settings(max_examples=30, deadline=None)
@given(spd_systems(), st.integers(1, 20))
def test_neumann_with_a_step_is_the_series_of_the_scaled_system(system, k):
    """On an SPD ``A`` with ``step = 1 / ||A||``: ``step sum_{i=0}^{k} (I - step A)^i b``."""
    A, b = system
    step = 1 / float(torch.linalg.matrix_norm(A, 2))
    x, record = Neumann(step=step, max_iter=k, tol=0.0).solve(A, b)
    M = torch.eye(b.numel(), dtype=f64) - step * A
    series = step * sum(torch.linalg.matrix_power(M, i) for i in range(k + 1)) @ b
    assert record.products == k
    assert torch.allclose(x, series, rtol=1e-10, atol=1e-12 * float(b.norm()))


def test_neumann_counts_the_warm_start_residual_and_sums_from_it():
    A = torch.tensor([[1.0, 0.2], [0.1, 0.8]], dtype=f64)
    b, x0 = torch.tensor([1.0, -2.0], dtype=f64), torch.tensor([0.5, 0.5], dtype=f64)
    x, record = Neumann(max_iter=3, tol=0.0).solve(A, b, x0)
    J_T = torch.eye(2, dtype=f64) - A
    alpha = (A @ x0) @ b / ((A @ x0) @ (A @ x0))  # the warm start is scaled (scaled_start)
    series = sum(torch.linalg.matrix_power(J_T, i) for i in range(4)) @ (b - alpha * A @ x0)
    assert record.products == 4
    assert torch.allclose(x, alpha * x0 + series, rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(contractive_systems(), st.integers(1, 10))
def test_normal_cg_is_cg_on_the_normal_equations(system, k):
    A, b = system
    x, _ = NormalCG(max_iter=k, tol=0.0).solve(A, b)
    y = textbook_cg(A @ A.T, b, k)
    assert torch.allclose(x, A.T @ y, rtol=1e-7, atol=1e-9 * float(b.norm()))


@settings(max_examples=30, deadline=None)
@given(contractive_systems())
def test_general_solvers_converge_to_the_dense_solution(system):
    A, b = system
    exact = torch.linalg.solve(A, b)
    for solver in (
        GMRES(tol=1e-12),
        BiCGSTAB(tol=1e-12),
        NormalCG(tol=1e-12, max_iter=500),
        Neumann(tol=1e-12, max_iter=2000),
        Direct(),
    ):
        x, record = solver.solve(A, b)
        assert record.converged, record.summary()
        assert torch.allclose(x, exact, rtol=1e-8, atol=1e-9 * float(exact.norm()))


# Nystrom's registry entry (rho = 1e-8) is for float64: in float32 Woodbury's rounding, eps / rho,
# exceeds 1, and it records that failure (relative residual 29) at both scales alike.
@pytest.mark.parametrize(
    "entry",
    [e for e in choose(LINEAR, "spd contraction") if e.name != "Nystrom"],
    ids=lambda e: e.name,
)
def test_tiny_float32_right_hand_side_neither_underflows_nor_stops_early(entry):
    """A gradient of 1e-13 in float32 solves as well as one of 1, with the same iterations."""
    solver = entry.make(1e-6, 20)
    A, b = _fixed_contractive()
    x_unit, unit = solver.solve(A, b)
    x_tiny, tiny = solver.solve(A, 1e-13 * b)
    assert tiny.iterations == unit.iterations and tiny.converged
    assert torch.allclose(x_tiny, 1e-13 * x_unit, rtol=1e-5, atol=0)
    assert tiny.relative_residual <= max(2 * unit.relative_residual, 1e-6)


def _fixed_contractive():
    generator = torch.Generator().manual_seed(3)
    n = 20
    J = torch.randn(n, n, generator=generator)
    J = 0.3 * (J + J.T) / torch.linalg.matrix_norm(J + J.T, 2)  # symmetric, so CG applies too
    return torch.eye(n) - J, torch.randn(n, generator=generator)


def test_zero_rhs_returns_zero_without_a_product():
    calls = []
    x, record = GMRES().solve(lambda v: calls.append(v) or v, torch.zeros(5))
    assert torch.equal(x, torch.zeros(5)) and not calls
    assert record.products == 0 and record.status is Status.CONVERGED


def test_nonfinite_rhs_is_reported_not_solved():
    x, record = GMRES().solve(lambda v: v, torch.tensor([1.0, math.nan]))
    assert record.status is Status.NONFINITE and record.iterations == 0 and record.products == 0
    assert torch.isnan(x).all()


def test_nan_inside_the_solve_stops_at_its_iteration():
    count = []

    def matvec(v):
        count.append(1)
        return v * (math.nan if len(count) == 3 else torch.arange(1.0, 9.0))

    _, record = GMRES(tol=0.0, max_iter=10).solve(matvec, torch.ones(8))
    assert record.status is Status.NONFINITE and record.iterations == 3 and record.products == 3


def test_history_starts_at_one_and_ends_at_the_final_residual():
    A, b = _fixed_contractive()
    _, record = GMRES(tol=1e-6).solve(A, b)
    assert record.history[0] == 1.0
    assert len(record.history) == record.iterations + 1
    assert record.history[-1] == record.relative_residual <= 1e-6


def textbook_pcg(A, b, M, k):
    """Preconditioned CG written out independently."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = M @ r
    p = z.clone()
    for _ in range(k):
        Ap = A @ p
        alpha = (r @ z) / (p @ Ap)
        x = x + alpha * p
        r_new = r - alpha * Ap
        z_new = M @ r_new
        p = z_new + ((r_new @ z_new) / (r @ z)) * p
        r, z = r_new, z_new
    return x


@st.composite
def badly_scaled_spd_systems(draw):
    """``D S D`` with ``S`` well conditioned and ``D`` a diagonal spanning ``scale`` orders."""
    A, b = draw(spd_systems())
    scale = draw(st.floats(1.0, 3.0))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    D = torch.diag(10 ** (scale * torch.rand(b.numel(), generator=generator, dtype=f64)))
    return D @ A @ D, b


@settings(max_examples=30, deadline=None)
@given(badly_scaled_spd_systems(), st.integers(1, 12))
def test_preconditioned_cg_is_the_textbook_method(system, k):
    A, b = system
    k = min(k, b.numel() // 2)  # as for CG: compare before the Krylov space fills R^n
    M = torch.diag(1 / torch.diag(A))  # Jacobi
    x, record = CG(max_iter=k, tol=0.0, preconditioner=lambda r: M @ r).solve(A, b)
    reference = textbook_pcg(A, b, M, record.iterations)
    assert float((x - reference).norm()) <= 1e-6 * float(reference.norm())
    assert record.products == record.iterations
    true = float((b - A @ x).norm() / b.norm())
    assert record.relative_residual == pytest.approx(true, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("method", [CG, GMRES], ids=["CG", "GMRES"])
def test_exact_preconditioner_solves_in_one_iteration(method):
    A, b = _fixed_contractive()
    A = A.double() @ A.double().T  # SPD, so CG applies too
    b = b.double()
    inverse = torch.linalg.inv(A)
    x, record = method(tol=1e-10, preconditioner=lambda v: inverse @ v).solve(A, b)
    assert record.iterations == 1 and record.converged
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-10)


def test_jacobi_preconditioning_cuts_iterations_on_a_badly_scaled_system():
    A, b = _fixed_contractive()
    D = torch.diag(torch.logspace(0, 2, b.numel()))
    A = D @ A @ D  # symmetric positive definite, condition ~1e4
    M = 1 / torch.diag(A)
    for method in (CG, GMRES):
        plain = method(tol=1e-5, max_iter=500).solve(A, b)[1]
        jacobi = method(tol=1e-5, max_iter=500, preconditioner=lambda v: M * v).solve(A, b)[1]
        assert jacobi.converged and jacobi.iterations < plain.iterations / 2, (plain, jacobi)


def test_preconditioner_must_be_callable():
    with pytest.raises(TypeError, match="`preconditioner` must be a callable"):
        CG(preconditioner=3)


@st.composite
def symmetric_indefinite_systems(draw):
    """A symmetric ``A`` with eigenvalues of both signs (at least one <= 0), and ``b``."""
    n = draw(st.integers(2, 20))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=f64))
    eigenvalues = torch.randn(n, generator=generator, dtype=f64)
    eigenvalues[0] = -eigenvalues[0].abs() - 0.1
    A = q @ torch.diag(eigenvalues) @ q.T
    return A, torch.randn(n, generator=generator, dtype=f64)


def textbook_cg_until_nonpositive_curvature(A, b, k):
    """Textbook CG that stops before a direction with ``p.A p <= 0``: ``(x, iterations, met)``."""
    x, r = torch.zeros_like(b), b.clone()
    p = r.clone()
    for iteration in range(1, k + 1):
        Ap = A @ p
        if p @ Ap <= 0:
            return x, iteration, True
        alpha = (r @ r) / (p @ Ap)
        x = x + alpha * p
        r_new = r - alpha * Ap
        p = r_new + ((r_new @ r_new) / (r @ r)) * p
        r = r_new
    return x, k, False


@settings(max_examples=40, deadline=None)
@given(symmetric_indefinite_systems(), st.integers(1, 25))
def test_cg_stops_at_negative_curvature_with_its_last_iterate(system, k):
    A, b = system
    x, record = CG(max_iter=k, tol=0.0).solve(A, b)
    expected, iterations, met = textbook_cg_until_nonpositive_curvature(A, b, k)
    assert record.iterations == record.products == iterations
    assert record.status is (Status.INDEFINITE if met else Status.MAX_ITER)
    assert record.failed
    torch.testing.assert_close(x, expected, rtol=1e-8, atol=1e-8 * float(expected.norm()))
    assert record.residual == pytest.approx(float((b - A @ x).norm()), rel=1e-6, abs=1e-12)


def test_cg_on_an_indefinite_system_is_reported_by_the_policy():
    A, b = torch.diag(torch.tensor([1.0, -1.0])), torch.ones(2)  # p0 = b: b.A b = 0
    x, record = CG().solve(A, b)
    assert record.status is Status.INDEFINITE and record.products == 1
    assert torch.equal(x, torch.zeros(2))
    with pytest.warns(ConvergenceWarning, match="not positive definite.*GMRES"):
        report(record, "backward", "warn")


@pytest.mark.parametrize(
    "test",
    [
        test_cg_is_the_textbook_method,
        test_cg_stops_at_negative_curvature_with_its_last_iterate,
        test_preconditioned_cg_is_the_textbook_method,
    ],
)
def test_cg_on_accelerators_takes_the_same_steps(monkeypatch, test):
    """The one-synchronisation step used on accelerators, run here on the CPU."""
    monkeypatch.setattr("implicit_layers._linear.cg.read_back_is_free", lambda device: False)
    test()


# --- a batch of independent rows (a DEQ's backward): the record of each row -----------------


@st.composite
def row_systems(draw):
    """``A = diag(I - J_i^T)`` over ``rows`` blocks of contractions ``J_i`` (a DEQ batch's
    backward system), and a ``b`` whose blocks span four orders of magnitude."""
    rows, n = draw(st.integers(1, 4)), draw(st.integers(2, 8))
    rho = draw(st.floats(0.05, 0.9))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    J = torch.randn(rows, n, n, generator=generator, dtype=f64)
    J = rho * J / torch.linalg.matrix_norm(J, 2)[:, None, None]
    A = torch.block_diag(*(torch.eye(n, dtype=f64) - J.transpose(1, 2)))
    scales = torch.logspace(-2, 2, rows, dtype=f64)[torch.randperm(rows, generator=generator)]
    b = (torch.randn(rows, n, generator=generator, dtype=f64) * scales[:, None]).reshape(-1)
    return A, b, rows


ROW_SOLVERS = {
    "CG": lambda k: CG(max_iter=k, tol=1e-3),  # on A A^T, symmetric positive definite
    "GMRES": lambda k: GMRES(max_iter=k, tol=1e-3, restart=3),
    "BiCGSTAB": lambda k: BiCGSTAB(max_iter=k, tol=1e-3),
    "Neumann": lambda k: Neumann(max_iter=k, tol=1e-3),
    "NormalCG": lambda k: NormalCG(max_iter=k, tol=1e-3),
    "Direct": lambda k: Direct(tol=1e-3),
    "Nystrom": lambda k: Nystrom(rank=k, rho=0.5),  # on A A^T; no tolerance: UNCHECKED
}


@settings(max_examples=60, deadline=None)
@given(row_systems(), st.sampled_from(sorted(ROW_SOLVERS)), st.integers(1, 8))
def test_each_row_of_a_batch_has_its_own_residual_in_the_record(system, name, k):
    """Solved as one system, a batch's record also gives each row's relative residual (of the
    point the record measures), its iterations (the batch's) and whether it meets the tolerance
    on its own; the rows' residuals make up the record's."""
    A, b, rows = system
    if name in ("CG", "Nystrom"):
        A = A @ A.T
    operator = MatrixOperator(A)
    operator.rows = rows
    x, record = ROW_SOLVERS[name](k).solve(operator, b)
    residual = b - A @ x
    if name == "Neumann":  # it measures the sum before its last term t: r(x) = (I - A) t
        residual = torch.linalg.solve(torch.eye(len(b), dtype=f64) - A, residual)
    r_rows = residual.view(rows, -1).norm(dim=1)
    b_rows = b.view(rows, -1).norm(dim=1)
    assert record.sample_iterations == (record.iterations,) * rows
    assert record.sample_residuals == pytest.approx((r_rows / b_rows).tolist(), rel=1e-6)
    total = math.sqrt(
        sum((ratio * float(s)) ** 2 for ratio, s in zip(record.sample_residuals, b_rows))
    )
    assert total == pytest.approx(record.residual, rel=1e-6)
    if record.tol is None:
        assert record.sample_converged == ()
        return
    for meets, r, s in zip(record.sample_converged, r_rows.tolist(), b_rows.tolist()):
        if abs(r - 1e-3 * s) > 1e-6 * s:  # clear of the boundary, where rounding decides
            assert meets == (r <= 1e-3 * s)


def test_one_vector_has_no_row_fields():
    A, b = _fixed_contractive()
    for solver in (GMRES(), CG(), Direct()):
        _, record = solver.solve(A @ A.T if isinstance(solver, CG) else A, b)
        assert record.sample_iterations == record.sample_residuals == ()
        assert record.sample_converged == ()
