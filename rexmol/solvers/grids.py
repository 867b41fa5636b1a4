"""Fixed time grids, precomputed once in float64 (Python floats), in either direction of t.

``FixedGrid``: one grid for the batch, uniform in t, varsigma, log varsigma or log(1 + varsigma) (``GRID_KINDS``,
``FixedGrid.named``); in data-kind Lawson coordinates uniform-in-t steps lose order near the data end, and a
grid uniform in log(1 + varsigma) restores it. ``SampleGrids``: one grid per sample (the replay of a
per-sample-controlled adaptive solve).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from rexmol.solvers.lawson import LawsonCoordinates

GRID_KINDS = ("t", "varsigma", "log-varsigma", "log1p-varsigma")


@dataclass(frozen=True)
class FixedGrid:
    """Strictly monotone times t_0, ..., t_N (t increasing: noise -> data; decreasing: data -> noise)."""

    times: tuple[float, ...]

    def __init__(self, times: Sequence[float]):
        ts = tuple(float(t) for t in times)
        if len(ts) < 2:
            raise ValueError(f"a grid needs at least 2 times, got {len(ts)}")
        if not all(math.isfinite(t) for t in ts):
            raise ValueError(f"grid times must be finite, got {ts}")
        diffs = [b - a for a, b in zip(ts, ts[1:])]
        if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
            raise ValueError("grid times must be strictly increasing or strictly decreasing")
        object.__setattr__(self, "times", ts)

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def reversed(self) -> "FixedGrid":
        return FixedGrid(self.times[::-1])

    def check(self, coords: LawsonCoordinates) -> None:
        """ValueError if any time is outside [0, 1] or singular for ``coords``."""
        for t in self.times:
            coords.check_time(t)

    @classmethod
    def uniform_t(cls, t0: float, t1: float, steps: int) -> "FixedGrid":
        """``steps`` equal steps in t."""
        n = _check_steps(steps)
        t0, t1 = float(t0), float(t1)
        return cls([t0] + [t0 + (t1 - t0) * i / n for i in range(1, n)] + [t1])

    @classmethod
    def _uniform_in(cls, coords: LawsonCoordinates, t0: float, t1: float, steps: int, name: str,
                    forward=lambda s: s, inverse=lambda u: u, lower: float | None = None) -> "FixedGrid":
        """``steps`` equal steps in u = forward(varsigma(t)) of ``coords`` (ends exactly t0, t1); varsigma must
        exceed ``lower`` at both ends when given (the domain of ``forward``)."""
        n = _check_steps(steps)
        coords.check_time(t0)
        coords.check_time(t1)
        s0, s1 = float(coords.varsigma(float(t0))), float(coords.varsigma(float(t1)))
        if lower is not None and (s0 <= lower or s1 <= lower):
            raise ValueError(f"{name} grid needs varsigma > {lower:g} at both ends (got {s0} at t={t0}, {s1} at "
                             f"t={t1}); clip the end, e.g. start at t = 1e-3 instead of 0")
        u0, u1 = forward(s0), forward(s1)
        inner = [float(coords.t_of_varsigma(inverse(u0 + (u1 - u0) * i / n))) for i in range(1, n)]
        return cls([float(t0)] + inner + [float(t1)])

    @classmethod
    def uniform_varsigma(cls, coords: LawsonCoordinates, t0: float, t1: float, steps: int) -> "FixedGrid":
        """``steps`` equal steps in varsigma(t) of ``coords`` (ends exactly t0, t1)."""
        return cls._uniform_in(coords, t0, t1, steps, "varsigma")

    @classmethod
    def uniform_log_varsigma(cls, coords: LawsonCoordinates, t0: float, t1: float, steps: int) -> "FixedGrid":
        """``steps`` equal steps in log varsigma between clipped ends (varsigma must be > 0 at both)."""
        return cls._uniform_in(coords, t0, t1, steps, "log-varsigma", math.log, math.exp, lower=0.0)

    @classmethod
    def uniform_log1p_varsigma(cls, coords: LawsonCoordinates, t0: float, t1: float, steps: int) -> "FixedGrid":
        """``steps`` equal steps in log(1 + varsigma) (varsigma must be > -1 at both ends; ends exactly t0, t1)."""
        return cls._uniform_in(coords, t0, t1, steps, "log1p-varsigma", math.log1p, math.expm1, lower=-1.0)

    @classmethod
    def named(cls, kind: str, coords: LawsonCoordinates, t0: float, t1: float, steps: int) -> "FixedGrid":
        """The grid of ``kind`` (one of GRID_KINDS), uniform in that variable of ``coords``."""
        if kind == "t":
            return cls.uniform_t(t0, t1, steps)
        if kind == "varsigma":
            return cls.uniform_varsigma(coords, t0, t1, steps)
        if kind == "log-varsigma":
            return cls.uniform_log_varsigma(coords, t0, t1, steps)
        if kind == "log1p-varsigma":
            return cls.uniform_log1p_varsigma(coords, t0, t1, steps)
        raise ValueError(f"unknown grid {kind!r}; choose from {GRID_KINDS}")


@dataclass(frozen=True)
class SampleGrids:
    """One strictly monotone grid per sample (``times[b]``), all running in the same direction of t."""

    times: tuple[tuple[float, ...], ...]

    def __init__(self, times: Sequence[Sequence[float]]):
        grids = tuple(FixedGrid(ts).times for ts in times)
        if not grids:
            raise ValueError("per-sample grids need at least one sample")
        if len({ts[-1] > ts[0] for ts in grids}) != 1:
            raise ValueError("per-sample grids must all run in the same direction of t")
        object.__setattr__(self, "times", grids)

    def reversed(self) -> "SampleGrids":
        return SampleGrids([ts[::-1] for ts in self.times])

    def check(self, coords: LawsonCoordinates) -> None:
        """ValueError if any time is outside [0, 1] or singular for ``coords``."""
        for t in sorted({t for ts in self.times for t in ts}):
            coords.check_time(t)


def _check_steps(steps: int) -> int:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"number of steps must be a positive integer, got {steps!r}")
    return int(steps)
