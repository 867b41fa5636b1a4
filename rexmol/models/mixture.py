"""Closed-form flow matching of isotropic Gaussian-mixture data from N(0, I) noise.

Data p_1 = sum_j pi_j N(mu_j, s_j^2 I). On the path x_t = t x_1 + (1 - t) eps every component stays Gaussian,
so the marginal is p_t = sum_j pi_j N(t mu_j, S_j(t)^2 I) with S_j(t)^2 = t^2 s_j^2 + (1 - t)^2, and the marginal
velocity is the responsibility-weighted mean of the component velocities:
v(x, t) = sum_j gamma_j(x, t) [mu_j + (S_j'/S_j)(x - t mu_j)], gamma_j = pi_j N(x; t mu_j, S_j^2) / p_t(x).
The responsibilities integrate to the weights: E_{p_t}[gamma_j] = pi_j exactly (a smooth SNIS test function).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


class GaussianMixtureFlow:
    """``weights`` [J] (positive, summing to 1), ``means`` [J, D], ``stds`` [J] (positive). Samples are [B, D]."""

    def __init__(self, weights: Tensor, means: Tensor, stds: Tensor):
        weights, means, stds = (torch.as_tensor(v, dtype=torch.float64) for v in (weights, means, stds))
        if means.ndim != 2 or weights.shape != means.shape[:1] or stds.shape != weights.shape:
            raise ValueError(f"need weights [J], means [J, D], stds [J]; got {list(weights.shape)}, "
                             f"{list(means.shape)}, {list(stds.shape)}")
        if (weights <= 0).any() or abs(float(weights.sum()) - 1.0) > 1e-12 or (stds <= 0).any():
            raise ValueError("mixture weights must be positive and sum to 1, stds positive")
        self.weights, self.means, self.stds = weights, means, stds
        self.dim = means.shape[1]

    def _parts(self, x: Tensor, t: Tensor | float):
        """Per-component log(pi_j N(x; t mu_j, S_j^2)) [B, J], mean t mu_j [B, J, D], S_j^2 [B, J], d/dt S_j^2 / 2."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        mu, s2 = self.means.to(x), self.stds.to(x) ** 2
        var = t * t * s2 + (1 - t) ** 2  # [B, J]
        half_dvar = t * s2 - (1 - t)  # S S' = (1/2) d var/dt
        mean = t[..., None] * mu  # [B, J, D]
        sq = (x[:, None, :] - mean).square().sum(-1)
        logn = -0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var) + torch.log(self.weights.to(x))
        return logn, mean, var, half_dvar

    def log_density(self, x: Tensor, t: Tensor | float) -> Tensor:
        """log p_t(x) [B] for x [B, D]."""
        return torch.logsumexp(self._parts(x, t)[0], dim=-1)

    def responsibilities(self, x: Tensor, t: Tensor | float) -> Tensor:
        """gamma_j(x, t) [B, J]."""
        return torch.softmax(self._parts(x, t)[0], dim=-1)

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        """v(x, t) [B, D]; ``t`` a float or [B]."""
        logn, mean, var, half_dvar = self._parts(x, t)
        gamma = torch.softmax(logn, dim=-1)
        comp = self.means.to(x)[None] + (half_dvar / var)[..., None] * (x[:, None, :] - mean)  # [B, J, D]
        return (gamma[..., None] * comp).sum(1)

    def sample(self, n: int, t: float = 1.0, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> Tensor:
        """n draws from p_t [n, D]."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        var = t * t * self.stds[idx] ** 2 + (1 - t) ** 2
        return (t * self.means[idx] + var.sqrt()[:, None] * eps).to(dtype)

    def model(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The velocity model ``f(x [B, D], t [B])``."""
        return self.velocity


def three_mode_mixture() -> GaussianMixtureFlow:
    """The 3-mode 3-D mixture of ``rexmol sample --model mixture``: weights (0.5, 0.3, 0.2), unequal widths,
    modes about 2.5 apart (narrow enough that the velocity field bends sharply near the data end)."""
    return GaussianMixtureFlow(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
                               torch.tensor([[1.5, 0.0, 0.0], [-1.0, 1.5, 0.0], [-0.5, -1.5, 1.0]]),
                               torch.tensor([0.3, 0.5, 0.2]))
