"""Throughput of the energy bridge against a bare OpenMM ``setPositions``/``getState`` loop (same platform).

Rounds alternate bridge and bare loop on the same frames. Both run in this process on one thread, so they are
timed in process CPU time (``time.process_time``): on a shared, loaded machine wall time measures the other jobs,
CPU time measures the work. Reported: median evaluations per CPU-second (and per wall-second) of each and the
median per-round ratio bridge / bare (target >= 0.9). With ``--workers K`` the process pool is timed in wall
time too (it uses K cores, so it is reported, not ratio-compared).

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python evaluation/bench_energy.py --system ala3 --frames 2000
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def bare_loop(context, frames: np.ndarray, forces: bool) -> np.ndarray:
    """The reference loop: energies [B] in kJ/mol, one setPositions + getState per frame."""
    out = np.empty(len(frames))
    for i, x in enumerate(frames):
        context.setPositions(x)
        state = context.getState(getEnergy=True, getForces=forces)
        out[i] = state.getPotentialEnergy()._value
        if forces:
            state.getForces(asNumpy=True)
    return out


def timed(fn, *args) -> tuple[float, float, object]:
    """(CPU seconds of this process, wall seconds, result) of ``fn(*args)``."""
    c, t = time.process_time(), time.perf_counter()
    result = fn(*args)
    return time.process_time() - c, time.perf_counter() - t, result


def main(argv: list[str] | None = None) -> None:
    from rexmol.energy import OpenMMEnergy, make_context
    from rexmol.mddata import load_frames
    from rexmol.systems import load_system

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", default="ala3")
    p.add_argument("--platform", default=None, help="default: the system spec's choice")
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--data", default=None, help="MD dataset folder: use its test frames (default: noisy reference frame)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--forces", action="store_true")
    p.add_argument("--workers", type=int, default=0, help="also time a pool of this many workers")
    args = p.parse_args(argv)

    system = load_system(args.system)
    if args.data:
        frames = load_frames(args.data, "test", max_frames=args.frames).astype(np.float64)
    else:
        rng = np.random.default_rng(0)
        frames = system.positions[None] + 0.005 * rng.standard_normal((args.frames, system.n_atoms, 3))
    bridge = OpenMMEnergy(system, platform=args.platform)
    context = make_context(system.create_openmm_system(), bridge.platform)
    bare_cpu, bare_wall, bridge_cpu, bridge_wall, ratios = [], [], [], [], []
    for _ in range(args.repeats):
        cb, wb, e_bare = timed(bare_loop, context, frames, args.forces)
        cr, wr, result = timed(bridge.evaluate, frames, args.forces)
        bare_cpu.append(cb), bare_wall.append(wb), bridge_cpu.append(cr), bridge_wall.append(wr)
        ratios.append(cb / cr)
    assert np.array_equal(result.energy, e_bare / system.kT), "bridge and bare loop disagree"
    n, med = len(frames), statistics.median
    print(f"system {system.name}, platform {bridge.platform}, {n} frames, forces={args.forces}, {args.repeats} rounds")
    print(f"bare setPositions/getState loop: {n / med(bare_cpu):7.0f} /CPU-s  {n / med(bare_wall):7.0f} /wall-s")
    print(f"OpenMMEnergy (in-process):       {n / med(bridge_cpu):7.0f} /CPU-s  {n / med(bridge_wall):7.0f} /wall-s")
    print(f"ratio bridge / bare (CPU time, median of rounds): {med(ratios):.3f}  (range {min(ratios):.3f}-{max(ratios):.3f})")
    if args.workers:
        with OpenMMEnergy(system, platform=args.platform, workers=args.workers) as pool:
            pool.evaluate(frames[: 2 * args.workers])  # start the workers outside the timing
            walls = [timed(pool.evaluate, frames, args.forces)[1] for _ in range(args.repeats)]
            pooled = pool.evaluate(frames, args.forces)
        assert np.array_equal(pooled.energy, result.energy), "pool and serial path disagree"
        print(f"OpenMMEnergy, {args.workers} workers:           {n / med(walls):7.0f} /wall-s")


if __name__ == "__main__":
    main()
