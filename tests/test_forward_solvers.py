"""The forward solvers' final step, and the loop that judges rows: the point returned against
the point judged and the record, and the per-row judging against a plain statement of the
stopping rule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from implicit_layers import Anderson, Broyden, FixedPoint, Status
from implicit_layers._iteration import IterationState, iterate
from implicit_layers._records import relative

f64 = torch.float64
SOLVERS = {"FixedPoint": FixedPoint, "Anderson": Anderson, "Broyden": Broyden}


def tanh_rows(rows: int, n: int, rho: float, seed: int):
    """``f(z)_i = tanh(W_i z_i + c_i)`` with ``||W_i||_2 = rho``: each row contracts by ``rho``;
    the rows' offsets ``c_i`` span four orders of magnitude, so they converge at different
    steps."""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, n, n, generator=generator, dtype=f64)
    W = rho * W / torch.linalg.matrix_norm(W, 2)[:, None, None]
    c = torch.randn(rows, n, generator=generator, dtype=f64)
    c = c * torch.logspace(-2, 2, rows, dtype=f64)[:, None]

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh((W @ z.unsqueeze(2)).squeeze(2) + c)

    return f, c


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(rows, dim=1)


@pytest.mark.parametrize(
    "name, damping", [(name, 1.0) for name in SOLVERS] + [("FixedPoint", 0.5), ("Anderson", 0.5)]
)
def test_the_final_step_is_one_step_from_the_point_judged(name, damping):
    """The same iteration with and without the final step: the point returned is
    ``w + damping (f(w) - w)`` for the ``w`` judged, whose residual the record holds; on a
    contraction by ``rho`` that point's own residual is at most ``1 - damping (1 - rho)``
    times it."""
    rho = 0.8
    f, c = tanh_rows(rows=6, n=5, rho=rho, seed=0)
    options = dict(tol=1e-8) | ({} if damping == 1.0 else dict(damping=damping))
    z, record = SOLVERS[name](**options).solve(f, 0.1 * c)
    w, plain = SOLVERS[name](final_step=False, **options).solve(f, 0.1 * c)
    assert record == plain and record.converged
    g = f(w) - w
    torch.testing.assert_close(z, w + damping * g, rtol=1e-14, atol=1e-15)
    judged = row_norms(g) / row_norms(w)
    assert record.sample_residuals == pytest.approx(judged.tolist(), rel=1e-12, abs=0)
    factor = 1 - damping * (1 - rho)
    assert bool((row_norms(f(z) - z) <= factor * row_norms(g) * (1 + 1e-9) + 1e-15).all())
    # ... and it is closer to the fixed point than w by that factor
    z_star, _ = SOLVERS[name](tol=1e-14, max_iter=500).solve(f, 0.1 * c)
    closer = row_norms(z - z_star) <= factor * row_norms(w - z_star) * (1 + 1e-6) + 1e-15
    assert bool(closer.all())


@pytest.mark.parametrize("name", SOLVERS)
def test_each_row_takes_the_iterations_it_takes_alone(name):
    """``refine=False``: a row stops where it converges, as it would alone. ``refine=True``: it
    converges at the same step, then keeps the smallest residual of the steps it takes while
    the other rows run; the record holds the residual of the point returned."""
    f, c = tanh_rows(rows=5, n=4, rho=0.9, seed=1)
    z, record = SOLVERS[name](tol=1e-10, refine=False).solve(f, 0 * c)
    refined, refined_record = SOLVERS[name](tol=1e-10, final_step=False).solve(f, 0 * c)
    assert record.converged and len(set(record.sample_iterations)) > 1
    assert refined_record.sample_iterations == record.sample_iterations
    own = row_norms(f(refined) - refined) / row_norms(refined)
    assert refined_record.sample_residuals == pytest.approx(own.tolist(), rel=1e-9, abs=1e-15)
    last = max(record.sample_iterations)
    gains = zip(refined_record.sample_residuals, record.sample_residuals)
    assert any(refined < frozen for refined, frozen in gains)
    for row in range(5):

        def alone(rows: torch.Tensor, row: int = row) -> torch.Tensor:
            padded = torch.zeros_like(c)
            padded[row] = rows[0]
            return f(padded)[row : row + 1]

        z_row, record_row = SOLVERS[name](tol=1e-10).solve(alone, 0 * c[row : row + 1])
        assert record_row.iterations == record.sample_iterations[row]
        assert record_row.sample_residuals[0] == pytest.approx(record.sample_residuals[row])
        torch.testing.assert_close(z_row[0], z[row], rtol=1e-13, atol=1e-14)
        # the same row refined: as many steps as the slowest row, its residual at most alone's
        _, longer = SOLVERS[name](tol=0.0, max_iter=last, final_step=False).solve(
            alone, 0 * c[row : row + 1]
        )
        assert refined_record.sample_residuals[row] <= record.sample_residuals[row]
        if name == "FixedPoint":  # its residual falls monotonically: refined, it is the last
            assert refined_record.sample_residuals[row] == pytest.approx(
                longer.sample_residuals[0], rel=1e-9
            )


@pytest.mark.parametrize("option", ["final_step", "refine"])
def test_switches_must_be_bools(option):
    with pytest.raises(TypeError, match=f"`{option}` must be True or False"):
        Anderson(**{option: 1})


# ---------------------------------------------------------------------------------------------
# The judging of rows against the rule written out row by row, iteration by iteration


class Scripted(IterationState):
    """Steps that return scripted residuals and scales (one row of ``R``, ``S`` a step), and
    remember which rows were frozen and settled when."""

    def __init__(self, R: torch.Tensor, S: torch.Tensor, returns_best: bool, refines: bool):
        self.R, self.S, self.returns_best, self.refines = R, S, returns_best, refines
        self.steps, self.frozen, self.settled = 0, [], []

    def step(self):
        self.steps += 1
        return self.R[self.steps - 1].clone(), self.S[self.steps - 1].clone()

    def freeze(self, rows):
        self.frozen.append((self.steps, rows.nonzero()[:, 0].tolist()))

    def settle(self, rows):
        if not self.refines:
            return super().settle(rows)
        self.settled.append((self.steps, rows.nonzero()[:, 0].tolist()))

    def result(self):
        return torch.zeros(1)


def judged_row_by_row(R, S, tol, atol, returns_best, refines, max_iter):
    """The stopping rule and the record's per-row fields, in plain Python."""
    R, S = R.tolist(), S.tolist()
    rows = len(R[0])
    statuses, final, counts = [None] * rows, [(math.inf, 1.0)] * rows, [0] * rows
    frozen, settled, iterations = [], [], 0
    while None in statuses and iterations < max_iter:
        iterations += 1
        converged, failed = [], []
        for row in range(rows):
            r, s = R[iterations - 1][row], S[iterations - 1][row]
            if statuses[row] is not None:
                # a converged row the state refines returns its smallest residual from then on
                if statuses[row] is Status.CONVERGED and refines and r < final[row][0]:
                    final[row] = (r, s)
                continue
            counts[row] = iterations
            if not (math.isfinite(r) and math.isfinite(s)):
                statuses[row] = Status.NONFINITE
                failed.append(row)
            elif r == 0 or r <= atol + tol * s:
                statuses[row] = Status.CONVERGED
                converged.append(row)
            if statuses[row] is not None or not returns_best or r < final[row][0]:
                final[row] = (r, s)
        if converged:
            (settled if refines else frozen).append((iterations, converged))
        if failed:
            frozen.append((iterations, failed))
    # each iteration: the worst row's relative residual, a stopped row's the one it returns
    history = []
    for step in range(iterations):
        entries = [
            relative(R[step][row], S[step][row]) if step < counts[row] else relative(*final[row])
            for row in range(rows)
        ]
        history.append(max(entries, key=lambda v: math.inf if math.isnan(v) else v))
    return dict(
        iterations=iterations,
        history=history,
        sample_iterations=counts,
        sample_residuals=[relative(*pair) for pair in final],
        sample_converged=[s is Status.CONVERGED for s in statuses],
        frozen=frozen,
        settled=settled,
    )


VALUES = [0.0, 1e-9, 3e-7, 1e-6, 2e-6, 0.1, 0.5, 0.5, 1.0, 2.0, math.nan, math.inf]
SCALES = [1.0, 1.0, 1.0, 2.0, 0.5, 0.0, math.inf, math.nan]


@st.composite
def scripts(draw):
    steps, rows = draw(st.integers(1, 8)), draw(st.integers(1, 5))
    R = draw(st.lists(st.sampled_from(VALUES), min_size=steps * rows, max_size=steps * rows))
    S = draw(st.lists(st.sampled_from(SCALES), min_size=steps * rows, max_size=steps * rows))
    shape = (steps, rows)
    return torch.tensor(R, dtype=f64).view(shape), torch.tensor(S, dtype=f64).view(shape)


def same(a: list[float], b: list[float]) -> bool:
    """Equal entry by entry, NaN equal to NaN."""
    return len(a) == len(b) and all(x == y or math.isnan(x) and math.isnan(y) for x, y in zip(a, b))


# a row converged at step 2 refines from there: step 1's smaller residual (of scale 0, not
# converged) must not be returned
REFINED_NOT_FROM_THE_START = (
    torch.tensor([[3e-7, 0.5], [1e-6, 0.5], [0.5, 1e-9]], dtype=f64),
    torch.tensor([[0.0, 1.0], [2.0, 1.0], [1.0, 1.0]], dtype=f64),
)


@settings(max_examples=300, deadline=None)
@example(REFINED_NOT_FROM_THE_START, True, True, (1e-6, 0.0))
@given(
    scripts(),
    st.booleans(),
    st.booleans(),
    st.sampled_from([(1e-6, 0.0), (0.0, 1e-6), (0.0, 0.0)]),
)
def test_rows_are_judged_as_the_rule_says_row_by_row(script, returns_best, refines, tolerances):
    R, S = script
    tol, atol = tolerances
    state = Scripted(R, S, returns_best, refines)
    _, record = iterate(
        state, method="m", max_iter=len(R), tol=tol, atol=atol, products=lambda: state.steps
    )
    expected = judged_row_by_row(R, S, tol, atol, returns_best, refines, len(R))
    assert record.iterations == expected["iterations"] == state.steps
    assert same(list(record.history), expected["history"])
    assert list(record.sample_iterations) == expected["sample_iterations"]
    assert same(list(record.sample_residuals), expected["sample_residuals"])
    assert list(record.sample_converged) == expected["sample_converged"]
    assert state.frozen == expected["frozen"]
    assert state.settled == expected["settled"]


def test_broyden_stays_finite_at_a_noise_floor():
    """Stagnating at a noise floor (a tiny, fast oscillating term here, as rounding is in
    float32), Broyden's secant pairs are noise. When a full memory overwrote its oldest term,
    the rows overflowed and the solve ended in NaN; restarting a full memory runs out of
    iterations at the best point instead, finite, whatever the memory."""
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(8, 16, 16, generator=generator, dtype=f64)
    W = 0.9 * W / torch.linalg.matrix_norm(W, 2)[:, None, None]
    c = torch.randn(8, 16, generator=generator, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh((W @ z.unsqueeze(2)).squeeze(2) + c) + 1e-9 * torch.sin(1e9 * z)

    z0 = torch.zeros(8, 16, dtype=f64)
    for memory in (None, 20, 7):
        z, record = Broyden(tol=0.0, max_iter=300, memory=memory).solve(f, z0)
        assert record.status is Status.MAX_ITER and bool(torch.isfinite(z).all())
        assert record.relative_residual < 1e-12


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 12), rho=st.floats(0.1, 0.99))
def test_broyden_solves_a_linear_map_in_at_most_2n_steps(seed, n, rho):
    """Gay (1979): good Broyden terminates on a linear system in at most 2n steps. Rounding
    may cost a step or two at the tightest tolerance float64 allows."""
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=generator, dtype=f64)
    A = rho * A / torch.linalg.eigvals(A).abs().max()  # spectral radius rho, any norm
    c = torch.randn(n, generator=generator, dtype=f64)
    exact = torch.linalg.solve(torch.eye(n, dtype=f64) - A, c)
    w, record = Broyden(tol=1e-10, max_iter=2 * n + 3).solve(lambda w: A @ w + c, 0 * c)
    assert record.converged, record.summary()
    assert torch.allclose(w, exact, rtol=1e-7, atol=1e-7 * float(exact.norm()))


@pytest.mark.parametrize("memory", [None, 20])
def test_broyden_converges_on_a_large_linear_contraction(memory):
    """Issue 15 item 6: Broyden(memory=20) overwrote its oldest term and stalled at a 3e-2
    error after 300 steps on n = 256, spectral radius 0.95, where plain iteration needs ~330."""
    generator = torch.Generator().manual_seed(0)
    n = 256
    A = torch.randn(n, n, generator=generator, dtype=f64)
    A = 0.95 * A / torch.linalg.eigvals(A).abs().max()
    c = torch.randn(n, generator=generator, dtype=f64)
    exact = torch.linalg.solve(torch.eye(n, dtype=f64) - A, c)
    w, record = Broyden(tol=1e-8, max_iter=300, memory=memory).solve(lambda w: A @ w + c, 0 * c)
    assert record.converged, record.summary()
    assert float((w - exact).norm() / exact.norm()) < 1e-6


@pytest.mark.parametrize("memory", [0, -1, 2.5, True])
def test_broyden_memory_must_be_a_positive_integer(memory):
    with pytest.raises(ValueError, match="memory.*positive integer"):
        Broyden(memory=memory)
