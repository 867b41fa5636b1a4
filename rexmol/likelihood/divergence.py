"""Divergence of a model's output w.r.t. its input: exact trace (several implementations) and Hutchinson.

A model is ``f(x [B, *shape], t [B]) -> [B, *shape]`` and must be *per-sample independent* (sample b of the
output depends only on sample b of the input; true of the DiT and of any model in eval mode without
cross-sample operations). Then one vector-Jacobian (or Jacobian-vector) product whose direction is the same
vector for every sample yields that row (column) of all B per-sample Jacobians at once, and d such products give
the exact trace. Everything is taken in an orthonormal ``basis`` U [d, k] of the support of the flow (None =
identity, k = d): the trace returned is tr(U^T J U) and :meth:`ExactTrace.jacobian` returns U^T J U [B, k, k].
For the mean-free prior (k = d - 3) this is the divergence on the centred subspace, as the density needs.

Exact implementations (``ExactTrace.METHODS``):

- ``vjp-loop``: one autograd forward with the input requiring grad, then one ``autograd.grad`` per direction.
- ``vjp-vmap``: ``torch.func.vjp`` once, the pull-back vmapped over chunks of directions.
- ``jvp-vmap``: ``torch.func.jvp`` (forward mode) vmapped over chunks of directions; needs forward-AD formulas
  for every op (e.g. CPU ``scaled_dot_product_attention`` has none, then the method is skipped).
- ``vjp-batch``: the directions become extra batch entries (x repeated c times, one forward and one backward per
  chunk): more arithmetic, far fewer dispatches — the fastest for small models such as closed-form fields.

- ``structured``: the model's own ``velocity_and_divergence(x, t) -> (f, div)`` (a hollow network,
  :mod:`rexmol.models.hollow`, also through :class:`rexmol.models.precision.CastModel`): exact, about one
  forward. Valid only when the basis spans exactly the model's valid space (identity columns of its ``mask``, or
  the centred subspace for a ``mean_free`` model), which is checked on every call (U U^T R = R for a fixed
  pseudo-random R in that space, and k = its dimension; O(d k), negligible). ``auto`` picks it whenever it
  applies, without probing. Only the trace has this shortcut: :meth:`ExactTrace.jacobian` (the discrete-map
  density needs full Jacobian rows) and :meth:`ExactTrace.products` (Hutchinson) always use the reverse/forward
  methods above (probed as for ``auto``), so the discrete mode costs on a hollow model what it costs on any
  network of the same forward cost.

All other methods call an ``nn.Module`` through ``torch.func.functional_call`` with *detached* parameters under ``no_grad``, so
no graph towards the weights is built (issue 5 reports vmap(jacrev) over a module whose parameters require grad
at 100 s and 22 GB per 256 samples, against 12 s for a vjp loop). ``method="auto"`` times each on the actual
input with a short probe and caches the winner per (model, shape, dtype, device, k, quantity). Chunks of
directions are bounded by ``memory_budget`` bytes using the activation size of one forward, measured once per key.

Hutchinson: tr ~ (1/K) sum_p (U e_p)^T J (U e_p) with K Rademacher or Gaussian probes e_p in R^k drawn from a
seeded generator on first use and then kept: noise is fixed within one solve, and a new estimator with the same
seed (the backward pass) draws the same noise. exp of a Hutchinson estimate is a *biased* estimate of the
density ratio, so importance weights need the exact trace.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from rexmol.models.precision import CastModel

Model = Callable[[Tensor, Tensor], Tensor]


def detached(model: Model) -> Model:
    """``model`` as a function of (x, t) whose parameters do not require grad (modules via functional_call)."""
    if not isinstance(model, nn.Module):
        return model
    state = {name: p.detach() for name, p in model.named_parameters()}
    state.update({name: b.detach() for name, b in model.named_buffers()})
    return lambda x, t: functional_call(model, state, (x, t))


class _Linearised:
    """f linearised at (x, t) by one method: ``out`` = f(x, t) and ``apply(V [c, B, *shape]) -> [c, B, *shape]``
    giving J v (``kind == "col"``) or v^T J (``kind == "row"``) for every direction and sample."""

    def __init__(self, method: str, f: Model, x: Tensor, t: Tensor):
        self.method, self._f, self._x, self._t = method, f, x, t
        if method == "vjp-loop":
            self.kind = "row"
            with torch.enable_grad():
                self._xg = x.detach().requires_grad_(True)
                self._outg = f(self._xg, t)
            self.out = self._outg.detach()
        elif method == "vjp-vmap":
            self.kind = "row"
            with torch.no_grad():
                self.out, self._pull = vjp(lambda z: f(z, t), x)
        elif method == "jvp-vmap":
            self.kind = "col"
            self.out = None
        elif method == "vjp-batch":
            self.kind = "row"
            self.out = None
        else:
            raise ValueError(f"unknown exact-trace method {method!r}; choose from {ExactTrace.METHODS}")

    def apply(self, V: Tensor) -> Tensor:
        if self.method == "vjp-loop":
            with torch.enable_grad():
                rows = [torch.autograd.grad(self._outg, self._xg, v, retain_graph=True)[0] for v in V]
            return torch.stack(rows)
        if self.method == "vjp-vmap":
            with torch.no_grad():
                return vmap(self._pull)(V)[0]
        f, x, t = self._f, self._x, self._t
        if self.method == "vjp-batch":
            c = V.shape[0]
            with torch.enable_grad():
                xr = x.detach().expand(c, *x.shape).reshape(c * x.shape[0], *x.shape[1:]).requires_grad_(True)
                out = f(xr, t.repeat(c))
                rows = torch.autograd.grad(out, xr, V.reshape(out.shape))[0]
            if self.out is None:
                self.out = out.detach()[: x.shape[0]]
            return rows.reshape(V.shape)
        with torch.no_grad():
            out, cols = vmap(lambda v: jvp(lambda z: f(z, t), (x,), (v,)), out_dims=(None, 0))(V)
        if self.out is None:
            self.out = out
        return cols

    def value(self) -> Tensor:
        if self.out is None:
            with torch.no_grad():
                self.out = self._f(self._x, self._t)
        return self.out


def _directions(basis: Tensor | None, i0: int, i1: int, x: Tensor) -> Tensor:
    """Basis vectors i0..i1-1 as directions [c, B, *shape], the same for every sample (expanded, no copy)."""
    d = x[0].numel()
    if basis is None:
        v = torch.zeros(i1 - i0, d, dtype=x.dtype, device=x.device)
        v[torch.arange(i1 - i0), torch.arange(i0, i1)] = 1.0
    else:
        v = basis[:, i0:i1].T.to(dtype=x.dtype, device=x.device)
    return v.reshape(i1 - i0, 1, *x.shape[1:]).expand(i1 - i0, *x.shape)


def activation_bytes(f: Model, x: Tensor, t: Tensor) -> int:
    """Bytes of the tensors one forward saves for the backward w.r.t. x (a proxy for per-direction memory)."""
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        f(x.detach().requires_grad_(True), t)
    return max(total, x.numel() * x.element_size())


class ExactTrace:
    """Exact divergence tr(U^T J_f U) and projected Jacobian U^T J_f U of a per-sample-independent model.

    ``method``: "auto" (probe once per key and cache the fastest) or one of :attr:`METHODS`.
    ``memory_budget``: bytes allowed for the directions processed at once (default 2 GiB).
    ``chunk``: force the number of directions per chunk (otherwise from the budget; ``vjp-loop`` is always 1 at
    a time but shares one forward).
    """

    METHODS = ("vjp-loop", "vjp-vmap", "jvp-vmap", "vjp-batch")
    STRUCTURED = "structured"
    exact = True

    def __init__(self, method: str = "auto", memory_budget: int = 2 << 30, chunk: int | None = None):
        if method not in ("auto", self.STRUCTURED, *self.METHODS):
            raise ValueError(f"unknown exact-trace method {method!r}; choose 'auto', {self.STRUCTURED!r} or one of "
                             f"{self.METHODS}")
        if memory_budget <= 0:
            raise ValueError(f"memory_budget must be positive bytes, got {memory_budget}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.method, self.memory_budget, self.chunk = method, int(memory_budget), chunk
        self.choices: dict[tuple, str] = {}
        self.probe_seconds: dict[tuple, dict[str, float]] = {}
        self._act: dict[tuple, int] = {}

    # ---- public -------------------------------------------------------------------------------------------
    def __call__(self, model: Model, x: Tensor, t: Tensor, basis: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(f(x, t) [B, *shape], tr(U^T J U) [B]) — output and exact divergence, both without graph."""
        k = self._k(x, basis)
        if self.method in ("auto", self.STRUCTURED):
            reason = structured_incompatibility(model, x, basis)
            if reason is None:
                self.choices[self._key(model, x, k, "trace")] = self.STRUCTURED
                with torch.no_grad():
                    return model.velocity_and_divergence(x, t)
            if self.method == self.STRUCTURED:
                raise ValueError(f"exact-trace method 'structured' does not apply: {reason}; use 'auto'")
        f = detached(model)
        method = self._method(model, f, x, t, basis, "trace")
        lin = _Linearised(method, f, x, t)
        tr = x.new_zeros(x.shape[0])
        for i0, i1 in self._chunks(model, f, x, t, k, method):
            P = _flat_c(lin.apply(_directions(basis, i0, i1, x)))
            if basis is None:
                tr = tr + P[torch.arange(i1 - i0), :, torch.arange(i0, i1)].sum(0)
            else:
                tr = tr + torch.einsum("cbd,dc->b", P, basis[:, i0:i1].to(P))
        return lin.value(), tr

    def jacobian(self, model: Model, x: Tensor, t: Tensor, basis: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(f(x, t) [B, *shape], U^T J U [B, k, k]) — rows/columns come from the same products as the trace."""
        f, k = detached(model), self._k(x, basis)
        method = self._method(model, f, x, t, basis, "jacobian")
        lin = _Linearised(method, f, x, t)
        parts = []
        for i0, i1 in self._chunks(model, f, x, t, k, method):
            P = _flat_c(lin.apply(_directions(basis, i0, i1, x)))
            if basis is not None:
                P = torch.einsum("cbd,dk->cbk", P, basis.to(P))
            parts.append(P)
        J = torch.cat(parts).movedim(0, 1)  # [B, k (direction), k]
        return lin.value(), (J if lin.kind == "row" else J.transpose(1, 2))

    def products(self, model: Model, x: Tensor, t: Tensor, V: Tensor) -> tuple[Tensor, Tensor, str]:
        """(f(x, t), products [c, B, *shape], kind) for per-sample directions V [c, B, *shape]: J v if kind is
        "col", v^T J if "row". Used by Hutchinson (quadratic forms are the same either way)."""
        f = detached(model)
        method = self._method(model, f, x, t, None, "products")
        lin = _Linearised(method, f, x, t)
        c = self._chunk_size(model, f, x, t, V.shape[0], method)
        P = torch.cat([lin.apply(V[i:i + c]) for i in range(0, V.shape[0], c)])
        return lin.value(), P, lin.kind

    # ---- internals ----------------------------------------------------------------------------------------
    @staticmethod
    def _k(x: Tensor, basis: Tensor | None) -> int:
        d = x[0].numel()
        if basis is None:
            return d
        if basis.ndim != 2 or basis.shape[0] != d:
            raise ValueError(f"basis must be [d={d}, k], got {list(basis.shape)}")
        return basis.shape[1]

    def _key(self, model: Model, x: Tensor, k: int, what: str) -> tuple:
        return (id(model), tuple(x.shape), x.dtype, str(x.device), k, what)

    def _act_bytes(self, model: Model, f: Model, x: Tensor, t: Tensor) -> int:
        key = self._key(model, x, 0, "act")
        if key not in self._act:
            self._act[key] = activation_bytes(f, x, t)
        return self._act[key]

    def _chunk_size(self, model: Model, f: Model, x: Tensor, t: Tensor, k: int, method: str) -> int:
        if method == "vjp-loop":
            return k  # one forward shared; directions are processed one at a time anyway
        if self.chunk is not None:
            return min(self.chunk, k)
        act = self._act_bytes(model, f, x, t)
        return int(max(1, min(k, (self.memory_budget - act) // (2 * act))))

    def _chunks(self, model, f, x, t, k: int, method: str) -> list[tuple[int, int]]:
        c = self._chunk_size(model, f, x, t, k, method)
        return [(i, min(i + c, k)) for i in range(0, k, c)]

    def _method(self, model: Model, f: Model, x: Tensor, t: Tensor, basis: Tensor | None, what: str) -> str:
        if self.method not in ("auto", self.STRUCTURED):  # structured: only the trace; otherwise probe
            return self.method
        key = self._key(model, x, self._k(x, basis), what)
        if key not in self.choices:
            self.choices[key], self.probe_seconds[key] = self._probe(model, f, x, t, basis)
        return self.choices[key]

    def _probe(self, model, f, x, t, basis) -> tuple[str, dict[str, float]]:
        """Time each method on the first few directions (minimum of two round-robin rounds; CPU time when
        single-threaded, see :func:`_clock`); the fastest wins."""
        k = self._k(x, basis)
        n = min(k, max(4, min(16, max(self._chunk_size(model, f, x, t, k, m) for m in ("vjp-vmap", "jvp-vmap")))))
        seconds: dict[str, float] = {}
        errors: dict[str, str] = {}
        for _ in range(2):  # round robin (a load change hits every method), the minimum of two rounds
            for method in self.METHODS:
                if method in errors:
                    continue
                try:
                    start = _clock()
                    lin = _Linearised(method, f, x, t)
                    c = self._chunk_size(model, f, x, t, n, method)
                    for i0 in range(0, n, c):
                        lin.apply(_directions(basis, i0, min(i0 + c, n), x))
                    lin.value()
                    seconds[method] = min(seconds.get(method, float("inf")), _clock() - start)
                except (NotImplementedError, RuntimeError) as err:  # no forward-AD / batching rule for some op
                    errors[method] = f"{type(err).__name__}: {err}"
                    seconds.pop(method, None)
        if not seconds:
            raise RuntimeError(f"no exact-trace method works for this model: {errors}")
        return min(seconds, key=seconds.get), seconds


def structured_incompatibility(model: Model, x: Tensor, basis: Tensor | None) -> str | None:
    """Why ``model.velocity_and_divergence`` cannot give tr(U^T J U) for this ``basis`` (None: it can).

    It can when the model (or the model a :class:`CastModel` wraps) has it and U spans exactly the model's valid
    space: the slots of its ``mask`` [N, 3], centred over atoms when ``mean_free``.
    """
    inner = model.model if isinstance(model, CastModel) else model
    if not callable(getattr(model, "velocity_and_divergence", None)) or not getattr(inner, "has_divergence", True):
        return "the model has no velocity_and_divergence"
    mask = getattr(inner, "mask", None)
    if mask is None or tuple(x.shape[1:]) != tuple(mask.shape):
        return f"the model's mask does not match inputs of shape {list(x.shape[1:])}"
    mean_free = bool(getattr(inner, "mean_free", False))
    dim = int(mask.sum()) - (3 if mean_free else 0)
    if basis is None:
        return None if (bool(mask.all()) and not mean_free) else "the identity basis is not the model's valid space"
    if basis.shape[1] != dim:
        return f"the basis has {basis.shape[1]} columns but the model's valid space has dimension {dim}"
    g = torch.Generator(device="cpu").manual_seed(0)
    r = torch.randn(tuple(mask.shape), generator=g, dtype=torch.float64).to(basis) * mask.to(basis)
    if mean_free:
        r = r - r.mean(dim=0, keepdim=True)
    r = r.reshape(-1)
    off = (basis @ (basis.T @ r) - r).abs().max()
    if off > 1e3 * torch.finfo(basis.dtype).eps * r.abs().max():
        return f"the basis does not span the model's valid space (|U U^T R - R| = {off.item():.2e})"
    return None


def _clock() -> float:
    """CPU time of this process when torch runs single-threaded on CPU (robust on a shared machine), else wall."""
    if torch.get_num_threads() == 1 and not torch.cuda.is_initialized():
        return time.process_time()
    return time.perf_counter()


def _flat_c(P: Tensor) -> Tensor:
    """[c, B, *shape] -> [c, B, d]."""
    return P.reshape(P.shape[0], P.shape[1], -1)


class Hutchinson:
    """Unbiased stochastic trace estimate with ``n_probes`` Rademacher or Gaussian probes.

    The probes [n_probes, B, k] are drawn from ``seed`` on first use for a given (B, k, dtype, device) and kept,
    so every evaluation of one solve uses the same noise; a new ``Hutchinson`` with the same seed reproduces
    it (use that for the backward pass). exp(-integral of the estimate) is a biased density-ratio estimate:
    do not build importance weights on it.
    """

    exact = False
    NOISES = ("rademacher", "gaussian")

    def __init__(self, n_probes: int = 1, noise: str = "rademacher", seed: int = 0, method: str = "auto"):
        if n_probes < 1:
            raise ValueError(f"n_probes must be >= 1, got {n_probes}")
        if noise not in self.NOISES:
            raise ValueError(f"unknown Hutchinson noise {noise!r}; choose from {self.NOISES}")
        self.n_probes, self.noise, self.seed, self.method = n_probes, noise, seed, method
        self._probes: dict[tuple, Tensor] = {}
        self._exact = ExactTrace(method)

    def probes(self, batch: int, k: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """The fixed probes [n_probes, batch, k] for this estimator."""
        key = (batch, k, dtype, str(device))
        if key not in self._probes:
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            shape = (self.n_probes, batch, k)
            if self.noise == "gaussian":
                e = torch.randn(shape, generator=g, dtype=torch.float64)
            else:
                e = torch.randint(0, 2, shape, generator=g).to(torch.float64).mul_(2).sub_(1)
            self._probes[key] = e.to(dtype=dtype, device=device)
        return self._probes[key]

    def __call__(self, model: Model, x: Tensor, t: Tensor, basis: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(f(x, t) [B, *shape], estimate of tr(U^T J U) [B])."""
        k = ExactTrace._k(x, basis)
        e = self.probes(x.shape[0], k, x.dtype, x.device)
        V = e if basis is None else torch.einsum("pbk,dk->pbd", e, basis.to(e))
        V = V.reshape(self.n_probes, *x.shape)
        out, P, _ = self._exact.products(model, x, t, V)
        return out, (P * V).reshape(self.n_probes, x.shape[0], -1).sum(-1).mean(0)


def brute_force_jacobian(model: Model, x: Tensor, t: Tensor) -> Tensor:
    """Reference per-sample Jacobian [B, d, d] by ``torch.autograd.functional.jacobian`` one sample at a time."""
    rows = []
    for b in range(x.shape[0]):
        def fb(z: Tensor, b: int = b) -> Tensor:
            return model(z.reshape(1, *x.shape[1:]), t[b:b + 1]).reshape(-1)

        rows.append(torch.autograd.functional.jacobian(fb, x[b].reshape(-1)))
    return torch.stack(rows)
