"""Data hyper-cleaning on scikit-learn's digits: learn one weight per training sample.

A fraction of the training labels is replaced by a wrong class (Franceschi et al., 2017; Shaban
et al., 2019). Each training sample ``i`` gets a weight ``sigmoid(h_i)`` in the inner problem,
a weighted multinomial logistic regression with a small L2 penalty, solved by an
``argmin_layer`` (L-BFGS forward, CG on the Hessian backward). Adam on ``h`` minimises the
cross-entropy on a small clean validation set. The learnt weights should then single out the
corrupted samples: the script reports their mean weight against that of the clean ones, and
the precision of flagging the lowest-weighted samples as corrupted.

Run: ``python examples/data_hypercleaning.py`` (``IMPLICIT_LAYERS_FAST=1`` for a short run).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from implicit_layers import CG, LBFGS, argmin_layer

FAST = os.environ.get("IMPLICIT_LAYERS_FAST") == "1"
OUTER_STEPS = 3 if FAST else 60
N_TRAIN, N_VAL = 500, 200
CORRUPTED = 0.4  # the fraction of training labels replaced by a wrong class
L2 = 1e-3
CLASSES = 10


def corrupted_digits() -> dict[str, torch.Tensor]:
    """Standardised digits with a bias column; a fraction of training labels made wrong."""
    digits = load_digits()
    generator = torch.Generator().manual_seed(0)
    X = torch.tensor(digits.data, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=generator)
    X, y = X[order], y[order]
    X = (X - X.mean(0)) / (X.std(0) + 1.0)
    X = torch.cat([X, torch.ones(len(y), 1, dtype=torch.float64)], dim=1)
    data = {
        "X_train": X[:N_TRAIN],
        "y_clean": y[:N_TRAIN],
        "X_val": X[N_TRAIN : N_TRAIN + N_VAL],
        "y_val": y[N_TRAIN : N_TRAIN + N_VAL],
        "X_test": X[N_TRAIN + N_VAL :],
        "y_test": y[N_TRAIN + N_VAL :],
    }
    flip = torch.rand(N_TRAIN, generator=generator) < CORRUPTED
    shift = torch.randint(1, CLASSES, (N_TRAIN,), generator=generator)  # never the true class
    data["y_train"] = torch.where(flip, (data["y_clean"] + shift) % CLASSES, data["y_clean"])
    data["corrupted"] = flip
    return data


def weighted_loss(
    W: torch.Tensor, h: torch.Tensor, X: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The inner problem: sample-weighted softmax cross-entropy plus a small L2 penalty."""
    losses = F.cross_entropy(X @ W, y, reduction="none")
    return (torch.sigmoid(h) * losses).mean() + 0.5 * L2 * (W * W).sum()


def report(label: str, W: torch.Tensor, h: torch.Tensor, data: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        val_loss = F.cross_entropy(data["X_val"] @ W, data["y_val"]).item()
        accuracy = ((data["X_test"] @ W).argmax(1) == data["y_test"]).double().mean().item()
        weights, corrupted = torch.sigmoid(h), data["corrupted"]
        n_flag = int(corrupted.sum())
        flagged = weights.argsort()[:n_flag]  # as many lowest weights as there are bad labels
        precision = corrupted[flagged].double().mean().item()
        auc = roc_auc_score(corrupted.numpy(), -weights.numpy()) if h.std() > 0 else 0.5
    print(
        f"{label:6s} validation loss {val_loss:.4f}, test accuracy {accuracy:.3f}, mean weight "
        f"corrupted {weights[corrupted].mean():.3f} / clean {weights[~corrupted].mean():.3f}, "
        f"precision of the {n_flag} lowest weights {precision:.3f}, AUC {auc:.3f}"
    )


def main() -> None:
    torch.manual_seed(0)
    data = corrupted_digits()
    X, y = data["X_train"], data["y_train"]
    print(
        f"digits: {N_TRAIN} train ({int(data['corrupted'].sum())} labels corrupted), {N_VAL} "
        f"clean validation, {len(data['y_test'])} test samples, {X.shape[1]} features"
    )

    layer = argmin_layer(
        lambda W, h: weighted_loss(W, h, X, y),
        solver=LBFGS(tol=1e-6, max_iter=1000),
        backward=CG(tol=1e-6, max_iter=1000),
    )
    h = torch.zeros(N_TRAIN, dtype=torch.float64, requires_grad=True)  # all weights 1/2
    optimizer = torch.optim.Adam([h], lr=0.3)
    # Every inner solve starts cold, from zero weights.
    W0 = torch.zeros(X.shape[1], CLASSES, dtype=torch.float64)

    report("before", layer(W0, h.detach()), h.detach(), data)
    for step in range(OUTER_STEPS):
        W = layer(W0, h)
        loss = F.cross_entropy(data["X_val"] @ W, data["y_val"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == OUTER_STEPS - 1:
            print(
                f"  step {step:3d}: validation loss {loss.item():.4f}; "
                f"{layer.last_forward.summary()}; {layer.last_backward.summary()}"
            )
    report("after", layer(W0, h.detach()), h.detach(), data)


if __name__ == "__main__":
    main()
