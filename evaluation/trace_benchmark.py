"""Cost of exact divergences on the tri-alanine DiT (issue 5 benchmark; not a timed test).

Per sample and per function evaluation (one call on the whole batch), in one run: a plain forward, every
exact-trace implementation of :class:`rexmol.likelihood.divergence.ExactTrace`, the full projected Jacobian
(what the discrete log-density needs), and Hutchinson with one probe. Each task runs in a fresh subprocess so
its peak memory (max RSS above the process's state after a plain forward) is its own. Times are CPU seconds of
the (single-threaded) process, which a shared, loaded machine distorts far less than wall time; "x forward"
divides by a plain forward timed in the same process just before and after (best of 3 each).

    .venv/bin/python evaluation/trace_benchmark.py --batch 256 --dtype float32 --out evaluation/results/trace.json

Model: ``--ckpt`` (default data/ala3/model/generator.pt when present), else the 'small' AtomDiT for ala3 with
random weights (same cost); ``--model hollow``: the 'small' Cartesian mean-free HollowTransformer for ala3 with
random weights, or the hollow generator ``--ckpt`` (e.g. data/ala3/model_ic/generator.pt), where the
``structured`` task (velocity and exact divergence in one call) applies. Directions are taken in the basis of the
generator's prior (mean-free: k = 96; internal coordinates: k = 93), as the sampler does. ``--json OUT`` (same as
``--out``) also records per task the ms per sample, the ratio to a plain forward and the max |difference| of its
trace to the vjp-loop trace:

    .venv/bin/python evaluation/trace_benchmark.py --model hollow --batch 256 --dtype float64 \
        --tasks forward structured vjp-loop auto --json evaluation/results/trace_hollow_b256_float64.json
    .venv/bin/python evaluation/trace_benchmark.py --model hollow --ckpt data/ala3/model_ic/generator.pt \
        --batch 64 --tasks forward structured --repeats 5 \
        --json evaluation/results/issue14_hollow_speed/trace_ic_b64_float32.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

TASKS = ("forward", "structured", "vjp-loop", "vjp-vmap", "jvp-vmap", "vjp-batch", "hutchinson-1", "auto",
         "jacobian-auto")
TRACE_TASKS = ("structured", "vjp-loop", "vjp-vmap", "jvp-vmap", "vjp-batch", "auto")
DEFAULT_CKPT = Path("data/ala3/model/generator.pt")


def build(ckpt: str | None, dtype_name: str, kind: str = "dit"):
    import numpy as np
    import torch

    from rexmol.likelihood.priors import MeanFreeGaussian

    dtype = getattr(torch, dtype_name)
    if ckpt:
        from rexmol.models.checkpoint import load_generator

        gen = load_generator(ckpt)
        model, prior, source = gen.model, gen.prior, f"checkpoint {ckpt}"
        if (kind == "hollow") != hasattr(model, "velocity_and_divergence"):
            other = "dit" if kind == "hollow" else "hollow"
            raise ValueError(f"{ckpt} holds a {type(model).__name__}; pass --model {other}")
    elif kind == "hollow":
        from rexmol.models.hollow import HollowConfig, HollowTransformer
        from rexmol.systems import load_system

        system = load_system("ala3")
        n = system.n_atoms
        model = HollowTransformer.for_system(system, HollowConfig.from_size("small"), np.arange(n),
                                             np.ones((n, 3), dtype=bool), mean_free=True)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # zero-initialised heads: randomise every weight for a non-trivial Jacobian
            for p in model.parameters():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        source = "HollowTransformer small (Cartesian, mean-free), random weights"
    else:
        from rexmol.models.dit import AtomDiT, DiTConfig
        from rexmol.systems import load_system

        model = AtomDiT.for_system(load_system("ala3"), DiTConfig.from_size("small"))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # adaLN-Zero starts at zero: randomise every weight for a non-trivial Jacobian
            for p in model.parameters():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        source = "AtomDiT small, random weights"
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, (prior if ckpt else MeanFreeGaussian(model.n_atoms)), dtype, source


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(task: str, args: argparse.Namespace) -> dict:
    import torch

    from rexmol.likelihood.divergence import ExactTrace, Hutchinson, detached

    torch.set_num_threads(args.threads)
    model, prior, dtype, source = build(args.ckpt, args.dtype, args.model)
    g = torch.Generator().manual_seed(1)
    x = prior.sample(args.batch, generator=g, dtype=dtype)
    t = torch.full((args.batch,), 0.5, dtype=dtype)
    U = prior.basis(dtype)
    with torch.no_grad():
        model(x, t)
    base = rss_mib()
    et = ExactTrace(task if task in (*ExactTrace.METHODS, "structured") else "auto", memory_budget=args.memory_budget)
    hutch = Hutchinson(1, seed=0)

    def call(basis):
        with torch.no_grad():
            if task == "forward":
                return model(x, t)
            if task == "hutchinson-1":
                return hutch(model, x, t, basis)
            if task == "jacobian-auto":
                return et.jacobian(model, x, t, basis)
            return et(model, x, t, basis)

    call(U if task == "structured" else U[:, :4])  # warm-up (structured needs the full basis; others 4 directions)
    if task in ("auto", "jacobian-auto"):  # the probe for the full basis, outside the timed call
        et._method(model, detached(model), x, t, U, "trace" if task == "auto" else "jacobian")
    def forward_seconds() -> float:
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            with torch.no_grad():
                model(x, t)
            best = min(best, time.process_time() - start)
        return best

    fwd = [forward_seconds()]  # a plain forward in the same process, before and after (CPU seconds)
    times, walls = [], []
    for _ in range(args.repeats):
        start, wall = time.process_time(), time.perf_counter()
        result = call(U)
        times.append(time.process_time() - start)
        walls.append(time.perf_counter() - wall)
    fwd.append(forward_seconds())
    chunk = None
    if task not in ("forward", "hutchinson-1", "structured") and "structured" not in et.choices.values():
        used = (sorted(set(et.choices.values())) or [et.method])[0]
        chunk = et._chunk_size(model, model, x, t, prior.dim, used)
    return {"task": task, "seconds_per_eval": min(times), "all_seconds": times, "wall_seconds": walls,
            "peak_extra_mib": rss_mib() - base,
            "local_forward_seconds": fwd, "forwards_per_eval": min(times) / (sum(fwd) / len(fwd)),
            "chosen": sorted(set(et.choices.values())) or None,
            "probe_seconds": [v for v in et.probe_seconds.values()] or None, "chunk": chunk, "model": source,
            "support_dim": prior.dim,
            "trace": result[1].double().tolist() if task in TRACE_TASKS else None}


def add_comparisons(rows: list[dict], batch: int) -> None:
    """Per row: ms per sample, ratio to a plain forward (the one timed in the same process) and the max
    |difference| of its trace to the vjp-loop trace (None without a vjp-loop row or for non-trace tasks)."""
    ref = next((r["trace"] for r in rows if r.get("task") == "vjp-loop" and "trace" in r), None)
    for r in rows:
        if "error" in r:
            continue
        r["ms_per_sample"] = 1e3 * r["seconds_per_eval"] / batch
        r["ratio_to_forward"] = r["forwards_per_eval"]
        trace = r.pop("trace", None)
        r["max_abs_diff_vs_vjp_loop"] = (None if trace is None or ref is None
                                         else max(abs(a - b) for a, b in zip(trace, ref)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per task (minimum reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-budget", type=int, default=2 << 30, help="bytes (ExactTrace chunking)")
    parser.add_argument("--ckpt", default=None, help=f"generator (dit default: {DEFAULT_CKPT} when present; hollow "
                        "default: random weights)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--model", choices=["dit", "hollow"], default="dit", help="network (hollow: random 'small')")
    parser.add_argument("--out", "--json", dest="out", type=Path, default=None, help="write the JSON here too")
    parser.add_argument("--worker", choices=TASKS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ckpt is None and args.model == "dit" and DEFAULT_CKPT.is_file():
        args.ckpt = str(DEFAULT_CKPT)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    rows = []
    for task in args.tasks:
        cmd = [sys.executable, __file__, "--worker", task, "--batch", str(args.batch), "--dtype", args.dtype,
               "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--memory-budget", str(args.memory_budget), "--model", args.model] + (
                   ["--ckpt", args.ckpt] if args.ckpt else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"task": task, "error": proc.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps({key: v for key, v in rows[-1].items() if key != "trace"}), file=sys.stderr, flush=True)
    k = next((r["support_dim"] for r in rows if "support_dim" in r), None)
    add_comparisons(rows, args.batch)
    print(f"batch {args.batch}, {args.dtype}, {args.threads} thread(s), model: {rows[0].get('model')}")
    print(f"{'task':14s} {'CPU s/eval':>9s} {'ms/sample':>10s} {'x forward':>10s} {'fwd/dir':>8s} {'peak MiB':>9s} "
          f"{'|d vjp-loop|':>12s}  chosen")
    for r in rows:
        if "error" in r:
            print(f"{r['task']:14s} failed: {r['error']}")
            continue
        s, ratio = r["seconds_per_eval"], r["forwards_per_eval"]
        per_dir = ratio / k if r["task"] not in ("forward", "hutchinson-1") else float("nan")
        diff = r["max_abs_diff_vs_vjp_loop"]
        print(f"{r['task']:14s} {s:9.3f} {1e3 * s / args.batch:10.3f} {ratio:10.1f} {per_dir:8.2f} "
              f"{r['peak_extra_mib']:9.0f} {'' if diff is None else f'{diff:.1e}':>12s}  {r['chosen'] or ''}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"batch": args.batch, "dtype": args.dtype, "threads": args.threads,
                                        "support_dim": k, "model": args.model, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
