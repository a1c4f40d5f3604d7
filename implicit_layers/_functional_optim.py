"""Differentiable functional optimizers for inner loops: ``sgd`` and ``adam`` on pytrees.

An optimizer here holds only its hyperparameters. ``init(params)`` makes its state (momentum
buffers, moments, a step count) and ``step(params, grads, state)`` returns new parameters and a
new state without modifying anything in place, so autograd differentiates the update with
respect to the parameters, the gradients, the state and every hyperparameter given as a tensor
that requires grad (the learning rate, the momentum, ...). With float hyperparameters the
updates are those of ``torch.optim.SGD`` and ``torch.optim.Adam`` to rounding.

Parameters and gradients are tensors or pytrees of tensors (dicts, tuples, lists). The state is
a named tuple of pytrees with the parameters' structure and a Python ``int`` step count.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._options import options
from ._tree import TreeSpec, tree_flatten, tree_unflatten
from ._unroll import graph_dropped

__all__ = [
    "FunctionalOptimizer",
    "FunctionalSGD",
    "FunctionalAdam",
    "SGDState",
    "AdamState",
    "sgd",
    "adam",
    "gradient_step",
]

Hyper = float | torch.Tensor


class SGDState(NamedTuple):
    """``count``: steps taken; ``momentum_buffer``: the params' structure, or ``None`` without
    momentum."""

    count: int  # type: ignore[assignment]  # shadows tuple.count, by design of the state
    momentum_buffer: Any


class AdamState(NamedTuple):
    """``count``: steps taken; ``exp_avg``, ``exp_avg_sq``: the moments, the params' structure."""

    count: int  # type: ignore[assignment]
    exp_avg: Any
    exp_avg_sq: Any


class FunctionalOptimizer(abc.ABC):
    """An update rule with no parameters of its own: ``init`` the state, then ``step``."""

    @abc.abstractmethod
    def init(self, params: Any) -> Any:
        """The state before the first step, for parameters shaped like ``params``."""

    @abc.abstractmethod
    def step(self, params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
        """``(new_params, new_state)``, computed out of place (differentiable)."""


def _is_zero(value: Hyper) -> bool:
    """A float zero: the term it scales is skipped. A tensor is never skipped (it may learn)."""
    return not isinstance(value, torch.Tensor) and value == 0


def _check_hyper(owner: object, name: str, value: Any, low: float, high: float) -> None:
    """A Python number in ``[low, high)``, or a 0-dim floating-point tensor (not checked, as
    reading its value would synchronise a GPU and it may legitimately be learnt)."""
    where = f"{type(owner).__name__}: `{name}`"
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{where} must be a floating-point tensor, got {value.dtype}.")
        if value.dim() != 0:
            raise ValueError(
                f"{where} must be a scalar, a 0-dim tensor such as torch.tensor(0.1), got shape "
                f"{tuple(value.shape)}. Per-leaf or per-coordinate values need a step of your own."
            )
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a float or a 0-dim tensor, got {value!r:.60}.")
    if not low <= value < high:
        raise ValueError(f"{where} must lie in [{low}, {high}), got {value!r}.")


def _leaves(tree: Any, spec: TreeSpec, what: str) -> list[torch.Tensor]:
    leaves, got = tree_flatten(tree)
    if got != spec:
        raise ValueError(f"{what} must have the structure of `params`: expected {spec}, got {got}.")
    return leaves


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(v)`` for ``v >= 0`` with derivative 0, not ``inf``, where ``v == 0``.

    A coordinate whose gradients have all been exactly zero has ``v = 0``; the infinite
    derivative of the square root there would turn the hypergradient into NaN (``0 * inf``).
    """
    if not v.requires_grad:
        return v.sqrt()
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, 1.0).sqrt(), 0.0)


@options
class FunctionalSGD(FunctionalOptimizer):
    """SGD with momentum, dampening, weight decay and Nesterov momentum, as ``torch.optim.SGD``.

    With weight decay ``lambda``, momentum ``mu``, dampening ``tau`` and learning rate ``a``::

        g_t     = grad_t + lambda p_{t-1}
        b_t     = g_t (t = 1),   mu b_{t-1} + (1 - tau) g_t (t > 1)
        d_t     = g_t  |  b_t  |  g_t + mu b_t        (no momentum | momentum | Nesterov)
        p_t     = p_{t-1} - a d_t

    Every hyperparameter but ``nesterov`` may be a 0-dim tensor that requires grad. A float
    ``momentum=0`` keeps no buffer (``state.momentum_buffer is None``).
    """

    lr: Hyper
    momentum: Hyper = 0.0
    dampening: Hyper = 0.0
    weight_decay: Hyper = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        _check_hyper(self, "lr", self.lr, 0.0, math.inf)
        _check_hyper(self, "momentum", self.momentum, 0.0, math.inf)
        _check_hyper(self, "dampening", self.dampening, -math.inf, math.inf)
        _check_hyper(self, "weight_decay", self.weight_decay, 0.0, math.inf)
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"FunctionalSGD: `nesterov` must be a bool, got {self.nesterov!r}.")
        if self.nesterov and (_is_zero(self.momentum) or not _is_zero(self.dampening)):
            raise ValueError(
                "FunctionalSGD: Nesterov momentum needs a non-zero `momentum` and zero "
                "`dampening` (as in torch.optim.SGD)."
            )

    def init(self, params: Any) -> SGDState:
        if _is_zero(self.momentum):
            return SGDState(0, None)
        leaves, spec = tree_flatten(params)
        return SGDState(0, tree_unflatten(spec, [torch.zeros_like(p) for p in leaves]))

    def step(self, params: Any, grads: Any, state: SGDState) -> tuple[Any, SGDState]:
        p_leaves, spec = tree_flatten(params)
        g_leaves = _leaves(grads, spec, "`grads`")
        count, buffer = state
        has_momentum = not _is_zero(self.momentum)
        if has_momentum and buffer is None:
            raise ValueError(
                "FunctionalSGD: the state has no momentum buffer; it was made by an optimizer "
                "with momentum=0. Make it with `init` of an optimizer that has momentum."
            )
        b_leaves = _leaves(buffer, spec, "`state.momentum_buffer`") if has_momentum else []
        new_p, new_b = [], []
        for index, (p, g) in enumerate(zip(p_leaves, g_leaves)):
            if not _is_zero(self.weight_decay):
                g = g + self.weight_decay * p
            if has_momentum:
                if count == 0:
                    b = g
                elif _is_zero(self.dampening):
                    b = self.momentum * b_leaves[index] + g
                else:
                    b = self.momentum * b_leaves[index] + (1 - self.dampening) * g
                new_b.append(b)
                g = g + self.momentum * b if self.nesterov else b
            new_p.append(p - self.lr * g)
        new_buffer = tree_unflatten(spec, new_b) if has_momentum else None
        return tree_unflatten(spec, new_p), SGDState(count + 1, new_buffer)


@options
class FunctionalAdam(FunctionalOptimizer):
    """Adam with (coupled, L2) weight decay, as ``torch.optim.Adam`` without ``amsgrad``.

    With ``beta1, beta2``, weight decay ``lambda`` and learning rate ``a``, at step ``t >= 1``::

        g_t = grad_t + lambda p_{t-1}
        m_t = beta1 m_{t-1} + (1 - beta1) g_t                  (m_0 = 0)
        v_t = beta2 v_{t-1} + (1 - beta2) g_t^2                (v_0 = 0)
        p_t = p_{t-1} - a / (1 - beta1^t) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)

    Every hyperparameter may be a 0-dim tensor that requires grad (``betas`` element by
    element). Where ``v_t = 0`` (the gradient has been exactly zero so far) the derivative of
    ``sqrt(v_t)`` is taken as 0, not ``inf``, so the hypergradient stays finite.
    """

    lr: Hyper
    betas: tuple[Hyper, Hyper] = (0.9, 0.999)
    eps: Hyper = 1e-8
    weight_decay: Hyper = 0.0

    def __post_init__(self) -> None:
        _check_hyper(self, "lr", self.lr, 0.0, math.inf)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise TypeError(f"FunctionalAdam: `betas` must be a pair, got {self.betas!r:.60}.")
        _check_hyper(self, "betas[0]", self.betas[0], 0.0, 1.0)
        _check_hyper(self, "betas[1]", self.betas[1], 0.0, 1.0)
        _check_hyper(self, "eps", self.eps, 0.0, math.inf)
        _check_hyper(self, "weight_decay", self.weight_decay, 0.0, math.inf)

    def init(self, params: Any) -> AdamState:
        leaves, spec = tree_flatten(params)
        m = [torch.zeros_like(p) for p in leaves]
        v = [torch.zeros_like(p) for p in leaves]
        return AdamState(0, tree_unflatten(spec, m), tree_unflatten(spec, v))

    def step(self, params: Any, grads: Any, state: AdamState) -> tuple[Any, AdamState]:
        p_leaves, spec = tree_flatten(params)
        g_leaves = _leaves(grads, spec, "`grads`")
        m_leaves = _leaves(state.exp_avg, spec, "`state.exp_avg`")
        v_leaves = _leaves(state.exp_avg_sq, spec, "`state.exp_avg_sq`")
        count = state.count + 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1**count)
        correction2 = 1 - beta2**count
        sqrt_correction2: Any
        if isinstance(correction2, torch.Tensor):
            sqrt_correction2 = correction2.sqrt()
        else:
            sqrt_correction2 = math.sqrt(correction2)
        new_p, new_m, new_v = [], [], []
        for p, g, m, v in zip(p_leaves, g_leaves, m_leaves, v_leaves):
            if not _is_zero(self.weight_decay):
                g = g + self.weight_decay * p
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * (g * g)
            denom = _sqrt(v) / sqrt_correction2 + self.eps
            new_p.append(p - step_size * (m / denom))
            new_m.append(m)
            new_v.append(v)
        return tree_unflatten(spec, new_p), AdamState(
            count, tree_unflatten(spec, new_m), tree_unflatten(spec, new_v)
        )


def sgd(
    lr: Hyper,
    momentum: Hyper = 0.0,
    dampening: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    nesterov: bool = False,
) -> FunctionalSGD:
    """A differentiable functional ``torch.optim.SGD`` (see :class:`FunctionalSGD`).

    >>> opt = sgd(torch.tensor(0.1, requires_grad=True), momentum=0.9)
    >>> params = {"w": torch.ones(2)}
    >>> state = opt.init(params)
    >>> for _ in range(2):
    ...     params, state = opt.step(params, {"w": 2 * params["w"]}, state)
    >>> params["w"]          # 1 - 0.2 = 0.8, then 0.8 - 0.1 (0.9 * 2 + 1.6) = 0.46
    tensor([0.4600, 0.4600], grad_fn=<SubBackward0>)
    >>> torch.autograd.grad(params["w"].sum(), opt.lr)[0]  # 2 coordinates, -5.8 + 8 lr each
    tensor(-10.)
    """
    return FunctionalSGD(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov
    )


def adam(
    lr: Hyper,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
) -> FunctionalAdam:
    """A differentiable functional ``torch.optim.Adam`` (see :class:`FunctionalAdam`).

    >>> opt = adam(0.1)
    >>> w, state = opt.step(torch.ones(2), torch.tensor([3.0, -0.5]), opt.init(torch.ones(2)))
    >>> w                   # the first step moves every coordinate by lr, against the gradient
    tensor([0.9000, 1.1000])
    """
    return FunctionalAdam(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def gradient_step(
    inner_loss: Callable[[Any, Any], torch.Tensor],
    optimizer: FunctionalOptimizer | Callable[[Any], FunctionalOptimizer],
) -> Callable[[tuple[Any, Any], Any, int], tuple[Any, Any]]:
    """The step ``((params, state), lam, t) -> (params', state')`` of ``optimizer`` on
    ``inner_loss(params, lam)``, for :func:`unroll`.

    The gradient ``grad_params inner_loss`` is taken with ``create_graph=True``, so the step is
    differentiable in ``params``, ``state`` and ``lam``. It is taken without a graph, and the
    update made under ``torch.no_grad()``, where no graph is wanted: under ``torch.no_grad()``
    and in the steps whose graph :func:`unroll` drops (Recompute's forward, Truncated's first
    steps), which makes those about a third faster. Parameters that do not require grad are
    fine. ``optimizer`` is an optimizer, or a function of ``lam`` returning one: that is how
    the optimizer's own hyperparameters (say ``lam["lr"]``) get gradients, under every mode of
    :func:`unroll`. For minibatches chosen by ``t``, write the step yourself, on this model.

    >>> opt = sgd(0.25)
    >>> step = gradient_step(lambda w, lam: ((w - lam) ** 2).sum(), opt)
    >>> w0 = torch.zeros(2)
    >>> w, state = step((w0, opt.init(w0)), torch.ones(2), 0)
    >>> w                   # 0 - 0.25 * 2 (0 - 1)
    tensor([0.5000, 0.5000], grad_fn=<SubBackward0>)
    """
    fixed = optimizer if isinstance(optimizer, FunctionalOptimizer) else None
    if fixed is None and not callable(optimizer):
        raise TypeError(
            "gradient_step: `optimizer` must be a FunctionalOptimizer such as sgd(0.1), or a "
            f"function of lam returning one; got {optimizer!r:.60}."
        )

    def step(iterate: tuple[Any, Any], lam: Any, t: int) -> tuple[Any, Any]:
        params, state = iterate
        leaves, spec = tree_flatten(params)
        differentiable = torch.is_grad_enabled() and not graph_dropped()
        with torch.enable_grad():  # a gradient is needed even where the step is not
            leaves = [p if p.requires_grad else p.detach().requires_grad_() for p in leaves]
            params = tree_unflatten(spec, leaves)
            loss = inner_loss(params, lam)
            found = torch.autograd.grad(
                loss, leaves, create_graph=differentiable, allow_unused=True
            )
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(found, leaves)]
        opt: Any = fixed if fixed is not None else optimizer(lam)  # type: ignore[operator]
        with contextlib.nullcontext() if differentiable else torch.no_grad():
            return opt.step(params, tree_unflatten(spec, grads), state)

    return step
