"""NFE and CPU cost of per-sample against shared adaptive step control at equal rtol on the ala3 generator.

Per-sample control gives each sample its own grid (results independent of the batch), the shared controller one
grid per batch accepted only when every sample is within tolerance; both control (x, log q). Same prior draws,
same solver, exact trace, no round trip. Prints JSON (and writes it with --json OUT): per controller the NFE
mean/max per sample and process CPU seconds, and the per-sample/shared ratios.

    OMP_NUM_THREADS=1 python evaluation/bench_step_control.py --n 4 --rtol 1e-3 --model-dtype float32
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from rexmol.proposal import ProposalSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="data/ala3/model/generator.pt")
    ap.add_argument("--solver", default="rex-dopri5")
    ap.add_argument("--n", type=int, default=4, help="samples (one batch)")
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--model-dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"ckpt": args.ckpt, "solver": args.solver, "n": args.n, "rtol": args.rtol,
              "model_dtype": args.model_dtype, "error_norm": "x+logq"}
    z = None
    for control in ("shared", "per-sample"):
        spec = ProposalSpec(ckpt=str(Path(args.ckpt).resolve()), solver=args.solver, rtol=args.rtol, atol=args.rtol,
                            model_dtype=args.model_dtype, roundtrip=False, step_control=control)
        proposal = spec.build()
        if z is None:
            g = np.random.default_rng(args.seed)
            z = g.standard_normal((args.n, proposal.generator.n_atoms, 3))
        c0 = time.process_time()
        out = proposal(z)
        cpu = time.process_time() - c0
        result[control] = {"nfe_mean": float(out.nfe.mean()), "nfe_max": int(out.nfe.max()),
                           "nfe": out.nfe.tolist(), "cpu_s": cpu}
        print(control, result[control], flush=True)
    result["nfe_ratio"] = result["per-sample"]["nfe_mean"] / result["shared"]["nfe_mean"]
    result["cpu_ratio"] = result["per-sample"]["cpu_s"] / result["shared"]["cpu_s"]
    print(json.dumps(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
