"""Reversible SDE solvers: Euler-Maruyama and ShARK as a stochastic Psi for the Rex coupling (docs/design.md §3).

The reverse-time diffusion SDE of the path x_t = alpha_t x_data + sigma_t eps (t = 0 noise, t = 1 data),
    dx = x dlog(alpha) - 2 (x - alpha D) dlambda + sqrt(2) sigma dB_lambda,   lambda = log(alpha / sigma),
becomes in data-prediction Lawson coordinates y = x / w with weight w = sigma^2 / alpha and time
rho = alpha^2 / sigma^2 the additive-noise SDE
    dy = D(x, t) drho + dW_rho,
with W a standard Brownian motion in rho. ``SDECoordinates`` supplies (rho, w) with the same interface as
``LawsonCoordinates``, so ``ModelDynamics`` gives the drift D and ``RexSolver`` / ``solve`` / ``invert`` run
unchanged. Euler-Maruyama in these coordinates is exactly SDE-DPM-Solver++(1) (SEEDS-1).

``StochasticPsi`` reads W (and the space-time Levy area H for ShARK) from a ``BrownianTree`` with clock rho
and tree time log rho: ``psi(t_n, t_{n+1}, .)`` gets +W_n, the Psi_{-h} call ``psi(t_{n+1}, t_n, .)`` and the
backward pass get -W_n and the same H, with nothing stored per step. Use grids uniform in log rho
(``FixedGrid.uniform_log_varsigma(SDECoordinates(...), t0, t1, n)``): they are dyadic in the tree, and ShARK's
shifted first stage x_n + w_n H stays O(sigma_n) there (a grid uniform in t has a last step over a huge rho
range, where that shift is O(1)).

Singular ends: w is infinite where alpha = 0 (flow matching t = 0) and zero where sigma = 0 (t = 1), so solves
run on [eps, 1 - eps]. Conditioning of the inverse: Rex's one-step Jacobian on (x, x_hat) has determinant
r_n^2, so the backward pass amplifies round-off by about J (w_0 / w_N)^2 (J: contraction of the forward map);
w_0 / w_N is ~1e9 on flow matching [1e-3, 1 - 1e-3] (float64 round trip ~1e-2) and ~64 on [0.2, 0.8] (~1e-13).

Noise prediction is not offered: with w = alpha its SDE is dy = 2 E d(sigma/alpha) + dW_{(sigma/alpha)^2},
drift and noise on different clocks (ShARK's additive-noise tableau does not apply), and r_n > 1 makes Rex's
parasitic mode grow in the forward pass.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from fractions import Fraction as F

from torch import Tensor

from rexmol.solvers.brownian import BrownianTree
from rexmol.solvers.dynamics import Dynamics, Model, ModelDynamics
from rexmol.solvers.princeps import Increment, _combine
from rexmol.solvers.rex import RexSolver
from rexmol.solvers.schedules import FlowMatching, Schedule, check_output_kind
from rexmol.solvers.state import State, check_derivative


class SDECoordinates:
    """Data-prediction Lawson coordinates of the reverse diffusion SDE: rho = (alpha/sigma)^2, w = sigma^2/alpha.

    Same interface as ``LawsonCoordinates`` (``varsigma`` is rho): ``lawson_coeffs(t) -> (c, e)`` gives the
    drift D = c x + e f of a model with output kind ``output``.
    """

    kind = "sde-data"

    def __init__(self, schedule: Schedule | None = None, output: str = "velocity"):
        self.schedule = schedule if schedule is not None else FlowMatching()
        self.output = check_output_kind(output)

    def __repr__(self) -> str:
        return f"SDECoordinates({self.schedule!r}, output={self.output!r})"

    def varsigma(self, t):
        r = self.schedule.alpha(t) / self.schedule.sigma(t)
        return r * r

    def t_of_varsigma(self, rho):
        return self.schedule.t_from_ratio(rho**0.5)

    def weight(self, t):
        return self.schedule.sigma(t) ** 2 / self.schedule.alpha(t)

    def lawson_coeffs(self, t):
        """(c, e) with D = c x + e f; exactly (0, 1) for a data-prediction model."""
        return self.schedule.convert_coeffs(t, self.output, "data")

    def check_time(self, t: float) -> None:
        """ValueError outside [0, 1] or where the weight sigma^2/alpha is infinite or zero (alpha or sigma = 0)."""
        t = float(t)
        if not 0.0 <= t <= 1.0 or math.isnan(t):
            raise ValueError(f"time t={t!r} is outside [0, 1] (t = 0 noise, t = 1 data)")
        hint = f"the reverse SDE in data-prediction coordinates on {self.schedule!r} is singular at t={t!r}"
        fix = "; keep the solve strictly inside, e.g. from t = 1e-3 to t = 1 - 1e-3"
        try:
            values = (self.weight(t), self.varsigma(t), *self.lawson_coeffs(t))
        except ZeroDivisionError:
            raise ValueError(hint + " (alpha or sigma is zero)" + fix) from None
        if not all(math.isfinite(v) for v in values) or not values[0] > 0:
            raise ValueError(hint + f" (weight sigma^2/alpha = {values[0]!r})" + fix)


@dataclass(frozen=True)
class AdditiveSRK:
    """An explicit stochastic RK scheme for dy = F(y) drho + dW (additive noise), stored as exact fractions.

    Stage i: z_i = y + h sum_j a_ij k_j + w_i W + hh_i H, k_i = F(rho + c_i h, z_i); the step is
    h sum_i b_i k_i + W and its error estimate h sum_i (b_i - b_embedded_i) k_i. Stages beyond
    ``solution_stages`` serve the error estimate only.
    """

    name: str
    c: tuple[F, ...]
    a: tuple[tuple[F, ...], ...]
    b: tuple[F, ...]
    w: tuple[F, ...]
    hh: tuple[F, ...]
    b_embedded: tuple[F, ...]
    strong_order: float
    solution_stages: int
    c_f: tuple[float, ...] = field(init=False, repr=False)
    a_f: tuple[tuple[float, ...], ...] = field(init=False, repr=False)
    b_f: tuple[float, ...] = field(init=False, repr=False)
    w_f: tuple[float, ...] = field(init=False, repr=False)
    hh_f: tuple[float, ...] = field(init=False, repr=False)
    b_err_f: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        s = len(self.c)
        if not all(len(v) == s for v in (self.a, self.b, self.w, self.hh, self.b_embedded)):
            raise ValueError(f"SRK {self.name}: c, a, b, w, hh, b_embedded must describe {s} stages")
        if any(len(row) != i or sum(row, F(0)) != self.c[i] for i, row in enumerate(self.a)):
            raise ValueError(f"SRK {self.name}: a must be strictly lower triangular with rows summing to c")
        if sum(self.b, F(0)) != 1 or sum(self.b_embedded, F(0)) != 1:
            raise ValueError(f"SRK {self.name}: b and b_embedded must sum to 1")
        set_ = object.__setattr__
        for name in ("c", "b", "w", "hh"):
            set_(self, f"{name}_f", tuple(float(x) for x in getattr(self, name)))
        set_(self, "a_f", tuple(tuple(float(x) for x in row) for row in self.a))
        set_(self, "b_err_f", tuple(float(b - e) for b, e in zip(self.b, self.b_embedded)))

    @property
    def stages(self) -> int:
        return len(self.c)


def _f(*xs) -> tuple[F, ...]:
    return tuple(F(x) for x in xs)


# Euler-Maruyama; its error estimate is the stochastic-Heun correction h/2 (k_2 - k_1), k_2 taken at the
# Euler-Maruyama end point (one extra evaluation, adaptive steps only).
EULER_MARUYAMA = AdditiveSRK(
    "euler-maruyama", c=_f(0, 1), a=((), _f(1)), b=_f(1, 0), w=_f(0, 1), hh=_f(0, 0),
    b_embedded=_f("1/2", "1/2"), strong_order=1.0, solution_stages=1,
)
# ShARK (Foster, dos Reis & Strange 2023, eq. 6.1): shifted additive-noise RK, strong order 1.5 for additive
# noise with two evaluations; error estimate as in Diffrax (b - b_embedded = (-3/5, 3/5)).
SHARK = AdditiveSRK(
    "shark", c=_f(0, "5/6"), a=((), _f("5/6")), b=_f("2/5", "3/5"), w=_f(0, "5/6"), hh=_f(1, 1),
    b_embedded=_f(1, 0), strong_order=1.5, solution_stages=2,
)
SDE_METHODS = {m.name: m for m in (EULER_MARUYAMA, SHARK)}


def get_sde_method(name: str) -> AdditiveSRK:
    if name not in SDE_METHODS:
        raise ValueError(f"unknown SDE method {name!r}; expected one of {tuple(SDE_METHODS)}")
    return SDE_METHODS[name]


def _check_seed(seed) -> int:
    if seed is None or isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(
            f"reversible SDE solvers need an integer seed (got {seed!r}): the backward pass re-queries the "
            "same Brownian path from it"
        )
    return int(seed)


class StochasticPsi:
    """Psi of an additive-noise SRK ``method`` over ``dynamics`` (drift in ``SDECoordinates``), with the
    Brownian path of ``seed`` on the solve interval ``t_span`` for noise of ``shape`` = x's ``(B, *event)``.

    Same call as ``Princeps``: ``psi(t_from, t_to, state, first_stage=None, with_error=False) -> Increment``,
    h = rho(t_to) - rho(t_from), W = the Brownian increment from t_from to t_to (so -W_n when t_to < t_from),
    H the space-time Levy area (orientation-free). Noise enters component 0 (the coordinates x); further
    components (e.g. a tangent) evolve by their drift alone.

    The path is a ``BrownianTree`` (``self.brownian``) with tree time log rho and clock rho, so grids uniform
    in log rho (``FixedGrid.uniform_log_varsigma(coords, ...)``, the recommended SDE grids) with 2^k steps land
    on tree nodes; other times are resolved to 2^-max_depth of the log-rho span (2^-24 of ~28 for flow
    matching on [1e-3, 1 - 1e-3]: far below any step). Row i of the noise is sample ``sample_offset + i``.
    """

    def __init__(
        self,
        method: AdditiveSRK,
        dynamics: Dynamics,
        *,
        seed: int | None,
        t_span: tuple[float, float],
        shape: tuple[int, ...],
        sample_offset: int = 0,
        max_depth: int = 24,
    ):
        if not isinstance(dynamics.coords, SDECoordinates):
            raise ValueError(f"the SDE drift must use SDECoordinates, got {dynamics.coords!r}")
        self.kinds = tuple(dynamics.kinds)
        if self.kinds[0] != "x":
            raise ValueError(f"the noisy component 0 must have weight kind 'x', got kinds {self.kinds}")
        self.tableau, self.dynamics, self.coords = method, dynamics, dynamics.coords
        seed = _check_seed(seed)
        lo, hi = sorted(float(t) for t in t_span)
        if lo == hi:
            raise ValueError(f"t_span must have two distinct times, got {t_span}")
        self.coords.check_time(lo)
        self.coords.check_time(hi)
        self.t_span = (lo, hi)
        self.brownian = BrownianTree(seed, self._log_rho(lo), self._log_rho(hi), tuple(shape), clock=math.exp,
                                     max_depth=max_depth, sample_offset=sample_offset)

    def __repr__(self) -> str:
        return f"StochasticPsi({self.tableau.name}, {self.coords!r}, seed={self.brownian.seed})"

    def _log_rho(self, t: float) -> float:
        return math.log(float(self.coords.varsigma(t)))

    def tree_time(self, t: float) -> float:
        """The Brownian tree's time log rho(t) of a solver time t inside ``t_span``."""
        lo, hi = self.t_span
        if not lo <= t <= hi:
            raise ValueError(f"time t={t!r} is outside the SDE solver's t_span [{lo}, {hi}] (its Brownian path)")
        tree = self.brownian
        return min(max(self._log_rho(t), tree.t0), tree.t1)  # rounding must not step outside the path

    @property
    def error_order(self) -> int:
        """Exponent for the step controller, 1/(q + 1): the drift part of both estimates is O(h^2)."""
        return 1

    def component_weights(self, t: float) -> tuple[float, ...]:
        w = float(self.coords.weight(t))
        return tuple(w if k == "x" else 1.0 for k in self.kinds)

    def evaluate(self, t: float, state: State) -> State:
        deriv = tuple(self.dynamics(t, state))
        check_derivative(state, deriv, t)
        return deriv

    def _noise(self, t_from: float, t_to: float, x: Tensor) -> tuple[Tensor, Tensor]:
        """(W, H) from t_from to t_to in x's dtype and device."""
        if tuple(x.shape) != self.brownian.shape:
            raise ValueError(
                f"the Brownian path was built for x of shape {self.brownian.shape}, got {tuple(x.shape)}; "
                "build the solver for this batch"
            )
        W, H = self.brownian.increment(self.tree_time(t_from), self.tree_time(t_to))
        return W.to(x), H.to(x)

    def __call__(
        self, t_from: float, t_to: float, state: State, first_stage: State | None = None, with_error: bool = False
    ) -> Increment:
        tab, co = self.tableau, self.coords
        rho0 = float(co.varsigma(t_from))
        h = float(co.varsigma(t_to)) - rho0
        w0 = self.component_weights(t_from)
        y0 = tuple(x if w == 1.0 else x / w for x, w in zip(state, w0))
        dW, dH = self._noise(t_from, t_to, y0[0])
        n_stages = tab.stages if with_error else tab.solution_stages
        stages: list[State] = []
        nfe = 0
        for i in range(n_stages):
            shift = tab.w_f[i] != 0.0 or tab.hh_f[i] != 0.0
            if i == 0 and first_stage is not None and not shift:
                stages.append(tuple(first_stage))  # k_1 = F(y_n) does not depend on the interval
                continue
            ci = tab.c_f[i]
            ti = t_from if ci == 0.0 else t_to if ci == 1.0 else float(co.t_of_varsigma(rho0 + ci * h))
            zi = list(_combine(y0, [h * a for a in tab.a_f[i]], stages)) if i else list(y0)
            if tab.w_f[i] != 0.0:
                zi[0] = zi[0] + tab.w_f[i] * dW
            if tab.hh_f[i] != 0.0:
                zi[0] = zi[0] + tab.hh_f[i] * dH
            wi = self.component_weights(ti)
            stages.append(self.evaluate(ti, tuple(z if w == 1.0 else z * w for z, w in zip(zi, wi))))
            nfe += 1
        inc = list(_combine(None, [h * b for b in tab.b_f[:n_stages]], stages))
        inc[0] = inc[0] + dW
        err = _combine(None, [h * b for b in tab.b_err_f], stages) if with_error else None
        return Increment(increment=tuple(inc), error=err, nfe=nfe, first_stage=stages[0])


SDE_SOLVER_NAMES = ("rex-euler-maruyama", "rex-shark")


def make_sde_solver(
    name: str,
    dynamics: Dynamics | Model,
    *,
    seed: int | None,
    t_span: tuple[float, float],
    shape: tuple[int, ...],
    coords: SDECoordinates | None = None,
    zeta: float = 1.0,
    sample_offset: int = 0,
    max_depth: int = 24,
) -> RexSolver:
    """``rex-euler-maruyama`` or ``rex-shark`` for the reverse SDE over ``t_span`` with noise of ``shape``.

    ``dynamics``: a Dynamics on ``SDECoordinates`` or a bare model ``model(x, t) -> f`` (wrapped with
    ``coords``, default flow matching with velocity output). ``seed`` fixes the Brownian path (required);
    ``shape`` is that of x, ``(B, *event)``; row i uses the path of sample ``sample_offset + i``.
    """
    if name not in SDE_SOLVER_NAMES:
        raise ValueError(f"unknown SDE solver {name!r}; expected one of {SDE_SOLVER_NAMES}")
    method = get_sde_method(name.removeprefix("rex-"))
    if not hasattr(dynamics, "coords"):
        dynamics = ModelDynamics(dynamics, coords if coords is not None else SDECoordinates())
    elif coords is not None and coords is not dynamics.coords:
        raise ValueError("give coords only with a bare model; the dynamics already has its coordinates")
    psi = StochasticPsi(method, dynamics, seed=seed, t_span=t_span, shape=shape, sample_offset=sample_offset,
                        max_depth=max_depth)
    return RexSolver(psi, zeta)
