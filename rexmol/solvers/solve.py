"""Drivers: ``solve`` over a fixed grid or adaptively, ``invert`` a solution, ``make_solver`` by name.

A solver is a ``PrincepsSolver`` (non-reversible) or ``RexSolver`` (reversible); both step any tuple state.
Per-sample step control (``AdaptiveSteps(control="per-sample")``) advances every sample with its own step size
inside one batched computation: each iteration takes the samples still running, calls the dynamics with their
own times (a [B] time vector), and scatters the accepted ones back; the result is a ``SampleRecords`` of
per-sample grids and NFE, replayed (``SampleGrids``) and inverted per sample the same way.

Progress: ``solve`` and ``invert`` take an optional ``on_step(done)`` called after every accepted step with the
fraction of the run done, rising to exactly 1.0 at the end (a fixed grid: steps done / steps; adaptive: the share
of the varsigma span covered; per-sample: the mean of the samples' shares), so a progress bar can move inside a
batch without wrapping the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from rexmol.solvers.control import AdaptiveSteps, SampleRecords, StepRecord
from rexmol.solvers.dynamics import Dynamics, Model, ModelDynamics
from rexmol.solvers.grids import FixedGrid, SampleGrids
from rexmol.solvers.lawson import LawsonCoordinates
from rexmol.solvers.princeps import Princeps, PrincepsSolver
from rexmol.solvers.rex import RexSolver
from rexmol.solvers.state import NonFiniteError, State, as_state, check_state, per_sample
from rexmol.solvers.tableaus import get_tableau

Solver = PrincepsSolver | RexSolver
Progress = Callable[[float], None]


def progress_span(on_step: Progress | None, start: float, stop: float) -> Progress | None:
    """``on_step`` for one part of a larger job: a fraction f of the part reports start + f (stop - start)."""
    if on_step is None:
        return None
    return lambda done: on_step(start + done * (stop - start))


@dataclass
class Solution:
    """End state of a solve. ``aux``: Rex's auxiliary state x_hat (None for non-reversible solvers);
    ``record``: every accepted time and the cost (nfe, accepted, rejected), a ``SampleRecords`` (one record per
    sample) after per-sample control or a per-sample replay; then ``nfe``/``accepted``/``rejected`` are the
    largest over the samples and ``sample_nfe`` has each sample's own."""

    state: State
    aux: State | None
    record: StepRecord | SampleRecords

    @property
    def x(self) -> Tensor:
        return self.state[0]

    @property
    def per_sample(self) -> bool:
        return isinstance(self.record, SampleRecords)

    @property
    def nfe(self) -> int:
        return max(self.record.nfe) if self.per_sample else self.record.nfe

    @property
    def sample_nfe(self) -> list[int]:
        """Model evaluations of each sample [B]."""
        return list(self.record.nfe) if self.per_sample else [self.record.nfe] * self.x.shape[0]

    @property
    def accepted(self) -> int:
        return max(r.accepted for r in self.record.records) if self.per_sample else self.record.accepted

    @property
    def rejected(self) -> int:
        return max(r.rejected for r in self.record.records) if self.per_sample else self.record.rejected


def _step_error(err: NonFiniteError, n: int, t0: float, t1: float) -> NonFiniteError:
    return NonFiniteError(f"step {n} (t {t0!r} -> {t1!r}): {err}", err.t, n)


Steps = FixedGrid | SampleGrids | AdaptiveSteps


def solve(solver: Solver, state: Tensor | Sequence[Tensor], steps: Steps, on_step: Progress | None = None) -> Solution:
    """Integrate ``state`` (x_0, or a tuple of components) over ``steps`` with ``solver``; ``on_step``: progress
    callback (module doc)."""
    state = as_state(state)
    psi = solver.psi
    check_state(state, psi.kinds)
    if isinstance(steps, FixedGrid):
        steps.check(psi.coords)
        return _solve_fixed(solver, solver.start(state), steps.times, on_step)
    if isinstance(steps, SampleGrids):
        if len(steps.times) != state[0].shape[0]:
            raise ValueError(f"{len(steps.times)} per-sample grids for a batch of {state[0].shape[0]}")
        steps.check(psi.coords)
        return _march(solver, solver.start(state), steps.times, forward=True, on_step=on_step)
    if isinstance(steps, AdaptiveSteps):
        if steps.control == "per-sample":
            return _solve_adaptive_per_sample(solver, state, steps, on_step)
        return _solve_adaptive(solver, state, steps, on_step)
    raise ValueError(f"steps must be a FixedGrid, SampleGrids or AdaptiveSteps, got {type(steps).__name__}")


def invert(solver: Solver, solution: Solution, steps: FixedGrid | AdaptiveSteps | None = None,
           on_step: Progress | None = None) -> Solution:
    """Run ``solution`` back to its start time (``on_step``: progress callback, module doc).

    Rex: the closed-form backward step over the recorded grid in reverse (exact up to round-off); the
    returned ``state`` is x_0 and ``aux`` is x_hat_0. Non-reversible solvers integrate backward with the same
    method, over the reversed recorded grid by default or with ``steps`` if given.
    """
    if not solver.reversible:
        default = solution.record.grid().reversed()
        return solve(solver, solution.state, steps if steps is not None else default, on_step)
    if steps is not None:
        raise ValueError("Rex inverts over its recorded grid; do not pass steps")
    if solution.aux is None:
        raise ValueError("this solution has no auxiliary state x_hat; it was not made by a Rex solver")
    check_state(solution.state, solver.psi.kinds)
    check_state(solution.aux, solver.psi.kinds)
    if solution.per_sample:
        return _march(solver, (solution.state, solution.aux), solution.record.grid().times, forward=False,
                      on_step=on_step)
    times = solution.record.times
    carry, nfe = (solution.state, solution.aux), 0
    n_steps = len(times) - 1
    for n in range(n_steps - 1, -1, -1):
        t0, t1 = times[n], times[n + 1]
        try:
            carry, k = solver.backward(t0, t1, carry)
        except NonFiniteError as err:
            raise _step_error(err, n, t0, t1) from None
        nfe += k
        if on_step is not None:
            on_step((n_steps - n) / n_steps)
    return Solution(carry[0], carry[1], StepRecord(times[::-1], nfe, n_steps, 0))


def _solve_fixed(solver: Solver, carry, times: tuple[float, ...], on_step: Progress | None) -> Solution:
    nfe, n_steps = 0, len(times) - 1
    for n, (t0, t1) in enumerate(zip(times, times[1:])):
        try:
            carry, k = solver.step(t0, t1, carry)
        except NonFiniteError as err:
            raise _step_error(err, n, t0, t1) from None
        nfe += k
        if on_step is not None:
            on_step((n + 1) / n_steps)
    return Solution(carry[0], carry[1], StepRecord(tuple(times), nfe, len(times) - 1, 0))


def _subset(state: State, idx: Tensor) -> State:
    return tuple(c[idx] for c in state)


def _scatter(target: State, idx: Tensor, values: State) -> None:
    for c, v in zip(target, values):
        c[idx] = v


def _times(values: list[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=torch.float64, device=like.device)


def _initial_step(psi: Princeps, ctl: AdaptiveSteps, t0: float, state: State, span: float, direction: float,
                  shared: bool):
    """Hairer's starting step size (in varsigma) per sample, and the derivative at the start, which it evaluates.
    Returns (h [B] as Python floats, f0); ``shared``: the smallest h0 for all (one float time for the dynamics)."""
    q = psi.error_order
    co = psi.coords
    w0 = psi.component_weights(t0)
    f0 = psi.evaluate(t0, state)
    y0 = tuple(x / w for x, w in zip(state, w0))
    scales = [ctl.scale(i, state[i], state[i]) / w0[i] + state[i] * 0 for i in ctl.error_components]
    d0, d1 = ctl.sample_norm(y0, scales).tolist(), ctl.sample_norm(f0, scales).tolist()
    h0 = [min(1e-6 if a < 1e-5 or b < 1e-5 else 0.01 * a / b, span) for a, b in zip(d0, d1)]
    if shared:  # the dynamics see one float time
        h0 = [min(h0)] * len(h0)
        ht = h0[0]
        t1 = float(co.t_of_varsigma(float(co.varsigma(t0)) + direction * ht))
    else:
        ht = _times(h0, state[0])
        t1 = co.t_of_varsigma(float(co.varsigma(t0)) + direction * ht)
    w1 = psi.component_weights(t1)
    x1 = tuple((y + f * per_sample(direction * ht, f)) * per_sample(w, y) for y, f, w in zip(y0, f0, w1))
    f1 = psi.evaluate(t1, x1)
    d2 = (ctl.sample_norm(tuple(b - a for a, b in zip(f0, f1)), scales) / ht).tolist()
    out = []
    for h, a, b in zip(h0, d1, d2):
        dmax = max(a, b)
        h1 = max(1e-6, h * 1e-3) if dmax <= 1e-15 else (0.01 / dmax) ** (1.0 / (q + 1))
        out.append(min(100 * h, h1, span))
    return out, f0


def _check_adaptive(solver: Solver, state: State, ctl: AdaptiveSteps) -> int:
    q = solver.psi.error_order
    if q is None:
        raise ValueError(f"adaptive steps need a tableau with an embedded pair; {solver.psi.tableau.name} has none")
    bad = [i for i in ctl.error_components if not 0 <= i < len(state)]
    if bad:
        raise ValueError(f"error_components {bad} do not index the {len(state)}-component state")
    solver.psi.coords.check_time(float(ctl.t0))
    solver.psi.coords.check_time(float(ctl.t1))
    return q


def _attempt(solver: Solver, ctl: AdaptiveSteps, t, t_next, carry, first_stage):
    """One trial step: (increment of Psi_h, candidate x_{n+1}, Rex's closing increment or None, error ratio [B],
    nfe). Rex's step is judged on both of its Psi calls (the larger ratio)."""
    psi = solver.psi
    inc = solver.first_psi(t, t_next, carry, first_stage=first_stage, with_error=True)
    x1 = solver.candidate(t, t_next, carry, inc)
    w1 = psi.component_weights(t_next)
    err = ctl.sample_error_ratio(inc.error, w1, carry[0], x1)
    back, nfe = None, inc.nfe
    if solver.reversible:
        back = solver.closing_psi(t, t_next, x1, with_error=True)
        nfe += back.nfe
        err = torch.maximum(err, ctl.sample_error_ratio(back.error, w1, carry[0], x1))
    if not bool(torch.isfinite(err).all()):
        raise NonFiniteError(f"non-finite error estimate at t={t_next!r}", t_next)
    return inc, x1, back, err, nfe


def _solve_adaptive(solver: Solver, state: State, ctl: AdaptiveSteps, on_step: Progress | None) -> Solution:
    psi = solver.psi
    co = psi.coords
    q = _check_adaptive(solver, state, ctl)
    t0, t_end = float(ctl.t0), float(ctl.t1)
    s_end = float(co.varsigma(t_end))
    s_start = float(co.varsigma(t0))
    span = abs(s_end - s_start)
    direction = math.copysign(1.0, s_end - s_start)
    t_dir = math.copysign(1.0, t_end - t0)
    tmax = ctl.step_limit()
    nfe = 0
    try:
        if ctl.first_step is None:
            hs, first_stage = _initial_step(psi, ctl, t0, state, span, direction, shared=True)
            h = min(hs)
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
        t_next = t_end if h >= abs(s_end - s) else float(co.t_of_varsigma(s + direction * h))
        if abs(t_next - t) > tmax:  # the step limit (in t)
            t_next = t + t_dir * tmax
        if (t_next - t_end) * t_dir >= 0:
            t_next = t_end
        if (t_next - t) * t_dir <= 0:
            raise ValueError(f"adaptive step size underflow at t={t!r} (step {h!r} in varsigma)")
        try:
            inc, x1, back, errs, k = _attempt(solver, ctl, t, t_next, carry, first_stage)
            nfe += k
            err = float(errs.max())
            h_used = abs(float(co.varsigma(t_next)) - s)
            if err <= 1.0:
                carry = solver.finish(t, t_next, carry, x1, back) if solver.reversible else (x1, None)
                times.append(t_next)
                accepted += 1
                first_stage = inc.last_stage if solver.uses_fsal else None
                h = h_used * ctl.accept_factor(err, prev_err, q, after_reject)
                prev_err, after_reject, t = max(err, 1e-4), False, t_next
                if on_step is not None:
                    on_step(1.0 if t == t_end else min(abs(float(co.varsigma(t)) - s_start) / span, 1.0))
            else:
                rejected += 1
                first_stage = inc.first_stage
                h = h_used * ctl.reject_factor(err, q)
                after_reject = True
        except NonFiniteError as err_:
            raise _step_error(err_, accepted, t, t_next) from None
    return Solution(carry[0], carry[1], StepRecord(tuple(times), nfe, accepted, rejected))


def _solve_adaptive_per_sample(solver: Solver, state: State, ctl: AdaptiveSteps,
                               on_step: Progress | None) -> Solution:
    """Every sample with its own step size, error ratio, controller memory and accepted grid (module doc)."""
    psi = solver.psi
    co = psi.coords
    q = _check_adaptive(solver, state, ctl)
    B, like = state[0].shape[0], state[0]
    t0, t_end = float(ctl.t0), float(ctl.t1)
    s_end, s_start = float(co.varsigma(t_end)), float(co.varsigma(t0))
    span = abs(s_end - s_start)
    direction = math.copysign(1.0, s_end - s_start)
    t_dir = math.copysign(1.0, t_end - t0)
    tmax = ctl.step_limit()
    nfe = [0] * B
    try:
        if ctl.first_step is None:
            h, stage = _initial_step(psi, ctl, t0, state, span, direction, shared=False)
            nfe = [2] * B
        else:
            h, stage = [min(float(ctl.first_step), span)] * B, None
    except NonFiniteError as err:
        raise _step_error(err, 0, t0, t_end) from None
    x = tuple(c.clone() for c in state)
    carry = (x, tuple(c.clone() for c in state)) if solver.reversible else (x, None)
    # cached first stage of each sample's next Psi_h (its derivative at the point Psi_h starts from)
    stage = tuple(c.clone() for c in stage) if stage is not None else None
    have = [stage is not None] * B
    t, prev, after = [t0] * B, [1.0] * B, [False] * B
    times, accepted, rejected = [[t0] for _ in range(B)], [0] * B, [0] * B
    active = list(range(B))
    while active:
        over = [b for b in active if accepted[b] + rejected[b] >= ctl.max_steps]
        if over:
            raise ValueError(f"adaptive solve took more than max_steps={ctl.max_steps} steps for sample {over[0]}, "
                             f"stopped at t={t[over[0]]!r}")
        idx = torch.tensor(active, device=like.device)
        ta = _times([t[b] for b in active], like)
        sa = co.varsigma(ta)
        ha = _times([h[b] for b in active], like)
        tn = co.t_of_varsigma(sa + direction * ha)
        tn = torch.where(ha >= (s_end - sa).abs(), torch.full_like(tn, t_end), tn)
        tn = torch.where((tn - ta).abs() > tmax, ta + t_dir * tmax, tn)  # the step limit (in t)
        tn = torch.where((tn - t_end) * t_dir >= 0, torch.full_like(tn, t_end), tn)
        if bool(((tn - ta) * t_dir <= 0).any()):
            b = active[int(((tn - ta) * t_dir <= 0).nonzero()[0])]
            raise ValueError(f"adaptive step size underflow at t={t[b]!r} (step {h[b]!r} in varsigma, sample {b})")
        sub = (_subset(carry[0], idx), None if carry[1] is None else _subset(carry[1], idx))
        try:
            missing = [i for i, b in enumerate(active) if not have[b]]
            if missing:
                need = [active[i] for i in missing]
                j = torch.tensor(need, device=like.device)
                start = sub[1] if solver.reversible else sub[0]
                f = psi.evaluate(ta[missing], _subset(start, torch.tensor(missing, device=like.device)))
                if stage is None:
                    stage = tuple(torch.zeros_like(c) for c in state)
                _scatter(stage, j, f)
                for b in need:
                    have[b], nfe[b] = True, nfe[b] + 1
            inc, x1, back, err, k = _attempt(solver, ctl, ta, tn, sub, _subset(stage, idx))
        except NonFiniteError as err_:
            raise _step_error(err_, max(accepted[b] for b in active), t[active[0]], t_end) from None
        ok = err <= 1.0
        h_used = (co.varsigma(tn) - sa).abs().tolist()
        okl, errl, tnl = ok.tolist(), err.tolist(), tn.tolist()
        acc = ok.nonzero().squeeze(1)
        if len(acc):
            new = solver.finish(ta, tn, sub, x1, back) if solver.reversible else (x1, None)
            j = idx[acc]
            _scatter(carry[0], j, _subset(new[0], acc))
            if solver.reversible:
                _scatter(carry[1], j, _subset(new[1], acc))
            elif inc.last_stage is not None:
                _scatter(stage, j, _subset(inc.last_stage, acc))
        still = []
        for i, b in enumerate(active):
            nfe[b] += k
            if okl[i]:
                h[b] = h_used[i] * ctl.accept_factor(errl[i], prev[b], q, after[b])
                prev[b], after[b], t[b] = max(errl[i], 1e-4), False, tnl[i]
                times[b].append(tnl[i])
                accepted[b] += 1
                have[b] = not solver.reversible and inc.last_stage is not None
            else:
                h[b] = h_used[i] * ctl.reject_factor(errl[i], q)
                after[b] = True
                rejected[b] += 1
            if t[b] != t_end:
                still.append(b)
        active = still
        if on_step is not None and any(okl):
            running = _times([t[b] for b in active], like)
            covered = ((co.varsigma(running) - s_start).abs() / span).clamp(max=1.0).sum() if active else 0.0
            on_step((B - len(active) + float(covered)) / B)
    records = tuple(StepRecord(tuple(times[b]), nfe[b], accepted[b], rejected[b]) for b in range(B))
    return Solution(carry[0], carry[1], SampleRecords(records))


def _march(solver: Solver, carry, grids: tuple[tuple[float, ...], ...], forward: bool,
           on_step: Progress | None = None) -> Solution:
    """Steps over per-sample grids, the samples with steps left batched together: ``forward`` with
    ``solver.step`` from each grid's start, else Rex's closed-form ``backward`` from each grid's end;
    ``on_step`` gets the mean over the samples of their share of steps done."""
    like = carry[0][0]
    B = like.shape[0]
    carry = (tuple(c.clone() for c in carry[0]), None if carry[1] is None else tuple(c.clone() for c in carry[1]))
    n_steps = [len(g) - 1 for g in grids]
    nfe = [0] * B
    n = 0
    while True:
        if forward:
            active = [b for b in range(B) if n < n_steps[b]]
            pairs = [(grids[b][n], grids[b][n + 1]) for b in active]
        else:
            active = [b for b in range(B) if n < n_steps[b]]
            pairs = [(grids[b][n_steps[b] - n - 1], grids[b][n_steps[b] - n]) for b in active]
        if not active:
            break
        idx = torch.tensor(active, device=like.device)
        ta, tb = _times([p[0] for p in pairs], like), _times([p[1] for p in pairs], like)
        sub = (_subset(carry[0], idx), None if carry[1] is None else _subset(carry[1], idx))
        try:
            new, k = solver.step(ta, tb, sub) if forward else solver.backward(ta, tb, sub)
        except NonFiniteError as err:
            raise _step_error(err, n, pairs[0][0], pairs[0][1]) from None
        _scatter(carry[0], idx, new[0])
        if carry[1] is not None:
            _scatter(carry[1], idx, new[1])
        for b in active:
            nfe[b] += k
        n += 1
        if on_step is not None:
            on_step(sum(min(n, m) / m if m else 1.0 for m in n_steps) / B)
    out = grids if forward else tuple(g[::-1] for g in grids)
    records = tuple(StepRecord(tuple(g), nfe[b], n_steps[b], 0) for b, g in enumerate(out))
    return Solution(carry[0], carry[1], SampleRecords(records))


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
