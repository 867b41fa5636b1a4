"""Lawson (exponential-integrator) coordinates: y = x / w(t) as a function of varsigma(t) (docs/design.md §2).

kind "data":     varsigma = alpha/sigma, w = sigma, dy/dvarsigma = D(x, t)  (singular where sigma = 0)
kind "noise":    varsigma = sigma/alpha, w = alpha, dy/dvarsigma = E(x, t)  (singular where alpha = 0)
kind "velocity": varsigma = t,           w = 1,     dy/dt       = v(x, t)  (plain RK in t)

For any model output kind f: dy/dvarsigma = c x + e f(x, t) with (c, e) = ``lawson_coeffs(t)``.
"""
from __future__ import annotations

import math

import torch

from rexmol.solvers.schedules import FlowMatching, Schedule, check_output_kind

LAWSON_KINDS = ("data", "noise", "velocity")


class LawsonCoordinates:
    """Integration variable varsigma(t), weight w(t) and the affine right-hand side of the y-ODE.

    ``schedule``: the path; ``kind``: Lawson kind (above); ``output``: what the model predicts.
    ``t`` may be a float (float64 arithmetic) or a tensor everywhere.
    """

    def __init__(self, schedule: Schedule | None = None, kind: str = "data", output: str = "velocity"):
        if kind not in LAWSON_KINDS:
            raise ValueError(f"unknown Lawson kind {kind!r}; expected one of {LAWSON_KINDS}")
        self.schedule = schedule if schedule is not None else FlowMatching()
        self.kind = kind
        self.output = check_output_kind(output)

    def __repr__(self) -> str:
        return f"LawsonCoordinates({self.schedule!r}, kind={self.kind!r}, output={self.output!r})"

    def varsigma(self, t):
        sch = self.schedule
        if self.kind == "data":
            return sch.alpha(t) / sch.sigma(t)
        if self.kind == "noise":
            return sch.sigma(t) / sch.alpha(t)
        return t

    def t_of_varsigma(self, s):
        if self.kind == "data":
            return self.schedule.t_from_ratio(s)
        if self.kind == "noise":
            return self.schedule.t_from_inverse_ratio(s)
        return s

    def weight(self, t):
        if self.kind == "data":
            return self.schedule.sigma(t)
        if self.kind == "noise":
            return self.schedule.alpha(t)
        return 1.0 if not isinstance(t, torch.Tensor) else torch.ones_like(t)

    def d_weight(self, t):
        if self.kind == "data":
            return self.schedule.d_sigma(t)
        if self.kind == "noise":
            return self.schedule.d_alpha(t)
        return 0.0 if not isinstance(t, torch.Tensor) else torch.zeros_like(t)

    def dt_dvarsigma(self, t):
        sch = self.schedule
        if self.kind == "velocity":
            return self.weight(t)
        al, si, dal, dsi = sch.alpha(t), sch.sigma(t), sch.d_alpha(t), sch.d_sigma(t)
        if self.kind == "data":
            return si * si / (dal * si - al * dsi)
        return al * al / (dsi * al - si * dal)

    def velocity_coeffs(self, t):
        """(a, b) with v = a x + b f for this model output kind."""
        return self.schedule.velocity_coeffs(t, self.output)

    def lawson_coeffs(self, t):
        """(c, e) with dy/dvarsigma = c x + e f(x, t); exactly (0, 1) when the model predicts this kind."""
        if self.kind == self.output:
            return 0.0, 1.0
        a, b = self.velocity_coeffs(t)
        w, dw, dtds = self.weight(t), self.d_weight(t), self.dt_dvarsigma(t)
        return dtds * (a - dw / w) / w, dtds * b / w

    def check_time(self, t: float) -> None:
        """ValueError when t is outside [0, 1] or where these coordinates are singular."""
        t = float(t)
        if not 0.0 <= t <= 1.0 or math.isnan(t):
            raise ValueError(f"time t={t!r} is outside [0, 1] (t = 0 noise, t = 1 data)")
        hint = (
            f"{self.kind}-kind Lawson coordinates with {self.output} output on {self.schedule!r} are singular "
            f"at t={t!r}"
        )
        fix = "; end the grid strictly inside, e.g. t = 1 - 1e-3 at the data end or t = 1e-3 at the noise end"
        try:
            values = (self.weight(t), self.varsigma(t), self.dt_dvarsigma(t), *self.lawson_coeffs(t))
        except ZeroDivisionError:
            raise ValueError(hint + " (division by zero)" + fix) from None
        if not all(math.isfinite(v) for v in values) or values[0] <= 0:
            raise ValueError(hint + f" (weight {values[0]!r}, varsigma {values[1]!r})" + fix)
