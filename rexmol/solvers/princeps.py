"""Princeps: the exponential (Lawson) explicit RK increment Psi for any tableau (docs/design.md §2).

Psi_h(t_n, x) is one RK step of the y-ODE dy/dvarsigma = F(t, w y) with h = varsigma(t_to) - varsigma(t_from):
Z_i = x / w_n + h sum_j a_ij k_j, k_i = F(t(varsigma_n + c_i h), w(.) Z_i), Psi = h sum_i b_i k_i,
done per state component (components of weight kind "one" use w = 1). Calling it with t_to < t_from in a
forward-in-t solve is the Psi_{-h} call of the same step. Times are Python floats (one step for the whole batch) or
per-sample [B] float64 tensors (per-sample step control: every sample has its own h, weights and stage times).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from rexmol.solvers.dynamics import Dynamics
from rexmol.solvers.state import State, check_derivative, is_const, per_sample
from rexmol.solvers.tableaus import Tableau


@dataclass
class Increment:
    """Result of one Psi call. ``increment``/``error`` are in y-space (divide-by-weight coordinates);
    ``first_stage`` is k_1 (reusable after a rejected step), ``last_stage`` the FSAL stage when computed."""

    increment: State
    error: State | None
    nfe: int
    first_stage: State
    last_stage: State | None = None


def _combine(base: State | None, coeffs: list, stages: list[State]) -> State:
    """base + sum_j coeffs_j stages_j per component (zero coefficients skipped; they add exactly nothing).
    A coefficient is a float, or per-sample [B] (broadcast over the component's trailing dims)."""
    out = list(base) if base is not None else None
    for coef, k in zip(coeffs, stages):
        if is_const(coef, 0.0):
            continue
        if out is None:
            out = [ki * per_sample(coef, ki) for ki in k]
        elif isinstance(coef, Tensor):
            out = [o + ki * per_sample(coef, ki) for o, ki in zip(out, k)]
        else:
            out = [o.add(ki, alpha=coef) for o, ki in zip(out, k)]
    if out is None:  # every coefficient zero
        out = [ki * 0.0 for ki in stages[0]]
    return tuple(out)


def _scaled(h, coeffs) -> list:
    """h * a_j for tableau coefficients a_j, keeping exact zeros as the float 0.0 (skipped by ``_combine``)."""
    return [0.0 if a == 0.0 else h * a for a in coeffs]


class Princeps:
    """Psi for ``tableau`` over ``dynamics``: ``psi(t_from, t_to, state, first_stage=None, with_error=False)``."""

    def __init__(self, tableau: Tableau, dynamics: Dynamics):
        self.tableau, self.dynamics = tableau, dynamics
        self.coords, self.kinds = dynamics.coords, tuple(dynamics.kinds)

    def __repr__(self) -> str:
        return f"Princeps({self.tableau.name}, {self.coords!r})"

    @property
    def error_order(self) -> int | None:
        return self.tableau.error_order

    def component_weights(self, t) -> tuple:
        """w(t) for components of kind "x", 1.0 for kind "one" (and for velocity coordinates, whose weight is 1);
        a float for a float t, a per-sample [B] tensor for a tensor t."""
        if self.coords.kind == "velocity":
            return tuple(1.0 for _ in self.kinds)
        w = self.coords.weight(t)
        w = w if isinstance(w, Tensor) else float(w)
        return tuple(w if k == "x" else 1.0 for k in self.kinds)

    def evaluate(self, t: float, state: State) -> State:
        """One checked dynamics evaluation (shapes, finiteness)."""
        deriv = tuple(self.dynamics(t, state))
        check_derivative(state, deriv, t)
        return deriv

    def __call__(
        self, t_from: float, t_to: float, state: State, first_stage: State | None = None, with_error: bool = False
    ) -> Increment:
        tab, co = self.tableau, self.coords
        want_error = with_error and tab.b_err_f is not None
        n_stages = tab.stages if want_error else tab.solution_stages
        per = isinstance(t_from, Tensor)
        s0 = co.varsigma(t_from) if per else float(co.varsigma(t_from))
        h = (co.varsigma(t_to) if per else float(co.varsigma(t_to))) - s0
        w0 = self.component_weights(t_from)
        y0 = tuple(x if is_const(w, 1.0) else x / per_sample(w, x) for x, w in zip(state, w0))
        stages: list[State] = []
        nfe = 0
        for i in range(n_stages):
            if i == 0:
                if first_stage is not None:
                    stages.append(tuple(first_stage))
                    continue
                ti, xi = t_from, state
            else:
                ci = tab.c_f[i]
                ti = t_to if ci == 1.0 else co.t_of_varsigma(s0 + ci * h)
                ti = ti if per else float(ti)
                zi = _combine(y0, _scaled(h, tab.a_f[i]), stages)
                wi = self.component_weights(ti)
                xi = tuple(z if is_const(w, 1.0) else z * per_sample(w, z) for z, w in zip(zi, wi))
            stages.append(self.evaluate(ti, xi))
            nfe += 1
        inc = _combine(None, _scaled(h, tab.b_f[:n_stages]), stages)
        err = _combine(None, _scaled(h, tab.b_err_f), stages) if want_error else None
        last = stages[-1] if want_error and tab.fsal else None
        return Increment(increment=inc, error=err, nfe=nfe, first_stage=stages[0], last_stage=last)


class PrincepsSolver:
    """The non-reversible exponential RK solver: x_{n+1} = (w_{n+1}/w_n) x_n + w_{n+1} Psi_h(t_n, x_n).

    With velocity coordinates this is plain RK in t. Its carry is ``(state, None)``; its "inverse" integrates
    backward in time with the same method.
    """

    reversible = False
    uses_fsal = True

    def __init__(self, psi: Princeps):
        self.psi = psi

    def __repr__(self) -> str:
        return f"PrincepsSolver({self.psi!r})"

    def start(self, state: State) -> tuple[State, None]:
        return state, None

    def first_psi(self, t0: float, t1: float, carry, first_stage: State | None = None, with_error: bool = False):
        return self.psi(t0, t1, carry[0], first_stage=first_stage, with_error=with_error)

    def candidate(self, t0: float, t1: float, carry, inc: Increment) -> State:
        w0, w1 = self.psi.component_weights(t0), self.psi.component_weights(t1)
        return tuple(
            x + d if is_const(b, 1.0) and is_const(a, 1.0) else x * per_sample(b / a, x) + d * per_sample(b, d)
            for x, d, a, b in zip(carry[0], inc.increment, w0, w1)
        )

    def complete(self, t0: float, t1: float, carry, inc: Increment, x1: State) -> tuple[tuple[State, None], int]:
        return (x1, None), 0

    def step(self, t0: float, t1: float, carry) -> tuple[tuple[State, None], int]:
        inc = self.first_psi(t0, t1, carry)
        return (self.candidate(t0, t1, carry, inc), None), inc.nfe
