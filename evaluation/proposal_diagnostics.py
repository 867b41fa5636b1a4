"""Where a proposal's energy goes wrong: per-force energy excess and per-torsion marginal KL against MD.

Reads a sampling run's ``samples.npz`` (``rexmol sample`` / ``rexmol evaluate`` output; Cartesian nm) and the
held-out MD frames, and reports

- the mean energy (kT) of every OpenMM force of the system, proposal minus MD (unweighted), and
- for every Z-matrix torsion, the KL(MD || proposal) of 36-bin marginal histograms (nats, both smoothed by
  1e-3 per bin), with the rotor flag and the symmetry number the force field gives it.

A proposal whose weights collapse shows here which degrees of freedom carry the mismatch (e.g. multimodal
rotors). Prints a table; ``--json OUT`` writes everything.

    python evaluation/proposal_diagnostics.py runs/sel_old/rk4_16/samples.npz --n 1024 --json out.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import openmm
import openmm.unit as unit
import torch

from rexmol.internal_coordinates import internal_values
from rexmol.mddata import load_frames
from rexmol.systems import load_system
from rexmol.zmatrix import build_zmatrix, with_rotor_symmetry


def force_energies(x_nm: np.ndarray, system) -> dict[str, np.ndarray]:
    """Energy of every force [F] in kT, keyed by its class name (numbered if repeated)."""
    omm = system.create_openmm_system()
    names = []
    for g, force in enumerate(omm.getForces()):
        force.setForceGroup(g)
        name = type(force).__name__
        names.append(name if name not in names else f"{name}_{g}")
    context = openmm.Context(omm, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    out = np.zeros((len(x_nm), len(names)))
    for n, x in enumerate(x_nm):
        context.setPositions(x)
        for g in range(len(names)):
            state = context.getState(getEnergy=True, groups={g})
            out[n, g] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    return {name: out[:, g] / system.kT for g, name in enumerate(names)}


def marginal_kl(reference: np.ndarray, proposal: np.ndarray, bins: int = 36, floor: float = 1e-3) -> float:
    """KL(reference || proposal) of two angle samples [F] (rad) on ``bins`` equal bins, each smoothed by ``floor``."""
    h = [np.histogram(a, bins=bins, range=(-np.pi, np.pi))[0] / len(a) + floor for a in (reference, proposal)]
    p, q = (v / v.sum() for v in h)
    return float((p * np.log(p / q)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("samples", type=Path, help="a run's samples.npz")
    ap.add_argument("--system", default="ala3")
    ap.add_argument("--data", default="data/ala3", help="MD dataset (its test split is the reference)")
    ap.add_argument("--n", type=int, default=1024, help="samples and MD frames used (the first n of each)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()
    if not args.samples.is_file():
        raise SystemExit(f"{args.samples}: no such samples file (a run folder's samples.npz)")
    system = load_system(args.system)
    x = np.load(args.samples)["x"][: args.n]
    x = x[np.isfinite(x).all(axis=(1, 2))]
    md = load_frames(args.data, "test", max_frames=args.n).astype(np.float64)
    ep, em = force_energies(x, system), force_energies(md, system)
    forces = {k: {"proposal_mean_kT": float(ep[k].mean()), "md_mean_kT": float(em[k].mean()),
                  "excess_kT": float(ep[k].mean() - em[k].mean())} for k in ep}
    zm = with_rotor_symmetry(build_zmatrix(system), system)
    tp = internal_values(torch.as_tensor(x), zm)[2].numpy()
    tm = internal_values(torch.as_tensor(md), zm)[2].numpy()
    atoms = list(system.topology.atoms())
    torsions = [{"atom": f"{atoms[i].residue.name}{atoms[i].residue.index}:{atoms[i].name}", "index": int(i),
                 "rotor": bool(zm.rotor[i]), "symmetry": int(zm.symmetry[i]),
                 "kl_nats": marginal_kl(tm[:, i], tp[:, i])} for i in zm.order[3:]]
    result = {"samples": str(args.samples), "n_proposal": len(x), "n_md": len(md), "forces": forces,
              "torsions": torsions}
    print(f"{'force':28s} {'proposal':>10s} {'MD':>10s} {'excess kT':>10s}")
    for k, v in forces.items():
        print(f"{k:28s} {v['proposal_mean_kT']:10.2f} {v['md_mean_kT']:10.2f} {v['excess_kT']:10.2f}")
    print(f"\n{'torsion of atom':16s} rotor  s  KL(MD||q) nats")
    for t in sorted(torsions, key=lambda t: -t["kl_nats"]):
        print(f"{t['atom']:16s} {int(t['rotor']):5d} {t['symmetry']:2d}  {t['kl_nats']:.3f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
