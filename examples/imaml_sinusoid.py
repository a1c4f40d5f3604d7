"""iMAML on few-shot sinusoid regression: meta-learn an initialisation through an argmin.

Each task is a sinusoid ``a sin(x - b)`` (amplitude ``a`` in [0.1, 5], phase ``b`` in [0, pi],
``x`` in [-5, 5]) seen through K = 10 support and 10 query points. Adapting a small MLP
(1-40-40-1) to a task is the inner problem of iMAML (Rajeswaran et al., 2019): minimise the
support loss plus ``(reg / 2) ||w - theta||^2``, a pull towards the meta-parameters ``theta``.
An ``argmin_layer`` solves it (L-BFGS forward, GMRES on the Hessian backward), with the MLP's
weights as a dict (a pytree) used through ``torch.func.functional_call``. ``theta`` is a param
of the inner loss, so the query loss of the adapted weights sends ``theta`` its meta-gradient by
the implicit function theorem, without backpropagating through the adaptation. Adam on ``theta``
minimises the query loss averaged over a meta-batch of tasks.

The implicit function theorem needs a smooth inner loss at a stationary point: the MLP uses tanh,
since a ReLU network's loss has kinks where L-BFGS stalls short of a stationary point. The
loss of an MLP is not convex, so its Hessian is symmetric but may be indefinite (the pull adds
only ``reg`` to its eigenvalues): the backward is GMRES, valid for any non-singular system, where
CG would need a positive definite one.

Run: ``python examples/imaml_sinusoid.py`` (``IMPLICIT_LAYERS_FAST=1`` for a short run).
"""

from __future__ import annotations

import math
import os

import torch
from torch.func import functional_call

from implicit_layers import GMRES, LBFGS, argmin_layer

FAST = os.environ.get("IMPLICIT_LAYERS_FAST") == "1"
META_STEPS = 2 if FAST else 120
META_BATCH = 2 if FAST else 5
TEST_TASKS = 2 if FAST else 25
K = 10  # support and query points per task
REG = 2.0  # strength of the pull of the adapted weights towards theta

Params = dict[str, torch.Tensor]
Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_tasks(n: int, seed: int) -> list[Task]:
    """``n`` sinusoid tasks as (support x, support y, query x, query y), from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    amplitude = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=generator, dtype=torch.float64)
    phase = math.pi * torch.rand(n, 1, 1, generator=generator, dtype=torch.float64)
    x = 10 * torch.rand(n, 2 * K, 1, generator=generator, dtype=torch.float64) - 5
    y = amplitude * torch.sin(x - phase)
    return [(x[i, :K], y[i, :K], x[i, K:], y[i, K:]) for i in range(n)]


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(1, 40),
        torch.nn.Tanh(),
        torch.nn.Linear(40, 40),
        torch.nn.Tanh(),
        torch.nn.Linear(40, 1),
    ).double()


def main() -> None:
    torch.set_num_threads(1)  # a 1-40-40-1 MLP on 10 points gains nothing from threads
    torch.manual_seed(0)
    model = make_model()
    train_tasks, test_tasks = make_tasks(2000, seed=1), make_tasks(TEST_TASKS, seed=2)

    def mse(w: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (functional_call(model, w, (x,)) - y).square().mean()

    def inner_loss(w: Params, theta: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Support loss plus the proximal pull towards the meta-parameters."""
        pull = sum((w[k] - theta[k]).square().sum() for k in w)
        return mse(w, x, y) + 0.5 * REG * pull

    adapt = argmin_layer(
        inner_loss,
        # Relative tolerances of 1e-4 are plenty for a meta-gradient (iMAML itself runs a few
        # CG steps) and keep the run short.
        solver=LBFGS(tol=1e-4, max_iter=500),
        backward=GMRES(tol=1e-4, max_iter=500),
    )

    def adapted_query_mse(theta: Params, tasks: list[Task]) -> torch.Tensor:
        """Adapt from ``theta`` to each task's support set; average the query MSE."""
        losses = []
        for x_s, y_s, x_q, y_q in tasks:
            # iMAML adapts from theta: the inner solve starts there.
            w0 = {k: v.detach().clone() for k, v in theta.items()}
            w = adapt(w0, theta, x_s, y_s)
            losses.append(mse(w, x_q, y_q))
        return torch.stack(losses).mean()

    def evaluate(theta: Params) -> float:
        theta = {k: v.detach() for k, v in theta.items()}
        with torch.no_grad():
            return adapted_query_mse(theta, test_tasks).item()

    theta = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    random_init = {k: v.detach().clone() for k, v in theta.items()}
    before = evaluate(theta)
    zero = torch.stack([y_q.square().mean() for *_, y_q in test_tasks]).mean().item()
    print(
        f"{len(test_tasks)} held-out tasks, K = {K}; query MSE of predicting 0: {zero:.3f}\n"
        f"before: query MSE after adaptation from theta (a random init) {before:.3f}"
    )

    optimizer = torch.optim.Adam(theta.values(), lr=1e-2)
    order = torch.randperm(len(train_tasks), generator=torch.Generator().manual_seed(3))
    forward_iters, backward_iters = 0, 0
    for step in range(META_STEPS):
        batch = [train_tasks[int(i)] for i in order[step * META_BATCH : (step + 1) * META_BATCH]]
        loss = adapted_query_mse(theta, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        forward_iters += adapt.last_forward.iterations
        backward_iters += adapt.last_backward.iterations
        if step % 25 == 0 or step == META_STEPS - 1:
            print(f"  meta-step {step:3d}: meta-batch query MSE {loss.item():.3f}")
    print(
        f"  last task of each meta-batch: {forward_iters / META_STEPS:.0f} L-BFGS and "
        f"{backward_iters / META_STEPS:.0f} GMRES iterations on average; last solves:\n"
        f"  {adapt.last_forward.summary()}\n  {adapt.last_backward.summary()}"
    )

    after = evaluate(theta)
    print(
        f"after {META_STEPS} meta-steps: query MSE after adaptation from the learnt theta "
        f"{after:.3f} (from the random init {evaluate(random_init):.3f})"
    )


if __name__ == "__main__":
    main()
