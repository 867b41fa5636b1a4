"""Evaluate a model in a lower precision than the solver state (mixed precision for reversible solvers).

A Rex step is exactly invertible whatever the model is, as long as the model is a *deterministic* function of its
input: the backward pass re-evaluates the same function at reconstructed states and undoes the same linear
combinations. So the state, the log-density and the tangents can be carried in float64 — which the round trip of
data-kind Lawson coordinates needs near t = 1, where it amplifies round-off by (sigma_0/sigma_N)^2 — while the
network runs in float32 at about a third of the cost. Derivatives (exact trace, tangents) flow through the casts.

What is left of the round-trip error comes from reconstructed states whose float32 cast falls on the other side of
a rounding boundary than in the forward pass. Measured on the ala3 DiT, data-kind Rex to t = 0.999: float32 state
~1e-1, float64 state with a float32 network ~1e-7, all float64 ~1e-10 (tests/test_sampling.py).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class CastModel(nn.Module):
    """``model`` evaluated in ``dtype``: ``f(x, t) = model(x.to(dtype), t.to(dtype)).to(x.dtype)``.

    ``x`` [B, *shape] and ``t`` [B] in the caller's (state) dtype; the output comes back in that dtype.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.model(x.to(self.dtype), t.to(self.dtype)).to(x.dtype)

    @property
    def has_divergence(self) -> bool:
        """True when the wrapped model has a structured divergence (see :meth:`velocity_and_divergence`)."""
        return callable(getattr(self.model, "velocity_and_divergence", None)) and getattr(self.model,
                                                                                        "has_divergence", True)

    def velocity_and_divergence(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The wrapped model's (velocity, exact divergence [B]) evaluated in ``dtype``, returned in x's dtype."""
        if not self.has_divergence:
            raise TypeError(f"{type(self.model).__name__} has no velocity_and_divergence")
        v, div = self.model.velocity_and_divergence(x.to(self.dtype), t.to(self.dtype))
        return v.to(x.dtype), div.to(x.dtype)
