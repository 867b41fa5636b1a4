"""Solver truths in float64 (issue 3): exact round trips, convergence orders, DDIM equality, scipy agreement,
clear errors. Independent references: the closed-form Gaussian flow (docs/design.md §6), hand-written DDIM and
Euler updates, scipy's DOP853."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from rexmol.models.gaussian import GaussianFlow
from rexmol.solvers import (
    TABLEAUS,
    VP,
    AdaptiveSteps,
    FixedGrid,
    FlowMatching,
    LawsonCoordinates,
    ModelDynamics,
    NonFiniteError,
    Princeps,
    PrincepsSolver,
    RexSolver,
    StepRecord,
    invert,
    make_solver,
    solve,
)

D64 = torch.float64
EMBEDDED = [n for n, t in TABLEAUS.items() if t.b_embedded is not None]


@pytest.fixture(scope="module")
def gauss() -> GaussianFlow:
    return GaussianFlow(torch.tensor([1.0, -0.5, 0.25], dtype=D64), 0.5)


@pytest.fixture(scope="module")
def x0() -> torch.Tensor:
    return torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=D64)


def rex(tableau: str, coords: LawsonCoordinates, model, zeta: float = 1.0) -> RexSolver:
    return RexSolver(Princeps(TABLEAUS[tableau], ModelDynamics(model, coords)), zeta)


def princeps(tableau: str, coords: LawsonCoordinates, model) -> PrincepsSolver:
    return PrincepsSolver(Princeps(TABLEAUS[tableau], ModelDynamics(model, coords)))


# ---------------------------------------------------------------- tableaux and coefficients


@pytest.mark.parametrize("name", list(TABLEAUS))
def test_tableau_quadrature_conditions(name):
    """sum_i b_i c_i^k = 1/(k+1) for k < order (and < embedded order for the embedded weights), exactly
    (Tsit5: to its 85-digit expansions, tolerance 1e-80)."""
    tab = TABLEAUS[name]
    assert tab.tolerance <= Fraction(1, 10**80)
    for weights, order in [(tab.b, tab.order), (tab.b_embedded, tab.embedded_order)]:
        if weights is None:
            continue
        for k in range(order):
            assert abs(sum(b * c**k for b, c in zip(weights, tab.c)) - Fraction(1, k + 1)) <= tab.tolerance


def test_tsit5_float64_views_are_the_published_values():
    """Tsitouras (2011) float64 coefficients as printed in OrdinaryDiffEq.jl's Tsit5 (error weights there are
    bhat - b, the negative of ``b_err_f``)."""
    tab = TABLEAUS["tsit5"]
    assert tab.c_f == (0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0)
    assert tab.a_f[5] == (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
                          -0.028269050394068383)
    assert tab.b_f == (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
                       2.324710524099774, 0.0)
    btilde = (-0.00178001105222577714, -0.0008164344596567469, 0.007880878010261995, -0.1447110071732629,
              0.5823571654525552, -0.45808210592918697, 0.015151515151515152)
    assert tab.b_err_f == pytest.approx([-x for x in btilde], rel=1e-15)  # printed to about 16 digits


@pytest.mark.parametrize("schedule", [FlowMatching(), VP()], ids=["fm", "vp"])
def test_schedule_derivatives_and_inverses(schedule):
    h = 1e-6
    for t in (0.1, 0.37, 0.8):
        assert schedule.d_alpha(t) == pytest.approx((schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h), rel=1e-7)
        assert schedule.d_sigma(t) == pytest.approx((schedule.sigma(t + h) - schedule.sigma(t - h)) / (2 * h), rel=1e-7)
        r = schedule.alpha(t) / schedule.sigma(t)
        assert schedule.t_from_ratio(r) == pytest.approx(t, abs=1e-14)
        assert schedule.t_from_inverse_ratio(1 / r) == pytest.approx(t, abs=1e-14)


@pytest.mark.parametrize("schedule", [FlowMatching(), VP()], ids=["fm", "vp"])
@pytest.mark.parametrize("kind", ["data", "noise", "velocity"])
@pytest.mark.parametrize("output", ["data", "noise", "velocity"])
def test_lawson_coefficients_match_finite_differences(schedule, kind, output):
    """dy/dvarsigma = c x + e f agrees with differencing y = x/w along a path whose velocity is known."""
    co = LawsonCoordinates(schedule, kind, output)
    x_data, noise = 0.7, -1.3  # one conditional path: x_t = alpha x_data + sigma noise, v = alpha' x_data + sigma' noise
    for t in (0.2, 0.5, 0.75):
        x = schedule.alpha(t) * x_data + schedule.sigma(t) * noise
        v = schedule.d_alpha(t) * x_data + schedule.d_sigma(t) * noise
        f = {"velocity": v, "data": x_data, "noise": noise}[output]
        c, e = co.lawson_coeffs(t)
        h = 1e-6

        def y(tt):
            return (schedule.alpha(tt) * x_data + schedule.sigma(tt) * noise) / co.weight(tt)

        dy_dt = (y(t + h) - y(t - h)) / (2 * h)
        assert c * x + e * f == pytest.approx(dy_dt * co.dt_dvarsigma(t), rel=1e-6, abs=1e-9)
        dvs_dt = (co.varsigma(t + h) - co.varsigma(t - h)) / (2 * h)
        assert co.dt_dvarsigma(t) * dvs_dt == pytest.approx(1.0, rel=1e-7)
        assert co.t_of_varsigma(co.varsigma(t)) == pytest.approx(t, abs=1e-13)
        a, b = co.velocity_coeffs(t)
        assert a * x + b * f == pytest.approx(v, rel=1e-12, abs=1e-12)
        p, q = schedule.convert_coeffs(t, output, "data")
        assert p * x + q * f == pytest.approx(x_data, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------- exact inversion

ROUND_TRIP_SETUPS = [("data", 0.0, 0.9), ("velocity", 0.0, 1.0), ("noise", 0.1, 1.0)]


@pytest.mark.parametrize("kind,t0,t1", ROUND_TRIP_SETUPS)
@pytest.mark.parametrize("tableau", list(TABLEAUS))
@pytest.mark.parametrize("zeta", [1.0, 0.9])
def test_rex_round_trip_fixed_grid(gauss, x0, kind, t0, t1, tableau, zeta):
    solver = rex(tableau, LawsonCoordinates(FlowMatching(), kind, "velocity"), gauss.model("velocity"), zeta)
    start = gauss.flow(x0, 0.0, t0)
    sol = solve(solver, start, FixedGrid.uniform_t(t0, t1, 30))
    back = invert(solver, sol)
    assert (back.x - start).abs().max().item() <= 1e-12
    assert (back.aux[0] - start).abs().max().item() <= 1e-12
    assert sol.nfe == back.nfe == 30 * 2 * TABLEAUS[tableau].solution_stages


@pytest.mark.parametrize("kind,t0,t1", ROUND_TRIP_SETUPS)
@pytest.mark.parametrize("tableau", EMBEDDED)
@pytest.mark.parametrize("zeta", [1.0, 0.9])
def test_rex_round_trip_adaptive(gauss, x0, kind, t0, t1, tableau, zeta):
    solver = rex(tableau, LawsonCoordinates(FlowMatching(), kind, "velocity"), gauss.model("velocity"), zeta)
    start = gauss.flow(x0, 0.0, t0)
    tol = {"bosh3": 1e-5, "dopri5": 1e-6, "tsit5": 1e-6}[tableau]  # about 5-30 accepted steps
    sol = solve(solver, start, AdaptiveSteps(t0, t1, rtol=tol, atol=tol))
    back = invert(solver, sol)
    assert sol.accepted == len(sol.record.times) - 1 >= 4
    assert sol.record.times[0] == t0 and sol.record.times[-1] == t1
    assert (back.x - start).abs().max().item() <= 1e-12
    assert (sol.x - gauss.flow(x0, 0.0, t1)).abs().max().item() <= 1e-2


def test_rex_single_step_inverts_to_a_few_ulp(gauss, x0):
    for kind in ("data", "noise", "velocity"):
        solver = rex("rk4", LawsonCoordinates(FlowMatching(), kind, "data"), gauss.model("data"))
        start = gauss.flow(x0, 0.0, 0.3)
        back = invert(solver, solve(solver, start, FixedGrid([0.3, 0.45])))
        ulp = torch.finfo(D64).eps * start.abs().max().item()
        assert (back.x - start).abs().max().item() <= 4 * ulp


def test_rex_round_trip_float32_bound(gauss, x0):
    """float32: velocity coordinates invert to a few ulp; data coordinates amplify round-off by about
    (sigma_0 / sigma_N)^2 (here 100), which is the bound stated in the README."""
    g32, x32 = GaussianFlow(gauss.mean.float(), gauss.std), x0.float()
    ulp = torch.finfo(torch.float32).eps * x32.abs().max().item()
    for kind, bound in (("velocity", 8 * ulp), ("data", 200 * ulp)):
        t1 = 1.0 if kind == "velocity" else 0.9
        for tableau in ("euler", "rk4", "dopri5"):
            solver = rex(tableau, LawsonCoordinates(FlowMatching(), kind, "velocity"), g32.model("velocity"))
            back = invert(solver, solve(solver, x32, FixedGrid.uniform_t(0.0, t1, 30)))
            assert back.x.dtype == torch.float32
            assert (back.x - x32).abs().max().item() <= bound, (kind, tableau)


def test_rex_encodes_data_to_noise_and_back(gauss, x0):
    """Decreasing-t grids (data -> noise) invert exactly too, and decode to the start."""
    solver = rex("dopri5", LawsonCoordinates(FlowMatching(), "data", "velocity"), gauss.model("velocity"))
    data = gauss.flow(x0, 0.0, 0.9)
    enc = solve(solver, data, AdaptiveSteps(0.9, 0.0, rtol=1e-8, atol=1e-8))
    assert enc.record.times[-1] == 0.0
    assert (enc.x - x0).abs().max().item() <= 1e-6
    assert (invert(solver, enc).x - data).abs().max().item() <= 1e-12


def test_step_record_save_load_replays_exactly(gauss, x0, tmp_path):
    solver = rex("dopri5", LawsonCoordinates(FlowMatching(), "data", "velocity"), gauss.model("velocity"))
    sol = solve(solver, x0, AdaptiveSteps(0.0, 0.9, rtol=1e-5, atol=1e-5))
    sol.record.save(tmp_path / "record.json")
    loaded = StepRecord.load(tmp_path / "record.json")
    assert loaded == sol.record
    replay = solve(solver, x0, loaded.grid())
    assert torch.equal(replay.x, sol.x) and torch.equal(replay.aux[0], sol.aux[0])


class GaussianWithLogDensity:
    """Augmented dynamics (x, ell): ell' = -div v = -d S'/S (closed form), weight kind "one"."""

    kinds = ("x", "one")

    def __init__(self, gauss: GaussianFlow, coords: LawsonCoordinates):
        self.gauss, self.coords = gauss, coords

    def __call__(self, t, state):
        x, ell = state
        s2 = self.gauss.std**2
        rate = (t * s2 - (1 - t)) / (t * t * s2 + (1 - t) ** 2)
        c, e = self.coords.lawson_coeffs(t)
        v = self.gauss.velocity(x, t)
        f = {"velocity": v, "data": self.gauss.data_prediction(x, t)}[self.coords.output]
        div = torch.full_like(ell, -x.shape[1] * rate * self.coords.dt_dvarsigma(t))
        return (c * x + e * f, div)


@pytest.mark.parametrize("kind", ["data", "velocity"])
def test_augmented_state_round_trip_and_log_density(gauss, x0, kind):
    """A two-component state (x, ell) goes through the same Rex steps and round-trips exactly;
    ell matches the closed-form log-det of the flow, and only x drives step control by default."""
    coords = LawsonCoordinates(FlowMatching(), kind, "velocity")
    solver = RexSolver(Princeps(TABLEAUS["dopri5"], GaussianWithLogDensity(gauss, coords)))
    ell0 = torch.zeros(x0.shape[0], dtype=D64)
    sol = solve(solver, (x0, ell0), AdaptiveSteps(0.0, 0.9, rtol=1e-8, atol=1e-8))
    exact_ell = -3 * math.log(gauss.marginal_std(0.9) / gauss.marginal_std(0.0))
    assert (sol.state[1] - exact_ell).abs().max().item() <= 1e-7
    back = invert(solver, sol)
    assert (back.state[0] - x0).abs().max().item() <= 1e-12
    assert back.state[1].abs().max().item() <= 1e-12
    both = solve(solver, (x0, ell0), AdaptiveSteps(0.0, 0.9, rtol=1e-8, atol=1e-8, error_components=(0, 1)))
    assert both.record.times != sol.record.times


# ---------------------------------------------------------------- convergence order

ORDER_CASES = [("euler", (20, 40, 80), 0.9), ("midpoint", (20, 40, 80), 1.9), ("heun", (20, 40, 80), 1.9),
               ("rk4", (20, 40, 80), 3.8), ("dopri5", (8, 16, 32), 4.5), ("tsit5", (8, 16, 32), 4.5)]
BOSH3_CASE = ("bosh3", (16, 32, 64), 2.8)  # not yet asymptotic on the Gaussian problem at these steps


@pytest.mark.parametrize("tableau,steps,min_slope", ORDER_CASES)
@pytest.mark.parametrize("family", ["princeps", "rex"])
@pytest.mark.parametrize("kind", ["data", "velocity"])
def test_convergence_order_against_closed_form(gauss, x0, tableau, steps, min_slope, family, kind):
    coords = LawsonCoordinates(FlowMatching(), kind, "velocity")
    make = rex if family == "rex" else princeps
    exact = gauss.flow(x0, 0.0, 0.9)
    errs = []
    for n in steps:
        sol = solve(make(tableau, coords, gauss.model("velocity")), x0, FixedGrid.uniform_t(0.0, 0.9, n))
        errs.append((sol.x - exact).abs().max().item())
    slope = math.log2(errs[-2] / errs[-1])
    assert slope >= min_slope, f"errors {errs}"
    assert errs[-1] > 1e-13  # still above round-off, so the slope is meaningful


def test_convergence_order_nonlinear_field():
    """Orders hold on a nonlinear field too (reference: scipy DOP853 at rtol 1e-13)."""
    def field(x, t):
        return torch.sin(3 * x) + t[:, None] * torch.cos(x)

    x0 = torch.tensor([[0.3, -1.0]], dtype=D64)
    ref = solve_ivp(lambda t, y: np.sin(3 * y) + t * np.cos(y), (0, 1), x0[0].numpy(), method="DOP853",
                    rtol=1e-13, atol=1e-13).y[:, -1]
    coords = LawsonCoordinates(FlowMatching(), "velocity")
    for tableau, steps, min_slope in ORDER_CASES + [BOSH3_CASE]:
        for make in (princeps, rex):
            errs = [abs(solve(make(tableau, coords, field), x0, FixedGrid.uniform_t(0, 1, n)).x[0].numpy() - ref).max()
                    for n in steps]
            assert math.log2(errs[-2] / errs[-1]) >= min_slope, (tableau, make.__name__, errs)


# ---------------------------------------------------------------- Princeps subsumes DDIM / Euler


def test_lawson_euler_is_ddim_on_vp():
    vp = VP()

    def eps_model(x, t):
        return torch.tanh(x) * (1 + t[:, None]) + 0.3 * x

    x0 = torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=D64)
    grid = FixedGrid.uniform_t(0.0, 0.95, 20)
    x = x0
    for a, b in zip(grid.times, grid.times[1:]):  # DDIM: x' = alpha' x0_hat + sigma' eps
        eps = eps_model(x, torch.full((32,), a, dtype=D64))
        x = vp.alpha(b) * (x - vp.sigma(a) * eps) / vp.alpha(a) + vp.sigma(b) * eps
    for kind in ("data", "noise"):
        out = solve(princeps("euler", LawsonCoordinates(vp, kind, "noise"), eps_model), x0, grid).x
        assert (out - x).abs().max().item() <= 1e-14 * x.abs().max().item()


@pytest.mark.parametrize("output", ["velocity", "data", "noise"])
def test_lawson_euler_is_velocity_euler_on_flow_matching(gauss, x0, output):
    grid = FixedGrid.uniform_t(0.05, 0.95, 25)
    x = x0
    for a, b in zip(grid.times, grid.times[1:]):
        x = x + (b - a) * gauss.velocity(x, a)
    for kind in ("data", "noise", "velocity"):
        out = solve(princeps("euler", LawsonCoordinates(FlowMatching(), kind, output), gauss.model(output)), x0, grid).x
        assert (out - x).abs().max().item() <= 1e-14


# ---------------------------------------------------------------- adaptive Dopri5 vs scipy


def test_adaptive_dopri5_matches_scipy_dop853():
    gen = torch.Generator().manual_seed(3)
    w1, b1 = torch.randn(5, 16, generator=gen, dtype=D64), torch.randn(16, generator=gen, dtype=D64)
    w2 = torch.randn(16, 5, generator=gen, dtype=D64) / 4

    def field(x, t):
        return torch.tanh(x @ w1 + b1 + t[:, None]) @ w2 - 0.5 * x

    x0 = torch.randn(4, 5, generator=gen, dtype=D64)
    w1n, b1n, w2n = w1.numpy(), b1.numpy(), w2.numpy()

    def rhs(t, y):
        x = y.reshape(4, 5)
        return (np.tanh(x @ w1n + b1n + t) @ w2n - 0.5 * x).ravel()

    ref = solve_ivp(rhs, (0.0, 1.0), x0.numpy().ravel(), method="DOP853", rtol=1e-12, atol=1e-12).y[:, -1]
    calls = []

    def counted(x, t):
        calls.append(1)
        return field(x, t)

    solver = make_solver("dopri5", counted)
    for tol in (1e-5, 1e-8):
        calls.clear()
        sol = solve(solver, x0, AdaptiveSteps(0.0, 1.0, rtol=tol, atol=tol))
        err = np.abs(sol.x.numpy().ravel() - ref).max()
        assert err <= 10 * tol
        assert sol.nfe == len(calls) == 2 + 6 * (sol.accepted + sol.rejected)  # FSAL: 6 per attempt
    tight = solve(solver, x0, AdaptiveSteps(0.0, 1.0, rtol=1e-10, atol=1e-10, beta=0.0))
    assert np.abs(tight.x.numpy().ravel() - ref).max() <= 1e-9


def test_nonreversible_inverse_integrates_backward(gauss, x0):
    solver = make_solver("rk4", gauss.model("velocity"))
    sol = solve(solver, x0, FixedGrid.uniform_t(0.0, 1.0, 20))
    back = invert(solver, sol)
    assert back.aux is None and back.record.times == sol.record.times[::-1]
    assert 1e-12 < (back.x - x0).abs().max().item() < 1e-5  # approximate, not exact
    adaptive = invert(solver := make_solver("dopri5", gauss.model("velocity")),
                      solve(solver, x0, AdaptiveSteps(0.0, 1.0, rtol=1e-9, atol=1e-9)),
                      AdaptiveSteps(1.0, 0.0, rtol=1e-9, atol=1e-9))
    assert (adaptive.x - x0).abs().max().item() < 1e-7


def test_make_solver_names(gauss):
    m = gauss.model("velocity")
    assert isinstance(make_solver("rex-rk4", m), RexSolver)
    assert make_solver("rex-rk4", m).psi.coords.kind == "data"
    assert make_solver("rk4", m).psi.coords.kind == "velocity"
    assert isinstance(make_solver("princeps-dopri5", m), PrincepsSolver)
    with pytest.raises(ValueError, match="unknown tableau"):
        make_solver("rex-rk9", m)
    with pytest.raises(ValueError, match="unknown solver"):
        make_solver("foo-rk4", m)


# ---------------------------------------------------------------- clear errors


def test_errors_on_bad_inputs(gauss, x0):
    coords = LawsonCoordinates(FlowMatching(), "data", "velocity")
    good = rex("rk4", coords, gauss.model("velocity"))
    with pytest.raises(ValueError, match=r"shape \(32, 2\).*\(32, 3\)"):
        solve(rex("rk4", coords, lambda x, t: x[:, :2]), x0, FixedGrid.uniform_t(0, 0.5, 4))
    with pytest.raises(ValueError, match="singular at t=1.0"):
        solve(good, x0, FixedGrid.uniform_t(0, 1.0, 4))
    with pytest.raises(ValueError, match="singular at t=0.0"):
        solve(rex("rk4", LawsonCoordinates(FlowMatching(), "noise"), gauss.model("velocity")), x0,
              FixedGrid.uniform_t(0, 0.5, 4))
    with pytest.raises(ValueError, match="singular"):
        solve(rex("dopri5", coords, gauss.model("velocity")), x0, AdaptiveSteps(0.0, 1.0))
    with pytest.raises(ValueError, match="singular"):
        FixedGrid.uniform_varsigma(coords, 0.0, 1.0, 10)
    with pytest.raises(ValueError, match="outside"):
        solve(good, x0, FixedGrid([0.0, 1.5]))
    with pytest.raises(ValueError, match="batch size"):
        solve(RexSolver(Princeps(TABLEAUS["rk4"], GaussianWithLogDensity(gauss, coords))),
              (x0, torch.zeros(5, dtype=D64)), FixedGrid.uniform_t(0, 0.5, 4))
    with pytest.raises(ValueError, match="2 components"):
        solve(good, (x0, x0[:, 0]), FixedGrid.uniform_t(0, 0.5, 4))
    with pytest.raises(ValueError, match="strictly"):
        FixedGrid([0.0, 0.5, 0.4])
    with pytest.raises(ValueError, match="zeta"):
        RexSolver(good.psi, 0.0)
    with pytest.raises(ValueError, match="embedded pair"):
        solve(good, x0, AdaptiveSteps(0.0, 0.5))
    with pytest.raises(ValueError, match="varsigma > 0"):
        FixedGrid.uniform_log_varsigma(coords, 0.0, 0.9, 10)


def test_non_finite_output_names_step_and_time(gauss, x0):
    def poisoned(x, t):
        v = gauss.velocity(x, t)
        return v / 0.0 if float(t[0]) > 0.3 else v

    grid = FixedGrid.uniform_t(0.0, 0.5, 5)
    cases = [(rex("rk4", LawsonCoordinates(FlowMatching(), "data"), poisoned), 3, r"t 0\.3 -> 0\.4\).*t=0\.3\d+"),
             (make_solver("euler", poisoned), 4, r"t 0\.4 -> 0\.5\).*t=0\.4")]  # Euler evaluates at t_n only
    for solver, step, where in cases:
        with pytest.raises(NonFiniteError, match=rf"step {step} \({where}") as info:
            solve(solver, x0, grid)
        assert info.value.step == step and 0.3 < info.value.t <= 0.4
    with pytest.raises(NonFiniteError, match="step"):
        solve(make_solver("rex-dopri5", poisoned), x0, AdaptiveSteps(0.0, 0.5))


def test_uniform_grids(gauss):
    coords = LawsonCoordinates(FlowMatching(), "data")
    g = FixedGrid.uniform_varsigma(coords, 0.0, 0.9, 9)
    assert g.times[0] == 0.0 and g.times[-1] == 0.9
    assert np.allclose(np.diff([coords.varsigma(t) for t in g.times]), 1.0)
    lg = FixedGrid.uniform_log_varsigma(coords, 0.1, 0.9, 4)
    assert np.allclose(np.diff(np.log([coords.varsigma(t) for t in lg.times])), math.log(81) / 4)
    assert FixedGrid.uniform_t(0.0, 1.0, 4).times == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert FixedGrid.uniform_t(1.0, 0.0, 2).reversed().times == (0.0, 0.5, 1.0)
