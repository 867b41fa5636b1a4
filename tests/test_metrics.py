"""E-W2, T-W2 and Ramachandran basin populations (rexmol.metrics)."""
import math
from itertools import permutations

import numpy as np
import pytest
from scipy.stats import norm

from rexmol.metrics import (BASINS, basin_labels, basin_populations, energy_w2, residue_pairs, torus_cost,
                            torus_w2)


def _quantile_sample(m, s, n):
    return m + s * norm.ppf((np.arange(n) + 0.5) / n)


def test_energy_w2_between_gaussians_matches_closed_form():
    # W2(N(m1, s1^2), N(m2, s2^2)) = sqrt((m1 - m2)^2 + (s1 - s2)^2)
    m1, s1, m2, s2 = -140.0, 4.0, -137.0, 5.5
    exact = math.hypot(m1 - m2, s1 - s2)
    assert energy_w2(_quantile_sample(m1, s1, 20000), _quantile_sample(m2, s2, 30000)) == pytest.approx(exact, rel=2e-3)
    rng = np.random.default_rng(0)
    a, b = m1 + s1 * rng.standard_normal(20000), m2 + s2 * rng.standard_normal(20000)
    assert energy_w2(a, b) == pytest.approx(exact, rel=0.03)
    assert energy_w2(a, a) == pytest.approx(0.0, abs=1e-12)


def test_energy_w2_weights_equal_duplicated_samples():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(1, 2, size=40)
    counts = rng.integers(1, 4, size=40)
    assert energy_w2(a, b, gen_weights=counts) == pytest.approx(energy_w2(a, np.repeat(b, counts)), rel=1e-10)


def test_energy_w2_rejects_nonfinite_and_empty():
    with pytest.raises(ValueError, match="non-finite"):
        energy_w2([1.0, 2.0], [1.0, np.inf])
    with pytest.raises(ValueError, match="empty"):
        energy_w2([], [1.0])


def test_torus_w2_is_invariant_to_2pi_shifts():
    rng = np.random.default_rng(2)
    a = rng.uniform(-np.pi, np.pi, (60, 4))
    b = rng.uniform(-np.pi, np.pi, (50, 4))
    shift = 2 * np.pi * rng.integers(-3, 4, size=a.shape)
    base = torus_w2(a, b)
    assert base > 0.1
    assert torus_w2(a + shift, b) == pytest.approx(base, rel=1e-12)
    assert torus_w2(a, b + 2 * np.pi) == pytest.approx(base, rel=1e-12)
    assert torus_w2(a + np.pi, b + np.pi) == pytest.approx(base, rel=1e-9)  # rotation of the torus


def test_torus_w2_wraps_around_pi():
    eps = 0.01
    a = np.array([[np.pi - eps, -np.pi + eps, 0.0, 3.0]])
    b = np.array([[-np.pi + eps, np.pi - eps, 0.0, 3.0 - 2 * np.pi]])
    assert torus_w2(a, b) == pytest.approx(math.sqrt(2) * 2 * eps, rel=1e-9)
    assert torus_cost(a, b)[0, 0] == pytest.approx(2 * (2 * eps) ** 2, rel=1e-9)
    # antipodal points are pi apart, not 2 pi
    assert torus_w2([[np.pi / 2]], [[-np.pi / 2]]) == pytest.approx(np.pi, rel=1e-12)


def test_torus_w2_equals_brute_force_assignment():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(-4, 4, (6, 2)), rng.uniform(-4, 4, (6, 2))
    cost = torus_cost(a, b)
    best = min(sum(cost[i, p[i]] for i in range(6)) / 6 for p in permutations(range(6)))
    assert torus_w2(a, b) == pytest.approx(math.sqrt(best), rel=1e-10)


def test_torus_cost_in_row_blocks_equals_the_geodesic_distance_from_complex_phases(monkeypatch):
    import rexmol.metrics as metrics

    rng = np.random.default_rng(5)
    a, b = rng.uniform(-9, 9, (37, 3)), rng.uniform(-np.pi, 3 * np.pi, (11, 3))  # any 2 pi window
    truth = (np.abs(np.angle(np.exp(1j * (a[:, None, :] - b[None, :, :])))) ** 2).sum(-1)
    monkeypatch.setattr(metrics, "COST_BLOCK", 4 * 11)  # blocks of 4 rows, the last one partial
    np.testing.assert_allclose(metrics.torus_cost(a, b), truth, rtol=0, atol=1e-12)
    monkeypatch.setattr(metrics, "COST_BLOCK", 1)  # one row per block
    np.testing.assert_allclose(metrics.torus_cost(a, b), truth, rtol=0, atol=1e-12)


def test_torus_w2_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="dimension"):
        torus_w2(np.zeros((3, 4)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        torus_w2(np.full((2, 1), np.nan), np.zeros((3, 1)))


def test_basin_labels_partition_the_torus():
    deg = np.radians
    phi = deg(np.array([-60.0, -60.0, -150.0, 60.0, -60.0 + 360.0]))
    psi = deg(np.array([-45.0, 140.0, -160.0, 40.0, -45.0]))
    np.testing.assert_array_equal(basin_labels(phi, psi), [0, 1, 1, 2, 0])
    assert BASINS == ("alpha_R", "beta", "alpha_L")


def test_basin_populations_weighted_and_unweighted():
    phi = np.radians([-60.0, -60.0, 60.0, -70.0])
    psi = np.radians([-45.0, 140.0, 40.0, np.nan])
    pops = basin_populations(phi[:3], psi[:3])
    assert [pops[b].mean for b in BASINS] == pytest.approx([1 / 3] * 3)
    # weights 1:2:1; the 4th sample has non-finite weight so its NaN angle is ignored
    lw = np.log(np.array([1.0, 2.0, 1.0, np.nan]))
    pops = basin_populations(phi, psi, lw)
    assert [pops[b].mean for b in BASINS] == pytest.approx([0.25, 0.5, 0.25])
    assert all(pops[b].stderr > 0 for b in BASINS)


def test_residue_pairs_match_shared_c_alpha():
    # tri-alanine-like: phi of residues 2, 3 and psi of residues 1, 2 -> only residue 2 has both
    dihedrals = {"phi": [[4, 10, 12, 14], [14, 20, 22, 24]], "psi": [[0, 2, 4, 10], [10, 12, 14, 20]]}
    assert residue_pairs(dihedrals) == [(0, 1)]
