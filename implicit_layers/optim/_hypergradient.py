"""The learning-rate update that SGDHD and AdamHD share (Baydin et al., ICLR 2018).

Both optimizers write their step as ``theta_t = theta_{t-1} + u_t`` with ``u_t = -alpha_t d_t``,
where the direction ``d_t`` does not depend on ``alpha_t``. Then ``du_{t-1}/dalpha = -d_{t-1}``
and the hypergradient of the loss with respect to the learning rate is

    h_t = g_t . du_{t-1}/dalpha = -g_t . d_{t-1},      g_t = grad f(theta_{t-1}),

a dot product over all parameters of a group. Before moving the parameters, the learning rate
of the group takes one step on ``h_t``:

* additive, the paper's rule and the default: ``alpha_t = alpha_{t-1} - beta h_t``;
* multiplicative (normalised), the variant of Baydin et al. (2018) analysed by Martinez Rubio
  (2017): ``alpha_t = alpha_{t-1} (1 - beta h_t / (||g_t|| ||d_{t-1}||))``, that is
  ``alpha_{t-1} (1 + beta cos(g_t, d_{t-1}))`` (unchanged when a norm is 0). ``beta`` is then
  dimensionless and must lie in ``[0, 1)``, so that ``alpha`` stays positive; ``alpha_0`` must
  be positive.

then, when ``lr_bounds=(low, high)`` is given, ``alpha_t`` is clamped to ``[low, high]``.

The vectors range over the parameters of the group that have a gradient at step ``t``. A
parameter without a gradient is skipped and does not move, so ``d_{t-1} = 0`` for it at the next
step; the same holds on its first step. In particular ``h_1 = 0``: the first step uses
``alpha_0``. ``beta`` is ``hypergrad_lr``; the learning rate stays a Python float in
``param_groups[i]["lr"]``, so each step with a hypergradient reads one scalar per device back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class HypergradientOptimizer(Optimizer):
    """Base class: validates every parameter group, runs the closure, steps each group."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the first bad option; subclasses add their own checks."""
        name = type(self).__name__
        lr, beta, bounds = group["lr"], group["hypergrad_lr"], group["lr_bounds"]
        require(name, "lr", lr, _is_number(lr) and lr >= 0, "a non-negative number")
        require(name, "hypergrad_lr", beta, _is_number(beta) and beta >= 0, "non-negative")
        if bounds is not None:
            valid = (
                isinstance(bounds, (tuple, list))
                and len(bounds) == 2
                and all(_is_number(b) for b in bounds)
                and 0 <= bounds[0] <= bounds[1]
            )
            require(name, "lr_bounds", bounds, valid, "a pair (low, high) with 0 <= low <= high")
            require(name, "lr", lr, bounds[0] <= lr <= bounds[1], f"within lr_bounds={bounds}")
        if group["multiplicative"]:
            require(name, "lr", lr, lr > 0, "positive with multiplicative=True (0 stays 0)")
            require(name, "hypergrad_lr", beta, beta < 1, "below 1 with multiplicative=True")
        if any(p.is_complex() for p in group["params"]):
            raise ValueError(f"{name}: complex parameters are not supported.")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step for every group; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    _supports_sparse = False

    def _gradients(
        self, group: dict[str, Any]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
        """The params of ``group`` that have a gradient, their gradients ``g_t`` (weight decay
        added) and their previous directions ``d_{t-1}``. A param without a gradient does not
        move, so it loses its direction for the next hypergradient."""
        name, weight_decay = type(self).__name__, group["weight_decay"]
        params, grads, previous = [], [], []
        for p in group["params"]:
            if p.grad is None:
                if p in self.state:
                    self.state[p].pop("hd_direction", None)
                continue
            grad = p.grad
            if grad.is_sparse and not self._supports_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients.")
            if weight_decay != 0:
                if grad.is_sparse:
                    raise RuntimeError(
                        f"{name}: sparse gradients are not supported with `weight_decay` != 0."
                    )
                grad = grad.add(p, alpha=weight_decay)
            params.append(p)
            grads.append(grad)
            previous.append(self.state[p].get("hd_direction"))
        return params, grads, previous


def adapt_lr(
    group: dict[str, Any], grads: Sequence[Tensor], directions: Sequence[Tensor | None]
) -> float:
    """Set ``group["lr"]`` to ``alpha_t`` and return it.

    ``grads[i]`` is ``g_t`` and ``directions[i]`` is ``d_{t-1}`` (``None``: zero) for the i-th
    parameter of the group that has a gradient.

    >>> group = dict(lr=0.1, hypergrad_lr=0.01, multiplicative=False, lr_bounds=None)
    >>> lr = adapt_lr(group, [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 1.0])])
    >>> round(lr, 12), group["lr"] == lr  # 0.1 + 0.01 * (1 * 3 + 2 * 1)
    (0.15, True)
    """
    beta, lr, multiplicative = group["hypergrad_lr"], group["lr"], group["multiplicative"]
    if beta == 0 or all(d is None for d in directions):
        return lr
    sums = _sums(_terms(g, d, multiplicative) for g, d in zip(grads, directions))
    if multiplicative:
        g_dot_d, g_sq, d_sq = sums
        norms = math.sqrt(g_sq) * math.sqrt(d_sq)
        if norms > 0:
            lr = lr * (1 + beta * g_dot_d / norms)
    else:
        lr = lr + beta * sums[0]
    if group["lr_bounds"] is not None:
        low, high = group["lr_bounds"]
        lr = min(max(lr, low), high)
    group["lr"] = lr
    return lr


def _terms(g: Tensor, d: Tensor | None, multiplicative: bool) -> list[Tensor]:
    """``[g.d]``, or ``[g.d, g.g, d.d]`` for the multiplicative rule; ``d=None`` is zero."""
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    g_dot_d = zero if d is None else _dot(g, d)
    if not multiplicative:
        return [g_dot_d]
    return [g_dot_d, _dot(g, g), zero if d is None else _dot(d, d)]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    if a.is_sparse or b.is_sparse:
        return (a * b).sum()
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _sums(rows: Iterable[list[Tensor]]) -> list[float]:
    """Column sums of rows of 0-d tensors, as floats, reading back one vector per device."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for row in rows:
        by_device.setdefault(row[0].device, []).append(torch.stack(row))
    columns = [torch.stack(stacked).sum(0).tolist() for stacked in by_device.values()]
    return [math.fsum(column) for column in zip(*columns)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def require(owner: str, name: str, value: Any, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{owner}: `{name}` must be {requirement}, got {value!r}.")
