"""Hypergradient descent: SGD, SGDHD, Adam and AdamHD on scikit-learn's digits, from lr0 = 0.

Baydin et al. (ICLR 2018) learn the learning rate online by gradient descent on it. Their claim,
checked here on a logistic regression and a small MLP: the initial learning rate matters much
less, and even from lr0 = 0 the rate rises to a useful value. The script trains every model with
every optimizer from lr0 in {0, 1e-3, 1e-2} (minibatches of 128, the same initial weights and
batch order for every run) and prints the final training loss, and the final learning rate of
the HD variants. ``--plot FILE.png`` draws the loss curves and learning-rate trajectories
(needs matplotlib, an optional extra).

    python examples/hypergradient_descent.py [--plot hd.png]
    IMPLICIT_LAYERS_FAST=1 python examples/hypergradient_descent.py     # a short smoke run

Needs scikit-learn (``pip install implicit-layers[examples]``); the digits ship with it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from implicit_layers.optim import SGDHD, AdamHD

FAST = os.environ.get("IMPLICIT_LAYERS_FAST") == "1"
EPOCHS = 2 if FAST else 30
BATCH_SIZE = 128
MODELS = ("logreg", "mlp")
OPTIMIZERS = ("SGD", "SGDHD", "Adam", "AdamHD")
LR0S = (0.0, 1e-3, 1e-2)
# beta, one value per optimizer for both models: the largest of the sweep in
# benchmarks/hypergradient_descent.py with which neither model diverges (SGDHD's rate still dips
# below 0 for a few steps on the MLP; lr_bounds would stop that). The paper's values (1e-3 for
# SGD-HD, 1e-7 for Adam-HD, tuned on MNIST networks with 10^5-10^6 weights) move the rate of
# these small models too slowly.
HYPERGRAD_LR = {"SGDHD": 1e-2, "AdamHD": 1e-5}


@dataclass
class Run:
    """One training run: the full-training-set loss after each epoch (index 0: before training)
    and the learning rate after each step."""

    losses: list[float]
    lrs: list[float]


def load_digits() -> tuple[Tensor, Tensor]:
    """The 1797 8x8 digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)


def make_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "logreg":
        return nn.Linear(64, 10)
    return nn.Sequential(
        nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def make_optimizer(name: str, params, lr0: float, **options: Any) -> torch.optim.Optimizer:
    """``options`` (``hypergrad_lr``, ``lr_bounds``, ``multiplicative``) go to the HD variants."""
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr0)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr0)
    cls = {"SGDHD": SGDHD, "AdamHD": AdamHD}[name]
    return cls(params, lr=lr0, **({"hypergrad_lr": HYPERGRAD_LR[name]} | options))


def train(
    data: tuple[Tensor, Tensor],
    model_name: str,
    optimizer_name: str,
    lr0: float,
    epochs: int = EPOCHS,
    seed: int = 0,
    **options: Any,
) -> Run:
    """Minibatch training from ``make_model(model_name, seed)``; the batch order depends on
    ``seed`` only, so runs with the same seed see the same batches."""
    X, y = data
    model = make_model(model_name, seed)
    optimizer = make_optimizer(optimizer_name, model.parameters(), lr0, **options)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)

    def full_loss() -> float:
        with torch.no_grad():
            return loss_fn(model(X), y).item()

    run = Run(losses=[full_loss()], lrs=[])
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(BATCH_SIZE):
            optimizer.zero_grad()
            loss_fn(model(X[batch]), y[batch]).backward()
            optimizer.step()
            run.lrs.append(optimizer.param_groups[0]["lr"])
        run.losses.append(full_loss())
    return run


def run_grid(data: tuple[Tensor, Tensor], epochs: int = EPOCHS) -> dict[tuple, Run]:
    """``{(model, optimizer, lr0): Run}`` over MODELS x OPTIMIZERS x LR0S."""
    return {
        (model, optimizer, lr0): train(data, model, optimizer, lr0, epochs)
        for model in MODELS
        for optimizer in OPTIMIZERS
        for lr0 in LR0S
    }


def print_table(runs: dict[tuple, Run]) -> None:
    print(f"Final training loss after {EPOCHS} epochs [final lr of the HD variants]")
    print(f"{'model':<7} {'optimizer':<9}" + "".join(f"{f'lr0={lr0:g}':>22}" for lr0 in LR0S))
    for model in MODELS:
        for optimizer in OPTIMIZERS:
            cells = []
            for lr0 in LR0S:
                run = runs[model, optimizer, lr0]
                lr = f" [{run.lrs[-1]:.2e}]" if optimizer.endswith("HD") else ""
                cells.append(f"{run.losses[-1]:.4f}{lr}")
            print(f"{model:<7} {optimizer:<9}" + "".join(f"{cell:>22}" for cell in cells))


def plot(runs: dict[tuple, Run], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(MODELS), figsize=(6 * len(MODELS), 8), squeeze=False)
    colors = dict(zip(OPTIMIZERS, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    styles = dict(zip(LR0S, [":", "--", "-"]))
    for column, model in enumerate(MODELS):
        for (m, optimizer, lr0), run in runs.items():
            if m != model:
                continue
            label = f"{optimizer} lr0={lr0:g}"
            style = dict(color=colors[optimizer], linestyle=styles[lr0], label=label)
            axes[0, column].plot(range(len(run.losses)), run.losses, **style)
            axes[1, column].plot(range(1, len(run.lrs) + 1), run.lrs, **style)
        axes[0, column].set(title=model, xlabel="epoch", ylabel="training loss", yscale="log")
        axes[1, column].set(xlabel="iteration", ylabel="learning rate")
        axes[1, column].set_yscale("symlog", linthresh=1e-4)  # shows 0 and negative rates
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="PNG", help="write loss and lr curves to this file")
    args = parser.parse_args(argv)

    # Models this small gain nothing from threads, and one busy core makes two threads slow.
    torch.set_num_threads(1)
    runs = run_grid(load_digits())
    print_table(runs)
    if args.plot:
        try:
            plot(runs, args.plot)
        except ImportError:
            print("matplotlib is not installed: no plot (pip install implicit-layers[examples])")


if __name__ == "__main__":
    main()
