"""Hypergradients past toy sizes: per-parameter weight decay of an MLP on digits, 1e4 to 1e6.

The inner problem is a two-hidden-layer tanh MLP (64 -> h -> h -> 10) on 512 of scikit-learn's
digits, float32, with one log weight decay per weight (as many hyperparameters as inner
parameters: Lorraine et al., 2020): ``f = cross_entropy + 0.5 sum(exp(lam) w^2)``, the outer
loss the cross-entropy on 512 other digits. ``h`` is chosen for about 1e4, 1e5 and 1e6 weights.
One hypergradient at the weights after a few SGD steps (the cost does not depend on where),
``k = 10`` Hessian-vector products, by our ``CG`` and by torchopt's ``custom_root`` +
``solve_cg`` and Betty's ``cg`` where they import (Betty from ``BETTY_PATH``).

Each (size, contender) runs in a fresh process, which reports the median time of 3
hypergradients after a warm-up, the products per second, and the growth of the process's
peak resident memory during them (``ru_maxrss`` after minus before), in units of the inner
model's gradient (one float32 per weight).

    python benchmarks/scale.py [--sizes 1e4 1e5 1e6] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

K = 10
WIDTHS = {"1e4": 70, "1e5": 280, "1e6": 960}


def problem(width: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 10),
    )
    names = [n for n, _ in model.named_parameters()]

    def inner(w, lam):
        logits = torch.func.functional_call(model, dict(zip(names, w)), (X[:512],))
        decay = sum((decay.exp() * p * p).sum() for p, decay in zip(w, lam))
        return torch.nn.functional.cross_entropy(logits, y[:512]) + 0.5 * decay

    def outer(w, lam):
        logits = torch.func.functional_call(model, dict(zip(names, w)), (X[512:1024],))
        return torch.nn.functional.cross_entropy(logits, y[512:1024])

    w = [p.detach().clone() for p in model.parameters()]
    # a decay of 1 per weight keeps the Hessian positive definite at these weights, so CG runs
    # its k iterations (a network's Hessian is indefinite elsewhere, where our CG stops at the
    # first direction of negative curvature and the peers' run on regardless)
    lam = [torch.zeros_like(p) for p in w]
    for _ in range(5):  # a few SGD steps: weights that are not the initial ones
        w_var = [p.requires_grad_() for p in w]
        grads = torch.autograd.grad(inner(w_var, lam), w_var)
        w = [(p - 0.5 * g).detach() for p, g in zip(w_var, grads)]
    return inner, outer, w, lam


def contender(name: str, inner, outer, w, lam):
    if name == "ours":
        from implicit_layers import CG, hypergradient

        def run():
            grads, record = hypergradient(inner, outer, w, lam, CG(max_iter=K, tol=0.0), "ignore")
            run.products, run.status = record.products, record.status.name
            return grads

        return run
    if name == "torchopt":
        import torchopt

        solve = torchopt.linear_solve.solve_cg(maxiter=K, rtol=0.0, atol=0.0)

        @torchopt.diff.implicit.custom_root(torch.func.grad(inner), argnums=1, solve=solve)
        def solver(w0, lam):
            return tuple(p.detach() for p in w0)

        def run():
            lam_var = [p.clone().requires_grad_() for p in lam]
            return torch.autograd.grad(outer(solver(w, lam_var), lam_var), lam_var)

        return run
    if name == "Betty":
        sys.path.insert(0, str(Path(__file__).parent))
        from peers import betty  # None when BETTY_PATH is not set or it does not import

        if betty is None:
            raise ImportError("Betty: BETTY_PATH is not set or it does not import")
        return _betty_run(inner, outer, w, lam, betty)
    raise ValueError(name)


def _betty_run(inner, outer, w, lam, betty):
    from types import SimpleNamespace

    config = SimpleNamespace(cg_iterations=K, cg_alpha=1.0)

    def run():
        w_vars = [p.clone().requires_grad_() for p in w]
        lam_vars = [p.clone().requires_grad_() for p in lam]
        g_w = torch.autograd.grad(outer(w_vars, lam_vars), w_vars)
        curr = SimpleNamespace(
            paths=[],
            config=config,
            cur_batch=None,
            training_step_exec=lambda batch: inner(w_vars, lam_vars),
            trainable_parameters=lambda: w_vars,
            parameters=lambda: w_vars,
        )
        prev = SimpleNamespace(trainable_parameters=lambda: lam_vars)
        return betty.cg(list(g_w), curr, prev, sync=False)

    return run


def measure(size: str, name: str) -> dict:
    """In this process: one contender at one size."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    inner, outer, w, lam = problem(WIDTHS[size])
    weights = sum(p.numel() for p in w)
    run = contender(name, inner, outer, w, lam)
    run()  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = statistics.median(times)
    growth = (after - before) * 1024
    products = getattr(run, "products", K)  # ours from its record; the peers run all K
    return dict(
        size=size,
        contender=name,
        weights=weights,
        products=products,
        status=getattr(run, "status", "-"),
        seconds=seconds,
        hvps_per_s=products / seconds,
        peak_growth_mb=growth / 2**20,
        gradients=growth / (4 * weights),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "CONTENDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    print(f"torch {torch.__version__}, 1 thread, k = {K} products, median of 3, float32")
    print(
        f"{'size':>5} {'weights':>9} {'contender':>9} {'s':>8} {'HVP/s':>7} "
        f"{'peak +MB':>9} {'x grad':>7}"
    )
    rows = []
    for size in args.sizes:
        for name in ("ours", "torchopt", "Betty"):
            done = subprocess.run(
                [sys.executable, __file__, "--one", size, name],
                capture_output=True,
                text=True,
                env=dict(os.environ),
            )
            if done.returncode != 0:
                print(
                    f"{size:>5} {'':>9} {name:>9} skipped: {done.stderr.strip().splitlines()[-1]}"
                )
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{size:>5} {row['weights']:>9} {name:>9} {row['seconds']:>8.3f} "
                f"{row['hvps_per_s']:>7.1f} {row['peak_growth_mb']:>9.1f} "
                f"{row['gradients']:>7.1f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(meta=dict(k=K), rows=rows), file)


if __name__ == "__main__":
    main()
