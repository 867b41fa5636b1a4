"""Z-matrix from the bonded graph: every atom placed once from bonded, already placed parents; the true rotors
are the backbone dihedrals of the spec plus the terminal and methyl rotors; a broken graph is an error."""
import json
from types import SimpleNamespace

import numpy as np
import openmm.app as app
import pytest

from rexmol.systems import load_system
from rexmol.zmatrix import ZMatrix, bonded_graph, build_zmatrix


def bond_set(system) -> set[frozenset]:
    return {frozenset((b[0].index, b[1].index)) for b in system.topology.bonds()}


@pytest.mark.parametrize("name", ["ala3", "ala2", "ala3-sbg"])
def test_every_atom_placed_once_from_bonded_placed_parents(name):
    system = load_system(name)
    zm = build_zmatrix(system)
    n = system.n_atoms
    assert sorted(zm.order.tolist()) == list(range(n))
    bonds = bond_set(system)
    placed = set()
    for p, i in enumerate(zm.order.tolist()):
        j, k, l = (int(a[i]) for a in (zm.bond, zm.angle, zm.torsion))
        expected_parents = min(p, 3)
        parents = [q for q in (j, k, l) if q >= 0]
        assert len(parents) == expected_parents and set(parents) <= placed
        if p >= 1:
            assert frozenset((i, j)) in bonds
        if p >= 2:
            assert frozenset((j, k)) in bonds
        if p >= 3:  # proper torsion: l bonded to k; sibling torsion: l another neighbour of j
            partner = k if zm.rotor[i] else j
            assert frozenset((partner, l)) in bonds and l != i
        placed.add(i)
    assert zm.mask.sum() == 3 * n - 6
    assert zm.mask[zm.order[0]].tolist() == [False, False, False]
    assert zm.mask[zm.order[1]].tolist() == [True, False, False]
    assert zm.mask[zm.order[2]].tolist() == [True, True, False]


@pytest.mark.parametrize("name", ["ala3", "ala2"])
def test_backbone_first_then_heavy_then_hydrogens(name):
    system = load_system(name)
    zm = build_zmatrix(system)
    atoms = list(system.topology.atoms())
    is_h = np.array([a.element.symbol == "H" for a in atoms])[zm.order]
    n_heavy = int((~is_h).sum())
    assert not is_h[:n_heavy].any() and is_h[n_heavy:].all()
    backbone = [a.index for a in atoms if a.name in ("N", "CA", "C")]
    assert zm.order[: len(backbone)].tolist() == backbone  # PDB order is chain order here


def test_ala3_rotors_are_backbone_dihedrals_and_terminal_and_methyl_rotors():
    system = load_system("ala3")
    zm = build_zmatrix(system)
    atoms = list(system.topology.atoms())
    rotor_quads = {frozenset((i, zm.bond[i], zm.angle[i], zm.torsion[i])) for i in np.flatnonzero(zm.rotor)}
    for quads in system.dihedrals.values():  # phi and psi of the spec, an independent list
        for q in quads:
            assert frozenset(q) in rotor_quads
    names = sorted(atoms[i].name for i in np.flatnonzero(zm.rotor))
    # 2 phi + 2 psi + 2 omega (N, CA, C of residues 2-3 placed along the chain), NH3+ (H), 3 methyls, C-terminal O
    assert names == sorted(["N", "N", "CA", "CA", "C", "C", "H", "HB1", "HB1", "HB1", "O"])
    assert int(zm.rotor.sum()) == 11


def test_deterministic_and_dict_round_trip():
    system = load_system("ala3")
    a, b = build_zmatrix(system), build_zmatrix(system)
    c = ZMatrix.from_dict(json.loads(json.dumps(a.to_dict())))
    for key in ("order", "bond", "angle", "torsion", "rotor"):
        assert np.array_equal(getattr(a, key), getattr(b, key))
        assert np.array_equal(getattr(a, key), getattr(c, key))
    assert np.array_equal(a.mask, c.mask)


def test_invalid_zmatrix_rejected():
    d = build_zmatrix(load_system("ala2")).to_dict()
    late = dict(d, bond=list(d["bond"]))
    late["bond"][d["order"][3]] = d["order"][-1]  # parent placed after its child
    with pytest.raises(ValueError, match="placed before"):
        ZMatrix.from_dict(late)
    with pytest.raises(ValueError, match="lacks keys"):
        ZMatrix.from_dict({"order": d["order"]})


def test_disconnected_graph_raises():
    system = load_system("ala3")
    modeller = app.Modeller(system.topology, system.positions)
    atoms = list(system.topology.atoms())
    cut = next(b for b in modeller.topology.bonds() if {b[0].name, b[1].name} == {"CA", "CB"})
    modeller.delete([cut])
    broken = SimpleNamespace(name="broken-ala3", topology=modeller.topology, n_atoms=len(atoms))
    assert len(bonded_graph(broken)[cut[0].index]) == len(bonded_graph(system)[cut[0].index]) - 1
    with pytest.raises(ValueError, match="broken-ala3.*disconnected"):
        build_zmatrix(broken)
