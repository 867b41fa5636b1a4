"""``rexmol demo``: the main job — Boltzmann-sample tri-alanine with Rex-Dopri5, the Dopri5 baseline and Rex-RK4 on
16 fixed steps, all from the same prior draws of the shipped internal-coordinate hollow generator with symmetric
rotors (``data/ala3/model_ic_sym_depth3``); evaluate them against the shipped MD test set with bootstrap intervals
and the MD floor, print the Table-6-style table, write the report.

The shipped generator works in internal coordinates (docs/design.md §8) and its hollow network gives the exact
divergence in about one forward pass, so exact log q with a round-trip certificate costs about a third of a
CPU-second per sample instead of the Cartesian DiT's half minute. It is its 4-block parent (``data/ala3/model_ic_sym``)
cut to 3 blocks per stream and fine-tuned: at N = 10^4 the same ESS within the bootstrap interval (0.368 against
0.377) for 0.69x the CPU (``evaluation/results/full_protocol_depth3/``).

Defaults are sized for <= 15 minutes on 2 CPU cores (measured time in the README): 256 samples per proposal,
rtol = atol = 1e-3 with per-sample control of (x, log q) and a log q tolerance of 1e-2 nats per step, velocity-kind
Lawson coordinates (Rex's coupling over the RK scheme in t) on [0, 0.999], a float64 state around a float32
network, exact trace, round-trip certificates.

Why velocity-kind coordinates (docs/design.md §9): on this generator, at the same draws and tolerances, they give
Rex-Dopri5 the same ESS as the data kind at 0.4x the NFE and CPU with a round trip closer by 10^3, and Rex-RK4 on 16
steps twice the ESS (``evaluation/results/issue14_lawson_kind/``). The log q tolerance: 1e-2 nats gave the same
ESS as 1e-3 at N = 1024 for half the CPU (``evaluation/results/issue14_logq_tolerance/``). The density of the
discrete map (``--solvers rex-rk4@8:discrete``) needs whole Jacobian rows, about 100 reverse passes per evaluation,
so it is not in the default set. ``--full`` runs the published protocol instead (Table 6's three solvers:
torchdiffeq's Dopri5, Dopri5 and Rex-Dopri5, 10^4 samples each, rtol = atol = 1e-4, certificates for the Rex
samples, 10 bootstrap replicates), the one command for a GPU or a long run (``FULL`` below says why each setting;
under an hour on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from rexmol.commands import evaluate
from rexmol.commands.sample import add_solver_options

COMMON = {"rtol": 1e-3, "logq_atol": 1e-2, "dtype": "float64", "model_dtype": "float32", "lawson": "velocity",
          "t1": 0.999, "batch_size": 64, "processes": 2}
DEMO = {**COMMON, "n": 256, "solvers": "rex-dopri5,dopri5,rex-rk4@16", "bootstrap": 50, "bootstrap_skip": "",
        "roundtrip": "all"}
# The published protocol (Table 6: three solvers, 10^4 samples each) at rtol = atol = 1e-4. Measured on the 2-core
# CPU (evaluation/results/full_protocol/): batch 64 in 2 processes (per-sample control makes the samples independent
# of the batch; torchdiffeq's joint control ran slower per sample at 256), log q tolerance 1e-2 nats per step (the
# same ESS as 1e-4 for half the CPU, evaluation/results/issue14_logq_tolerance/), certificates for the Rex samples
# only (a baseline's round trip measures its truncation error, not its density; the demo shows it at N = 256), and
# 10 bootstrap replicates of Table 6's metrics: the proposal's T-W2 (a diagnostic beside them) keeps its point
# estimate but no interval, which saves its exact 10^4-point transport per replicate (a replicate took ~10 instead
# of ~30 s, evaluation/results/full_protocol_depth3/).
FULL = {**COMMON, "n": 10_000, "solvers": "torchdiffeq-dopri5,dopri5,rex-dopri5", "rtol": 1e-4, "bootstrap": 10,
        "bootstrap_skip": "t_w2_proposal", "roundtrip": "reversible"}


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``rexmol demo``."""
    parser.add_argument("--ckpt", type=Path, default=Path("data/ala3/model_ic_sym_depth3/generator.pt"),
                        help="shipped generator (internal-coordinate hollow network with symmetric rotors, 3 blocks "
                             "per stream; data/ala3/model_ic_sym/ is its 4-block parent)")
    parser.add_argument("--reference", type=Path, default=Path("data/ala3"), help="shipped MD dataset")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="sample folders + report (resumable)")
    parser.add_argument("--full", action="store_true",
                        help=f"the published protocol: {FULL['n']} samples per solver ({FULL['solvers']}), "
                             f"rtol = atol = {FULL['rtol']:g}, round trips: {FULL['roundtrip']}, "
                             f"{FULL['bootstrap']} bootstrap replicates (under an hour on 2 CPU cores)")
    parser.add_argument("--n", type=int, default=None, help=f"samples per solver (demo: {DEMO['n']})")
    parser.add_argument("--solvers", default=None, help=f"comma-separated solvers (demo: {DEMO['solvers']})")
    evaluate.add_evaluation_options(parser)
    add_solver_options(parser)
    parser.set_defaults(**{key: None for key in DEMO})  # unset options take the preset (demo or --full)


def run(args: argparse.Namespace) -> int:
    preset = FULL if args.full else DEMO
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ckpt, args.reference = evaluate.shipped(args.ckpt), evaluate.shipped(args.reference)
    if not args.ckpt.is_file():
        raise FileNotFoundError(f"shipped checkpoint {args.ckpt} is missing (train one with `rexmol train`)")
    args.dir, args.against, args.split, args.published = None, [], "test", None
    if not args.quiet:
        tol = (f"{args.steps} steps" if args.steps else
               f"rtol = atol = {args.rtol if args.atol is None else args.atol:g}, log q atol = "
               f"{args.logq_atol if args.logq_atol is not None else 'atol'} nats")
        print(f"rexmol demo: {args.n} samples per solver ({args.solvers}), {tol}, {args.lawson}-kind Lawson "
              f"coordinates, t in [{args.t0:g}, {args.t1:g}], {args.dtype} state, {args.model_dtype or args.dtype} "
              f"network, log q by {args.trace} trace unless an entry says :discrete, round trips: {args.roundtrip}, "
              f"{args.processes} process(es); "
              f"output {args.out}")
    start = time.perf_counter()
    status = evaluate.run(args)
    if not args.quiet:
        print(f"demo finished in {time.perf_counter() - start:.0f} s")
        if not args.full:
            print("full protocol: rexmol demo --full   (10^4 samples per solver; under an hour on 2 CPU cores)")
    return status
