"""Per-feature weight decay for logistic regression on digits, the data sharded over two ranks.

Each of two processes holds half of the training and of the validation set. A
``BilevelTrainer`` with ``process_group`` averages the inner gradients over the ranks before
each SGD step (as ``DistributedDataParallel`` does) and the hypergradient's right-hand side,
products and parameter gradients before each outer step, so both ranks take the steps one
process would take on all the data. Rank 0 prints the validation loss, the test accuracy and
the communication each hypergradient cost; at the end it checks the ranks hold the same
hyperparameters.

Run: ``torchrun --standalone --nproc_per_node=2 examples/distributed_weight_decay.py``; run without
``torchrun`` it launches itself under it (``IMPLICIT_LAYERS_FAST=1`` for a short run).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

from implicit_layers import CG, BilevelTrainer

FAST = os.environ.get("IMPLICIT_LAYERS_FAST") == "1"
INNER_STEPS = 60 if FAST else 600


def digits(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Digits 3 against 8, standardised, split into train/val/test; train and val sharded."""
    data = load_digits()
    keep = (data.target == 3) | (data.target == 8)
    X = torch.tensor(data.data[keep], dtype=torch.float64)
    y = torch.tensor(data.target[keep] == 8, dtype=torch.float64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = (X[order] - X.mean(0)) / (X.std(0) + 1.0), y[order]
    splits = {"train": (0, 120), "val": (120, 240), "test": (240, len(y))}
    out = {}
    for part, (start, stop) in splits.items():
        if part != "test":  # each rank its own, equal share
            shard = (stop - start) // world
            start, stop = start + rank * shard, start + (rank + 1) * shard
        out[f"X_{part}"], out[f"y_{part}"] = X[start:stop], y[start:stop]
    return out


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = digits(rank, world)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1, dtype=torch.float64)
    log_decay = torch.full((64,), -3.0, dtype=torch.float64, requires_grad=True)

    def inner_loss(model, log_decay, batch):
        X, y = batch
        fit = torch.nn.functional.binary_cross_entropy_with_logits(model(X)[:, 0], y)
        return fit + 0.5 * (log_decay.exp() * model.weight[0] ** 2).sum()

    def outer_loss(model, log_decay, batch):
        X, y = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(model(X)[:, 0], y)

    def show(log):
        if rank == 0 and log.outer_step % (2 if FAST else 10) == 0:
            print(
                f"outer step {log.outer_step:3d}: validation loss (rank 0's shard) "
                f"{log.outer_loss:.4f}; {log.record.products} products, "
                f"{log.record.all_reduces} all-reduces, {log.record.reduced_bytes} bytes"
            )

    trainer = BilevelTrainer(
        model,
        log_decay,
        inner_loss,
        outer_loss,
        [(data["X_train"], data["y_train"])],
        [(data["X_val"], data["y_val"])],
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        outer_optimizer=torch.optim.Adam([log_decay], lr=0.05),
        method=CG(max_iter=20, tol=1e-6),
        unroll_steps=10,
        outer_patience_iters=20,
        callback=show,
        progress=False,
        on_failure="ignore",
        process_group=dist.group.WORLD,
    )
    trainer.run(INNER_STEPS)
    gathered = [torch.empty_like(log_decay) for _ in range(world)]
    dist.all_gather(gathered, log_decay.detach())
    if rank == 0:
        with torch.no_grad():
            logits = model(data["X_test"])[:, 0]
            accuracy = ((logits > 0).double() == data["y_test"]).double().mean()
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"test accuracy {accuracy:.3f}; every rank holds the same hyperparameters: {same}")
        if not same:
            raise SystemExit("the ranks disagree")
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:  # started by torchrun
        main()
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node=2", __file__]  # --standalone: a free port of its own
        sys.exit(subprocess.run(command, check=False).returncode)
