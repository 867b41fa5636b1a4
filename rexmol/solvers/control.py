"""Adaptive step control (embedded error, PI/I controller in varsigma) and the record of accepted steps.

Every accepted step time is recorded in a ``StepRecord``; inverting replays the recorded grid in reverse,
because running a controller backwards is not an exact inverse (docs/design.md §9).

Error norm: each sample's ratio is the *max over the controlled components* of that component's RMS, so a
scalar log-density controlled beside a 99-dimensional x gets its own tolerance instead of 1/100 of the sum of
squares. Two controllers (``control``):

- ``"per-sample"``: every sample has its own step size and accepted grid (a ``SampleRecords``); samples that
  reach the end leave the active batch, so a sample's result and NFE do not depend on the batch it is in.
- ``"shared"``: one grid for the batch; a step is accepted only if every sample's ratio is <= 1 (max over
  samples), so no sample is integrated less accurately than asked, but results depend on the batch.

Step limit (``MAX_STEP``, docs/design.md §9): a shared step is sized by the largest ratio of the batch, which some
sample in a sharp region keeps small; a per-sample step follows one sample's own estimate, which lets h grow until
the embedded estimate leaves its asymptotic regime and misses a feature none of the stages sees (closed-form mixture:
one step's estimate of the log q error 46x to 1000x below the true local error). Per-sample control therefore
limits every step to ode45's default ``MaxStep`` (MATLAB, Octave): one tenth of the time span |t1 - t0|, in t.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rexmol.solvers.grids import FixedGrid, SampleGrids
from rexmol.solvers.state import State, per_sample

CONTROLS = ("per-sample", "shared")
MAX_STEP = {"shared": 1.0, "per-sample": 0.1}  # largest step in t as a fraction of |t1 - t0| (ode45's MaxStep)


@dataclass(frozen=True)
class AdaptiveSteps:
    """Adaptive stepping from ``t0`` to ``t1`` with an embedded-pair error estimate.

    Error ratio of a sample: max over the components ``error_components`` of the RMS of
    |w_{n+1} err| / (atol + rtol max(|x_n|, |x_{n+1}|)); a step is accepted when it is <= 1 (``control``
    "per-sample": for that sample alone; "shared": for every sample of the batch). Components in
    ``absolute_components`` get the absolute tolerance atol alone: an accumulated integral such as the
    log-density, whose error enters importance weights as exp(error), must not be allowed rtol |ell| per step.
    Step factor (Hairer's PI controller; ``beta`` = 0 is the I controller):
    safety * err^-(1/(q+1) - 0.75 beta) * err_prev^beta, clipped to [min_factor, max_factor], never > 1 right
    after a rejection. Steps are sized in varsigma; none is longer in t than ``max_step`` |t1 - t0| (default
    None: the control's ``MAX_STEP``, module doc). ``first_step`` (in varsigma) skips Hairer's 2-NFE heuristic.
    """

    t0: float
    t1: float
    rtol: float = 1e-6
    atol: float = 1e-6
    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    beta: float = 0.04
    max_step: float | None = None
    max_steps: int = 10_000
    first_step: float | None = None
    error_components: tuple[int, ...] = (0,)
    control: str = "shared"
    absolute_components: tuple[int, ...] = ()
    absolute_atol: float | None = None

    def __post_init__(self) -> None:
        if self.control not in CONTROLS:
            raise ValueError(f"unknown step control {self.control!r}; choose from {CONTROLS}")
        if not (self.rtol >= 0 and self.atol >= 0 and self.rtol + self.atol > 0):
            raise ValueError(f"need rtol, atol >= 0 with rtol + atol > 0, got {self.rtol}, {self.atol}")
        if not 0 < self.min_factor <= 1 <= self.max_factor or not 0 < self.safety <= 1:
            raise ValueError("need 0 < min_factor <= 1 <= max_factor and 0 < safety <= 1")
        if self.t0 == self.t1:
            raise ValueError(f"adaptive solve needs t0 != t1, got {self.t0}")
        if self.max_step is not None and not 0 < self.max_step <= 1:
            raise ValueError(f"max_step is a fraction of |t1 - t0| in (0, 1], got {self.max_step}")
        if self.first_step is not None and not self.first_step > 0:
            raise ValueError(f"first_step must be positive, got {self.first_step}")
        if self.absolute_atol is not None and not (math.isfinite(self.absolute_atol) and self.absolute_atol > 0):
            raise ValueError(f"absolute_atol must be a finite number > 0, got {self.absolute_atol}")
        if not self.error_components:
            raise ValueError("error_components must name at least one state component")
        object.__setattr__(self, "error_components", tuple(int(i) for i in self.error_components))
        object.__setattr__(self, "absolute_components", tuple(int(i) for i in self.absolute_components))

    @property
    def absolute_tolerance(self) -> float:
        """Tolerance of the absolute components (log q, in nats): ``absolute_atol``, by default atol."""
        return self.atol if self.absolute_atol is None else self.absolute_atol

    def scale(self, i: int, x0: torch.Tensor, x1: torch.Tensor):
        """Tolerance of component ``i``: atol + rtol max(|x_n|, |x_{n+1}|), or ``absolute_tolerance`` for an
        absolute one."""
        if i in self.absolute_components:
            return self.absolute_tolerance
        return self.atol + self.rtol * torch.maximum(x0.abs(), x1.abs())

    def step_limit(self) -> float:
        """Largest step in t: ``max_step`` (or the control's default) times |t1 - t0|."""
        return abs(self.t1 - self.t0) * (MAX_STEP[self.control] if self.max_step is None else self.max_step)

    def accept_factor(self, err: float, prev_err: float, q: int, after_reject: bool) -> float:
        if err == 0.0:
            factor = self.max_factor
        else:
            factor = self.safety * err ** -(1.0 / (q + 1) - 0.75 * self.beta) * prev_err**self.beta
        factor = min(self.max_factor, max(self.min_factor, factor))
        return min(factor, 1.0) if after_reject else factor

    def reject_factor(self, err: float, q: int) -> float:
        return min(1.0, max(self.min_factor, self.safety * err ** (-1.0 / (q + 1))))

    def sample_error_ratio(self, err_y: State, weights: Sequence, x0: State, x1: State) -> torch.Tensor:
        """Per-sample error ratio [B] (float64) of an embedded estimate ``err_y`` (y-space); ``weights`` w_{n+1}
        per component (floats or per-sample [B])."""
        ratios = []
        for i in self.error_components:
            e = err_y[i] * per_sample(weights[i], err_y[i])
            scale = self.scale(i, x0[i], x1[i])
            ratios.append((e / scale).reshape(e.shape[0], -1).to(torch.float64).square().mean(-1).sqrt())
        return torch.stack(ratios).amax(0)

    def error_ratio(self, err_y: State, weights: Sequence, x0: State, x1: State) -> float:
        """The shared controller's ratio: the largest per-sample ratio of the batch."""
        return float(self.sample_error_ratio(err_y, weights, x0, x1).max())

    def sample_norm(self, values: State, scales: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-sample norm [B] of ``values / scales`` (max over the error components of the RMS), for the
        initial-step heuristic."""
        norms = [(values[i] / sc).reshape(sc.shape[0], -1).to(torch.float64).square().mean(-1).sqrt()
                 for i, sc in zip(self.error_components, scales)]
        return torch.stack(norms).amax(0)


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


@dataclass(frozen=True)
class SampleRecords:
    """Per-sample step records of a per-sample-controlled solve: ``records[b]`` is sample b's StepRecord
    (its own accepted times and its own NFE)."""

    records: tuple[StepRecord, ...]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, b: int) -> StepRecord:
        return self.records[b]

    @property
    def nfe(self) -> tuple[int, ...]:
        return tuple(r.nfe for r in self.records)

    def grid(self) -> SampleGrids:
        return SampleGrids([r.times for r in self.records])

    def save(self, path: str | Path) -> None:
        """JSON list of per-sample records with exact float64 times."""
        data = {"per_sample": [{"times": list(r.times), "nfe": r.nfe, "accepted": r.accepted,
                                "rejected": r.rejected} for r in self.records]}
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> "SampleRecords":
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "per_sample" not in data:
            raise ValueError(f"{path}: not a per-sample step record (no 'per_sample' list)")
        return cls(tuple(StepRecord(tuple(float(t) for t in r["times"]), int(r["nfe"]), int(r["accepted"]),
                                    int(r["rejected"])) for r in data["per_sample"]))
