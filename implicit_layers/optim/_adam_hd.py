"""Adam with hypergradient descent on its learning rate: Adam-HD (Baydin et al., 2018)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._hypergradient import HypergradientOptimizer, adapt_lr, require


class AdamHD(HypergradientOptimizer):
    """``torch.optim.Adam`` whose learning rate ``alpha`` is learnt online, one per group.

    At step ``t`` (counted per parameter), with weight decay ``lambda``::

        g_t     = grad f(theta_{t-1}) + lambda theta_{t-1}
        alpha_t = alpha_{t-1} + beta g_t . d_{t-1}        (d_0 = 0: the first step keeps alpha_0)
        m_t     = beta1 m_{t-1} + (1 - beta1) g_t,   v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
        d_t     = m_hat_t / (sqrt(v_hat_t) + eps),   m_hat_t = m_t / (1 - beta1^t),
                                                     v_hat_t = v_t / (1 - beta2^t)
        theta_t = theta_{t-1} - alpha_t d_t

    The update is ``u_t = -alpha_t d_t``, so ``beta g_t . d_{t-1}`` is one gradient step on
    ``alpha``. With ``hypergrad_lr=0`` this is exactly ``torch.optim.Adam``. The adapted rate is
    ``param_groups[i]["lr"]``. ``d_t`` is kept in the state (one extra copy of the parameters,
    as in the paper). The seed's ``adam_hd.py`` differs in two ways: it puts ``eps`` inside the
    bias correction (``eps / sqrt(1 - beta2^t)``), and it updates ``alpha`` after each parameter
    instead of once per group from the dot product over all of them.

    Args:
        params: parameters, or dicts defining parameter groups (every option is per group).
        lr: initial learning rate ``alpha_0 >= 0``; with the additive rule 0 works: it rises.
        betas: as in ``torch.optim.Adam``.
        eps: as in ``torch.optim.Adam``.
        weight_decay: as in ``torch.optim.Adam`` (L2 penalty added to the gradient).
        hypergrad_lr: ``beta``. Default 1e-8, the seed's ``adam_hd.py`` default; the paper's
            Adam-HD experiments used 1e-7 (1e-8 for VGG). ``g . d`` grows like the number of
            parameters times ``|g|``, so the right value depends on the model.
        lr_bounds: optional ``(low, high)``: ``alpha`` is clamped to it after each update.
        multiplicative: use the normalised multiplicative rule (see ``_hypergradient``).

    Sparse gradients raise ``RuntimeError``, as in ``torch.optim.Adam``. A parameter whose
    ``.grad`` is ``None`` is skipped.

    >>> from implicit_layers.optim import AdamHD
    >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
    >>> optimizer = AdamHD([w], lr=0.0, hypergrad_lr=0.01)
    >>> for _ in range(3):
    ...     optimizer.zero_grad()
    ...     (w**2).sum().backward()
    ...     optimizer.step()
    >>> round(optimizer.param_groups[0]["lr"], 4)  # d_t ~ sign(g): 0, 0.01 * 6, + 0.01 * 5.76
    0.1176
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        hypergrad_lr: float = 1e-8,
        *,
        lr_bounds: tuple[float, float] | None = None,
        multiplicative: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            hypergrad_lr=hypergrad_lr,
            lr_bounds=lr_bounds,
            multiplicative=multiplicative,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        betas = group["betas"]
        valid = len(betas) == 2 and all(0 <= b < 1 for b in betas)
        require("AdamHD", "betas", betas, valid, "a pair of numbers in [0, 1)")
        eps, decay = group["eps"], group["weight_decay"]
        require("AdamHD", "eps", eps, eps >= 0, "non-negative")
        require("AdamHD", "weight_decay", decay, decay >= 0, "non-negative")

    def _step_group(self, group: dict[str, Any]) -> None:
        eps = group["eps"]
        beta1, beta2 = group["betas"]
        params, grads, previous = self._gradients(group)
        lr = adapt_lr(group, grads, previous)
        for p, grad in zip(params, grads):
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            # the operations of torch.optim.Adam, in its order, so that beta = 0 matches it exactly
            bias_correction1 = 1 - beta1 ** state["step"]
            bias_correction2 = 1 - beta2 ** state["step"]
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
            state["hd_direction"] = exp_avg.div(denom).div_(bias_correction1)
