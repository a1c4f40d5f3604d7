"""A deep equilibrium classifier on scikit-learn's digits.

The model is ``Linear(64, h) -> DEQ -> Linear(h, 10)``. The DEQ's output is the equilibrium
``z* = tanh(W z* + x)`` of a one-layer cell, for the projected image ``x``; it is found by
Anderson acceleration and differentiated implicitly (GMRES on ``(I - J)^T u = dL/dz*``), so a
training step keeps one evaluation of the cell for the backward, however many iterations the
forward took.

The cell contracts by construction: its weight is ``W = 0.9 A / max(0.9, ||A||_F)``, so
``||W||_2 <= ||W||_F <= 0.9`` and, tanh being 1-Lipschitz, ``z -> tanh(W z + x)`` is a
0.9-contraction whatever training does to ``A``: every sample has one equilibrium and the solves
converge. With ``--cell plain`` the weight is free (started at spectral norm 0.3); training then
pushes ``||W||_2`` past 1, some samples stop converging within the budget and the loss jumps,
which the Jacobian penalty (Bai et al., 2021; ``--penalty``) is meant to prevent.

Each epoch prints the training loss and accuracy, the mean forward iterations of a batch (its
slowest sample's, ``last_forward.iterations``), the mean iterations of a sample until it met
the tolerance (``last_forward.sample_iterations``), the mean backward (GMRES) iterations, the
fraction of samples whose forward solve converged, the fraction whose share of the backward
residual met the tolerance on its own (GMRES judges the batch as one system;
``last_backward.sample_converged``), and ``||W||_2``.

Run: ``python examples/deq_digits.py`` (``IMPLICIT_LAYERS_FAST=1`` for a short run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from implicit_layers import GMRES, Anderson
from implicit_layers.nn import DEQ

FAST = os.environ.get("IMPLICIT_LAYERS_FAST") == "1"
EPOCHS = 2 if FAST else 30
TRAIN_LIMIT = 256 if FAST else None  # the fast run trains on a few batches
HIDDEN = 96
BATCH = 64
TOL = 1e-4


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + x)`` per sample; with ``normalised``, ``W = 0.9 A / max(0.9,
    ||A||_F)`` (a 0.9-contraction), else ``W = A``, started at spectral norm 0.3."""

    def __init__(self, hidden: int, normalised: bool):
        super().__init__()
        self.normalised = normalised
        self.linear = nn.Linear(hidden, hidden, bias=False)
        with torch.no_grad():
            self.linear.weight.mul_(0.3 / torch.linalg.matrix_norm(self.linear.weight, 2))

    def weight(self) -> torch.Tensor:
        A = self.linear.weight
        if not self.normalised:
            return A
        return A * (0.9 / torch.linalg.matrix_norm(A).clamp(min=0.9))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.weight().T + x)


class DEQClassifier(nn.Module):
    def __init__(self, hidden: int, normalised: bool):
        super().__init__()
        self.project = nn.Linear(64, hidden)
        self.deq = DEQ(
            TanhCell(hidden, normalised),
            solver=Anderson(tol=TOL, max_iter=50),
            backward=GMRES(tol=TOL, max_iter=50),
        )
        self.head = nn.Linear(hidden, 10)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, and the equilibrium with its input (for the Jacobian penalty)."""
        x = self.project(images)
        z = self.deq(x)
        return self.head(z), z, x


def digits() -> dict[str, torch.Tensor]:
    """The 1797 8x8 digits scaled to [0, 1], split 80/20 into train and test at random."""
    data = load_digits()
    generator = torch.Generator().manual_seed(0)
    X = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=generator)
    X, y = X[order], y[order]
    n = int(0.8 * len(y))
    return {"X_train": X[:n], "y_train": y[:n], "X_test": X[n:], "y_test": y[n:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=["normalised", "plain"], default="normalised")
    parser.add_argument("--penalty", type=float, default=0.0, help="Jacobian penalty weight")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    # The matrices are tiny (64 x 96): one thread beats two, whose synchronisation costs more
    # than it saves (and far more on a loaded machine).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = digits()
    X_train, y_train = data["X_train"][:TRAIN_LIMIT], data["y_train"][:TRAIN_LIMIT]
    model = DEQClassifier(HIDDEN, normalised=args.cell == "normalised")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    print(
        f"digits: {len(y_train)} train, {len(data['y_test'])} test; {args.cell} cell, hidden "
        f"{HIDDEN}, batch {BATCH}, Anderson(tol={TOL}) forward, GMRES(tol={TOL}) backward, "
        f"Jacobian penalty {args.penalty}"
    )
    print(
        "epoch   loss  train acc  fwd iter/batch  fwd iter/sample  bwd iter  converged  "
        "bwd met  ||W||_2    s"
    )
    start = time.perf_counter()
    for epoch in range(args.epochs):
        epoch_start = time.perf_counter()
        order = torch.randperm(len(y_train))
        losses, correct = [], 0
        forward, per_sample, backward, converged, met = [], [], [], [], []
        for first in range(0, len(y_train), BATCH):
            batch = order[first : first + BATCH]
            logits, z, x = model(X_train[batch])
            loss = F.cross_entropy(logits, y_train[batch])
            objective = loss
            if args.penalty > 0:
                objective = loss + args.penalty * model.deq.jacobian_penalty(z, x)
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
            record = model.deq.last_forward
            losses.append(loss.item())
            correct += int((logits.argmax(1) == y_train[batch]).sum())
            forward.append(record.iterations)
            per_sample.extend(record.sample_iterations)
            converged.extend(record.sample_converged)
            backward.append(model.deq.last_backward.iterations)
            met.extend(model.deq.last_backward.sample_converged)
        with torch.no_grad():
            norm = torch.linalg.matrix_norm(model.deq.cell.weight(), 2).item()
        print(
            f"{epoch:5d} {statistics.mean(losses):6.3f} {correct / len(y_train):10.3f} "
            f"{statistics.mean(forward):15.1f} {statistics.mean(per_sample):16.1f} "
            f"{statistics.mean(backward):9.1f} {statistics.mean(converged):10.3f} "
            f"{statistics.mean(met):8.3f} {norm:8.3f} "
            f"{time.perf_counter() - epoch_start:5.1f}"
        )
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        logits, _, _ = model(data["X_test"])
    test = (logits.argmax(1) == data["y_test"]).float().mean().item()
    print(f"test accuracy {test:.3f} after {args.epochs} epochs, {elapsed:.1f} s of training")
    print(f"test-set forward: {model.deq.last_forward.summary()}")


if __name__ == "__main__":
    main()
