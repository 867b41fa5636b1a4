"""Internal coordinates: Cartesian nm <-> standardised (bond, angle, torsion) per atom, with the exact log|det|.

Why: in Cartesian coordinates a generative model has to learn bond lengths and angles that are ~100x narrower
than the conformational motions, which makes the flow stiff and the energies poor. In internal coordinates
(a Z-matrix, :mod:`rexmol.zmatrix`) bonds and angles are nearly Gaussian, the torsions carry the conformational
change, and the change of variables has a closed-form Jacobian.

**Coordinates.** Atom ``i`` placed from parents (j, k, l): bond ``r = |x_i - x_j|``, angle ``theta = angle(x_i,
x_j, x_k)`` in (0, pi), torsion ``phi = dihedral(x_l, x_k, x_j, x_i)`` in (-pi, pi] (IUPAC sign, as mdtraj).
Placement (z -> x, NeRF) puts ``order[0]`` at the origin, ``order[1]`` on +x and ``order[2]`` in the xy plane
with y > 0 (the *canonical frame*), then every other atom from its already placed parents.

**Standardisation** (fitted on training frames, :func:`fit_standardisation`): bonds and angles ``z = (v - mean)
/ std``; each torsion ``phi = c + g(u)``, ``u = mean + std * z``, with ``g(u) = pi erf(u / sqrt 2)`` a smooth
increasing bijection of the real line onto (-pi, pi) (a uniform torsion gives a standard normal u) and the cut
``c + pi`` at that torsion's least populated angle in the training data. We never wrap (``phi = c + pi * tanh``
would be fine, ``phi = (z mod 2 pi)`` is not): a wrap maps infinitely many z to one x, so the change-of-variables
formula, which needs an injective map, would give a wrong density; with a bijection onto the open interval the
only cost is the measure-zero cut, placed where the data has no mass.

**The exact log-determinant, and the 6 external degrees of freedom.** Write a configuration as (internal
coordinates, rotation R, translation t): ``x = R x_canonical(z) + t``. For atoms i >= 3 the placement of x_i
given its parents is spherical coordinates about x_j, so the Jacobian is block-triangular with blocks
``r_i^2 sin theta_i``. Atom order[1] is (r_1, direction of the 0-1 axis), atom order[2] is (r_2, theta_2, the
rotation psi about the 0-1 axis), i.e. spherical coordinates again, and (direction, psi) is a rotation. On
the full Cartesian measure

    dx = prod_{i>=1} r_i^2 prod_{i>=2} sin theta_i  dr dtheta dphi  dR dt,

with dR the Haar measure of SO(3) (= d omega at R = 1 in rotation-vector coordinates). Hence ``log_det`` (of
``encode`` and ``decode`` alike) is

    log|det dx/dz| = sum_{i>=1} 2 log r_i + sum_{i>=2} log sin theta_i + sum log std + sum_torsions log g'(u),

and log q(x) = log q_z(z) - log_det - log(8 pi^2) - (translation constant) for a sample that is decoded and
then given a uniformly random rotation (:func:`random_orientation`) and a fixed centroid. The rigid-body
constant is the same for every sample, so it cancels in self-normalised importance weights and the ESS; we
drop it. Note that the Jacobian of z -> x restricted to the canonical frame (the 3N - 6 Cartesian coordinates
x of order[1], x, y of order[2] and all of the rest) lacks the factor ``r_1^2 * r_2 sin theta_2`` = (volume
of the rotation orbit of that configuration), which is *not* constant: a rotation-invariant Boltzmann density
seen in the canonical frame carries it, so the canonical-frame determinant alone would bias the weights.
Since energies do not depend on R, the sampler may output the canonical frame as is.

**Symmetric rotors** (``zmatrix.symmetry[i] = s >= 2``: a methyl, NH3+ or carboxylate group whose s terminal
atoms the force field cannot tell apart). Their torsion has s equal modes; we model ``psi = s * phi`` (mod 2 pi,
one mode; its cut and standardisation fitted on psi like any torsion) and the *branch* ``k`` in {0, ..., s - 1}
separately: ``phi = (psi + 2 pi k) / s``. The sampler draws k uniformly and independently of z
(:meth:`InternalCoordinates.decode` takes it; :func:`branches_from_normals` makes it from spare standard-normal
draws). Then (z, k) -> x is a bijection (the s arcs of phi are disjoint), dphi / dpsi = 1 / s and P(k) = 1 / s,
so the density of x is q_z(z) * s * (1 / s) / |det|: ``log_det`` is *unchanged*, both factors of s cancel
exactly. No approximation enters the density; symmetry only decides how good the proposal is: turning the group
by 2 pi / s permutes identical atoms but keeps each atom's own bond and angle, so the model's assumption that
all branches are alike is exact for the torsion and approximate (to the small coupling of those bonds and
angles to the surroundings) for the rest, which importance weights correct.

**Flags** [B] bool, per sample, never a silent NaN: non-finite input or output, a bond shorter than
``min_bond`` nm (or negative, decoded), an angle with sin theta < ``min_sin`` (collinear atoms; also theta
outside (0, pi) when decoding, where the placement stops being injective), a torsion whose reference frame is
degenerate, or a torsion exactly at its cut (u infinite). Values are still returned for flagged samples.

All maps are pure torch (no in-place on inputs, no value-dependent Python branches on coordinates; decode checks
its integer ``branches`` eagerly), batched over [B, N, 3], float32 or float64, and work under torch.func
(vmap/jvp/vjp/jacfwd in the coordinates, branches held fixed). z is indexed by ORIGINAL atom index:
token i = atom i's (bond, angle, torsion); slots where ``zmatrix.mask`` is False are 0 on output and ignored on
input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rexmol.zmatrix import ZMatrix

SQRT2 = math.sqrt(2.0)
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
STANDARDISATION_FIELDS = (
    "bond_mean", "bond_std", "angle_mean", "angle_std", "torsion_cut", "torsion_mean", "torsion_std",
)


# ------------------------------------------------------------------------------------- torsion bijection


def circle_from_line(u: Tensor) -> Tensor:
    """g(u) = pi erf(u / sqrt 2): smooth increasing bijection R -> (-pi, pi) (a uniform angle <-> standard normal u)."""
    return math.pi * torch.erf(u / SQRT2)


def line_from_circle(a: Tensor) -> Tensor:
    """Inverse of :func:`circle_from_line` on (-pi, pi); +-inf at +-pi."""
    return SQRT2 * torch.erfinv(a / math.pi)


def circle_log_derivative(u: Tensor) -> Tensor:
    """log g'(u) = log(sqrt(2 pi)) - u^2 / 2."""
    return HALF_LOG_2PI - 0.5 * u * u


# --------------------------------------------------------------------------------------- standardisation


@dataclass(frozen=True, eq=False)
class Standardisation:
    """Per-atom standardisation (float64 arrays [N], ORIGINAL atom index; placeholders 0 / 1 at invalid slots).

    Bonds (nm) and angles (rad): ``z = (v - mean) / std``. Torsions: ``phi = torsion_cut - pi + g(u)``,
    ``u = torsion_mean + torsion_std * z`` (see the module docstring); ``torsion_cut`` in (-pi, pi] is the
    least populated training angle.
    """

    bond_mean: np.ndarray
    bond_std: np.ndarray
    angle_mean: np.ndarray
    angle_std: np.ndarray
    torsion_cut: np.ndarray
    torsion_mean: np.ndarray
    torsion_std: np.ndarray

    def __post_init__(self) -> None:
        n = len(np.asarray(self.bond_mean))
        for key in STANDARDISATION_FIELDS:
            value = np.array(getattr(self, key), dtype=np.float64)
            if value.shape != (n,) or not np.isfinite(value).all():
                raise ValueError(f"standardisation {key!r} must be finite with shape [{n}], got shape {value.shape}")
            if key.endswith("_std") and (value <= 0).any():
                raise ValueError(f"standardisation {key!r} must be > 0 (atoms {np.flatnonzero(value <= 0).tolist()})")
            value.setflags(write=False)
            object.__setattr__(self, key, value)

    @property
    def n_atoms(self) -> int:
        return len(self.bond_mean)

    def to_dict(self) -> dict[str, list[float]]:
        return {key: [float(v) for v in getattr(self, key)] for key in STANDARDISATION_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Standardisation:
        missing = [k for k in STANDARDISATION_FIELDS if k not in d]
        if missing:
            raise ValueError(f"standardisation dict lacks keys {missing}")
        return cls(**{k: np.asarray(d[k], dtype=np.float64) for k in STANDARDISATION_FIELDS})


# ------------------------------------------------------------------------------------------- geometry


def _indices(zmatrix: ZMatrix) -> dict[str, np.ndarray]:
    """Original atom indices of the valid bonds (i, j), angles (i, j, k), torsions (i, j, k, l), placement order."""
    o, b, a, t = zmatrix.order, zmatrix.bond, zmatrix.angle, zmatrix.torsion
    bi, ai, ti = o[1:].copy(), o[2:].copy(), o[3:].copy()
    return {
        "bi": bi, "bj": b[bi],
        "ai": ai, "aj": b[ai], "ak": a[ai],
        "ti": ti, "tj": b[ti], "tk": a[ti], "tl": t[ti],
    }


def _norm(v: Tensor) -> Tensor:
    return torch.linalg.vector_norm(v, dim=-1)


def _dot(u: Tensor, v: Tensor) -> Tensor:
    return (u * v).sum(-1)


def _geometry(x: Tensor, idx: dict[str, Tensor]) -> dict[str, Tensor]:
    """Raw internal values of the valid slots in placement order: r [B, N-1], theta / sin_theta [B, N-2],
    the dihedral as an unnormalised (cos, sin) pair [B, N-3] and the sine of its reference-frame angle."""
    r = _norm(x[:, idx["bi"]] - x[:, idx["bj"]])
    u, w = x[:, idx["ai"]] - x[:, idx["aj"]], x[:, idx["ak"]] - x[:, idx["aj"]]
    cross = _norm(torch.linalg.cross(u, w))
    theta = torch.atan2(cross, _dot(u, w))
    sin_theta = cross / (_norm(u) * _norm(w))
    b1 = x[:, idx["tk"]] - x[:, idx["tl"]]
    b2 = x[:, idx["tj"]] - x[:, idx["tk"]]
    b3 = x[:, idx["ti"]] - x[:, idx["tj"]]
    n1, n2 = torch.linalg.cross(b1, b2), torch.linalg.cross(b2, b3)
    cos_part = _dot(n1, n2)
    sin_part = _dot(torch.linalg.cross(n1, n2), b2) / _norm(b2)
    frame_sin = _norm(n1) / (_norm(b1) * _norm(b2))
    return {"r": r, "theta": theta, "sin_theta": sin_theta, "cos_part": cos_part, "sin_part": sin_part,
            "frame_sin": frame_sin}


def _check_coordinates(x: Any, n_atoms: int, what: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point torch tensor [B, {n_atoms}, 3], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[1:] != (n_atoms, 3):
        raise ValueError(f"{what} must have shape [B, {n_atoms}, 3] (Z-matrix of {n_atoms} atoms), got {list(x.shape)}")
    return x


def internal_values(x_nm: Tensor, zmatrix: ZMatrix) -> tuple[Tensor, Tensor, Tensor]:
    """Raw bonds (nm), angles (rad, (0, pi)) and torsions (rad, (-pi, pi]) [B, N] by ORIGINAL atom (0 where
    invalid), for coordinates [B, N, 3] in nm."""
    x = _check_coordinates(x_nm, zmatrix.n_atoms, "coordinates")
    idx = {k: torch.as_tensor(v, device=x.device) for k, v in _indices(zmatrix).items()}
    g = _geometry(x, idx)
    phi = torch.atan2(g["sin_part"], g["cos_part"])
    position = torch.as_tensor(zmatrix.position, device=x.device)
    return tuple(torch.cat([v.new_zeros(len(x), 3 - k), v], 1)[:, position]  # type: ignore[return-value]
                 for k, v in ((2, g["r"]), (1, g["theta"]), (0, phi)))


def _smoothed_histogram(angles: np.ndarray, bins: int, sigma_bins: float) -> np.ndarray:
    """Histogram of angles [F] on [-pi, pi) with ``bins`` bins, circularly smoothed by a Gaussian (width in bins)."""
    hist = np.histogram(angles, bins=bins, range=(-np.pi, np.pi))[0].astype(np.float64)
    reach = int(np.ceil(4 * sigma_bins))
    offsets = np.arange(-reach, reach + 1)
    kernel = np.exp(-0.5 * (offsets / sigma_bins) ** 2) if sigma_bins > 0 else (offsets == 0).astype(np.float64)
    return sum(w * np.roll(hist, s) for s, w in zip(offsets, kernel))


def fit_standardisation(frames_nm: Any, zmatrix: ZMatrix, bins: int = 72, sigma_bins: float = 1.5) -> Standardisation:
    """Fit the standardisation on training frames [F, N, 3] (nm, numpy or torch; F >= 2).

    Bonds and angles: mean and std. Torsions: the cut at the centre of the least populated bin of a ``bins``-bin
    histogram smoothed circularly by a Gaussian of ``sigma_bins`` bins (ties, e.g. empty runs, broken by a
    Gaussian of bins / 12 bins, i.e. farthest from the data), then the mean
    and std of u = g^-1(phi - cut + pi) (frames exactly at the cut, u infinite, do not enter the moments);
    symmetric rotors (``zmatrix.symmetry``) are fitted on psi = s phi (mod 2 pi) instead of phi.
    """
    x = torch.as_tensor(np.asarray(frames_nm.detach().cpu() if isinstance(frames_nm, Tensor) else frames_nm),
                        dtype=torch.float64)
    n = zmatrix.n_atoms
    if x.dim() != 3 or x.shape[1:] != (n, 3) or len(x) < 2:
        raise ValueError(f"training frames must have shape [F >= 2, {n}, 3], got {list(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("training frames contain non-finite coordinates; drop those frames before fitting")
    if bins < 3:
        raise ValueError(f"bins must be >= 3, got {bins}")
    bond, angle, torsion = (v.numpy() for v in internal_values(x, zmatrix))
    torsion = np.angle(np.exp(1j * zmatrix.symmetry * torsion))  # psi = s * phi (mod 2 pi) for symmetric rotors
    mask = zmatrix.mask
    out = {key: np.zeros(n) for key in STANDARDISATION_FIELDS}
    for key in ("bond_std", "angle_std", "torsion_std"):
        out[key][:] = 1.0
    for slot, values, name in ((0, bond, "bond"), (1, angle, "angle")):
        atoms = np.flatnonzero(mask[:, slot])
        out[f"{name}_mean"][atoms] = values[:, atoms].mean(0)
        out[f"{name}_std"][atoms] = values[:, atoms].std(0)
    centres = -np.pi + (np.arange(bins) + 0.5) * (2 * np.pi / bins)
    for i in np.flatnonzero(mask[:, 2]):
        density = _smoothed_histogram(torsion[:, i], bins, sigma_bins)
        lowest = np.flatnonzero(density <= density.min() * (1 + 1e-9) + 1e-12)
        # ties (e.g. a run of empty bins): the one farthest from the data, by a broad smoothing (bins / 12)
        broad = _smoothed_histogram(torsion[:, i], bins, bins / 12)
        cut = centres[lowest[int(np.argmin(broad[lowest]))]]
        relative = np.angle(np.exp(1j * (torsion[:, i] - cut + np.pi)))
        u = line_from_circle(torch.as_tensor(relative)).numpy()
        u = u[np.isfinite(u)]
        out["torsion_cut"][i] = cut
        out["torsion_mean"][i], out["torsion_std"][i] = u.mean(), u.std()
    for key in ("bond_std", "angle_std", "torsion_std"):
        bad = np.flatnonzero(~(out[key] > 0))
        if len(bad):
            raise ValueError(f"{key} is zero for atoms {bad.tolist()} in the training frames (rigid or repeated frames?)")
    return Standardisation(**out)


# ------------------------------------------------------------------------------------------- transform


class InternalCoordinates(nn.Module):
    """Cartesian nm [B, N, 3] <-> standardised internal coordinates z [B, N, 3], with log|det dx/dz| and flags.

    ``encode(x) -> (z, log_det, flags)``, ``decode(z) -> (x, log_det, flags)``; ``log_det`` [B] is always
    log|det dx/dz| on the full Cartesian measure (rigid-body constant dropped; module docstring), so
    log q_x(x) = log q_z(z) - log_det. ``flags`` [B] bool marks near-singular or non-finite samples.
    Decoded coordinates are in the canonical frame (order[0] at 0, order[1] on +x, order[2] in the xy plane,
    y > 0).
    """

    def __init__(self, zmatrix: ZMatrix, standardisation: Standardisation, min_bond: float = 1e-3,
                 min_sin: float = 1e-3) -> None:
        super().__init__()
        if standardisation.n_atoms != zmatrix.n_atoms:
            raise ValueError(
                f"standardisation has {standardisation.n_atoms} atoms, the Z-matrix {zmatrix.n_atoms}; fit it on this Z-matrix"
            )
        self.zmatrix, self.standardisation = zmatrix, standardisation
        self.min_bond, self.min_sin = float(min_bond), float(min_sin)
        idx = _indices(zmatrix)
        for key, value in idx.items():
            self.register_buffer(f"_{key}", torch.as_tensor(value), persistent=False)
        self.register_buffer("_order", torch.tensor(zmatrix.order), persistent=False)
        self.register_buffer("_position", torch.as_tensor(zmatrix.position), persistent=False)
        self.register_buffer("mask", torch.tensor(zmatrix.mask), persistent=False)
        s = standardisation
        stats = {
            "bond_mean": s.bond_mean[idx["bi"]], "bond_std": s.bond_std[idx["bi"]],
            "angle_mean": s.angle_mean[idx["ai"]], "angle_std": s.angle_std[idx["ai"]],
            "torsion_centre": s.torsion_cut[idx["ti"]] - np.pi,
            "torsion_mean": s.torsion_mean[idx["ti"]], "torsion_std": s.torsion_std[idx["ti"]],
        }
        for key, value in stats.items():
            self.register_buffer(f"_{key}", torch.as_tensor(value, dtype=torch.float64), persistent=False)
        symmetry = zmatrix.symmetry[idx["ti"]]
        self.register_buffer("_symmetry", torch.as_tensor(symmetry, dtype=torch.float64), persistent=False)
        self.register_buffer("_symmetric_slots", torch.as_tensor(np.flatnonzero(symmetry > 1)), persistent=False)
        self.radices = [int(v) for v in symmetry[symmetry > 1]]
        log_std = sum(float(np.log(stats[k]).sum()) for k in ("bond_std", "angle_std", "torsion_std"))
        self.log_std_sum = log_std
        # placement positions of the parents, for the NeRF loop (static Python ints)
        pos = zmatrix.position
        self._parents = [(int(pos[zmatrix.torsion[i]]), int(pos[zmatrix.angle[i]]), int(pos[zmatrix.bond[i]]))
                         for i in zmatrix.order[3:]]
        self._atom2_sign = 1.0 if int(pos[zmatrix.bond[zmatrix.order[2]]]) == 0 else -1.0

    @property
    def n_atoms(self) -> int:
        return self.zmatrix.n_atoms

    @property
    def dim(self) -> int:
        """Number of internal coordinates, 3N - 6."""
        return 3 * self.n_atoms - 6

    def _stat(self, name: str, like: Tensor) -> Tensor:
        return getattr(self, f"_{name}").to(dtype=like.dtype, device=like.device)

    def _idx(self) -> dict[str, Tensor]:
        return {k: getattr(self, f"_{k}") for k in ("bi", "bj", "ai", "aj", "ak", "ti", "tj", "tk", "tl")}

    def _log_det(self, r: Tensor, sin_theta: Tensor, u: Tensor) -> Tensor:
        return (2 * torch.log(torch.abs(r)).sum(-1) + torch.log(torch.abs(sin_theta)).sum(-1)
                + circle_log_derivative(u).sum(-1) + self.log_std_sum)

    def _assemble(self, zb: Tensor, za: Tensor, zt: Tensor) -> Tensor:
        """[B, N, 3] by original atom from the valid slots in placement order (zeros elsewhere)."""
        B = zb.shape[0]
        cols = (torch.cat([zb.new_zeros(B, 1), zb], 1), torch.cat([za.new_zeros(B, 2), za], 1),
                torch.cat([zt.new_zeros(B, 3), zt], 1))
        return torch.stack(cols, -1)[:, self._position]

    def _flags(self, *, finite: list[Tensor], r: Tensor, sins: list[Tensor]) -> Tensor:
        bad = (r < self.min_bond).any(-1)
        for s in sins:
            bad = bad | (s < self.min_sin).any(-1)
        for t in finite:
            bad = bad | ~torch.isfinite(t).flatten(1).all(-1)
        return bad

    def encode(self, x_nm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, N, 3] nm -> (z [B, N, 3], log|det dx/dz| [B], flags [B] bool)."""
        x = _check_coordinates(x_nm, self.n_atoms, "coordinates")
        g = _geometry(x, self._idx())
        centre = self._stat("torsion_centre", x)
        c, s = torch.cos(centre), torch.sin(centre)
        relative = torch.atan2(g["sin_part"] * c - g["cos_part"] * s, g["cos_part"] * c + g["sin_part"] * s)
        if self.radices:  # psi = s * phi for the symmetric rotors, relative to the centre
            psi = self._stat("symmetry", x) * torch.atan2(g["sin_part"], g["cos_part"]) - centre
            relative = torch.where(self._symmetry > 1, torch.atan2(torch.sin(psi), torch.cos(psi)), relative)
        u = line_from_circle(relative)
        zb = (g["r"] - self._stat("bond_mean", x)) / self._stat("bond_std", x)
        za = (g["theta"] - self._stat("angle_mean", x)) / self._stat("angle_std", x)
        zt = (u - self._stat("torsion_mean", x)) / self._stat("torsion_std", x)
        log_det = self._log_det(g["r"], g["sin_theta"], u)
        z = self._assemble(zb, za, zt)
        flags = self._flags(finite=[x, z, log_det[:, None]], r=g["r"], sins=[g["sin_theta"], g["frame_sin"]])
        return z, log_det, flags

    def branches(self, x_nm: Tensor) -> Tensor:
        """The branch k [B, S] int64 of every symmetric rotor (placement order) of coordinates [B, N, 3] nm, so
        that ``decode(encode(x)[0], branches(x))`` gives back x (module docstring)."""
        x = _check_coordinates(x_nm, self.n_atoms, "coordinates")
        g = _geometry(x, self._idx())
        slots = self._symmetric_slots
        phi = torch.atan2(g["sin_part"], g["cos_part"])[:, slots]
        s = self._stat("symmetry", x)[slots]
        psi = s * phi - self._stat("torsion_centre", x)[slots]
        turns = (psi - torch.atan2(torch.sin(psi), torch.cos(psi))) / (2 * math.pi)
        return torch.remainder(torch.round(turns).long(), s.long())

    def _branch_turns(self, branches: Tensor | None, like: Tensor) -> Tensor | None:
        """2 pi k per torsion slot [B, N - 3] (0 off the symmetric rotors) from ``branches`` [B, S]; None when the
        Z-matrix has no symmetric rotors."""
        if not self.radices:
            if branches is not None and branches.numel():
                raise ValueError("this Z-matrix has no symmetric rotors; decode takes no branches")
            return None
        expected = (like.shape[0], len(self.radices))
        if branches is None or tuple(branches.shape) != expected:
            raise ValueError(f"this Z-matrix has {len(self.radices)} symmetric rotors: decode needs branches of "
                             f"shape {list(expected)} (InternalSpace.draw_branches of the raw prior draws), got "
                             f"{None if branches is None else list(branches.shape)}")
        k = branches.to(device=like.device)
        radices = torch.as_tensor(self.radices, device=like.device)
        if bool(((k < 0) | (k >= radices)).any()):
            raise ValueError(f"branches must lie in [0, s) for the rotors' symmetry numbers {self.radices}")
        turns = like.new_zeros(like.shape[0], self._symmetry.shape[0])
        return turns.index_copy(1, self._symmetric_slots.to(like.device), (2 * math.pi) * k.to(like.dtype))

    def decode(self, z: Tensor, branches: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """z [B, N, 3] -> (x [B, N, 3] nm in the canonical frame, log|det dx/dz| [B], flags [B] bool).

        ``branches`` [B, S] int64 in [0, s): the branch of every symmetric rotor (required when there are any;
        module docstring)."""
        z = _check_coordinates(z, self.n_atoms, "internal coordinates z")
        zp = z[:, self._order]
        r = self._stat("bond_mean", z) + self._stat("bond_std", z) * zp[:, 1:, 0]
        theta = self._stat("angle_mean", z) + self._stat("angle_std", z) * zp[:, 2:, 1]
        u = self._stat("torsion_mean", z) + self._stat("torsion_std", z) * zp[:, 3:, 2]
        phi = self._stat("torsion_centre", z) + circle_from_line(u)
        turns = self._branch_turns(branches, z)
        if turns is not None:
            phi = (phi + turns) / self._stat("symmetry", z)
        cos_t, sin_t, cos_p, sin_p = torch.cos(theta), torch.sin(theta), torch.cos(phi), torch.sin(phi)
        zero = r.new_zeros(len(z))
        placed = [torch.stack([zero, zero, zero], -1), torch.stack([r[:, 0], zero, zero], -1)]
        j2 = 0 if self._atom2_sign > 0 else 1
        placed.append(placed[j2] + r[:, 1:2] * torch.stack([self._atom2_sign * cos_t[:, 0], sin_t[:, 0], zero], -1))
        frame_sins = []
        for p, (pl, pk, pj) in enumerate(self._parents, start=3):
            a, b, c = placed[pl], placed[pk], placed[pj]
            bc = c - b
            bc_hat = bc / _norm(bc)[:, None]
            n = torch.linalg.cross(b - a, bc_hat)
            n_norm = _norm(n)
            frame_sins.append(n_norm / _norm(b - a))
            n_hat = n / n_norm[:, None]
            m = torch.linalg.cross(n_hat, bc_hat)
            rr, ct, st = r[:, p - 1, None], cos_t[:, p - 2, None], sin_t[:, p - 2, None]
            placed.append(c + rr * (-ct * bc_hat + st * cos_p[:, p - 3, None] * m + st * sin_p[:, p - 3, None] * n_hat))
        x = torch.stack(placed, 1)[:, self._position]
        log_det = self._log_det(r, sin_t, u)
        valid = torch.cat([zp[:, 1:, 0], zp[:, 2:, 1], zp[:, 3:, 2]], 1)
        flags = self._flags(finite=[valid, x, log_det[:, None]], r=r, sins=[sin_t, torch.stack(frame_sins, 1)])
        return x, log_det, flags


def branches_from_normals(normals: Tensor, radices: list[int], max_states: int = 2 ** 20) -> Tensor:
    """Independent uniform branches [B, S] int64 (``k_i`` in [0, radices[i])) from spare standard normals [B, M].

    ``Phi(n)`` of a standard normal is uniform on (0, 1), so ``floor(Phi(n) * P)`` is uniform on [0, P) and its
    mixed-radix digits are independent uniform; each normal carries rotors whose product of radices is at most
    ``max_states`` (float64 resolves it to ~1e-10). ValueError if the M normals cannot carry all S rotors.
    """
    groups: list[list[int]] = []
    states = max_states + 1
    for i, s in enumerate(radices):
        if states * s > max_states:
            groups.append([])
            states = 1
        groups[-1].append(i)
        states *= s
    if len(groups) > normals.shape[-1]:
        raise ValueError(f"{len(radices)} symmetric rotors need {len(groups)} spare normal draws, only "
                         f"{normals.shape[-1]} are available")
    out = torch.zeros(normals.shape[0], len(radices), dtype=torch.long, device=normals.device)
    for column, group in enumerate(groups):
        total = math.prod(radices[i] for i in group)
        value = torch.floor(torch.special.ndtr(normals[:, column].double()) * total).long().clamp(0, total - 1)
        for i in group:
            out[:, i] = value % radices[i]
            value = value // radices[i]
    return out


def random_orientation(x_nm: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each sample [B, N, 3] given an independent uniformly random (Haar) rotation and zero centroid.

    Optional for outputs: it changes log q only by the constant log(1 / 8 pi^2) (uniform density on SO(3)) and
    the fixed translation volume, which cancel in SNIS weights and the ESS (module docstring).
    """
    if x_nm.dim() != 3 or x_nm.shape[-1] != 3:
        raise ValueError(f"coordinates must have shape [B, N, 3], got {list(x_nm.shape)}")
    q = torch.randn(len(x_nm), 4, generator=generator, dtype=torch.float64).to(device=x_nm.device)
    w, a, b, c = (q / _norm(q)[:, None]).to(x_nm.dtype).unbind(-1)
    rot = torch.stack([
        1 - 2 * (b * b + c * c), 2 * (a * b - c * w), 2 * (a * c + b * w),
        2 * (a * b + c * w), 1 - 2 * (a * a + c * c), 2 * (b * c - a * w),
        2 * (a * c - b * w), 2 * (b * c + a * w), 1 - 2 * (a * a + b * b),
    ], -1).reshape(-1, 3, 3)
    centred = x_nm - x_nm.mean(1, keepdim=True)
    return centred @ rot.transpose(1, 2)
