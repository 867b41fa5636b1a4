"""SNIS weights, Kish ESS, resampling and SNIS estimates (rexmol.weights)."""
import math

import numpy as np
import pytest
from scipy.stats import norm

from rexmol.weights import (bootstrap_intervals, clip_counts, counts_ess, counts_weights, estimate, kish_ess,
                            n_clipped, normalized_weights, percentile_interval, resample, snis)


def test_equal_weights_have_ess_one_at_any_offset():
    for offset in (0.0, -1e5, 1e5, 700.0):
        lw = np.full(1000, offset)
        assert kish_ess(lw) == pytest.approx(1.0, abs=1e-12)
        assert kish_ess(lw, normalized=False) == pytest.approx(1000.0, rel=1e-12)
        np.testing.assert_allclose(normalized_weights(lw), 1e-3, rtol=1e-12)


def test_one_dominant_weight_gives_ess_one_over_n():
    lw = np.full(500, -1000.0)
    lw[17] = 0.0
    assert kish_ess(lw) == pytest.approx(1.0 / 500, rel=1e-12)
    assert kish_ess(lw, normalized=False) == pytest.approx(1.0, rel=1e-12)
    assert normalized_weights(lw)[17] == pytest.approx(1.0, abs=1e-300)


def test_ess_of_two_level_weights_matches_formula():
    # k weights e^a and N-k weights 1: ESS = (k e^a + N - k)^2 / (k e^{2a} + N - k).
    n, k, a = 100, 10, 3.0
    lw = np.zeros(n)
    lw[:k] = a
    expected = (k * math.exp(a) + n - k) ** 2 / (k * math.exp(2 * a) + n - k)
    assert kish_ess(lw, normalized=False) == pytest.approx(expected, rel=1e-12)
    # stable with huge magnitudes (exp would overflow)
    assert kish_ess(lw + 1e6, normalized=False) == pytest.approx(expected, rel=1e-9)


def test_nonfinite_log_weights_get_zero_weight_and_are_counted():
    lw = np.array([0.0, np.nan, np.inf, -np.inf, 0.0])
    s = snis(lw)
    assert s.n == 5 and s.n_nonfinite == 3
    np.testing.assert_array_equal(s.nonfinite, [False, True, True, True, False])
    np.testing.assert_allclose(s.weights, [0.5, 0, 0, 0, 0.5])
    assert s.ess == pytest.approx(2 / 5)  # N counts every drawn sample
    assert s.ess_abs == pytest.approx(2.0)
    assert kish_ess([np.nan, -np.inf]) == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        normalized_weights([np.nan, np.inf])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="1-D"):
        kish_ess(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="empty"):
        snis([])
    with pytest.raises(ValueError, match="leading shape"):
        estimate(np.zeros(4), np.zeros(5))


@pytest.mark.parametrize("method", ["multinomial", "systematic"])
def test_resampling_follows_weights_and_never_picks_zero_weight(method):
    rng = np.random.default_rng(0)
    w = np.array([0.5, 0.0, 0.2, 0.3, 0.0])
    n = 200_000
    idx = resample(w, n, rng, method=method)
    counts = np.bincount(idx, minlength=w.size)
    assert counts[1] == 0 and counts[4] == 0
    if method == "systematic":  # each count is floor or ceil of n w_i
        assert np.all(np.abs(counts - n * w) <= 1)
    else:  # binomial counts within 5 standard deviations
        assert np.all(np.abs(counts - n * w) <= 5 * np.sqrt(n * w * (1 - w)) + 1e-9)


def test_resampling_rejects_bad_weights():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="sum to zero"):
        resample(np.zeros(3), 5, rng)
    with pytest.raises(ValueError, match="non-negative"):
        resample(np.array([1.0, np.nan]), 5, rng)
    with pytest.raises(ValueError, match="unknown resampling"):
        resample(np.ones(3), 5, rng, method="stratified-ish")


def test_exact_proposal_gives_ess_one_and_unbiased_means():
    """Closed-form Gaussian target N(m, s^2 I) and its exact flow x = m + s x0 from a standard normal prior."""
    rng = np.random.default_rng(1)
    d, n = 6, 4000
    m, s = np.linspace(-1, 2, d), 0.7
    x0 = rng.standard_normal((n, d))
    x = m + s * x0
    log_q = norm.logpdf(x0).sum(1) - d * math.log(s)  # change of variables of the exact map
    energy = 0.5 * ((x - m) ** 2).sum(1) / s**2 + 123.0  # unnormalised target, kT
    lw = -energy - log_q
    assert kish_ess(lw) == pytest.approx(1.0, abs=1e-12)
    est = estimate(lw, x)
    assert np.all(np.abs(est.mean - m) < 4 * est.stderr)
    np.testing.assert_allclose(est.stderr, s / math.sqrt(n) * np.sqrt((n - 1) / n), rtol=0.1)


def test_snis_with_mismatched_gaussian_matches_closed_form_ess_and_error_bar_covers():
    """Proposal N(0, sq^2), target N(mu, sp^2): ESS -> 1 / E_q[(p/q)^2] and the delta-method bar covers ~95%."""
    mu, sp, sq = 0.3, 1.0, 1.3
    # E_q[(p/q)^2] = int p^2/q for 1-D Gaussians (requires 2 sq^2 > sp^2)
    v = 1 / (2 / sp**2 - 1 / sq**2)
    m2 = sq / sp**2 * math.sqrt(v) * math.exp(mu**2 * (2 * v / sp**4 - 1 / sp**2))
    rng = np.random.default_rng(2)
    n, reps = 2000, 300
    hits, ess = 0, []
    for _ in range(reps):
        x = sq * rng.standard_normal(n)
        lw = norm.logpdf(x, mu, sp) - norm.logpdf(x, 0, sq)
        ess.append(kish_ess(lw))
        est = estimate(lw, x)
        hits += abs(float(est.mean) - mu) < 1.96 * float(est.stderr)
    assert np.mean(ess) == pytest.approx(1 / m2, rel=0.02)
    assert 0.90 <= hits / reps <= 0.99


@pytest.mark.parametrize("n", [24, 500, 1000, 4999, 5000, 10_001])
def test_clip_drops_exactly_ceil_q_n_of_the_largest_finite_log_weights(n):
    rng = np.random.default_rng(n)
    lw = rng.normal(size=n)
    kept = clip_counts(lw, np.ones(n, dtype=np.int64), 0.002)
    k = -(-2 * n // 1000)  # ceil(0.002 n) in integer arithmetic
    assert n_clipped(0.002, n) == k and int((kept == 0).sum()) == k
    assert lw[kept == 0].min() > lw[kept == 1].max()  # the largest ones went
    np.testing.assert_array_equal(clip_counts(lw, np.ones(n, dtype=np.int64), None), 1)  # off: nothing dropped
    assert n_clipped(None, n) == 0


def test_clip_never_drops_nonfinite_log_weights_and_drops_duplicates_copy_by_copy():
    lw = np.array([np.inf, 5.0, np.nan, 4.0, 1.0, -np.inf, 0.0, 2.0, 3.0, 0.5])
    kept = clip_counts(lw, np.ones(10, dtype=np.int64), 0.2)  # ceil(0.2 * 10) = 2: the finite 5.0 and 4.0
    np.testing.assert_array_equal(kept, [1, 0, 1, 0, 1, 1, 1, 1, 1, 1])
    kept = clip_counts(lw, np.array([0, 3, 0, 1, 1, 0, 1, 1, 2, 1]), 0.2)  # 10 copies: 2 of the three 5.0s
    np.testing.assert_array_equal(kept, [0, 1, 0, 1, 1, 0, 1, 1, 2, 1])
    with pytest.raises(ValueError, match="clip-logw"):
        n_clipped(1.0, 10)


def test_count_weights_and_ess_equal_those_of_the_expanded_sample():
    rng = np.random.default_rng(3)
    lw = np.append(rng.normal(0, 2, 49), np.nan)
    counts = rng.integers(0, 4, 50)
    expanded = np.repeat(lw, counts)
    assert counts_ess(lw, counts) == pytest.approx(kish_ess(expanded), rel=1e-12)
    assert counts_ess(lw, np.ones(50)) == pytest.approx(kish_ess(lw), rel=1e-12)
    w = counts_weights(lw, counts)
    np.testing.assert_allclose(np.repeat(w / np.maximum(counts, 1), counts), normalized_weights(expanded), rtol=1e-12)


def test_bootstrap_intervals_cover_closed_form_snis_mean_and_ess_at_about_95_percent():
    """Proposal N(0, 1.3^2), target N(0.3, 1): SNIS mean -> 0.3, ESS -> 1 / E_q[(p/q)^2] (closed form)."""
    mu, sp, sq = 0.3, 1.0, 1.3
    v = 1 / (2 / sp**2 - 1 / sq**2)
    ess_true = 1 / (sq / sp**2 * math.sqrt(v) * math.exp(mu**2 * (2 * v / sp**4 - 1 / sp**2)))
    rng = np.random.default_rng(7)
    reps, hits_mean, hits_ess = 150, 0, 0
    for _ in range(reps):
        x = sq * rng.standard_normal(300)
        lw = norm.logpdf(x, mu, sp) - norm.logpdf(x, 0, sq)
        ci, failed = bootstrap_intervals(
            x.size, lambda c, r: {"mean": float(counts_weights(lw, c) @ x), "ess": counts_ess(lw, c)}, 150, rng)
        assert failed == 0
        hits_mean += ci["mean"][0] <= mu <= ci["mean"][1]
        hits_ess += ci["ess"][0] <= ess_true <= ci["ess"][1]
    assert 0.87 <= hits_mean / reps <= 0.99 and 0.87 <= hits_ess / reps <= 0.99


def test_percentile_interval_needs_two_finite_values():
    assert percentile_interval([1.0, np.nan]) is None
    lo, hi = percentile_interval(np.arange(1001.0))
    assert lo == pytest.approx(25.0) and hi == pytest.approx(975.0)
