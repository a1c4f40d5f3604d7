"""SGDHD and AdamHD against SGD and Adam with a tuned learning rate, on scikit-learn's digits.

The claim under test (Baydin et al., ICLR 2018): the initial learning rate matters much less to
the HD variants; from lr0 = 0 the rate rises to a useful value and they reach a training loss at
least as low as the baseline whose rate was tuned. Training, models and data are those of
``examples/hypergradient_descent.py`` (same seed, initial weights and batches for every run).
Prints four tables: the baselines over a learning-rate grid, the HD variants from
lr0 in {0, 1e-3, 1e-2} against the best of that grid, the sensitivity to ``hypergrad_lr``
(including the paper's values) and to the safeguards, and the time per step.

    python benchmarks/hypergradient_descent.py [--epochs 30] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hypergradient_descent.py"
_spec = importlib.util.spec_from_file_location("hypergradient_descent_example", _EXAMPLE)
example = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

GRIDS = {"SGD": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "Adam": [1e-3, 3e-3, 1e-2, 3e-2, 0.1]}
HD_OF = {"SGD": "SGDHD", "Adam": "AdamHD"}
ROWS: dict[str, list[dict]] = {"baselines": [], "hd": [], "sensitivity": [], "step_times": []}
PAPER_BETA = {"SGDHD": 1e-3, "AdamHD": 1e-7}
BETAS = {"SGDHD": [1e-3, 1e-2, 3e-2], "AdamHD": [1e-7, 1e-6, 1e-5, 1e-4]}
SAFEGUARDS = {  # (label, lr0, options)
    "SGDHD": [
        ("multiplicative beta=0.1", 1e-3, dict(multiplicative=True, hypergrad_lr=0.1)),
        ("multiplicative beta=0.1", 1e-2, dict(multiplicative=True, hypergrad_lr=0.1)),
        ("beta=0.1, lr_bounds=(0, 0.5)", 0.0, dict(hypergrad_lr=0.1, lr_bounds=(0.0, 0.5))),
    ],
    "AdamHD": [
        ("multiplicative beta=0.1", 1e-3, dict(multiplicative=True, hypergrad_lr=0.1)),
        ("multiplicative beta=0.1", 1e-2, dict(multiplicative=True, hypergrad_lr=0.1)),
        ("beta=1e-4, lr_bounds=(0, 1)", 0.0, dict(hypergrad_lr=1e-4, lr_bounds=(0.0, 1.0))),
    ],
}


@dataclass
class Setup:
    data: tuple[torch.Tensor, torch.Tensor]
    epochs: int
    seeds: list[int]


def final(setup: Setup, model, optimizer, lr0, **options) -> tuple[float, float, float]:
    """Means over seeds of the final training loss, the final and the lowest learning rate."""
    runs = [
        example.train(setup.data, model, optimizer, lr0, setup.epochs, seed, **options)
        for seed in setup.seeds
    ]
    return (
        statistics.fmean(run.losses[-1] for run in runs),
        statistics.fmean(run.lrs[-1] for run in runs),
        statistics.fmean(min(run.lrs) for run in runs),
    )


def tuned_baselines(setup: Setup) -> dict[tuple[str, str], tuple[float, float]]:
    """``{(model, optimizer): (best lr, its loss)}``; prints the grid."""
    print("1. Baselines: final training loss over a learning-rate grid")
    best = {}
    for model in example.MODELS:
        for optimizer, grid in GRIDS.items():
            losses = [final(setup, model, optimizer, lr)[0] for lr in grid]
            cells = "  ".join(f"{lr:g}: {loss:.3g}" for lr, loss in zip(grid, losses))
            loss, lr = min(zip(losses, grid))
            best[model, optimizer] = (lr, loss)
            for lr_, loss_ in zip(grid, losses):
                ROWS["baselines"].append(dict(model=model, optimizer=optimizer, lr=lr_, loss=loss_))
            print(f"  {model:<7} {optimizer:<5} {cells}   best lr={lr:g}")
    return best


def hd_against_tuned(setup: Setup, best: dict) -> None:
    print(f"\n2. HD variants (beta {example.HYPERGRAD_LR}) against the tuned baseline")
    print(
        f"  {'model':<7} {'optimizer':<7} {'lr0':>6} {'loss':>9} {'final lr':>10} {'min lr':>10} "
        f"{'tuned loss':>11} {'HD/tuned':>9} {'baseline at lr0':>16}"
    )
    for model in example.MODELS:
        for base, hd in HD_OF.items():
            tuned_lr, tuned_loss = best[model, base]
            for lr0 in example.LR0S:
                loss, lr, low = final(setup, model, hd, lr0)
                untuned = final(setup, model, base, lr0)[0]
                ROWS["hd"].append(
                    dict(model=model, optimizer=hd, lr0=lr0, loss=loss, final_lr=lr, min_lr=low)
                    | dict(tuned_lr=tuned_lr, tuned_loss=tuned_loss, untuned_loss=untuned)
                )
                print(
                    f"  {model:<7} {hd:<7} {lr0:>6g} {loss:>9.3g} {lr:>10.2e} {low:>10.2e} "
                    f"{tuned_loss:>11.3g} {loss / tuned_loss:>9.2f} {untuned:>16.3g}"
                )


def sensitivity(setup: Setup, best: dict) -> None:
    print("\n3. Sensitivity: hypergrad_lr (beta) from lr0 = 0 (* the paper's value), safeguards")
    for model in example.MODELS:
        for base, hd in HD_OF.items():
            print(f"  {model} {hd} (tuned {base}: {best[model, base][1]:.3g})")
            for beta in BETAS[hd]:
                loss, lr, low = final(setup, model, hd, 0.0, hypergrad_lr=beta)
                mark = "*" if beta == PAPER_BETA[hd] else " "
                ROWS["sensitivity"].append(
                    dict(model=model, optimizer=hd, label=f"beta={beta:g}", lr0=0.0, loss=loss)
                    | dict(final_lr=lr, min_lr=low, paper=beta == PAPER_BETA[hd])
                )
                print(
                    f"    beta={beta:<8g}{mark} lr0=0     loss {loss:9.3g}  final lr {lr:10.2e}"
                    f"  min lr {low:10.2e}"
                )
            for label, lr0, options in SAFEGUARDS[hd]:
                loss, lr, low = final(setup, model, hd, lr0, **options)
                ROWS["sensitivity"].append(
                    dict(model=model, optimizer=hd, label=label, lr0=lr0, loss=loss)
                    | dict(final_lr=lr, min_lr=low, paper=False)
                )
                print(
                    f"    {label:<30} lr0={lr0:<5g} loss {loss:9.3g}  final lr {lr:10.2e}"
                    f"  min lr {low:10.2e}"
                )


def step_times(data: tuple[torch.Tensor, torch.Tensor], steps: int = 300) -> None:
    print(f"\n4. Time per step, MLP, batch {example.BATCH_SIZE}, one thread, median of 5 x {steps}")
    X, y = data
    batch = torch.arange(example.BATCH_SIZE)
    loss_fn = torch.nn.CrossEntropyLoss()
    for name in ("SGD", "SGDHD", "Adam", "AdamHD"):
        model = example.make_model("mlp")
        optimizer = example.make_optimizer(name, model.parameters(), 1e-3)
        totals, in_step = [], []
        for _ in range(5):
            start, stepping = time.perf_counter(), 0.0
            for _ in range(steps):
                optimizer.zero_grad()
                loss_fn(model(X[batch]), y[batch]).backward()
                before = time.perf_counter()
                optimizer.step()
                stepping += time.perf_counter() - before
            totals.append((time.perf_counter() - start) / steps)
            in_step.append(stepping / steps)
        ROWS["step_times"].append(
            dict(optimizer=name, step_us=statistics.median(in_step) * 1e6)
            | dict(iteration_us=statistics.median(totals) * 1e6)
        )
        print(
            f"  {name:<7} step() {statistics.median(in_step) * 1e6:6.0f} us,"
            f" whole iteration {statistics.median(totals) * 1e6:6.0f} us"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=example.EPOCHS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows printed to PATH")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in the example

    setup = Setup(example.load_digits(), args.epochs, args.seeds)
    start = time.perf_counter()
    print(
        f"digits: {len(setup.data[1])} samples, {setup.epochs} epochs of batches of "
        f"{example.BATCH_SIZE}, seeds {setup.seeds} (losses and rates: means over seeds)\n"
    )
    best = tuned_baselines(setup)
    hd_against_tuned(setup, best)
    sensitivity(setup, best)
    step_times(setup.data)
    if args.json:
        meta = dict(epochs=setup.epochs, seeds=setup.seeds, batch_size=example.BATCH_SIZE)
        meta |= dict(hypergrad_lr=example.HYPERGRAD_LR, threads=torch.get_num_threads())
        with open(args.json, "w") as file:
            json.dump(dict(meta=meta) | ROWS, file, indent=1)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
