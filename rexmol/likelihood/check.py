"""The closed-form log-density check behind ``rexmol sample --model gaussian``.

Gaussian data N(m, s^2 I) under flow matching has a closed-form velocity, flow map and marginal density at every t
(:class:`rexmol.models.gaussian.GaussianFlow`); a sampler's log q must match the marginal at its end time, and the
samples must match the exact flow map of their prior draws.
"""
from __future__ import annotations

from typing import Any

import torch

from rexmol.likelihood.flow import LogQOptions, roundtrip_certificate, sample_with_logq, solver_coords
from rexmol.likelihood.priors import MeanFreeGaussian, StandardGaussian
from rexmol.models.gaussian import GaussianFlow
from rexmol.solvers import AdaptiveSteps, FixedGrid, LawsonCoordinates

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def gaussian_problem(prior: str = "mean-free", n_particles: int = 8, std: float = 0.5, seed: int = 0,
                     dtype: torch.dtype = torch.float64):
    """(prior, GaussianFlow) over ``n_particles`` x 3: data mean drawn from ``seed`` (centred for "mean-free")."""
    if prior == "mean-free":
        p = MeanFreeGaussian(n_particles, 3)
    elif prior == "standard":
        p = StandardGaussian((n_particles, 3))
    else:
        raise ValueError(f"unknown prior {prior!r}; choose 'standard' or 'mean-free'")
    g = torch.Generator().manual_seed(seed + 7919)
    mean = p.project(torch.randn(1, n_particles, 3, generator=g, dtype=torch.float64))[0].to(dtype)
    return p, GaussianFlow(mean, std)


def gaussian_check(n: int = 256, solver: str = "rex-dopri5", logq: str = "exact", dtype: str = "float64",
                   seed: int = 0, rtol: float = 1e-4, atol: float | None = None, steps: int | None = None,
                   t0: float = 0.0, t1: float = 0.999, lawson: str = "data", trace_method: str = "auto",
                   zeta: float = 1.0, roundtrip: bool = True, prior: str = "mean-free", n_particles: int = 8,
                   std: float = 0.5) -> dict[str, Any]:
    """Sample the closed-form Gaussian flow and compare with the truth; returns a JSON-able dict.

    Keys: ``logq_max_abs_error`` (vs the closed-form marginal log-density at ``t1``), ``sample_max_abs_error`` (vs the
    exact flow map of the same prior draws), ``roundtrip_max_abs_error`` (x_0 after the backward pass; None when
    ``roundtrip`` is False), ``roundtrip_logq_max_abs_error``, ``nfe`` (forward), plus the settings. ``steps``: a
    fixed grid of that many steps uniform in t, else adaptive with ``rtol``/``atol``. ``t0`` must be 0 (the prior
    is the t = 0 marginal).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {tuple(DTYPES)}")
    if t0 != 0.0:
        raise ValueError(f"the Gaussian check starts at the prior, t0 = 0 (got {t0})")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    dt = DTYPES[dtype]
    p, flow = gaussian_problem(prior, n_particles, std, seed, dt)
    x0 = p.sample(n, generator=torch.Generator().manual_seed(seed), dtype=dt)
    atol = rtol if atol is None else atol
    grid = FixedGrid.uniform_t(t0, t1, steps) if steps is not None else AdaptiveSteps(t0, t1, rtol=rtol, atol=atol)
    coords = LawsonCoordinates(kind=lawson, output="velocity")
    options = LogQOptions(mode=logq, method=trace_method, seed=seed)
    out = sample_with_logq(flow.model("velocity"), p, x0, solver, grid, coords=coords, zeta=zeta, options=options,
                           pilot_seed=seed + 1)
    truth = flow.log_density(out.x, t1, p.dim)
    result: dict[str, Any] = {
        "model": "gaussian", "prior": prior, "support_dim": p.dim, "data_std": std, "n": n, "solver": solver,
        "logq": logq, "dtype": dtype, "t0": t0, "t1": t1, "lawson": out.info["coords"],
        "steps": steps if steps is not None else None, "rtol": None if steps is not None else rtol,
        "atol": None if steps is not None else atol, "nfe": out.nfe,
        "logq_max_abs_error": float((out.logq - truth).abs().max()),
        "sample_max_abs_error": float((out.x - flow.flow(x0, t0, t1)).abs().max()),
        "roundtrip_max_abs_error": None, "roundtrip_logq_max_abs_error": None,
        "info": {k: v for k, v in out.info.items() if k != "times"},
    }
    if out.logq_integrated is not None and logq == "discrete":
        result["integrated_logq_max_abs_error"] = float((out.logq_integrated - truth).abs().max())
    if out.folded is not None:
        result["n_folded"] = int(out.folded.sum())
        result["cond_max"] = float(out.cond.max())
    if roundtrip:
        cert = roundtrip_certificate(out)
        result["roundtrip_max_abs_error"] = float(cert.x0_error.max())
        result["roundtrip_logq_max_abs_error"] = float(cert.logq_error.max())
        result["roundtrip_nfe"] = cert.nfe
    return result


def mixture_check(n: int = 4096, solver: str = "rex-dopri5", dtype: str = "float64", seed: int = 0,
                  rtol: float = 1e-3, atol: float | None = None, steps: int | None = None, grid: str = "t",
                  t1: float = 0.999, lawson: str = "data", trace_method: str = "auto", zeta: float = 1.0,
                  error_norm: str = "x+logq", step_control: str = "per-sample", batch_size: int | None = None,
                  roundtrip: bool = True, logq_atol: float | None = None) -> dict[str, Any]:
    """Sample the closed-form 3-mode mixture flow (:func:`rexmol.models.mixture.three_mode_mixture`) from N(0, I)
    and check its weights: ``ess`` (Kish, of log w = log p_t1 - log q), the SNIS estimate of the lightest mode's
    weight (test function: its responsibility at t1, whose exact mean is the mode weight) with its standard error
    and ``truth``, ``logq_max_abs_error`` (max over samples of |log q - log p_t1|), NFE mean/max. Samples go
    through in batches of ``batch_size`` (default all at once), from the same draws whatever the batch size."""
    import numpy as np

    from rexmol.models.mixture import three_mode_mixture
    from rexmol.weights import estimate, kish_ess

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {tuple(DTYPES)}")
    if n < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"n and batch size must be >= 1, got {n}, {batch_size}")
    dt = DTYPES[dtype]
    flow = three_mode_mixture()
    p = StandardGaussian((flow.dim,))
    x0_all = p.sample(n, generator=torch.Generator().manual_seed(seed), dtype=dt)
    atol = rtol if atol is None else atol
    coords = LawsonCoordinates(kind=lawson, output="velocity")
    if steps is not None:
        grid_steps = FixedGrid.named(grid, solver_coords(solver, coords), 0.0, t1, steps)
    else:
        grid_steps = AdaptiveSteps(0.0, t1, rtol=rtol, atol=atol, control=step_control)
    options = LogQOptions(mode="exact", method=trace_method, error_norm=error_norm, logq_atol=logq_atol)
    xs, logqs, nfes, rts = [], [], [], []
    info: dict[str, Any] = {}
    for b0 in range(0, n, batch_size or n):
        out = sample_with_logq(flow.model(), p, x0_all[b0:b0 + (batch_size or n)], solver, grid_steps,
                               coords=coords, zeta=zeta, options=options)
        xs.append(out.x)
        logqs.append(out.logq)
        nfes.extend(out.sample_nfe)
        info = out.info
        if roundtrip:
            rts.append(roundtrip_certificate(out).x0_error)
    x, logq = torch.cat(xs), torch.cat(logqs)
    truth = flow.log_density(x.to(torch.float64), t1)
    log_w = (truth - logq.to(torch.float64)).numpy()
    mode = int(torch.argmin(flow.weights))
    est = estimate(log_w, flow.responsibilities(x.to(torch.float64), t1)[:, mode].numpy())
    return {
        "model": "mixture", "n": n, "solver": solver, "dtype": dtype, "t1": t1, "lawson": info.get("coords"),
        "steps": steps, "grid": grid if steps is not None else None,
        "rtol": None if steps is not None else rtol, "atol": None if steps is not None else atol,
        "error_norm": error_norm if steps is None else None, "step_control": step_control if steps is None else None,
        "logq_atol": info["grid"].get("logq_atol"),
        "batch_size": batch_size or n, "ess": kish_ess(log_w),
        "mode_weight": {"mode": mode, "estimate": float(est.mean), "stderr": float(est.stderr),
                        "truth": float(flow.weights[mode])},
        "logq_max_abs_error": float(np.abs(log_w).max()), "nfe_mean": float(np.mean(nfes)), "nfe_max": max(nfes),
        "nfe": max(nfes), "roundtrip_max_abs_error": float(torch.cat(rts).max()) if roundtrip else None,
    }
