"""Adaptive step control (issue 15), float64, against closed-form truths: the 3-mode Gaussian-mixture flow
(marginal density and responsibilities in closed form) and the Gaussian flow. Per-sample control must make a
sample's result independent of its batch; Rex must invert per-sample grids to round-off."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from rexmol.likelihood.check import mixture_check
from rexmol.likelihood.discrete import inverse_logdet
from rexmol.likelihood.flow import LogQOptions, roundtrip_certificate, sample_with_logq
from rexmol.likelihood.priors import MeanFreeGaussian, StandardGaussian
from rexmol.models.gaussian import GaussianFlow
from rexmol.models.mixture import three_mode_mixture
from rexmol.solvers import AdaptiveSteps, FixedGrid, LawsonCoordinates, invert, make_solver, solve
from rexmol.solvers.control import SampleRecords
from rexmol.solvers.grids import GRID_KINDS, SampleGrids

D64 = torch.float64
T1 = 0.97
CASES = [("dopri5", "velocity"), ("rex-dopri5", "velocity"), ("rex-dopri5", "data")]


def mixture_samples(n: int, solver: str, lawson: str, rtol: float, control: str = "per-sample", batch=None):
    """The first n of 4096 fixed draws, in batches of ``batch`` (default all at once)."""
    flow, prior = three_mode_mixture(), StandardGaussian((3,))
    x0 = prior.sample(4096, generator=torch.Generator().manual_seed(0), dtype=D64)[:n]
    steps = AdaptiveSteps(0.0, T1, rtol=rtol, atol=rtol, control=control)
    outs = [sample_with_logq(flow.model(), prior, x0[i:i + (batch or n)], solver, steps,
                             coords=LawsonCoordinates(kind=lawson), options=LogQOptions(method="vjp-loop"))
            for i in range(0, n, batch or n)]
    x, logq = torch.cat([o.x for o in outs]), torch.cat([o.logq for o in outs])
    nfe = [k for o in outs for k in o.sample_nfe]
    return flow, x, logq, nfe, outs


@pytest.mark.parametrize("solver,lawson", CASES)
def test_mixture_weights_at_rtol_1e3(solver, lawson):
    r = mixture_check(n=512, solver=solver, lawson=lawson, rtol=1e-3, t1=T1, trace_method="vjp-loop",
                      roundtrip=False)
    assert r["ess"] >= 0.99
    mw = r["mode_weight"]
    assert abs(mw["estimate"] - mw["truth"]) <= 4 * mw["stderr"]


@pytest.mark.parametrize("solver,lawson", CASES)
def test_mixture_logq_max_error_at_rtol_1e3_shared(solver, lawson):
    r = mixture_check(n=512, solver=solver, lawson=lawson, rtol=1e-3, t1=T1, trace_method="vjp-loop",
                      step_control="shared", roundtrip=False)
    assert r["logq_max_abs_error"] <= 1e-2


@pytest.mark.parametrize("solver,lawson", CASES)
def test_mixture_logq_max_error_at_rtol_1e3_per_sample(solver, lawson):
    r = mixture_check(n=512, solver=solver, lawson=lawson, rtol=1e-3, t1=T1, trace_method="vjp-loop",
                      roundtrip=False)
    assert r["logq_max_abs_error"] <= 1e-2


def test_mixture_issue_target_per_sample():
    """`rexmol sample --model mixture --n 4096 --solver rex-dopri5 --rtol 1e-3` (data kind, t1 0.999); the batch
    size does not matter with per-sample control (test_per_sample_results_do_not_depend_on_the_batch)."""
    r = mixture_check(n=4096, solver="rex-dopri5", lawson="data", rtol=1e-3, t1=0.999, trace_method="vjp-loop",
                      roundtrip=False)
    assert r["ess"] >= 0.99 and r["logq_max_abs_error"] <= 1e-2


def test_per_sample_step_limit_and_shared_default():
    """Per-sample control never steps further in t than a tenth of the span (ode45's MaxStep); the shared
    controller has no limit unless asked."""
    *_, outs = mixture_samples(256, "rex-dopri5", "data", 1e-3)
    steps = [b - a for r in outs[0].solution.record.records for a, b in zip(r.times, r.times[1:])]
    assert max(steps) <= 0.1 * T1 * (1 + 1e-12)
    assert AdaptiveSteps(0.0, T1, control="shared").step_limit() == T1
    g = GaussianFlow(torch.tensor([1.0, -0.5, 0.25], dtype=D64), 0.5)
    solver = make_solver("rex-dopri5", g.model("velocity"), LawsonCoordinates(kind="velocity"))
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=D64)
    limited = solve(solver, x0, AdaptiveSteps(0.0, 1.0, rtol=1e-3, atol=1e-3, control="shared", max_step=0.05))
    assert max(b - a for a, b in zip(limited.record.times, limited.record.times[1:])) <= 0.05 * (1 + 1e-12)


@pytest.mark.parametrize("solver,lawson", CASES)
def test_mixture_logq_every_sample_at_rtol_1e5(solver, lawson):
    flow, x, logq, _, _ = mixture_samples(256, solver, lawson, 1e-5)
    assert (logq - flow.log_density(x, T1)).abs().max().item() <= 1e-3


def test_logq_in_the_error_norm_matters():
    """Leaving log q out of the norm (the old default) is measurably worse on the same draws. Shared control: there
    the error norm alone sizes the steps (per-sample steps on this flow are mostly held by the step limit)."""
    common = dict(n=512, solver="rex-dopri5", lawson="velocity", rtol=1e-3, t1=T1, trace_method="vjp-loop",
                  step_control="shared", roundtrip=False)
    with_logq = mixture_check(**common)["logq_max_abs_error"]
    x_only = mixture_check(error_norm="x", **common)["logq_max_abs_error"]
    assert x_only > 2 * with_logq


def test_logq_atol_is_the_log_q_tolerance():
    """--logq-atol sizes the steps through log q alone: None is exactly atol, a tighter one buys accuracy with
    evaluations, a looser one the reverse (same draws, shared control as above)."""
    common = dict(n=256, solver="rex-dopri5", lawson="velocity", rtol=1e-3, t1=T1, trace_method="vjp-loop",
                  step_control="shared", roundtrip=False)
    default, same = mixture_check(**common), mixture_check(logq_atol=1e-3, **common)
    tight, loose = mixture_check(logq_atol=1e-5, **common), mixture_check(logq_atol=1e-1, **common)
    assert default["logq_atol"] == same["logq_atol"] == 1e-3 and tight["logq_atol"] == 1e-5
    assert default["logq_max_abs_error"] == same["logq_max_abs_error"] and default["nfe"] == same["nfe"]
    assert tight["nfe"] > default["nfe"] > loose["nfe"]
    assert tight["logq_max_abs_error"] < default["logq_max_abs_error"] < loose["logq_max_abs_error"]
    assert mixture_check(error_norm="x", **common)["logq_atol"] is None
    with pytest.raises(ValueError, match="logq-atol"):
        LogQOptions(logq_atol=0.0)


@pytest.mark.parametrize("lawson", ["velocity", "data"])
def test_per_sample_results_do_not_depend_on_the_batch(lawson):
    _, x, logq, nfe, _ = mixture_samples(4096, "rex-dopri5", lawson, 1e-3)
    _, x64, logq64, nfe64, _ = mixture_samples(64, "rex-dopri5", lawson, 1e-3, batch=64)
    _, x1, logq1, nfe1, _ = mixture_samples(6, "rex-dopri5", lawson, 1e-3, batch=1)
    assert (logq64 - logq[:64]).abs().max().item() <= 1e-12
    assert (logq1 - logq[:6]).abs().max().item() <= 1e-12
    assert (x64 - x[:64]).abs().max().item() <= 1e-12
    assert nfe64 == nfe[:64] and nfe1 == nfe[:6]
    assert len(set(nfe)) > 1  # the samples really took different grids


def test_shared_max_norm_results_agree_within_tolerance():
    flow, x, logq, _, _ = mixture_samples(4096, "rex-dopri5", "velocity", 1e-3, control="shared")
    _, x64, logq64, _, _ = mixture_samples(64, "rex-dopri5", "velocity", 1e-3, control="shared", batch=64)
    assert (logq64 - logq[:64]).abs().max().item() <= 1e-2
    assert (logq64 - flow.log_density(x64, T1)).abs().max().item() <= 1e-2


@pytest.mark.parametrize("kind,t1,bound", [("velocity", 1.0, 1e-13), ("data", 0.9, 1e-11)])
def test_rex_round_trip_per_sample_adaptive_and_replayed(kind, t1, bound, tmp_path):
    g = GaussianFlow(torch.tensor([1.0, -0.5, 0.25], dtype=D64), 0.5)
    x0 = torch.randn(48, 3, generator=torch.Generator().manual_seed(1), dtype=D64) * 2
    solver = make_solver("rex-dopri5", g.model("velocity"), LawsonCoordinates(kind=kind))
    sol = solve(solver, x0, AdaptiveSteps(0.0, t1, rtol=1e-6, atol=1e-6, control="per-sample"))
    assert isinstance(sol.record, SampleRecords) and len({r.times for r in sol.record.records}) > 1
    assert all(r.times[0] == 0.0 and r.times[-1] == t1 for r in sol.record.records)
    assert (invert(solver, sol).x - x0).abs().max().item() <= bound
    sol.record.save(tmp_path / "records.json")
    grids = SampleRecords.load(tmp_path / "records.json").grid()
    replay = solve(solver, x0, grids)
    assert torch.equal(replay.x, sol.x) and torch.equal(replay.aux[0], sol.aux[0])
    assert replay.sample_nfe == [r.nfe for r in invert(solver, replay).record.records]
    assert (invert(solver, replay).x - x0).abs().max().item() <= bound
    assert (sol.x - g.flow(x0, 0.0, t1)).abs().max().item() <= 1e-4


def test_per_sample_certificate_and_nfe_per_sample():
    flow, prior = three_mode_mixture(), StandardGaussian((3,))
    x0 = prior.sample(64, generator=torch.Generator().manual_seed(3), dtype=D64)
    out = sample_with_logq(flow.model(), prior, x0, "rex-dopri5",
                           AdaptiveSteps(0.0, T1, rtol=1e-4, atol=1e-4, control="per-sample"),
                           coords=LawsonCoordinates(kind="velocity"))
    assert out.info["grid"]["step_control"] == "per-sample" and out.info["grid"]["error_norm"] == "x+logq"
    assert out.nfe == max(out.sample_nfe) and len(out.sample_nfe) == 64
    cert = roundtrip_certificate(out)
    assert cert.x0_error.max().item() <= 1e-12 and cert.logq_error.max().item() <= 1e-12


def test_hutchinson_refuses_per_sample_control():
    flow, prior = three_mode_mixture(), StandardGaussian((3,))
    x0 = prior.sample(4, dtype=D64)
    with pytest.raises(ValueError, match="step-control shared"):
        sample_with_logq(flow.model(), prior, x0, "rex-dopri5",
                         AdaptiveSteps(0.0, T1, control="per-sample"), options=LogQOptions(mode="hutchinson"))


@pytest.mark.parametrize("kind", GRID_KINDS)
def test_named_grids_are_uniform_in_their_variable(kind):
    co = LawsonCoordinates(kind="data")
    t0 = 0.01 if kind == "log-varsigma" else 0.0
    g = FixedGrid.named(kind, co, t0, 0.99, 8)
    assert g.times[0] == t0 and g.times[-1] == 0.99 and g.steps == 8
    fn = {"t": lambda t: t, "varsigma": co.varsigma, "log-varsigma": lambda t: torch.log(co.varsigma(t)),
          "log1p-varsigma": lambda t: torch.log1p(co.varsigma(t))}[kind]
    v = fn(torch.tensor(g.times, dtype=D64))
    assert (v.diff() - v.diff().mean()).abs().max().item() <= 1e-9 * v.abs().max().item()


def test_sample_grids_validate():
    with pytest.raises(ValueError, match="same direction"):
        SampleGrids([(0.0, 0.5), (0.5, 0.0)])


class MeanFreeMLP(torch.nn.Module):
    """Random nonlinear velocity over particles x 3 with centred input and output (stays on the subspace)."""

    def __init__(self, n: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3 * n + 1, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3 * n))

    def forward(self, x, t):
        x = x - x.mean(1, keepdim=True)
        out = self.net(torch.cat([x.reshape(x.shape[0], -1), t[:, None]], -1)).reshape(x.shape)
        return out - out.mean(1, keepdim=True)


@pytest.mark.parametrize("solver,kind,zeta,t1,bound", [
    ("rex-rk4", "data", 1.0, 0.9, 1e-12), ("rex-midpoint", "data", 0.6, 0.9, 1e-11),
    ("rex-dopri5", "velocity", 1.0, 1.0, 1e-13), ("rk4", "velocity", 1.0, 1.0, 1e-8)])
@pytest.mark.parametrize("budget", [2 << 30, 5_000])  # all tangent columns in one solve / in chunks
def test_discrete_certificate_rederives_the_logdet_backward(solver, kind, zeta, t1, bound, budget):
    """The backward pass carries tangents of the inverse map: its log|det| equals the forward one to round-off
    for Rex (to truncation error for plain rk4), and a forward log|det| that is off by 1e-6 is caught."""
    torch.manual_seed(0)
    model, prior = MeanFreeMLP(3).to(D64), MeanFreeGaussian(3)
    x0 = prior.sample(5, generator=torch.Generator().manual_seed(1), dtype=D64)
    out = sample_with_logq(model, prior, x0, solver, FixedGrid.uniform_t(0.0, t1, 6),
                           coords=LawsonCoordinates(kind=kind), zeta=zeta,
                           options=LogQOptions(mode="discrete", memory_budget=budget))
    _, _, back_logdet, _ = inverse_logdet(out.tangent_solver, out.solution, prior.dim)
    assert (back_logdet + out.logdet).abs().max().item() <= bound
    cert = roundtrip_certificate(out)
    assert cert.logq_error.max().item() <= bound and cert.x0_error.max().item() <= bound
    wrong = dataclasses.replace(out, logdet=out.logdet + 1e-6, logq=out.logq - 1e-6)
    assert roundtrip_certificate(wrong).logq_error.min().item() >= 0.9e-6
