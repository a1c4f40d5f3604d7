"""How layers compose with the rest of PyTorch, and what a user gets from bad input.

Sections: torch.func transforms; torch.compile; no_grad and inference_mode; autocast;
re-entrancy, threads and references; bad input (see ``docs/bad_input.md``).

Double backward and nesting are in ``tests/test_double_backward.py``.
"""

from __future__ import annotations

import copy
import gc
import math
import threading
import time
import warnings
import weakref

import pytest
import torch
from torch import nn

from implicit_layers import (
    CG,
    GMRES,
    Anderson,
    ConvergenceError,
    ConvergenceWarning,
    Direct,
    FixedPoint,
    FixedPointLayer,
    argmin_layer,
    fixed_point_layer,
)
from implicit_layers.testing._problems import _contraction_matrix

f64 = torch.float64
TIGHT = dict(solver=FixedPoint(tol=1e-13, max_iter=1000), backward=GMRES(tol=1e-13))


def contraction(n: int, rho: float, seed: int) -> torch.Tensor:
    return _contraction_matrix(n, rho, torch.Generator().manual_seed(seed))


def affine_problem(n: int = 5, seed: int = 0):
    """``w* = A w* + lam``: ``dL/dlam = (I - A)^{-T} g`` for ``L = <g, w*>``."""
    A = contraction(n, 0.6, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    lam = torch.randn(n, generator=generator, dtype=f64)
    g = torch.randn(n, generator=generator, dtype=f64)
    expected = torch.linalg.solve((torch.eye(n, dtype=f64) - A).T, g)
    return A, lam, g, expected


class Cell(nn.Module):
    """``Phi(z, x) = tanh(W z + U x)`` with ``||W||_2 = 0.5``."""

    def __init__(self, n: int, dtype=f64, cast_output: bool = False):
        super().__init__()
        self.W = nn.Linear(n, n, dtype=dtype)
        self.U = nn.Linear(n, n, dtype=dtype)
        self.cast_output = cast_output
        with torch.no_grad():
            self.W.weight.mul_(0.5 / torch.linalg.matrix_norm(self.W.weight, 2))

    def forward(self, z, x):
        out = torch.tanh(self.W(z) + self.U(x))
        return out.to(z.dtype) if self.cast_output else out


class Model(nn.Module):
    """Linear encoder, a fixed-point layer whose Phi has parameters, linear head."""

    def __init__(self, n_in: int = 3, n: int = 5, n_out: int = 2):
        super().__init__()
        self.encoder = nn.Linear(n_in, n, dtype=f64)
        self.equilibrium = FixedPointLayer(Cell(n), **TIGHT)
        self.head = nn.Linear(n, n_out, dtype=f64)

    def forward(self, x):
        h = self.encoder(x)
        return self.head(self.equilibrium(torch.zeros_like(h), h))


def model_grads(model: nn.Module, x: torch.Tensor, run=None) -> dict[str, torch.Tensor]:
    """Gradients of a loss on ``run(x)`` (``run`` defaults to ``model``; pass its compiled
    version) for ``model``'s parameters."""
    model.zero_grad()
    (model if run is None else run)(x).pow(2).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# --- torch.func ------------------------------------------------------------------------------


def affine_layer_and_loss():
    A, lam, g, expected = affine_problem()
    layer = fixed_point_layer(lambda w, lam: A @ w + lam, **TIGHT)
    w0 = torch.zeros(5, dtype=f64)
    return layer, w0, lam, g, expected


def test_func_grad_matches_the_implicit_gradient():
    layer, w0, lam, g, expected = affine_layer_and_loss()
    grad = torch.func.grad(lambda lam: layer(w0, lam) @ g)(lam)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_func_vjp_matches_the_implicit_gradient():
    layer, w0, lam, g, expected = affine_layer_and_loss()
    w, vjp_fn = torch.func.vjp(lambda lam: layer(w0, lam), lam)
    torch.testing.assert_close(vjp_fn(g)[0], expected, rtol=1e-10, atol=1e-12)


def test_vmap_solves_each_slice():
    layer, w0, lam, g, expected = affine_layer_and_loss()
    lams = torch.stack([lam, 2 * lam])
    batched = torch.func.vmap(lambda lam: layer(w0, lam))(lams)
    torch.testing.assert_close(batched, torch.stack([layer(w0, lam) for lam in lams]))


def test_jacrev_is_the_implicit_jacobian():
    layer, w0, lam, _, _ = affine_layer_and_loss()
    A = layer.phi(torch.eye(5, dtype=f64), torch.zeros(5, 1, dtype=f64))  # Phi(I, 0) = A
    jacobian = torch.func.jacrev(lambda lam: layer(w0, lam))(lam)
    expected = torch.linalg.inv(torch.eye(5, dtype=f64) - A)  # dw*/dlam = (I - A)^{-1}
    torch.testing.assert_close(jacobian, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("api", ["torch.func.jvp", "forward_ad"])
def test_forward_mode_is_the_implicit_tangent(api):
    import torch.autograd.forward_ad as fwAD

    layer, w0, lam, g, _ = affine_layer_and_loss()
    A = layer.phi(torch.eye(5, dtype=f64), torch.zeros(5, 1, dtype=f64))
    expected = torch.linalg.solve(torch.eye(5, dtype=f64) - A, g)  # dw* = (I - A)^{-1} dlam
    if api == "torch.func.jvp":
        tangent = torch.func.jvp(lambda lam: layer(w0, lam), (lam,), (g,))[1]
    else:
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(layer(w0, fwAD.make_dual(lam, g))).tangent
    torch.testing.assert_close(tangent, expected, rtol=1e-10, atol=1e-12)
    assert layer.last_tangent.converged and layer.last_tangent.method == "GMRES"


@pytest.mark.parametrize("transform", ["jacfwd", "hessian"])
def test_vmapped_forward_mode_names_what_to_use_instead(transform):
    layer, w0, lam, g, _ = affine_layer_and_loss()
    with pytest.raises(NotImplementedError, match="implicit layers .* jacrev"):
        getattr(torch.func, transform)(lambda lam: layer(w0, lam) @ g)(lam)


def test_functional_call_routes_gradients_to_the_given_parameters():
    torch.manual_seed(0)
    layer = FixedPointLayer(Cell(4), **TIGHT)
    x = torch.randn(4, dtype=f64)
    layer(torch.zeros(4, dtype=f64), x).sum().backward()
    expected = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()

    params = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}
    torch.func.functional_call(layer, params, (torch.zeros(4, dtype=f64), x)).sum().backward()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in layer.parameters())


# --- torch.compile ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_matches_eager_gradients(backend):
    torch.manual_seed(0)
    model = Model()
    x = torch.randn(4, 3, dtype=f64)
    expected = model_grads(model, x)
    torch._dynamo.reset()
    try:
        twin = copy.deepcopy(model)
        compiled = torch.compile(twin, backend=backend)
        for batch in (x, 2 * x):  # a second call reuses the compiled graphs
            got = model_grads(twin, batch, compiled)
            want = expected if batch is x else model_grads(model, batch)
            assert got.keys() == want.keys()
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)
    finally:
        torch._dynamo.reset()


# --- no_grad and inference_mode --------------------------------------------------------------


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("module_phi", [False, True], ids=["closure", "module"])
def test_no_grad_forward_keeps_no_graph_and_saves_nothing(mode, module_phi):
    A, lam, _, _ = affine_problem()
    lam.requires_grad_()
    torch.manual_seed(0)
    cell = Cell(5)
    layer = (
        FixedPointLayer(cell, **TIGHT)
        if module_phi
        else fixed_point_layer(lambda w, lam: A @ w + lam, **TIGHT)
    )
    packed = []

    def pack(tensor):
        packed.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode():
        w0 = torch.zeros(5, dtype=f64)
        w = layer(w0, lam)
    assert not w.requires_grad and w.grad_fn is None and packed == []
    assert w.is_inference() == (mode is torch.inference_mode)
    with torch.no_grad():
        expected = cell(w, lam) if module_phi else A @ w + lam
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-10)
    refs = [weakref.ref(w), weakref.ref(w0)]
    del w, w0
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_argmin_layer_under_no_grad():
    target = torch.randn(4, dtype=f64, requires_grad=True)
    layer = argmin_layer(lambda w, t: ((w - t) ** 2).sum())
    with torch.no_grad():
        w = layer(torch.zeros(4, dtype=f64), target)
    assert w.grad_fn is None
    torch.testing.assert_close(w, target.detach(), rtol=0, atol=1e-4)


def test_argmin_layer_under_inference_mode_works_or_says_why_not():
    target = torch.randn(4, dtype=f64, requires_grad=True)
    layer = argmin_layer(lambda w, t: ((w - t) ** 2).sum())
    try:
        with torch.inference_mode():
            w = layer(torch.zeros(4, dtype=f64), target)
    except RuntimeError as error:
        assert "inference_mode" in str(error) and "no_grad" in str(error), str(error)
    else:
        torch.testing.assert_close(w, target.detach(), rtol=0, atol=1e-4)


# --- autocast --------------------------------------------------------------------------------

# bfloat16 keeps 8 significant bits: unit roundoff u = 2**-8 ~ 3.9e-3. Each evaluation of Phi
# under autocast rounds the inputs of its matmuls to bfloat16, so w* is the fixed point of a map
# perturbed by ~u relative, and moves by ~u ||w*|| / (1 - rho) (rho = 0.5 here). The forward
# cannot get below that floor (its relative residual stalls near 1e-3), so its tol is set to u.
# The gradient inherits a relative error of a few u: measured 3e-3 to 1e-2 against float64;
# asserted below 3e-2 (~8 u).
BF16_U = 2.0**-8
BF16_GRAD_RTOL = 3e-2


def autocast_gradient_error(cell: Cell, w0_dtype: torch.dtype) -> float:
    """Relative max error of ``dL/dW`` with the layer under bfloat16 autocast (the backward
    outside the region, as recommended), against the same model in float64 without autocast."""
    torch.manual_seed(1)
    x, g = torch.randn(4, 16), torch.randn(4, 16)

    def grad_W(cell, dtype, autocast, w0_dtype, tol):
        layer = FixedPointLayer(cell, solver=FixedPoint(tol=tol, max_iter=200))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = layer(torch.zeros(4, 16, dtype=w0_dtype), x.to(dtype))
            loss = (z.to(dtype) * g.to(dtype)).sum()
        loss.backward()
        return cell.W.weight.grad.double()

    reference = grad_W(copy.deepcopy(cell).double(), f64, False, f64, 1e-12)
    got = grad_W(cell, torch.float32, True, w0_dtype, BF16_U)
    return float((got - reference).abs().max() / reference.abs().max())


def test_autocast_precision_of_the_solves():
    """Phi runs in the forward's autocast region in the forward and again in the backward
    (called outside the region, as torch recommends), its matmuls in bfloat16; the iterate, the
    vector-Jacobian products' vectors and the linear solve stay in w0's dtype, float32."""
    torch.manual_seed(0)
    seen = []

    class Spy(Cell):
        def forward(self, z, x):
            seen.append((torch.is_autocast_enabled("cpu"), self.W(z).dtype, z.dtype))
            return super().forward(z, x)

    cell = Spy(16, dtype=torch.float32, cast_output=True)
    x = torch.randn(4, 16)
    layer = FixedPointLayer(cell, solver=FixedPoint(tol=BF16_U))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(torch.zeros(4, 16), x)
    forward, seen[:] = set(seen), []
    z.sum().backward()
    assert forward == {(True, torch.bfloat16, torch.float32)}
    assert set(seen) == forward  # the backward replays the forward's region
    assert z.dtype == torch.float32 and cell.W.weight.grad.dtype == torch.float32
    assert layer.last_backward.converged and layer.last_backward.relative_residual <= 1e-6


def test_autocast_gradient_with_phi_returning_w_dtype():
    torch.manual_seed(0)
    error = autocast_gradient_error(Cell(16, torch.float32, cast_output=True), torch.float32)
    assert error < BF16_GRAD_RTOL


def test_autocast_gradient_with_a_plain_module_cell():
    torch.manual_seed(0)
    assert autocast_gradient_error(Cell(16, torch.float32), torch.float32) < BF16_GRAD_RTOL


def test_autocast_gradient_with_a_bfloat16_w0():
    torch.manual_seed(0)
    assert autocast_gradient_error(Cell(16, torch.float32), torch.bfloat16) < BF16_GRAD_RTOL


# --- re-entrancy, threads, references --------------------------------------------------------


def test_two_layers_and_one_layer_twice_in_one_graph():
    n = 4
    A1, A2 = contraction(n, 0.6, 1), contraction(n, 0.7, 2)
    generator = torch.Generator().manual_seed(3)
    B1, B2_init, g1, g2 = (torch.randn(n, n, generator=generator, dtype=f64) for _ in range(4))
    g1, g2 = g1[0], g2[0]
    lam0 = torch.randn(n, generator=generator, dtype=f64)

    def forward(solve_1, solve_2):
        lam = lam0.clone().requires_grad_()
        B2 = B2_init.clone().requires_grad_()
        u = solve_1(lam)  # layer 1
        u_again = solve_1(2 * lam + 1)  # layer 1 again, before any backward
        v = solve_2(u, B2)  # layer 2 on layer 1's output
        (g1 @ u_again + g2 @ v + u.sum()).backward()
        return lam.grad, B2.grad

    eye = torch.eye(n, dtype=f64)
    expected = forward(  # closed forms w* = (I - A)^{-1} B p, differentiated by autograd
        lambda lam: torch.linalg.solve(eye - A1, B1 @ lam),
        lambda u, B2: torch.linalg.solve(eye - A2, B2 @ u),
    )
    zero = torch.zeros(n, dtype=f64)
    for warm_start in (False, True):  # with it, the second backward starts from the first's x
        layer1 = fixed_point_layer(lambda w, p: A1 @ w + B1 @ p, **TIGHT, warm_start=warm_start)
        layer2 = fixed_point_layer(lambda w, u, B2: A2 @ w + B2 @ u, **TIGHT)
        got = forward(
            lambda lam, layer1=layer1: layer1(zero, lam),
            lambda u, B2, layer2=layer2: layer2(zero, u, B2),
        )
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_one_layer_called_from_two_threads():
    """Each thread gets its own gradient, its own per-call records, and reads its own latest
    call's records in ``last_forward`` and ``last_backward`` (they are per thread)."""
    n, rounds = 32, 4
    A = contraction(n, 1.0, 4)

    def phi(w, rho, lam):
        time.sleep(0)  # let the other thread in between evaluations
        return rho * (A @ torch.tanh(w)) + lam

    layer = fixed_point_layer(phi, **TIGHT)
    generator = torch.Generator().manual_seed(5)
    # different contraction factors: different iteration counts identify each call's records
    jobs = [(0.3, torch.randn(n, generator=generator, dtype=f64)) for _ in range(2)]
    jobs[1] = (0.9, jobs[1][1])
    g = torch.randn(n, generator=generator, dtype=f64)

    def run(rho, lam0):
        lam = lam0.clone().requires_grad_()
        w, info = layer.solve(torch.zeros(n, dtype=f64), rho, lam)
        (w @ g).backward()
        assert layer.last_forward is info.forward and layer.last_backward is info.backward
        return lam.grad, info

    expected = [run(*job) for job in jobs]
    assert expected[0][1].forward.iterations < expected[1][1].forward.iterations
    barrier = threading.Barrier(2)
    results: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(index):
        try:
            for _ in range(rounds):
                barrier.wait(timeout=30)
                results[index].append(run(*jobs[index]))
        except BaseException as error:  # reported from the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, (grad, info) in enumerate(expected):
        assert len(results[index]) == rounds
        for got_grad, got_info in results[index]:
            torch.testing.assert_close(got_grad, grad, rtol=1e-10, atol=1e-12)
            assert got_info.forward.iterations == info.forward.iterations
            assert got_info.backward.products == info.backward.products
    assert layer.last_forward is expected[1][1].forward  # the main thread's own latest call
    assert layer.last_backward is expected[1][1].backward


def test_layer_keeps_no_reference_to_a_call():
    A, lam0, g, _ = affine_problem()
    for warm_start in (False, True):
        layer = fixed_point_layer(lambda w, lam: A @ w + lam, warm_start=warm_start)
        x = lam0.clone().requires_grad_()
        lam = 2 * x  # a non-leaf param with a graph behind it
        w0 = torch.zeros(5, dtype=f64)
        w = layer(w0, lam)
        (w @ g).backward()
        refs = [weakref.ref(t) for t in (w0, lam, w)]
        del w0, lam, w
        gc.collect()
        assert all(ref() is None for ref in refs)
        held = [value for value in vars(layer).values() if isinstance(value, torch.Tensor)]
        assert held == []
        previous = layer._latest.previous_backward  # this thread's, by design, detached
        if warm_start:
            assert not previous.requires_grad and previous.shape == g.shape
        else:
            assert previous is None


def test_kept_output_does_not_keep_its_inputs_after_backward():
    A, lam0, g, _ = affine_problem()
    layer = fixed_point_layer(lambda w, lam: A @ w + lam)
    lam = 2 * lam0.clone().requires_grad_()
    w = layer(torch.zeros(5, dtype=f64), lam)
    (w @ g).backward()
    ref = weakref.ref(lam)
    del lam
    gc.collect()
    assert ref() is None
    assert w.grad_fn is not None


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    A, lam0, g, expected = affine_problem()
    layer = fixed_point_layer(lambda w, lam: A @ torch.tanh(w) + lam, **TIGHT)
    zero = torch.zeros(5, dtype=f64)
    lam = lam0.clone().requires_grad_()
    (layer(zero, lam) @ g).backward()
    expected = lam.grad.clone()
    lam.grad = None
    checkpoint(lambda lam: layer(zero, lam) @ g, lam, use_reentrant=use_reentrant).backward()
    torch.testing.assert_close(lam.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hooks", ["save_on_cpu", "copy"])
def test_saved_tensor_hooks_give_the_same_gradients(hooks):
    """Hooks hand the saved tensors back as new objects (save_on_cpu copies them): the backward
    must use them in place of the module's parameters, not reject them as foreign tensors."""
    from torch.autograd.graph import save_on_cpu, saved_tensors_hooks

    torch.manual_seed(0)
    model, x = Model(), torch.randn(4, 3, dtype=f64)
    expected = model_grads(model, x)
    region = (
        save_on_cpu()
        if hooks == "save_on_cpu"
        else saved_tensors_hooks(lambda t: t.detach().clone(), lambda t: t)
    )
    model.zero_grad()
    with region:
        loss = model(x).pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12)


# --- bad input (docs/bad_input.md) -----------------------------------------------------------

A2 = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=f64)
C2 = torch.ones(2, dtype=f64)


def affine2(**options):
    return fixed_point_layer(lambda w, c: A2 @ w + c, **options)


@pytest.mark.parametrize(
    "w0, error, message",
    [
        ([0.0, 0.0], TypeError, r"`w0 \(leaf 0\)` must be a torch.Tensor, got float"),
        (None, TypeError, "`w0` must be a torch.Tensor, got NoneType"),
        (torch.zeros(2, dtype=torch.int64), TypeError, "must have a real floating-point dtype"),
    ],
    ids=["list", "None", "int64"],
)
def test_bad_w0_is_named(w0, error, message):
    with pytest.raises(error, match=message):
        affine2()(w0, C2)


def test_integer_params_are_constants_and_float_params_still_get_gradients():
    k = torch.tensor(2)
    lam = torch.ones(2, dtype=f64, requires_grad=True)
    w = fixed_point_layer(lambda w, lam, k: A2 @ w + k * lam, **TIGHT)(
        torch.zeros(2, dtype=f64), lam, k
    )
    w.sum().backward()
    expected = 2 * torch.linalg.solve((torch.eye(2, dtype=f64) - A2).T, torch.ones(2, dtype=f64))
    torch.testing.assert_close(lam.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "phi, w0, error, message",
    [
        (
            lambda w, c: torch.cat([w, c]),
            torch.zeros(2, dtype=f64),
            ValueError,
            r"Phi's output must have the shape of `w0`, \(2,\); got \(4,\)",
        ),
        (
            lambda w, c: 0.5 * w + c,  # float32 w0, float64 c: promoted to float64
            torch.zeros(2),
            TypeError,
            "Phi's output must have the dtype of `w0`, torch.float32; got torch.float64",
        ),
        (
            lambda w, c: (0.5 * w + c).to("meta"),
            torch.zeros(2, dtype=f64),
            ValueError,
            "Phi's output must be on the device of `w0`, cpu; got meta",
        ),
        (
            lambda w, c: (0.5 * w["a"] + c,),
            {"a": torch.zeros(2, dtype=f64)},
            ValueError,
            r"structure of `w0`: expected \{'a': \*\}, got \(\*,\)",
        ),
        (
            lambda w, c: {"a": 0.5 * w["a"] + c, "b": c},
            {"a": torch.zeros(2, dtype=f64)},
            ValueError,
            r"structure of `w0`: expected \{'a': \*\}, got \{'a': \*, 'b': \*\}",
        ),
    ],
    ids=["shape", "dtype", "device", "dict-vs-tuple", "extra-key"],
)
def test_phi_output_mismatch_is_named(phi, w0, error, message):
    with pytest.raises(error, match=message):
        fixed_point_layer(phi)(w0, C2)


def test_param_on_another_device_is_named():
    with pytest.raises(ValueError, match="params leaf 0 is on meta but `w0` is on cpu"):
        affine2()(torch.zeros(2, dtype=f64), torch.ones(2, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for a second real device")
def test_param_on_cuda_is_named():
    with pytest.raises(ValueError, match="params leaf 0 is on cuda"):
        affine2()(torch.zeros(2, dtype=f64), C2.cuda())


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_params_warn_or_raise(bad):
    c = torch.tensor([1.0, bad], dtype=f64)
    with pytest.warns(ConvergenceWarning, match="NaN or Inf .* at iteration 1"):
        affine2()(torch.zeros(2, dtype=f64), c)
    with pytest.raises(ConvergenceError, match="NaN or Inf"):
        affine2(on_failure="raise")(torch.zeros(2, dtype=f64), c)


@pytest.mark.parametrize("solver", [Anderson(), FixedPoint()], ids=["Anderson", "FixedPoint"])
def test_nonfinite_params_propagate_to_the_output(solver):
    c = torch.tensor([1.0, math.nan], dtype=f64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        w = affine2(solver=solver)(torch.zeros(2, dtype=f64), c)
    assert not torch.isfinite(w).all()


@pytest.mark.parametrize("solver", [Anderson(), FixedPoint()], ids=["Anderson", "FixedPoint"])
def test_nan_mid_solve_names_the_iteration(solver):
    calls = []

    def phi(w, c):
        calls.append(1)
        return A2 @ w + (math.nan if len(calls) == 3 else 1.0) * c

    with pytest.warns(ConvergenceWarning, match="NaN or Inf .* at iteration 3"):
        fixed_point_layer(phi, solver=solver)(torch.zeros(2, dtype=f64), C2)


def test_non_contractive_map():
    """``Phi(w) = 2 w + c``: the fixed point ``-c`` repels. FixedPoint diverges and warns;
    Anderson finds it, and its gradient ``dw*/dc = (1 - 2)^{-1} = -1`` is right."""
    c = C2.clone().requires_grad_()
    with pytest.warns(ConvergenceWarning, match="FixedPoint: did not converge"):
        fixed_point_layer(lambda w, c: 2 * w + c, solver=FixedPoint())(torch.zeros(2, dtype=f64), c)
    layer = fixed_point_layer(lambda w, c: 2 * w + c, solver=Anderson(tol=1e-10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = layer(torch.zeros(2, dtype=f64), c)
        w.sum().backward()
    torch.testing.assert_close(w.detach(), -C2, rtol=0, atol=1e-8)
    torch.testing.assert_close(c.grad, -torch.ones(2, dtype=f64), rtol=0, atol=1e-8)


def test_singular_system_for_direct():
    c = C2.clone().requires_grad_()
    layer = fixed_point_layer(lambda w, c: w + 0 * c, solver=lambda f, w0: w0, backward=Direct())
    w = layer(torch.zeros(2, dtype=f64), c)
    with pytest.raises(torch.linalg.LinAlgError, match="I - J is singular"):
        w.sum().backward()


def cg_backward(J: torch.Tensor) -> torch.Tensor:
    """Gradient error of CG on ``(I - J)^T x = g`` (the forward solved exactly)."""
    n = J.shape[0]
    eye = torch.eye(n, dtype=f64)
    c = torch.ones(n, dtype=f64, requires_grad=True)
    exact = torch.linalg.solve(eye - J, c.detach())
    layer = fixed_point_layer(lambda w, c: J @ w + c, solver=lambda f, w0: exact, backward=CG())
    g = torch.arange(1.0, n + 1, dtype=f64)
    (layer(torch.zeros(n, dtype=f64), c) @ g).backward()
    return (c.grad - torch.linalg.solve((eye - J).T, g)).abs().max()


def test_cg_on_an_indefinite_symmetric_system_warns():
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=f64))
    J = Q @ torch.diag(torch.tensor([0.5, -0.5, 1.5, 1.8], dtype=f64)) @ Q.T  # I - J indefinite
    with pytest.warns(ConvergenceWarning, match="not positive definite.*use `GMRES`"):
        error = cg_backward(J)
    assert error > 1  # the gradient returned is wrong; the warning is what says so


def test_cg_on_a_non_symmetric_system_warns():
    J = contraction(6, 0.7, 3)
    with pytest.warns(ConvergenceWarning, match="CG: did not converge.*`CG` needs a symmetric"):
        error = cg_backward(J)
    assert error > 1e-2


def test_closed_over_tensor_that_requires_grad_raises_in_backward():
    weight = torch.ones(2, dtype=f64, requires_grad=True)
    c = C2.clone().requires_grad_()
    w = fixed_point_layer(lambda w, c: A2 @ w + weight * c)(torch.zeros(2, dtype=f64), c)
    with pytest.raises(RuntimeError, match=r"1 tensor\(s\) that require grad but are not inputs"):
        w.sum().backward()


def test_closed_over_tensor_is_caught_when_no_param_requires_grad():
    weight = torch.ones(2, dtype=f64, requires_grad=True)
    layer = fixed_point_layer(lambda w: A2 @ w + weight)
    with pytest.raises(RuntimeError, match="not inputs of the layer"):
        w = layer(torch.zeros(2, dtype=f64))
        w.sum().backward()


def test_closure_error_gives_the_detach_hint_only_when_w_was_detached():
    weight = torch.ones(2, dtype=f64, requires_grad=True)  # the shape of w, but not w
    c = C2.clone().requires_grad_()
    w = fixed_point_layer(lambda w, c: A2 @ w + weight * c)(torch.zeros(2, dtype=f64), c)
    with pytest.raises(RuntimeError, match="not inputs of the layer") as caught:
        w.sum().backward()
    assert "do not detach w" not in str(caught.value)
