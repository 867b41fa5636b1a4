"""Adaptive step control (embedded error, PI/I controller in varsigma) and the record of accepted steps.

Every accepted step time is recorded in a ``StepRecord``; inverting replays the recorded grid in reverse,
because running a controller backwards is not an exact inverse (DESIGN.md §2).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rexmol.solvers.grids import FixedGrid
from rexmol.solvers.state import State


@dataclass(frozen=True)
class AdaptiveSteps:
    """Adaptive stepping from ``t0`` to ``t1`` with an embedded-pair error estimate.

    Error ratio: RMS over the components ``error_components`` of |w_{n+1} err| / (atol + rtol max(|x_n|, |x_{n+1}|)),
    a step is accepted when it is <= 1. Step factor (Hairer's PI controller; ``beta`` = 0 is the I controller):
    safety * err^-(1/(q+1) - 0.75 beta) * err_prev^beta, clipped to [min_factor, max_factor], never > 1 right
    after a rejection. Steps are sized in varsigma. ``first_step`` (in varsigma) skips Hairer's 2-NFE heuristic.
    """

    t0: float
    t1: float
    rtol: float = 1e-6
    atol: float = 1e-6
    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    beta: float = 0.04
    max_steps: int = 10_000
    first_step: float | None = None
    error_components: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if not (self.rtol >= 0 and self.atol >= 0 and self.rtol + self.atol > 0):
            raise ValueError(f"need rtol, atol >= 0 with rtol + atol > 0, got {self.rtol}, {self.atol}")
        if not 0 < self.min_factor <= 1 <= self.max_factor or not 0 < self.safety <= 1:
            raise ValueError("need 0 < min_factor <= 1 <= max_factor and 0 < safety <= 1")
        if self.t0 == self.t1:
            raise ValueError(f"adaptive solve needs t0 != t1, got {self.t0}")
        if self.first_step is not None and not self.first_step > 0:
            raise ValueError(f"first_step must be positive, got {self.first_step}")
        if not self.error_components:
            raise ValueError("error_components must name at least one state component")
        object.__setattr__(self, "error_components", tuple(int(i) for i in self.error_components))

    def accept_factor(self, err: float, prev_err: float, q: int, after_reject: bool) -> float:
        if err == 0.0:
            factor = self.max_factor
        else:
            factor = self.safety * err ** -(1.0 / (q + 1) - 0.75 * self.beta) * prev_err**self.beta
        factor = min(self.max_factor, max(self.min_factor, factor))
        return min(factor, 1.0) if after_reject else factor

    def reject_factor(self, err: float, q: int) -> float:
        return min(1.0, max(self.min_factor, self.safety * err ** (-1.0 / (q + 1))))

    def error_ratio(self, err_y: State, weights: Sequence[float], x0: State, x1: State) -> float:
        """RMS error ratio of an embedded estimate ``err_y`` (y-space) against the mixed tolerance."""
        total, count = 0.0, 0
        for i in self.error_components:
            e = err_y[i] * weights[i]
            scale = self.atol + self.rtol * torch.maximum(x0[i].abs(), x1[i].abs())
            total += float(((e / scale) ** 2).sum())
            count += e.numel()
        return math.sqrt(total / count)

    def norm(self, values: State, scales: Sequence[torch.Tensor]) -> float:
        """RMS of ``values / scales`` over the error components (for the initial-step heuristic)."""
        total, count = 0.0, 0
        for i, sc in zip(self.error_components, scales):
            total += float(((values[i] / sc) ** 2).sum())
            count += values[i].numel()
        return math.sqrt(total / count)


@dataclass(frozen=True)
class StepRecord:
    """Times of every accepted step (t_0 .. t_N, float64) and the cost of the solve that made them."""

    times: tuple[float, ...]
    nfe: int
    accepted: int
    rejected: int = 0

    def grid(self) -> FixedGrid:
        return FixedGrid(self.times)

    def save(self, path: str | Path) -> None:
        """JSON with exact float64 times (Python's float repr round-trips)."""
        data = {"times": list(self.times), "nfe": self.nfe, "accepted": self.accepted, "rejected": self.rejected}
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> "StepRecord":
        data = json.loads(Path(path).read_text())
        missing = {"times", "nfe", "accepted", "rejected"} - set(data)
        if missing:
            raise ValueError(f"{path}: not a step record (missing {sorted(missing)})")
        return cls(tuple(float(t) for t in data["times"]), int(data["nfe"]), int(data["accepted"]),
                   int(data["rejected"]))
