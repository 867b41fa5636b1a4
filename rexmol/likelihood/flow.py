"""Samples with log-densities through any solver of the Rex ODE family; density of given data; round trips.

- :func:`sample_with_logq`: x_0 from the prior -> (x_N, log q(x_N)) with ``mode``
  ``exact`` (integrated exact divergence), ``hutchinson`` (integrated stochastic trace: biased weights) or
  ``discrete`` (exact density of the discrete map by tangent propagation; the integrated-trace log q of the same
  solve is returned beside it when all tangent columns fit the memory budget).
- :func:`log_density`: log q(x) of given data by integrating backward from x (Rex: auxiliary state set to x).
- :func:`roundtrip_certificate`: per-sample reconstruction error of x_0 and log q after the backward pass.

Solver names are those of :func:`rexmol.solvers.make_solver` (``rex-dopri5``, ``princeps-rk4``, ``rk4``, ...); plain
names integrate in t (velocity coordinates of the same schedule and model output).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rexmol.likelihood.cnf import DivergenceDynamics
from rexmol.likelihood.discrete import TangentDynamics, column_chunk, identity_columns, logdet_diagnostics
from rexmol.likelihood.divergence import ExactTrace, Hutchinson, Model
from rexmol.solvers import (AdaptiveSteps, FixedGrid, LawsonCoordinates, ModelDynamics, Solution, invert, make_solver,
                            solve)
from rexmol.solvers.solve import Solver

LOGQ_MODES = ("exact", "hutchinson", "discrete")
HUTCHINSON_WARNING = ("log q from a Hutchinson trace is a noisy estimate; exp(-integral) of it is a biased density "
                      "ratio, so importance weights built on it are biased: use mode 'exact' or 'discrete' for weights")
Steps = FixedGrid | AdaptiveSteps


@dataclass(frozen=True)
class LogQOptions:
    """How log q is computed. ``method``: exact-trace implementation ("auto" probes; see ExactTrace.METHODS);
    ``n_probes``/``noise``/``seed``: Hutchinson; ``memory_budget``: bytes for directions / tangent columns;
    ``cond_limit``: condition number above which a discrete-mode sample is flagged (default 0.01/eps)."""

    mode: str = "exact"
    method: str = "auto"
    n_probes: int = 1
    noise: str = "rademacher"
    seed: int = 0
    memory_budget: int = 2 << 30
    cond_limit: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in LOGQ_MODES:
            raise ValueError(f"unknown log-density mode {self.mode!r}; choose from {LOGQ_MODES}")

    def divergence(self) -> ExactTrace | Hutchinson:
        """A fresh estimator (Hutchinson: noise drawn from ``seed``, so a second one reproduces it)."""
        if self.mode == "hutchinson":
            return Hutchinson(self.n_probes, self.noise, self.seed, method=self.method)
        return ExactTrace(self.method, memory_budget=self.memory_budget)


@dataclass
class FlowSamples:
    """Result of :func:`sample_with_logq`, per sample [B] unless noted.

    ``logq``: the log-density of the chosen mode; ``logq_integrated``: integrated-trace log q (None in discrete mode
    when tangent columns were chunked); ``logdet``/``sign``/``cond``/``folded``: discrete mode only.
    ``info``: JSON-able description (mode, solver, trace method, grid provenance, warnings).
    """

    x: Tensor
    x0: Tensor
    logq: Tensor
    logp0: Tensor
    logq_integrated: Tensor | None
    nfe: int
    solution: Solution
    solver: Solver
    prior: Any
    info: dict[str, Any] = field(default_factory=dict)
    logdet: Tensor | None = None
    sign: Tensor | None = None
    cond: Tensor | None = None
    folded: Tensor | None = None


@dataclass
class Certificate:
    """Round trip of a sample batch: ``x0_error`` max |x_0' - x_0| (and of x_hat_0 for Rex) [B],
    ``logq_error`` |log q' - log q| [B], ``nfe`` of the backward pass."""

    x0_error: Tensor
    logq_error: Tensor
    nfe: int


def solver_coords(name: str, coords: LawsonCoordinates | None) -> LawsonCoordinates:
    """Coordinates the named solver integrates in: plain RK names use velocity coordinates of the same path."""
    base = coords if coords is not None else LawsonCoordinates()
    if name.rpartition("-")[0] == "":
        return LawsonCoordinates(base.schedule, kind="velocity", output=base.output)
    return base


def _build(name: str, dynamics, zeta: float) -> Solver:
    return make_solver(name, dynamics, zeta=zeta)


def _check_x(prior, x: Tensor, what: str) -> None:
    if tuple(x.shape[1:]) != prior.shape:
        raise ValueError(f"{what} must be [B, {', '.join(map(str, prior.shape))}], got {list(x.shape)}")
    off = (prior.project(x) - x).abs().max()
    if off > 1e3 * torch.finfo(x.dtype).eps * x.abs().max().clamp_min(1.0):
        raise ValueError(f"{what} is not on the prior's support (e.g. not centred for a mean-free prior): "
                         f"max deviation {off.item():.3e}")


def freeze_grid(model: Model, prior, solver: str, steps: AdaptiveSteps, *, coords: LawsonCoordinates | None = None,
                zeta: float = 1.0, n_pilot: int = 64, seed: int = 0, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> tuple[FixedGrid, dict[str, Any]]:
    """A fixed grid from an adaptive pilot solve on ``n_pilot`` independent prior draws (generator ``seed``).

    The grid then does not depend on the samples it is used for, which the discrete density needs.
    Returns (grid, provenance dict for the sample record).
    """
    co = solver_coords(solver, coords)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x0 = prior.sample(n_pilot, generator=g, dtype=dtype).to(device)
    pilot = solve(_build(solver, ModelDynamics(model, co), zeta), x0, steps)
    info = {"grid": "frozen from an adaptive pilot solve", "pilot_n": n_pilot, "pilot_seed": seed,
            "pilot_rtol": steps.rtol, "pilot_atol": steps.atol, "pilot_nfe": pilot.nfe,
            "steps": pilot.record.accepted, "times": list(pilot.record.times)}
    return pilot.record.grid(), info


def sample_with_logq(model: Model, prior, x0: Tensor, solver: str, steps: Steps, *,
                     coords: LawsonCoordinates | None = None, zeta: float = 1.0,
                     options: LogQOptions = LogQOptions(), pilot_n: int = 64, pilot_seed: int = 0) -> FlowSamples:
    """Push prior draws ``x0`` [B, *shape] through ``solver`` over ``steps`` and return samples with log q.

    ``prior``: :class:`StandardGaussian` or :class:`MeanFreeGaussian` (its basis defines the support).
    ``mode == "discrete"`` needs a fixed grid; AdaptiveSteps are frozen from a pilot run (see :func:`freeze_grid`)
    on ``pilot_n`` independent draws from ``pilot_seed``, and the record says so.
    """
    _check_x(prior, x0, "x0")
    co = solver_coords(solver, coords)
    basis = prior.basis(x0.dtype, x0.device)
    logp0 = prior.log_prob(x0)
    info: dict[str, Any] = {"mode": options.mode, "solver": solver, "coords": co.kind, "zeta": zeta,
                            "support_dim": prior.dim, "dtype": str(x0.dtype).replace("torch.", "")}
    if options.mode == "discrete":
        return _sample_discrete(model, prior, x0, solver, steps, co, zeta, options, basis, logp0, info,
                                pilot_n, pilot_seed)
    divergence = options.divergence()
    run = _build(solver, DivergenceDynamics(model, co, divergence, basis), zeta)
    sol = solve(run, (x0, x0.new_zeros(x0.shape[0])), steps)
    logq = logp0 + sol.state[1]
    info.update(_trace_info(divergence), grid=_grid_info(sol, steps))
    if options.mode == "hutchinson":
        info["warning"] = HUTCHINSON_WARNING
    return FlowSamples(x=sol.x, x0=x0, logq=logq, logp0=logp0, logq_integrated=logq, nfe=sol.nfe, solution=sol,
                       solver=run, prior=prior, info=info)


def _sample_discrete(model, prior, x0, solver, steps, co, zeta, options, basis, logp0, info, pilot_n, pilot_seed):
    if isinstance(steps, AdaptiveSteps):
        steps, grid_info = freeze_grid(model, prior, solver, steps, coords=co, zeta=zeta, n_pilot=pilot_n,
                                       seed=pilot_seed, dtype=x0.dtype, device=x0.device)
        info.update(grid_info)
    elif isinstance(steps, FixedGrid):
        info.update(grid="fixed", steps=steps.steps)
    else:
        raise ValueError(f"steps must be a FixedGrid or AdaptiveSteps, got {type(steps).__name__}")
    jac = ExactTrace(options.method, memory_budget=options.memory_budget)
    B, k = x0.shape[0], prior.dim
    tab = make_solver(solver, ModelDynamics(model, co), zeta=zeta).psi.tableau
    chunk = column_chunk(B, k, x0.element_size(), tab.stages, solver.startswith("rex-"), options.memory_budget)
    blocks, nfe, logq_int, sol = [], 0, None, None
    for c0 in range(0, k, chunk):
        cols = range(c0, min(c0 + chunk, k))
        full = len(cols) == k
        run = _build(solver, TangentDynamics(model, co, jac, basis, with_trace=full), zeta)
        M0 = identity_columns(B, k, cols, x0.dtype, x0.device)
        state = (x0, x0.new_zeros(B), M0) if full else (x0, M0)
        s = solve(run, state, steps)
        blocks.append(s.state[-1])
        nfe += s.nfe
        if sol is None:
            sol = s
        if full:
            logq_int = logp0 + s.state[1]
    diag = logdet_diagnostics(torch.cat(blocks, dim=-1), options.cond_limit)
    logq = logp0 - diag["logdet"].to(logp0)
    info.update(_trace_info(jac), tangent_columns_per_solve=chunk, solves=len(blocks))
    x_only = _build(solver, ModelDynamics(model, co), zeta)
    return FlowSamples(x=sol.x, x0=x0, logq=logq, logp0=logp0, logq_integrated=logq_int, nfe=nfe,
                       solution=Solution(sol.state[:1], None if sol.aux is None else sol.aux[:1], sol.record),
                       solver=x_only, prior=prior, info=info, **diag)


def _trace_info(div: ExactTrace | Hutchinson) -> dict[str, Any]:
    if isinstance(div, Hutchinson):
        return {"trace": "hutchinson", "n_probes": div.n_probes, "noise": div.noise, "noise_seed": div.seed}
    chosen = sorted(set(div.choices.values())) or [div.method]
    return {"trace": "exact", "trace_method": chosen[0] if len(chosen) == 1 else chosen}


def _grid_info(sol: Solution, steps: Steps) -> dict[str, Any]:
    kind = "fixed" if isinstance(steps, FixedGrid) else "adaptive"
    return {"kind": kind, "steps": sol.accepted, "rejected": sol.rejected}


def roundtrip_certificate(samples: FlowSamples) -> Certificate:
    """Run ``samples`` back to t_0 with the same solver (Rex: closed-form inverse over the recorded grid;
    non-reversible: backward integration over the reversed grid) and measure how well x_0 and log q return.

    log q' = log p_0(x_0') + ell_N - ell_0' (integrated modes; ell_0' should be 0) and log p_0(x_0') - log|det| in
    discrete mode; errors are per sample. Rex gives round-off; a non-reversible solver its truncation error.
    """
    back = invert(samples.solver, samples.solution)
    x0b = back.state[0]
    err = (x0b - samples.x0).reshape(x0b.shape[0], -1).abs().amax(-1)
    if back.aux is not None:
        err = torch.maximum(err, (back.aux[0] - samples.x0).reshape(x0b.shape[0], -1).abs().amax(-1))
    prior = samples.prior
    logp0b = prior.log_prob(prior.project(x0b))
    if len(back.state) > 1:
        logq_back = logp0b + (samples.solution.state[1] - back.state[1])
    else:
        logq_back = logp0b - samples.logdet.to(logp0b)
    return Certificate(x0_error=err, logq_error=(logq_back - samples.logq).abs(), nfe=back.nfe)


def log_density(model: Model, prior, x: Tensor, solver: str, steps: Steps, *,
                coords: LawsonCoordinates | None = None, zeta: float = 1.0,
                options: LogQOptions = LogQOptions()) -> tuple[Tensor, Tensor, Solution]:
    """log q(x) [B] of given data x [B, *shape] at the end time of ``steps`` (given in the sampling direction),
    by integrating (x, 0) backward to the start time: log q(x) = log p_0(x_0) - ell_0. Returns (log q, x_0, solution).

    For Rex the backward solve starts with the auxiliary state set to x. Mode "discrete" is not available here:
    the discrete map's density is that of the sampler's own outputs.
    """
    if options.mode == "discrete":
        raise ValueError("the discrete-map density applies to the sampler's own outputs; use mode 'exact' for data")
    _check_x(prior, x, "x")
    co = solver_coords(solver, coords)
    back_steps = steps.reversed() if isinstance(steps, FixedGrid) else dataclasses.replace(steps, t0=steps.t1,
                                                                                             t1=steps.t0)
    run = _build(solver, DivergenceDynamics(model, co, options.divergence(), prior.basis(x.dtype, x.device)), zeta)
    sol = solve(run, (x, x.new_zeros(x.shape[0])), back_steps)
    x0 = prior.project(sol.x)
    return prior.log_prob(x0) - sol.state[1], x0, sol
