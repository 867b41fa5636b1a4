"""Noise schedules of the Gaussian path x_t = alpha_t x_data + sigma_t eps (t = 0 noise, t = 1 data).

Model outputs (velocity v, data prediction D, noise prediction E) are converted by exact affine maps in x and
the output f, returned as coefficient pairs so that divergences and tangents convert the same way:
``velocity_coeffs(t, output) -> (a, b)`` with v = a x + b f (docs/design.md §2).
Every function takes ``t`` as a Python float (float64 arithmetic) or a tensor.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

OUTPUT_KINDS = ("velocity", "data", "noise")


def _lib(t):
    return torch if isinstance(t, torch.Tensor) else math


def check_output_kind(kind: str) -> str:
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown model output kind {kind!r}; expected one of {OUTPUT_KINDS}")
    return kind


class Schedule(ABC):
    """alpha_t, sigma_t on t in [0, 1], with alpha/sigma strictly increasing in t."""

    @abstractmethod
    def alpha(self, t): ...

    @abstractmethod
    def sigma(self, t): ...

    @abstractmethod
    def d_alpha(self, t): ...

    @abstractmethod
    def d_sigma(self, t): ...

    @abstractmethod
    def t_from_ratio(self, r):
        """The t with alpha_t / sigma_t = r (r >= 0)."""

    @abstractmethod
    def t_from_inverse_ratio(self, q):
        """The t with sigma_t / alpha_t = q (q >= 0)."""

    def velocity_coeffs(self, t, output: str):
        """(a, b) with v = a x + b f for a model whose output f is of kind ``output``."""
        check_output_kind(output)
        if output == "velocity":
            return 0.0, 1.0
        al, si, dal, dsi = self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)
        if output == "data":  # v = sigma'/sigma x + (alpha' sigma - sigma' alpha)/sigma D
            return dsi / si, (dal * si - dsi * al) / si
        return dal / al, (dsi * al - dal * si) / al  # noise: v = alpha'/alpha x + (...)/alpha E

    def convert_coeffs(self, t, output: str, target: str):
        """(p, q) with target_prediction = p x + q f for a model whose output f is of kind ``output``."""
        check_output_kind(target)
        if output == target:
            check_output_kind(output)
            return 0.0, 1.0
        a, b = self.velocity_coeffs(t, output)
        if target == "velocity":
            return a, b
        al, si, dal, dsi = self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)
        det = al * dsi - si * dal
        if target == "data":  # D = (sigma' x - sigma v) / det
            px, pv = dsi / det, -si / det
        else:  # E = (alpha v - alpha' x) / det
            px, pv = -dal / det, al / det
        return px + pv * a, pv * b


class FlowMatching(Schedule):
    """The linear (rectified-flow / conditional-OT) path: alpha_t = t, sigma_t = 1 - t."""

    def alpha(self, t):
        return t

    def sigma(self, t):
        return 1 - t

    def d_alpha(self, t):
        return 1.0 if not isinstance(t, torch.Tensor) else torch.ones_like(t)

    def d_sigma(self, t):
        return -1.0 if not isinstance(t, torch.Tensor) else -torch.ones_like(t)

    def t_from_ratio(self, r):
        return r / (1 + r)

    def t_from_inverse_ratio(self, q):
        return 1 / (1 + q)

    def __repr__(self) -> str:
        return "FlowMatching()"


class VP(Schedule):
    """Linear-beta variance-preserving schedule in this time convention (s = 1 - t is diffusion time):
    log alpha_t = -s^2 (beta_max - beta_min)/4 - s beta_min/2, sigma_t = sqrt(1 - alpha_t^2)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"VP needs 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _log_alpha(self, t):
        s = 1 - t
        return -0.25 * s * s * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min

    def alpha(self, t):
        return _lib(t).exp(self._log_alpha(t))

    def sigma(self, t):
        return _lib(t).sqrt(-_lib(t).expm1(2 * self._log_alpha(t)))

    def d_alpha(self, t):
        s = 1 - t
        return self.alpha(t) * (0.5 * s * (self.beta_max - self.beta_min) + 0.5 * self.beta_min)

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def _t_from_log_alpha(self, log_alpha):
        # positive root of (bmax-bmin)/4 s^2 + bmin/2 s + log_alpha = 0, in a cancellation-free form
        b = 0.5 * self.beta_min
        root = _lib(log_alpha).sqrt(b * b - (self.beta_max - self.beta_min) * log_alpha)
        return 1 - (-2 * log_alpha) / (b + root)

    def t_from_ratio(self, r):
        return self._t_from_log_alpha(-0.5 * _lib(r).log1p(1 / (r * r)))

    def t_from_inverse_ratio(self, q):
        return self._t_from_log_alpha(-0.5 * _lib(q).log1p(q * q))

    def __repr__(self) -> str:
        return f"VP(beta_min={self.beta_min}, beta_max={self.beta_max})"
