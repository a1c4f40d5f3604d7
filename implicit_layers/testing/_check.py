"""``check_gradients``: a layer's backward against finite differences of its re-solved forward."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._layers import ImplicitLayer
from .._records import SolveRecord
from ._report import DirectionCheck, GradientCheck, GradientCheckError
from ._subject import Subject, floating_leaves, needs_cast
from ._tolerance import (
    backward_accuracy,
    default_eps,
    difference_atol,
    forward_accuracy,
    gradient_rtol,
    roundoff,
    value_noise,
)

__all__ = ["check_gradients"]

f64 = torch.float64


def check_gradients(
    fn: Callable[..., Any],
    inputs: Any,
    *,
    directions: int = 3,
    seed: int = 0,
    eps: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    condition: float = 10.0,
    layers: Sequence[ImplicitLayer] | None = None,
    promote: bool = True,
) -> GradientCheck:
    """Check ``fn``'s autograd gradient against central differences of re-solved outputs.

    ``fn`` is a layer (``fixed_point_layer``, ``argmin_layer``), an ``nn.Module`` holding layers,
    or a plain function that calls layers (pass them as ``layers=``, so that their records can
    be read); it is called as ``fn(*inputs)``. The checked parameters ``p`` are the floating
    tensors of ``inputs`` (a tuple of positional arguments, pytrees allowed) that require grad,
    and the parameters that require grad of an ``nn.Module`` ``fn``, or of the ``layers``.

    With a seeded random ``v`` (``||v|| = 1``) the outer loss is ``L(p) = <v, fn(p)>`` and
    ``g = dL/dp`` comes from one backward pass. For each of ``directions`` random unit directions
    ``d`` the check compares ``<g, d>`` with the Richardson extrapolation
    ``(4 D(eps) - D(2 eps)) / 3`` of ``D(h) = (L(p + h d) - L(p - h d)) / (2 h)``, where every
    ``L`` is a fresh forward solve: 4 solves per direction, whatever the number of parameters.

    Tolerance (derived in ``implicit_layers.testing._tolerance``): a solve with relative
    residual ``tau`` of a system with condition number ``kappa`` (``condition``: of ``I - J``, or
    of the Hessian) gives a relative gradient error of about ``kappa tau``. A direction passes
    when ``|<g, d> - FD| <= rtol ||g|| + atol + truncation``, with

    * ``rtol = 10 kappa (tau_f + tau_b + sqrt(n + m) u)``: the solves' error in ``g``;
    * ``atol = 15 delta / eps``: the error ``delta = (sqrt(n) u + kappa tau_f) ||fn(p)||`` of
      each re-solved value, amplified by the difference (rounding is ``O(u / eps)``); ``delta``
      is raised to the noise the values show, if larger (a fourth difference measures it);
    * ``truncation = |D(eps) - D(2 eps)| / 3``: the ``O(eps^2)`` error, measured.

    ``u`` is the dtype's machine epsilon, ``n`` and ``m`` the sizes of the output and of ``p``.
    ``tau_f`` and ``tau_b`` are the solvers' tolerances, read from the layers' records
    ``last_forward`` and ``last_backward`` (for a plain function pass its layers as ``layers=``,
    or ``1e-6`` is assumed): a forward that stopped short of its tolerance widens the check, a
    backward that did fails it. The default
    ``eps = (sqrt(n) u + kappa tau_f)^(1/3)`` balances truncation against noise. ``rtol``,
    ``atol`` and ``eps`` override the derived values.

    With ``promote=True`` the check runs in float64 when the inputs or modules are float32
    (finite differences in float32 resolve only about ``u^(2/3) ~ 2e-5`` of the gradient at
    best): the inputs are cast copies, an ``nn.Module`` ``fn`` is deep-copied and cast, and the
    ``layers`` of a plain function are cast in place for the duration of the check, their
    original tensors put back afterwards. If ``fn`` cannot run in float64 (it closes over
    float32 tensors), the check runs in the given dtypes, with their tolerance, and the result
    says why.

    Returns the :class:`GradientCheck`; raises :class:`GradientCheckError` (an
    ``AssertionError``) with a per-direction report when a direction disagrees, or when the
    tolerance exceeds 10% of ``||g||`` (the check could not tell a wrong gradient).

    >>> from implicit_layers.testing import check_gradients
    >>> A = torch.tensor([[0.5, 0.2], [-0.1, 0.4]], dtype=torch.float64)
    >>> layer = fixed_point_layer(lambda w, c: torch.tanh(A @ w + c),
    ...                           solver=Anderson(tol=1e-12), backward=GMRES(tol=1e-12))
    >>> c = torch.tensor([0.3, -0.2], requires_grad=True)  # float32: checked in float64
    >>> result = check_gradients(layer, (torch.zeros(2), c), condition=3.0)
    >>> result.passed, result.dtype
    (True, torch.float64)
    """
    args = _as_args(inputs)
    _validate(directions, eps, rtol, atol, condition)
    options: dict[str, Any] = dict(
        directions=directions, eps=eps, rtol=rtol, atol=atol, condition=condition
    )
    if not Subject(fn, args, layers, None).tensors:
        raise ValueError(
            "no input of `fn` requires grad: set requires_grad=True on the tensors to check."
        )
    failure = None
    if promote and needs_cast(fn, args, layers, f64):
        try:
            with Subject(fn, args, layers, f64) as subject:
                base = _Base(subject, seed)
                if any(y.dtype != f64 for y in base.outputs):
                    raise TypeError("the output is not float64")
                return _compare(subject, base, promoted=True, failure=None, **options)
        except GradientCheckError:
            raise
        except Exception as error:  # whatever stops the float64 run: fall back, and say why
            lines = str(error).splitlines()
            failure = f"{type(error).__name__}: {lines[0] if lines else ''}"
    with Subject(fn, args, layers, None) as subject:
        base = _Base(subject, seed)
        return _compare(subject, base, promoted=False, failure=failure, **options)


class _Base:
    """The autograd pass: outputs, the projection ``v``, the gradient ``g`` and the records."""

    def __init__(self, subject: Subject, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        output = subject()
        self.outputs = floating_leaves(output)
        if not self.outputs:
            raise TypeError("`fn` must return a floating-point tensor or a pytree of them.")
        self.forward = subject.records("forward")
        draws = [torch.randn(y.shape, generator=self.generator, dtype=f64) for y in self.outputs]
        norm = math.sqrt(sum(float(d.square().sum()) for d in draws)) or 1.0
        projections = [(d / norm).to(y.dtype).to(y.device) for d, y in zip(draws, self.outputs)]
        self.v = [p.to(f64) for p in projections]  # exactly what autograd sees
        loss = sum((p * y).sum() for p, y in zip(projections, self.outputs))
        grads: Sequence[torch.Tensor | None] = [None] * len(subject.tensors)
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            grads = torch.autograd.grad(loss, subject.tensors, allow_unused=True)
        self.backward = subject.records("backward")
        self.g = torch.cat(
            [
                (torch.zeros_like(t) if grad is None else grad).detach().to(f64).reshape(-1).cpu()
                for grad, t in zip(grads, subject.tensors)
            ]
        )
        self.outputs = [y.detach() for y in self.outputs]
        self.loss = self.value(self.outputs)

    def value(self, output: Any) -> float:
        """``<v, y>`` accumulated in float64."""
        ys = floating_leaves(output)
        return float(sum(float((v * y.to(f64)).sum()) for v, y in zip(self.v, ys)))


class _Probe:
    """One direction's four re-solves: the Richardson difference, its truncation, the autograd
    value along the applied displacements, and the noise the values show."""

    def __init__(self, subject: Subject, base: _Base, index: int, d: torch.Tensor, h: float):
        values, moves, records = {}, {}, []
        for step in (h, -h, 2 * h, -2 * h):
            output, applied = subject.shifted(_split(step * d, subject.tensors))
            values[step] = base.value(output)
            moves[step] = torch.cat([a.reshape(-1).cpu() for a in applied])
            records.append(subject.records("forward"))
        d1 = (values[h] - values[-h]) / (2 * h)
        d2 = (values[2 * h] - values[-2 * h]) / (4 * h)
        # autograd along the displacements actually applied (after rounding to the dtype)
        a1 = float(base.g @ (moves[h] - moves[-h])) / (2 * h)
        a2 = float(base.g @ (moves[2 * h] - moves[-2 * h])) / (4 * h)
        self.index = index
        self.autograd, self.finite_difference = (4 * a1 - a2) / 3, (4 * d1 - d2) / 3
        self.truncation = abs(d1 - d2) / 3
        # The fourth difference (L(2h) + L(-2h) - 2 L0) - 4 (L(h) + L(-h) - 2 L0) is O(h^4) for
        # a smooth L; its coefficients sum to 14 in size, so an error delta in each value
        # shows as at most 14 delta: |N| / 14 is a lower bound on the noise actually present.
        center = 2 * base.loss
        fourth = (values[2 * h] + values[-2 * h] - center) - 4 * (values[h] + values[-h] - center)
        self.noise = abs(fourth) / 14
        self.forward = tuple(_worst(column) for column in zip(*records))


def _compare(
    subject: Subject,
    base: _Base,
    *,
    promoted: bool,
    failure: str | None,
    directions: int,
    eps: float | None,
    rtol: float | None,
    atol: float | None,
    condition: float,
) -> GradientCheck:
    """Probe ``directions`` directions, derive the tolerance, and judge."""
    tensors = subject.tensors
    m = sum(t.numel() for t in tensors)
    n = sum(y.numel() for y in base.outputs)
    u = roundoff([t.dtype for t in tensors] + [y.dtype for y in base.outputs])
    tau_f, tau_b = forward_accuracy(base.forward), backward_accuracy(base.backward)
    params = torch.cat([t.detach().to(f64).reshape(-1).cpu() for t in tensors])
    scale = float(params.square().mean().sqrt())
    h = eps if eps is not None else default_eps(u, condition, tau_f, n, scale)

    probes = []
    for index in range(directions):
        d = torch.randn(m, generator=base.generator, dtype=f64)
        probes.append(_Probe(subject, base, index, d / torch.linalg.vector_norm(d), h))

    solves = [record for probe in probes for record in probe.forward]
    tau_fd = max(tau_f, forward_accuracy(solves)) if subject.layers else tau_f
    output_norm = math.sqrt(sum(float(y.to(f64).square().sum()) for y in base.outputs))
    model = value_noise(u, condition, tau_fd, n, output_norm)
    noise = max(model, max(probe.noise for probe in probes))
    used_rtol = rtol if rtol is not None else gradient_rtol(u, condition, tau_f, tau_b, n + m)
    used_atol = atol if atol is not None else difference_atol(noise, h)
    gradient_norm = float(torch.linalg.vector_norm(base.g))
    rows = tuple(
        DirectionCheck(
            index=probe.index,
            autograd=probe.autograd,
            finite_difference=probe.finite_difference,
            truncation=probe.truncation,
            allowed=used_rtol * gradient_norm + used_atol + probe.truncation,
            forward=probe.forward,
        )
        for probe in probes
    )
    result = GradientCheck(
        directions=rows,
        dtype=_least(tensors),
        promoted=promoted,
        promotion_failure=failure,
        eps=h,
        rtol=used_rtol,
        atol=used_atol,
        condition=condition,
        forward_tol=tau_f,
        backward_tol=tau_b,
        value_error=noise,
        gradient_norm=gradient_norm,
        layers=subject.layer_names,
        forward=base.forward,
        backward=base.backward,
    )
    if not result.passed:
        raise GradientCheckError(result)
    return result


def _split(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    parts = vector.split([t.numel() for t in like])
    return [part.view(t.shape).to(t.device) for part, t in zip(parts, like)]


def _worst(records: Sequence[SolveRecord | None]) -> SolveRecord | None:
    """The record with the largest relative residual (NaN counts as largest)."""
    present = [r for r in records if r is not None]
    if not present:
        return None
    return max(
        present, key=lambda r: math.inf if math.isnan(r.relative_residual) else r.relative_residual
    )


def _least(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return max((t.dtype for t in tensors), key=lambda dtype: torch.finfo(dtype).eps)


def _as_args(inputs: Any) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and not hasattr(inputs, "_fields"):
        return tuple(inputs)
    raise TypeError(
        "`inputs` must be a tensor or a tuple of the positional arguments of `fn`, got "
        f"{type(inputs).__name__}."
    )


def _validate(directions, eps, rtol, atol, condition) -> None:
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise ValueError(f"`directions` must be a positive integer, got {directions!r}.")
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"`eps` must be a positive finite step, got {eps!r}.")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not value >= 0:
            raise ValueError(f"`{name}` must be non-negative, got {value!r}.")
    if not condition >= 1:
        raise ValueError(
            f"`condition` is a condition number, at least 1, got {condition!r}: pass a bound on "
            "cond(I - J) for a fixed point, cond(H) for an argmin."
        )
