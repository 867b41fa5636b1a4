"""Self-normalised importance sampling (SNIS): normalised weights, Kish ESS, resampling, estimates.

All functions take log-weights ``log w = -E/kT - log q`` as a 1-D array ``[N]`` (any float dtype, computed
in float64). A non-finite log-weight (NaN, +inf, or -inf from an infinite energy) gets weight exactly 0;
such samples still count in ``N`` (they were drawn) and are counted in :class:`SNIS` so a report can state
how many there were — they are never silently dropped.

The evaluation protocol (clip, SNIS, resample) also runs on *multiplicities*: ``counts`` [N] says how often each
sample occurs in a (bootstrap) replicate, so a replicate never copies the samples; all ones is the plain set.
Clipping (``clip_counts``) is the published evaluation's ``logw_quantile_filter``: drop the ceil(Q N) largest
finite log-weights before SNIS. It biases the estimate (it trims the tail SNIS needs), so it is off unless asked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import math

import numpy as np
from scipy.special import logsumexp

__all__ = [
    "SNIS",
    "Estimate",
    "snis",
    "normalized_weights",
    "kish_ess",
    "resample",
    "estimate",
    "n_clipped",
    "clip_counts",
    "counts_ess",
    "counts_weights",
    "percentile_interval",
    "bootstrap_intervals",
]


def _log_weights(log_w) -> tuple[np.ndarray, np.ndarray]:
    """``(log_w as float64 with non-finite entries set to -inf, mask of non-finite entries)``."""
    lw = np.asarray(log_w, dtype=np.float64)
    if lw.ndim != 1:
        raise ValueError(f"log-weights must be a 1-D array [N], got shape {lw.shape}")
    if lw.size == 0:
        raise ValueError("log-weights are empty: no samples")
    bad = ~np.isfinite(lw)
    return np.where(bad, -np.inf, lw), bad


def normalized_weights(log_w) -> np.ndarray:
    """Normalised weights ``softmax(log w)`` [N], float64, summing to 1; non-finite log w -> 0.

    Raises ValueError when no log-weight is finite (the weights cannot be normalised).
    """
    lw, bad = _log_weights(log_w)
    if bad.all():
        raise ValueError(f"all {lw.size} log-weights are non-finite: no sample has a usable weight")
    return np.exp(lw - logsumexp(lw))


def kish_ess(log_w, normalized: bool = True) -> float:
    """Kish effective sample size ``exp(2 LSE(log w) - LSE(2 log w))``, divided by N if ``normalized``.

    Lies in [1/N, 1] (normalised) for any weights with at least one finite entry; 0 when none is finite.
    """
    lw, bad = _log_weights(log_w)
    if bad.all():
        return 0.0
    ess = float(np.exp(2.0 * logsumexp(lw) - logsumexp(2.0 * lw)))
    return ess / lw.size if normalized else ess


@dataclass(frozen=True)
class SNIS:
    """Summary of a set of importance weights.

    ``weights`` [N] normalised (zero where ``nonfinite``); ``ess`` normalised Kish ESS in [0, 1];
    ``ess_abs`` = ess * N; ``n_nonfinite`` samples whose log-weight was NaN or +-inf (weight 0).
    """

    weights: np.ndarray
    nonfinite: np.ndarray
    ess: float
    ess_abs: float

    @property
    def n(self) -> int:
        return int(self.weights.size)

    @property
    def n_nonfinite(self) -> int:
        return int(self.nonfinite.sum())


def snis(log_w) -> SNIS:
    """Normalised weights, ESS and the non-finite count of ``log_w`` [N] in one call."""
    lw, bad = _log_weights(log_w)
    ess = kish_ess(lw)
    return SNIS(weights=normalized_weights(lw), nonfinite=bad, ess=ess, ess_abs=ess * lw.size)


def resample(weights, n: int, rng: np.random.Generator, method: str = "multinomial") -> np.ndarray:
    """Draw ``n`` indices [n] (int64) with replacement in proportion to normalised ``weights`` [N].

    ``method``: ``"multinomial"`` (i.i.d. draws, what the published evaluation does) or ``"systematic"``
    (one uniform offset, stratified; lower variance, same expectation). Indices of systematic resampling
    come out sorted.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D array, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    total = w.sum()
    if not total > 0:
        raise ValueError("weights sum to zero: nothing to resample")
    if n < 1:
        raise ValueError(f"number of resampled indices must be >= 1, got {n}")
    cdf = np.cumsum(w / total)
    cdf[-1] = 1.0
    if method == "multinomial":
        u = rng.random(n)
    elif method == "systematic":
        u = (rng.random() + np.arange(n)) / n
    else:
        raise ValueError(f"unknown resampling method {method!r}; use 'multinomial' or 'systematic'")
    # side="right" never selects a zero-weight index (its cdf equals its predecessor's).
    return np.minimum(np.searchsorted(cdf, u, side="right"), w.size - 1).astype(np.int64)


@dataclass(frozen=True)
class Estimate:
    """An SNIS estimate ``mean`` with standard error ``stderr`` (same shape: scalar or [K])."""

    mean: np.ndarray
    stderr: np.ndarray


def estimate(log_w, values) -> Estimate:
    """SNIS estimate of E_p[f] from ``values`` f(x_i), shape [N] or [N, K], with a delta-method error bar.

    mean = sum_i w_i f_i with normalised w; its asymptotic variance (delta method for a ratio estimator)
    is sum_i w_i^2 (f_i - mean)^2. For equal weights this is the plain standard error (biased 1/N form).
    Values at zero-weight samples are ignored (they may be non-finite there).
    """
    w = normalized_weights(log_w)
    f = np.asarray(values, dtype=np.float64)
    if f.shape[:1] != w.shape:
        raise ValueError(f"values have leading shape {f.shape[:1]}, log-weights have {w.shape}")
    used = w > 0
    if not np.all(np.isfinite(f[used])):
        raise ValueError("values are non-finite at samples with non-zero weight")
    f = np.where(used.reshape((-1,) + (1,) * (f.ndim - 1)), f, 0.0)
    wk = w.reshape((-1,) + (1,) * (f.ndim - 1))
    mean = np.sum(wk * f, axis=0)
    var = np.sum(wk**2 * (f - mean) ** 2, axis=0)
    return Estimate(mean=mean, stderr=np.sqrt(var))


def n_clipped(q: float | None, n: int) -> int:
    """Number of log-weights the published filter drops from ``n`` samples: ceil(q n) (0 when ``q`` is None)."""
    if q is None:
        return 0
    if not 0.0 <= q < 1.0:
        raise ValueError(f"--clip-logw must be in [0, 1), got {q}")
    return math.ceil(round(q * n, 9))  # round first: 0.002 * 5000 is 10.000000000000002 in floating point


def clip_counts(log_w, counts, q: float | None) -> np.ndarray:
    """Multiplicities [N] left after dropping the ceil(q M) largest finite log-weights, M = counts.sum().

    ``counts`` [N] int >= 0 (a duplicated sample is dropped copy by copy; ties go to the lower index).
    Non-finite log-weights are never dropped: they stay in the set with weight 0 and are counted as non-finite.
    ``q`` None or 0: ``counts`` unchanged.
    """
    lw, bad = _log_weights(log_w)
    c = np.asarray(counts, dtype=np.int64)
    if c.shape != lw.shape or np.any(c < 0):
        raise ValueError(f"counts must be {lw.size} non-negative integers, got shape {c.shape}")
    k = n_clipped(q, int(c.sum()))
    if k == 0:
        return c.copy()
    order = np.lexsort((np.arange(lw.size), -lw))  # largest first, finite before -inf (non-finite)
    order = order[~bad[order]]
    before = np.cumsum(c[order]) - c[order]
    drop = np.clip(k - before, 0, c[order])
    kept = c.copy()
    kept[order] -= drop
    return kept


def counts_weights(log_w, counts) -> np.ndarray:
    """Normalised SNIS weights [N] of a set holding sample i ``counts[i]`` times (w_i = c_i e^{log w_i} / sum).

    ValueError when no sample with a finite log-weight is left.
    """
    lw, bad = _log_weights(log_w)
    c = np.asarray(counts, dtype=np.float64)
    live = (c > 0) & ~bad
    if not live.any():
        raise ValueError("no sample with a finite log-weight is left: nothing to weight")
    a = np.where(live, lw + np.log(np.where(live, c, 1.0)), -np.inf)
    return np.exp(a - logsumexp(a))


def counts_ess(log_w, counts) -> float:
    """Normalised Kish ESS of the multiset ``counts`` [N]: (sum c w)^2 / (sum c w^2) / sum c.

    With all counts 1 this is :func:`kish_ess`; the denominator counts every copy, non-finite ones included.
    """
    lw, bad = _log_weights(log_w)
    c = np.asarray(counts, dtype=np.float64)
    live = (c > 0) & ~bad
    if not live.any():
        return 0.0
    lc = np.log(c[live])
    ess = np.exp(2.0 * logsumexp(lw[live] + lc) - logsumexp(2.0 * lw[live] + lc))
    return float(ess / c.sum())


def percentile_interval(values, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the finite ``values`` [B] (None if fewer than 2 are finite)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return None
    lo, hi = np.percentile(v, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(lo), float(hi)


def bootstrap_intervals(n: int, statistic: Callable[[np.ndarray, np.random.Generator], dict[str, float]],
                        replicates: int, rng: np.random.Generator, level: float = 0.95,
                        on_replicate: Callable[[int], None] | None = None,
                        ) -> tuple[dict[str, tuple[float, float] | None], int]:
    """Percentile-bootstrap intervals of every value ``statistic(counts [n], rng)`` returns.

    Each replicate draws n of the n samples with replacement, as multiplicities ``counts``, and the statistic
    repeats the whole estimate on them (e.g. clip, SNIS, resample, metrics, with ``rng`` for its own draws).
    A replicate whose statistic raises ValueError (say, no finite weight left) is left out and counted.
    ``on_replicate(k)`` is called after replicate k (1-based) is done (progress).
    Returns ``({name: (lo, hi) or None}, number of replicates left out)``.
    """
    values: dict[str, list[float]] = {}
    failed = 0
    for k in range(replicates):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        try:
            result = statistic(counts, rng)
        except ValueError:
            failed += 1
            result = {}
        for key, v in result.items():
            values.setdefault(key, []).append(v)
        if on_replicate is not None:
            on_replicate(k + 1)
    return {key: percentile_interval(v, level) for key, v in values.items()}, failed
