"""SGDHD and AdamHD against a plain-Python float64 transcription of Baydin et al. (2018).

The reference below is written from the paper's formulas, element by element with Python floats;
it shares nothing with ``implicit_layers.optim`` but the problem it is run on.
"""

from __future__ import annotations

import copy
import io
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from implicit_layers.optim import SGDHD, AdamHD

f64 = torch.float64
STEPS = 10
SHAPES = [(3,), (2, 2), (4,), ()]  # four tensors, 12 coordinates


# --- the problem: f(x) = sum_j a_j (x_j - c_j)^2 / 2 + x_j^4 / 20 + s (sum_j x_j)^2 / 2 -------


def _coefficients(seed: int = 0):
    rng = random.Random(seed)
    sizes = [math.prod(shape) for shape in SHAPES]
    a = [[rng.uniform(0.5, 1.5) for _ in range(n)] for n in sizes]
    c = [[rng.uniform(-1.0, 1.0) for _ in range(n)] for n in sizes]
    x0 = [[rng.uniform(-1.0, 1.0) for _ in range(n)] for n in sizes]
    return a, c, x0


A, C, X0 = _coefficients()
COUPLING = 0.05


def reference_grad(x: list[list[float]]) -> list[list[float]]:
    total = sum(sum(xk) for xk in x)
    return [
        [a * (xi - c) + xi**3 / 5 + COUPLING * total for xi, a, c in zip(xk, ak, ck)]
        for xk, ak, ck in zip(x, A, C)
    ]


def torch_loss(tensors: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    a = torch.tensor([v for ak in A for v in ak], dtype=f64)
    c = torch.tensor([v for ck in C for v in ck], dtype=f64)
    return (0.5 * a * (flat - c) ** 2 + flat**4 / 20).sum() + 0.5 * COUPLING * flat.sum() ** 2


# --- the reference ------------------------------------------------------------------------------


def reference_lr(lr, opts, grads, previous):
    """alpha_t from alpha_{t-1}, the current grads g and previous directions d (None: zero)."""
    beta = opts["hypergrad_lr"]
    if all(d is None for d in previous):
        return lr
    g_dot_d = sum(gi * di for g, d in zip(grads, previous) if d is not None for gi, di in zip(g, d))
    if opts.get("multiplicative", False):
        g_norm = math.sqrt(sum(gi * gi for g in grads for gi in g))
        d_norm = math.sqrt(sum(di * di for d in previous if d is not None for di in d))
        if g_norm * d_norm > 0:
            lr = lr * (1 - beta * (-g_dot_d) / (g_norm * d_norm))
    else:
        lr = lr - beta * (-g_dot_d)  # h_t = g_t . du_{t-1}/dalpha = -g_t . d_{t-1}
    if opts.get("lr_bounds") is not None:
        low, high = opts["lr_bounds"]
        lr = min(max(lr, low), high)
    return lr


def reference_run(kind, groups, missing=frozenset()):
    """``groups``: [(tensor indices, options)]; ``missing``: {(step, tensor)} without a gradient.

    Returns the final coordinates and the learning rates after every step.
    """
    x = copy.deepcopy(X0)
    lrs = [opts["lr"] for _, opts in groups]
    direction, buf, m, v, count = {}, {}, {}, {}, {}
    history = []
    for t in range(STEPS):
        grad = reference_grad(x)
        for i, (indices, opts) in enumerate(groups):
            wd = opts.get("weight_decay", 0.0)
            present = [k for k in indices if (t, k) not in missing]
            for k in indices:
                if (t, k) in missing:
                    direction.pop(k, None)  # not moved: its du/dalpha is zero
            g = {k: [gi + wd * xi for gi, xi in zip(grad[k], x[k])] for k in present}
            lr = lrs[i] = reference_lr(
                lrs[i], opts, [g[k] for k in present], [direction.get(k) for k in present]
            )
            for k in present:
                if kind == "sgd":
                    mu = opts.get("momentum", 0.0)
                    tau = opts.get("dampening", 0.0)
                    if mu == 0:
                        d = g[k]
                    else:
                        if k in buf:
                            buf[k] = [mu * b + (1 - tau) * gi for b, gi in zip(buf[k], g[k])]
                        else:
                            buf[k] = list(g[k])
                        if opts.get("nesterov", False):
                            d = [gi + mu * b for gi, b in zip(g[k], buf[k])]
                        else:
                            d = list(buf[k])
                else:
                    b1, b2 = opts.get("betas", (0.9, 0.999))
                    eps = opts.get("eps", 1e-8)
                    if k not in count:
                        count[k], m[k], v[k] = 0, [0.0] * len(g[k]), [0.0] * len(g[k])
                    count[k] += 1
                    m[k] = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m[k], g[k])]
                    v[k] = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v[k], g[k])]
                    d = [
                        (mi / (1 - b1 ** count[k])) / (math.sqrt(vi / (1 - b2 ** count[k])) + eps)
                        for mi, vi in zip(m[k], v[k])
                    ]
                x[k] = [xi - lr * di for xi, di in zip(x[k], d)]
                direction[k] = d
        history.append(list(lrs))
    return x, history


def torch_run(cls, groups, missing=frozenset(), steps=STEPS):
    tensors = [torch.tensor(xk, dtype=f64).reshape(s).requires_grad_() for xk, s in zip(X0, SHAPES)]
    # every group names its lr and hypergrad_lr; the defaults passed here are overridden
    optimizer = cls([dict(params=[tensors[k] for k in ks], **opts) for ks, opts in groups], lr=0.0)
    history = []
    for t in range(steps):
        optimizer.zero_grad()
        torch_loss(tensors).backward()
        for k in range(len(tensors)):
            if (t, k) in missing:
                tensors[k].grad = None
        optimizer.step()
        history.append([group["lr"] for group in optimizer.param_groups])
    return [t.detach().reshape(-1).tolist() for t in tensors], history


def assert_matches_reference(kind, groups, missing=frozenset()):
    cls = SGDHD if kind == "sgd" else AdamHD
    x, history = torch_run(cls, groups, missing)
    x_ref, history_ref = reference_run(kind, groups, missing)
    for got, want in zip(history, history_ref):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    for got, want in zip(x, x_ref):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    return history


ALL = [0, 1, 2, 3]
SGD_CASES = {
    "plain": [(ALL, dict(lr=0.02, hypergrad_lr=2e-3))],
    "from zero": [(ALL, dict(lr=0.0, hypergrad_lr=2e-3))],
    "momentum, dampening": [(ALL, dict(lr=0.01, momentum=0.9, dampening=0.3, hypergrad_lr=1e-3))],
    "nesterov": [(ALL, dict(lr=0.01, momentum=0.8, nesterov=True, hypergrad_lr=1e-3))],
    "weight decay": [(ALL, dict(lr=0.01, weight_decay=0.1, momentum=0.5, hypergrad_lr=1e-3))],
    "groups": [
        ([0, 2], dict(lr=0.01, hypergrad_lr=1e-3)),
        ([1, 3], dict(lr=0.05, momentum=0.5, hypergrad_lr=5e-4)),
    ],
    "multiplicative": [(ALL, dict(lr=0.05, momentum=0.5, multiplicative=True, hypergrad_lr=0.2))],
    "bounds": [(ALL, dict(lr=0.05, hypergrad_lr=0.05, lr_bounds=(0.02, 0.08)))],
}
ADAM_CASES = {
    "plain": [(ALL, dict(lr=0.01, hypergrad_lr=1e-3))],
    "from zero": [(ALL, dict(lr=0.0, hypergrad_lr=1e-3))],
    "betas, eps, weight decay": [
        (ALL, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1, hypergrad_lr=1e-3))
    ],
    "groups": [
        ([0, 2], dict(lr=0.01, hypergrad_lr=1e-3)),
        ([1, 3], dict(lr=0.02, betas=(0.5, 0.9), hypergrad_lr=5e-4)),
    ],
    "multiplicative": [(ALL, dict(lr=0.02, multiplicative=True, hypergrad_lr=0.3))],
    "bounds": [(ALL, dict(lr=0.01, hypergrad_lr=0.01, lr_bounds=(0.0, 0.03)))],
}


@pytest.mark.parametrize("case", SGD_CASES)
def test_sgdhd_matches_reference(case):
    history = assert_matches_reference("sgd", SGD_CASES[case])
    assert history[0] == [opts["lr"] for _, opts in SGD_CASES[case]]  # h_1 = 0


@pytest.mark.parametrize("case", ADAM_CASES)
def test_adamhd_matches_reference(case):
    history = assert_matches_reference("adam", ADAM_CASES[case])
    assert history[0] == [opts["lr"] for _, opts in ADAM_CASES[case]]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_missing_gradients_match_reference(kind):
    """Tensor 1 has no gradient at steps 3 and 4, tensor 3 none before step 5."""
    missing = {(3, 1), (4, 1)} | {(t, 3) for t in range(5)}
    opts = dict(lr=0.01, hypergrad_lr=1e-3) | (dict(momentum=0.5) if kind == "sgd" else {})
    assert_matches_reference(kind, [(ALL, opts)], frozenset(missing))


def _sgd_options(draw):
    nesterov = draw(st.booleans())
    momentum = draw(st.sampled_from([0.5, 0.9] if nesterov else [0.0, 0.5, 0.9]))
    multiplicative = draw(st.booleans())
    return dict(
        lr=draw(st.floats(0.001 if multiplicative else 0.0, 0.05)),
        momentum=momentum,
        dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.2])),
        nesterov=nesterov,
        weight_decay=draw(st.sampled_from([0.0, 0.05])),
        hypergrad_lr=draw(st.floats(0.0, 0.3 if multiplicative else 2e-3)),
        multiplicative=multiplicative,
        lr_bounds=draw(st.sampled_from([None, (0.0, 0.1), (0.001, 0.05)])),
    )


def _adam_options(draw):
    multiplicative = draw(st.booleans())
    return dict(
        lr=draw(st.floats(0.001 if multiplicative else 0.0, 0.05)),
        betas=(draw(st.sampled_from([0.0, 0.5, 0.9])), draw(st.sampled_from([0.9, 0.999]))),
        eps=draw(st.sampled_from([1e-8, 1e-2])),
        weight_decay=draw(st.sampled_from([0.0, 0.05])),
        hypergrad_lr=draw(st.floats(0.0, 0.3 if multiplicative else 2e-3)),
        multiplicative=multiplicative,
        lr_bounds=draw(st.sampled_from([None, (0.0, 0.1), (0.001, 0.05)])),
    )


@st.composite
def configurations(draw):
    kind = draw(st.sampled_from(["sgd", "adam"]))
    options = _sgd_options if kind == "sgd" else _adam_options
    split = draw(st.sampled_from([[ALL], [[0, 1], [2, 3]], [[3], [0, 2], [1]]]))
    groups = [(indices, options(draw)) for indices in split]
    for _, opts in groups:  # the initial rate must lie within its bounds
        if opts["lr_bounds"] is not None:
            opts["lr"] = min(max(opts["lr"], opts["lr_bounds"][0]), opts["lr_bounds"][1])
    missing = draw(st.frozensets(st.tuples(st.integers(0, STEPS - 1), st.integers(0, 3))))
    return kind, groups, missing


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configurations())
def test_random_configurations_match_reference(configuration):
    assert_matches_reference(*configuration)


# --- torch.optim equivalence, state, closures, sparse and missing gradients --------------------


def _mlp_problem(seed=0, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(32, 5, generator=generator, dtype=dtype).to(device)
    y = torch.randint(0, 3, (32,), generator=generator).to(device)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype).to(device)
    return model, lambda m: nn.functional.cross_entropy(m(X), y)


def _train(model, optimizer, loss_fn, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model).backward()
        optimizer.step()


SGD_OPTIONS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=1e-2),
    dict(lr=0.1, momentum=0.9, nesterov=True),
]
ADAM_OPTIONS = [dict(lr=1e-2), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)]
PAIRS = [(SGDHD, torch.optim.SGD, o) for o in SGD_OPTIONS] + [
    (AdamHD, torch.optim.Adam, o) for o in ADAM_OPTIONS
]


@pytest.mark.parametrize("hd_cls, torch_cls, options", PAIRS)
def test_zero_hypergrad_lr_is_torch_optimizer_exactly(hd_cls, torch_cls, options):
    model, loss_fn = _mlp_problem()
    twin = copy.deepcopy(model)
    _train(model, hd_cls(model.parameters(), hypergrad_lr=0.0, **options), loss_fn, STEPS)
    _train(twin, torch_cls(twin.parameters(), **options), loss_fn, STEPS)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "cls, options",
    [
        (SGDHD, dict(lr=0.05, momentum=0.9, nesterov=True, hypergrad_lr=1e-2)),
        (SGDHD, dict(lr=0.05, multiplicative=True, hypergrad_lr=0.1, lr_bounds=(0.01, 1.0))),
        (AdamHD, dict(lr=1e-2, weight_decay=1e-3, hypergrad_lr=1e-4)),
    ],
)
def test_state_dict_round_trip_mid_training(cls, options):
    model, loss_fn = _mlp_problem()
    optimizer = cls(model.parameters(), **options)
    _train(model, optimizer, loss_fn, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    _train(model, optimizer, loss_fn, 5)

    buffer.seek(0)
    saved = torch.load(buffer)
    restored, _ = _mlp_problem(seed=1)  # other weights, overwritten by the checkpoint
    restored.load_state_dict(saved["model"])
    restored_optimizer = cls(restored.parameters(), **options)
    restored_optimizer.load_state_dict(saved["optimizer"])
    assert restored_optimizer.param_groups[0]["lr"] != options["lr"]  # the adapted rate came back
    _train(restored, restored_optimizer, loss_fn, 5)

    assert restored_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_closure(cls):
    model, loss_fn = _mlp_problem()
    twin = copy.deepcopy(model)
    optimizer = cls(model.parameters(), lr=1e-2, hypergrad_lr=1e-3)
    twin_optimizer = cls(twin.parameters(), lr=1e-2, hypergrad_lr=1e-3)
    for _ in range(3):

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model)
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        assert loss.item() == loss_fn(twin).item()
        _train(twin, twin_optimizer, loss_fn, 1)
    assert optimizer.param_groups[0]["lr"] == twin_optimizer.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_parameter_without_gradient_is_skipped(cls):
    model, loss_fn = _mlp_problem()
    twin = copy.deepcopy(model)
    unused = nn.Parameter(torch.ones(3))
    options = dict(lr=1e-2, hypergrad_lr=1e-3) | (dict(momentum=0.5) if cls is SGDHD else {})
    optimizer = cls([*model.parameters(), unused], **options)
    _train(model, optimizer, loss_fn, 5)
    twin_optimizer = cls(twin.parameters(), **options)
    _train(twin, twin_optimizer, loss_fn, 5)
    assert torch.equal(unused, torch.ones(3)) and unused not in optimizer.state
    assert optimizer.param_groups[0]["lr"] == twin_optimizer.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def _embedding_run(sparse, steps=6, **options):
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 3, sparse=sparse).double()
    optimizer = SGDHD(embedding.parameters(), **options)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(0, 10, (6,), generator=generator)  # repeated rows: uncoalesced
        optimizer.zero_grad()
        (embedding(index) ** 2).sum().backward()
        optimizer.step()
    return embedding.weight.detach(), optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(momentum=0.9, dampening=0.1),
        dict(momentum=0.9, nesterov=True),
        dict(multiplicative=True, hypergrad_lr=0.1),
    ],
)
def test_sgdhd_sparse_gradients_match_dense(options):
    options = dict(lr=0.05, hypergrad_lr=1e-2) | options
    weight, lr = _embedding_run(sparse=True, **options)
    dense_weight, dense_lr = _embedding_run(sparse=False, **options)
    assert lr == pytest.approx(dense_lr, rel=1e-12) and lr != 0.05
    torch.testing.assert_close(weight, dense_weight, rtol=1e-12, atol=1e-12)


def test_sparse_gradient_errors():
    with pytest.raises(RuntimeError, match="weight_decay"):
        _embedding_run(sparse=True, lr=0.1, weight_decay=1e-2)
    embedding = nn.Embedding(4, 2, sparse=True)
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="AdamHD does not support sparse"):
        AdamHD(embedding.parameters()).step()


# --- behaviour, options and errors ---------------------------------------------------------------


@pytest.mark.parametrize("cls, beta", [(SGDHD, 1e-2), (AdamHD, 1e-2)])
def test_learning_rate_rises_from_zero(cls, beta):
    w = torch.tensor([3.0, -2.0, 1.0], requires_grad=True)
    optimizer = cls([w], lr=0.0, hypergrad_lr=beta)
    for _ in range(50):
        optimizer.zero_grad()
        (w**2).sum().backward()
        optimizer.step()
    assert optimizer.param_groups[0]["lr"] > 0.05
    assert (w**2).sum() < 0.1 * 14


def test_bounds_clamp_and_groups_keep_their_own_rate():
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    optimizer = SGDHD(
        [dict(params=[a], lr_bounds=(0.0, 0.2)), dict(params=[b], lr=0.01, hypergrad_lr=0.0)],
        lr=0.1,
        hypergrad_lr=10.0,
    )
    for _ in range(5):
        optimizer.zero_grad()
        ((a**2).sum() + (b**2).sum()).backward()
        optimizer.step()
        assert 0.0 <= optimizer.param_groups[0]["lr"] <= 0.2
    assert optimizer.param_groups[0]["lr"] == 0.2 and optimizer.param_groups[1]["lr"] == 0.01


BAD_ARGUMENTS = [
    (SGDHD, dict(lr=-0.1), "`lr`"),
    (SGDHD, dict(lr=0.1, hypergrad_lr=-1.0), "`hypergrad_lr`"),
    (SGDHD, dict(lr=0.1, momentum=-0.5), "`momentum`"),
    (SGDHD, dict(lr=0.1, weight_decay=-1.0), "`weight_decay`"),
    (SGDHD, dict(lr=0.1, nesterov=True), "`momentum`.*nesterov"),
    (SGDHD, dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "`dampening`"),
    (SGDHD, dict(lr=0.1, lr_bounds=(0.5, 0.1)), "`lr_bounds`"),
    (SGDHD, dict(lr=0.1, lr_bounds=(-1.0, 0.1)), "`lr_bounds`"),
    (SGDHD, dict(lr=0.1, lr_bounds=(0.2, 0.5)), "`lr` must be within lr_bounds"),
    (SGDHD, dict(lr=0.0, multiplicative=True), "`lr` must be positive"),
    (SGDHD, dict(lr=0.1, multiplicative=True, hypergrad_lr=1.0), "`hypergrad_lr` must be below"),
    (AdamHD, dict(lr=-1e-3), "`lr`"),
    (AdamHD, dict(betas=(0.9, 1.0)), "`betas`"),
    (AdamHD, dict(betas=(-0.1, 0.9)), "`betas`"),
    (AdamHD, dict(eps=-1.0), "`eps`"),
    (AdamHD, dict(weight_decay=-1.0), "`weight_decay`"),
    (AdamHD, dict(hypergrad_lr=float("nan")), "`hypergrad_lr`"),
]


@pytest.mark.parametrize("cls, options, match", BAD_ARGUMENTS)
def test_bad_arguments_are_named(cls, options, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.zeros(2, requires_grad=True)], **options)


def test_bad_param_group_is_rejected_and_not_added():
    optimizer = AdamHD([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="`lr`"):
        optimizer.add_param_group(dict(params=[torch.zeros(3, requires_grad=True)], lr=-1.0))
    assert len(optimizer.param_groups) == 1
    with pytest.raises(ValueError, match="complex"):
        SGDHD([torch.zeros(2, dtype=torch.complex64, requires_grad=True)], lr=0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "cls, options",
    [
        (SGDHD, dict(lr=0.05, momentum=0.9, nesterov=True, hypergrad_lr=1e-2)),
        (AdamHD, dict(lr=1e-2, hypergrad_lr=1e-4)),
    ],
)
def test_cuda_matches_cpu(cls, options):
    model, loss_fn = _mlp_problem(dtype=f64)
    on_gpu, gpu_loss_fn = _mlp_problem(dtype=f64, device="cuda")
    optimizer = cls(model.parameters(), **options)
    gpu_optimizer = cls(on_gpu.parameters(), **options)
    _train(model, optimizer, loss_fn, STEPS)
    _train(on_gpu, gpu_optimizer, gpu_loss_fn, STEPS)
    assert gpu_optimizer.state[next(on_gpu.parameters())]["hd_direction"].is_cuda
    assert gpu_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    for p, q in zip(model.parameters(), on_gpu.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-10, atol=1e-10)
