"""Augmented dynamics (x, ell) of a continuous normalising flow in the solver's Lawson coordinates (docs/design.md §4).

d ell/dt = -div_x v(x, t), so log q(x_t) = log p_0(x_0) + ell(t). With v = a x + b f (the model output f,
``coords.velocity_coeffs``) the divergence on a k-dimensional support is a k + b tr(U^T J_f U), and in Lawson
coordinates ell has weight 1: d ell/dvarsigma = -(dt/dvarsigma)(a k + b tr). For data prediction on the
flow-matching path with a velocity model this is -sigma^2 div v = -sigma (div D - k).
"""
from __future__ import annotations

from torch import Tensor

from rexmol.likelihood.divergence import ExactTrace, Hutchinson, Model
from rexmol.solvers.dynamics import time_vector
from rexmol.solvers.lawson import LawsonCoordinates
from rexmol.solvers.state import State, is_const, per_sample


def support_dim(x: Tensor, basis: Tensor | None) -> int:
    """k: the number of basis columns, or prod(shape) without a basis."""
    return x[0].numel() if basis is None else basis.shape[1]


def check_output(f: Tensor, x: Tensor, t: float) -> None:
    if f.shape != x.shape:
        raise ValueError(f"model returned shape {tuple(f.shape)} for input {tuple(x.shape)} at t={t!r}; expected same")


def log_density_rate(coords: LawsonCoordinates, t: float, k: int, trace: Tensor) -> Tensor:
    """d ell/dvarsigma = -(dt/dvarsigma)(a k + b tr) [B] from the trace of the model output's Jacobian."""
    a, b = coords.velocity_coeffs(t)
    dts = coords.dt_dvarsigma(t)
    return trace * (-dts * b) - dts * a * k


class DivergenceDynamics:
    """State (x [B, *shape], ell [B]), kinds ("x", "one"), with any divergence estimator.

    ``divergence``: :class:`ExactTrace` or :class:`Hutchinson` (``(model, x, t, basis) -> (f, tr)``);
    ``basis``: orthonormal [d, k] basis of the support (the prior's), None for all of R^d.
    """

    kinds = ("x", "one")

    def __init__(self, model: Model, coords: LawsonCoordinates, divergence: ExactTrace | Hutchinson,
                 basis: Tensor | None = None):
        self.model, self.coords, self.divergence, self.basis = model, coords, divergence, basis

    def __call__(self, t: float, state: State) -> State:
        x, _ = state
        f, tr = self.divergence(self.model, x, time_vector(t, x), self.basis)
        check_output(f, x, t)
        c, e = (per_sample(v, x) for v in self.coords.lawson_coeffs(t))
        dx = f * e if is_const(c, 0.0) else x * c + f * e
        return dx, log_density_rate(self.coords, t, support_dim(x, self.basis), tr)
