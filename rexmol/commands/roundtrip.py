"""``rexmol roundtrip``: solve forward then backward and report each solver's round-trip error.

On ``--model gaussian`` (flow matching of N(m, s^2 I), closed-form velocity and flow map) it also reports the
error of x_N against the exact map. On ``--model PATH`` (a DiT generator file or ``rexmol train`` checkpoint) x_0
is drawn from the mean-free Gaussian prior in normalised units and the states are the flattened [B, 3N] frames;
there is no exact map (``error_vs_exact`` null). One result per (solver, steps); solvers whose tableau has an
embedded pair run adaptively with ``--rtol/--atol`` (one result per rtol) unless ``--adaptive never``.
The reversible SDE solvers ``rex-euler-maruyama`` / ``rex-shark`` (rexmol.solvers.sde) run on fixed grids with the
Brownian path of ``--seed``; they have no exact map either.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rexmol.models.checkpoint import load_generator
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
from rexmol.solvers.sde import SDE_SOLVER_NAMES, SDECoordinates, make_sde_solver

DEFAULT_SOLVERS = ["euler", "midpoint", "rk4", "dopri5", "princeps-rk4", "rex-euler", "rex-midpoint", "rex-rk4",
                   "rex-dopri5"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``rexmol roundtrip``."""
    parser.add_argument("--model", default="gaussian",
                        help="'gaussian' (closed-form flow matching of N(m, s^2 I)) or a generator checkpoint path (Cartesian or internal-coordinate) "
                             "(generator.pt or a `rexmol train` .ckpt)")
    parser.add_argument("--solvers", nargs="+", default=DEFAULT_SOLVERS, metavar="NAME",
                        help="<tableau> (plain RK in t), princeps-<tableau>, rex-<tableau> with tableaux "
                             f"{' '.join(TABLEAUS)}; reversible SDE solvers {' '.join(SDE_SOLVER_NAMES)} "
                             "(fixed grids; their weight is singular at t = 0 and 1: --t0 0.2 --t1 0.8 --grid "
                             "log-varsigma round-trips to ~1e-13 in float64, --t0 1e-3 --t1 0.99 only to ~5e-6)")
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50], help="fixed-grid step counts")
    parser.add_argument("--rtol", nargs="+", type=float, default=[1e-5], help="relative tolerance(s), adaptive")
    parser.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: equal to rtol)")
    parser.add_argument("--adaptive", choices=["auto", "never"], default="auto",
                        help="auto: tableaux with an embedded pair (bosh3, dopri5, tsit5) step adaptively")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--lawson", choices=["data", "noise", "velocity"], default="data",
                        help="Lawson coordinates of princeps-/rex- solvers (plain names always integrate in t)")
    parser.add_argument("--zeta", type=float, default=1.0, help="Rex coupling in (0, 1]")
    parser.add_argument("--grid", choices=["t", "varsigma", "log-varsigma"], default="t",
                        help="fixed grids uniform in t, in varsigma or in log varsigma")
    parser.add_argument("--t0", type=float, default=0.0, help="start time (0 = noise)")
    parser.add_argument("--t1", type=float, default=0.99, help="end time (1 = data; data-kind Lawson needs < 1)")
    parser.add_argument("--batch", type=int, default=256, help="number of samples")
    parser.add_argument("--dim", type=int, default=3, help="dimension of the Gaussian model (gaussian only)")
    parser.add_argument("--data-std", type=float, default=0.5,
                        help="s of the Gaussian data N(m, s^2 I) (gaussian only)")
    parser.add_argument("--json", action="store_true", help="one JSON object per (solver, steps)")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                        help="round-trip error slopegraph across step counts (log10 axis)")


@dataclass
class Problem:
    """What a round trip needs: ``model(x [B, d], t [B]) -> [B, d]`` of kind ``output``, start ``x0`` [B, d] in
    the requested dtype, and the exact end point [B, d] (float64) where the flow map is closed form, else None."""

    model: Callable[[Tensor, Tensor], Tensor]
    output: str
    x0: Tensor
    exact: Tensor | None


def gaussian_problem(args: argparse.Namespace, dtype: torch.dtype) -> Problem:
    """Flow matching of N(m, s^2 I) in ``--dim`` dimensions; x0 ~ N(0, I)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    mean = torch.randn(args.dim, generator=gen, dtype=torch.float64).to(dtype)
    gauss = GaussianFlow(mean, args.data_std)
    x0 = torch.randn(args.batch, args.dim, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    x0 = x0.to(dtype)
    return Problem(gauss.model("velocity"), "velocity", x0, gauss.flow(x0.double(), args.t0, args.t1))


def checkpoint_problem(path: Path, args: argparse.Namespace, dtype: torch.dtype) -> Problem:
    """A trained generator in its own coordinates; x0 from its prior (mean-free Cartesian or masked internal),
    flattened to [B, 3N]. Both networks take flattened tokens [B, 3N] (atom-major) as they are.
    """
    if not path.is_file():
        raise FileNotFoundError(f"--model {path}: no such file (use --model gaussian or a checkpoint path)")
    try:
        gen = load_generator(path)
    except (EOFError, pickle.UnpicklingError, RuntimeError) as err:
        raise ValueError(f"--model {path}: not a readable rexmol checkpoint ({type(err).__name__}: {err})") from None
    if gen.sigma_min != 0.0:
        raise ValueError(f"--model {path}: sigma_min = {gen.sigma_min}, but the solvers assume the path "
                         "x_t = t x_1 + (1 - t) x_0 (sigma_min = 0)")
    gen.to(dtype)
    x0 = gen.prior.sample(args.batch, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    return Problem(gen.model, gen.output_kind, x0.reshape(args.batch, -1).to(dtype), None)


def _make_solver(name: str, problem: Problem, coords: LawsonCoordinates, args: argparse.Namespace):
    """ODE names via ``make_solver``; the SDE names also need the seed, the time span and the batch shape."""
    if name in SDE_SOLVER_NAMES:
        return make_sde_solver(name, problem.model, seed=args.seed, t_span=(args.t0, args.t1),
                               shape=tuple(problem.x0.shape), coords=SDECoordinates(coords.schedule, coords.output),
                               zeta=args.zeta)
    return make_solver(name, problem.model, coords, zeta=args.zeta)


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
    if args.model == "gaussian":
        problem = gaussian_problem(args, dtype)
    else:
        problem = checkpoint_problem(Path(args.model), args, dtype)
    coords = LawsonCoordinates(FlowMatching(), kind=args.lawson, output=problem.output)
    x0 = problem.x0
    results = []
    for name, adaptive, value in _runs(args):
        solver = _make_solver(name, problem, coords, args)
        exact = None if name in SDE_SOLVER_NAMES else problem.exact
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
    print(f"{'solver':<20}{'steps':>6}{'nfe':>7}  {'round-trip':>10}  {'vs exact':>10}  dtype")
    for r in results:
        exact = "-" if r["error_vs_exact"] is None else f"{r['error_vs_exact']:.2e}"
        label = r["solver"] + (f" @{r['rtol']:g}" if r["adaptive"] else "")
        print(f"{label:<20}{r['steps']:>6}{r['nfe']:>7}  {r['max_abs_error']:>10.2e}  {exact:>10}  {r['dtype']}")


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
