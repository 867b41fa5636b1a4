"""What the evaluation and sampling hot paths cost with glibc's default allocator and with rexmol's tuning
(``rexmol.allocator``), measured in one run, and what the row-blocked torus cost saves against the whole-matrix
expression.

Each allocator case runs in its own child process (the policy is per process and fixed at start-up), on the same
work: ``--calls`` velocity-and-divergence calls of the shipped hollow generator at batch ``--batch``, and one
Rex-Dopri5 proposal with exact log q and certificate on ``--n`` prior draws (rtol 1e-4, log q tolerance 1e-2 nats,
velocity-kind Lawson coordinates: the full protocol's setting). The torus cost is timed in this process at
``--angles`` points against as many. Process CPU seconds throughout (user + system), ratios from this run.

    OMP_NUM_THREADS=1 python evaluation/bench_allocator.py --json evaluation/results/issue14_cpu_costs/bench_allocator.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> dict:
    """The timed work of one allocator case (runs in a child process); returns its figures."""
    import torch

    from rexmol.allocator import tune_allocator
    from rexmol.models.checkpoint import load_generator
    from rexmol.proposal import ProposalSpec

    tuned = tune_allocator() if args.case == "tuned" else False
    torch.set_num_threads(1)
    model = load_generator(args.ckpt).model.eval()
    x = torch.randn(args.batch, model.n_atoms, 3, generator=torch.Generator().manual_seed(args.seed))
    t = torch.full((args.batch,), 0.5)
    with torch.no_grad():
        for _ in range(3):
            model.velocity_and_divergence(x, t)
        start = time.process_time()
        for _ in range(args.calls):
            model.velocity_and_divergence(x, t)
        network = (time.process_time() - start) / args.calls
    spec = ProposalSpec(ckpt=str(Path(args.ckpt).resolve()), solver="rex-dopri5", rtol=1e-4, atol=1e-4,
                        logq_atol=1e-2, lawson="velocity", model_dtype="float32", roundtrip=True)
    proposal = spec.build()
    z = np.random.default_rng(args.seed).standard_normal((args.n, model.n_atoms, 3))
    before = os.times()
    out = proposal(z)
    after = os.times()
    return {"case": args.case, "tuned": tuned, "network_ms_per_sample": 1e3 * network / args.batch,
            "rex_dopri5_cpu_s_per_sample": (after.user - before.user + after.system - before.system) / args.n,
            "rex_dopri5_system_s_per_sample": (after.system - before.system) / args.n,
            "rex_dopri5_nfe_mean": float(np.mean(out.nfe)), "log_q_sum": float(np.sum(out.log_q))}


def whole_matrix_cost(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The textbook expression of the squared torus distance, [N, M] temporaries per angle (the baseline)."""
    d = np.mod(a[:, None, :] - b[None, :, :], 2 * np.pi)
    return (np.minimum(d, 2 * np.pi - d) ** 2).sum(-1)


def torus_costs(n: int, seed: int) -> dict:
    """CPU seconds of rexmol's blocked torus cost and of the whole-matrix expression at n x n, 4 angles."""
    from rexmol.metrics import torus_cost

    rng = np.random.default_rng(seed)
    a, b = rng.uniform(-np.pi, np.pi, (n, 4)), rng.uniform(-np.pi, np.pi, (n, 4))
    timings, results = {}, {}
    for name, fn in (("blocked", torus_cost), ("whole_matrix", whole_matrix_cost)):
        before = os.times()
        results[name] = fn(a, b)
        after = os.times()
        timings[name] = after.user - before.user + after.system - before.system
    return {"n": n, "blocked_cpu_s": timings["blocked"], "whole_matrix_cpu_s": timings["whole_matrix"],
            "ratio": timings["whole_matrix"] / timings["blocked"],
            "max_abs_difference": float(np.abs(results["blocked"] - results["whole_matrix"]).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(REPO / "data/ala3/model_ic_sym/generator.pt"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--n", type=int, default=32, help="Rex-Dopri5 prior draws")
    ap.add_argument("--angles", type=int, default=10_000, help="points per side of the torus cost")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--case", choices=["default", "tuned"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case is not None:
        print(json.dumps(child(args)))
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OMP_NUM_THREADS"] = "1"
    cases = {}
    for case in ("default", "tuned"):
        argv = [sys.executable, __file__, "--case", case, "--ckpt", args.ckpt, "--batch", str(args.batch),
                "--calls", str(args.calls), "--n", str(args.n), "--seed", str(args.seed)]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
        cases[case] = json.loads(done.stdout.splitlines()[-1])
    d, t = cases["default"], cases["tuned"]
    result = {"machine": platform.processor() or platform.machine(), "batch": args.batch, "n": args.n,
              "seed": args.seed, "ckpt": args.ckpt, "cases": cases,
              "network_ratio_default_over_tuned": d["network_ms_per_sample"] / t["network_ms_per_sample"],
              "rex_dopri5_ratio_default_over_tuned": d["rex_dopri5_cpu_s_per_sample"] / t["rex_dopri5_cpu_s_per_sample"],
              "same_log_q": d["log_q_sum"] == t["log_q_sum"],
              "torus_cost": torus_costs(args.angles, args.seed)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
