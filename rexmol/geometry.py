"""Geometry of molecular conformations: backbone dihedrals and C-alpha chirality.

Coordinates are ``[B, N, 3]`` in nm, torch or numpy. Dihedrals come from mdtraj with the atom quadruples of the
system's spec. Chirality follows the published evaluation of tri-alanine Boltzmann generators: every C-alpha
centre gets the sign of the triple product of its bond vectors, ``(N - CA) . ((C - CA) x (CB - CA))``, compared
with the sign in the system's reference (topology) frame; a sample with any centre of the wrong sign is
mirrored (``x -> -x``), after which samples that still disagree (mixed handedness) are counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rexmol.systems import System


def as_numpy_coordinates(x: Any, n_atoms: int) -> np.ndarray:
    """``x`` ([B, N, 3] or [B, 3N], torch or numpy) as a float64 numpy array [B, N, 3]; ValueError on bad shape."""
    if hasattr(x, "detach"):  # torch tensor (without importing torch for numpy callers)
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2 and x.shape[1] == 3 * n_atoms:
        x = x.reshape(x.shape[0], n_atoms, 3)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"coordinates must have shape [B, {n_atoms}, 3] (or [B, {3 * n_atoms}]), got {list(x.shape)}")
    if x.shape[1] != n_atoms:
        raise ValueError(f"coordinates have {x.shape[1]} atoms, the system has {n_atoms}")
    return x


# ---------------------------------------------------------------------------------------------- dihedrals


def dihedral_names(system: System) -> list[str]:
    """Names of the backbone dihedrals in the column order of :func:`backbone_dihedrals`: kind + residue number
    (1-based) of the central bond, e.g. ``["phi2", "phi3", "psi1", "psi2"]`` for ala3."""
    atoms = list(system.topology.atoms())
    return [f"{kind}{atoms[q[1]].residue.index + 1}" for kind, quads in system.dihedrals.items() for q in quads]


def dihedral_indices(system: System) -> np.ndarray:
    """Atom quadruples [D, 4] (0-based) of the spec's backbone dihedrals, in :func:`dihedral_names` order."""
    return np.array([q for quads in system.dihedrals.values() for q in quads], dtype=np.int64).reshape(-1, 4)


def backbone_dihedrals(x: Any, system: System) -> np.ndarray:
    """Backbone dihedrals [B, D] in radians, (-pi, pi], computed by mdtraj from coordinates [B, N, 3] in nm."""
    import mdtraj

    xyz = as_numpy_coordinates(x, system.n_atoms)
    traj = mdtraj.Trajectory(xyz.astype(np.float32), system.mdtraj_topology)
    return mdtraj.compute_dihedrals(traj, dihedral_indices(system), periodic=False).astype(np.float64)


# ---------------------------------------------------------------------------------------------- chirality


def chirality_centres(system: System) -> np.ndarray:
    """Chiral C-alpha centres [C, 4]: atom indices (CA, N, C, CB) of every residue that has a CB."""
    centres = []
    for residue in system.topology.residues():
        atoms = {a.name: a.index for a in residue.atoms()}
        if all(name in atoms for name in ("CA", "N", "C", "CB")):
            centres.append([atoms["CA"], atoms["N"], atoms["C"], atoms["CB"]])
    return np.array(centres, dtype=np.int64).reshape(-1, 4)


def chirality_signs(xyz: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Sign [B, C] (-1, 0, +1) of ``(N - CA) . ((C - CA) x (CB - CA))`` for coordinates [B, N, 3], centres [C, 4]."""
    bonds = xyz[:, centres[:, 1:], :] - xyz[:, centres[:, :1], :]  # [B, C, 3 bonds, 3]
    triple = np.einsum("bci,bci->bc", bonds[:, :, 0], np.cross(bonds[:, :, 1], bonds[:, :, 2]))
    return np.sign(triple).astype(np.int8)


def reference_chirality(system: System) -> np.ndarray:
    """Chirality signs [C] of the system's reference (topology) frame."""
    return chirality_signs(system.positions[None], chirality_centres(system))[0]


def wrong_handedness(x: Any, system: System) -> np.ndarray:
    """Mask [B, C]: True where a C-alpha centre's sign differs from the reference frame (0 counts as wrong)."""
    xyz = as_numpy_coordinates(x, system.n_atoms)
    return chirality_signs(xyz, chirality_centres(system)) != reference_chirality(system)[None]


def mirror(x: Any) -> Any:
    """Mirror image ``-x`` (inversion through the origin; same type as ``x``)."""
    return -x


@dataclass(frozen=True)
class ChiralityFix:
    """Result of :func:`fix_chirality`.

    ``x``: the coordinates with wrongly handed samples mirrored (same type, dtype and device as the input);
    ``mirrored`` [B] bool: samples that were mirrored; ``still_wrong`` [B] bool: samples with a wrong centre
    after mirroring (mixed handedness; not fixable by a mirror image).
    """

    x: Any
    mirrored: np.ndarray
    still_wrong: np.ndarray

    @property
    def n_mirrored(self) -> int:
        return int(self.mirrored.sum())

    @property
    def n_still_wrong(self) -> int:
        return int(self.still_wrong.sum())


def fix_chirality(x: Any, system: System) -> ChiralityFix:
    """Mirror every sample [B, N, 3] with any C-alpha of the wrong handedness, as the published evaluation does.

    Mirroring leaves the potential energy unchanged (classical force fields are reflection invariant) and flips
    the sign of every dihedral; do it after the importance weights are computed and before the metrics.
    """
    mirrored = wrong_handedness(x, system).any(axis=1)
    if hasattr(x, "detach"):  # torch: keep dtype/device/shape
        import torch

        mask = torch.as_tensor(mirrored, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
        fixed = torch.where(mask, mirror(x), x)
    else:
        arr = np.asarray(x)
        fixed = np.where(mirrored.reshape(-1, *([1] * (arr.ndim - 1))), mirror(arr), arr)
    still_wrong = wrong_handedness(fixed, system).any(axis=1)
    return ChiralityFix(x=fixed, mirrored=mirrored, still_wrong=still_wrong)
