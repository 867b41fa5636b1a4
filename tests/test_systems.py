"""The shipped systems: composition, charge, force terms and thermodynamic state as the specs promise."""
import numpy as np
import openmm
import pytest

from rexmol.energy import evaluate
from rexmol.systems import available_systems, load_system


def forces_by_type(omm_system) -> dict[str, object]:
    return {type(f).__name__: f for f in omm_system.getForces()}


def net_charge(omm_system) -> float:
    nb = forces_by_type(omm_system)["NonbondedForce"]
    return sum(nb.getParticleParameters(i)[0]._value for i in range(nb.getNumParticles()))


def test_shipped_systems():
    assert {"ala2", "ala3", "ala3-sbg"} <= set(available_systems())


def test_ala3_is_zwitterionic_trialanine():
    system = load_system("ala3")
    assert system.n_atoms == 33
    assert [r.name for r in system.topology.residues()] == ["ALA"] * 3
    omm = system.create_openmm_system()
    assert net_charge(omm) == pytest.approx(0.0, abs=1e-6)
    first, last = list(system.topology.residues())[0], list(system.topology.residues())[-1]
    assert sum(a.element.symbol == "H" and any(b.name == "N" for b in _bonded(system, a)) for a in first.atoms()) == 3
    assert "OXT" in {a.name for a in last.atoms()}  # NH3+ ... COO-
    assert "GBSAOBCForce" in forces_by_type(omm) and omm.getNumConstraints() == 0
    assert system.temperature == 310.0
    assert len(system.dihedrals["phi"]) == 2 and len(system.dihedrals["psi"]) == 2


def test_ala2_is_capped_dipeptide():
    system = load_system("ala2")
    assert system.n_atoms == 22
    assert [r.name for r in system.topology.residues()] == ["ACE", "ALA", "NME"]
    omm = system.create_openmm_system()
    assert net_charge(omm) == pytest.approx(0.0, abs=1e-6)
    assert "GBSAOBCForce" in forces_by_type(omm) and omm.getNumConstraints() == 0
    assert system.temperature == 300.0


def test_ala3_sbg_uses_custom_gb_with_cutoff_and_finite_energies():
    system, ala3 = load_system("ala3-sbg"), load_system("ala3")
    assert [(a.name, a.residue.name) for a in system.topology.atoms()] == [
        (a.name, a.residue.name) for a in ala3.topology.atoms()
    ]
    omm = system.create_openmm_system()
    forces = forces_by_type(omm)
    assert "CustomGBForce" in forces and "GBSAOBCForce" not in forces
    assert forces["CustomGBForce"].getNonbondedMethod() == openmm.CustomGBForce.CutoffNonPeriodic
    assert forces["NonbondedForce"].getNonbondedMethod() == openmm.NonbondedForce.CutoffNonPeriodic
    assert forces["NonbondedForce"].getCutoffDistance()._value == pytest.approx(2.0)
    assert omm.getNumConstraints() == 0 and system.temperature == 310.0
    assert net_charge(omm) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(0)
    x = system.positions[None] + 0.003 * rng.standard_normal((4, system.n_atoms, 3))
    result = evaluate(x, system)
    assert not result.failed.any() and np.isfinite(result.energy).all()
    # same molecule, different potential: the energies differ from ala3's
    assert np.abs(result.energy - evaluate(x, ala3).energy).min() > 1.0


def _bonded(system, atom):
    for bond in system.topology.bonds():
        if bond.atom1 == atom:
            yield bond.atom2
        elif bond.atom2 == atom:
            yield bond.atom1
