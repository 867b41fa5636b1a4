"""Drivers: ``solve`` over a fixed grid or adaptively, ``invert`` a solution, ``make_solver`` by name.

A solver is a ``PrincepsSolver`` (non-reversible) or ``RexSolver`` (reversible); both step any tuple state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from rexmol.solvers.control import AdaptiveSteps, StepRecord
from rexmol.solvers.dynamics import Dynamics, Model, ModelDynamics
from rexmol.solvers.grids import FixedGrid
from rexmol.solvers.lawson import LawsonCoordinates
from rexmol.solvers.princeps import Princeps, PrincepsSolver
from rexmol.solvers.rex import RexSolver
from rexmol.solvers.state import NonFiniteError, State, as_state, check_state
from rexmol.solvers.tableaus import get_tableau

Solver = PrincepsSolver | RexSolver


@dataclass
class Solution:
    """End state of a solve. ``aux``: Rex's auxiliary state x_hat (None for non-reversible solvers);
    ``record``: every accepted time and the cost (nfe, accepted, rejected)."""

    state: State
    aux: State | None
    record: StepRecord

    @property
    def x(self) -> Tensor:
        return self.state[0]

    @property
    def nfe(self) -> int:
        return self.record.nfe

    @property
    def accepted(self) -> int:
        return self.record.accepted

    @property
    def rejected(self) -> int:
        return self.record.rejected


def _step_error(err: NonFiniteError, n: int, t0: float, t1: float) -> NonFiniteError:
    return NonFiniteError(f"step {n} (t {t0!r} -> {t1!r}): {err}", err.t, n)


def solve(solver: Solver, state: Tensor | Sequence[Tensor], steps: FixedGrid | AdaptiveSteps) -> Solution:
    """Integrate ``state`` (x_0, or a tuple of components) over ``steps`` with ``solver``."""
    state = as_state(state)
    psi = solver.psi
    check_state(state, psi.kinds)
    if isinstance(steps, FixedGrid):
        steps.check(psi.coords)
        return _solve_fixed(solver, solver.start(state), steps.times)
    if isinstance(steps, AdaptiveSteps):
        return _solve_adaptive(solver, state, steps)
    raise ValueError(f"steps must be a FixedGrid or AdaptiveSteps, got {type(steps).__name__}")


def invert(solver: Solver, solution: Solution, steps: FixedGrid | AdaptiveSteps | None = None) -> Solution:
    """Run ``solution`` back to its start time.

    Rex: the closed-form backward step over the recorded grid in reverse (exact up to round-off); the
    returned ``state`` is x_0 and ``aux`` is x_hat_0. Non-reversible solvers integrate backward with the same
    method, over the reversed recorded grid by default or with ``steps`` if given.
    """
    times = solution.record.times
    if not solver.reversible:
        return solve(solver, solution.state, steps if steps is not None else FixedGrid(times[::-1]))
    if steps is not None:
        raise ValueError("Rex inverts over its recorded grid; do not pass steps")
    if solution.aux is None:
        raise ValueError("this solution has no auxiliary state x_hat; it was not made by a Rex solver")
    check_state(solution.state, solver.psi.kinds)
    check_state(solution.aux, solver.psi.kinds)
    carry, nfe = (solution.state, solution.aux), 0
    n_steps = len(times) - 1
    for n in range(n_steps - 1, -1, -1):
        t0, t1 = times[n], times[n + 1]
        try:
            carry, k = solver.backward(t0, t1, carry)
        except NonFiniteError as err:
            raise _step_error(err, n, t0, t1) from None
        nfe += k
    return Solution(carry[0], carry[1], StepRecord(times[::-1], nfe, n_steps, 0))


def _solve_fixed(solver: Solver, carry, times: tuple[float, ...]) -> Solution:
    nfe = 0
    for n, (t0, t1) in enumerate(zip(times, times[1:])):
        try:
            carry, k = solver.step(t0, t1, carry)
        except NonFiniteError as err:
            raise _step_error(err, n, t0, t1) from None
        nfe += k
    return Solution(carry[0], carry[1], StepRecord(tuple(times), nfe, len(times) - 1, 0))


def _initial_step(psi: Princeps, ctl: AdaptiveSteps, t0: float, state: State, span: float, direction: float):
    """Hairer's starting step size (in varsigma) and the derivative at the start, which it evaluates."""
    q = psi.error_order
    co = psi.coords
    w0 = psi.component_weights(t0)
    f0 = psi.evaluate(t0, state)
    y0 = tuple(x / w for x, w in zip(state, w0))
    scales = [(ctl.atol + ctl.rtol * state[i].abs()) / w0[i] for i in ctl.error_components]
    d0, d1 = ctl.norm(y0, scales), ctl.norm(f0, scales)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, span)
    s1 = float(co.varsigma(t0)) + direction * h0
    t1 = float(co.t_of_varsigma(s1))
    w1 = psi.component_weights(t1)
    x1 = tuple((y + f * (direction * h0)) * w for y, f, w in zip(y0, f0, w1))
    f1 = psi.evaluate(t1, x1)
    d2 = ctl.norm(tuple(b - a for a, b in zip(f0, f1)), scales) / h0
    dmax = max(d1, d2)
    h1 = max(1e-6, h0 * 1e-3) if dmax <= 1e-15 else (0.01 / dmax) ** (1.0 / (q + 1))
    return min(100 * h0, h1, span), f0


def _solve_adaptive(solver: Solver, state: State, ctl: AdaptiveSteps) -> Solution:
    psi = solver.psi
    co = psi.coords
    q = psi.error_order
    if q is None:
        raise ValueError(f"adaptive steps need a tableau with an embedded pair; {psi.tableau.name} has none")
    bad = [i for i in ctl.error_components if not 0 <= i < len(state)]
    if bad:
        raise ValueError(f"error_components {bad} do not index the {len(state)}-component state")
    t0, t_end = float(ctl.t0), float(ctl.t1)
    co.check_time(t0)
    co.check_time(t_end)
    s_end = float(co.varsigma(t_end))
    s_start = float(co.varsigma(t0))
    span = abs(s_end - s_start)
    direction = math.copysign(1.0, s_end - s_start)
    t_dir = math.copysign(1.0, t_end - t0)
    nfe = 0
    try:
        if ctl.first_step is None:
            h, first_stage = _initial_step(psi, ctl, t0, state, span, direction)
            nfe += 2
        else:
            h, first_stage = min(float(ctl.first_step), span), None
    except NonFiniteError as err:
        raise _step_error(err, 0, t0, t_end) from None
    carry = solver.start(state)
    times = [t0]
    t, prev_err, after_reject, accepted, rejected = t0, 1.0, False, 0, 0
    while t != t_end:
        if accepted + rejected >= ctl.max_steps:
            raise ValueError(f"adaptive solve took more than max_steps={ctl.max_steps} steps, stopped at t={t!r}")
        s = float(co.varsigma(t))
        if h >= abs(s_end - s):
            t_next = t_end
        else:
            t_next = float(co.t_of_varsigma(s + direction * h))
            if (t_next - t_end) * t_dir >= 0:
                t_next = t_end
        if (t_next - t) * t_dir <= 0:
            raise ValueError(f"adaptive step size underflow at t={t!r} (step {h!r} in varsigma)")
        try:
            inc = solver.first_psi(t, t_next, carry, first_stage=first_stage, with_error=True)
            nfe += inc.nfe
            x1 = solver.candidate(t, t_next, carry, inc)
            err = ctl.error_ratio(inc.error, psi.component_weights(t_next), carry[0], x1)
            if not math.isfinite(err):
                raise NonFiniteError(f"non-finite error estimate at t={t_next!r}", t_next)
            h_used = abs(float(co.varsigma(t_next)) - s)
            if err <= 1.0:
                carry, k = solver.complete(t, t_next, carry, inc, x1)
                nfe += k
                times.append(t_next)
                accepted += 1
                first_stage = inc.last_stage if solver.uses_fsal else None
                h = h_used * ctl.accept_factor(err, prev_err, q, after_reject)
                prev_err, after_reject, t = max(err, 1e-4), False, t_next
            else:
                rejected += 1
                first_stage = inc.first_stage
                h = h_used * ctl.reject_factor(err, q)
                after_reject = True
        except NonFiniteError as err_:
            raise _step_error(err_, accepted, t, t_next) from None
    return Solution(carry[0], carry[1], StepRecord(tuple(times), nfe, accepted, rejected))


BASELINE_NAMES = ("euler", "midpoint", "heun", "rk4", "bosh3", "dopri5")


def make_solver(
    name: str,
    dynamics: Dynamics | Model,
    coords: LawsonCoordinates | None = None,
    zeta: float = 1.0,
) -> Solver:
    """A solver by name: ``<tableau>`` (plain RK in t), ``princeps-<tableau>`` or ``rex-<tableau>``.

    ``dynamics``: a Dynamics object, or a bare model ``model(x, t) -> f`` wrapped with ``coords``
    (default: flow matching, data-kind Lawson coordinates, velocity output). Plain ``<tableau>`` names
    always integrate in t (velocity coordinates of the same schedule and output).
    """
    family, _, tab_name = name.rpartition("-")
    if family not in ("", "princeps", "rex"):
        raise ValueError(f"unknown solver {name!r}; use <tableau>, princeps-<tableau> or rex-<tableau>")
    tableau = get_tableau(tab_name)
    if isinstance(dynamics, ModelDynamics) or not hasattr(dynamics, "coords"):
        model = dynamics.model if isinstance(dynamics, ModelDynamics) else dynamics
        base = coords if coords is not None else getattr(dynamics, "coords", LawsonCoordinates())
        if family == "":
            base = LawsonCoordinates(base.schedule, kind="velocity", output=base.output)
        dynamics = ModelDynamics(model, base)
    elif family == "" and dynamics.coords.kind != "velocity":
        raise ValueError(f"plain {name!r} integrates in t: give dynamics with velocity-kind Lawson coordinates")
    psi = Princeps(tableau, dynamics)
    return RexSolver(psi, zeta) if family == "rex" else PrincepsSolver(psi)
