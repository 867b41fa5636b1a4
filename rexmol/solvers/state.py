"""Solver states: tuples of tensors sharing a leading batch dimension B.

Each component has a Lawson weight kind: ``"x"`` (scaled by w(t), like coordinates or a tangent matrix) or
``"one"`` (weight 1, e.g. a per-sample log-density [B]).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

State = tuple[Tensor, ...]
WEIGHT_KINDS = ("x", "one")


class NonFiniteError(ValueError):
    """A dynamics evaluation returned NaN or inf. ``t``: the time; ``step``: the step index when known."""

    def __init__(self, message: str, t: float, step: int | None = None):
        super().__init__(message)
        self.t, self.step = t, step


def as_state(x: Tensor | Sequence[Tensor]) -> State:
    """A tuple state from one tensor or a sequence of tensors."""
    return (x,) if isinstance(x, Tensor) else tuple(x)


def per_sample(v, like: Tensor):
    """``v`` unchanged when it is a float; a per-sample [B] tensor reshaped to broadcast against ``like`` [B, ...]
    (per-sample step sizes give every sample its own time, weight and Lawson coefficients)."""
    if isinstance(v, Tensor):
        return v.to(like.dtype).reshape(v.shape + (1,) * (like.dim() - 1))
    return v


def is_const(v, value: float) -> bool:
    """True when ``v`` is the float ``value`` (per-sample tensors are never treated as a constant)."""
    return not isinstance(v, Tensor) and v == value


def check_state(state: State, kinds: Sequence[str]) -> None:
    """ValueError unless ``state`` has one tensor per kind, all floating and sharing the batch size."""
    if len(state) != len(kinds):
        raise ValueError(f"state has {len(state)} components but the dynamics expects {len(kinds)} ({kinds})")
    for k in kinds:
        if k not in WEIGHT_KINDS:
            raise ValueError(f"unknown weight kind {k!r}; expected one of {WEIGHT_KINDS}")
    for i, s in enumerate(state):
        if not isinstance(s, Tensor) or not s.is_floating_point() or s.dim() < 1:
            raise ValueError(f"state component {i} must be a floating tensor with a leading batch dim")
    sizes = {s.shape[0] for s in state}
    if len(sizes) != 1:
        raise ValueError(f"state components disagree on the batch size: {[tuple(s.shape) for s in state]}")


def check_derivative(state: State, deriv: State, t: float) -> None:
    """Shape and finiteness checks of a dynamics output against its input state."""
    if len(deriv) != len(state):
        raise ValueError(f"dynamics returned {len(deriv)} components for a {len(state)}-component state")
    for i, (s, d) in enumerate(zip(state, deriv)):
        if d.shape != s.shape:
            raise ValueError(
                f"dynamics component {i} has shape {tuple(d.shape)} but the state has {tuple(s.shape)} (t={t!r})"
            )
        if not bool(torch.isfinite(d).all()):
            raise NonFiniteError(f"non-finite dynamics output in component {i} at t={t!r}", t)
