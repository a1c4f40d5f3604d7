"""SGD with hypergradient descent on its learning rate: SGD-HD and SGDN-HD (Baydin et al., 2018)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from ._hypergradient import HypergradientOptimizer, adapt_lr, require


class SGDHD(HypergradientOptimizer):
    """``torch.optim.SGD`` whose learning rate ``alpha`` is learnt online, one per group.

    At step ``t``, with weight decay ``lambda``, momentum ``mu`` and dampening ``tau``::

        g_t     = grad f(theta_{t-1}) + lambda theta_{t-1}
        alpha_t = alpha_{t-1} + beta g_t . d_{t-1}        (d_0 = 0: the first step keeps alpha_0)
        b_t     = mu b_{t-1} + (1 - tau) g_t              (b_1 = g_1)
        d_t     = g_t  |  b_t  |  g_t + mu b_t            (no momentum | momentum | Nesterov)
        theta_t = theta_{t-1} - alpha_t d_t

    The update is ``u_t = -alpha_t d_t``, so ``beta g_t . d_{t-1} = -beta g_t . du_{t-1}/dalpha``
    is one gradient step on ``alpha``: SGD-HD, and SGDN-HD with Nesterov momentum. With
    ``hypergrad_lr=0`` this is exactly ``torch.optim.SGD``. The adapted rate is
    ``param_groups[i]["lr"]``.

    Args:
        params: parameters, or dicts defining parameter groups (every option is per group).
        lr: initial learning rate ``alpha_0 >= 0``; with the additive rule 0 works: it rises.
        momentum: as in ``torch.optim.SGD``.
        dampening: as in ``torch.optim.SGD``.
        weight_decay: as in ``torch.optim.SGD``.
        nesterov: as in ``torch.optim.SGD``.
        hypergrad_lr: ``beta``. Default 1e-6, the seed's ``sgd_hd.py`` default; the paper's
            SGD-HD and SGDN-HD experiments used 1e-3. The right value scales like
            ``1 / |g|^2``, so it depends on the loss.
        lr_bounds: optional ``(low, high)``: ``alpha`` is clamped to it after each update.
        multiplicative: use the normalised multiplicative rule (see ``_hypergradient``).

    Sparse gradients are supported (as by ``torch.optim.SGD``), except with weight decay.
    A parameter whose ``.grad`` is ``None`` is skipped.

    >>> from implicit_layers.optim import SGDHD
    >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
    >>> optimizer = SGDHD([w], lr=0.0, hypergrad_lr=0.01)
    >>> for _ in range(3):
    ...     optimizer.zero_grad()
    ...     (w**2).sum().backward()
    ...     optimizer.step()
    >>> round(optimizer.param_groups[0]["lr"], 4)  # 0, then 0 + 0.01 * 20, then 0.2 + 0.01 * 12
    0.32
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        hypergrad_lr: float = 1e-6,
        *,
        lr_bounds: tuple[float, float] | None = None,
        multiplicative: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            hypergrad_lr=hypergrad_lr,
            lr_bounds=lr_bounds,
            multiplicative=multiplicative,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        momentum, dampening, decay = group["momentum"], group["dampening"], group["weight_decay"]
        require("SGDHD", "momentum", momentum, momentum >= 0, "non-negative")
        require("SGDHD", "weight_decay", decay, decay >= 0, "non-negative")
        if group["nesterov"]:
            require("SGDHD", "momentum", momentum, momentum > 0, "positive with nesterov=True")
            require("SGDHD", "dampening", dampening, dampening == 0, "0 with nesterov=True")

    _supports_sparse = True

    def _step_group(self, group: dict[str, Any]) -> None:
        momentum, dampening = group["momentum"], group["dampening"]
        nesterov = group["nesterov"]
        params, grads, previous = self._gradients(group)
        lr = adapt_lr(group, grads, previous)
        for p, grad in zip(params, grads):
            state = self.state[p]
            direction = grad
            if momentum != 0:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.detach().clone()
                else:
                    buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                direction = grad.add(buf, alpha=momentum) if nesterov else buf
            p.add_(direction, alpha=-lr)
            # p.grad and the momentum buffer change in place; the Nesterov direction is new
            state["hd_direction"] = direction if nesterov else direction.clone()
