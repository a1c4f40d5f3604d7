"""Memory and time of one hypergradient by ``unroll`` in its three modes. Prints a table.

The inner loop is SGD with momentum 0.9 on a problem whose learning rate, momentum and weight
decay are the hyperparameters (all three get gradients). Memory is counted with
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves for backward, counted
once per storage and only while it is alive. Two numbers:

* kept: what the graph holds between the forward and the backward (for ``Recompute`` these are
  its stored iterates, which it saves for backward like any other tensor);
* peak: the most held at any moment of forward and backward (``Recompute`` rebuilds one step's
  graph at a time in the backward, ``Truncated`` builds and drops one in its first steps).

The data (``X``, ``y``), which the caller holds anyway, are not counted. Problems:

* ``ridge``: ``0.5 ||X w - y||^2 / n + 0.5 decay ||w||^2``, ``X`` of ``n x d``, ``w`` of ``d``.
* ``mlp``: a one-hidden-layer tanh regression network on ``n`` samples; the activations
  (``n x hidden``) dominate a step's graph, as they do for the networks of meta-learning.

Run ``python benchmarks/unroll_memory.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time

import torch
from saved_memory import SavedMemory

from implicit_layers._functional_optim import gradient_step, sgd
from implicit_layers._tree import tree_flatten
from implicit_layers._unroll import Full, Recompute, Truncated, unroll


def ridge(n: int, d: int, generator: torch.Generator):
    X = torch.randn(n, d, generator=generator) / d**0.5
    y = X @ torch.randn(d, generator=generator) + 0.1 * torch.randn(n, generator=generator)

    def inner_loss(w, lam):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * lam["decay"] * (w * w).sum()

    return inner_loss, torch.zeros(d), (X, y), 0.5


def mlp(n: int, hidden: int, generator: torch.Generator, features: int = 32):
    X = torch.randn(n, features, generator=generator)
    y = torch.sin(X[:, :1] * 2).squeeze(1)
    params = {
        "W1": torch.randn(features, hidden, generator=generator) / features**0.5,
        "W2": torch.randn(hidden, generator=generator) / hidden**0.5,
    }

    def inner_loss(p, lam):
        out = torch.tanh(X @ p["W1"]) @ p["W2"]
        decay = (p["W1"] ** 2).sum() + (p["W2"] ** 2).sum()
        return 0.5 * ((out - y) ** 2).mean() + 0.5 * lam["decay"] * decay

    return inner_loss, params, (X, y), 0.05


def hypergradient(inner_loss, w0, data, lr, steps: int, mode, memory: SavedMemory | None = None):
    """d/d(decay, lr, momentum) of ``||w_T||^2``, with the saved tensors counted in ``memory``."""
    lam = {
        "decay": torch.tensor(1e-2, requires_grad=True),
        "lr": torch.tensor(lr, requires_grad=True),
        "momentum": torch.tensor(0.9, requires_grad=True),
    }
    step = gradient_step(inner_loss, lambda lam: sgd(lam["lr"], momentum=lam["momentum"]))
    iterate = (w0, sgd(lr, momentum=0.9).init(w0))
    with memory.hooks() if memory is not None else contextlib.nullcontext():
        params, _ = unroll(step, iterate, lam, steps, mode=mode)
        if memory is not None:
            memory.kept = memory.live
        outer = sum((p * p).sum() for p in tree_flatten(params)[0])
        return list(torch.autograd.grad(outer, list(lam.values())))


def timings(problem, steps: int, modes: dict, repeats: int) -> dict[str, float]:
    """Median seconds per hypergradient of each mode, without hooks, the modes taken in turn
    (at least ``repeats`` runs each, more for fast ones, up to a second each)."""
    times: dict[str, list[float]] = {label: [] for label in modes}
    while any(len(t) < repeats or (sum(t) < 1.0 and len(t) < 20) for t in times.values()):
        for label, mode in modes.items():
            gc.collect()
            start = time.perf_counter()
            hypergradient(*problem, steps, mode)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def megabytes(size: int) -> str:
    return f"{size / 2**20:9.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="also write the rows printed to PATH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    if args.quick:
        problems = {"ridge n=100 d=200": ridge(100, 200, generator)}
        horizons, repeats = (10, 20), 1
    else:
        problems = {
            "ridge n=1000 d=2000": ridge(1000, 2000, generator),
            "ridge n=10000 d=2000": ridge(10000, 2000, generator),
            "mlp n=512 hidden=256": mlp(512, 256, generator),
        }
        horizons, repeats = (10, 50, 200), 3
    modes = {"Full": Full(), "Recompute": Recompute(), "Truncated(k=10)": Truncated(k=10)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    header = f"{'problem':22} {'T':>4} {'mode':16} {'kept MiB':>9} {'peak MiB':>9} {'ms':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    for name, problem in problems.items():
        size = sum(p.numel() * p.element_size() for p in tree_flatten(problem[1])[0])
        print(
            f"{name}: w is {size / 2**20:.3f} MiB; (w, momentum buffer) {2 * size / 2**20:.3f} MiB"
        )
        for steps in horizons:
            memories, grads = {}, {}
            for label, mode in modes.items():
                memories[label] = SavedMemory(exclude=problem[2])
                grads[label] = hypergradient(*problem, steps, mode, memories[label])
            for g, r in zip(grads["Recompute"], grads["Full"]):  # to float32 rounding
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
            seconds = timings(problem, steps, modes, repeats)
            for label in modes:
                rows.append(
                    dict(problem=name, steps=steps, mode=label, kept=memories[label].kept)
                    | dict(peak=memories[label].peak, ms=seconds[label] * 1e3, w_bytes=size)
                )
                print(
                    f"{name:22} {steps:4} {label:16} {megabytes(memories[label].kept)} "
                    f"{megabytes(memories[label].peak)} {seconds[label] * 1e3:9.1f}"
                )

    if args.json:
        meta = dict(threads=torch.get_num_threads(), torch=torch.__version__, dtype="float32")
        with open(args.json, "w") as file:
            json.dump(dict(meta=meta, rows=rows), file, indent=1)


if __name__ == "__main__":
    main()
