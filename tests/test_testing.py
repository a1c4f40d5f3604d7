"""``implicit_layers.testing``: the strategies keep their promises, and ``check_gradients``
passes on correct layers and fails, naming the directions, on wrong gradients.

A checker that cannot fail is a defect, so half of these tests feed it deliberately wrong
gradients: the backward solve dropped (``x = b``, through the library's own backward hook and
through an independent ``autograd.Function``), the untransposed system solved, and a gradient
scaled by 1.01 (the whole gradient, or the gradient of one weight of a DEQ cell).
"""

from __future__ import annotations

import copy
import importlib
import re
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from implicit_layers import (
    CG,
    GMRES,
    LBFGS,
    Anderson,
    BiCGSTAB,
    Direct,
    FixedPoint,
    GradientDescent,
    argmin_layer,
    fixed_point_layer,
)
from implicit_layers.testing import (
    ArgminProblem,
    DEQProblem,
    FixedPointProblem,
    GradientCheck,
    GradientCheckError,
    affine_maps,
    check_gradients,
    deq_cells,
    logistic_problems,
    quadratic_problems,
    tanh_maps,
)
from implicit_layers.testing._problems import affine_problem, deq_problem

f32, f64 = torch.float32, torch.float64
TIGHT = 1e-11  # solver tol: the check runs in float64, whatever the problem's dtype
FIXED_POINT_MAPS = st.one_of(affine_maps(), tanh_maps())
ARGMIN_PROBLEMS = st.one_of(quadratic_problems(dims=(2, 4)), logistic_problems(dims=(2, 4)))


def examples(count: int) -> settings:
    return settings(max_examples=count, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fixed_point(problem, backward=None, **options) -> torch.nn.Module:
    phi = problem.cell if isinstance(problem, DEQProblem) else problem.phi
    backward = backward or GMRES(tol=TIGHT, max_iter=200)
    solver = options.pop("solver", Anderson(tol=TIGHT, max_iter=500))
    return fixed_point_layer(phi, solver=solver, backward=backward, on_failure="raise", **options)


def argmin(problem: ArgminProblem, backward=None, solver=None) -> torch.nn.Module:
    return argmin_layer(
        problem.f,
        solver=solver or LBFGS(tol=TIGHT, max_iter=200),
        backward=backward or CG(tol=TIGHT, max_iter=200),
        on_failure="raise",
    )


def spectral_norm_by_power_iteration(J: torch.Tensor, steps: int = 100) -> float:
    """``||J||_2`` as the square root of the top eigenvalue of ``J^T J``, by power iteration."""
    x = torch.ones(J.shape[1], dtype=f64) / J.shape[1] ** 0.5
    for _ in range(steps):
        y = J.T @ (J @ x)
        norm = torch.linalg.vector_norm(y)
        if norm == 0:
            return 0.0
        x = y / norm
    return float(torch.linalg.vector_norm(J @ x))


# ---------------------------------------------------------------------------------------------
# The strategies keep their promises


@examples(15)
@given(FIXED_POINT_MAPS)
def test_fixed_point_maps_contract_as_promised(problem: FixedPointProblem):
    assert problem.kind in ("affine", "tanh")
    assert 2 <= problem.dim <= 6 and problem.dtype in (f32, f64)
    assert 0 < problem.contraction < 1
    assert problem.condition == pytest.approx((1 + problem.contraction) / (1 - problem.contraction))
    w0, *params = problem.inputs
    assert w0.shape == (problem.dim,) and not w0.requires_grad
    assert all(p.dtype == problem.dtype for p in problem.inputs)
    assert [p.requires_grad for p in params] == (
        [True, True] if problem.kind == "affine" else [True, False, True]
    )
    detached = [p.detach().to(f64) for p in params]
    generator = torch.Generator().manual_seed(problem.seed)
    points = [3 * torch.randn(problem.dim, generator=generator, dtype=f64) for _ in range(3)]
    for w in points + [torch.zeros(problem.dim, dtype=f64)]:
        J = torch.autograd.functional.jacobian(lambda w: problem.phi(w, *detached), w)
        exact = float(torch.linalg.matrix_norm(J, 2))
        # power iteration approaches ||J||_2 from below; the dense norm is exact
        assert spectral_norm_by_power_iteration(J) <= exact * (1 + 1e-9)
        assert exact <= problem.contraction * (1 + 1e-9)
        if problem.kind == "affine":  # J = A: the bound is attained
            assert exact == pytest.approx(problem.contraction, rel=1e-9)


@examples(10)
@given(deq_cells())
def test_deq_cells_contract_as_promised(problem: DEQProblem):
    z0, x = problem.inputs
    assert z0.shape == (problem.batch, problem.dim) and x.shape[0] == problem.batch
    assert x.requires_grad and not z0.requires_grad
    assert all(p.requires_grad and p.dtype == problem.dtype for p in problem.cell.parameters())
    assert problem.contraction == pytest.approx(
        float(torch.linalg.matrix_norm(problem.cell.W.detach().to(f64), 2)), rel=1e-12
    )
    assert problem.contraction < 1
    cell = copy.deepcopy(problem.cell).to(f64)
    xs = x.detach().to(f64)
    generator = torch.Generator().manual_seed(problem.seed)
    z = torch.randn(problem.batch, problem.dim, generator=generator, dtype=f64)
    J = torch.autograd.functional.jacobian(lambda z: cell(z, xs), z)
    J = J.reshape(z.numel(), z.numel())  # block diagonal over the batch
    assert spectral_norm_by_power_iteration(J) <= problem.contraction * (1 + 1e-6) + 1e-12


@examples(15)
@given(ARGMIN_PROBLEMS)
def test_argmin_problems_have_the_promised_conditioning(problem: ArgminProblem):
    w0, lam, *data = problem.inputs
    assert lam.requires_grad and lam.shape == (problem.dim,)
    assert 1 - 1e-6 <= problem.strong_convexity <= problem.smoothness
    assert problem.condition == pytest.approx(problem.smoothness / problem.strong_convexity)
    assert problem.condition <= 50 * (1 + 1e-6)
    args = [t.detach().to(f64) for t in (lam, *data)]
    generator = torch.Generator().manual_seed(problem.seed)
    for _ in range(3):
        w = torch.randn(problem.dim, generator=generator, dtype=f64)
        H = torch.autograd.functional.hessian(lambda w: problem.f(w, *args), w)
        eigenvalues = torch.linalg.eigvalsh(H)
        assert float(eigenvalues[0]) >= problem.strong_convexity * (1 - 1e-9)
        assert float(eigenvalues[-1]) <= problem.smoothness * (1 + 1e-9)
        if problem.kind == "quadratic":  # the Hessian is constant: its condition is exact
            assert float(eigenvalues[-1] / eigenvalues[0]) == pytest.approx(problem.condition)


def test_strategies_reject_ranges_they_cannot_honour():
    with pytest.raises(ValueError, match="contraction"):
        affine_maps(contraction=(0.5, 1.0))
    with pytest.raises(ValueError, match="condition"):
        quadratic_problems(condition=(1.0, 3.0))
    with pytest.raises(ValueError, match="dtypes"):
        deq_cells(dtypes=[torch.float16])
    with pytest.raises(ValueError, match="dims"):
        tanh_maps(dims=(0, 3))


# ---------------------------------------------------------------------------------------------
# The checker passes on correct layers


@examples(10)
@given(FIXED_POINT_MAPS, st.sampled_from(["GMRES", "BiCGSTAB", "Direct"]))
def test_check_passes_on_fixed_point_layers(problem: FixedPointProblem, backward_name: str):
    backward = {
        "GMRES": GMRES(tol=TIGHT, max_iter=200),
        "BiCGSTAB": BiCGSTAB(tol=TIGHT, max_iter=200),
        "Direct": Direct(tol=TIGHT),
    }[backward_name]
    layer = fixed_point(problem, backward)
    result = check_gradients(layer, problem.inputs, condition=problem.condition)
    assert result.passed and result.dtype == f64
    assert result.promotion_failure is None
    assert result.layers == ("FixedPointLayer",)
    assert result.forward[0].converged
    assert result.rtol < 1e-6 and result.resolution < 1e-4  # a sharp check, not a vacuous one


@examples(4)
@given(ARGMIN_PROBLEMS)
def test_check_passes_on_argmin_layers(problem: ArgminProblem):
    result = check_gradients(argmin(problem), problem.inputs, condition=problem.condition)
    # sharp enough to mean it by the checker's own theory (its resolution follows from the
    # records' accuracies: MAX_RESOLUTION); a hand-picked 1e-3 failed on fresh draws
    assert result.passed and result.dtype == f64 and result.conclusive


@examples(5)
@given(quadratic_problems(condition=(2.0, 5.0), dtypes=[f64]))
def test_check_passes_with_gradient_descent_as_the_inner_solver(problem: ArgminProblem):
    solver = GradientDescent(lr=1 / problem.smoothness, tol=1e-10, max_iter=2000)
    layer = argmin(problem, solver=solver)
    assert check_gradients(layer, problem.inputs, condition=problem.condition).passed


@examples(8)
@given(deq_cells())
def test_check_passes_on_deq_cells(problem: DEQProblem):
    layer = fixed_point(problem)
    result = check_gradients(layer, problem.inputs, condition=problem.condition)
    assert result.passed and result.dtype == f64 and result.promoted == (problem.dtype == f32)


def test_check_covers_the_parameters_of_the_cell():
    """With ``x`` not requiring grad, only the cell's W, U, b are checked: a hook that scales
    the gradient of W alone by 1.01 is caught."""
    problem = deq_problem(seed=1, dim=3, input_dim=2, batch=2, contraction=0.7, dtype=f64)
    z0, x = problem.inputs
    x.requires_grad_(False)
    layer = fixed_point(problem)
    result = check_gradients(layer, (z0, x), condition=problem.condition)
    assert result.passed and result.gradient_norm > 0
    problem.cell.W.register_hook(lambda grad: 1.01 * grad)
    with pytest.raises(GradientCheckError):
        check_gradients(layer, (z0, x), condition=problem.condition)


@pytest.mark.parametrize("dtype", [f32, f64], ids=["float32", "float64"])
@pytest.mark.parametrize("how", ["module", "plain function"])
def test_check_leaves_the_callers_tensors_and_modules_untouched(dtype, how):
    """Float64 modules are perturbed in place and restored; float32 ones are deep-copied (a
    module ``fn``) or cast in place and given back their very tensors (a plain function's
    ``layers``). Either way nothing changes, and no ``.grad`` appears."""
    problem = deq_problem(seed=0, dim=3, input_dim=2, batch=2, contraction=0.7, dtype=dtype)
    params = dict(problem.cell.named_parameters())
    before = {name: (p.data, p.detach().clone()) for name, p in params.items()}
    layer = fixed_point(problem)
    if how == "module":
        result = check_gradients(layer, problem.inputs, condition=problem.condition)
    else:

        def model(z0, x):
            return layer(z0, x)

        result = check_gradients(model, problem.inputs, layers=[layer], condition=problem.condition)
    assert result.passed and result.dtype == f64 and result.promoted == (dtype == f32)
    for name, p in problem.cell.named_parameters():
        data, values = before[name]
        assert p is params[name] and p.dtype == dtype, name
        assert p.data.data_ptr() == data.data_ptr() and torch.equal(p.detach(), values), name
        assert p.grad is None, name
    assert problem.inputs[1].grad is None


@examples(8)
@given(FIXED_POINT_MAPS)
def test_check_passes_on_a_plain_function_with_a_pytree_output(problem: FixedPointProblem):
    layer = fixed_point(problem)

    def model(w0, *params):
        w = layer(w0, *params)
        return {"w": w, "energy": (w * w).sum(), "sin": torch.sin(w)}

    result = check_gradients(model, problem.inputs, layers=[layer], condition=problem.condition)
    assert result.passed and result.layers == ("FixedPointLayer",)
    # without `layers=` there are no records: the tolerance assumes tau = 1e-6, and says so. It
    # grows with the outputs' size (the `energy` ||w||^2), so the check may be inconclusive; it
    # never reports a disagreement, and when inconclusive it says to pass `layers=`
    try:
        blind = check_gradients(model, problem.inputs, condition=problem.condition)
    except GradientCheckError as error:  # inconclusive only, and says what to do
        blind = error.result
        assert not blind.conclusive and "Pass the function's layers as `layers=`" in str(error)
    assert not blind.failures and blind.layers == () and blind.forward_tol == 1e-6
    assert blind.rtol > result.rtol and "no layer found" in blind.report()


def test_check_falls_back_to_float32_and_loosens_its_tolerance():
    """A function that closes over float32 tensors cannot run in float64: the check runs in
    float32, with the larger eps and tolerance of that dtype, and says why."""
    problem = affine_problem(seed=0, dim=3, contraction=0.5, dtype=f32)
    w0, A, c = problem.inputs
    A_data = A.detach()
    layer = fixed_point_layer(
        lambda w, c: A_data @ w + c, solver=Anderson(tol=1e-6), backward=GMRES(tol=1e-6)
    )
    result = check_gradients(layer, (w0, c), condition=problem.condition)
    assert result.passed and result.dtype == f32
    assert "float64 was not possible" in result.report()
    assert result.promotion_failure is not None

    exact = fixed_point_layer(
        lambda w, c: A_data.double() @ w + c,
        solver=Anderson(tol=1e-6),
        backward=GMRES(tol=1e-6),
    )
    reference = check_gradients(exact, (w0, c), condition=problem.condition)  # promoted
    assert reference.dtype == f64 and reference.eps < result.eps
    assert reference.atol < result.atol


# ---------------------------------------------------------------------------------------------
# The checker fails on wrong gradients


class NoSolve(torch.autograd.Function):
    """``w*`` from a fixed-point layer's forward; a backward returning ``(dPhi/dp)^T b``, as if
    ``(I - J)^T x = b`` were solved by ``x = b`` (the solve dropped)."""

    @staticmethod
    def forward(ctx, layer, w0, *params):
        w = layer(w0, *params)
        ctx.layer = layer
        ctx.save_for_backward(w, *params)
        return w

    @staticmethod
    def backward(ctx, b):
        w, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(need) for p, need in zip(params, needs)]
            out = ctx.layer.phi(w, *leaves)
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, b))
        return (None, None, *[next(grads) if need else None for need in needs])


class Scaled(torch.autograd.Function):
    """The identity, with a backward that scales the gradient by 1.01."""

    @staticmethod
    def forward(ctx, w):
        return w.clone()

    @staticmethod
    def backward(ctx, grad):
        return 1.01 * grad


def no_solve(matvec, b):
    """A backward "solver" that returns ``b``: the library's hook, used to drop the solve."""
    return b


def untransposed(matvec, b):
    """A backward callable solving ``A^T x = b`` instead of ``A x = b``: for a fixed point, the
    untransposed ``(I - J) x = b``. ``A`` is built densely from its products."""
    columns = [matvec(e) for e in torch.eye(b.numel(), dtype=b.dtype)]
    return torch.linalg.solve(torch.stack(columns, dim=1).T, b)


def assert_fails_naming_directions(fn, inputs, **options) -> GradientCheck:
    with pytest.raises(GradientCheckError) as caught:
        check_gradients(fn, inputs, **options)
    error = caught.value
    assert isinstance(error, AssertionError)
    failures = error.result.failures
    assert failures, "the error must come with failing directions"
    message = str(error)
    which = ", ".join(str(row.index) for row in failures)
    assert f"directions ({which})" in message
    for row in failures:
        line = next(line for line in message.splitlines() if re.match(rf"\s+{row.index}\s", line))
        assert line.rstrip().endswith("FAIL")
        assert f"{row.autograd:.9e}" in line and f"{row.finite_difference:.9e}" in line
        assert f"{row.allowed:.3e}" in line
        assert f"direction {row.index}, " in message  # its forward records
    assert "backward: " in message
    return error.result


@examples(8)
@given(FIXED_POINT_MAPS)
def test_check_fails_when_the_backward_skips_the_solve(problem: FixedPointProblem):
    layer = fixed_point(problem)

    def wrong(w0, *params):
        return NoSolve.apply(layer, w0, *params)

    assert_fails_naming_directions(
        wrong, problem.inputs, layers=[layer], condition=problem.condition
    )


@examples(8)
@given(st.one_of(FIXED_POINT_MAPS, deq_cells(), ARGMIN_PROBLEMS))
def test_check_fails_when_the_backward_solver_returns_b(problem):
    if isinstance(problem, ArgminProblem):
        layer = argmin(problem, backward=no_solve)
    else:
        layer = fixed_point(problem, backward=no_solve)
    result = assert_fails_naming_directions(layer, problem.inputs, condition=problem.condition)
    assert result.backward[0].method == "no_solve"


@examples(6)
@given(st.one_of(FIXED_POINT_MAPS, deq_cells()))
def test_check_fails_when_the_backward_solves_the_untransposed_system(problem):
    """``J`` is not symmetric for these maps, so ``(I - J)^{-1} b`` is the wrong solution."""
    layer = fixed_point(problem, backward=untransposed)
    assert_fails_naming_directions(layer, problem.inputs, condition=problem.condition)


@examples(8)
@given(st.one_of(FIXED_POINT_MAPS, deq_cells(), ARGMIN_PROBLEMS))
def test_check_fails_on_a_gradient_one_percent_too_large(problem):
    layer = argmin(problem) if isinstance(problem, ArgminProblem) else fixed_point(problem)

    def wrong(w0, *params):
        return Scaled.apply(layer(w0, *params))

    result = assert_fails_naming_directions(
        wrong, problem.inputs, layers=[layer], condition=problem.condition
    )
    for row in result.failures:  # the error found is the 1% put in, to the check's resolution
        assert abs(row.autograd - 1.01 * row.finite_difference) <= row.allowed


def test_check_is_inconclusive_when_the_forward_is_loose():
    """A forward solved to 1e-2 cannot support a finite-difference check: the tolerance would
    exceed 10% of the gradient, and the checker says so instead of passing."""
    problem = affine_problem(seed=0, dim=3, contraction=0.8, dtype=f64)
    layer = fixed_point(problem, solver=FixedPoint(tol=1e-2))
    with pytest.raises(GradientCheckError, match="inconclusive") as caught:
        check_gradients(layer, problem.inputs, condition=problem.condition)
    assert not caught.value.result.failures and not caught.value.result.conclusive


# ---------------------------------------------------------------------------------------------
# Arguments, imports, docs


def test_check_rejects_what_it_cannot_check():
    layer = fixed_point_layer(lambda w, c: 0.5 * w + c)
    with pytest.raises(ValueError, match="requires grad"):
        check_gradients(layer, (torch.zeros(2), torch.ones(2)))
    c = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="directions"):
        check_gradients(layer, (torch.zeros(2), c), directions=0)
    with pytest.raises(ValueError, match="condition"):
        check_gradients(layer, (torch.zeros(2), c), condition=0.5)
    with pytest.raises(ValueError, match="layers="):
        check_gradients(layer, (torch.zeros(2), c), layers=[layer])


def test_hypothesis_is_optional_for_the_library_and_named_by_the_testing_package(monkeypatch):
    """Re-import the package with hypothesis blocked (``sys.modules[name] = None`` makes
    ``import name`` raise ImportError): ``implicit_layers`` imports, and
    ``implicit_layers.testing`` says what to install. The original modules are restored."""
    ours = [name for name in sys.modules if name.split(".")[0] in ("implicit_layers", "hypothesis")]
    for name in ours:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "hypothesis", None)

    library = importlib.import_module("implicit_layers")
    assert library.fixed_point_layer is not None
    with pytest.raises(ImportError, match="pip install hypothesis"):
        importlib.import_module("implicit_layers.testing")
    for name in [name for name in sys.modules if name.startswith("implicit_layers")]:
        del sys.modules[name]  # the fresh copies go; monkeypatch then restores the originals
