"""Base distributions p_0 of the flow: standard Gaussian, mean-free (centre-of-mass-free) Gaussian and a standard
Gaussian on a subset of the slots of an event (masked; internal coordinates, where the first atoms have fewer
than three coordinates).

A prior knows its event ``shape`` (e.g. ``(N, 3)``), its intrinsic dimension ``dim`` and an orthonormal
``basis`` [d, dim] of the subspace it lives on (d = prod(shape)); divergences and Jacobian determinants are
taken in that basis so that they refer to the same measure as ``log_prob``.

Normalisation of the mean-free prior: the density is w.r.t. the Lebesgue measure of the (N-1)*3-dimensional
subspace {sum_a x_a = 0} in orthonormal coordinates (the ambient Euclidean metric restricted to it), i.e.
``log p(x) = -|x|^2 / 2 - dim/2 * log(2 pi)`` with dim = 3(N-1). Any other convention (e.g. d instead of dim in
the normaliser, or the coordinates of N-1 particles) differs by a constant; a constant shift of every log q shifts
every log-weight equally, which cancels in self-normalised weights, so SNIS estimates and the ESS are unchanged.
The masked prior is the standard normal of the ``dim = mask.sum()`` valid slots; its support is the coordinate
subspace where the invalid slots are 0, so its basis is the identity columns of the valid slots.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def helmert_basis(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """Orthonormal basis [n, n-1] of the sum-zero subspace of R^n (columns of the Helmert matrix)."""
    if n < 2:
        raise ValueError(f"a sum-zero subspace needs n >= 2 (got n={n})")
    h = torch.zeros(n, n - 1, dtype=torch.float64)
    for j in range(1, n):
        h[:j, j - 1] = 1.0
        h[j, j - 1] = -float(j)
        h[:, j - 1] /= math.sqrt(j * (j + 1))
    return h.to(dtype=dtype, device=device)


class StandardGaussian:
    """N(0, I) over events of ``shape``; ``dim`` = prod(shape), basis = identity (returned as None)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(int(s) for s in shape)
        self.dim = math.prod(self.shape)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> Tensor:
        """``n`` draws, [n, *shape]."""
        return torch.randn((n, *self.shape), generator=generator, dtype=dtype, device=device)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_0(x) for x [B, *shape] -> [B]."""
        self._check(x)
        sq = x.reshape(x.shape[0], -1).square().sum(-1)
        return -0.5 * sq - 0.5 * self.dim * math.log(2 * math.pi)

    def project(self, x: Tensor) -> Tensor:
        """Orthogonal projection onto the support (identity here)."""
        return x

    def basis(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor | None:
        """Orthonormal basis [d, dim] of the support, or None for the identity."""
        return None

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"expected samples of shape [B, {', '.join(map(str, self.shape))}], got {list(x.shape)}")


class MeanFreeGaussian(StandardGaussian):
    """Standard Gaussian on the centre-of-mass-free subspace of N particles x ``n_dims`` coordinates.

    Events are [N, n_dims] with sum over particles = 0; ``dim`` = (N - 1) * n_dims. ``log_prob`` uses the
    normalisation of that subspace (see the module docstring) and raises if x is not centred.
    """

    def __init__(self, n_particles: int, n_dims: int = 3, tol: float | None = None):
        if n_particles < 2:
            raise ValueError(f"a mean-free prior needs at least 2 particles (got {n_particles})")
        super().__init__((n_particles, n_dims))
        self.n_particles = n_particles
        self.n_dims = n_dims
        self.dim = (n_particles - 1) * n_dims
        self.tol = tol
        self._basis: dict[tuple, Tensor] = {}

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> Tensor:
        """``n`` centred draws [n, N, n_dims]: projecting N(0, I) onto the subspace gives its standard normal."""
        return self.project(super().sample(n, generator, dtype, device))

    def project(self, x: Tensor) -> Tensor:
        """Remove the centroid of every sample: [B, N, n_dims] -> [B, N, n_dims]."""
        return x - x.mean(dim=-2, keepdim=True)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_0(x) on the subspace, x [B, N, n_dims] centred -> [B]."""
        self._check(x)
        tol = self.tol if self.tol is not None else 1e3 * torch.finfo(x.dtype).eps
        scale = x.abs().amax().clamp_min(1.0)
        offset = x.mean(dim=-2).abs().amax()
        if offset > tol * scale:
            raise ValueError(f"mean-free prior: samples are not centred (max |centroid| = {offset.item():.3e})")
        sq = x.reshape(x.shape[0], -1).square().sum(-1)
        return -0.5 * sq - 0.5 * self.dim * math.log(2 * math.pi)

    def basis(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
        """Orthonormal basis [N * n_dims, (N - 1) * n_dims] of the centred subspace (flattened [N, n_dims] layout)."""
        key = (dtype, str(device))
        if key not in self._basis:
            h = helmert_basis(self.n_particles, torch.float64)
            eye = torch.eye(self.n_dims, dtype=torch.float64)
            self._basis[key] = torch.kron(h, eye).to(dtype=dtype, device=device)
        return self._basis[key]


class MaskedGaussian(StandardGaussian):
    """Standard normal on the valid slots of events shaped like ``mask`` (e.g. [N, 3]); invalid slots are 0.

    ``dim`` = number of valid slots. ``log_prob`` reads the valid slots only; ``project`` zeroes the others.
    """

    def __init__(self, mask: Tensor):
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool or mask.ndim < 1:
            raise ValueError(f"MaskedGaussian needs a boolean mask of the event shape, got {mask.dtype} "
                             f"{list(mask.shape)}")
        if not mask.any():
            raise ValueError("MaskedGaussian: the mask has no valid slot")
        super().__init__(tuple(mask.shape))
        self.mask = mask.cpu()
        self.dim = int(mask.sum())
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _tensors(self, dtype: torch.dtype, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
        """(boolean mask, basis [d, dim] in ``dtype``) on ``device``, cached."""
        key = (dtype, str(device))
        if key not in self._cache:
            flat = self.mask.reshape(-1)
            basis = torch.eye(flat.numel(), dtype=dtype)[:, flat]
            self._cache[key] = (self.mask.to(device), basis.to(device))
        return self._cache[key]

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> Tensor:
        """``n`` draws [n, *shape]: N(0, 1) on the valid slots, 0 elsewhere (a full-shape draw, then masked)."""
        return self.project(super().sample(n, generator, dtype, device))

    def project(self, x: Tensor) -> Tensor:
        """Zero the invalid slots: [B, *shape] -> [B, *shape]."""
        return torch.where(self._tensors(x.dtype, x.device)[0], x, torch.zeros((), dtype=x.dtype, device=x.device))

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_0 of the valid slots of x [B, *shape] -> [B] (invalid slots are ignored)."""
        self._check(x)
        sq = self.project(x).reshape(x.shape[0], -1).square().sum(-1)
        return -0.5 * sq - 0.5 * self.dim * math.log(2 * math.pi)

    def basis(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
        """Identity columns of the valid slots, [prod(shape), dim] (flattened row-major layout)."""
        return self._tensors(dtype, device)[1]
