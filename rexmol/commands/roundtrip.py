"""``rexmol roundtrip``: solve forward then backward and report each solver's round-trip error.

On ``--model gaussian`` (flow matching of N(m, s^2 I), closed-form velocity and flow map) it also reports the
error of x_N against the exact map. One result per (solver, steps); solvers whose tableau has an embedded pair
run adaptively with ``--rtol/--atol`` (one result per rtol) unless ``--adaptive never``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from rexmol.models.gaussian import GaussianFlow
from rexmol.solvers import (
    TABLEAUS,
    AdaptiveSteps,
    FixedGrid,
    FlowMatching,
    LawsonCoordinates,
    invert,
    make_solver,
    solve,
)

DEFAULT_SOLVERS = ["euler", "midpoint", "rk4", "dopri5", "princeps-rk4", "rex-euler", "rex-midpoint", "rex-rk4",
                   "rex-dopri5"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``rexmol roundtrip``."""
    parser.add_argument("--model", default="gaussian",
                        help="'gaussian' (closed-form flow matching of N(m, s^2 I)) or a checkpoint path")
    parser.add_argument("--solvers", nargs="+", default=DEFAULT_SOLVERS, metavar="NAME",
                        help="euler midpoint heun rk4 bosh3 dopri5 (plain RK in t), princeps-<tableau>, "
                             f"rex-<tableau>; tableaux: {' '.join(TABLEAUS)}")
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50], help="fixed-grid step counts")
    parser.add_argument("--rtol", nargs="+", type=float, default=[1e-5], help="relative tolerance(s), adaptive")
    parser.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: equal to rtol)")
    parser.add_argument("--adaptive", choices=["auto", "never"], default="auto",
                        help="auto: tableaux with an embedded pair (dopri5, bosh3) step adaptively")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--lawson", choices=["data", "noise", "velocity"], default="data",
                        help="Lawson coordinates of princeps-/rex- solvers (plain names always integrate in t)")
    parser.add_argument("--zeta", type=float, default=1.0, help="Rex coupling in (0, 1]")
    parser.add_argument("--grid", choices=["t", "varsigma", "log-varsigma"], default="t",
                        help="fixed grids uniform in t, in varsigma or in log varsigma")
    parser.add_argument("--t0", type=float, default=0.0, help="start time (0 = noise)")
    parser.add_argument("--t1", type=float, default=0.99, help="end time (1 = data; data-kind Lawson needs < 1)")
    parser.add_argument("--batch", type=int, default=256, help="number of samples")
    parser.add_argument("--dim", type=int, default=3, help="dimension of the Gaussian model")
    parser.add_argument("--data-std", type=float, default=0.5, help="s of the Gaussian data N(m, s^2 I)")
    parser.add_argument("--json", action="store_true", help="one JSON object per (solver, steps)")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                        help="round-trip error slopegraph across step counts (log10 axis)")


def _load_model(spec: str, dim: int, data_std: float, seed: int, dtype: torch.dtype):
    if spec == "gaussian":
        gen = torch.Generator().manual_seed(seed + 1)
        mean = torch.randn(dim, generator=gen, dtype=torch.float64).to(dtype)
        gauss = GaussianFlow(mean, data_std)
        return gauss.model("velocity"), gauss
    if not Path(spec).exists():
        raise FileNotFoundError(f"--model {spec}: no such file (use --model gaussian)")
    raise ValueError(f"--model {spec}: trained checkpoints are not available until the DiT model issue lands; "
                     "use --model gaussian")


def _grid(kind: str, coords: LawsonCoordinates, t0: float, t1: float, steps: int) -> FixedGrid:
    if kind == "t":
        return FixedGrid.uniform_t(t0, t1, steps)
    if kind == "varsigma":
        return FixedGrid.uniform_varsigma(coords, t0, t1, steps)
    return FixedGrid.uniform_log_varsigma(coords, t0, t1, steps)


def _runs(args):
    """(solver name, adaptive?, steps or rtol) in the requested order."""
    for name in args.solvers:
        tableau = TABLEAUS.get(name.rpartition("-")[2])
        if args.adaptive == "auto" and tableau is not None and tableau.b_embedded is not None:
            for rtol in args.rtol:
                yield name, True, rtol
        else:
            for steps in args.steps:
                yield name, False, steps


def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.dim < 1:
        raise ValueError("--batch and --dim must be positive")
    dtype = getattr(torch, args.dtype)
    model, gauss = _load_model(args.model, args.dim, args.data_std, args.seed, dtype)
    coords = LawsonCoordinates(FlowMatching(), kind=args.lawson, output="velocity")
    x0 = torch.randn(args.batch, args.dim, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    x0 = x0.to(dtype)
    exact = gauss.flow(x0.double(), args.t0, args.t1) if gauss is not None else None
    results = []
    for name, adaptive, value in _runs(args):
        solver = make_solver(name, model, coords, zeta=args.zeta)
        if adaptive:
            atol = value if args.atol is None else args.atol
            steps = AdaptiveSteps(args.t0, args.t1, rtol=value, atol=atol)
            back_steps = None if solver.reversible else AdaptiveSteps(args.t1, args.t0, rtol=value, atol=atol)
        else:
            steps, back_steps = _grid(args.grid, solver.psi.coords, args.t0, args.t1, value), None
        sol = solve(solver, x0, steps)
        back = invert(solver, sol, back_steps)
        row = {
            "solver": name,
            "steps": sol.accepted,
            "nfe": sol.nfe,
            "dtype": args.dtype,
            "max_abs_error": (back.x.double() - x0.double()).abs().max().item(),
            "error_vs_exact": None if exact is None else (sol.x.double() - exact).abs().max().item(),
            "adaptive": adaptive,
            "rtol": value if adaptive else None,
            "rejected": sol.rejected,
            "nfe_backward": back.nfe,
            "lawson": solver.psi.coords.kind,
            "zeta": args.zeta if solver.reversible else None,
        }
        results.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        _print_table(results)
    if args.plot is not None:
        _plot(results, args.plot, args.steps, args.dtype)
    return 0


def _print_table(results: list[dict]) -> None:
    print(f"{'solver':<16}{'steps':>6}{'nfe':>7}  {'round-trip':>10}  {'vs exact':>10}  dtype")
    for r in results:
        exact = "-" if r["error_vs_exact"] is None else f"{r['error_vs_exact']:.2e}"
        label = r["solver"] + (f" @{r['rtol']:g}" if r["adaptive"] else "")
        print(f"{label:<16}{r['steps']:>6}{r['nfe']:>7}  {r['max_abs_error']:>10.2e}  {exact:>10}  {r['dtype']}")


def _plot(results: list[dict], path: Path, step_ticks: list[int], dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = torch.finfo(getattr(torch, dtype)).eps ** 2
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in dict.fromkeys(r["solver"] for r in results):
        rows = sorted((r for r in results if r["solver"] == name), key=lambda r: r["steps"])
        xs = [r["steps"] for r in rows]
        ys = [math.log10(max(r["max_abs_error"], floor)) for r in rows]
        ax.plot(xs, ys, marker="o", linestyle="--" if rows[0]["adaptive"] else "-", label=name)
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(step_ticks)))
    ax.set_xticklabels([str(s) for s in sorted(set(step_ticks))])
    ax.set_xlabel("steps (adaptive solvers: accepted steps, dashed)")
    ax.set_ylabel("log10 max |x0' - x0| (round trip)")
    ax.set_title(f"round-trip error, {dtype}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
