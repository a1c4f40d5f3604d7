"""Fixed-point problems with known answers, for the gradient tests of ``implicit_layers``.

Three classes of maps ``Phi(w, *params)``, each with an oracle computed in float64 and
independently of the library (closed forms, dense solves, Newton and finite differences):

* ``affine``: ``Phi(w) = A w + B lam + c`` with a non-symmetric ``A``, ``||A||_2 = rho < 1``.
  For ``L = <G, w*>``: ``x = (I - A)^{-T} g``, ``dL/dlam = B^T x``, ``dL/dc = x``,
  ``dL/dA = x w*^T``.
* ``tanh``: ``Phi(w) = tanh(Wm w + U lam + b)`` with ``||Wm||_2 = rho < 1`` (so ``||J||_2 <= rho``).
  ``w*`` by Newton's method to machine precision; ``dL/dlam`` and ``dL/db`` by central finite
  differences of the re-solved ``w*``.
* ``ridge``: one gradient step of ridge regression with per-coordinate weight decay,
  ``f(w, lam) = ||X w - y||^2 / (2n) + 0.5 sum(exp(lam) w^2)``,
  ``Phi = w - a grad_w f`` (written out, no autograd inside) with ``0 < a < 2 / L``. Then
  ``I - J = a H`` is symmetric positive definite, ``H = X^T X / n + diag(exp lam)``,
  ``w* = H^{-1} X^T y / n``, and for a validation loss with gradient ``g`` at ``w*``,
  ``dL/dlam = -exp(lam) * w* * (H^{-1} g)``.

Every class is built in three layouts: ``vector`` (``w`` of shape ``(n,)``), ``batched``
(``w`` of shape ``(batch, n)``, the map acting on each row, ``lam`` shared by the rows), and
``tree`` (``w`` a dict or tuple of two tensors of different shapes, params a dict, plus a
non-tensor param passed through). Internally every map acts on a ``(batch, n)`` matrix of rows.

Data are drawn in float64, rounded to the problem's dtype and turned back into float64, so the
oracle is exact for the very numbers the layer sees: a float32 problem's expected gradient has
no error from rounding its data.

Besides the expected gradients, each problem carries *decoys*: the gradients that plausible
bugs would give (no linear solve at all, i.e. ``x = b``; the untransposed system
``(I - J) x = b``; the parameter derivative taken at ``w0`` instead of ``w*``). A test checks
that the expected answer is far from every decoy at its tolerance, so an assertion that passes
could not also have passed with that bug.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from implicit_layers.testing._problems import _contraction_matrix, _spectral

f64 = torch.float64

KINDS = ("affine", "tanh", "ridge")
LAYOUTS = ("vector", "batched", "tree")


@dataclass
class Problem:
    """One fixed-point problem, ready for ``layer(w0, *params)``, and its oracle.

    Attributes:
        name: class and layout, for messages.
        dtype: dtype of ``w0`` and of every floating-point param.
        phi: the map ``Phi(w, *params)`` in the layout's structure.
        w0: the initial guess (a tensor or a pytree of tensors).
        params: the params tuple for the layer (tensors, pytrees, non-tensors).
        inputs: the leaf tensors whose ``.grad`` the tests check, by name.
        loss: the outer loss ``L(w*)`` of the layer's output (a scalar tensor).
        flatten: the layer's output (in the layout's structure) as ``(batch, n)`` rows.
        w_star: the exact fixed point as float64 ``(batch, n)`` rows.
        grads: the exact ``dL/d input`` in float64, shaped like each input.
        scales: for each input, the natural size of an error in its gradient: the norm of the
            parameter Jacobian times the norm of the backward solution (see each builder). A
            gradient is compared as ``||got - expected|| <= rtol * scale``; this is the norm-wise
            bound a solve with relative residual ``rtol`` can promise, and it cannot blow up when
            an expected gradient is small by accident.
        decoys: for each plausible bug, the gradients it would give (a subset of ``inputs``).
        contraction: ``rho``, a bound on ``||J||_2`` at the fixed point (so also on the
            spectral radius of ``J``; Neumann converges like ``rho^k``).
        condition: a bound on the 2-norm condition number of ``I - J``.
        spd: ``I - J`` is symmetric positive definite, so CG applies.
        fd_step: the finite-difference step used for the oracle, or ``None`` (closed form).
    """

    name: str
    dtype: torch.dtype
    phi: Callable[..., Any]
    w0: Any
    params: tuple
    inputs: dict[str, torch.Tensor]
    loss: Callable[[Any], torch.Tensor]
    flatten: Callable[[Any], torch.Tensor]
    w_star: torch.Tensor
    grads: dict[str, torch.Tensor]
    scales: dict[str, float]
    decoys: dict[str, dict[str, torch.Tensor]]
    contraction: float
    condition: float
    spd: bool
    fd_step: float | None = None

    def error(self, name: str, got: torch.Tensor | None) -> float:
        """``||got - expected|| / scale`` for input ``name`` (``inf`` if ``got`` is ``None``)."""
        if got is None:
            return math.inf
        diff = got.detach().to(f64) - self.grads[name]
        return float(torch.linalg.vector_norm(diff)) / self.scales[name]

    def decoy_margin(self) -> float:
        """How far the nearest decoy is from the oracle, relative to the scales.

        A decoy is caught when any one of its gradients is off, so its distance is the largest
        over inputs; the margin is the smallest such distance over the decoys.
        """
        distances = [
            max(
                float(torch.linalg.vector_norm(grad - self.grads[name])) / self.scales[name]
                for name, grad in decoy.items()
            )
            for decoy in self.decoys.values()
        ]
        return min(distances, default=math.inf)

    def w_error(self, w: Any) -> float:
        """Relative error of the layer's output against the exact fixed point."""
        rows = self.flatten(w).detach().to(f64)
        return float(
            torch.linalg.vector_norm(rows - self.w_star) / torch.linalg.vector_norm(self.w_star)
        )


# ---------------------------------------------------------------------------------------------
# Helpers


def _rounded(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` as the dtype would store it, back in float64 (the oracle's exact input)."""
    return tensor.to(dtype).to(f64)


def _norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor))


@dataclass
class _Core:
    """A map on ``(batch, n)`` rows, its named params and its oracle, before a layout.

    ``param_names`` lists the params in the order ``core_phi`` takes them after the rows;
    ``row_params`` are those with one row per batch element (shape ``(batch, n)``; a vector
    layout gives them shape ``(n,)``). ``constant`` is a non-tensor param passed last (or
    ``None``).
    """

    kind: str
    core_phi: Callable[..., torch.Tensor]
    param_names: tuple[str, ...]
    values: dict[str, torch.Tensor]  # float64, already rounded to the dtype
    requires_grad: tuple[str, ...]
    row_params: tuple[str, ...]
    constant: Any
    w0: torch.Tensor  # (batch, n) float64
    w_star: torch.Tensor  # (batch, n) float64
    loss_rows: Callable[[torch.Tensor], torch.Tensor]
    grads: dict[str, torch.Tensor]  # in the (batch, n) convention for row params
    scales: dict[str, float]
    decoys: dict[str, dict[str, torch.Tensor]]
    contraction: float
    condition: float
    spd: bool
    fd_step: float | None = None


# ---------------------------------------------------------------------------------------------
# Class 1: contractive affine maps


def affine_phi(W, A, B, lam, C):
    """``w <- A w + B lam + c`` on each row of ``W``."""
    return W @ A.T + lam @ B.T + C


def _affine_core(seed: int, n: int, m: int, batch: int, rho: float, dtype: torch.dtype) -> _Core:
    g = torch.Generator().manual_seed(seed)
    A = _rounded(_contraction_matrix(n, rho, g), dtype)
    B = _rounded(torch.randn(n, m, generator=g, dtype=f64), dtype)
    lam = _rounded(torch.randn(m, generator=g, dtype=f64), dtype)
    C = _rounded(torch.randn(batch, n, generator=g, dtype=f64), dtype)
    W0 = _rounded(torch.randn(batch, n, generator=g, dtype=f64), dtype)
    G = _rounded(torch.randn(batch, n, generator=g, dtype=f64), dtype)
    rho = _spectral(A)  # after rounding
    eye = torch.eye(n, dtype=f64)
    w_star = torch.linalg.solve(eye - A, (C + lam @ B.T).T).T
    # The loss is linear, L = sum(G * W), so dL/dW* = G and the backward solution is, per row,
    # x_i = (I - A)^{-T} g_i.
    X = torch.linalg.solve((eye - A).T, G.T).T

    def grads_from(X, W):
        return {"A": X.T @ W, "lam": X.sum(0) @ B, "C": X}

    x_norm = _norm(X)
    return _Core(
        kind="affine",
        core_phi=affine_phi,
        param_names=("A", "B", "lam", "C"),
        values={"A": A, "B": B, "lam": lam, "C": C},
        requires_grad=("A", "lam", "C"),
        row_params=("C",),
        constant=None,
        w0=W0,
        w_star=w_star,
        loss_rows=lambda W: (G.to(W.dtype) * W).sum(),
        grads=grads_from(X, w_star),
        # Errors: dX (the backward solve) and dW (the forward solve) enter as
        # dA = dX^T W + X^T dW, dlam = B^T sum(dX), dC = dX.
        scales={
            "A": x_norm * _norm(w_star),
            "lam": _spectral(B) * math.sqrt(batch) * x_norm,
            "C": x_norm,
        },
        decoys={
            "no solve (x = b)": grads_from(G, w_star),
            "untransposed (I - J) x = b": grads_from(torch.linalg.solve(eye - A, G.T).T, w_star),
            "dPhi/dparams at w0": {"A": X.T @ W0},
        },
        contraction=rho,
        condition=(1 + rho) / (1 - rho),
        spd=False,
    )


# ---------------------------------------------------------------------------------------------
# Class 2: contractive tanh maps


def tanh_phi(W, Wm, U, lam, Bias):
    """``w <- tanh(Wm w + U lam + b)`` on each row of ``W``."""
    return torch.tanh(W @ Wm.T + lam @ U.T + Bias)


def newton_fixed_point(
    phi_rows: Callable[[torch.Tensor], torch.Tensor],
    jacobians: Callable[[torch.Tensor], torch.Tensor],
    w: torch.Tensor,
    *,
    picard: int = 0,
) -> torch.Tensor:
    """Solve ``w = phi(w)`` row by row in float64 to machine precision: ``picard`` plain steps,
    then Newton on ``w - phi(w)`` with the dense per-row Jacobians ``(batch, n, n)``."""
    for _ in range(picard):
        w = phi_rows(w)
    eye = torch.eye(w.shape[-1], dtype=f64)
    for _ in range(50):
        residual = phi_rows(w) - w
        step = torch.linalg.solve(eye - jacobians(w), residual.unsqueeze(-1)).squeeze(-1)
        w = w + step
        if _norm(step) <= 1e-15 * max(_norm(w), 1e-300):
            break
    final = _norm(phi_rows(w) - w)
    if not final <= 1e-14 * max(_norm(w), 1.0):
        raise AssertionError(f"the reference Newton solve did not converge: residual {final:.3e}")
    return w


def _tanh_core(seed: int, n: int, m: int, batch: int, rho: float, dtype: torch.dtype) -> _Core:
    g = torch.Generator().manual_seed(seed)
    Wm = _rounded(_contraction_matrix(n, rho, g), dtype)
    # Pre-activations of size ~0.5 keep tanh' = 1 - w*^2 mostly above 1/2: a saturated map would
    # have J ~ 0, where a backward that skips the solve would pass unnoticed.
    U = _rounded(0.4 * torch.randn(n, m, generator=g, dtype=f64) / math.sqrt(m), dtype)
    lam = _rounded(torch.randn(m, generator=g, dtype=f64), dtype)
    Bias = _rounded(0.3 * torch.randn(batch, n, generator=g, dtype=f64), dtype)
    W0 = _rounded(torch.randn(batch, n, generator=g, dtype=f64), dtype)
    G = _rounded(torch.randn(batch, n, generator=g, dtype=f64), dtype)
    rho = _spectral(Wm)  # J = diag(1 - w*^2) Wm, so ||J||_2 <= ||Wm||_2

    def solve(lam, Bias, start):
        def phi_rows(W):
            return tanh_phi(W, Wm, U, lam, Bias)

        def jacobians(W):
            slope = 1 - phi_rows(W) ** 2  # (batch, n)
            return slope.unsqueeze(-1) * Wm  # diag(slope_i) Wm per row

        return newton_fixed_point(phi_rows, jacobians, start, picard=20 if start is W0 else 0)

    w_star = solve(lam, Bias, W0)

    def loss_rows(W):
        return (G.to(W.dtype) * W).sum()

    # Central differences of the re-solved w*. Newton from w* (an O(h) start) converges in two or
    # three steps to machine precision, so L(p +- h) carries an error ~1e-16 * |G| |w*|; over
    # 2h that is ~1e-10 of the gradient's scale, and the truncation error h^2 L''' / 6 is
    # ~1e-12 * L''' for h = 1e-6. The oracle is thus good to ~1e-9 relative; the tests allow
    # 1e-6.
    h = 1e-6

    def fd_gradient(which: str) -> torch.Tensor:
        base = {"lam": lam, "Bias": Bias}
        flat = base[which].reshape(-1)
        out = torch.empty_like(flat)
        for i in range(flat.numel()):
            values = []
            for sign in (1.0, -1.0):
                bumped = flat.clone()
                bumped[i] += sign * h
                p = dict(base, **{which: bumped.view_as(base[which])})
                values.append(float(loss_rows(solve(p["lam"], p["Bias"], w_star))))
            out[i] = (values[0] - values[1]) / (2 * h)
        return out.view_as(base[which])

    # The implicit-function-theorem ingredients, for the scales and the decoys (not the oracle).
    eye = torch.eye(n, dtype=f64)
    slope = 1 - w_star**2  # tanh' at the fixed point = 1 - w*^2
    J = slope.unsqueeze(-1) * Wm  # (batch, n, n)
    X = torch.linalg.solve((eye - J).transpose(-1, -2), G.unsqueeze(-1)).squeeze(-1)

    def grads_from(X):
        V = slope * X  # (dPhi/dpre-activation)^T x per row
        return {"lam": V.sum(0) @ U, "Bias": V}

    x_norm = _norm(X)
    return _Core(
        kind="tanh",
        core_phi=tanh_phi,
        param_names=("Wm", "U", "lam", "Bias"),
        values={"Wm": Wm, "U": U, "lam": lam, "Bias": Bias},
        requires_grad=("lam", "Bias"),
        row_params=("Bias",),
        constant=None,
        w0=W0,
        w_star=w_star,
        loss_rows=loss_rows,
        grads={"lam": fd_gradient("lam"), "Bias": fd_gradient("Bias")},
        # dlam = U^T sum_i D_i dx_i, dBias = D dX with 0 < D <= 1.
        scales={"lam": _spectral(U) * math.sqrt(batch) * x_norm, "Bias": x_norm},
        decoys={
            "no solve (x = b)": grads_from(G),
            "untransposed (I - J) x = b": grads_from(
                torch.linalg.solve(eye - J, G.unsqueeze(-1)).squeeze(-1)
            ),
        },
        contraction=rho,
        condition=(1 + rho) / (1 - rho),
        spd=False,
        fd_step=h,
    )


def tanh_ift_gradient(core: _Core) -> dict[str, torch.Tensor]:
    """The tanh class's gradient from the implicit function theorem with dense float64 solves:
    an independent check of the finite-difference oracle."""
    v = core.values
    n = v["Wm"].shape[0]
    slope = 1 - core.w_star**2
    J = slope.unsqueeze(-1) * v["Wm"]
    G = torch.func.grad(core.loss_rows)(core.w_star)
    eye = torch.eye(n, dtype=f64)
    X = torch.linalg.solve((eye - J).transpose(-1, -2), G.unsqueeze(-1)).squeeze(-1)
    V = slope * X
    return {"lam": V.sum(0) @ v["U"], "Bias": V}


# ---------------------------------------------------------------------------------------------
# Class 3: gradient steps of ridge regression with per-coordinate weight decay


def ridge_phi(W, lam, data, a):
    """One gradient step ``w <- w - a grad_w f(w, lam)`` on each row of ``W``, with
    ``f = ||X w - y||^2 / (2n) + 0.5 sum(exp(lam) w^2)`` and ``data = (X, Y)``, ``Y`` holding
    one target column per row of ``W``. The gradient is written out: no autograd inside."""
    X, Y = data
    grad = (W @ X.T - Y.T) @ X / X.shape[0] + torch.exp(lam) * W
    return W - a * grad


def _ridge_core(
    seed: int, d: int, extra: int, batch: int, step_fraction: float, dtype: torch.dtype
) -> _Core:
    g = torch.Generator().manual_seed(seed)
    samples = 2 * d + extra
    X = _rounded(torch.randn(samples, d, generator=g, dtype=f64), dtype)
    truth = torch.randn(d, batch, generator=g, dtype=f64)
    Y = _rounded(X @ truth + 0.3 * torch.randn(samples, batch, generator=g, dtype=f64), dtype)
    Xv = _rounded(torch.randn(samples, d, generator=g, dtype=f64), dtype)
    Yv = _rounded(Xv @ truth + 0.3 * torch.randn(samples, batch, generator=g, dtype=f64), dtype)
    lam = _rounded(2 * torch.rand(d, generator=g, dtype=f64) - 1, dtype)  # decay in [1/e, e]
    W0 = _rounded(torch.randn(batch, d, generator=g, dtype=f64), dtype)
    H = X.T @ X / samples + torch.diag(torch.exp(lam))
    eigenvalues = torch.linalg.eigvalsh(H)
    mu, big = float(eigenvalues[0]), float(eigenvalues[-1])
    # 0 < a < 2 / L. The python float a is what Phi sees, in either dtype.
    a = step_fraction * 2 / big
    # J = I - a H, with eigenvalues 1 - a * eig(H) in (-1, 1).
    rho = max(abs(1 - a * mu), abs(1 - a * big))
    w_star = torch.linalg.solve(H, X.T @ Y / samples).T  # (batch, d)

    def loss_rows(W):
        residual = W @ Xv.T.to(W.dtype) - Yv.T.to(W.dtype)
        return (residual**2).sum() / (2 * samples)

    G = (w_star @ Xv.T - Yv.T) @ Xv / samples  # dL/dW at W*
    # (I - J)^T x = g with I - J = a H gives x = H^{-1} g / a, and
    # (dPhi/dlam)^T x = -a exp(lam) * sum_rows(w * x) = -exp(lam) * sum_rows(w * H^{-1} g).
    Z = torch.linalg.solve(H, G.T).T
    decay = torch.exp(lam)
    return _Core(
        kind="ridge",
        core_phi=ridge_phi,
        param_names=("lam", "data"),
        values={"lam": lam, "X": X, "Y": Y},
        requires_grad=("lam",),
        row_params=(),
        constant=a,
        w0=W0,
        w_star=w_star,
        loss_rows=loss_rows,
        grads={"lam": -decay * (w_star * Z).sum(0)},
        # dlam = -exp(lam) * sum_rows(w* dz + dw z): bounded by max(exp lam) (|w*| |dZ| + ...).
        scales={"lam": float(decay.max()) * _norm(w_star) * _norm(Z)},
        decoys={
            "no solve (x = b)": {"lam": -a * decay * (w_star * G).sum(0)},
            "dPhi/dparams at w0": {"lam": -decay * (W0 * Z).sum(0)},
        },
        contraction=rho,
        condition=big / mu,
        spd=True,
    )


# ---------------------------------------------------------------------------------------------
# Layouts: how the rows and params are presented to the layer


def _leaf(value: torch.Tensor, dtype: torch.dtype, requires_grad: bool) -> torch.Tensor:
    return value.to(dtype).clone().requires_grad_(requires_grad)


def _split_sizes(n: int) -> tuple[int, int, int]:
    """``n = head + rows * cols`` with ``head >= 1``, ``rows = 2``, ``cols >= 1``."""
    cols = (n - 1) // 2
    return n - 2 * cols, 2, cols


def _with_layout(core: _Core, layout: str, container: str, dtype: torch.dtype) -> Problem:
    batch, n = core.w0.shape
    inputs: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, value in core.values.items():
        if layout != "batched" and name in core.row_params:
            value = value[0]
        tensor = _leaf(value, dtype, name in core.requires_grad)
        tensors[name] = tensor
        if name in core.requires_grad:
            inputs[name] = tensor

    def core_args(values: dict[str, Any]) -> list[Any]:
        return [values[name] for name in core.param_names]

    def rows_params(values: dict[str, Any]) -> dict[str, Any]:
        """Row params as ``(batch, n)``, whatever the layout gave."""
        out = dict(values)
        for name in core.row_params:
            if out[name].ndim == 1:
                out[name] = out[name].unsqueeze(0)
        return out

    constant = core.constant
    if layout == "tree":
        if batch != 1:
            raise ValueError("the tree layout is unbatched")
        head, rows, cols = _split_sizes(n)

        def to_tree(vector: torch.Tensor) -> Any:
            first, rest = vector[:head], vector[head:].reshape(rows, cols)
            return {"head": first, "tail": rest} if container == "dict" else (first, rest)

        def from_tree(tree: Any) -> torch.Tensor:
            first, rest = (tree["head"], tree["tail"]) if container == "dict" else tree
            return torch.cat([first.reshape(-1), rest.reshape(-1)]).unsqueeze(0)

        # The params come as one dict (nested for ridge's data), then the shape as a tuple of
        # python ints and, for ridge, the step size as a python float: non-tensor params that
        # the layer must pass through unchanged.
        shape = (head, rows, cols)

        def phi(w, p, split, *extra):
            if split != shape:
                raise AssertionError(f"the non-tensor param arrived as {split!r}")
            values = rows_params(dict(p))
            out = core.core_phi(from_tree(w), *core_args(values), *extra)
            return to_tree(out[0])

        p: dict[str, Any] = {k: v for k, v in tensors.items() if k not in ("X", "Y")}
        if "data" in core.param_names:
            p["data"] = (tensors["X"], tensors["Y"])
        params: tuple = (p, shape) + (() if constant is None else (constant,))
        w0: Any = to_tree(core.w0[0].to(dtype))
        flatten = from_tree
    else:

        def to_layout(W: torch.Tensor) -> torch.Tensor:
            return W if layout == "batched" else W[0]

        def from_layout(w: torch.Tensor) -> torch.Tensor:
            return w if layout == "batched" else w.unsqueeze(0)

        def phi(w, *args):
            values = dict(zip(core.param_names, args))
            extra = args[len(core.param_names) :]
            out = core.core_phi(from_layout(w), *core_args(rows_params(values)), *extra)
            return to_layout(out)

        ordered = []
        for name in core.param_names:
            ordered.append((tensors["X"], tensors["Y"]) if name == "data" else tensors[name])
        params = tuple(ordered) + (() if constant is None else (constant,))
        w0 = to_layout(core.w0.to(dtype)).clone()
        flatten = from_layout

    def shaped(name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad.reshape(inputs[name].shape)

    return Problem(
        name=f"{core.kind}/{layout}" + (f"/{container}" if layout == "tree" else ""),
        dtype=dtype,
        phi=phi,
        w0=w0,
        params=params,
        inputs=inputs,
        loss=lambda w: core.loss_rows(flatten(w)),
        flatten=flatten,
        w_star=core.w_star,
        grads={k: shaped(k, v) for k, v in core.grads.items()},
        scales=core.scales,
        decoys={
            bug: {k: shaped(k, v) for k, v in grads.items()} for bug, grads in core.decoys.items()
        },
        contraction=core.contraction,
        condition=core.condition,
        spd=core.spd,
        fd_step=core.fd_step,
    )


# ---------------------------------------------------------------------------------------------
# Strategies


def build_core(kind: str, seed: int, n: int, m: int, batch: int, knob: float, dtype) -> _Core:
    """The core of class ``kind``; ``knob`` is the contraction factor (affine, tanh) or the step
    size as a fraction of ``2 / L`` (ridge), ``m`` the size of ``lam`` (ridge: extra samples)."""
    if kind == "affine":
        return _affine_core(seed, n, m, batch, knob, dtype)
    if kind == "tanh":
        return _tanh_core(seed, n, m, batch, knob, dtype)
    if kind == "ridge":
        return _ridge_core(seed, n, m, batch, knob, dtype)
    raise ValueError(kind)


@st.composite
def problems(
    draw,
    kind: str,
    dtype: torch.dtype,
    layouts: tuple[str, ...] = LAYOUTS,
    max_size: int = 8,
) -> Problem:
    """A problem of class ``kind`` in ``dtype``, in one of ``layouts``.

    Sizes stay small (the tests run every solver on every class); the contraction factor
    ``rho`` of the affine and tanh maps is drawn in [0.1, 0.9], so ``cond(I - J)`` is at most
    19; the ridge step size ``a`` is drawn in [0.5, 0.95] times ``2 / L``, so
    ``rho = max(1 - a mu, a L - 1) <= max(1 - 1 / kappa, 0.9)``, with ``kappa = L / mu`` (about
    15 at the very most; below 8 in 1500 draws).
    """
    layout = draw(st.sampled_from(layouts))
    container = draw(st.sampled_from(("dict", "tuple")))
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(3 if layout == "tree" else 2, max_size))
    batch = draw(st.integers(2, 3)) if layout == "batched" else 1
    if kind == "ridge":
        m = draw(st.integers(0, 8))
        knob = draw(st.floats(0.5, 0.95))
    else:
        m = draw(st.integers(2, 4))
        knob = draw(st.floats(0.1, 0.9))
    core = build_core(kind, seed, n, m, batch, knob, dtype)
    return _with_layout(core, layout, container, dtype)
