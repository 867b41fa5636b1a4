"""Dynamics: the right-hand side dy_i/dvarsigma of every state component, in Lawson coordinates.

A dynamics object has ``coords`` (LawsonCoordinates), ``kinds`` (a weight kind "x" | "one" per component)
and is called as ``dynamics(t, state) -> derivatives`` with the un-scaled state (x-space) at time ``t``
(a float shared by the batch, or a per-sample [B] float64 tensor under per-sample step control). Augmented dynamics (log-density, tangents) follow the same protocol.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from rexmol.solvers.lawson import LawsonCoordinates
from rexmol.solvers.state import State, is_const, per_sample

Model = Callable[[Tensor, Tensor], Tensor]


class Dynamics(Protocol):
    coords: LawsonCoordinates
    kinds: tuple[str, ...]

    def __call__(self, t: float, state: State) -> State: ...


def time_vector(t: float | Tensor, x: Tensor) -> Tensor:
    """``t`` (a float or per-sample [B]) as the model's [B] time input, in x's dtype and device."""
    if isinstance(t, Tensor):
        return t.to(dtype=x.dtype, device=x.device).expand(x.shape[0])
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def model_output(model: Model, x: Tensor, t: float) -> Tensor:
    """``model(x, t_vec)`` with a shape check naming both shapes."""
    f = model(x, time_vector(t, x))
    if not isinstance(f, Tensor) or f.shape != x.shape:
        got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(
            f"model returned shape {got} for input of shape {tuple(x.shape)} at t={t!r}; expected the same shape"
        )
    return f


class ModelDynamics:
    """The plain model ODE, one component x [B, *shape]: dy/dvarsigma = c x + e model(x, t)."""

    kinds = ("x",)

    def __init__(self, model: Model, coords: LawsonCoordinates):
        self.model, self.coords = model, coords

    def __call__(self, t: float, state: State) -> State:
        (x,) = state
        f = model_output(self.model, x, t)
        c, e = (per_sample(v, x) for v in self.coords.lawson_coeffs(t))
        return (f * e,) if is_const(c, 0.0) else (x * c + f * e,)
