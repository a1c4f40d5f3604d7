"""``DEQ`` forward solvers and backward modes on ``z = tanh(W z + U x + b)``, against torchdeq.

Hidden size 256, input size 64, batch 64, at two conditionings of ``W``:

* ``gaussian``: ``W`` Gaussian, scaled to spectral norm 0.9 (its eigenvalues fill a disc of
  radius about 0.45: an easy fixed point);
* ``orthogonal``: ``W = 0.9 Q`` with ``Q`` a random orthogonal matrix, every singular value 0.9
  (eigenvalues on the circle of radius 0.9: hard for plain iteration and for Krylov methods).

``U`` is Gaussian over ``sqrt(64)``, ``b`` of scale 0.1, ``z0 = 0``, the loss ``<G, z*>`` for a
fixed Gaussian ``G``. Gradients (in ``W, U, b`` and ``x``, one vector) are compared with the
dense implicit-function-theorem gradient per sample in float64 at ``z*`` from Newton's method.

Stopping rule, matched to torchdeq's ``stop_mode='rel'`` (its default is ``'abs'``, tol 1e-3):
torchdeq stops a solve once ``max_i ||f(z_i) - z_i|| / (||f(z_i)|| + 1e-9) < tol`` over the
batch; we stop each sample once ``||f(z_i) - z_i|| <= tol ||z_i||`` (``atol = 0``), so at
equal ``tol`` both stop when the slowest sample meets the same relative residual. Backward:
torchdeq's ``b_tol`` in ``'rel'`` mode judges ``||J^T u + g - u||`` against ``||J^T u + g||``
(about ``||u||``); ours against ``||g||`` (per sample for the fixed-point solvers, over the
whole batch for GMRES and Neumann). torchdeq's fixed-point and Anderson solvers return ``f`` of
the iterate they judged (Broyden the iterate) and its IFT output applies ``f`` once more (a
counted evaluation); ours return ``f`` of the iterate judged (``final_step``, no evaluation
more). Both evaluate the cell on the whole batch until the slowest sample converges. torchdeq
steps every sample meanwhile; ours judge each sample on its own and, once it converged, step
it on for free (``refine=True``, the default), keeping its smallest residual from then on;
the ``refine=False`` rows freeze it where it met ``tol``. Each library keeps its own solver
defaults otherwise (Anderson memory 5 vs 6, regularisation relative vs absolute 1e-4; both
Broydens keep one term per iteration).

Columns:

* ``fwd evals``: calls of the cell in the forward (on the whole batch), ``bwd evals`` and
  ``bwd VJPs``: calls of the cell and vector-Jacobian products through it in the backward,
  counted on the cell itself, so the same for both libraries;
* ``rel res``: the largest relative residual ``||f(z) - z|| / ||z||`` of a sample of the
  returned ``z`` (float64), ``z err`` and ``grad err``: relative errors against the reference;
* ``ms``: median over interleaved repeats; ``saved KiB``: tensors saved for backward by the
  forward and alive when it returns, one count per storage, the cell's parameters and ``x``
  (held anyway) not counted.

Run ``python benchmarks/deq.py`` (``--quick`` for a smoke run, ``--repeats`` to change the
number of timed repeats, ``--threads`` to pin torch's threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from saved_memory import SavedMemory
from torch import nn

from implicit_layers import GMRES, Anderson, Broyden, FixedPoint, Neumann
from implicit_layers.nn import DEQ, JacobianFree, Phantom, Unrolled

try:
    import torchdeq
    from torchdeq import get_deq
except ImportError:  # optional: pip install torchdeq
    torchdeq = None

HIDDEN, INPUT, BATCH, RHO = 256, 64, 64, 0.9
MAX_ITER = 300
ROWS: dict[str, list[dict]] = {"forward": [], "backward": [], "memory": []}  # for --json
f64 = torch.float64


class _CountVJPs(torch.autograd.Function):
    """The identity, counting the products that flow back through it."""

    @staticmethod
    def forward(ctx, out, cell):
        ctx.cell = cell
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.cell.vjps += 1
        return grad, None


class TanhCell(nn.Module):
    """``tanh(W z + U x + b)``; with ``counting`` on, counts its calls and its VJPs."""

    def __init__(self, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.W, self.U, self.b = (nn.Parameter(t.clone()) for t in (W, U, b))
        self.counting, self.evaluations, self.vjps = False, 0, 0

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(z @ self.W.T + x @ self.U.T + self.b)
        if self.counting:
            self.evaluations += 1
            if out.requires_grad:
                out = _CountVJPs.apply(out, self)
        return out


@dataclass
class Problem:
    name: str
    cell: TanhCell  # in the benchmark's dtype
    x: torch.Tensor  # requires grad
    G: torch.Tensor
    z_ref: torch.Tensor  # float64
    grad_ref: torch.Tensor  # float64, (W, U, b, x) flattened
    params64: tuple[torch.Tensor, ...] = field(default=())

    def z0(self) -> torch.Tensor:
        return self.x.new_zeros(self.x.shape[0], HIDDEN)

    def gradient(self) -> torch.Tensor:
        grads = [p.grad for p in (self.cell.W, self.cell.U, self.cell.b)] + [self.x.grad]
        return torch.cat([g.reshape(-1).to(f64) for g in grads])

    def relative_residual(self, z: torch.Tensor) -> float:
        W, U, b = self.params64
        z = z.detach().to(f64)
        r = torch.tanh(z @ W.T + self.x.detach().to(f64) @ U.T + b) - z
        return float((r.norm(dim=1) / z.norm(dim=1)).max())


def make_problem(conditioning: str, dtype: torch.dtype, seed: int = 0) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(HIDDEN, HIDDEN, generator=generator, dtype=f64)
    if conditioning == "gaussian":
        W = RHO * A / torch.linalg.matrix_norm(A, 2)
    else:
        Q, R = torch.linalg.qr(A)
        W = RHO * Q * torch.sign(torch.diagonal(R))  # Haar-distributed orthogonal matrix
    U = torch.randn(HIDDEN, INPUT, generator=generator, dtype=f64) / math.sqrt(INPUT)
    b = 0.1 * torch.randn(HIDDEN, generator=generator, dtype=f64)
    x = torch.randn(BATCH, INPUT, generator=generator, dtype=f64)
    G = torch.randn(BATCH, HIDDEN, generator=generator, dtype=f64)
    z_ref, grad_ref = reference(W, U, b, x, G)
    return Problem(
        name=conditioning,
        cell=TanhCell(W.to(dtype), U.to(dtype), b.to(dtype)),
        x=x.to(dtype).requires_grad_(),
        G=G.to(dtype),
        z_ref=z_ref,
        grad_ref=grad_ref,
        params64=(W, U, b),
    )


def reference(W, U, b, x, G) -> tuple[torch.Tensor, torch.Tensor]:
    """``z*`` by Newton's method per sample and ``dL/d(W, U, b, x)`` for ``L = <G, z*>`` by the
    implicit function theorem, densely, in float64: ``u_i = (I - J_i)^{-T} g_i`` with
    ``J_i = diag(1 - z_i^2) W``."""
    z = torch.zeros(x.shape[0], W.shape[0], dtype=f64)
    eye = torch.eye(W.shape[0], dtype=f64)
    drive = x @ U.T + b
    for _ in range(50):
        out = torch.tanh(z @ W.T + drive)
        residual = z - out
        if float(residual.abs().max()) < 1e-15:
            break
        jacobian = eye - (1 - out**2)[:, :, None] * W
        z = z - torch.linalg.solve(jacobian, residual.unsqueeze(2)).squeeze(2)
    slope = 1 - z**2
    systems = (eye - slope[:, :, None] * W).transpose(1, 2)
    u = torch.linalg.solve(systems, G.unsqueeze(2)).squeeze(2)
    v = slope * u
    grads = (v.T @ z, v.T @ x, v.sum(0), v @ U)
    return z, torch.cat([g.reshape(-1) for g in grads])


# --- contenders: each is a forward() -> z; the backward is always <G, z>.backward() ----------


def ours(problem: Problem, solver, backward) -> Callable[[], torch.Tensor]:
    deq = DEQ(problem.cell, solver=solver, backward=backward, on_failure="ignore")
    return lambda: deq(problem.x, problem.z0())


def theirs(problem: Problem, f_solver: str, tol: float, max_iter: int, **grad) -> Callable:
    """torchdeq with relative stopping at ``tol``; ``grad`` is ``b_solver=...`` for implicit
    differentiation (IFT) or ``grad=k, tau=...`` for phantom gradients."""
    options = dict(f_solver=f_solver, f_tol=tol, f_stop_mode="rel", f_max_iter=max_iter)
    if "b_solver" in grad:
        options.update(ift=True, b_tol=tol, b_stop_mode="rel", b_max_iter=max_iter)
    deq = get_deq(**options, **grad)
    cell, x = problem.cell, problem.x

    def forward() -> torch.Tensor:
        z_out, _ = deq(lambda z: cell(z, x), problem.z0())
        return z_out[-1]

    return forward


def autograd_loop(problem: Problem, tol: float, max_iter: int) -> Callable[[], torch.Tensor]:
    """Plain fixed-point iteration kept on autograd's tape, stopped by the same rule."""
    cell, x = problem.cell, problem.x

    def forward() -> torch.Tensor:
        z = problem.z0()
        for _ in range(max_iter):
            new = cell(z, x)
            done = bool(((new - z).norm(dim=1) <= tol * z.norm(dim=1)).all())
            z = new
            if done:
                break
        return z

    return forward


# --- measurements ---------------------------------------------------------------------------


def backward(problem: Problem, z: torch.Tensor) -> None:
    (z * problem.G).sum().backward()


def clear(problem: Problem) -> None:
    problem.cell.zero_grad(set_to_none=True)
    problem.x.grad = None


@dataclass
class Result:
    fwd_evals: int = 0
    bwd_evals: int = 0
    bwd_vjps: int = 0
    rel_res: float = math.nan
    z_err: float = math.nan
    grad_err: float = math.nan
    saved: int = 0
    fwd_ms: float = math.nan
    total_ms: float = math.nan


def measure_once(problem: Problem, forward: Callable[[], torch.Tensor]) -> Result:
    """Counts and errors of one forward and backward; the memory saved by another forward.

    The memory is measured on a forward of its own, so the counting hooks never touch the
    forward and backward whose counts and errors are reported."""
    cell, result = problem.cell, Result()
    clear(problem)
    cell.counting, cell.evaluations, cell.vjps = True, 0, 0
    try:
        z = forward()
        result.fwd_evals, cell.evaluations = cell.evaluations, 0
        backward(problem, z)
        result.bwd_evals, result.bwd_vjps = cell.evaluations, cell.vjps
    finally:
        cell.counting = False
    result.rel_res = problem.relative_residual(z)
    result.z_err = float((z.detach().to(f64) - problem.z_ref).norm() / problem.z_ref.norm())
    error = (problem.gradient() - problem.grad_ref).norm() / problem.grad_ref.norm()
    result.grad_err = float(error)
    result.saved = saved_memory(problem, forward)
    return result


def saved_memory(problem: Problem, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes saved for backward by ``forward`` and alive when it returns; the graph is then
    dropped undifferentiated."""
    memory = SavedMemory(exclude=(problem.x, *problem.cell.parameters()))
    with memory.hooks():
        z = forward()
    gc.collect()
    saved = memory.live
    del z
    return saved


def median_times(functions: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each function, sampled alternately so that drift in the machine's
    load hits every contender alike."""
    for function in functions:
        function()  # warm-up
    samples: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for function, times in zip(functions, samples):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in samples]


def measure(problem: Problem, contenders: dict[str, Callable], repeats: int, forward_too: bool):
    results = {label: measure_once(problem, forward) for label, forward in contenders.items()}

    def full(forward):
        def run():
            clear(problem)
            backward(problem, forward())

        return run

    def forward_only(forward):
        def run():
            forward()

        return run

    timed = [full(f) for f in contenders.values()]
    if forward_too:
        timed += [forward_only(f) for f in contenders.values()]
    times = median_times(timed, repeats)
    labels = list(contenders)
    for label, seconds in zip(labels, times):
        results[label].total_ms = 1e3 * seconds
    if forward_too:
        for label, seconds in zip(labels, times[len(labels) :]):
            results[label].fwd_ms = 1e3 * seconds
    return results


# --- tables ---------------------------------------------------------------------------------

Column = tuple[str, int, Callable[[Result], str]]  # name, width, the cell of a result


def print_rows(
    kind: str,
    problem: Problem,
    tol: float,
    results: dict[str, Result],
    label_width: int,
    columns: list[Column],
) -> None:
    """Print ``results`` as a table under ``columns``, and keep them in ``ROWS[kind]``."""
    header = f"{'contender':{label_width}}" + "".join(f"{n:>{w}}" for n, w, _ in columns)
    print(header)
    print("-" * len(header))
    for label, r in results.items():
        ROWS[kind].append(
            dict(problem=problem.name, tol=tol, contender=label) | dataclasses.asdict(r)
        )
        print(f"{label:{label_width}}" + "".join(f"{cell(r):>{w}}" for _, w, cell in columns))


FORWARD_PAIRS = [  # (our solver, torchdeq's name)
    (FixedPoint, "fixed_point_iter"),
    (Anderson, "anderson"),
    (Broyden, "broyden"),
]


def forward_table(problem: Problem, tol: float, repeats: int) -> None:
    contenders = {}
    for solver, name in FORWARD_PAIRS:
        method = solver(tol=tol, max_iter=MAX_ITER)
        label = f"ours   {solver.__name__}+adjoint {solver.__name__}"
        contenders[label] = ours(problem, method, method)
        frozen = solver(tol=tol, max_iter=MAX_ITER, refine=False)
        contenders[f"{label}, refine=False"] = ours(problem, frozen, frozen)
        if torchdeq is not None:
            contenders[f"torchdeq {name}+IFT {name}"] = theirs(
                problem, name, tol, MAX_ITER, b_solver=name
            )
    results = measure(problem, contenders, repeats, forward_too=True)
    print(
        f"\n[{problem.name}] forward solvers at tol {tol:.0e}; backward: the same solver on "
        "u = J^T u + g, same tol"
    )
    columns = [
        ("fwd evals", 10, lambda r: f"{r.fwd_evals}"),
        ("bwd VJPs", 10, lambda r: f"{r.bwd_vjps}"),
        ("rel res", 10, lambda r: f"{r.rel_res:.1e}"),
        ("z err", 10, lambda r: f"{r.z_err:.1e}"),
        ("grad err", 10, lambda r: f"{r.grad_err:.1e}"),
        ("fwd ms", 10, lambda r: f"{r.fwd_ms:.2f}"),
        ("fwd+bwd ms", 12, lambda r: f"{r.total_ms:.2f}"),
    ]
    print_rows("forward", problem, tol, results, 58, columns)


def backward_table(problem: Problem, tol: float, repeats: int) -> None:
    solver = Anderson(tol=tol, max_iter=MAX_ITER)
    contenders = {
        "ours   GMRES": ours(problem, solver, GMRES(tol=tol, max_iter=MAX_ITER)),
        "ours   Anderson (adjoint)": ours(problem, solver, Anderson(tol=tol, max_iter=MAX_ITER)),
        "ours   Neumann": ours(problem, solver, Neumann(tol=tol, max_iter=MAX_ITER)),
        "ours   Phantom(5, 0.5)": ours(problem, solver, Phantom(steps=5, damping=0.5)),
        "ours   JacobianFree": ours(problem, solver, JacobianFree()),
        "ours   Unrolled": ours(problem, solver, Unrolled()),
    }
    if torchdeq is not None:
        contenders.update(
            {
                "torchdeq IFT anderson": theirs(
                    problem, "anderson", tol, MAX_ITER, b_solver="anderson"
                ),
                "torchdeq IFT fixed_point_iter": theirs(
                    problem, "anderson", tol, MAX_ITER, b_solver="fixed_point_iter"
                ),
                "torchdeq phantom grad=5 tau=0.5": theirs(
                    problem, "anderson", tol, MAX_ITER, grad=5, tau=0.5
                ),
                "torchdeq JFB grad=1": theirs(problem, "anderson", tol, MAX_ITER, grad=1),
            }
        )
    contenders["autograd fixed-point loop"] = autograd_loop(problem, tol, MAX_ITER)
    results = measure(problem, contenders, repeats, forward_too=False)
    print(f"\n[{problem.name}] backward modes at tol {tol:.0e}; forward: Anderson, same tol")
    columns = [
        ("fwd evals", 11, lambda r: f"{r.fwd_evals}"),
        ("bwd evals", 11, lambda r: f"{r.bwd_evals}"),
        ("bwd VJPs", 11, lambda r: f"{r.bwd_vjps}"),
        ("grad err", 11, lambda r: f"{r.grad_err:.1e}"),
        ("fwd+bwd ms", 11, lambda r: f"{r.total_ms:.2f}"),
        ("saved KiB", 11, lambda r: f"{r.saved / 1024:.0f}"),
    ]
    print_rows("backward", problem, tol, results, 34, columns)


def memory_table(problem: Problem, iterations: list[int]) -> None:
    rows: dict[str, list[int]] = {}
    for k in iterations:
        plain = FixedPoint(tol=0.0, max_iter=k)
        contenders = {
            "ours   implicit (GMRES)": ours(problem, plain, GMRES()),
            "ours   Unrolled": ours(problem, plain, Unrolled()),
        }
        if torchdeq is not None:
            contenders["torchdeq IFT"] = theirs(
                problem, "fixed_point_iter", 0.0, k, b_solver="fixed_point_iter"
            )
        contenders["autograd fixed-point loop"] = autograd_loop(problem, 0.0, k)
        for label, forward in contenders.items():
            rows.setdefault(label, []).append(measure_once(problem, forward).saved)
    print(
        f"\n[{problem.name}] KiB saved for backward vs forward iterations (FixedPoint, tol 0; "
        f"z alone is {BATCH * HIDDEN * problem.x.element_size() / 1024:.0f} KiB)"
    )
    header = f"{'contender':34}" + "".join(f"{f'{k} iter':>10}" for k in iterations)
    print(header)
    print("-" * len(header))
    for label, saved in rows.items():
        for k, size in zip(iterations, saved):
            ROWS["memory"].append(
                dict(problem=problem.name, contender=label, iterations=k, saved=size)
            )
        print(f"{label:34}" + "".join(f"{s / 1024:>10.0f}" for s in saved))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tolerance, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 15)")
    parser.add_argument("--tols", type=float, nargs="+", default=None)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--iterations", type=int, nargs="+", default=None, help="memory table")
    parser.add_argument("--json", metavar="PATH", help="also write the rows printed to PATH")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    problems = [make_problem(conditioning, dtype) for conditioning in ("gaussian", "orthogonal")]
    if args.threads is not None:
        # after the references: once set_num_threads is called, torch 2.13's batched float64
        # solve of 256 x 256 systems fails in MKL (DLASWP) on this machine, even for 2 threads
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 15)
    tols = args.tols or ([1e-4] if args.quick else [1e-4, 1e-6])
    iterations = args.iterations or ([10, 20] if args.quick else [10, 20, 40, 80])
    torch.manual_seed(0)
    version = importlib.metadata.version("torchdeq") if torchdeq is not None else None
    print(
        f"DEQ tanh cell, hidden {HIDDEN}, input {INPUT}, batch {BATCH}, {args.dtype}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; median of {repeats}; torchdeq "
        + (f"{version}" if version else "not installed (pip install torchdeq): skipped")
    )
    for problem in problems:
        for tol in tols:
            forward_table(problem, tol, repeats)
            backward_table(problem, tol, repeats)
    memory_table(problems[0], iterations)
    if args.json:
        meta = dict(hidden=HIDDEN, input=INPUT, batch=BATCH, dtype=args.dtype, repeats=repeats)
        meta |= dict(threads=torch.get_num_threads(), torchdeq=version)
        with open(args.json, "w") as file:
            json.dump(dict(meta=meta) | ROWS, file, indent=1)


if __name__ == "__main__":
    main()
