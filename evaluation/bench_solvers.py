"""Benchmark: rexmol adaptive Dopri5 and Rex-Dopri5 against torchdiffeq's dopri5 at equal rtol/atol.

Problems: the closed-form Gaussian flow-matching model (exact reference map) and a random tanh MLP velocity
field (reference: scipy DOP853 at rtol = atol = 1e-12). Reports forward NFE, forward CPU time (process time,
best of --repeats, one thread; robust on a shared machine), max error vs the reference and the round-trip
error (forward then back: torchdiffeq and rexmol's non-reversible Dopri5 integrate backward adaptively, Rex
replays its step record).
Not a test; needs the ``bench`` extra (torchdiffeq).

    python evaluation/bench_solvers.py [--tols 1e-3 1e-5 1e-7] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torchdiffeq import odeint

from rexmol.models.gaussian import GaussianFlow
from rexmol.solvers import AdaptiveSteps, FlowMatching, LawsonCoordinates, invert, make_solver, solve

T0, T1 = 0.0, 0.99  # data-kind Lawson coordinates are singular at t = 1


class Counted:
    """Wraps a model ``f(x, t[B])`` and counts calls."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.f(x, t)


def gaussian_problem(dim: int, batch: int, gen: torch.Generator):
    gauss = GaussianFlow(torch.randn(dim, generator=gen, dtype=torch.float64), 0.5)
    x0 = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return gauss.velocity, x0, gauss.flow(x0, T0, T1)


def mlp_problem(dim: int, hidden: int, batch: int, gen: torch.Generator):
    w1 = torch.randn(dim, hidden, generator=gen, dtype=torch.float64) / dim**0.5
    b1 = torch.randn(hidden, generator=gen, dtype=torch.float64)
    w2 = 2 * torch.randn(hidden, dim, generator=gen, dtype=torch.float64) / hidden**0.5

    def field(x, t):
        return torch.tanh(x @ w1 + b1 + 2 * t[:, None]) @ w2

    x0 = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    n1, nb, n2 = w1.numpy(), b1.numpy(), w2.numpy()

    def rhs(t, y):
        return (np.tanh(y.reshape(batch, dim) @ n1 + nb + 2 * t) @ n2).ravel()

    ref = solve_ivp(rhs, (T0, T1), x0.numpy().ravel(), method="DOP853", rtol=1e-12, atol=1e-12).y[:, -1]
    return field, x0, torch.from_numpy(ref.reshape(batch, dim))


def run_rexmol(name: str, kind: str, field, x0, tol: float) -> dict:
    model = Counted(field)
    solver = make_solver(name, model, LawsonCoordinates(FlowMatching(), kind, "velocity"))
    steps = AdaptiveSteps(T0, T1, rtol=tol, atol=tol)
    start = time.process_time()
    sol = solve(solver, x0, steps)
    cpu = time.process_time() - start
    back_steps = None if solver.reversible else AdaptiveSteps(T1, T0, rtol=tol, atol=tol)
    back = invert(solver, sol, back_steps)
    return {"x": sol.x, "nfe": sol.nfe, "cpu": cpu, "accepted": sol.accepted, "rejected": sol.rejected,
            "round_trip": (back.x - x0).abs().max().item()}


def run_torchdiffeq(field, x0, tol: float) -> dict:
    model = Counted(field)

    def func(t, x):
        return model(x, t.expand(x.shape[0]))

    ts = torch.tensor([T0, T1], dtype=torch.float64)
    start = time.process_time()
    xs = odeint(func, x0, ts, method="dopri5", rtol=tol, atol=tol)
    cpu = time.process_time() - start
    nfe = model.calls
    back = odeint(func, xs[-1], ts.flip(0), method="dopri5", rtol=tol, atol=tol)[-1]
    return {"x": xs[-1], "nfe": nfe, "cpu": cpu, "accepted": None, "rejected": None,
            "round_trip": (back - x0).abs().max().item()}


METHODS = {
    "torchdiffeq dopri5": lambda f, x, tol: run_torchdiffeq(f, x, tol),
    "rexmol dopri5 (t)": lambda f, x, tol: run_rexmol("dopri5", "velocity", f, x, tol),
    "rex-dopri5 (velocity)": lambda f, x, tol: run_rexmol("rex-dopri5", "velocity", f, x, tol),
    "rex-dopri5 (data)": lambda f, x, tol: run_rexmol("rex-dopri5", "data", f, x, tol),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tols", nargs="+", type=float, default=[1e-3, 1e-5, 1e-7])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="forward CPU time: best of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    problems = {
        "gaussian d=8": gaussian_problem(8, args.batch, gen),
        "mlp d=16 h=64": mlp_problem(16, 64, args.batch, gen),
    }
    rows = []
    print(f"float64, batch {args.batch}, t in [{T0}, {T1}], 1 thread, cpu = process time, best of {args.repeats}")
    print("| problem | tol | method | NFE | acc/rej | cpu ms | max err vs ref | round trip |")
    print("|---|---|---|---|---|---|---|---|")
    for pname, (field, x0, ref) in problems.items():
        for tol in args.tols:
            for mname, fn in METHODS.items():
                runs = [fn(field, x0, tol) for _ in range(args.repeats)]
                r = runs[0]
                row = {"problem": pname, "tol": tol, "method": mname, "nfe": r["nfe"],
                       "accepted": r["accepted"], "rejected": r["rejected"],
                       "cpu_ms": 1e3 * min(x["cpu"] for x in runs),
                       "error_vs_reference": (r["x"] - ref).abs().max().item(), "round_trip": r["round_trip"]}
                rows.append(row)
                accrej = "-" if r["accepted"] is None else f"{r['accepted']}/{r['rejected']}"
                print(f"| {pname} | {tol:g} | {mname} | {row['nfe']} | {accrej} | {row['cpu_ms']:.1f} | "
                      f"{row['error_vs_reference']:.2e} | {row['round_trip']:.2e} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
