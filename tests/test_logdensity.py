"""Log-densities through the Rex ODE family against the closed-form Gaussian flow (float64), round trips, CLI."""
import json
import math

import pytest
import torch

from rexmol.cli import main
from rexmol.likelihood.check import gaussian_check, gaussian_problem
from rexmol.likelihood.flow import HUTCHINSON_WARNING, LogQOptions, log_density, roundtrip_certificate, sample_with_logq
from rexmol.solvers import AdaptiveSteps, FixedGrid, LawsonCoordinates

DT = torch.float64
T1 = 0.99  # data-kind Lawson coordinates are singular at t = 1
COORDS = LawsonCoordinates(kind="data", output="velocity")


def log1p_varsigma_grid(t1: float, n: int) -> FixedGrid:
    """Uniform in log(1 + varsigma) from t = 0: clean 4th order for data-kind RK4 (uniform t is not)."""
    u1 = math.log1p(COORDS.varsigma(t1))
    return FixedGrid([0.0] + [COORDS.t_of_varsigma(math.expm1(u1 * i / n)) for i in range(1, n)] + [t1])


def problem(prior: str, n: int = 6, seed: int = 0):
    p, flow = gaussian_problem(prior, n_particles=4, std=0.5, seed=seed)
    x0 = p.sample(n, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return p, flow, x0


@pytest.mark.parametrize("prior", ["standard", "mean-free"])
@pytest.mark.parametrize("solver,steps", [
    ("rex-dopri5", AdaptiveSteps(0.0, T1, rtol=1e-8, atol=1e-8, error_components=(0, 1))),
    ("rex-rk4", log1p_varsigma_grid(T1, 128)),
])
def test_logq_matches_closed_form(prior, solver, steps):
    p, flow, x0 = problem(prior)
    out = sample_with_logq(flow.model(), p, x0, solver, steps, coords=COORDS)
    assert (out.x - flow.flow(x0, 0.0, T1)).abs().max() < 1e-6
    err = (out.logq - flow.log_density(out.x, T1, p.dim)).abs().max()
    assert err <= 1e-6, err
    assert out.info["trace"] == "exact" and out.info["support_dim"] == p.dim


def test_every_solver_of_the_family_gives_log_q():
    """Rex, Princeps, plain RK (in t) and adaptive Dopri5 all carry ell; errors shrink with the solver's accuracy."""
    p, flow, x0 = problem("mean-free", n=3)
    lawson = log1p_varsigma_grid(T1, 16)
    cases = {
        "rex-rk4": lawson, "princeps-rk4": lawson, "rex-euler": lawson,
        "rk4": FixedGrid.uniform_t(0.0, T1, 12), "dopri5": AdaptiveSteps(0.0, T1, rtol=1e-7, atol=1e-7),
    }
    errors = {}
    for solver, steps in cases.items():
        out = sample_with_logq(flow.model(), p, x0, solver, steps, coords=COORDS)
        errors[solver] = float((out.logq - flow.log_density(out.x, T1, p.dim)).abs().max())
    assert errors["rk4"] < 1e-5 and errors["dopri5"] < 1e-5, errors
    assert errors["rex-rk4"] < 1e-2 and errors["princeps-rk4"] < 1e-2, errors
    assert errors["rex-euler"] > 10 * errors["rex-rk4"], errors  # first order on the same grid


def test_rex_roundtrip_certificate_is_roundoff_dopri5_is_not():
    p, flow, x0 = problem("mean-free")
    rex = sample_with_logq(flow.model(), p, x0, "rex-dopri5", AdaptiveSteps(0.0, T1, rtol=1e-6, atol=1e-6),
                           coords=COORDS)
    cert = roundtrip_certificate(rex)
    assert cert.x0_error.max() <= 1e-11 and cert.logq_error.max() <= 1e-11, (cert.x0_error, cert.logq_error)
    base = sample_with_logq(flow.model(), p, x0, "dopri5", AdaptiveSteps(0.0, T1, rtol=1e-6, atol=1e-6))
    cb = roundtrip_certificate(base)
    # measured: ~1e-7 in x_0 and ~1e-6 in log q at rtol = atol = 1e-6: truncation error, not round-off
    assert cb.x0_error.max() > 1e-9 and cb.logq_error.max() > 1e-9, (cb.x0_error.max(), cb.logq_error.max())


def test_density_of_given_data_by_backward_solve():
    p, flow, x0 = problem("standard")
    x = flow.flow(x0, 0.0, T1)  # exact data at T1, not produced by the sampler
    for solver, steps in [("rk4", FixedGrid.uniform_t(0.0, T1, 32)),
                          ("rex-dopri5", AdaptiveSteps(0.0, T1, rtol=1e-8, atol=1e-8, error_components=(0, 1)))]:
        logq, xb, _ = log_density(flow.model(), p, x, solver, steps, coords=COORDS)
        assert (xb - x0).abs().max() < 1e-5
        assert (logq - flow.log_density(x, T1)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="discrete"):
        log_density(flow.model(), p, x, "rk4", FixedGrid.uniform_t(0.0, T1, 4), options=LogQOptions(mode="discrete"))


def test_hutchinson_mode_is_reproducible_and_reversible():
    p, flow, x0 = problem("mean-free", n=4)
    opts = LogQOptions(mode="hutchinson", n_probes=2, seed=3)
    grid = FixedGrid.uniform_t(0.0, T1, 12)
    a = sample_with_logq(flow.model(), p, x0, "rex-rk4", grid, coords=COORDS, options=opts)
    b = sample_with_logq(flow.model(), p, x0, "rex-rk4", grid, coords=COORDS, options=opts)
    assert torch.equal(a.logq, b.logq)
    assert a.info["warning"] == HUTCHINSON_WARNING
    cert = roundtrip_certificate(a)
    assert cert.logq_error.max() <= 1e-11
    # an affine field has a constant Jacobian: every probe gives the exact trace, so log q is exact as well
    exact = sample_with_logq(flow.model(), p, x0, "rex-rk4", grid, coords=COORDS)
    assert torch.allclose(a.logq, exact.logq, atol=1e-10)


def test_bad_inputs_raise():
    p, flow, x0 = problem("mean-free", n=2)
    with pytest.raises(ValueError, match="support"):
        sample_with_logq(flow.model(), p, x0 + 1.0, "rk4", FixedGrid.uniform_t(0.0, T1, 2))
    with pytest.raises(ValueError, match="log-density mode"):
        LogQOptions(mode="jacobian")
    with pytest.raises(ValueError, match="t0 = 0"):
        gaussian_check(n=2, t0=0.1)


def test_cli_gaussian_json(capsys):
    code = main(["sample", "--model", "gaussian", "--n", "16", "--solver", "rex-dopri5", "--trace", "exact",
                 "--dtype", "float64", "--rtol", "1e-7", "--t1", "0.99", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["logq_max_abs_error"] < 1e-5
    assert out["roundtrip_max_abs_error"] < 1e-11
    assert out["nfe"] > 0 and out["solver"] == "rex-dopri5" and out["support_dim"] == 21


@pytest.mark.slow
def test_cli_gaussian_json_issue_command(capsys):
    """The issue's exact command (default tolerances 1e-4, t1 = 0.999)."""
    assert main(["sample", "--model", "gaussian", "--n", "256", "--solver", "rex-dopri5", "--trace", "exact",
                 "--dtype", "float64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # measured: logq error 4.3e-4 (tolerance-limited), round trip 3.7e-10 (t1 = 0.999), 170 NFE
    assert out["logq_max_abs_error"] < 1e-2 and out["roundtrip_max_abs_error"] < 1e-8 and out["nfe"] > 0
