"""Self-normalised importance sampling (SNIS): normalised weights, Kish ESS, resampling, estimates.

All functions take log-weights ``log w = -E/kT - log q`` as a 1-D array ``[N]`` (any float dtype, computed
in float64). A non-finite log-weight (NaN, +inf, or -inf from an infinite energy) gets weight exactly 0;
such samples still count in ``N`` (they were drawn) and are counted in :class:`SNIS` so a report can state
how many there were — they are never silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

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
