"""``rexmol sample --ckpt PATH --solver rex-dopri5 --n N --trace exact --out DIR``: Boltzmann samples with log w.

Prior -> solver -> (x, log q) -> OpenMM energies (kT) -> log w = -E/kT - log q, in batches written atomically
(rerun the same command to resume), reproducible from ``--seed`` for any ``--processes``. Outputs: see
:mod:`rexmol.sampling`. ``--model gaussian`` is the closed-form check of the log-density (no molecule);
``--model mixture`` the closed-form check of the importance weights (ESS, an SNIS mode weight against its truth).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rexmol.likelihood.flow import ERROR_NORMS
from rexmol.solvers.control import CONTROLS
from rexmol.solvers.grids import GRID_KINDS

ROUNDTRIP_POLICIES = ("all", "reversible", "none")


def runs_roundtrip(policy: str, solver: str) -> bool:
    """Whether ``solver`` runs the backward pass under ``--roundtrip policy`` (reversible: the rex- family)."""
    if policy not in ROUNDTRIP_POLICIES:
        raise ValueError(f"--roundtrip {policy!r}: expected one of {', '.join(ROUNDTRIP_POLICIES)}")
    return policy == "all" or (policy == "reversible" and solver.startswith("rex-"))


def add_solver_options(parser: argparse.ArgumentParser) -> None:
    """Options describing how a proposal is integrated (shared with ``rexmol evaluate --ckpt``)."""
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of adaptive solvers")
    parser.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: equal to --rtol)")
    parser.add_argument("--steps", type=int, default=None,
                        help="fixed number of steps, uniform in --grid (default: adaptive with --rtol/--atol)")
    parser.add_argument("--grid", choices=list(GRID_KINDS), default="t",
                        help="variable the fixed --steps are uniform in (log1p-varsigma: clean order for data-kind "
                             "Lawson coordinates)")
    parser.add_argument("--error-norm", choices=list(ERROR_NORMS), default="x+logq",
                        help="adaptive step control over x and the integrated log q (absolute tolerance), or x only")
    parser.add_argument("--logq-atol", type=float, default=None,
                        help="with --error-norm x+logq: absolute tolerance of log q per step, in nats (default: "
                             "--atol); the global log q error is about the sum over the steps")
    parser.add_argument("--step-control", choices=list(CONTROLS), default="per-sample",
                        help="per-sample: each sample its own steps (results independent of --batch-size); "
                             "shared: one grid per batch, accepted when every sample's error is within tolerance")
    parser.add_argument("--lawson", choices=["data", "noise", "velocity"], default="data",
                        help="Lawson coordinates of rex-/princeps- solvers (plain names integrate in t)")
    parser.add_argument("--t0", type=float, default=0.0, help="start time (0 = noise)")
    parser.add_argument("--t1", type=float, default=0.999,
                        help="end time (1 = data; data-kind Lawson coordinates need < 1)")
    parser.add_argument("--trace", choices=["exact", "hutchinson", "discrete"], default="exact",
                        help="log-density: exact divergence, Hutchinson (biased weights!), or exact density of "
                             "the discrete map")
    parser.add_argument("--trace-method", default="auto", help="exact-trace implementation (auto: fastest by probe)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                        help="precision of the solver state, log q and tangents")
    parser.add_argument("--model-dtype", choices=["float32", "float64"], default="float32",
                        help="precision the network runs in; float32 with --dtype float64 keeps Rex's round trip "
                             "near float32 round-off at ~2.8x less network cost than float64")
    parser.add_argument("--zeta", type=float, default=1.0, help="Rex coupling in (0, 1]")
    parser.add_argument("--roundtrip", choices=list(ROUNDTRIP_POLICIES), default="all",
                        help="which solvers run the backward pass after each sample (doubles their cost): all; "
                             "reversible (rex- solvers only, whose round trip certifies the sample's map and "
                             "log q; a baseline's is only a measure of its truncation error); none")
    parser.add_argument("--no-roundtrip", dest="roundtrip", action="store_const", const="none",
                        help="the same as --roundtrip none")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the model runs (cuda: one GPU per process; energies stay on OpenMM's CPU path)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch (the unit of resumption)")
    parser.add_argument("--processes", type=int, default=1,
                        help="local worker processes sharing the batches (torch.distributed, gloo)")


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``rexmol sample``."""
    parser.add_argument("--ckpt", type=Path, default=None, help="generator file or `rexmol train` checkpoint")
    parser.add_argument("--model", choices=["gaussian", "mixture"], default=None,
                        help="closed-form Gaussian or 3-mode Gaussian-mixture flow instead of a checkpoint "
                             "(log-density and weight check, no molecule)")
    parser.add_argument("--solver", default="rex-dopri5",
                        help="rex-<tableau>, princeps-<tableau>, <tableau> (plain RK in t) or torchdiffeq-dopri5")
    parser.add_argument("--n", type=int, default=256, help="number of samples")
    parser.add_argument("--out", type=Path, default=None, help="output folder (rerun to resume)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_solver_options(parser)


def proposal_spec(args: argparse.Namespace, solver: str):
    """A :class:`rexmol.proposal.ProposalSpec` from parsed options."""
    from rexmol.proposal import ProposalSpec

    if args.ckpt is None:
        raise ValueError("--ckpt PATH is required (or --model gaussian)")
    if not Path(args.ckpt).exists():
        raise FileNotFoundError(f"checkpoint {args.ckpt} does not exist")
    return ProposalSpec(ckpt=str(Path(args.ckpt).resolve()), solver=solver, rtol=args.rtol,
                        atol=args.rtol if args.atol is None else args.atol, steps=args.steps, lawson=args.lawson,
                        t0=args.t0, t1=args.t1, logq=args.trace, trace_method=args.trace_method, dtype=args.dtype,
                        zeta=args.zeta, roundtrip=runs_roundtrip(args.roundtrip, solver), device=args.device,
                        model_dtype=args.model_dtype, grid=args.grid, error_norm=args.error_norm,
                        logq_atol=args.logq_atol, step_control=args.step_control)


def run_gaussian(args: argparse.Namespace) -> int:
    """``--model gaussian``: the closed-form log-density check (likelihood engineer).

    Samples a Gaussian flow over 8 particles x 3 (mean-free prior) and prints ``logq_max_abs_error`` (vs the
    closed-form density at ``--t1``), ``roundtrip_max_abs_error`` and ``nfe`` among others.
    """
    from rexmol.likelihood.check import gaussian_check

    result = gaussian_check(n=args.n, solver=args.solver, logq=args.trace, dtype=args.dtype, seed=args.seed,
                            rtol=args.rtol, atol=args.atol, steps=args.steps, t0=args.t0, t1=args.t1,
                            lawson=args.lawson, trace_method=args.trace_method, zeta=args.zeta,
                            roundtrip=runs_roundtrip(args.roundtrip, args.solver))
    if args.json:
        print(json.dumps(result))
    elif not args.quiet:
        rt = result["roundtrip_max_abs_error"]
        print(f"gaussian check, {result['solver']} ({result['logq']}): max |log q - closed form| "
              f"{result['logq_max_abs_error']:.3e}, round trip {'-' if rt is None else f'{rt:.3e}'}, "
              f"NFE {result['nfe']}")
    return 0


def run_mixture(args: argparse.Namespace) -> int:
    """``--model mixture``: the closed-form 3-mode mixture check; prints ``ess``, the SNIS estimate of the lightest
    mode's weight with its standard error and the truth, ``logq_max_abs_error`` and NFE (mean, max)."""
    from rexmol.likelihood.check import mixture_check

    if args.trace != "exact":
        raise ValueError("--model mixture checks the integrated exact trace: use --trace exact")
    result = mixture_check(n=args.n, solver=args.solver, dtype=args.dtype, seed=args.seed, rtol=args.rtol,
                           atol=args.atol, steps=args.steps, grid=args.grid, t1=args.t1, lawson=args.lawson,
                           trace_method=args.trace_method, zeta=args.zeta, error_norm=args.error_norm,
                           logq_atol=args.logq_atol, step_control=args.step_control, batch_size=args.batch_size,
                           roundtrip=runs_roundtrip(args.roundtrip, args.solver))
    if args.json:
        print(json.dumps(result))
    elif not args.quiet:
        mw = result["mode_weight"]
        print(f"mixture check, {result['solver']}: ESS {result['ess']:.6f}, mode weight {mw['estimate']:.4f} "
              f"+- {mw['stderr']:.4f} (truth {mw['truth']}), max |log q - closed form| "
              f"{result['logq_max_abs_error']:.3e}, NFE {result['nfe_mean']:.1f} mean / {result['nfe_max']} max")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.model == "gaussian":
        return run_gaussian(args)
    if args.model == "mixture":
        if args.t0 != 0.0 or args.n < 1 or args.batch_size < 1:
            raise ValueError("--model mixture starts at the prior (--t0 0) and needs --n, --batch-size >= 1")
        return run_mixture(args)
    from rexmol.report import jsonable
    from rexmol.sampling import sample

    if args.out is None:
        raise ValueError("--out DIR is required")
    if args.n < 1 or args.batch_size < 1:
        raise ValueError("--n and --batch-size must be >= 1")
    spec = proposal_spec(args, args.solver)
    spec.build()  # fail fast on a bad checkpoint or solver, before any process starts
    summary = sample(spec.build, args.out, args.n, args.batch_size, args.seed, processes=args.processes,
                     quiet=args.quiet)
    if args.json:
        print(json.dumps(jsonable(summary)))
    elif not args.quiet:
        print(f"{args.out}: {summary['n']} samples, ESS {summary['ess']:.4f} ({summary['ess_abs']:.1f}), "
              f"{summary['n_nonfinite']} non-finite, {summary['n_wrong_chirality']} wrong-handed, "
              f"NFE {summary['nfe_mean']:.0f}, {summary['s_per_sample']:.3f} s/sample")
    return 0
