"""Backbone dihedrals (against mdtraj's own phi/psi) and the C-alpha chirality check / mirror fix."""
import mdtraj
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from rexmol.energy import OpenMMEnergy
from rexmol.geometry import (
    backbone_dihedrals,
    chirality_centres,
    dihedral_names,
    fix_chirality,
    reference_chirality,
    wrong_handedness,
)
from rexmol.systems import load_system


def frames(system, n: int, scale: float = 0.005, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return system.positions[None] + scale * rng.standard_normal((n, system.n_atoms, 3))


def reflect_cbeta(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Invert one C-alpha centre: CB -> 2 CA - CB (an epimer: that residue becomes D)."""
    ca, cb = centre[0], centre[3]
    x = x.copy()
    x[:, cb] = 2 * x[:, ca] - x[:, cb]
    return x


@pytest.mark.parametrize("name", ["ala2", "ala3", "ala3-sbg"])
def test_dihedrals_equal_mdtraj_phi_psi(name):
    system = load_system(name)
    x = frames(system, 7)
    traj = mdtraj.Trajectory(x.astype(np.float32), system.mdtraj_topology)
    (phi_idx, phi), (psi_idx, psi) = mdtraj.compute_phi(traj), mdtraj.compute_psi(traj)
    angles = backbone_dihedrals(torch.tensor(x), system)
    n_phi = len(system.dihedrals["phi"])
    assert angles.shape == (7, n_phi + len(system.dihedrals["psi"]))
    np.testing.assert_array_equal(np.array(system.dihedrals["phi"]), phi_idx)
    np.testing.assert_array_equal(np.array(system.dihedrals["psi"]), psi_idx)
    np.testing.assert_allclose(angles[:, :n_phi], phi, atol=1e-6)
    np.testing.assert_allclose(angles[:, n_phi:], psi, atol=1e-6)


def test_dihedral_names_follow_residues():
    assert dihedral_names(load_system("ala3")) == ["phi2", "phi3", "psi1", "psi2"]
    assert dihedral_names(load_system("ala2")) == ["phi2", "psi2"]


def test_reference_frame_is_all_L_and_proper_motions_keep_chirality():
    system = load_system("ala3")
    assert len(chirality_centres(system)) == 3
    assert (reference_chirality(system) == 1).all()
    rot = Rotation.random(5, random_state=1).as_matrix()
    x = np.einsum("bij,bnj->bni", rot, frames(system, 5)) + np.array([0.3, -2.0, 1.0])
    assert not wrong_handedness(x, system).any()


def test_mirror_image_is_detected_fixed_and_energy_invariant():
    system = load_system("ala3")
    x = frames(system, 4, scale=0.003)
    reflected = x @ np.diag([1.0, -1.0, 1.0])  # any improper rotation: every centre flips
    assert wrong_handedness(reflected, system).all()
    fix = fix_chirality(reflected, system)
    assert fix.mirrored.all() and not fix.still_wrong.any() and fix.n_mirrored == 4
    np.testing.assert_allclose(backbone_dihedrals(fix.x, system), -backbone_dihedrals(reflected, system), atol=1e-5)
    bridge = OpenMMEnergy(system)  # a classical force field cannot tell mirror images apart
    np.testing.assert_allclose(bridge.evaluate(reflected).energy, bridge.evaluate(x).energy, rtol=1e-9)


def test_mixed_handedness_is_reported_still_wrong():
    system = load_system("ala3")
    x = frames(system, 3)
    x[1:2] = reflect_cbeta(x[1:2], chirality_centres(system)[1])
    wrong = wrong_handedness(x, system)
    assert wrong.tolist() == [[False] * 3, [False, True, False], [False] * 3]
    fix = fix_chirality(torch.tensor(x, dtype=torch.float32), system)
    assert isinstance(fix.x, torch.Tensor) and fix.x.dtype == torch.float32
    assert fix.mirrored.tolist() == [False, True, False]
    assert fix.still_wrong.tolist() == [False, True, False] and fix.n_still_wrong == 1
    np.testing.assert_array_equal(fix.x[0].numpy(), x[0].astype(np.float32))
    np.testing.assert_array_equal(fix.x[1].numpy(), -x[1].astype(np.float32))
