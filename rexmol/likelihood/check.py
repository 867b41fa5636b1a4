"""The closed-form log-density check behind ``rexmol sample --model gaussian``.

Gaussian data N(m, s^2 I) under flow matching has a closed-form velocity, flow map and marginal density at every t
(:class:`rexmol.models.gaussian.GaussianFlow`); a sampler's log q must match the marginal at its end time, and the
samples must match the exact flow map of their prior draws.
"""
from __future__ import annotations

from typing import Any

import torch

from rexmol.likelihood.flow import LogQOptions, roundtrip_certificate, sample_with_logq
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
