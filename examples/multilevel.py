"""Three-level optimisation by nesting layers: a hyper-hyperparameter on scikit-learn's digits.

Level 1: logistic-regression weights ``w*(lam)`` minimise the training loss plus a weight decay
``exp(lam_j)`` per feature. Level 2: the decays ``lam*(mu)`` minimise the loss on a first
validation split plus ``exp(mu) ||lam - prior||^2 / 2``, which pulls them towards a prior decay:
``mu`` says how far the validation split may move them. Level 3: Adam on ``mu`` minimises the
loss on a second validation split.

Each level is an ``argmin_layer``; the level-2 objective calls the level-1 layer. Its backward
needs Hessian-vector products of the level-2 objective, which differentiate the level-1
layer twice: that works because a layer's backward is itself differentiable. This is the
setting Betty is built for, written here as two nested layers.

Run: ``python examples/multilevel.py`` (``IMPLICIT_LAYERS_FAST=1`` for a short run).
"""

from __future__ import annotations

import os
import time

import torch
from sklearn.datasets import load_digits

from implicit_layers import CG, GMRES, LBFGS, argmin_layer

FAST = os.environ.get("IMPLICIT_LAYERS_FAST") == "1"
OUTER_STEPS = 2 if FAST else 10
PRIOR = -2.0  # the log decay level 2 is pulled towards


def digits_3_vs_8() -> dict[str, torch.Tensor]:
    """3 against 8 on 4x4 images (2x2 blocks of pixels averaged), standardised, plus a bias
    column, in four splits."""
    digits = load_digits()
    keep = (digits.target == 3) | (digits.target == 8)
    images = torch.tensor(digits.images[keep], dtype=torch.float64)
    X = torch.nn.functional.avg_pool2d(images[:, None], 2).flatten(1)
    y = torch.tensor(digits.target[keep] == 8, dtype=torch.float64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = X[order], y[order]
    X = (X - X.mean(0)) / (X.std(0) + 1.0)
    X = torch.cat([X, torch.ones(len(y), 1, dtype=torch.float64)], dim=1)
    splits = {"train": (0, 100), "val": (100, 160), "meta": (160, 220), "test": (220, len(y))}
    return {name: (X[a:b], y[a:b]) for name, (a, b) in splits.items()}


def cross_entropy(w: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    X, y = split
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y)


def accuracy(w: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    X, y = split
    return float(((X @ w > 0).double() == y).double().mean())


def main() -> None:
    data = digits_3_vs_8()
    features = data["train"][0].shape[1]

    @argmin_layer(solver=LBFGS(tol=1e-7, max_iter=500), backward=CG(tol=1e-9, max_iter=500))
    def weights(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return cross_entropy(w, data["train"]) + 0.5 * (lam.exp() * w * w).sum()

    zero = torch.zeros(features, dtype=torch.float64)

    @argmin_layer(solver=LBFGS(tol=1e-4, max_iter=200), backward=GMRES(tol=1e-6, max_iter=200))
    def decays(lam: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        pull = 0.5 * mu.exp() * ((lam - PRIOR) ** 2).sum()
        return cross_entropy(weights(zero, lam), data["val"]) + pull

    mu = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([mu], lr=0.5)
    lam = torch.full((features,), PRIOR, dtype=torch.float64)
    start = time.perf_counter()
    for step in range(OUTER_STEPS + 1):
        lam_star = decays(lam, mu)
        w = weights(zero, lam_star)
        meta_loss = cross_entropy(w, data["meta"])
        if step in (0, OUTER_STEPS):
            print(
                f"{'before' if step == 0 else 'after '}: mu {mu.item():+.2f}, "
                f"meta loss {meta_loss.item():.4f}, test accuracy {accuracy(w, data['test']):.3f}, "
                f"decays in [{lam_star.min().item():.2f}, {lam_star.max().item():.2f}]"
            )
        if step == OUTER_STEPS:
            break
        optimizer.zero_grad()
        meta_loss.backward()
        optimizer.step()
        lam = lam_star.detach()  # warm start level 2
    print(
        f"{OUTER_STEPS} outer steps in {time.perf_counter() - start:.1f} s; last level-2 "
        f"solve: {decays.last_forward.summary()}; its backward: {decays.last_backward.summary()}"
    )


if __name__ == "__main__":
    main()
