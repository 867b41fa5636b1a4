"""What the log q tolerance costs and buys on the ala3 generator: NFE, process CPU seconds per sample and the
global log q error against a tight reference, for Rex-Dopri5 (exact log q + round-trip certificate) and Dopri5 at
one rtol and several ``--logq-atol`` values (per-sample control over (x, log q); the value ``x`` puts x alone in
the error norm). A solver may name its Lawson coordinates as ``name:kind`` (``rex-dopri5:velocity``).

The reference is plain Dopri5 at rtol = atol = 1e-7 on the same prior draws (its own log q error is far below
the figures compared). Prints JSON (and writes it with --json OUT).

    OMP_NUM_THREADS=1 python evaluation/bench_logq_tolerance.py --ckpt data/ala3/model_ic/generator.pt --n 8
    OMP_NUM_THREADS=1 python evaluation/bench_logq_tolerance.py --ckpt data/ala3/model_ic_sym/generator.pt --n 8 \
        --solvers rex-dopri5:data,rex-dopri5:velocity,dopri5 --logq-atol x,1e-3,1e-2
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from rexmol.proposal import ProposalSpec


def run(spec: ProposalSpec, z: np.ndarray):
    """(ProposalBatch, process CPU seconds) of one proposal on the draws ``z`` [n, atoms, 3]."""
    proposal = spec.build()
    start = time.process_time()
    out = proposal(z)
    return out, time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="data/ala3/model_ic/generator.pt")
    ap.add_argument("--n", type=int, default=8, help="samples (one batch)")
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--logq-atol", default="1e-3,3e-3,1e-2,3e-2",
                    help="comma-separated log q tolerances (nats); x: x alone in the error norm")
    ap.add_argument("--solvers", default="rex-dopri5,dopri5", help="comma-separated solver[:lawson kind]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = str(Path(args.ckpt).resolve())
    ref_spec = ProposalSpec(ckpt=ckpt, solver="dopri5", rtol=1e-7, atol=1e-7, model_dtype="float32", roundtrip=False)
    n_atoms = ref_spec.build().generator.n_atoms
    z = np.random.default_rng(args.seed).standard_normal((args.n, n_atoms, 3))
    ref, ref_cpu = run(ref_spec, z)
    result = {"ckpt": args.ckpt, "n": args.n, "rtol": args.rtol, "atol": args.rtol, "seed": args.seed,
              "reference": {"solver": "dopri5", "rtol": 1e-7, "nfe_mean": float(ref.nfe.mean()), "cpu_s": ref_cpu},
              "rows": []}
    for tol in args.logq_atol.split(","):
        norm, logq_atol = ("x", None) if tol == "x" else ("x+logq", float(tol))
        for entry in args.solvers.split(","):
            solver, _, lawson = entry.partition(":")
            spec = ProposalSpec(ckpt=ckpt, solver=solver, rtol=args.rtol, atol=args.rtol, logq_atol=logq_atol,
                                error_norm=norm, lawson=lawson or "data", model_dtype="float32",
                                roundtrip=solver.startswith("rex-"))
            out, cpu = run(spec, z)
            signed = out.log_q - ref.log_q
            err = np.abs(signed)
            row = {"solver": solver, "lawson": spec.lawson, "error_norm": norm, "logq_atol": logq_atol,
                   "certificate": spec.roundtrip,
                   "nfe_mean": float(out.nfe.mean()), "cpu_s_per_sample": cpu / args.n,
                   "logq_error_max": float(err.max()), "logq_error_median": float(np.median(err)),
                   "logq_error_spread": float(signed.std()),
                   "x_error_max_nm": float(np.abs(out.x - ref.x).max()),
                   "roundtrip_x_max": float(np.nanmax(out.roundtrip_x)) if spec.roundtrip else None}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
