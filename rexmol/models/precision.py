"""Evaluate a model in a lower precision than the solver state (mixed precision for reversible solvers).

A Rex step is exactly invertible whatever the model is, as long as the model is a *deterministic* function of its
input: the backward pass re-evaluates the same function at reconstructed states and undoes the same linear
combinations. So the state, the log-density and the tangents can be carried in float64 — which the round trip of
data-kind Lawson coordinates needs near t = 1, where it amplifies round-off by (sigma_0/sigma_N)^2 — while the
network runs in float32 at about a third of the cost. Derivatives (exact trace, tangents) flow through the casts.

What is left of the round-trip error comes from reconstructed states whose float32 cast falls on the other side of
a rounding boundary than in the forward pass. Measured on the ala3 DiT, data-kind Rex to t = 0.999: float32 state
~1e-1, float64 state with a float32 network ~1e-7, all float64 ~1e-10 (tests/test_sampling.py).

Deterministic also means: a sample's output must not depend on how many samples are evaluated beside it. Under
per-sample step control the active batch shrinks as samples finish, and the certificate's replay meets other active
sets than the forward solve did. On this project's CPU, float32 products give the rows of a small batch another
kernel than a large one's (the shipped hollow networks, batch of M against 64: with one thread M = 1-3 differ in
the last bits, with two threads the M mod 4 trailing rows of M = 1-11; from 12 rows up every row is bitwise that of
the batch of 64), which left ~1 in 10^3 Rex certificates at ~1e-7 instead of 1e-15. So batches smaller than
``min_batch`` are padded by repeating their last sample. This is a property of the BLAS, measured, not promised:
``tests/test_hollow.py`` checks it on the machine that runs the tests.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


MIN_BATCH = 16  # rows evaluated together at least (module doc: smaller float32 products take other BLAS kernels)


class CastModel(nn.Module):
    """``model`` evaluated in ``dtype``: ``f(x, t) = model(x.to(dtype), t.to(dtype)).to(x.dtype)``.

    ``x`` [B, *shape] and ``t`` [B] in the caller's (state) dtype; the output comes back in that dtype. Batches of
    fewer than ``min_batch`` rows are evaluated padded to ``min_batch`` (the last row repeated), so that a row's
    output does not depend on the batch size (module doc).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, min_batch: int = MIN_BATCH):
        super().__init__()
        self.model, self.dtype, self.min_batch = model, dtype, min_batch

    def _padded(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x, t) cast to ``dtype`` with at least ``min_batch`` rows."""
        n = x.shape[0]
        pad = self.min_batch - n
        if pad > 0 and n > 0:
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
            if t.dim() and t.shape[0] == n:  # per-row times (a scalar or broadcast t stays as it is)
                t = torch.cat([t, t[-1:].expand(pad)])
        return x.to(self.dtype), t.to(self.dtype)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.model(*self._padded(x, t))[: x.shape[0]].to(x.dtype)

    @property
    def has_divergence(self) -> bool:
        """True when the wrapped model has a structured divergence (see :meth:`velocity_and_divergence`)."""
        return callable(getattr(self.model, "velocity_and_divergence", None)) and getattr(self.model,
                                                                                        "has_divergence", True)

    def velocity_and_divergence(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The wrapped model's (velocity, exact divergence [B]) evaluated in ``dtype``, returned in x's dtype."""
        if not self.has_divergence:
            raise TypeError(f"{type(self.model).__name__} has no velocity_and_divergence")
        v, div = self.model.velocity_and_divergence(*self._padded(x, t))
        return v[: x.shape[0]].to(x.dtype), div[: x.shape[0]].to(x.dtype)
