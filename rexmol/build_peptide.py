"""Build peptide topologies offline: heavy atoms from standard internal geometry, hydrogens by OpenMM.

The backbone is placed residue by residue with the natural-extension reference frame (NeRF) from standard
bond lengths, bond angles and the requested (phi, psi, omega); C-beta from the ideal L-amino-acid
tetrahedral geometry. ``openmm.app.Modeller.addHydrogens`` then adds hydrogens for the chosen force field
(pH 7: NH3+ / COO- termini for an uncapped chain) and a short minimisation relaxes the result.

Only the PDBs in ``systems/`` are built with this; it runs once, offline, and its output is committed.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Standard geometry (Angstrom, degrees): Engh & Huber backbone values.
N_CA, CA_C, C_N, C_O = 1.458, 1.525, 1.329, 1.231
ANGLE_N_CA_C, ANGLE_CA_C_N, ANGLE_C_N_CA, ANGLE_CA_C_O = 111.2, 116.2, 121.7, 120.5
C_CH3 = 1.52  # cap methyl carbons (ACE CH3-C, NME N-CH3 uses N_CA)


def place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle: float, torsion: float) -> np.ndarray:
    """Position of atom d with |cd| = bond, angle(b, c, d) = angle, dihedral(a, b, c, d) = torsion (degrees)."""
    angle, torsion = np.radians(angle), np.radians(torsion)
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d2 = np.array([-bond * np.cos(angle), bond * np.sin(angle) * np.cos(torsion), bond * np.sin(angle) * np.sin(torsion)])
    return c + d2[0] * bc + d2[1] * m + d2[2] * n


def ideal_cbeta(n: np.ndarray, ca: np.ndarray, c: np.ndarray) -> np.ndarray:
    """C-beta of an L-amino acid from its backbone N, CA, C (ideal tetrahedral geometry)."""
    b, cc = ca - n, c - ca
    a = np.cross(b, cc)
    return -0.58273431 * a + 0.56802827 * b - 0.54067466 * cc + ca


@dataclass(frozen=True)
class PeptideSpec:
    """A linear peptide: residue names (three-letter, ALA/GLY), optional ACE/NME caps, backbone torsions (deg)."""

    residues: tuple[str, ...]
    caps: bool = False
    phi: float = -70.0
    psi: float = 135.0
    omega: float = 180.0


def heavy_atom_pdb(spec: PeptideSpec) -> str:
    """PDB text with the heavy atoms of ``spec`` (no hydrogens)."""
    atoms: list[tuple[str, str, int, np.ndarray]] = []  # (atom name, residue name, residue number, xyz)
    resnum = 1
    n = np.array([0.0, 0.0, 0.0])
    ca = np.array([N_CA, 0.0, 0.0])
    c = place(np.array([0.0, 1.0, 0.0]), n, ca, CA_C, ANGLE_N_CA_C, 0.0)
    if spec.caps:  # ACE: CH3-C(=O)- bonded to N of residue 1
        prev_c = place(c, ca, n, C_N, ANGLE_C_N_CA, spec.phi)
        ch3 = place(ca, n, prev_c, C_CH3, ANGLE_CA_C_N, spec.omega)
        o = place(ca, n, prev_c, C_O, 122.0, spec.omega + 180.0)
        atoms += [("CH3", "ACE", resnum, ch3), ("C", "ACE", resnum, prev_c), ("O", "ACE", resnum, o)]
        resnum += 1
    for i, resname in enumerate(spec.residues):
        last = i == len(spec.residues) - 1
        atoms += [("N", resname, resnum, n), ("CA", resname, resnum, ca), ("C", resname, resnum, c)]
        atoms.append(("O", resname, resnum, place(n, ca, c, C_O, ANGLE_CA_C_O, spec.psi + 180.0)))
        if resname != "GLY":
            atoms.append(("CB", resname, resnum, ideal_cbeta(n, ca, c)))
        next_n = place(n, ca, c, C_N, ANGLE_CA_C_N, spec.psi)
        if last and not spec.caps:
            atoms.append(("OXT", resname, resnum, place(n, ca, c, 1.25, 117.0, spec.psi)))
        elif last:  # NME: -N(H)-CH3
            atoms += [("N", "NME", resnum + 1, next_n), ("C", "NME", resnum + 1, place(ca, c, next_n, N_CA, ANGLE_C_N_CA, spec.omega))]
        else:
            next_ca = place(ca, c, next_n, N_CA, ANGLE_C_N_CA, spec.omega)
            next_c = place(c, next_n, next_ca, CA_C, ANGLE_N_CA_C, spec.phi)
            n, ca, c = next_n, next_ca, next_c
        resnum += 1
    lines = []
    for serial, (name, resname, rnum, xyz) in enumerate(atoms, start=1):
        element = name[0]
        lines.append(
            f"ATOM  {serial:5d} {name:<4s} {resname:3s} A{rnum:4d}    "
            f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}  1.00  0.00          {element:>2s}"
        )
    return "\n".join(lines + ["TER", "END"]) + "\n"


def build_pdb(spec: PeptideSpec, forcefield_files: list[str], out: Path, minimise_steps: int = 2000) -> Path:
    """Build ``spec`` with hydrogens for ``forcefield_files``, minimise in vacuum-free implicit solvent, write PDB."""
    import openmm
    import openmm.app as app
    import openmm.unit as unit

    pdb = app.PDBFile(io.StringIO(heavy_atom_pdb(spec)))
    forcefield = app.ForceField(*forcefield_files)
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.addHydrogens(forcefield, pH=7.0)
    system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    integrator = openmm.VerletIntegrator(0.001)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(modeller.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, minimise_steps)
    positions = context.getState(getPositions=True).getPositions()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        app.PDBFile.writeFile(modeller.topology, positions, fh, keepIds=False)
    tmp.replace(out)
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    print(f"wrote {out}: {modeller.topology.getNumAtoms()} atoms, minimised energy {energy:.2f} kJ/mol")
    return out
