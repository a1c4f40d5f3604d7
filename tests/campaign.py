"""The trust campaign: drawn problems over every layer kind and every backward solver that
applies, float32 and float64, cold and warm-started across changes of scale; each gradient is
compared with a dense float64 implicit-function-theorem reference computed here (not by the
library's checker) and counted as correct, loud (a warning or an error) or silently wrong.

    python tests/campaign.py --problems 5000        # about ten minutes on one core

Not part of the default test run. A problem is one draw of (kind, seed, size, dtype, scales);
each applicable backward solver runs on it, at the default tolerances (what a user gets). A
gradient is correct when its error is within what the solves' tolerances promise (times the
condition number of ``F_w``) plus ten times what the layer's dtype costs any method: the
difference between the dense solve with Jacobians taken in that dtype and in float64 (a tanh
saturated near -1 has a float32 derivative good to about 1e-3).
Nystrom is left out: it approximates ``(A + rho I)^-1`` by design, has no tolerance and records
its status as UNCHECKED with the residual it measured.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from registry import backward_solvers  # noqa: E402
from test_every_way import KINDS, build, dense_reference  # noqa: E402

from implicit_layers import (  # noqa: E402
    LBFGS,
    Anderson,
    ConvergenceError,
    ConvergenceWarning,
    Newton,
)

f32, f64 = torch.float32, torch.float64
DEFAULT_TOL = 1e-6


DEFAULT_SOLVERS = {"argmin": LBFGS(), "root": Newton()}  # the others: Anderson() below


def allowed_error(case, w: torch.Tensor, expected: torch.Tensor, dtype) -> float:
    """What solves at relative tolerance ``tol`` can promise: each solve's error times the
    condition number of ``F_w`` (from the dense Jacobian), plus the dtype's rounding."""
    shape = w.shape
    lam = case.lam.detach()
    flat = lambda v: case.residual(v.view(shape), lam).reshape(-1)  # noqa: E731
    F_w = torch.autograd.functional.jacobian(flat, w.detach().double().reshape(-1))
    condition = float(torch.linalg.cond(F_w))
    eps = torch.finfo(dtype).eps
    return 50 * condition * (DEFAULT_TOL + eps * condition) * float(expected.norm())


def run_one(kind: str, seed: int, n: int, dtype, entry, scales) -> str:
    """One layer on one problem, through every scale of the loss in turn (warm-started after
    the first): ``correct``, ``loud`` (a warning or an error) or ``silent`` (wrong, quietly)."""
    case = build(kind, seed, n, dtype, on_failure="warn")
    reference = build(kind, seed, n, dtype, reference=True)
    solver = DEFAULT_SOLVERS.get(kind, Anderson())
    layer = case.make(solver, entry.make(DEFAULT_TOL, 100))
    inner = getattr(layer, "deq", layer)
    inner.warm_start = len(scales) > 1
    wrong = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for scale in scales:
            try:
                w = layer(case.w0, case.lam)
                (grad,) = torch.autograd.grad(scale * (w * case.G).sum(), case.lam)
            except (ConvergenceError, ValueError, RuntimeError, TypeError):
                return "loud"
            expected = scale * dense_reference(reference, w.detach().double())
            # what the dtype's own evaluation of the function's derivatives costs any method:
            # the same dense solve, with the Jacobians taken in the layer's dtype
            in_dtype = scale * dense_reference(case, w.detach()).double()
            noise = 10 * float((in_dtype - expected).norm())
            error = float((grad.double() - expected).norm())
            if not error <= allowed_error(reference, w, expected, dtype) + noise + 1e-300:
                wrong = True
        loud = any(issubclass(c.category, ConvergenceWarning) for c in caught)
    if loud:
        return "loud"
    return "silent" if wrong else "correct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    counts: Counter = Counter()
    silent = []
    start = time.perf_counter()
    runs = 0
    for _ in range(args.problems):
        kind = rng.choice(KINDS)
        seed, n = rng.randrange(2**31), rng.randint(1, 8)
        dtype = rng.choice([f32, f64])
        scales = rng.choice([[1.0], [1.0, 1e-4], [1.0, 1e-30, 1e4], [1e3, 1e-8]])
        system = build(kind, 0, 2).system
        for entry in backward_solvers(system):
            if entry.name == "Nystrom":  # an approximation by design (UNCHECKED): not judged
                continue
            outcome = run_one(kind, seed, n, dtype, entry, scales)
            counts[(kind, str(dtype)[6:], outcome)] += 1
            runs += 1
            if outcome == "silent":
                silent.append((kind, seed, n, dtype, entry.name, scales))
    elapsed = time.perf_counter() - start
    print(f"{args.problems} problems, {runs} layer runs, {elapsed:.0f} s")
    print("| kind | dtype | correct | loud | silently wrong |")
    print("|---|---|--:|--:|--:|")
    for kind in KINDS:
        for dtype in ("float32", "float64"):
            row = [counts[(kind, dtype, o)] for o in ("correct", "loud", "silent")]
            print(f"| {kind} | {dtype} | " + " | ".join(map(str, row)) + " |")
    totals = [
        sum(v for (_, _, o), v in counts.items() if o == k) for k in ("correct", "loud", "silent")
    ]
    print(f"| all | | {totals[0]} | {totals[1]} | {totals[2]} |")
    for item in silent[:20]:
        print("silent:", item)


if __name__ == "__main__":
    main()
