"""Nothing silent: each case here was silently wrong, silently zero or failed deep inside torch
on an earlier main (the trust issues); each now gives the right answer or a clear error."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from registry import backward_solvers, by_name

from implicit_layers import (
    CG,
    GMRES,
    LBFGS,
    Anderson,
    Broyden,
    ConvergenceWarning,
    Direct,
    FixedPoint,
    MatrixOperator,
    Neumann,
    Newton,
    NormalCG,
    Nystrom,
    argmin_layer,
    fixed_point_layer,
)
from implicit_layers.nn import DEQ
from implicit_layers.testing._problems import quadratic_problem, tanh_problem

f32, f64 = torch.float32, torch.float64
WARM_BACKWARDS = ("GMRES", "BiCGSTAB", "Neumann", "NormalCG", "CG")


def gradient(layer, problem, scale: float = 1.0):
    w0, *params = problem.inputs
    targets = [p for p in params if p.requires_grad]
    w = layer(w0, *params)
    return torch.autograd.grad(
        scale * (w * torch.linspace(-1, 1, w.numel(), dtype=w.dtype)).sum(), targets
    )


# --- warm start ----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    dim=st.integers(1, 6),
    dtype=st.sampled_from([f32, f64]),
    backward=st.sampled_from(
        ["GMRES", "BiCGSTAB", "Neumann", "FixedPoint (adjoint)", "Anderson (adjoint)"]
    ),
    scales=st.lists(st.sampled_from([1e-30, 1e-8, 1e-4, 1.0, 1e4]), min_size=2, max_size=4),
)
def test_a_warm_start_across_changes_of_scale_gives_the_cold_gradient(
    seed, dim, dtype, backward, scales
):
    """A warm start from a backward of another scale (AMP's loss scaling, a shrinking
    gradient) was taken as it was: float32 gradients 5.7e-4 off, or exactly 0.0, recorded as
    converged. Each warm gradient must be the cold one, to the solve's accuracy."""
    problem = tanh_problem(seed, dim, 2, 0.9, dtype)
    tol = 1e-6 if dtype is f32 else 1e-12
    make = by_name_backward(backward)
    warm = fixed_point_layer(
        problem.phi, solver=Anderson(tol=tol, max_iter=500), backward=make(tol), warm_start=True
    )
    cold = fixed_point_layer(
        problem.phi, solver=Anderson(tol=tol, max_iter=500), backward=make(tol)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for scale in scales:
            got = gradient(warm, problem, scale)
            expected = gradient(cold, problem, scale)
            for g, e in zip(got, expected):
                error = float(torch.linalg.vector_norm((g - e).double()))
                size = float(torch.linalg.vector_norm(e.double()))
                assert error <= 1e3 * tol * problem.condition * size + 1e-30 * scale, (scale, g, e)


def by_name_backward(name: str):
    from registry import ADJOINT, LINEAR

    entry = by_name(LINEAR + ADJOINT)[name]
    return lambda tol: entry.make(tol, 500)


def test_the_extreme_case_a_one_dimensional_state_and_a_loss_scaled_by_1e30():
    problem = tanh_problem(seed=122422389, dim=1, input_dim=1, contraction=0.9, dtype=f32)
    layer = fixed_point_layer(problem.phi, warm_start=True)
    w0, W, U, x = problem.inputs
    (first,) = torch.autograd.grad(layer(w0, W, U, x).sum(), x)
    (second,) = torch.autograd.grad(1e-30 * layer(w0, W, U, x).sum(), x)
    torch.testing.assert_close(second / 1e-30, first)  # was 0.0, recorded as converged
    assert float(first) != 0.0


def test_an_argmin_warm_start_after_a_1e4_smaller_gradient():
    problem = quadratic_problem(seed=3, dim=6, condition=50.0, dtype=f32)
    kwargs = dict(solver=LBFGS(tol=1e-7, max_iter=500), backward=CG())
    warm = argmin_layer(problem.f, warm_start=True, **kwargs)
    cold = argmin_layer(problem.f, **kwargs)
    for scale in (1.0, 1e-4, 1e2):
        for g, e in zip(gradient(warm, problem, scale), gradient(cold, problem, scale)):
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-7 * scale)


@pytest.mark.parametrize("backward", WARM_BACKWARDS)
def test_an_overflowed_backward_does_not_poison_the_next_ones(backward):
    """One non-finite backward is normal under AMP's GradScaler; the warm start kept it, and
    every later backward was NaN."""
    generator = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=generator, dtype=f64)
    H = M @ M.T / 6 + torch.eye(6, dtype=f64)
    step = 1 / float(torch.linalg.eigvalsh(H).max())
    layer = fixed_point_layer(  # a gradient step, so CG applies too
        lambda w, c: w - step * (H @ w + 0.1 * torch.tanh(w) - c),
        backward=by_name_backward(backward)(1e-12),
        warm_start=True,
        on_failure="ignore",
    )
    c = torch.randn(6, generator=generator, dtype=f64, requires_grad=True)
    w0 = torch.zeros(6, dtype=f64)
    (clean,) = torch.autograd.grad(layer(w0, c).sum(), c)
    infinite = torch.tensor([math.inf] + [1.0] * 5, dtype=f64)
    (bad,) = torch.autograd.grad((layer(w0, c) * infinite).sum(), c)
    assert not torch.isfinite(bad).all()
    (after,) = torch.autograd.grad(layer(w0, c).sum(), c)
    torch.testing.assert_close(after, clean, rtol=1e-9, atol=1e-12)


# --- failures are never finite made-up answers ---------------------------------------------


@pytest.mark.parametrize(
    "entry", backward_solvers("spd contraction"), ids=lambda entry: entry.name
)
def test_a_nan_in_the_jacobian_gives_a_nan_gradient_and_a_warning(entry):
    """``sqrt(w^2)`` has a NaN derivative at its fixed point 0: GMRES returned a zero gradient."""
    backward = entry.make(1e-6, 2)
    layer = fixed_point_layer(lambda w, c: 0.5 * torch.sqrt(w * w) + c, backward=backward)
    c = torch.zeros(2, requires_grad=True)
    w = layer(torch.zeros(2), c)
    with pytest.warns(ConvergenceWarning, match="NaN"):
        (grad,) = torch.autograd.grad(w.sum(), c)
    assert torch.isnan(grad).all()


def test_a_phi_that_works_in_place_is_refused_and_leaves_w0_alone():
    layer = fixed_point_layer(lambda w, c: w.mul_(0.5).add_(c))
    w0 = torch.zeros(2)
    with torch.no_grad(), pytest.raises(ValueError, match="changed its input w in place"):
        layer(w0, torch.ones(2))
    assert torch.equal(w0, torch.zeros(2))  # was overwritten, and [1, 1] returned as converged


def test_a_callable_solver_that_returns_a_param_hands_back_no_alias():
    c = torch.ones(2)
    w = fixed_point_layer(lambda w, c: 0 * w + c, solver=lambda f, w0: c)(torch.zeros(2), c)
    w.add_(100)
    assert torch.equal(c, torch.ones(2))


def test_normal_cg_needs_no_forward_mode_rule_in_phi():
    """NormalCG took its transposed products by forward-mode AD: an autograd.Function without
    a jvp made torch raise a bare NotImplementedError from inside loss.backward()."""

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    A = torch.tensor([[0.3, 0.1], [0.0, 0.2]], dtype=f64)
    c = torch.tensor([0.5, -0.2], dtype=f64, requires_grad=True)
    grads = []
    for backward in (NormalCG(tol=1e-12, max_iter=50), GMRES(tol=1e-12)):
        layer = fixed_point_layer(lambda w, c: A @ Square.apply(w) + c, backward=backward)
        grads.append(torch.autograd.grad(layer(torch.zeros(2, dtype=f64), c).sum(), c)[0])
    torch.testing.assert_close(grads[0], grads[1])


# --- records --------------------------------------------------------------------------------


def test_records_and_infos_serialise_to_json():
    layer = fixed_point_layer(lambda w, c: 0.5 * w + c)
    c = torch.ones(2, requires_grad=True)
    w, info = layer.solve(torch.zeros(2), c)
    w.sum().backward()
    text = json.dumps(info.to_dict())
    loaded = json.loads(text)
    assert loaded["forward"]["status"] == "CONVERGED"
    assert loaded["backward"]["method"] == "GMRES" and loaded["adjoint"] is None
    assert isinstance(loaded["forward"]["history"], list)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["tol", "atol"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -1.0])
@pytest.mark.parametrize("solver", [GMRES, CG, Neumann, FixedPoint, Anderson, LBFGS, Direct])
def test_a_tolerance_must_be_finite_and_non_negative(solver, option, value):
    with pytest.raises(ValueError, match=f"`{option}` must be a non-negative number, finite"):
        solver(**{option: value})


def test_a_singular_nystrom_core_is_a_clear_error():
    operator = MatrixOperator(torch.zeros(3, 3))
    with pytest.raises(torch.linalg.LinAlgError, match="Nystrom: its 2 x 2 core matrix"):
        Nystrom(rank=2, rho=0.0 + 1e-300).solve(operator, torch.ones(3))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: fixed_point_layer(lambda w: w)(torch.zeros(0)), ValueError, "`w0` has no entries"),
        (
            lambda: fixed_point_layer(lambda w: w)(torch.zeros(2, device="meta")),
            ValueError,
            "`w0` is on the meta device",
        ),
        (
            lambda: DEQ(lambda z, x: 0.5 * z + x)(torch.zeros(2, 3, dtype=torch.int64)),
            TypeError,
            "`x` holds a tensor of dtype torch.int64",
        ),
    ],
    ids=["empty w0", "meta w0", "integer DEQ input"],
)
def test_bad_inputs_name_what_the_user_passed(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_a_phi_that_detaches_its_output_is_named_in_the_backward():
    layer = fixed_point_layer(lambda w, c: (0.5 * w + c).detach())
    c = torch.ones(2, requires_grad=True)
    w = layer(torch.zeros(2), c)
    with pytest.raises(ValueError, match="no graph to w or to the params"):
        w.sum().backward()


# --- warnings: once per layer and cause, at the user's line ---------------------------------


def test_a_layer_failing_every_step_warns_once_at_the_callers_line_and_counts():
    layer = fixed_point_layer(lambda w, c: 0.99 * w + c, solver=FixedPoint(max_iter=5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own rule: once per message and line
        for _ in range(4):
            c = torch.ones(2, requires_grad=True)
            layer(torch.zeros(2), c).sum().backward()  # the messages differ from step to step
    assert len(caught) == 1 and caught[0].filename == __file__
    assert "counted in `layer.failures`" in str(caught[0].message)
    assert layer.failures[("forward", "MAX_ITER")] == 4


def test_a_failing_backward_warns_at_the_backward_call():
    A = torch.tensor([[0.5, 0.3, 0.0], [0.0, 0.4, 0.2], [0.1, 0.0, 0.3]])
    layer = fixed_point_layer(lambda w, c: A @ w + c, backward=GMRES(max_iter=1, tol=1e-6))
    c = torch.ones(3, requires_grad=True)
    w = layer(torch.zeros(3), c)
    with pytest.warns(ConvergenceWarning) as caught:
        (w * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert caught[0].filename == __file__
    assert layer.failures == {("backward", "MAX_ITER"): 1}


# --- HyperTorch's maps, verbatim ------------------------------------------------------------


def hypertorch_ridge():
    X = torch.linspace(-1, 1, 60, dtype=f64).reshape(20, 3).sin()
    y = torch.linspace(0, 1, 20, dtype=f64)

    def f(w, lam):
        return ((X @ w - y) ** 2).mean() + lam.exp() * (w * w).sum()

    def Phi(w, lam):  # a gradient step written as HyperTorch users write it
        return w - 0.1 * torch.autograd.grad(f(w, lam), w, create_graph=True)[0]

    return X, Phi


def test_a_map_that_takes_gradients_inside_works_in_the_forward_and_the_backward():
    """It failed with torch's bare `element 0 of tensors does not require grad`."""
    X, Phi = hypertorch_ridge()
    lam = torch.tensor(0.1, dtype=f64, requires_grad=True)
    layer = fixed_point_layer(
        Phi, solver=FixedPoint(tol=1e-12, max_iter=5000), backward=GMRES(tol=1e-12)
    )
    w = layer(torch.zeros(3, dtype=f64), lam)
    w.sum().backward()
    H = 2 * X.T @ X / 20 + 2 * lam.detach().exp() * torch.eye(3, dtype=f64)
    w_star = torch.linalg.solve(H, 2 * X.T @ torch.linspace(0, 1, 20, dtype=f64) / 20)
    torch.testing.assert_close(w.detach(), w_star)
    expected = -(2 * lam.detach().exp() * w_star) @ torch.linalg.solve(H, torch.ones(3, dtype=f64))
    torch.testing.assert_close(lam.grad, expected)


def test_a_map_that_takes_gradients_inside_is_named_under_torch_func():
    _, Phi = hypertorch_ridge()
    layer = fixed_point_layer(Phi, solver=FixedPoint(tol=1e-10, max_iter=5000))
    lam = torch.tensor(0.1, dtype=f64)
    with pytest.raises(RuntimeError, match="takes gradients inside with torch.autograd.grad"):
        torch.func.jacrev(lambda lam: layer(torch.zeros(3, dtype=f64), lam))(lam)


# --- a solution at zero ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [f32, f64])
@pytest.mark.parametrize(
    "solver", [FixedPoint, Anderson, Broyden, Newton], ids=lambda s: s.__name__
)
def test_a_fixed_point_at_zero_stops_once_the_residual_has_fallen_by_the_dtypes_precision(
    solver, dtype
):
    """``tol * ||w||`` vanishes at ``w* = 0``: FixedPoint warned MAX_ITER with w at 8e-31."""
    layer = fixed_point_layer(lambda w: 0.5 * w, solver=solver(), on_failure="raise")
    w = layer(torch.ones(4, dtype=dtype))
    record = layer.last_forward
    assert record.converged and record.iterations < 100
    assert float(w.abs().max()) <= 4 * torch.finfo(dtype).eps
    # tol = 0 asks for the whole budget: no floor
    budget = fixed_point_layer(lambda w: 0.5 * w, solver=FixedPoint(tol=0.0, max_iter=60))
    with pytest.warns(ConvergenceWarning, match="budget ran out"):
        budget(torch.ones(4, dtype=dtype))
    assert budget.last_forward.iterations == 60


# --- a minimizer's record states the residual it reached -------------------------------------


def newton_minimum(f, w, args, steps: int = 30):
    for _ in range(steps):
        w = w - torch.linalg.solve(torch.func.hessian(f)(w, *args), torch.func.grad(f)(w, *args))
    return w


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dim=st.integers(2, 10), condition=st.floats(2.0, 1e3))
def test_lbfgs_never_records_more_accuracy_than_it_reached(seed, dim, condition):
    """LBFGS(tol=1e-11) recorded 'relative residual 0.000e+00, converged' with w 1.2e-8 from
    the Newton solution: a stall within the loss's rounding was reported as a zero step."""
    from implicit_layers.testing._problems import logistic_problem

    problem = logistic_problem(seed, dim, condition, f64)
    w0, lam, *data = problem.inputs
    layer = argmin_layer(problem.f, solver=LBFGS(tol=1e-11, max_iter=1000), on_failure="ignore")
    w = layer(w0, lam.detach(), *data).detach()
    exact = newton_minimum(problem.f, w.clone(), (lam.detach(), *data))
    distance = float((w - exact).norm() / exact.norm())
    record = layer.last_forward
    claimed = max(record.relative_residual, record.tol)
    assert distance <= 10 * problem.condition * claimed + 1e-14, (distance, record.summary())


def test_argmin_defaults_converge_on_easy_least_squares():
    """The old default, GradientDescent(lr=0.1), diverged to 1e60 on a 30 x 8 least-squares
    problem and warned on a 20 x 5 ridge one."""
    generator = torch.Generator().manual_seed(0)
    for n, d, decay in ((30, 8, 0.0), (20, 5, 0.1)):
        X = 3 * torch.randn(n, d, generator=generator, dtype=f64)
        y = torch.randn(n, generator=generator, dtype=f64)
        lam = torch.tensor(decay, dtype=f64, requires_grad=True)
        layer = argmin_layer(
            lambda w, lam, X=X, y=y: ((X @ w - y) ** 2).sum() / 2 + lam * (w * w).sum()
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            w = layer(torch.zeros(d, dtype=f64), lam)
        exact = torch.linalg.solve(X.T @ X + 2 * decay * torch.eye(d, dtype=f64), X.T @ y)
        torch.testing.assert_close(w.detach(), exact, rtol=1e-5, atol=1e-8)
