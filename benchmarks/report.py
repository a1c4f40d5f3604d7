"""Run every benchmark and write the report: ``docs/benchmarks.md`` and the plots in ``docs/img/``.

Runs, each in its own process, with ``--json`` to collect the rows it prints:

* ``core.py``: one ridge hypergradient, the layers against a hand-written baseline;
* ``hypergradient.py``: every method of ``hypergradient`` and the peers (torchopt, hypergrad);
* ``solvers.py``: relative error against products for every linear solver;
* ``deq.py``: DEQ forward solvers, backward modes and saved memory, against torchdeq;
* ``unroll_memory.py``: memory and time of ``unroll``'s three modes;
* ``hypergradient_descent.py``: SGDHD and AdamHD against tuned SGD and Adam;

then trains the hypergradient-descent runs of ``examples/hypergradient_descent.py`` once more
for their learning-rate curves. Every ratio in the report is taken between rows of one run of
one script. The page states the date, the machine and the version of every library; a peer
library that is not installed is skipped with a note. On a machine where
``torch.cuda.is_available()``, a GPU section times ``core.py``'s hypergradient on the GPU.

    python benchmarks/report.py --quick      # the quick modes: a few minutes on 2 cores
    python benchmarks/report.py              # the full runs (about six minutes on 2 cores)

Needs matplotlib (``pip install -e ".[examples]"``); the peers are optional (``.[bench]``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = ("torchopt", "torchdeq", "hypergrad", "betty-ml", "jaxopt")
MEASURED = {"torchopt": "hypergradient", "hypergrad": "hypergradient", "torchdeq": "deq"}
LIBRARIES = ("implicit-layers", "torch", "numpy", "scikit-learn", "matplotlib", "hypothesis")
LIBRARIES += ("tqdm", *PEERS, "jax")


# ----------------------------------------------------------------------------- the runs


def arguments(quick: bool) -> dict[str, list[str]]:
    """The command-line arguments of each benchmark script, quick or full."""
    if quick:
        return {
            "core": ["--ks", "5", "10", "20", "50", "--repeats", "10"],
            "hypergradient": ["--quick", "--ks", "5", "10", "20", "50"],
            "solvers": ["--quick"],
            "deq": ["--quick", "--repeats", "5", "--iterations", "10", "20", "40", "80"],
            "unroll_memory": ["--quick"],
            "hypergradient_descent": ["--epochs", "2"],
            "peers": ["--quick"],
            "scale": ["--sizes", "1e4", "1e5"],
        }
    return {
        "core": ["--ks", "5", "10", "20", "50", "100"],
        "hypergradient": [],
        "solvers": [],
        "deq": [],
        "unroll_memory": [],
        "hypergradient_descent": [],
        "peers": [],
        "scale": [],
    }


class Run:
    """One script's run: its printed output, its rows (``--json``), its time, its failure."""

    def __init__(self, name: str, argv: list[str], workdir: Path):
        self.name, self.argv = name, argv
        self.json_path = workdir / f"{name}.json"
        self.command = [sys.executable, str(HERE / f"{name}.py"), *argv]
        self.stdout, self.stderr, self.seconds, self.data = "", "", 0.0, None

    @property
    def shown(self) -> str:
        return " ".join(["python", f"benchmarks/{self.name}.py", *self.argv])

    @property
    def failed(self) -> bool:
        return self.data is None

    def __call__(self, reuse: bool = False) -> Run:
        record = self.json_path.with_suffix(".run.json")
        if reuse and record.exists() and self.json_path.exists():
            kept = json.loads(record.read_text())
            if kept["argv"] == self.argv:
                print(f"== {self.shown}: reused from {record.parent}", flush=True)
                self.stdout, self.stderr, self.seconds = kept["stdout"], kept["stderr"], kept["s"]
                self.data = json.loads(self.json_path.read_text())
                return self
        print(f"== {self.shown}", flush=True)
        self.json_path.unlink(missing_ok=True)
        start = time.perf_counter()
        done = subprocess.run(
            [*self.command, "--json", str(self.json_path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        self.seconds = time.perf_counter() - start
        self.stdout, self.stderr = done.stdout, done.stderr
        kept = dict(argv=self.argv, stdout=self.stdout, stderr=self.stderr, s=self.seconds)
        record.write_text(json.dumps(kept))
        if done.returncode == 0 and self.json_path.exists():
            self.data = json.loads(self.json_path.read_text())
            print(f"   {self.seconds:.0f} s", flush=True)
        else:
            print(f"   FAILED ({done.returncode}) after {self.seconds:.0f} s", flush=True)
            print(self.stderr[-2000:], file=sys.stderr)
        return self


def _module(path: Path):
    """The script at ``path`` as a module (its ``main`` is not run); its folder is importable."""
    spec = importlib.util.spec_from_file_location(f"_{path.parent.name}_{path.stem}", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec.loader.exec_module(module)
    return module


def _example(name: str):
    return _module(ROOT / "examples" / f"{name}.py")


def learning_rate_curves(epochs: int) -> dict:
    """``{(model, optimizer, lr0): learning rate after each step}`` for the HD variants, trained
    exactly as ``benchmarks/hypergradient_descent.py`` trains them (seed 0)."""
    example = _example("hypergradient_descent")
    torch.set_num_threads(1)  # as the example and the benchmark do
    data = example.load_digits()
    curves = {}
    for model in example.MODELS:
        for optimizer in ("SGDHD", "AdamHD"):
            for lr0 in example.LR0S:
                run = example.train(data, model, optimizer, lr0, epochs, 0)
                curves[model, optimizer, lr0] = run.lrs
    return curves


# ----------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict[str, str]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": cpu_model(),
        "cores": str(os.cpu_count()),
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads (default)": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name(0)
        info["CUDA"] = str(torch.version.cuda)
    return info


# ----------------------------------------------------------------------------- GPU


def gpu_core(ks: list[int], repeats: int) -> list[dict]:
    """``core.py``'s three contenders on the GPU, float32, timed with synchronisation."""
    spec = importlib.util.spec_from_file_location("_bench_core", HERE / "core.py")
    core = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    device = torch.device("cuda")
    problem = {k: v.to(device) for k, v in core.make_problem(2000, 1000, torch.float32).items()}
    w_exact, hyper_exact = core.exact(problem)
    w_star = w_exact.float()
    p64 = {k: v.double() for k, v in problem.items()}
    hessian = p64["X"].T @ p64["X"] / 2000 + torch.diag(p64["lam"].exp())
    step = float(1.0 / torch.linalg.eigvalsh(hessian)[-1])
    rows = []
    for k in ks:
        runs = [
            lambda k=k: core.baseline(problem, w_star, k),
            core.layer_hypergradient(problem, w_star, k, step),
            core.layer_hypergradient(problem, w_star, k, None),
        ]

        def timed(run: Callable) -> Callable[[], None]:
            def call() -> None:
                run()
                torch.cuda.synchronize()

            return call

        times = core.median_times([timed(run) for run in runs], repeats)
        errors = [core.relative_error(run(), hyper_exact) for run in runs]
        rows.append(
            dict(k=k, baseline_ms=1e3 * times[0], layer_ms=1e3 * times[1], argmin_ms=1e3 * times[2])
            | dict(baseline_err=errors[0], layer_err=errors[1], argmin_err=errors[2])
        )
    return rows


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


MARKERS = "osD^v<>pXh*"


def plot_solvers(data: dict, path: Path) -> str:
    plt = _pyplot()
    problems = list(dict.fromkeys(r["problem"] for r in data["rows"]))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, problem in zip(axes.flat, problems):
        rows = [r for r in data["rows"] if r["problem"] == problem]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for i, method in enumerate(methods):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["products"])
            x = [max(r["products"], 1) for r in mine]
            y = [max(r["error"], 1e-16) for r in mine]
            style = dict(marker=MARKERS[i % len(MARKERS)], markersize=4, label=method)
            if method == "Direct":
                ax.plot(x, y, linestyle="none", color="black", **style)
            else:
                ax.plot(x, y, **style)
        ax.set(xscale="log", yscale="log", title=problem, xlabel="products (matrix-vector)")
        ax.set(ylabel="relative error of x", ylim=(1e-16, 1e3))
        ax.legend(fontsize=7)
    fig.suptitle("Backward solvers: relative error against products (float64)")
    return _save(fig, path)


def _cases(rows: list[dict]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r["problem"], r["dtype"]) for r in rows))


def plot_hypergradient(data: dict, path: Path, value: str, label: str, log: bool) -> str:
    plt = _pyplot()
    cases = _cases(data["rows"])
    # one column: the page shows a figure at its text width, about 6.5 inches, so a wider one
    # would shrink its labels past reading
    fig, axes = plt.subplots(len(cases), 1, figsize=(6.5, 3.6 * len(cases)), squeeze=False)
    for ax, (problem, dtype) in zip(axes.flat, cases):
        rows = [r for r in data["rows"] if (r["problem"], r["dtype"]) == (problem, dtype)]
        methods = list(dict.fromkeys(r["method"] for r in rows if r["k"] is not None))
        for i, method in enumerate(methods):
            mine = [r for r in rows if r["method"] == method and r["k"] is not None]
            linestyle = "--" if method.startswith(("torchopt", "hypergrad")) else "-"
            ax.plot(
                [r["k"] for r in mine],
                [max(r[value], 1e-16) for r in mine],
                marker=MARKERS[i % len(MARKERS)],
                markersize=4,
                linestyle=linestyle,
                label=method,
            )
        grey = iter(["dimgrey", "darkgrey"])
        for r in rows:
            if r["k"] is None:  # k-independent: a horizontal line
                ax.axhline(
                    max(r[value], 1e-16),
                    color=next(grey, "grey"),
                    linestyle=":",
                    linewidth=1.2,
                    label=f"{r['method']} ({r['products']} products)",
                )
        ax.set(title=f"{problem}, {dtype}", xlabel="k (budget of products)", ylabel=label)
        # a linear k axis: a cost linear in k is a straight line, CG's error a straight one
        # on the log scale of the errors
        ks = sorted({r["k"] for r in rows if r["k"] is not None})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(cases) :]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_core(data: dict, path: Path) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(6.5, 7))  # at the page's width: see above
    rows = data["rows"]
    ks = [r["k"] for r in rows]
    for key, label in (("baseline", "hand-written baseline"), ("layer", "fixed_point_layer")):
        axes[0].plot(ks, [r[f"{key}_ms"] for r in rows], marker="o", label=label)
        axes[1].plot(ks, [r[f"{key}_err"] for r in rows], marker="o", label=label)
    axes[0].plot(ks, [r["argmin_ms"] for r in rows], marker="s", label="argmin_layer")
    axes[1].plot(ks, [r["argmin_err"] for r in rows], marker="s", label="argmin_layer")
    axes[0].set(xlabel="k (CG iterations)", ylabel="median ms", title="time against k")
    axes[1].set(xlabel="k (CG iterations)", ylabel="relative error", title="error against k")
    axes[1].set_yscale("log")
    for ax in axes:  # a linear k axis: the cost linear in k is a straight line
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_deq_memory(data: dict, path: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = data["memory"]
    for i, contender in enumerate(dict.fromkeys(r["contender"] for r in rows)):
        mine = [r for r in rows if r["contender"] == contender]
        ax.plot(
            [r["iterations"] for r in mine],
            [r["saved"] / 1024 for r in mine],
            marker=MARKERS[i],
            label=contender.replace("ours   ", ""),
        )
    ax.set(xlabel="forward iterations", ylabel="KiB saved for backward", yscale="log")
    ax.set_title(f"DEQ, batch {data['meta']['batch']}, hidden {data['meta']['hidden']}")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_unroll_memory(data: dict, path: Path) -> str:
    plt = _pyplot()
    problems = list(dict.fromkeys(r["problem"] for r in data["rows"]))
    fig, axes = plt.subplots(1, len(problems), figsize=(5 * len(problems), 3.6), squeeze=False)
    for ax, problem in zip(axes.flat, problems):
        rows = [r for r in data["rows"] if r["problem"] == problem]
        for i, mode in enumerate(dict.fromkeys(r["mode"] for r in rows)):
            mine = [r for r in rows if r["mode"] == mode]
            ax.plot(
                [r["steps"] for r in mine],
                [r["kept"] / 2**20 for r in mine],
                marker=MARKERS[i],
                label=mode,
            )
        ax.set(title=problem, xlabel="unrolled steps T", ylabel="MiB kept for backward")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_learning_rates(curves: dict, tuned: dict, path: Path) -> str:
    plt = _pyplot()
    models = list(dict.fromkeys(model for model, _, _ in curves))
    optimizers = list(dict.fromkeys(optimizer for _, optimizer, _ in curves))
    fig, axes = plt.subplots(len(optimizers), len(models), figsize=(11, 7), squeeze=False)
    for row, optimizer in enumerate(optimizers):
        for column, model in enumerate(models):
            ax = axes[row, column]
            for (m, o, lr0), lrs in curves.items():
                if (m, o) == (model, optimizer):
                    ax.plot(range(1, len(lrs) + 1), lrs, label=f"lr0 = {lr0:g}")
            base = optimizer.removesuffix("HD")
            if (model, base) in tuned:
                ax.axhline(
                    tuned[model, base],
                    color="black",
                    linestyle="--",
                    linewidth=1,
                    label=f"best fixed lr of the {base} grid",
                )
            ax.set(title=f"{optimizer}, {model}", xlabel="step", ylabel="learning rate")
            ax.set_yscale("symlog", linthresh=1e-4)
            ax.legend(fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- Markdown


def table(header: list[str], rows: list[list[object]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def sci(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}e}"


def ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def raw(run: Run) -> str:
    """The script's printed output, folded."""
    text = run.stdout.rstrip() or "(no output)"
    body = "\n".join("    " + line for line in ["```text", *text.splitlines(), "```"])
    return f'??? note "Printed output of `{run.shown}`"\n\n{body}\n'


def failure(run: Run) -> str:
    tail = "\n".join(run.stderr.strip().splitlines()[-15:])
    return (
        f'!!! failure "`{run.shown}` failed"\n\n    No data from this run. The end of its error '
        f"output:\n\n    ```text\n"
        + "\n".join("    " + s for s in tail.splitlines())
        + "\n    ```\n"
    )


def section(title: str, description: str, run: Run, body: Callable[[], list[str]]) -> str:
    """A section of the page: its title, what the script measures, then ``body()`` (tables and
    plots, from the run's data) and the script's printed output; a failed run's error instead."""
    out = [f"## {title}", "", description, ""]
    if run.failed:
        return "\n".join(out) + "\n" + failure(run)
    return "\n".join([*out, *body(), raw(run)])


def peers_section(run: Run) -> str:
    peers = _module(HERE / "peers.py")

    def body() -> list[str]:
        rows = run.data["rows"]
        return [run.data["meta"]["header"], "", peers.markdown(rows), "", peers.summary(rows), ""]

    description = (
        "`benchmarks/peers.py`: one hypergradient at the exact inner solution by every method "
        "and every torch peer that has it (HyperTorch and Betty from the source folders named "
        "by `HYPERTORCH_PATH` and `BETTY_PATH`), at equal budget `k`; ours over the fastest "
        "peer, from medians of interleaved rounds on one thread."
    )
    return section("Against every torch peer", description, run, body)


def scale_section(run: Run) -> str:
    def body() -> list[str]:
        header = ["weights", "contender", "products", "s per hypergradient", "HVP/s"]
        header += ["peak +MB", "x gradient"]
        rows = [
            [
                r["weights"],
                r["contender"],
                f"{r['products']} ({r['status']})" if r["status"] != "-" else r["products"],
                f"{r['seconds']:.3f}",
                f"{r['hvps_per_s']:.1f}",
                f"{r['peak_growth_mb']:.1f}",
                f"{r['gradients']:.1f}",
            ]
            for r in run.data["rows"]
        ]
        return [table(header, rows), ""]

    description = (
        "`benchmarks/scale.py`: per-parameter weight decay of a tanh MLP on digits, float32, "
        f"one hypergradient of `k = {run.data['meta']['k']}` products per contender, each in a "
        "fresh process (median of 3). `peak +MB` is the growth of the process's peak resident "
        "memory during the hypergradients; `x gradient` divides it by the inner model's "
        "gradient (4 bytes a weight)."
    )
    return section("Scale: 1e4 to 1e6 inner parameters", description, run, body)


def core_section(run: Run, image: str | None) -> str:
    def body() -> list[str]:
        out: list[str] = []
        meta = run.data["meta"]
        out.append(
            f"Median of {meta['repeats']} samples, {meta['threads']} threads, wall-clock time."
        )
        out.append("")
        rows = [
            [
                r["k"],
                f"{r['baseline_ms']:.2f}",
                f"{r['layer_ms']:.2f}",
                f"{r['layer_ms'] / r['baseline_ms']:.2f}",
                f"{r['argmin_ms']:.2f}",
                f"{r['argmin_ms'] / r['baseline_ms']:.2f}",
                sci(r["baseline_err"], 2),
                sci(r["layer_err"], 2),
                sci(r["argmin_err"], 2),
            ]
            for r in run.data["rows"]
        ]
        header = ["k", "baseline ms", "layer ms", "layer / baseline", "argmin ms"]
        header += ["argmin / baseline", "baseline err", "layer err", "argmin err"]
        out += [table(header, rows), ""]
        if image:
            out += [f"![time and error against k](img/{image})", ""]
        return out

    return section(
        "One hypergradient: the layers against a hand-written baseline",
        "`benchmarks/core.py`: ridge regression with one weight decay per feature (`n = 2000`, "
        "`d = 1000`, float32), one hypergradient with `k` CG iterations at the exact `w*`. The "
        "baseline is the minimal hand-written implicit hypergradient (one "
        "`autograd.grad(create_graph=True)`, `k` Hessian-vector products, textbook CG); "
        "`fixed_point_layer` runs on the gradient step and `argmin_layer` on the loss. The "
        "three are timed alternately in the same run; errors are against a dense float64 solve.",
        run,
        body,
    )


def hypergradient_section(run: Run, images: tuple[str | None, str | None]) -> str:
    def body() -> list[str]:
        out: list[str] = []
        meta = run.data["meta"]
        out.append(f"Peers: {'; '.join(meta['peers'])}. Median of {meta['repeats']} samples.")
        out.append("")
        rows = run.data["rows"]
        for problem, dtype in _cases(rows):
            mine = [r for r in rows if (r["problem"], r["dtype"]) == (problem, dtype)]
            ks = sorted({r["k"] for r in mine if r["k"] is not None})
            methods = list(dict.fromkeys(r["method"] for r in mine if r["k"] is not None))
            base = {
                r["k"]: r["ms"]
                for r in mine
                if r["method"] in ("torchopt solve_cg", "torchopt-style CG*")
            }
            lines = []
            for method in methods:
                by_k = {r["k"]: r for r in mine if r["method"] == method}
                cells = [sci(by_k[k]["error"]) if k in by_k else "-" for k in ks]
                last = by_k.get(ks[-1])
                if last is None:
                    lines.append([method, *cells, "-", "-", "-"])
                    continue
                ratio = f"{last['ms'] / base[ks[-1]]:.2f}" if ks[-1] in base else "-"
                lines.append([method, *cells, last["products"], ms(last["ms"]), ratio])
            for r in mine:
                if r["k"] is None:
                    lines.append(
                        [r["method"], *["" for _ in ks[:-1]], sci(r["error"]), r["products"]]
                    )
                    lines[-1] += [ms(r["ms"]), "-"]
            header = ["method", *[f"error, k={k}" for k in ks], f"products at k={ks[-1]}"]
            header += [f"ms at k={ks[-1]}", f"/ torchopt at k={ks[-1]}"]
            out += [f"**{problem}, {dtype}**", "", table(header, lines), ""]
        error_image, time_image = images
        if error_image:
            out += [f"![relative error against k, per method](img/{error_image})", ""]
        if time_image:
            out += [f"![time against k, per method](img/{time_image})", ""]
        return out

    return section(
        "Every hypergradient method, and the peers",
        "`benchmarks/hypergradient.py`: the ridge (`d = 1000`, condition number ~160) and "
        "logistic (`d = 200`, ~34) problems with per-feature weight decay, in float32 and "
        "float64. Every method gets a budget of `k` products at the exact `w*`; errors are "
        "against the dense float64 hypergradient. Times are medians of round-robin samples on "
        "one thread, by the thread's CPU time. The ratio column divides by torchopt's "
        "`solve_cg` (through `custom_root`) at the same `k`, in the same run. The script's "
        "docstring explains how each peer is called and how its products are counted.",
        run,
        body,
    )


def products_to_reach(rows: list[dict], method: str, target: float) -> str:
    hits = [r["products"] for r in rows if r["method"] == method and r["error"] <= target]
    return str(min(hits)) if hits else "not reached"


def solvers_section(run: Run, image: str | None) -> str:
    def body() -> list[str]:
        out: list[str] = []
        rows = run.data["rows"]
        problems = list(dict.fromkeys(r["problem"] for r in rows))
        methods = list(dict.fromkeys(r["method"] for r in rows))
        lines = []
        for method in methods:
            cells = []
            for problem in problems:
                mine = [r for r in rows if r["problem"] == problem]
                ran = any(r["method"] == method for r in mine)
                cells.append(products_to_reach(mine, method, 1e-6) if ran else "n/a")
            lines.append([method, *cells])
        out += [table(["method", *problems], lines), ""]
        out.append(f"Budgets tried: {', '.join(map(str, run.data['meta']['budgets']))} products.")
        out.append("")
        if image:
            out += [f"![error against products, per solver](img/{image})", ""]
        return out

    return section(
        "Backward solvers: error against products",
        "`benchmarks/solvers.py`: each linear solver on four backward systems, float64, with a "
        "budget of products and no tolerance; the error of `x` is against a dense solve. The two "
        "Hessians are those of `hypergradient.py`; the two DEQ systems are `(I - J)^T` of the "
        "cell of `deq.py` at its fixed point (8 samples, not symmetric). The table gives the "
        "fewest products, among the budgets tried, after which the error was at most `1e-6`.",
        run,
        body,
    )


def deq_section(run: Run, image: str | None) -> str:
    def body() -> list[str]:
        out: list[str] = []
        meta = run.data["meta"]
        torchdeq = meta["torchdeq"] or "not installed: its rows are skipped"
        out.append(
            f"torchdeq: {torchdeq}. Median of {meta['repeats']} repeats, {meta['threads']} threads."
        )
        out.append("")
        for problem in dict.fromkeys(r["problem"] for r in run.data["forward"]):
            for tol in dict.fromkeys(r["tol"] for r in run.data["forward"]):
                forward = [
                    r for r in run.data["forward"] if (r["problem"], r["tol"]) == (problem, tol)
                ]
                lines = [
                    [r["contender"].replace("ours   ", "ours "), r["fwd_evals"], r["bwd_vjps"]]
                    + [sci(r["rel_res"]), sci(r["grad_err"]), ms(r["fwd_ms"]), ms(r["total_ms"])]
                    for r in forward
                ]
                header = ["forward + adjoint solver", "fwd evals", "bwd VJPs", "rel. residual"]
                header += ["grad err", "fwd ms", "fwd+bwd ms"]
                out += [
                    f"**{problem}, tol {tol:g}: forward solvers**",
                    "",
                    table(header, lines),
                    "",
                ]
                backward = [
                    r for r in run.data["backward"] if (r["problem"], r["tol"]) == (problem, tol)
                ]
                lines = [
                    [r["contender"].replace("ours   ", "ours "), r["fwd_evals"], r["bwd_evals"]]
                    + [
                        r["bwd_vjps"],
                        sci(r["grad_err"]),
                        ms(r["total_ms"]),
                        f"{r['saved'] / 1024:.0f}",
                    ]
                    for r in backward
                ]
                header = ["backward mode", "fwd evals", "bwd evals", "bwd VJPs", "grad err"]
                header += ["fwd+bwd ms", "KiB saved"]
                out += [f"**{problem}, tol {tol:g}: backward modes**", "", table(header, lines), ""]
        memory = run.data["memory"]
        iterations = list(dict.fromkeys(r["iterations"] for r in memory))
        lines = []
        for contender in dict.fromkeys(r["contender"] for r in memory):
            saved = {r["iterations"]: r["saved"] for r in memory if r["contender"] == contender}
            lines.append(
                [
                    contender.replace("ours   ", "ours "),
                    *(f"{saved[k] / 1024:.0f}" for k in iterations),
                ]
            )
        out += [
            "**KiB saved for backward against forward iterations** "
            "(FixedPoint, `tol = 0`, gaussian)",
            "",
            table(["contender", *(f"{k} iterations" for k in iterations)], lines),
            "",
        ]
        if image:
            out += [f"![DEQ memory against iterations](img/{image})", ""]
        return out

    return section(
        "Deep equilibrium models, against torchdeq",
        "`benchmarks/deq.py`: `z = tanh(W z + U x + b)`, hidden size 256, batch 64, float32, "
        "with `W` Gaussian (an easy fixed point) or orthogonal (a hard one), each at spectral "
        "norm 0.9. Errors are against a dense float64 implicit gradient per sample. The "
        "script's docstring lists how the stopping rules of the two libraries were matched.",
        run,
        body,
    )


def unroll_section(run: Run, image: str | None) -> str:
    def body() -> list[str]:
        out: list[str] = []
        rows = run.data["rows"]
        full = {(r["problem"], r["steps"]): r["ms"] for r in rows if r["mode"] == "Full"}
        lines = [
            [
                r["problem"],
                r["steps"],
                r["mode"],
                f"{r['kept'] / 2**20:.3f}",
                f"{r['peak'] / 2**20:.3f}",
            ]
            + [f"{r['ms']:.1f}", f"{r['ms'] / full[r['problem'], r['steps']]:.2f}"]
            for r in rows
        ]
        header = ["problem", "T", "mode", "kept MiB", "peak MiB", "ms", "time / Full"]
        out += [table(header, lines, "lrlrrrr"), ""]
        if image:
            out += [f"![unroll memory against T](img/{image})", ""]
        return out

    return section(
        "Unrolling: memory and time of the three modes",
        "`benchmarks/unroll_memory.py`: one hypergradient with respect to the learning rate, "
        "momentum and weight decay of SGD with momentum 0.9, by `unroll`. Memory is what "
        "autograd saves for backward (one count per storage, the data not counted): kept "
        "between forward and backward, and the peak.",
        run,
        body,
    )


def hd_section(run: Run, image: str | None, epochs: int) -> str:
    def body() -> list[str]:
        out: list[str] = []
        data = run.data
        meta = data["meta"]
        beta = ", ".join(f"{k} {v:g}" for k, v in meta["hypergrad_lr"].items())
        out.append(f"{meta['epochs']} epochs; `hypergrad_lr`: {beta}.")
        out.append("")
        lines = [
            [r["model"], r["optimizer"], f"{r['lr0']:g}", f"{r['loss']:.3g}", sci(r["final_lr"], 2)]
            + [f"{r['untuned_loss']:.3g}", f"{r['tuned_loss']:.3g} (lr {r['tuned_lr']:g})"]
            + [f"{r['loss'] / r['tuned_loss']:.2f}"]
            for r in data["hd"]
        ]
        header = ["model", "optimizer", "lr0", "HD loss", "final lr", "plain, same lr0"]
        header += ["plain, tuned lr", "HD / tuned"]
        out += [table(header, lines, "llrrrrrr"), ""]
        lines = [
            [r["optimizer"], f"{r['step_us']:.0f}", f"{r['iteration_us']:.0f}"]
            for r in data["step_times"]
        ]
        out += ["**Time per step** (MLP, one thread)", ""]
        out += [table(["optimizer", "step() us", "whole iteration us"], lines), ""]
        if image:
            out.append(
                f"The learning rate after each step, from the same training ({epochs} epochs, "
                "seed 0); the dashed line is the best learning rate of the plain optimizer's grid."
            )
            out += ["", f"![learning-rate curves](img/{image})", ""]
        return out

    return section(
        "Hypergradient descent: SGDHD and AdamHD",
        "`benchmarks/hypergradient_descent.py`: a logistic regression and an MLP on "
        "scikit-learn's digits, minibatches of 128, seed 0. The baselines are plain SGD and "
        "Adam over a grid of learning rates; the HD variants start from `lr0` in "
        "{0, 1e-3, 1e-2}. Losses are the final full-training-set losses.",
        run,
        body,
    )


def gpu_section(rows: list[dict] | None, error: str | None) -> str:
    out = ["## GPU", ""]
    if rows is None and error is None:
        out.append(
            "No GPU run was made: `torch.cuda.is_available()` was false on the machine that "
            "wrote this report. On a machine with CUDA, `benchmarks/report.py` adds this "
            "section by itself: `core.py`'s three contenders (the hand-written baseline, "
            "`fixed_point_layer` and `argmin_layer`) timed on the GPU with synchronisation."
        )
        return "\n".join(out) + "\n"
    if error is not None:
        return "\n".join(out) + f"\nThe GPU run failed: `{error}`\n"
    out.append(
        f"`core.py`'s problem on {torch.cuda.get_device_name(0)}, float32, each call followed "
        "by `torch.cuda.synchronize()`; medians, all three timed alternately in one run."
    )
    out.append("")
    lines = [
        [
            r["k"],
            f"{r['baseline_ms']:.2f}",
            f"{r['layer_ms']:.2f}",
            f"{r['layer_ms'] / r['baseline_ms']:.2f}",
        ]
        + [
            f"{r['argmin_ms']:.2f}",
            f"{r['argmin_ms'] / r['baseline_ms']:.2f}",
            sci(r["argmin_err"], 2),
        ]
        for r in rows
    ]
    header = ["k", "baseline ms", "layer ms", "layer / baseline", "argmin ms", "argmin / baseline"]
    out += [table(header + ["argmin err"], lines), ""]
    return "\n".join(out)


def header_section(args, info: dict, found: dict, runs: list[Run], total: float) -> str:
    mode = "quick" if args.quick else "full"
    command = "python benchmarks/report.py" + (" --quick" if args.quick else "")
    out = ["# Benchmark report", ""]
    out.append(
        f"Written by `{command}` on {info['date']}; the measurements took {total / 60:.1f} "
        f"minutes. **This is the "
        f"{mode} mode**"
        + (
            ": fewer budgets, repeats, epochs and problem sizes than the full runs, on a shared "
            "machine with 2 cores, so the timings are noisy; the errors, product counts and "
            "memory figures do not depend on the load."
            if args.quick
            else "."
        )
    )
    out += ["", "Every ratio below is taken between rows of one run of one script.", ""]
    out += ["## Machine and versions", ""]
    out += [table(["", ""], [[k, v] for k, v in info.items()], "ll"), ""]
    lines = []
    for name, version in found.items():
        if name in PEERS:
            if version is None:
                note = "not installed: skipped"
            elif name in MEASURED:
                note = f"measured in `{MEASURED[name]}.py`"
            else:
                note = "installed, but no script measures it yet"
        else:
            note = ""
        lines.append([name, version or "-", note])
    out += [table(["library", "version", ""], lines, "lll"), ""]
    out += ["Runs:", ""]
    out += [
        f"* `{run.shown}`: {'failed' if run.failed else f'{run.seconds:.0f} s'}" for run in runs
    ]
    out += ["", "## Reproducing", ""]
    out.append(
        "```bash\n"
        'pip install -e ".[examples]"        # matplotlib and scikit-learn\n'
        'pip install -e ".[bench]"           # the peers torchopt and torchdeq (optional)\n'
        "pip install --no-deps hypergrad rich  # optional; its own deps pull a CUDA torch\n"
        "python benchmarks/report.py --quick   # or without --quick for the full runs\n"
        "```"
    )
    out += [
        "",
        "Install torch first (the CPU build, as in the README), so that no extra pulls a "
        "CUDA build. A peer that is missing is skipped with a note; betty-ml and jaxopt are "
        "listed for completeness, and their methods are compared through their counterparts "
        "here (see [the migration guide](migration.md)).",
        "",
    ]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every script in its quick mode")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="default: docs/")
    parser.add_argument(
        "--only", nargs="+", choices=list(arguments(False)), help="run only these scripts"
    )
    parser.add_argument(
        "--runs",
        type=Path,
        default=None,
        help="keep each script's output and rows in this folder (default: a temporary one)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take the results kept in --runs instead of running a script again (same flags), "
        "to rewrite the page without measuring again",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    found = versions()
    temporary = None
    if args.runs is None:
        temporary = tempfile.TemporaryDirectory()
        args.runs = Path(temporary.name)
    args.runs.mkdir(parents=True, exist_ok=True)
    kept_machine = args.runs / "machine.json"
    if args.reuse and kept_machine.exists():
        info = json.loads(kept_machine.read_text())
    else:
        info = machine()
        kept_machine.write_text(json.dumps(info))
    images = args.out / "img"
    images.mkdir(parents=True, exist_ok=True)

    runs = {
        name: Run(name, argv, args.runs)(args.reuse)
        for name, argv in arguments(args.quick).items()
        if not args.only or name in args.only
    }
    if temporary is not None:
        temporary.cleanup()
    epochs = 2 if args.quick else 30
    print(f"== learning-rate curves ({epochs} epochs)", flush=True)
    curves_start = time.perf_counter()
    curves = learning_rate_curves(epochs)
    measured = sum(run.seconds for run in runs.values()) + time.perf_counter() - curves_start
    gpu_rows, gpu_error = None, None
    if torch.cuda.is_available():
        print("== GPU", flush=True)
        try:
            gpu_rows = gpu_core([5, 10, 20, 50, 100], 10 if args.quick else 40)
        except Exception as error:  # noqa: BLE001 - the report says what went wrong
            gpu_error = repr(error)

    def plot(name: str, draw: Callable[[], str]) -> str | None:
        run = runs.get(name)
        if run is None or run.failed:
            return None
        return draw()

    solver_image = plot(
        "solvers",
        lambda: plot_solvers(runs["solvers"].data, images / "solvers_error_vs_products.png"),
    )
    hg = runs.get("hypergradient")
    if hg is not None and not hg.failed:  # one label per method, whatever k
        for row in hg.data["rows"]:
            row["method"] = re.sub(r"NormalCG\(\d+ iter\.\)", "NormalCG(k/2 iter.)", row["method"])
    hg_images = (
        plot(
            "hypergradient",
            lambda: plot_hypergradient(
                hg.data, images / "hypergradient_error_vs_k.png", "error", "relative error", True
            ),
        ),
        plot(
            "hypergradient",
            lambda: plot_hypergradient(
                hg.data, images / "hypergradient_time_vs_k.png", "ms", "median ms", True
            ),
        ),
    )
    core_image = plot("core", lambda: plot_core(runs["core"].data, images / "core_time_vs_k.png"))
    deq_image = plot("deq", lambda: plot_deq_memory(runs["deq"].data, images / "deq_memory.png"))
    unroll_image = plot(
        "unroll_memory",
        lambda: plot_unroll_memory(runs["unroll_memory"].data, images / "unroll_memory.png"),
    )
    tuned = {}
    hd = runs.get("hypergradient_descent")
    if hd is not None and not hd.failed:
        for r in hd.data["hd"]:
            tuned[r["model"], r["optimizer"].removesuffix("HD")] = r["tuned_lr"]
    lr_image = plot_learning_rates(curves, tuned, images / "hd_learning_rates.png")

    total = time.perf_counter() - start
    sections = [header_section(args, info, found, list(runs.values()), measured)]
    if "solvers" in runs:
        sections.append(solvers_section(runs["solvers"], solver_image))
    if "core" in runs:
        sections.append(core_section(runs["core"], core_image))
    if hg is not None:
        sections.append(hypergradient_section(hg, hg_images))
    if "deq" in runs:
        sections.append(deq_section(runs["deq"], deq_image))
    if "unroll_memory" in runs:
        sections.append(unroll_section(runs["unroll_memory"], unroll_image))
    if hd is not None:
        sections.append(hd_section(hd, lr_image, epochs))
    if "peers" in runs:
        sections.append(peers_section(runs["peers"]))
    if "scale" in runs:
        sections.append(scale_section(runs["scale"]))
    sections.append(gpu_section(gpu_rows, gpu_error))
    page = args.out / "benchmarks.md"
    page.write_text("\n".join(sections).rstrip() + "\n")
    print(f"wrote {page} and {len(list(images.glob('*.png')))} plots in {images} ({total:.0f} s)")
    if any(run.failed for run in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
