"""Dataset distillation (Wang et al., 2018) on scikit-learn's digits, by implicit differentiation.

A tiny synthetic training set (a few 8x8 images per class, one fixed label each) is learnt so
that a multinomial logistic regression trained on it alone classifies real digits well. The
inner problem, the L2-regularised softmax loss on the synthetic set, is solved to optimality by
an ``argmin_layer`` (L-BFGS forward, CG on the Hessian backward), so the outer gradient with
respect to the synthetic pixels (and a learnt log L2 strength) needs no unrolled training loop.
Adam on those hyperparameters minimises the cross-entropy of the trained model on batches of
real training images.

Run: ``python examples/dataset_distillation.py [--ipc 1] [--plot distilled.png]``
(``IMPLICIT_LAYERS_FAST=1`` for a short run). ``--plot`` needs matplotlib; nothing is written
without it.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from implicit_layers import CG, LBFGS, argmin_layer

FAST = os.environ.get("IMPLICIT_LAYERS_FAST") == "1"
OUTER_STEPS = 10 if FAST else 300
BATCH = 256
CLASSES = 10


def digits() -> dict[str, torch.Tensor]:
    """Shuffled digits, 1000 train and 797 test images, pixels standardised on the train set."""
    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = X[order], y[order]
    mean, scale = X[:1000].mean(0), X[:1000].std(0) + 1.0
    X = (X - mean) / scale
    return dict(
        X_train=X[:1000],
        y_train=y[:1000],
        X_test=X[1000:],
        y_test=y[1000:],
        mean=mean,
        scale=scale,
    )


def logits(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Multinomial logistic regression; ``W`` is (65, 10), its last row the biases."""
    return X @ W[:-1] + W[-1]


def inner_loss(
    W: torch.Tensor, X_syn: torch.Tensor, y_syn: torch.Tensor, log_lam: torch.Tensor
) -> torch.Tensor:
    """Training loss on the synthetic set: softmax cross-entropy plus L2 on the weights."""
    return F.cross_entropy(logits(W, X_syn), y_syn) + 0.5 * log_lam.exp() * W[:-1].square().sum()


def accuracy(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    return (logits(W, X).argmax(1) == y).double().mean().item()


def random_real(data: dict[str, torch.Tensor], ipc: int, seed: int) -> torch.Tensor:
    """``ipc`` random real training images of each class, ordered class by class."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(CLASSES):
        idx = (data["y_train"] == c).nonzero().squeeze(1)
        picks.append(idx[torch.randperm(len(idx), generator=g)[:ipc]])
    return data["X_train"][torch.cat(picks)].clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ipc", type=int, default=1, help="synthetic images per class")
    parser.add_argument("--plot", metavar="PATH", help="save the distilled images as a PNG")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = digits()
    n_features = data["X_train"].shape[1]
    y_syn = torch.arange(CLASSES).repeat_interleave(args.ipc)
    W0 = torch.zeros(n_features + 1, CLASSES, dtype=torch.float64)
    # A small training set is separable, so a small L2 makes the inner problem ill-conditioned:
    # give both solves room. L-BFGS starts cold from W0 every time, since its stopping rule is
    # relative to the first gradient.
    layer = argmin_layer(
        inner_loss,
        solver=LBFGS(tol=1e-6, max_iter=2000),
        backward=CG(tol=1e-6, max_iter=2000),
    )
    log_lam0 = torch.tensor(-3.0, dtype=torch.float64)  # L2 strength 0.05 to start

    def test_accuracy(X_syn: torch.Tensor, log_lam: torch.Tensor) -> float:
        with torch.no_grad():
            return accuracy(layer(W0, X_syn, y_syn, log_lam), data["X_test"], data["y_test"])

    # Reference points: the whole real training set, and random real images as the small set.
    with torch.no_grad():
        W_full = layer(W0, data["X_train"], data["y_train"], log_lam0)
    full = accuracy(W_full, data["X_test"], data["y_test"])
    draws = [test_accuracy(random_real(data, args.ipc, seed), log_lam0) for seed in range(1, 11)]

    X_syn = random_real(data, args.ipc, seed=0).requires_grad_()
    log_lam = log_lam0.clone().requires_grad_()
    before = test_accuracy(X_syn.detach(), log_lam0)
    optimizer = torch.optim.Adam([X_syn, log_lam], lr=0.03)
    g = torch.Generator().manual_seed(1)
    products = iterations = 0
    history = []
    for _ in range(OUTER_STEPS):
        batch = torch.randint(len(data["y_train"]), (BATCH,), generator=g)
        W = layer(W0, X_syn, y_syn, log_lam)
        loss = F.cross_entropy(logits(W, data["X_train"][batch]), data["y_train"][batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        iterations += layer.last_forward.iterations
        products += layer.last_backward.products
        history.append(loss.item())
    after = test_accuracy(X_syn.detach(), log_lam.detach())
    with torch.no_grad():
        W_full = layer(W0, data["X_train"], data["y_train"], log_lam.detach())
    full_learnt = accuracy(W_full, data["X_test"], data["y_test"])

    k = len(y_syn)
    print(
        f"digits: {len(data['y_train'])} train, {len(data['y_test'])} test images; "
        f"synthetic set: {k} images ({args.ipc} per class), {n_features} pixels each"
    )
    print(
        f"test accuracy, trained on all {len(data['y_train'])} real images: {full:.3f} "
        f"(L2 strength {log_lam0.exp().item():.3g}), {full_learnt:.3f} (the learnt L2 strength)"
    )
    print(
        f"test accuracy, trained on {k} random real images: {before:.3f} (the initial set; "
        f"mean over 10 other draws {sum(draws) / len(draws):.3f})"
    )
    print(
        f"outer loss (real batch cross-entropy): {history[0]:.4f} at the start -> "
        f"{sum(history[-10:]) / len(history[-10:]):.4f} (mean of the last 10) after "
        f"{OUTER_STEPS} Adam steps"
    )
    print(
        f"test accuracy, trained on {k} distilled images: {after:.3f} "
        f"(learnt L2 strength {log_lam.exp().item():.3g})"
    )
    print(
        f"inner solves: {iterations / OUTER_STEPS:.0f} L-BFGS iterations and "
        f"{products / OUTER_STEPS:.0f} Hessian-vector products (CG) per outer step on average"
    )

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot written")
            return
        images = (X_syn.detach() * data["scale"] + data["mean"]).reshape(-1, 8, 8)
        fig, axes = plt.subplots(args.ipc, CLASSES, figsize=(CLASSES, args.ipc), squeeze=False)
        for i, ax in enumerate(axes.T.flat):
            ax.imshow(images[i], cmap="gray_r")
            ax.set_title(str(y_syn[i].item()), fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"distilled images saved to {args.plot}")


if __name__ == "__main__":
    main()
