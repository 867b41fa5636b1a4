"""Closed-form flow matching of Gaussian data N(m, s^2 I) from N(0, I) noise (docs/design.md §6).

Path alpha_t = t, sigma_t = 1 - t. The marginal at time t is N(t m, S_t^2 I) with S_t = sqrt(t^2 s^2 + (1-t)^2),
the ODE flow is x_t = t m + S_t x_0 and the velocity is v(x, t) = m + (S_t'/S_t)(x - t m).
Data and noise predictions follow from the path: D = x + (1 - t) v, E = x - t v.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


class GaussianFlow:
    """``mean``: m, a tensor of the per-sample shape (e.g. [d]); ``std``: s > 0 (scalar)."""

    def __init__(self, mean: Tensor, std: float):
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        self.mean, self.std = mean, float(std)

    def _t(self, t: Tensor | float, x: Tensor) -> Tensor:
        """t as a tensor broadcastable against x [B, *shape] (t is a float or [B])."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return t.reshape(t.shape + (1,) * (x.dim() - t.dim())) if t.dim() else t

    def marginal_std(self, t: Tensor | float) -> Tensor | float:
        """S_t = sqrt(t^2 s^2 + (1 - t)^2)."""
        s2 = self.std**2
        if isinstance(t, Tensor):
            return torch.sqrt(t * t * s2 + (1 - t) ** 2)
        return math.sqrt(t * t * s2 + (1 - t) ** 2)

    def marginal_mean(self, t: Tensor | float, x: Tensor) -> Tensor:
        """t m, broadcast like x [B, *shape]."""
        return self._t(t, x) * self.mean.to(x)

    def log_density(self, x: Tensor, t: float, dim: int | None = None) -> Tensor:
        """Closed-form log q_t(x) of the marginal N(t m, S_t^2 I) for x [B, *shape] -> [B].

        ``dim``: dimension of the support (default prod(shape)); for a mean-free prior the data and every
        marginal live on the centred subspace (mean m centred), dim = (N - 1) * 3, and the density is w.r.t. that
        subspace's Lebesgue measure, as in :class:`rexmol.likelihood.priors.MeanFreeGaussian`.
        """
        k = x[0].numel() if dim is None else int(dim)
        var = self.marginal_std(float(t)) ** 2
        sq = (x - self.marginal_mean(float(t), x)).reshape(x.shape[0], -1).square().sum(-1)
        return -0.5 * sq / var - 0.5 * k * math.log(2 * math.pi * var)

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        tt = self._t(t, x)
        s2 = self.std**2
        var = tt * tt * s2 + (1 - tt) ** 2
        rate = (tt * s2 - (1 - tt)) / var  # S'/S
        m = self.mean.to(x)
        return m + rate * (x - tt * m)

    def data_prediction(self, x: Tensor, t: Tensor | float) -> Tensor:
        return x + (1 - self._t(t, x)) * self.velocity(x, t)

    def noise_prediction(self, x: Tensor, t: Tensor | float) -> Tensor:
        return x - self._t(t, x) * self.velocity(x, t)

    def flow(self, x: Tensor, t_from: float, t_to: float) -> Tensor:
        """The exact ODE map from time ``t_from`` to ``t_to``: x_b = b m + (S_b/S_a)(x_a - a m)."""
        m = self.mean.to(x)
        ratio = self.marginal_std(t_to) / self.marginal_std(t_from)
        return t_to * m + ratio * (x - t_from * m)

    def model(self, output: str = "velocity") -> Callable[[Tensor, Tensor], Tensor]:
        """The model ``f(x [B, *shape], t [B])`` of the given output kind."""
        fns = {"velocity": self.velocity, "data": self.data_prediction, "noise": self.noise_prediction}
        if output not in fns:
            raise ValueError(f"unknown output kind {output!r}; expected one of {tuple(fns)}")
        return fns[output]
