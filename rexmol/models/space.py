"""Generator spaces: the coordinates a flow-matching network works in, and the way back to Cartesian nm.

A generator is a network plus a space. The network's flow runs in *model coordinates*; the space owns the prior
p_0 that lives there, the map of training frames into them (``encode``) and the map of a sample back to
Cartesian nm with the log-determinant the density needs (``decode``), so a sampler computes

    log q_nm(x) = log q_model(z) - log|det dx/dz|

whatever the space is. Two spaces:

- :class:`CartesianSpace`: centred frames divided by one data scale (nm). Prior: the mean-free Gaussian on the
  3(N-1)-dimensional centred subspace; decode multiplies by the scale, so log|det| = 3(N-1) log(scale).
- :class:`InternalSpace`: each atom's standardised (bond, angle, torsion) in the system's Z-matrix
  (:mod:`rexmol.zmatrix`, :mod:`rexmol.internal_coordinates`). Prior: a standard normal on the 3N-6 valid
  slots; decode places the atoms (NeRF) in a canonical frame, with the exact analytic log|det dx/dz| on the
  internal measure and a per-sample flag for near-singular geometry. The six rigid-body degrees of freedom are
  not modelled: they add the same constant to every log q, which cancels in self-normalised weights and the ESS.
  Symmetric rotors (methyl, NH3+, carboxylate; ``rotor_symmetry`` when fitted) are modelled modulo 2 pi / s and
  decode takes their branches, which a sampler draws with :meth:`InternalSpace.draw_branches` from the prior
  slots the flow never uses: the raw standard-normal draw that fed the prior also fixes the branches.

Why a space object rather than a flag: training (noise from the prior, loss on valid slots), the generator file
(what to rebuild), and the sampler (prior draws, decode, log-det) all need the same three facts; keeping them in
one serialisable object (``to_dict`` / :func:`space_from_dict`) means a generator is always rebuilt with exactly
the space it was trained in, never refitted.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rexmol.internal_coordinates import (
    InternalCoordinates, Standardisation, branches_from_normals, fit_standardisation,
)
from rexmol.likelihood.priors import MaskedGaussian, MeanFreeGaussian
from rexmol.zmatrix import ZMatrix, build_zmatrix, with_rotor_symmetry

__all__ = ["CartesianSpace", "InternalSpace", "SPACE_KINDS", "space_from_dict"]

SPACE_KINDS = ("cartesian", "internal")


def _frames(frames_nm: Tensor | np.ndarray, n_atoms: int) -> Tensor:
    """Frames as a tensor [B, N, 3] (accepts [B, 3N]); ValueError on a wrong atom count."""
    x = torch.as_tensor(frames_nm)
    if x.ndim == 2 and x.shape[1] == 3 * n_atoms:
        x = x.reshape(x.shape[0], n_atoms, 3)
    if x.ndim != 3 or tuple(x.shape[1:]) != (n_atoms, 3):
        raise ValueError(f"expected frames [B, {n_atoms}, 3] (nm), got {list(x.shape)}")
    return x


class CartesianSpace:
    """Centred Cartesian coordinates divided by ``scale`` (nm per model unit); prior: mean-free Gaussian."""

    kind = "cartesian"
    mean_free = True

    def __init__(self, n_atoms: int, scale: float):
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"CartesianSpace: scale must be a positive number of nm, got {scale}")
        self.n_atoms, self.scale = int(n_atoms), float(scale)
        self.prior = MeanFreeGaussian(self.n_atoms, 3)

    def encode(self, frames_nm: Tensor | np.ndarray) -> Tensor:
        """Frames in nm [B, N, 3] -> centred model coordinates [B, N, 3] (same dtype)."""
        x = _frames(frames_nm, self.n_atoms)
        return (x - x.mean(dim=1, keepdim=True)) / self.scale

    def draw_branches(self, raw: Tensor | np.ndarray) -> None:
        """No symmetric rotors in Cartesian coordinates: always None (see :meth:`InternalSpace.draw_branches`)."""
        return None

    def decode(self, x: Tensor, branches: None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Model coordinates [B, N, 3] (or [B, 3N]) -> (x_nm [B, N, 3], log|det dx_nm/dx| [B], flags [B]).

        log|det| = 3(N-1) log(scale) on the centred subspace; flags mark samples with non-finite coordinates.
        ``branches`` must be None (there are no symmetric rotors).
        """
        if branches is not None:
            raise ValueError("a Cartesian space has no symmetric rotors; decode takes no branches")
        x = _frames(x, self.n_atoms)
        log_det = x.new_full((x.shape[0],), self.prior.dim * math.log(self.scale))
        return x * self.scale, log_det, ~torch.isfinite(x).all(dim=(1, 2))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_atoms": self.n_atoms, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CartesianSpace:
        return cls(int(d["n_atoms"]), float(d["scale"]))


class InternalSpace:
    """Standardised internal coordinates, one token (bond, angle, torsion) per atom; prior: masked Gaussian.

    ``zmatrix`` fixes the placement; ``standardisation`` (fitted once on training frames) the affine maps and
    torsion cuts. Model coordinates are [B, N, 3] indexed by original atom index, 0 at invalid slots.
    """

    kind = "internal"
    mean_free = False

    def __init__(self, zmatrix: ZMatrix, standardisation: Standardisation):
        self.zmatrix, self.standardisation = zmatrix, standardisation
        self.transform = InternalCoordinates(zmatrix, standardisation)
        self.mask = torch.as_tensor(np.asarray(zmatrix.mask), dtype=torch.bool)
        self.n_atoms = int(self.mask.shape[0])
        self.prior = MaskedGaussian(self.mask)

    @property
    def rotor_symmetry(self) -> bool:
        """Whether any rotor is modelled modulo 2 pi / s (decode then needs branches)."""
        return len(self.zmatrix.symmetric) > 0

    @classmethod
    def fit(cls, frames_nm: Tensor | np.ndarray, system, rotor_symmetry: bool = False) -> InternalSpace:
        """Z-matrix of ``system`` (with its symmetric rotors if ``rotor_symmetry``) and standardisation fitted on
        training frames [F, N, 3] nm (float64).

        ValueError if any frame has near-singular geometry (it could not be encoded faithfully).
        """
        x = _frames(frames_nm, system.n_atoms).to(torch.float64)
        zmatrix = build_zmatrix(system)
        if rotor_symmetry:
            zmatrix = with_rotor_symmetry(zmatrix, system)
        space = cls(zmatrix, fit_standardisation(x, zmatrix))
        space.encode(x)  # validates every frame
        return space

    def _on(self, like: Tensor) -> InternalCoordinates:
        """The transform on ``like``'s device (it computes in the dtype of its input; statistics stay float64)."""
        return self.transform.to(like.device)

    def encode(self, frames_nm: Tensor | np.ndarray) -> Tensor:
        """Frames in nm [B, N, 3] -> model coordinates z [B, N, 3] (same dtype; float64 recommended).

        ValueError naming the count if any frame is near-singular (collinear atoms, zero bond, non-finite).
        """
        x = _frames(frames_nm, self.n_atoms)
        z, _, flags = self._on(x).encode(x)
        if bool(flags.any()):
            bad = torch.nonzero(flags).flatten()[:5].tolist()
            raise ValueError(f"{int(flags.sum())} of {len(x)} frames have near-singular geometry for internal "
                             f"coordinates (e.g. frames {bad}); remove them from the data")
        return z

    def draw_branches(self, raw: Tensor | np.ndarray) -> Tensor | None:
        """Branches [B, S] int64 of the symmetric rotors from raw standard-normal prior draws [B, N, 3] (before
        the prior's projection), or None if there are none. They are read from the slots the prior discards, so
        they are uniform and independent of the projected draw the flow starts from; the same raw draw always
        gives the same sample."""
        if not self.rotor_symmetry:
            return None
        spare = _frames(torch.as_tensor(raw), self.n_atoms)[:, ~self.mask]
        return branches_from_normals(spare, self.transform.radices)

    def decode(self, z: Tensor, branches: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Model coordinates z [B, N, 3] -> (x_nm [B, N, 3] in the canonical frame, log|det dx/dz| [B], flags [B]).

        Flags: near-singular or non-finite geometry; such samples must get log q = NaN (weight 0). ``branches``
        [B, S]: required when the space has symmetric rotors (:meth:`draw_branches`).
        """
        z = _frames(z, self.n_atoms)
        x, log_det, flags = self._on(z).decode(z, branches)
        return x, log_det, flags | ~torch.isfinite(log_det) | ~torch.isfinite(x).all(dim=(1, 2))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "zmatrix": self.zmatrix.to_dict(), "standardisation": self.standardisation.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InternalSpace:
        return cls(ZMatrix.from_dict(d["zmatrix"]), Standardisation.from_dict(d["standardisation"]))


def space_from_dict(d: dict[str, Any]) -> CartesianSpace | InternalSpace:
    """Rebuild a space from its ``to_dict()`` (ValueError on an unknown kind)."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "cartesian":
        return CartesianSpace.from_dict(d)
    if kind == "internal":
        return InternalSpace.from_dict(d)
    raise ValueError(f"unknown generator space {kind!r}; expected one of {SPACE_KINDS}")
