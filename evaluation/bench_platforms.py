"""Which OpenMM platform and nonbonded method for our small implicit-solvent systems? Measure, don't guess.

For each system and each (platform, nonbonded method): MD steps/s of the spec's Langevin integrator and
single-point energy evaluations/s (setPositions + getState), each the median of ``--repeats`` interleaved
rounds, per second of this process's CPU time (the machine is shared: wall time would measure the other jobs;
interleaving spreads what remains evenly over the variants). One thread (CPU platform: Threads=1).

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python evaluation/bench_platforms.py --systems ala3 ala3-sbg
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import numpy as np


def variant(system, nonbonded: str):
    """``system`` with its spec's nonbonded method replaced (cutoff: the spec's, else 2.0 nm)."""
    spec = copy.deepcopy(system.spec)
    spec["forcefield"]["nonbonded_method"] = nonbonded
    spec["forcefield"].setdefault("cutoff_nm", 2.0)
    return dataclasses.replace(system, spec=spec)


def make(system, platform: str):
    import openmm
    import openmm.unit as unit

    md = system.md
    integrator = openmm.LangevinMiddleIntegrator(
        system.temperature * unit.kelvin, md["friction_per_ps"] / unit.picosecond, md["timestep_fs"] * unit.femtosecond
    )
    integrator.setRandomNumberSeed(1)
    props = {"Threads": "1"} if platform == "CPU" else {}
    context = openmm.Context(system.create_openmm_system(), integrator, openmm.Platform.getPlatformByName(platform), props)
    context.setPositions(system.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 0)
    context.setVelocitiesToTemperature(system.temperature * unit.kelvin, 1)
    return context, integrator


def steps_per_s(integrator, steps: int) -> float:
    """MD steps per CPU-second."""
    t = time.process_time()
    integrator.step(steps)
    return steps / (time.process_time() - t)


def evals_per_s(context, frames: np.ndarray) -> float:
    """Single-point energies per CPU-second."""
    t = time.process_time()
    for x in frames:
        context.setPositions(x)
        context.getState(getEnergy=True).getPotentialEnergy()
    return len(frames) / (time.process_time() - t)


def main(argv: list[str] | None = None) -> None:
    from rexmol.systems import load_system

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", nargs="+", default=["ala3", "ala3-sbg"])
    p.add_argument("--platforms", nargs="+", default=["Reference", "CPU"])
    p.add_argument("--methods", nargs="+", default=["CutoffNonPeriodic", "NoCutoff"])
    p.add_argument("--steps", type=int, default=5000, help="MD steps per round (ala3-sbg gets a tenth)")
    p.add_argument("--frames", type=int, default=1000, help="single points per round")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'system':10s} {'platform':10s} {'nonbonded':18s} {'steps/CPU-s':>11s} {'E/CPU-s':>11s}  E(ref frame) kJ/mol")
    for name in args.systems:
        base = load_system(name)
        frames = base.positions[None] + 0.005 * rng.standard_normal((args.frames, base.n_atoms, 3))
        steps = args.steps // 10 if "CustomGBForce" in name or name.endswith("sbg") else args.steps
        runs = {}
        for platform in args.platforms:
            for method in args.methods:
                context, integrator = make(variant(base, method), platform)
                runs[(platform, method)] = (context, integrator, [], [])
        for _ in range(args.repeats):
            for context, integrator, md_rates, e_rates in runs.values():
                md_rates.append(steps_per_s(integrator, steps))
                e_rates.append(evals_per_s(context, frames))
        for (platform, method), (context, _, md_rates, e_rates) in runs.items():
            context.setPositions(base.positions)
            e0 = context.getState(getEnergy=True).getPotentialEnergy()._value
            print(f"{name:10s} {platform:10s} {method:18s} {statistics.median(md_rates):11.0f} "
                  f"{statistics.median(e_rates):11.0f}  {e0:.4f}")


if __name__ == "__main__":
    main()
