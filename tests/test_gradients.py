"""Property tests: the layer's gradients against known answers, for every solver and problem class.

The problems and their oracles live in ``problems.py``: contractive affine maps (closed form),
contractive tanh maps (Newton-solved fixed point, central finite differences) and gradient steps
of ridge regression (closed form, ``I - J`` symmetric positive definite), each as a vector, a
batch of rows, or a pytree.

Tolerances. Every solve stops at a relative residual ``tau`` (forward: ``||Phi(w) - w|| <=
tau ||w||``; backward: ``||b - A x|| <= tau ||b||``). With ``||J||_2 <= rho`` the errors are
bounded norm-wise by the condition number ``kappa = cond(I - J) <= (1 + rho) / (1 - rho)``:
``||w - w*|| / ||w*|| <= kappa tau`` and ``||x - x*|| / ||x*|| <= kappa tau``, and the gradient
``(dPhi/dp)^T x`` (taken at the computed ``w``) inherits both, so its error, measured against
the problem's natural scale ``||dPhi/dp|| ||x*||`` (see ``Problem.scales``), is about
``kappa (tau_forward + tau_backward)`` plus rounding ``~ n eps kappa``. The strategies keep
``rho <= 0.9`` (``kappa <= 19``) for the affine and tanh maps and ``kappa = L / mu`` below about
15 for ridge.

* float64, ``tau = 1e-12``: ``19 * 2e-12 ~ 4e-11``, rounding ``~ 24 * 1.1e-16 * 19 ~ 5e-14``.
  ``rtol = 1e-8`` leaves a factor of over 100 for the constants of these bounds.
* float32, ``tau = 1e-6``: ``19 * 2e-6 ~ 4e-5``, rounding ``~ 24 * 6e-8 * 19 ~ 3e-5``, so
  ``~ 7e-5``; ``rtol = 2e-4`` leaves a factor of about 3 (observed errors are ~2e-6, since
  the bounds are rarely tight).
* tanh: the oracle is a central difference with step ``1e-6`` of a Newton-solved ``w*``,
  accurate to ``~1e-9`` of the scale (truncation ``h^2 L''' / 6`` plus rounding
  ``eps |L| / h``; ``problems.py`` checks it against the implicit function theorem). Its
  tolerance is ``max(rtol, 1e-7)``.

A test that cannot fail is a defect, so each problem carries decoys, the gradients that a
backward without the linear solve (``x = b``), one solving the untransposed system, or one
taking ``dPhi/dparams`` at ``w0`` would produce, and each test ``assume``s that the nearest
decoy is at least ``10 * rtol`` away from the oracle (so a passing assertion rules out each of
those bugs). With ``rho >= 0.1`` the decoys are typically 1e-2 to 1 away.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from problems import KINDS, LAYOUTS, Problem, build_core, problems, tanh_ift_gradient

from implicit_layers import (
    CG,
    GMRES,
    Anderson,
    BiCGSTAB,
    Direct,
    FixedPoint,
    Neumann,
    NormalCG,
    Status,
    fixed_point_layer,
)

f32, f64 = torch.float32, torch.float64
DTYPES = (f32, f64)

# Relative residual each solver is asked for, and the gradient tolerance it supports (see the
# module docstring for the derivation).
SOLVER_TOL = {f32: 1e-6, f64: 1e-12}
RTOL = {f32: 2e-4, f64: 1e-8}
FD_RTOL = 1e-7
# Budgets far above need: the slowest linear rate here is Neumann with step 1/2 on ridge,
# (1 + 0.95) / 2 per product, ~1100 products to 1e-12; a budget overrun raises (on_failure).
MAX_ITER = 5000

# GRADIENT_TEST_EXAMPLES_SCALE=10 runs ten times as many examples (a stress run).
_SCALE = float(os.environ.get("GRADIENT_TEST_EXAMPLES_SCALE", "1"))


def examples(count: int) -> settings:
    return settings(
        max_examples=max(1, round(count * _SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def rtol_for(problem: Problem) -> float:
    return max(RTOL[problem.dtype], FD_RTOL) if problem.fd_step else RTOL[problem.dtype]


def dense_solve(matvec, b):
    """A user backward callable: the dense matrix of ``A`` from its products, then LU."""
    eye = torch.eye(b.numel(), dtype=b.dtype, device=b.device)
    matrix = torch.stack([matvec(column) for column in eye], dim=1)
    return torch.linalg.solve(matrix, b)


def make_loop(iterations: int):
    """A user forward callable: a plain training-loop-like iteration of fixed length."""

    def my_loop(f, w0):
        w = w0
        for _ in range(iterations):
            w = f(w)
        return w

    return my_loop


def loop_iterations(problem: Problem) -> int:
    """Picard steps that bring the error to ``eps / 10``: ``rho^k <= eps / 10``."""
    eps = torch.finfo(problem.dtype).eps
    return math.ceil(math.log(eps / 10) / math.log(problem.contraction)) + 5


BACKWARDS = ("GMRES", "BiCGSTAB", "Neumann", "NormalCG", "Direct", "CG", "dense_solve")
FORWARDS = ("Anderson", "FixedPoint", "my_loop")


def draw_backward(data, name: str, dtype: torch.dtype):
    tol = SOLVER_TOL[dtype]
    if name == "GMRES":
        # GMRES(1) already shrinks the residual by rho per product (never worse than Neumann).
        restart = data.draw(st.integers(1, 30), label="restart")
        return GMRES(tol=tol, max_iter=MAX_ITER, restart=restart)
    if name == "BiCGSTAB":
        return BiCGSTAB(tol=tol, max_iter=MAX_ITER)
    if name == "Neumann":
        # Richardson with step s on (I - J^T): iteration matrix (1 - s) I + s J^T, radius
        # <= 1 - s (1 - rho) < 1 for s in (0, 1].
        step = data.draw(st.floats(0.5, 1.0), label="step")
        return Neumann(tol=tol, max_iter=MAX_ITER, step=step)
    if name == "NormalCG":
        return NormalCG(tol=tol, max_iter=MAX_ITER)
    if name == "Direct":
        return Direct(tol=tol)
    if name == "CG":
        return CG(tol=tol, max_iter=MAX_ITER)
    if name == "dense_solve":
        return dense_solve
    raise ValueError(name)


def draw_forward(data, name: str, problem: Problem):
    tol = SOLVER_TOL[problem.dtype]
    if name == "Anderson":
        memory = data.draw(st.integers(1, 6), label="memory")
        return Anderson(tol=tol, max_iter=MAX_ITER, memory=memory)
    if name == "FixedPoint":
        # Damping d gives the iteration matrix (1 - d) I + d J, radius <= 1 - d (1 - rho).
        damping = data.draw(st.floats(0.5, 1.0), label="damping")
        return FixedPoint(tol=tol, max_iter=MAX_ITER, damping=damping)
    if name == "my_loop":
        return make_loop(loop_iterations(problem))
    raise ValueError(name)


def backward_cases():
    for kind in KINDS:
        for name in BACKWARDS:
            if name == "CG" and kind != "ridge":
                continue  # CG needs I - J symmetric positive definite: gradient steps only
            for dtype in DTYPES:
                yield pytest.param(kind, name, dtype, id=f"{kind}-{name}-{str(dtype)[6:]}")


def draw_problem(data, kind, dtype, layouts=LAYOUTS) -> Problem:
    problem = data.draw(problems(kind, dtype, layouts), label="problem")
    note(
        f"{problem.name} {problem.dtype}: rho={problem.contraction:.3f} "
        f"cond={problem.condition:.2f} decoy margin={problem.decoy_margin():.3g}"
    )
    # The assertion must be able to tell the right gradient from each plausible wrong one.
    assume(problem.decoy_margin() > 10 * rtol_for(problem))
    return problem


def run(problem: Problem, solver, backward):
    """Solve, differentiate the outer loss, and return the layer and its output."""
    layer = fixed_point_layer(problem.phi, solver=solver, backward=backward, on_failure="raise")
    w = layer(problem.w0, *problem.params)
    problem.loss(w).backward()
    return layer, w


def check_gradients(problem: Problem, w) -> None:
    rtol = rtol_for(problem)
    assert problem.w_error(w) <= rtol, f"{problem.name}: w* off by {problem.w_error(w):.3e}"
    for name, tensor in problem.inputs.items():
        error = problem.error(name, tensor.grad)
        assert error <= rtol, f"{problem.name}: d/d{name} off by {error:.3e} (rtol {rtol:.0e})"


def check_measured_record(record, method: str, problem: Problem, size: int) -> None:
    """A user callable's record: unchecked, with its residual measured by one extra product.

    A dense LU solve is backward stable, ``||r|| <= c n eps ||A|| ||x|| <= c n eps kappa ||b||``.
    """
    assert record.method == method
    assert record.status is Status.UNCHECKED
    eps = torch.finfo(problem.dtype).eps
    assert record.relative_residual <= 10 * size * eps * problem.condition


def flat_size(problem: Problem) -> int:
    return problem.flatten(problem.w0).numel()


# ---------------------------------------------------------------------------------------------
# Every backward solver on every problem class where it applies, in float32 and float64


@pytest.mark.parametrize(("kind", "backward_name", "dtype"), list(backward_cases()))
@examples(20)
@given(data=st.data())
def test_backward_solver_gradient_matches_oracle(kind, backward_name, dtype, data):
    problem = draw_problem(data, kind, dtype)
    backward = draw_backward(data, backward_name, dtype)
    forward = Anderson(tol=SOLVER_TOL[dtype], max_iter=MAX_ITER)
    layer, w = run(problem, forward, backward)

    check_gradients(problem, w)
    assert layer.last_forward.converged
    record = layer.last_backward
    if backward_name == "dense_solve":
        check_measured_record(record, "dense_solve", problem, flat_size(problem))
        assert record.products == flat_size(problem) + 1  # n columns, then the residual
    else:
        assert record.method == backward_name
        assert record.converged
        assert record.relative_residual <= SOLVER_TOL[dtype]
        assert record.products >= 1


# ---------------------------------------------------------------------------------------------
# Every forward solver (and a user loop) on every class, in float32 and float64


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("forward_name", FORWARDS)
@pytest.mark.parametrize("kind", KINDS)
@examples(15)
@given(data=st.data())
def test_forward_solver_gradient_matches_oracle(kind, forward_name, dtype, data):
    problem = draw_problem(data, kind, dtype)
    forward = draw_forward(data, forward_name, problem)
    backward = GMRES(tol=SOLVER_TOL[dtype], max_iter=MAX_ITER)
    layer, w = run(problem, forward, backward)

    check_gradients(problem, w)
    record = layer.last_forward
    if forward_name == "my_loop":
        assert record.method == "my_loop"
        assert record.status is Status.UNCHECKED
        assert record.products == loop_iterations(problem) + 1  # the loop, then the residual
        # rho^k <= eps/10 leaves only rounding: ||Phi(w) - w|| ~ n eps (||A|| ||w|| + ...).
        assert record.relative_residual <= 100 * torch.finfo(dtype).eps * problem.condition
    else:
        assert record.method == forward_name
        assert record.converged
        assert record.relative_residual <= SOLVER_TOL[dtype]
    assert layer.last_backward.converged


# ---------------------------------------------------------------------------------------------
# Tiny and huge incoming gradients in float32


@pytest.mark.parametrize("backward_name", BACKWARDS)
@examples(5)
@given(data=st.data(), factor=st.sampled_from((1e-30, 1e-20, 1e20, 1e30)))
def test_float32_gradient_is_linear_in_the_incoming_gradient(backward_name, data, factor):
    """``L -> factor * L`` scales every gradient by ``factor``, down to 1e-30 and up to 1e30 in
    float32, where the squared norms inside a Krylov method (1e-60, 1e60) would under- or
    overflow unless the backward works on a rescaled right-hand side."""
    kind = "ridge" if backward_name == "CG" else data.draw(st.sampled_from(KINDS), label="kind")
    problem = draw_problem(data, kind, f32)
    backward = draw_backward(data, backward_name, f32)
    layer = fixed_point_layer(
        problem.phi,
        solver=Anderson(tol=SOLVER_TOL[f32], max_iter=MAX_ITER),
        backward=backward,
        on_failure="raise",
    )
    w = layer(problem.w0, *problem.params)
    (factor * problem.loss(w)).backward()
    for name, tensor in problem.inputs.items():
        assert torch.isfinite(tensor.grad).all(), name
        # The division by a power of ten costs at most one rounding, ~6e-8: far below rtol.
        assert problem.error(name, tensor.grad.to(f64) / factor) <= rtol_for(problem), name


# ---------------------------------------------------------------------------------------------
# The oracle of the tanh class: finite differences agree with the implicit function theorem


@examples(15)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 8),
    m=st.integers(2, 4),
    batch=st.integers(1, 3),
    rho=st.floats(0.1, 0.9),
)
def test_tanh_finite_difference_oracle_agrees_with_dense_ift(seed, n, m, batch, rho):
    core = build_core("tanh", seed, n, m, batch, rho, f64)
    ift = tanh_ift_gradient(core)
    for name, grad in ift.items():
        error = float(torch.linalg.vector_norm(grad - core.grads[name])) / core.scales[name]
        # Both are accurate to ~1e-9 of the scale (see problems.py); FD_RTOL / 10 still has
        # 10x room.
        assert error <= FD_RTOL / 10, f"d/d{name}: FD and IFT differ by {error:.3e}"


# ---------------------------------------------------------------------------------------------
# Pytrees and batches, for every class, explicitly (the tests above draw the layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backward_name", ("GMRES", "NormalCG", "Neumann", "Direct"))
@pytest.mark.parametrize("layout", ("tree", "batched"))
@pytest.mark.parametrize("kind", KINDS)
@examples(6)
@given(data=st.data())
def test_pytree_and_batched_layouts(kind, layout, backward_name, dtype, data):
    problem = draw_problem(data, kind, dtype, layouts=(layout,))
    backward = draw_backward(data, backward_name, dtype)
    layer, w = run(problem, Anderson(tol=SOLVER_TOL[dtype], max_iter=MAX_ITER), backward)

    check_gradients(problem, w)
    # The output has w0's structure, leaf for leaf.
    if layout == "tree":
        assert type(w) is type(problem.w0)
        leaves = list(w.values()) if isinstance(w, dict) else list(w)
        templates = list(problem.w0.values()) if isinstance(w, dict) else list(problem.w0)
        if isinstance(w, dict):
            assert w.keys() == problem.w0.keys()
        assert [t.shape for t in leaves] == [t.shape for t in templates]
        assert len({t.shape for t in leaves}) == 2  # two leaves of different shapes
        assert all(t.dtype == dtype for t in leaves)
    else:
        assert w.shape == problem.w0.shape and w.ndim == 2 and w.shape[0] >= 2


def _affine(dtype, data, layout="vector") -> Problem:
    return draw_problem(data, "affine", dtype, layouts=(layout,))


# ---------------------------------------------------------------------------------------------
# Params that are not leaves, params that do not all require grad, and w0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@examples(15)
@given(data=st.data())
def test_gradients_flow_through_non_leaf_params(dtype, data):
    """Params computed from leaves (``lam = sign * log_abs.exp()``, ``c = 2 * half_c``,
    ``A = scale * A``): the chain rule continues past the layer to the leaves, and a param also
    used outside the layer receives both contributions."""
    problem = _affine(dtype, data)
    A, B, lam, c = (p.detach() for p in problem.params)
    assume(bool((lam != 0).all()))
    log_abs = lam.abs().log().requires_grad_()
    half_c = (c / 2).requires_grad_()
    scale = torch.tensor(1.0, dtype=dtype, requires_grad=True)

    lam_in = lam.sign() * log_abs.exp()
    params = (A * scale, B, lam_in, half_c * 2)
    assert not any(p.is_leaf for p in (params[0], params[2], params[3]))
    layer = fixed_point_layer(
        problem.phi,
        solver=Anderson(tol=SOLVER_TOL[dtype], max_iter=MAX_ITER),
        backward=GMRES(tol=SOLVER_TOL[dtype], max_iter=MAX_ITER),
        on_failure="raise",
    )
    w = layer(problem.w0, *params)
    outside = (lam_in**2).sum() / 2  # lam also used outside the layer: adds lam to d/dlam
    (problem.loss(w) + outside).backward()

    rtol = rtol_for(problem)
    lam64, A64 = lam.to(f64), A.to(f64)

    def distance(got, expected):
        return float(torch.linalg.vector_norm(got.to(f64) - expected))

    # d/dlog_abs = (dL/dlam + lam) * lam: the error of dL/dlam, times at most max|lam|
    # (the exp() and the sign() in float32 add ~eps, far below rtol).
    expected = (problem.grads["lam"] + lam64) * lam64
    bound = rtol * (problem.scales["lam"] + float(lam64.norm())) * float(lam64.abs().max())
    assert distance(log_abs.grad, expected) <= bound
    # d/dhalf_c = 2 dL/dc.
    assert distance(half_c.grad, 2 * problem.grads["C"]) <= 2 * rtol * problem.scales["C"]
    # d/dscale = <dL/dA, A>, off by at most ||error of dL/dA|| ||A||.
    expected_scale = float((problem.grads["A"] * A64).sum())
    bound = rtol * problem.scales["A"] * float(torch.linalg.matrix_norm(A64))
    assert abs(float(scale.grad) - expected_scale) <= bound


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@examples(15)
@given(data=st.data(), wanted=st.sets(st.sampled_from(("A", "lam", "C")), min_size=1))
def test_gradients_go_to_the_params_that_require_them(dtype, data, wanted):
    """With any subset of several params requiring grad, each gets its own gradient (no
    mix-up of slots) and the others get none."""
    problem = _affine(dtype, data)
    A, B, lam, c = problem.params
    tensors = {"A": A, "lam": lam, "C": c}
    for name, tensor in tensors.items():
        tensor.requires_grad_(name in wanted)
    inputs = [tensors[name] for name in sorted(wanted)]
    layer = fixed_point_layer(
        problem.phi,
        solver=Anderson(tol=SOLVER_TOL[dtype], max_iter=MAX_ITER),
        backward=GMRES(tol=SOLVER_TOL[dtype], max_iter=MAX_ITER),
        on_failure="raise",
    )
    w = layer(problem.w0, *problem.params)
    grads = torch.autograd.grad(problem.loss(w), inputs)
    for name, grad in zip(sorted(wanted), grads):
        assert problem.error(name, grad) <= rtol_for(problem), name
    problem.loss(layer(problem.w0, *problem.params)).backward()
    for name, tensor in tensors.items():
        if name in wanted:
            assert problem.error(name, tensor.grad) <= rtol_for(problem), name
        else:
            assert tensor.grad is None, name


def leaves_of(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    return list(tree.values()) if isinstance(tree, dict) else list(tree)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ("vector", "batched", "tree"))
@examples(6)
@given(data=st.data())
def test_no_gradient_flows_to_w0(layout, dtype, data):
    """The fixed point does not depend on the initial guess: a ``w0`` that requires grad gets
    none (its ``.grad`` stays ``None``), while the params get theirs."""
    problem = _affine(dtype, data, layout)
    w0_leaves = leaves_of(problem.w0)
    for leaf in w0_leaves:
        leaf.requires_grad_(True)
    layer, w = run(
        problem,
        Anderson(tol=SOLVER_TOL[dtype], max_iter=MAX_ITER),
        GMRES(tol=SOLVER_TOL[dtype], max_iter=MAX_ITER),
    )
    check_gradients(problem, w)
    assert all(leaf.grad is None for leaf in w0_leaves)

    w = layer(problem.w0, *problem.params)
    assert all(leaf.requires_grad for leaf in leaves_of(w))  # through the params
    grads = torch.autograd.grad(problem.loss(w), w0_leaves, allow_unused=True)
    assert all(g is None for g in grads)

    # With only w0 requiring grad, the output is a constant of the graph.
    for tensor in problem.inputs.values():
        tensor.requires_grad_(False)
    constant = layer(problem.w0, *problem.params)
    assert not any(leaf.requires_grad for leaf in leaves_of(constant))
