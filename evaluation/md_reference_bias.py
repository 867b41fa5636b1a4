"""Two biases of an MD reference's energies: the rounding of its frames in storage (XTC, 1e-3 nm) and the time
step of its integrator. Mean potential energy of Langevin MD at several time steps, of the frames as simulated and
as stored, overall and per Ramachandran basin of the first residue with phi and psi.

Why: SNIS with exact weights is consistent for the Boltzmann density of the force field, and E-W2 compares its
energies with those of MD frames. (1) ``rexmol md`` stores frames as XTC, which rounds every coordinate to
1e-3 nm; on stiff bonds and angles that raises the energy by 0.5 sigma^2 tr H on average (sigma^2 = 1e-6/12 nm^2),
about half a kT on tri-alanine, so the reference's energies are not those of the simulated ensemble
(:func:`rexmol.mddata.as_stored`; ``rexmol evaluate`` rounds samples the same way before comparing). (2) The
integrator (LangevinMiddleIntegrator at the spec's step) samples the configurational distribution with an
O(dt^2) error; with var(E) ~ 49 kT^2 a 1 % error in effective temperature moves the mean energy by ~0.5 kT.
Running the spec's integrator (same friction, temperature, force field, start, seed) at the spec's step and at
smaller ones bounds it: the dt -> 0 limit is the Boltzmann value.

Each time step runs in its own process from the PDB structure (minimised, equilibrated ``--equilibration-ps``),
recording the potential energy (kT) of the full-precision state and of the frame rounded as XTC stores it, and
the backbone dihedrals, every ``--frame-ps``. Errors are block standard errors (``--blocks`` contiguous blocks).
Prints JSON, and writes it atomically with --json OUT.

    OMP_NUM_THREADS=1 python evaluation/md_reference_bias.py --system ala3 --timesteps 2.0,1.0,0.5 --ns 6 --seed 1 \
        --json evaluation/results/md_reference_bias/ala3.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def block_stderr(values: np.ndarray, blocks: int) -> float:
    """Standard error of the mean of a correlated series [T] from ``blocks`` contiguous block means."""
    means = np.array([b.mean() for b in np.array_split(values, blocks)])
    return float(means.std(ddof=1) / np.sqrt(blocks))


def run_timestep(args: tuple[str, float, float, float, float, int]) -> dict[str, Any]:
    """MD at one time step: energies [F] kT of the frames as simulated and as stored, backbone dihedrals [F, D]
    rad, process CPU seconds."""
    import openmm
    import openmm.unit as unit

    from rexmol.energy import OpenMMEnergy
    from rexmol.geometry import backbone_dihedrals
    from rexmol.md import make_simulation
    from rexmol.mddata import as_stored
    from rexmol.systems import load_system

    name, dt_fs, ns, frame_ps, equilibration_ps, seed = args
    system = load_system(name)
    context, integrator = make_simulation(system, seed, "Reference", timestep_fs=dt_fs)
    context.setPositions(system.positions)
    openmm.LocalEnergyMinimizer.minimize(context, system.md.get("minimise_tolerance_kj_per_mol_nm", 10.0), 0)
    context.setVelocitiesToTemperature(system.temperature * unit.kelvin, seed)
    steps_per_frame = int(round(frame_ps * 1000.0 / dt_fs))
    integrator.step(int(round(equilibration_ps * 1000.0 / dt_fs)))
    n_frames = int(round(ns * 1000.0 / frame_ps))
    energy = np.empty(n_frames)
    frames = np.empty((n_frames, system.n_atoms, 3))
    start = time.process_time()
    for f in range(n_frames):
        integrator.step(steps_per_frame)
        state = context.getState(getEnergy=True, getPositions=True)
        energy[f] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / system.kT
        frames[f] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        if (f + 1) % max(n_frames // 20, 1) == 0:
            print(f"dt {dt_fs} fs: {(f + 1) * frame_ps / 1000.0:.2f} / {ns} ns", file=sys.stderr, flush=True)
    cpu = time.process_time() - start
    with OpenMMEnergy(system) as bridge:
        stored = bridge.evaluate(as_stored(frames).astype(np.float64)).energy
    return {"dt_fs": dt_fs, "energy": energy, "energy_stored": stored, "angles": backbone_dihedrals(frames, system),
            "cpu_seconds": cpu}


def summarise(run: dict[str, Any], system, blocks: int) -> dict[str, Any]:
    """Mean energy (kT) with block error, as simulated and as stored, overall and per basin of the first residue
    with phi and psi."""
    from rexmol.metrics import BASINS, basin_labels, residue_pairs

    energy, stored, angles = run["energy"], run["energy_stored"], run["angles"]
    n_phi = len(system.dihedrals.get("phi", []))
    k_phi, k_psi = residue_pairs(system.dihedrals)[0]
    labels = basin_labels(angles[:, k_phi], angles[:, n_phi + k_psi])
    basins = {}
    for k, name in enumerate(BASINS):
        inside = labels == k
        if inside.sum() >= 10 * blocks:
            basins[name] = {"population": float(inside.mean()), "mean_energy_kT": float(energy[inside].mean()),
                            "mean_energy_stored_kT": float(stored[inside].mean()), "frames": int(inside.sum())}
    rise = stored - energy
    return {"dt_fs": run["dt_fs"], "frames": len(energy), "mean_energy_kT": float(energy.mean()),
            "stderr_kT": block_stderr(energy, blocks), "std_energy_kT": float(energy.std()),
            "mean_energy_stored_kT": float(stored.mean()), "stderr_stored_kT": block_stderr(stored, blocks),
            "storage_rise_kT": float(rise.mean()), "storage_rise_stderr_kT": block_stderr(rise, blocks),
            "storage_rise_std_kT": float(rise.std()), "basins": basins, "cpu_seconds": run["cpu_seconds"]}


def main(argv: list[str] | None = None) -> None:
    from rexmol.atomic import write_atomic
    from rexmol.md import software_versions
    from rexmol.systems import load_system

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", default="ala3")
    p.add_argument("--timesteps", default="1.0,0.5", help="comma-separated time steps (fs)")
    p.add_argument("--ns", type=float, default=10.0, help="production per time step (ns)")
    p.add_argument("--frame-ps", type=float, default=1.0)
    p.add_argument("--equilibration-ps", type=float, default=50.0)
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--processes", type=int, default=0, help="worker processes (0: one per time step)")
    p.add_argument("--json", type=Path, default=None, help="write the result here (refuses to overwrite)")
    a = p.parse_args(argv)
    try:
        steps = [float(s) for s in a.timesteps.split(",")]
    except ValueError:
        p.error(f"--timesteps: expected comma-separated numbers in fs, got {a.timesteps!r}")
    if not steps or min(steps) <= 0 or a.ns <= 0 or a.frame_ps <= 0 or a.blocks < 2:
        p.error("--timesteps, --ns and --frame-ps must be positive and --blocks >= 2")
    if a.json is not None and a.json.exists():
        p.error(f"--json {a.json} exists; choose another path or delete it")
    system = load_system(a.system)
    jobs = [(a.system, dt, a.ns, a.frame_ps, a.equilibration_ps, a.seed) for dt in steps]
    with mp.get_context("spawn").Pool(a.processes or len(jobs)) as pool:
        runs = pool.map(run_timestep, jobs)
    result = {"command": " ".join(sys.argv), "system": a.system, "spec_timestep_fs": system.md["timestep_fs"],
              "integrator": "LangevinMiddleIntegrator", "platform": "Reference", "versions": software_versions(),
              "config": vars(a) | {"json": None if a.json is None else str(a.json)},
              "runs": [summarise(r, system, a.blocks) for r in runs]}
    text = json.dumps(result, indent=1)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(a.json, text.encode())
    print(text)


if __name__ == "__main__":
    main()
