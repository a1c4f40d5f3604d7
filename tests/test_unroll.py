"""unroll(): Full, Recompute and Truncated against each other and finite differences; the
functional optimizers against torch.optim; memory of Recompute; errors."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_layers._functional_optim import adam, gradient_step, sgd
from implicit_layers._unroll import Full, Recompute, Truncated, unroll

f64 = torch.float64


def ridge(seed: int, n: int = 12, d: int = 3):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=generator, dtype=f64)
    truth = torch.randn(d, generator=generator, dtype=f64)
    y = X @ truth + 0.3 * torch.randn(n, generator=generator, dtype=f64)
    X_val = torch.randn(n, d, generator=generator, dtype=f64)
    return X, y, X_val, X_val @ truth, generator


def inner_loss_for(X, y):
    def inner_loss(params, lam):
        residual = X @ params["w"] + params["b"] - y
        return 0.5 * (residual**2).mean() + 0.5 * (lam["log_decay"].exp() * params["w"] ** 2).sum()

    return inner_loss


def optimizer_for(kind: str):
    """The inner optimizer as a function of lam: its lr and momentum (Adam's beta1) are learnt."""
    if kind == "sgd":
        return lambda lam: sgd(
            lam["lr"], momentum=lam["momentum"], dampening=0.1, weight_decay=0.01
        )
    if kind == "nesterov":
        return lambda lam: sgd(lam["lr"], momentum=lam["momentum"], nesterov=True)
    return lambda lam: adam(lam["lr"], betas=(lam["momentum"], 0.99), weight_decay=0.01)


def setup(kind: str, seed: int = 0, d: int = 3):
    X, y, X_val, y_val, generator = ridge(seed, d=d)
    lam = {
        "log_decay": (0.3 * torch.randn(d, generator=generator, dtype=f64) - 1).requires_grad_(),
        "lr": torch.tensor(0.05 if kind == "adam" else 0.2, dtype=f64, requires_grad=True),
        "momentum": torch.tensor(0.8, dtype=f64, requires_grad=True),
    }
    params = {
        "w": (0.1 * torch.randn(d, generator=generator, dtype=f64)).requires_grad_(),
        "b": torch.tensor(0.5, dtype=f64, requires_grad=True),
    }
    make = optimizer_for(kind)
    step = gradient_step(inner_loss_for(X, y), make)
    state = make(lam).init(params)

    def outer(params):
        return 0.5 * ((X_val @ params["w"] + params["b"] - y_val) ** 2).mean()

    return step, params, state, lam, outer


def hypergradients(kind: str, mode, steps: int, seed: int = 0):
    step, params, state, lam, outer = setup(kind, seed)
    (w_T, state_T) = unroll(step, (params, state), lam, steps, mode=mode)
    inputs = [lam["log_decay"], lam["lr"], lam["momentum"], params["w"], params["b"]]
    grads = torch.autograd.grad(outer(w_T), inputs, allow_unused=True)
    return w_T, state_T, grads


@pytest.mark.parametrize("kind", ["sgd", "nesterov", "adam"])
def test_recompute_and_truncated_equal_full(kind):
    steps = 12
    w_full, state_full, full = hypergradients(kind, Full(), steps)
    assert all(g is not None and torch.isfinite(g).all() for g in full)
    assert state_full.count == steps  # the int step count is carried through the iterate
    for mode in (Recompute(), Truncated(k=steps), Truncated(k=steps + 5)):
        w, state, grads = hypergradients(kind, mode, steps)
        assert state.count == steps
        for key in w_full:
            assert torch.equal(w[key], w_full[key])  # the same forward ops in every mode
        for g, ref in zip(grads, full):
            if isinstance(mode, Truncated):
                assert torch.equal(g, ref)  # k >= T is Full, step for step
            else:
                torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_truncated_is_full_through_the_last_k_steps(kind):
    steps, k = 10, 4
    _, _, grads = hypergradients(kind, Truncated(k=k), steps)
    assert grads[3] is None and grads[4] is None  # w_T does not depend on w0
    step, params, state, lam, outer = setup(kind)
    with torch.no_grad():
        middle = unroll(step, (params, state), lam, steps - k)
    w_T, _ = unroll(step, middle, lam, k, mode=Full())
    reference = torch.autograd.grad(outer(w_T), [lam["log_decay"], lam["lr"], lam["momentum"]])
    for g, ref in zip(grads[:3], reference):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)
    _, _, full = hypergradients(kind, Full(), steps)
    assert not torch.allclose(grads[1], full[1])  # truncation is biased


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from(["sgd", "nesterov", "adam"]),
    mode=st.sampled_from(["full", "recompute", "truncated"]),
    d=st.integers(1, 4),
    steps=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_gradients_match_finite_differences(kind, mode, d, steps, seed):
    """d w_T / d (weight decay, lr, momentum, w0) by central differences (torch gradcheck)."""
    mode = {"full": Full(), "recompute": Recompute(), "truncated": Truncated(k=steps)}[mode]
    step, params, state, lam, _ = setup(kind, seed, d)
    make = optimizer_for(kind)

    def w_T(log_decay, lr, momentum, w, b):
        lam = {"log_decay": log_decay, "lr": lr, "momentum": momentum}
        p = {"w": w, "b": b}
        out, _ = unroll(step, (p, make(lam).init(p)), lam, steps, mode=mode)
        return out["w"], out["b"]

    inputs = (lam["log_decay"], lam["lr"], lam["momentum"], params["w"], params["b"])
    assert torch.autograd.gradcheck(w_T, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_hyperparameters_get_gradients_matching_finite_differences():
    """The inner optimizer's own lr and momentum, through 30 steps, by central differences."""
    step, params, state, lam, outer = setup("sgd")

    def hyperobjective(lr, momentum, mode=None):
        values = dict(lam, lr=lr, momentum=momentum)
        w_T, _ = unroll(step, (params, state), values, 30, mode=mode or Full())
        return outer(w_T)

    for mode in (Full(), Recompute()):
        g_lr, g_mom = torch.autograd.grad(
            hyperobjective(lam["lr"], lam["momentum"], mode), [lam["lr"], lam["momentum"]]
        )
        h = 1e-6
        with torch.no_grad():
            fd_lr = (
                hyperobjective(lam["lr"] + h, lam["momentum"])
                - hyperobjective(lam["lr"] - h, lam["momentum"])
            ) / (2 * h)
            fd_mom = (
                hyperobjective(lam["lr"], lam["momentum"] + h)
                - hyperobjective(lam["lr"], lam["momentum"] - h)
            ) / (2 * h)
        torch.testing.assert_close(g_lr, fd_lr, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(g_mom, fd_mom, rtol=1e-6, atol=1e-9)


TORCH_CONFIGS = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, weight_decay=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("sgd", dict(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.01)),
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind, config", TORCH_CONFIGS)
def test_functional_optimizers_match_torch_optim(kind, config, dtype):
    generator = torch.Generator().manual_seed(1)
    start = {
        "a": torch.randn(4, 3, generator=generator, dtype=dtype),
        "b": (torch.randn(5, generator=generator, dtype=dtype),),
    }
    target = torch.randn(5, generator=generator, dtype=dtype)

    def loss(a, b):
        return ((torch.tanh(a) @ a[0] - b[:4]) ** 2).mean() + 0.5 * ((b - target) ** 2).sum()

    reference = [start["a"].clone().requires_grad_(), start["b"][0].clone().requires_grad_()]
    torch_opt = (torch.optim.SGD if kind == "sgd" else torch.optim.Adam)(reference, **config)
    opt = (sgd if kind == "sgd" else adam)(**config)
    params, state = start, opt.init(start)
    for _ in range(7):
        torch_opt.zero_grad()
        loss(*reference).backward()
        torch_opt.step()
        grads = {"a": torch.func.grad(loss, argnums=(0, 1))(params["a"], params["b"][0])}
        grads = {"a": grads["a"][0], "b": (grads["a"][1],)}
        params, state = opt.step(params, grads, state)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params["a"], reference[0].detach(), **tol)
    torch.testing.assert_close(params["b"][0], reference[1].detach(), **tol)
    assert state.count == 7


def test_adam_hypergradient_is_finite_where_a_gradient_is_exactly_zero():
    """A coordinate the loss never touches has v = 0: sqrt's infinite derivative must not leak."""
    lr = torch.tensor(0.1, dtype=f64, requires_grad=True)
    target = torch.tensor([1.0, 0.0], dtype=f64)
    step = gradient_step(lambda w, lam: ((w[:1] - target[:1]) ** 2).sum(), lambda lam: adam(lam))
    w0 = torch.zeros(2, dtype=f64)
    for mode in (Full(), Recompute()):
        w_T, _ = unroll(step, (w0, adam(0.1).init(w0)), lr, 5, mode=mode)
        (g,) = torch.autograd.grad(w_T.sum(), lr)
        assert torch.isfinite(g) and g > 0


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def saved_bytes(run, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes that autograd keeps for backward in the graph ``run()`` returns, one count a storage,
    not counting ``exclude`` (what graphs already freed had saved, such as those of the steps
    run without a graph, is not counted)."""
    live: weakref.WeakSet[_Saved] = weakref.WeakSet()

    def pack(tensor: torch.Tensor) -> _Saved:
        # the data only: holding an output with its grad_fn would keep its graph alive
        handle = _Saved(tensor.detach())
        live.add(handle)
        return handle

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda handle: handle.tensor):
        result = run()
    gc.collect()
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}
    for handle in list(live):
        storage = handle.tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
    del result
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_memory_of_each_mode(kind):
    """Recompute keeps exactly T copies of the iterate (params and optimizer state) and lam;
    Full keeps T step graphs, which here (n = 40 d samples) hold far more; Truncated(k) keeps
    k step graphs whatever T is."""
    n, d, steps = 2000, 50, 20
    generator = torch.Generator().manual_seed(0)
    X, y = torch.randn(n, d, generator=generator), torch.randn(n, generator=generator)
    lam = {"decay": torch.tensor(0.1), "lr": torch.tensor(0.01)}
    for value in lam.values():
        value.requires_grad_()
    make = optimizer_for("sgd") if kind == "sgd" else (lambda lam: adam(lam["lr"]))
    lam_all = dict(lam, momentum=torch.tensor(0.9, requires_grad=True))
    step = gradient_step(
        lambda w, lam: ((X @ w - y) ** 2).mean() + lam["decay"] * (w * w).sum(), make
    )
    w0 = torch.zeros(d)
    iterate = (w0, make(lam_all).init(w0))

    def kept(mode, steps=steps):
        return saved_bytes(lambda: unroll(step, iterate, lam_all, steps, mode=mode), (X, y))

    copies = 2 if kind == "sgd" else 3  # (w, buffer) or (w, exp_avg, exp_avg_sq)
    assert kept(Recompute()) == steps * copies * d * 4 + 3 * 4  # and lam's three scalars
    assert kept(Full()) > 10 * kept(Recompute())
    assert kept(Truncated(k=5)) == kept(Truncated(k=5), steps=2 * steps) < kept(Full()) / 3


def test_no_grad_runs_every_mode_without_a_graph():
    step, params, state, lam, _ = setup("adam")
    with torch.no_grad():
        results = [
            unroll(step, (params, state), lam, 5, mode=mode)[0]
            for mode in (Full(), Recompute(), Truncated(k=2))
        ]
    w_full, _, _ = hypergradients("adam", Full(), 5)
    for result in results:
        assert not result["w"].requires_grad
        torch.testing.assert_close(result["w"], w_full["w"].detach(), rtol=0, atol=0)


def test_full_gives_higher_derivatives_and_gradients_to_closures():
    lr = torch.tensor(0.1, dtype=f64, requires_grad=True)
    c = torch.tensor(1.0, dtype=f64, requires_grad=True)  # reached through a closure

    def step(w, lr, t):
        return w - lr * 2 * (w - c)

    w_T = unroll(step, torch.zeros(1, dtype=f64), lr, 10)  # c + (1 - 2 lr)^10 (0 - c)
    (g_lr,) = torch.autograd.grad(w_T.sum(), lr, create_graph=True)
    (h_lr,) = torch.autograd.grad(g_lr, lr)
    torch.testing.assert_close(h_lr, torch.tensor(-4 * 90 * 0.8**8, dtype=f64))
    (g_c,) = torch.autograd.grad(unroll(step, torch.zeros(1, dtype=f64), lr, 10).sum(), c)
    torch.testing.assert_close(g_c, torch.tensor(1 - 0.8**10, dtype=f64))
    with pytest.raises(ValueError, match="closure"):
        unroll(step, torch.zeros(1, dtype=f64), lr, 10, mode=Recompute())


def test_a_step_may_always_take_gradients():
    """Grad mode is on and w's floating-point leaves require grad in every call of step."""
    seen = []

    def step(w, lam, t):
        seen.append(torch.is_grad_enabled() and w.requires_grad)
        (g,) = torch.autograd.grad(lam * (w**2).sum(), w, create_graph=True)
        return w - 0.1 * g

    lam = torch.tensor(1.0, dtype=f64, requires_grad=True)
    w0 = torch.ones(2, dtype=f64)
    grads = []
    for mode in (Full(), Recompute(), Truncated(k=4)):
        grads.append(torch.autograd.grad(unroll(step, w0, lam, 4, mode=mode).sum(), lam)[0])
    with torch.no_grad():
        unroll(step, w0, lam, 4, mode=Recompute())
    assert all(seen) and len(seen) == 4 + 8 + 4 + 4
    # w_T = (1 - 0.2 lam)^4 w0, so d sum(w_T) / d lam = 2 * 4 (0.8)^3 (-0.2)
    for g in grads:
        torch.testing.assert_close(g, torch.tensor(-1.6 * 0.8**3, dtype=f64))


def test_plain_tensor_iterate_and_lam_without_tensors():
    def step(w, lam, t):  # lam holds no tensor: nothing to differentiate but w0
        return w * lam["scale"] + t

    w0 = torch.ones(3, dtype=f64, requires_grad=True)
    for mode in (Full(), Recompute(), Truncated(k=4)):
        w_T = unroll(step, w0, {"scale": 0.5}, 4, mode=mode)
        (g,) = torch.autograd.grad(w_T.sum(), w0)
        torch.testing.assert_close(g, torch.full((3,), 0.5**4, dtype=f64))
        # 1 -> 0.5 -> 0.25 + 1 -> 0.625 + 2 -> 1.3125 + 3
        torch.testing.assert_close(w_T.detach(), torch.full((3,), 4.3125, dtype=f64))


def test_bad_arguments_raise_clear_errors():
    def step(w, lam, t):
        return w - 0.1 * w

    w0 = torch.ones(2)
    for steps in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="`steps` must be a positive integer"):
            unroll(step, w0, None, steps)
    with pytest.raises(TypeError, match="`mode` must be Full"):
        unroll(step, w0, None, 3, mode="full")
    with pytest.raises(ValueError, match="`k` must be a positive integer"):
        Truncated(k=0)
    with pytest.raises(TypeError, match="keyword only"):
        Truncated(3)
    with pytest.raises(TypeError, match="Did you mean `k`"):
        Truncated(kk=3)
    with pytest.raises(TypeError, match="must be callable"):
        unroll(None, w0, None, 3)
    with pytest.raises(TypeError, match="at least one floating-point tensor"):
        unroll(step, torch.ones(2, dtype=torch.int64), None, 3)
    with pytest.raises(ValueError, match="structure of `w0`"):
        unroll(lambda w, lam, t: (w, w), w0, None, 3)
    with pytest.raises(ValueError, match=r"shape, dtype and device of `w0`.*t=0"):
        unroll(lambda w, lam, t: w.double(), w0, None, 3, mode=Recompute())

    for bad, error, match in [
        (dict(lr=-0.1), ValueError, "`lr` must lie in"),
        (dict(lr=0.1, momentum=-0.5), ValueError, "`momentum` must lie in"),
        (dict(lr=0.1, nesterov=True), ValueError, "Nesterov momentum needs"),
        (dict(lr=torch.ones(2)), ValueError, "must be a scalar"),
        (dict(lr=torch.tensor(1)), TypeError, "floating-point tensor"),
        (dict(lr="0.1"), TypeError, "float or a 0-dim tensor"),
    ]:
        with pytest.raises(error, match=match):
            sgd(**bad)
    with pytest.raises(ValueError, match=r"`betas\[1\]` must lie in \[0.0, 1.0\)"):
        adam(0.1, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="unknown option `moment`"):
        type(sgd(0.1))(lr=0.1, moment=0.9)
    with pytest.raises(ValueError, match="no momentum buffer"):
        sgd(0.1, momentum=0.9).step(w0, w0, sgd(0.1).init(w0))
    with pytest.raises(ValueError, match="structure of `params`"):
        sgd(0.1).step({"a": w0}, {"b": w0}, sgd(0.1).init({"a": w0}))
    with pytest.raises(TypeError, match="FunctionalOptimizer"):
        gradient_step(lambda w, lam: w.sum(), 0.1)
