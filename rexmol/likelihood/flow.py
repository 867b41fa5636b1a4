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
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rexmol.likelihood.cnf import DivergenceDynamics
from rexmol.likelihood.discrete import (TangentDynamics, column_chunk, identity_columns, inverse_logdet,
                                        logdet_diagnostics)
from rexmol.likelihood.divergence import ExactTrace, Hutchinson, Model
from rexmol.solvers import (AdaptiveSteps, FixedGrid, LawsonCoordinates, ModelDynamics, Solution, invert, make_solver,
                            solve)
from rexmol.solvers.dynamics import time_vector
from rexmol.solvers.solve import Progress, Solver, progress_span

LOGQ_MODES = ("exact", "hutchinson", "discrete")
ERROR_NORMS = ("x+logq", "x")
HUTCHINSON_WARNING = ("log q from a Hutchinson trace is a noisy estimate; exp(-integral) of it is a biased density "
                      "ratio, so importance weights built on it are biased: use mode 'exact' or 'discrete' for weights")
Steps = FixedGrid | AdaptiveSteps


@dataclass(frozen=True)
class LogQOptions:
    """How log q is computed. ``method``: exact-trace implementation ("auto" probes; see ExactTrace.METHODS);
    ``n_probes``/``noise``/``seed``: Hutchinson; ``memory_budget``: bytes for directions / tangent columns;
    ``cond_limit``: condition number above which a discrete-mode sample is flagged (default 0.01/eps);
    ``error_norm``: what adaptive step control controls where log q is integrated: "x+logq" (default; each its own
    tolerance, see :class:`rexmol.solvers.AdaptiveSteps`) or "x" (log q rides along uncontrolled);
    ``logq_atol``: with "x+logq", the absolute tolerance of log q per step in nats (None: the solve's atol; the
    global log q error is about the sum over steps)."""

    mode: str = "exact"
    method: str = "auto"
    n_probes: int = 1
    noise: str = "rademacher"
    seed: int = 0
    memory_budget: int = 2 << 30
    cond_limit: float | None = None
    error_norm: str = "x+logq"
    logq_atol: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in LOGQ_MODES:
            raise ValueError(f"unknown log-density mode {self.mode!r}; choose from {LOGQ_MODES}")
        if self.error_norm not in ERROR_NORMS:
            raise ValueError(f"unknown error norm {self.error_norm!r}; choose from {ERROR_NORMS}")
        if self.logq_atol is not None and not (math.isfinite(self.logq_atol) and self.logq_atol > 0):
            raise ValueError(f"--logq-atol must be a finite number > 0 (nats), got {self.logq_atol}")

    def divergence(self) -> ExactTrace | Hutchinson:
        """A fresh estimator (Hutchinson: noise drawn from ``seed``, so a second one reproduces it)."""
        if self.mode == "hutchinson":
            return Hutchinson(self.n_probes, self.noise, self.seed, method=self.method)
        return ExactTrace(self.method, memory_budget=self.memory_budget)


@dataclass
class FlowSamples:
    """Result of :func:`sample_with_logq`, per sample [B] unless noted.

    ``logq``: the log-density of the chosen mode; ``logq_integrated``: integrated-trace log q (None in discrete mode
    when tangent columns were chunked); ``logdet``/``sign``/``cond``/``folded``: discrete mode only, as is
    ``tangent_solver`` (the (x, M) tangent solver the certificate runs backward).
    ``info``: JSON-able description (mode, solver, trace method, grid provenance incl. error norm and step
    control, warnings). ``nfe``: the largest per-sample NFE; ``sample_nfe``: each sample's own [B].
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
    sample_nfe: list[int] = field(default_factory=list)
    tangent_solver: Solver | None = None


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
    pilot = solve(_build(solver, ModelDynamics(model, co), zeta), x0, dataclasses.replace(steps, control="shared"))
    info = {"grid": "frozen from an adaptive pilot solve", "pilot_n": n_pilot, "pilot_seed": seed,
            "pilot_rtol": steps.rtol, "pilot_atol": steps.atol, "pilot_nfe": pilot.nfe,
            "steps": pilot.record.accepted, "times": list(pilot.record.times)}
    return pilot.record.grid(), info


def sample_with_logq(model: Model, prior, x0: Tensor, solver: str, steps: Steps, *,
                     coords: LawsonCoordinates | None = None, zeta: float = 1.0,
                     options: LogQOptions = LogQOptions(), pilot_n: int = 64, pilot_seed: int = 0,
                     on_step: Progress | None = None) -> FlowSamples:
    """Push prior draws ``x0`` [B, *shape] through ``solver`` over ``steps`` and return samples with log q.

    ``prior``: :class:`StandardGaussian` or :class:`MeanFreeGaussian` (its basis defines the support).
    ``mode == "discrete"`` needs a fixed grid; AdaptiveSteps are frozen from a pilot run (see :func:`freeze_grid`)
    on ``pilot_n`` independent draws from ``pilot_seed``, and the record says so. ``on_step(done)``: progress,
    the fraction of the solves done (see :mod:`rexmol.solvers.solve`; the pilot solve is not counted).
    """
    _check_x(prior, x0, "x0")
    co = solver_coords(solver, coords)
    basis = prior.basis(x0.dtype, x0.device)
    logp0 = prior.log_prob(x0)
    info: dict[str, Any] = {"mode": options.mode, "solver": solver, "coords": co.kind, "zeta": zeta,
                            "support_dim": prior.dim, "dtype": str(x0.dtype).replace("torch.", "")}
    if options.mode == "discrete":
        return _sample_discrete(model, prior, x0, solver, steps, co, zeta, options, basis, logp0, info,
                                pilot_n, pilot_seed, on_step)
    divergence = options.divergence()
    if isinstance(steps, AdaptiveSteps):
        steps = _with_norm(steps, options)
        if steps.control == "per-sample":
            divergence = _fixed_method(divergence, model, x0, steps.t0, basis)
    run = _build(solver, DivergenceDynamics(model, co, divergence, basis), zeta)
    sol = solve(run, (x0, x0.new_zeros(x0.shape[0])), steps, on_step)
    logq = logp0 + sol.state[1]
    info.update(_trace_info(divergence), grid=_grid_info(sol, steps))
    if options.mode == "hutchinson":
        info["warning"] = HUTCHINSON_WARNING
    return FlowSamples(x=sol.x, x0=x0, logq=logq, logp0=logp0, logq_integrated=logq, nfe=sol.nfe, solution=sol,
                       solver=run, prior=prior, info=info, sample_nfe=sol.sample_nfe)


def _with_norm(steps: AdaptiveSteps, options: LogQOptions) -> AdaptiveSteps:
    """Step control over (x, ell) with ell in absolute terms, tolerance ``options.logq_atol`` ("x+logq"), or over
    x alone ("x")."""
    if options.error_norm == "x":
        return dataclasses.replace(steps, error_components=(0,), absolute_components=(), absolute_atol=None)
    return dataclasses.replace(steps, error_components=(0, 1), absolute_components=(1,),
                               absolute_atol=options.logq_atol)


def _fixed_method(divergence: ExactTrace | Hutchinson, model: Model, x0: Tensor, t0: float,
                  basis: Tensor | None) -> ExactTrace:
    """The trace estimator for per-sample control, whose active batch shrinks: Hutchinson is refused (its noise is
    drawn per batch, so it would change as samples finish), and "auto" is resolved once on the full batch, so that
    every batch size uses the same implementation."""
    if isinstance(divergence, Hutchinson):
        raise ValueError("the Hutchinson trace needs shared step control (--step-control shared): per-sample "
                         "control shrinks the batch, which would redraw the probe noise")
    if divergence.method != "auto":
        return divergence
    divergence(model, x0, time_vector(float(t0), x0), basis)
    chosen = sorted(set(divergence.choices.values()))
    return ExactTrace(chosen[0], memory_budget=divergence.memory_budget) if len(chosen) == 1 else divergence


def _sample_discrete(model, prior, x0, solver, steps, co, zeta, options, basis, logp0, info, pilot_n, pilot_seed,
                     on_step):
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
    n_solves = -(-k // chunk)
    for c0 in range(0, k, chunk):
        cols = range(c0, min(c0 + chunk, k))
        full = len(cols) == k
        run = _build(solver, TangentDynamics(model, co, jac, basis, with_trace=full), zeta)
        M0 = identity_columns(B, k, cols, x0.dtype, x0.device)
        state = (x0, x0.new_zeros(B), M0) if full else (x0, M0)
        s = solve(run, state, steps, progress_span(on_step, c0 // chunk / n_solves, (c0 // chunk + 1) / n_solves))
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
                       solver=x_only, prior=prior, info=info, sample_nfe=[nfe] * B,
                       tangent_solver=_build(solver, TangentDynamics(model, co, jac, basis, with_trace=False), zeta),
                       **diag)


def _trace_info(div: ExactTrace | Hutchinson) -> dict[str, Any]:
    if isinstance(div, Hutchinson):
        return {"trace": "hutchinson", "n_probes": div.n_probes, "noise": div.noise, "noise_seed": div.seed}
    chosen = sorted(set(div.choices.values())) or [div.method]
    return {"trace": "exact", "trace_method": chosen[0] if len(chosen) == 1 else chosen}


def _grid_info(sol: Solution, steps: Steps) -> dict[str, Any]:
    if not isinstance(steps, AdaptiveSteps):
        return {"kind": "fixed", "steps": sol.accepted}
    norm = "x+logq" if 1 in steps.error_components else "x"
    return {"kind": "adaptive", "steps": sol.accepted, "rejected": sol.rejected, "error_norm": norm,
            "logq_atol": steps.absolute_tolerance if norm != "x" else None,
            "step_control": steps.control}


def roundtrip_certificate(samples: FlowSamples, on_step: Progress | None = None) -> Certificate:
    """Run ``samples`` back to t_0 with the same solver (Rex: closed-form inverse over the recorded grid;
    non-reversible: backward integration over the reversed grid) and measure how well x_0 and log q return.

    log q' = log p_0(x_0') + ell_N - ell_0' (integrated modes; ell_0' should be 0). In discrete mode the backward
    pass carries tangents and re-derives the log-determinant of the inverse map (:func:`inverse_logdet`), so
    log q' = log p_0(x_0') + log|det d x_0'/d x_N| certifies the forward log|det| too. Errors are per sample; Rex
    gives round-off, a non-reversible solver its truncation error. ``on_step(done)``: progress of the backward pass.
    """
    prior = samples.prior
    if samples.tangent_solver is not None:
        x0b, xh0b, logdet_back, nfe = inverse_logdet(samples.tangent_solver, samples.solution, prior.dim,
                                                   on_step)
    else:
        back = invert(samples.solver, samples.solution, on_step=on_step)
        x0b, xh0b, nfe = back.state[0], None if back.aux is None else back.aux[0], back.nfe
    err = (x0b - samples.x0).reshape(x0b.shape[0], -1).abs().amax(-1)
    if xh0b is not None:
        err = torch.maximum(err, (xh0b - samples.x0).reshape(x0b.shape[0], -1).abs().amax(-1))
    logp0b = prior.log_prob(prior.project(x0b))
    if samples.tangent_solver is not None:
        logq_back = logp0b + logdet_back.to(logp0b)
    else:
        logq_back = logp0b + (samples.solution.state[1] - back.state[1])
    return Certificate(x0_error=err, logq_error=(logq_back - samples.logq).abs(), nfe=nfe)


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
    if isinstance(steps, FixedGrid):
        back_steps = steps.reversed()
    else:
        back_steps = _with_norm(dataclasses.replace(steps, t0=steps.t1, t1=steps.t0), options)
    run = _build(solver, DivergenceDynamics(model, co, options.divergence(), prior.basis(x.dtype, x.device)), zeta)
    sol = solve(run, (x, x.new_zeros(x.shape[0])), back_steps)
    x0 = prior.project(sol.x)
    logq = prior.log_prob(x0) - sol.state[1]
    _warn_atypical(prior, x0, logq)
    return logq, x0, sol


def _warn_atypical(prior, x0: Tensor, logq: Tensor) -> None:
    """RuntimeWarning when the backward solve lands outside the prior's typical set (|x0|^2 beyond chi^2_dim's mean
    + 20 sd) or log q is not finite: the grid did not resolve the flow and log q is meaningless (a 4-step rex-rk4
    on the closed-form Gaussian flow to t = 0.999 gives |x0|^2 ~ 1e9 and log q off by ~6e8)."""
    r2 = x0.reshape(x0.shape[0], -1).pow(2).sum(-1)
    bad = ~torch.isfinite(logq) | ~(r2 <= prior.dim + 20.0 * (2.0 * prior.dim) ** 0.5)
    if bool(bad.any()):
        warnings.warn(f"log_density: {int(bad.sum())} of {len(bad)} samples came back outside the prior's typical set "
                      f"(max |x0|^2 = {float(r2.max()):.3g}, a prior draw has {prior.dim} +- "
                      f"{(2.0 * prior.dim) ** 0.5:.0f}) or with non-finite log q: the backward solve is unresolved; "
                      "use more steps, a log-varsigma grid or an adaptive solver", RuntimeWarning, stacklevel=3)
