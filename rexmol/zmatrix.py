"""Z-matrix of a molecule: the order in which atoms are placed and the three already-placed parents of each.

Internal coordinates (:mod:`rexmol.internal_coordinates`) place atom ``i`` from its bond partner ``j``, angle
partner ``k`` (bonded to ``j``) and torsion partner ``l``: bond ``|x_i - x_j|``, angle ``(x_i, x_j, x_k)``,
torsion ``dihedral(x_l, x_k, x_j, x_i)``. Because every parent is placed before its child, the Jacobian of the
placement is block-triangular and its determinant has a closed form.

The order is built from the bonded graph alone, deterministically (the same topology gives the same matrix):

1. backbone heavy atoms N, CA, C of every residue, in chain order (capping groups contribute the atoms of
   theirs that carry those names, e.g. ACE's C and NME's N, C); consecutive ones must be bonded;
2. the other heavy atoms, 3. the hydrogens — each phase walks the placed atoms in placement order and places
   their unplaced neighbours in ascending atom index.

**Sibling-torsion rule.** If ``j`` already has a placed neighbour ``s`` besides ``k``, the torsion is taken
against that sibling, ``l = s`` (an improper-like dihedral about the j-k axis that is narrow: e.g. +-120 deg
for the second and third methyl hydrogens). Only when ``j`` has no placed sibling is the torsion a proper one
(``l`` a neighbour of ``k``); those are the true rotors (backbone phi/psi/omega, NH3+, methyl and terminal
rotors), flagged by ``rotor``, whose torsion distributions are broad and multimodal. A model then spends its
capacity on the rotors, and the narrow torsions behave like bonds and angles.

Ring-closure bonds are simply not used as parents (the placement follows a spanning tree of the graph).

**Symmetric rotors.** A rotor whose bond partner ``j`` carries, besides ``k``, ``s >= 2`` terminal atoms that
the force field cannot tell apart (same element, mass and per-particle parameters in every force: the three
hydrogens of a methyl or NH3+ group, the two oxygens of a carboxylate) has an ``s``-fold symmetric torsion
distribution: turning the group by 2 pi / s only permutes identical atoms. Its marginal has ``s`` equal modes,
which a flow represents poorly; :func:`with_rotor_symmetry` records ``symmetry[i] = s`` so that the internal
coordinates model ``s * phi`` (one mode) and draw the branch uniformly
(:mod:`rexmol.internal_coordinates`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rexmol.systems import System

BACKBONE_NAMES = ("N", "CA", "C")


@dataclass(frozen=True, eq=False)
class ZMatrix:
    """Placement order and parents over ORIGINAL atom indices (int64 arrays [N]; -1 where there is no parent).

    ``order[0]`` has no coordinate, ``order[1]`` only a bond (partner ``order[0]``), ``order[2]`` a bond and an
    angle (partners ``order[1]``, ``order[0]``); every other atom has all three. ``rotor`` [N] bool: the torsion
    is a proper (broad) rotor rather than a narrow sibling torsion. ``symmetry`` [N] int: ``s >= 2`` for a rotor
    whose torsion is modelled modulo 2 pi / s (see the module docstring), 1 elsewhere (the default).
    """

    order: np.ndarray
    bond: np.ndarray
    angle: np.ndarray
    torsion: np.ndarray
    rotor: np.ndarray
    symmetry: np.ndarray | None = None

    def __post_init__(self) -> None:
        arrays = {k: np.asarray(getattr(self, k), dtype=np.int64) for k in ("order", "bond", "angle", "torsion")}
        arrays["rotor"] = np.asarray(self.rotor, dtype=bool)
        arrays["symmetry"] = (np.ones(len(arrays["order"]), dtype=np.int64) if self.symmetry is None
                              else np.asarray(self.symmetry, dtype=np.int64))
        n = len(arrays["order"])
        if n < 3 or any(a.shape != (n,) for a in arrays.values()):
            raise ValueError(f"Z-matrix arrays must all have shape [N] with N >= 3, got {[a.shape for a in arrays.values()]}")
        for key, value in arrays.items():
            value.setflags(write=False)
            object.__setattr__(self, key, value)
        _check_placement(arrays)

    @property
    def n_atoms(self) -> int:
        return len(self.order)

    @property
    def position(self) -> np.ndarray:
        """Placement position [N] of every atom (inverse permutation of ``order``)."""
        pos = np.empty(self.n_atoms, dtype=np.int64)
        pos[self.order] = np.arange(self.n_atoms)
        return pos

    @property
    def symmetric(self) -> np.ndarray:
        """ORIGINAL indices of the symmetric rotors (``symmetry >= 2``), in placement order [S]."""
        return np.asarray([i for i in self.order if self.symmetry[i] > 1], dtype=np.int64)

    @property
    def mask(self) -> np.ndarray:
        """Valid (bond, angle, torsion) slots [N, 3] bool per original atom; 3N - 6 are True."""
        return np.stack([self.bond >= 0, self.angle >= 0, self.torsion >= 0], axis=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (lists of ints and bools)."""
        out: dict[str, Any] = {k: [int(v) for v in getattr(self, k)] for k in ("order", "bond", "angle", "torsion")}
        out["rotor"] = [bool(v) for v in self.rotor]
        if (self.symmetry > 1).any():
            out["symmetry"] = [int(v) for v in self.symmetry]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZMatrix:
        missing = [k for k in ("order", "bond", "angle", "torsion", "rotor") if k not in d]
        if missing:
            raise ValueError(f"Z-matrix dict lacks keys {missing}")
        return cls(**{k: np.asarray(d[k]) for k in ("order", "bond", "angle", "torsion", "rotor")},
                   symmetry=None if d.get("symmetry") is None else np.asarray(d["symmetry"]))


def _check_placement(a: dict[str, np.ndarray]) -> None:
    """ValueError unless every atom is placed once and every parent is distinct and placed before its child."""
    order, n = a["order"], len(a["order"])
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError("Z-matrix order is not a permutation of the atoms")
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    for p, i in enumerate(order.tolist()):
        parents = [int(a[k][i]) for k in ("bond", "angle", "torsion")]
        n_parents = min(p, 3)
        if any(q < 0 for q in parents[:n_parents]) or any(q != -1 for q in parents[n_parents:]):
            raise ValueError(f"Z-matrix atom {i} (placed {p}th) must have exactly {n_parents} parents, got {parents}")
        used = parents[:n_parents]
        if len(set(used + [i])) != n_parents + 1 or any(pos[q] >= p for q in used):
            raise ValueError(f"Z-matrix atom {i}: parents {used} must be distinct atoms placed before it")
    if a["rotor"][order[:3]].any():
        raise ValueError("Z-matrix: the first three atoms have no torsion and cannot be rotors")
    sym = a["symmetry"]
    if (sym < 1).any() or ((sym > 1) & ~a["rotor"]).any():
        raise ValueError("Z-matrix symmetry must be >= 1, and > 1 only for rotors")


def bonded_graph(system: System) -> list[list[int]]:
    """Neighbour lists (ascending) of the system's bonded graph."""
    neighbours: list[set[int]] = [set() for _ in range(system.n_atoms)]
    for bond in system.topology.bonds():
        i, j = bond[0].index, bond[1].index
        neighbours[i].add(j)
        neighbours[j].add(i)
    return [sorted(s) for s in neighbours]


def _components(neighbours: list[list[int]]) -> list[list[int]]:
    seen, comps = set(), []
    for start in range(len(neighbours)):
        if start in seen:
            continue
        stack, comp = [start], []
        seen.add(start)
        while stack:
            i = stack.pop()
            comp.append(i)
            for j in neighbours[i]:
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        comps.append(sorted(comp))
    return comps


def _backbone(system: System, neighbours: list[list[int]]) -> list[int]:
    path = []
    for residue in system.topology.residues():
        names = {a.name: a.index for a in residue.atoms()}
        path += [names[n] for n in BACKBONE_NAMES if n in names]
    if len(path) < 3:
        raise ValueError(f"system {system.name!r}: fewer than 3 backbone atoms named {BACKBONE_NAMES}; cannot start a Z-matrix")
    for a, b in zip(path[:-1], path[1:]):
        if b not in neighbours[a]:
            raise ValueError(f"system {system.name!r}: backbone atoms {a} and {b} are consecutive but not bonded")
    return path


def build_zmatrix(system: System) -> ZMatrix:
    """The deterministic Z-matrix of ``system`` (see the module docstring); ValueError if it cannot be placed."""
    neighbours = bonded_graph(system)
    comps = _components(neighbours)
    if len(comps) > 1:
        raise ValueError(
            f"system {system.name!r}: bonded graph is disconnected ({len(comps)} components; "
            f"sizes {[len(c) for c in comps]}); a Z-matrix needs one molecule"
        )
    n = system.n_atoms
    heavy = [a.element is None or a.element.symbol != "H" for a in system.topology.atoms()]
    bond, angle, torsion = (np.full(n, -1, dtype=np.int64) for _ in range(3))
    rotor = np.zeros(n, dtype=bool)
    order: list[int] = []
    pos: dict[int, int] = {}

    def placed_neighbours(a: int, exclude: tuple[int, ...]) -> list[int]:
        return sorted((q for q in neighbours[a] if q in pos and q not in exclude), key=pos.__getitem__)

    def place(i: int, j: int) -> None:
        if len(order) >= 1:
            bond[i] = j
        if len(order) >= 2:
            k = bond[j] if bond[j] >= 0 else placed_neighbours(j, (i,))[0]
            angle[i] = k
        if len(order) >= 3:
            siblings = placed_neighbours(j, (i, k))
            if siblings:
                torsion[i] = siblings[0]
            else:
                others = placed_neighbours(k, (i, j))
                if not others:
                    raise ValueError(f"system {system.name!r}: atom {i} has no torsion partner (j={j}, k={k})")
                torsion[i] = bond[k] if bond[k] >= 0 and bond[k] != j else others[0]
                rotor[i] = True
        pos[i] = len(order)
        order.append(i)

    backbone = _backbone(system, neighbours)
    for p, i in enumerate(backbone):
        place(i, backbone[p - 1] if p else -1)
    for want_heavy in (True, False):
        cursor = 0
        while cursor < len(order):
            j = order[cursor]
            for i in neighbours[j]:
                if i not in pos and heavy[i] == want_heavy:
                    place(i, j)
            cursor += 1
    if len(order) != n:
        left = sorted(set(range(n)) - set(pos))
        raise ValueError(f"system {system.name!r}: atoms {left} are reachable only through atoms placed after them")
    return ZMatrix(order=np.array(order), bond=bond, angle=angle, torsion=torsion, rotor=rotor)


def _particle_parameters(openmm_system) -> list[tuple]:
    """Per-atom tuple of everything the force field knows about the particle: mass and the per-particle
    parameters of every force that has them (charges, Lennard-Jones, GB radii and scales)."""
    import openmm.unit as unit

    def plain(v):
        return tuple(plain(w) for w in v) if isinstance(v, (tuple, list)) else (
            v.value_in_unit_system(unit.md_unit_system) if unit.is_quantity(v) else v)

    rows = [[plain(openmm_system.getParticleMass(i))] for i in range(openmm_system.getNumParticles())]
    for force in openmm_system.getForces():
        if hasattr(force, "getParticleParameters") and hasattr(force, "getNumParticles"):
            for i in range(force.getNumParticles()):
                rows[i].append(plain(force.getParticleParameters(i)))
    return [tuple(r) for r in rows]


def with_rotor_symmetry(zmatrix: ZMatrix, system: System) -> ZMatrix:
    """``zmatrix`` with ``symmetry`` set for every rotor whose bond partner holds s >= 2 force-field-identical
    terminal atoms besides the angle partner (module docstring); the rotor atom must be one of them."""
    neighbours = bonded_graph(system)
    elements = [a.element.symbol if a.element is not None else a.name for a in system.topology.atoms()]
    params = _particle_parameters(system.create_openmm_system())
    symmetry = np.ones(zmatrix.n_atoms, dtype=np.int64)
    for i in np.flatnonzero(zmatrix.rotor):
        j, k = int(zmatrix.bond[i]), int(zmatrix.angle[i])
        group = [q for q in neighbours[j] if q != k]
        identical = all(len(neighbours[q]) == 1 and elements[q] == elements[i] and params[q] == params[i]
                        for q in group)
        if len(group) >= 2 and identical:
            symmetry[i] = len(group)
    return ZMatrix(order=zmatrix.order, bond=zmatrix.bond, angle=zmatrix.angle, torsion=zmatrix.torsion,
                   rotor=zmatrix.rotor, symmetry=symmetry)
