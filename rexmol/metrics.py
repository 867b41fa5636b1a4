"""Distribution metrics against MD: E-W2 (energies), T-W2 (backbone dihedrals on the torus), basin populations.

Definitions follow the published tri-alanine evaluation (docs/design.md §5):
E-W2 = sqrt(ot.emd2_1d(E_md, E_gen)) with energies in kT (squared-Euclidean ground cost);
T-W2 = sqrt(ot.emd2(a, b, M)) with M_ij = sum_k min(|d_k|, 2 pi - |d_k|)^2, d = angle_i - angle_j (radians).
Both accept optional sample weights so the *reweighted* distribution can be compared without resampling
noise; the published "reweighted" numbers use an unweighted metric on a resampled set instead.
"""
from __future__ import annotations

import math

import numpy as np
import ot

from rexmol.weights import Estimate, estimate

__all__ = [
    "energy_w2",
    "torus_cost",
    "torus_w2",
    "BASINS",
    "basin_labels",
    "basin_populations",
    "residue_pairs",
]

TWO_PI = 2.0 * math.pi


def _finite_1d(name: str, values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} has {int((~np.isfinite(v)).sum())} non-finite values; filter and count them first")
    return v


def _histogram(name: str, weights, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"{name} must be {n} finite non-negative numbers with a positive sum")
    return w / w.sum()


def energy_w2(e_ref, e_gen, ref_weights=None, gen_weights=None) -> float:
    """2-Wasserstein distance between two 1-D energy samples [N], [M] (kT); weights optional, uniform default."""
    a = _finite_1d("reference energies", e_ref)
    b = _finite_1d("generated energies", e_gen)
    wa = _histogram("reference weights", ref_weights, a.size)
    wb = _histogram("generated weights", gen_weights, b.size)
    return math.sqrt(max(float(ot.emd2_1d(a, b, wa, wb, metric="sqeuclidean")), 0.0))


def _angles(name: str, values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty array [samples, angles], got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} has non-finite angles")
    return v


COST_BLOCK = 1 << 16  # entries per block of rows in torus_cost (512 KiB of float64)


def torus_cost(a, b) -> np.ndarray:
    """Squared geodesic distance on the flat torus between angle sets a [N, D] and b [M, D] (radians) -> [N, M].

    Angles may lie in any 2 pi window: both sets are wrapped into [-pi, pi) first, so every difference d lies in
    (-2 pi, 2 pi) and min(|d|, 2 pi - |d|) needs no modulo per entry (the modulo cost 30x the rest). Built in
    blocks of rows with in-place arithmetic, so temporaries stay in cache and the only large allocation is the
    result (at 10^4 x 10^4, whole-matrix temporaries spent more time in page faults than in arithmetic).
    """
    a = _wrapped(_angles("angles a", a))
    b = _wrapped(_angles("angles b", b))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"angle sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    cost = np.zeros((a.shape[0], b.shape[0]))
    rows = max(1, COST_BLOCK // max(b.shape[0], 1))
    d = np.empty((min(rows, a.shape[0]), b.shape[0]))
    e = np.empty_like(d)
    for start in range(0, a.shape[0], rows):
        block = cost[start:start + rows]
        db, eb = d[:len(block)], e[:len(block)]
        for k in range(a.shape[1]):
            np.subtract(a[start:start + rows, k, None], b[None, :, k], out=db)
            np.abs(db, out=db)
            np.subtract(TWO_PI, db, out=eb)
            np.minimum(db, eb, out=db)
            np.square(db, out=db)
            block += db
    return cost


def _wrapped(angles: np.ndarray) -> np.ndarray:
    """Angles [N, D] (radians) wrapped into [-pi, pi)."""
    out = np.mod(angles + math.pi, TWO_PI) - math.pi
    return np.where(out >= math.pi, out - TWO_PI, out)  # mod can round up to 2 pi itself


def torus_w2(a, b, a_weights=None, b_weights=None) -> float:
    """T-W2: exact optimal-transport 2-Wasserstein distance on the torus between a [N, D] and b [M, D] (radians)."""
    cost = torus_cost(a, b)
    wa = _histogram("weights of a", a_weights, cost.shape[0])
    wb = _histogram("weights of b", b_weights, cost.shape[1])
    wa = np.full(cost.shape[0], 1.0 / cost.shape[0]) if wa is None else wa
    wb = np.full(cost.shape[1], 1.0 / cost.shape[1]) if wb is None else wb
    w2sq = ot.emd2(wa, wb, cost, numItermax=100 * cost.size + 100_000)
    return math.sqrt(max(float(w2sq), 0.0))


# Ramachandran basins of one residue, as a partition of the (phi, psi) torus (degrees, psi window [-180, 180)):
# phi < 0 with -120 <= psi < 50 -> alpha_R; phi < 0 otherwise -> beta (incl. PII); phi >= 0 -> alpha_L.
BASINS: tuple[str, ...] = ("alpha_R", "beta", "alpha_L")


def basin_labels(phi, psi) -> np.ndarray:
    """Index into :data:`BASINS` [N] (int) for each (phi [N], psi [N]) in radians, any 2 pi window."""
    phi = np.degrees(np.mod(np.asarray(phi, dtype=np.float64) + math.pi, TWO_PI) - math.pi)
    psi = np.degrees(np.mod(np.asarray(psi, dtype=np.float64) + math.pi, TWO_PI) - math.pi)
    if phi.shape != psi.shape or phi.ndim != 1:
        raise ValueError(f"phi and psi must be 1-D arrays of one length, got {phi.shape} and {psi.shape}")
    alpha_r = (psi >= -120.0) & (psi < 50.0)
    return np.where(phi >= 0.0, 2, np.where(alpha_r, 0, 1))


def basin_populations(phi, psi, log_w=None) -> dict[str, Estimate]:
    """Population of each basin in :data:`BASINS` with a standard error, SNIS-weighted when ``log_w`` [N] is given.

    Without weights the error bar is the i.i.d. one, an underestimate for correlated MD frames.
    Samples with zero weight (non-finite log w) may carry non-finite angles: they are ignored.
    """
    phi = np.asarray(phi, dtype=np.float64)
    psi = np.asarray(psi, dtype=np.float64)
    lw = np.zeros(phi.shape[0]) if log_w is None else np.asarray(log_w, dtype=np.float64)
    usable = np.isfinite(lw) & np.isfinite(phi) & np.isfinite(psi)
    labels = np.full(phi.shape[0], -1)
    labels[usable] = basin_labels(phi[usable], psi[usable])
    onehot = (labels[:, None] == np.arange(len(BASINS))[None, :]).astype(np.float64)
    est = estimate(np.where(usable, lw, -np.inf), onehot)
    return {name: Estimate(mean=est.mean[k], stderr=est.stderr[k]) for k, name in enumerate(BASINS)}


def residue_pairs(dihedrals: dict) -> list[tuple[int, int]]:
    """Pairs (k_phi, k_psi) of one residue's phi and psi, found by a shared C-alpha atom.

    ``dihedrals`` = {"phi": [[C-, N, CA, C], ...], "psi": [[N, CA, C, N+], ...]} (atom indices). A terminal
    residue with only one of the two angles has no pair (for tri-alanine: one pair, the central residue).
    """
    phis, psis = dihedrals.get("phi", []), dihedrals.get("psi", [])
    return [(i, j) for i, p in enumerate(phis) for j, s in enumerate(psis) if p[2] == s[1] and p[1] == s[0]]
