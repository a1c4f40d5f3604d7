"""Quickstart: learn one weight decay per feature by differentiating through an inner solver.

Inner problem, ridge regression with a decay ``exp(log_lam[j])`` on feature ``j``:

    w*(log_lam) = argmin_w  ||X_tr w - y_tr||^2 / (2 n) + 0.5 * sum(exp(log_lam) * w^2)

Outer problem: choose ``log_lam`` to minimise the validation loss of ``w*``.

The inner solver is plain gradient descent, written as anyone would write it. Wrapped by
``fixed_point_layer`` it becomes a layer whose output is the fixed point of one gradient step,
``w* = Phi(w*, log_lam)``; its backward solves one linear system with CG instead of
backpropagating through the steps.

    python examples/quickstart.py                            # 30 outer Adam steps
    IMPLICIT_LAYERS_FAST=1 python examples/quickstart.py     # a short smoke run
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from implicit_layers import CG, fixed_point_layer

FAST = os.environ.get("IMPLICIT_LAYERS_FAST") == "1"
OUTER_STEPS = 5 if FAST else 30
INNER_STEPS = 300
DTYPE = torch.float64  # float64 keeps the finite-difference check clean


def make_data(features: int = 20, seed: int = 0) -> tuple[Tensor, ...]:
    """Only the first 3 features are informative; 50 noisy training points, 200 for validation."""
    generator = torch.Generator().manual_seed(seed)
    w_true = torch.zeros(features, dtype=DTYPE)
    w_true[:3] = torch.tensor([2.0, -1.5, 1.0], dtype=DTYPE)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        X = torch.randn(n, features, generator=generator, dtype=DTYPE)
        y = X @ w_true + torch.randn(n, generator=generator, dtype=DTYPE)
        return X, y

    return *sample(50), *sample(200)


def inner_gradient(w: Tensor, log_lam: Tensor, X: Tensor, y: Tensor) -> Tensor:
    """Gradient in ``w`` of the ridge loss, in closed form."""
    return X.T @ (X @ w - y) / len(y) + log_lam.exp() * w


def gradient_step(w: Tensor, log_lam: Tensor, X: Tensor, y: Tensor, step: float) -> Tensor:
    """Phi(w, log_lam): one gradient step. Its fixed points are the minimisers of the loss."""
    return w - step * inner_gradient(w, log_lam, X, y)


def gradient_descent(f: Callable[[Tensor], Tensor], w0: Tensor) -> Tensor:
    """The user's own inner loop: ``f`` is ``w -> Phi(w, log_lam, ...)``."""
    w = w0
    for _ in range(INNER_STEPS):
        w = f(w)
    return w


def validation_loss(w: Tensor, X: Tensor, y: Tensor) -> Tensor:
    return (X @ w - y).square().mean() / 2


class LearnedWeightDecay(nn.Module):
    """Ridge regression whose per-feature decays are parameters; ``forward()`` returns ``w*``."""

    def __init__(self, X: Tensor, y: Tensor):
        super().__init__()
        self.register_buffer("X", X)
        self.register_buffer("y", y)
        self.log_lam = nn.Parameter(torch.zeros(X.shape[1], dtype=X.dtype))
        # I - dPhi/dw = step * Hessian is symmetric positive definite, so CG is valid.
        self.layer = fixed_point_layer(
            gradient_step, solver=gradient_descent, backward=CG(tol=1e-10)
        )
        self.register_buffer("w_start", torch.zeros(X.shape[1], dtype=X.dtype))

    def forward(self) -> Tensor:
        # Step 1/L with L the largest eigenvalue of the Hessian (an upper bound of it).
        # The fixed point, and so the gradient, does not depend on the step.
        with torch.no_grad():
            top = torch.linalg.matrix_norm(self.X, ord=2) ** 2 / len(self.y)
            step = 1.0 / float(top + self.log_lam.exp().max())
        w_star = self.layer(self.w_start, self.log_lam, self.X, self.y, step)
        # Warm start the next solve here. No gradient flows to w0: w* does not depend on it.
        self.w_start = w_star.detach()
        return w_star


def exact_validation_loss(
    log_lam: Tensor, X: Tensor, y: Tensor, X_val: Tensor, y_val: Tensor
) -> float:
    """Validation loss of the exact ``w*``: solve ``(X^T X / n + diag(lam)) w = X^T y / n``."""
    hessian = X.T @ X / len(y) + torch.diag(log_lam.exp())
    w_star = torch.linalg.solve(hessian, X.T @ y / len(y))
    return float(validation_loss(w_star, X_val, y_val))


def main() -> None:
    X_tr, y_tr, X_val, y_val = make_data()
    model = LearnedWeightDecay(X_tr, y_tr)

    loss = validation_loss(model(), X_val, y_val)
    loss.backward()
    hypergradient = model.log_lam.grad.clone()

    print("Hypergradient d(validation loss)/d(log_lam), implicit vs central finite differences")
    print(f"{'feature':>9} {'implicit':>15} {'finite diff':>15} {'rel. diff':>10}")
    eps = 1e-5
    base = model.log_lam.detach()
    for j in (0, 1, 2, 7, 15):  # three informative features, two noise features
        e = torch.zeros_like(base)
        e[j] = eps
        plus = exact_validation_loss(base + e, X_tr, y_tr, X_val, y_val)
        minus = exact_validation_loss(base - e, X_tr, y_tr, X_val, y_val)
        fd = (plus - minus) / (2 * eps)
        ours = float(hypergradient[j])
        print(f"{j:>9} {ours:>15.8e} {fd:>15.8e} {abs(ours - fd) / abs(fd):>10.1e}")

    print("\nSolver records of that call")
    print("  forward: ", model.layer.last_forward.summary())
    print("  backward:", model.layer.last_backward.summary())

    print(f"\nOuter loop: Adam on log_lam, {OUTER_STEPS} steps")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for step in range(OUTER_STEPS + 1):
        optimizer.zero_grad()
        loss = validation_loss(model(), X_val, y_val)
        if step % 5 == 0 or step == OUTER_STEPS:
            print(f"  step {step:>3}  validation loss {loss.item():.5f}")
        if step < OUTER_STEPS:
            loss.backward()
            optimizer.step()

    lam = model.log_lam.detach().exp()
    print(
        f"\nLearned decay: informative features {lam[:3].mean():.3f} (mean), "
        f"noise features {lam[3:].mean():.3f} (mean)"
    )
    print("  inner solve, warm-started:", model.layer.last_forward.summary())


if __name__ == "__main__":
    main()
