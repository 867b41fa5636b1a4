"""Hollow atom-token transformer: a velocity field whose exact divergence costs about one forward.

Why: the exact trace of a generic network takes one reverse pass per coordinate (3N of them), which makes exact
log q cost ~100 forwards per step. If the velocity of token i (an atom's three values) is
f_i(x) = tau_i(x_i, h_i, t) with a *conditioner* h_i that does not depend on x_i, then d f_i/d x_i is
d tau_i/d x_i at fixed h_i, and div f = sum_i tr(d tau_i/d x_i): one forward for h plus the Jacobian diagonal of
the small per-token MLP tau, in closed form (HollowNet, Chen & Duvenaud 2019; docs/design.md §8).

Construction (tokens in the placement ``order``; position p holds atom o[p]):

- Two attention streams, each a stack of DiT blocks (adaLN-Zero time conditioning, bonded-hop attention biases).
  The left-to-right stream is strictly causal (position p attends to q <= p) and position q is fed the
  coordinates of the *previous* atom o[q-1]; the right-to-left stream attends to q >= p and position q is fed
  o[q+1]. Both also carry the atom's topology embeddings (no coordinates).
- h_p = LTR_p + RTL_p + an embedding of a *bridge* vector (below), normalised and time-modulated.
- tau_p(u_p) = head(h_p) + W_out silu(W_in u_p * (1 + s(h_p)) + b(h_p)), u_p the atom's own three values.

Hollowness. By induction over depth, LTR position p depends only on the inputs at positions q <= p, which are
coordinates of atoms o[q-1], q - 1 <= p - 1; RTL position p only on atoms o[q+1], q + 1 >= p + 1. No input, at
any depth, is a function of x_{o[p]}, and the bridge (below) excludes it too, so d h_p/d x_{o[p]} = 0 exactly
(tests/test_hollow.py checks it by autograd, and that the non-hollow twin fails it).

Cartesian (``mean_free=True``) needs translation invariance, and the inputs must stay hollow. The LTR input at
p is x_{o[p-1]} - x_{o[p-2]}, the RTL input x_{o[p+1]} - x_{o[p+2]} (0 where an atom is missing), the bridge
x_{o[p+1]} - x_{o[p-1]} links the two groups; none contains x_{o[p]}. tau_i sees u_i = x_i - x_{r(i)} with r(i) a
fixed bonded neighbour (the nearest atom in the bonded graph, ties to the earliest placed). f_i then depends on
x_{r(i)} too, but only through the off-diagonal block d f_i/d x_{r(i)}, which no trace sees: d f_i/d x_i =
d tau_i/d u_i. The output is g - mean(g) = P g. On the centred subspace, with an orthonormal basis U of it
(U U^T = P, U^T P = U^T): tr(U^T J_{Pg} U) = tr(J_g P) = tr J_g - (1/N) sum_{i,j} tr J_{g,ij}, and
sum_j J_{g,ij} e_c is the derivative of g_i along a rigid translation of every atom along axis c, which is 0
because every input of g is a difference of positions. So the divergence on the mean-free subspace is exactly
sum_i tr(d tau_i/d u_i): no correction term (tested against the vjp-loop trace in the Helmert basis).

Internal coordinates (``mean_free=False``, ``mask`` [N, 3] of valid slots): inputs are x * mask (invalid slots
ignored), outputs are 0 at invalid slots, and the divergence sums the valid diagonal entries only.

``hollow=False`` is the non-hollow twin with the same modules: both streams bidirectional, each position fed
its own atom's coordinates (centred when ``mean_free``); it has no structured divergence.

Calls are pure (no in-place ops on inputs, no value-dependent branches): they work under torch.func.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rexmol.models.dit import FEATURE_NAMES, Block, graph_distances, modulate, timestep_embedding

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 32, "depth": 2, "heads": 2, "mlp_ratio": 2, "tau_hidden": 16},
    "small": {"hidden": 128, "depth": 4, "heads": 4, "mlp_ratio": 2, "tau_hidden": 64},
    "base": {"hidden": 256, "depth": 6, "heads": 8, "mlp_ratio": 4, "tau_hidden": 128},
}


@dataclass(frozen=True)
class HollowConfig:
    """Hyperparameters of :class:`HollowTransformer` (``size`` presets: ``tiny``, ``small``, ``base``).

    ``depth`` blocks per stream (two streams); ``tau_hidden``: width of the per-token MLP tau.
    """

    hidden: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    tau_hidden: int = 64
    max_hops: int = 6
    time_frequencies: int = 64
    hollow: bool = True

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        for name in ("hidden", "depth", "heads", "mlp_ratio", "tau_hidden", "max_hops", "time_frequencies"):
            if getattr(self, name) < 1:
                raise ValueError(f"hollow {name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> HollowConfig:
        """Preset ``size`` with any field overridden (``None`` values are ignored)."""
        if size not in SIZES:
            raise ValueError(f"unknown hollow size {size!r}; expected one of {', '.join(SIZES)}")
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown hollow option(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reference_atoms(hops: np.ndarray, order: np.ndarray) -> np.ndarray:
    """[N] for each atom i a fixed other atom r(i): nearest in the bonded graph, ties to the earliest placed."""
    n = len(order)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    ref = np.empty(n, dtype=np.int64)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        ref[i] = min(others, key=lambda j: (hops[i, j], position[j]))
    return ref


def select_blocks(state: dict[str, Tensor], blocks: list[int]) -> dict[str, Tensor]:
    """A hollow network's ``state`` dict reduced to the stream blocks ``blocks`` (strictly increasing indices of
    the source's blocks), renumbered 0, 1, ... with their hop-bias columns: the weights of a network of depth
    ``len(blocks)`` made from a deeper one, for a warm start. Each block is a gated residual update
    (adaLN-Zero), so the result computes what the source computes with the other blocks' gates set to zero."""
    depth = int(state["ltr.hop_bias"].shape[1])
    if not blocks or sorted(set(blocks)) != list(blocks) or blocks[0] < 0 or blocks[-1] >= depth:
        raise ValueError(f"init_blocks {list(blocks)} must be strictly increasing block indices in [0, {depth}) "
                         "of the source network")
    renumber = {old: new for new, old in enumerate(blocks)}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        stream, _, rest = key.partition(".")
        if stream in ("ltr", "rtl") and rest.startswith("blocks."):
            index, _, tail = rest.removeprefix("blocks.").partition(".")
            if int(index) in renumber:
                out[f"{stream}.blocks.{renumber[int(index)]}.{tail}"] = value
        elif stream in ("ltr", "rtl") and rest == "hop_bias":
            out[key] = value[:, list(blocks)].clone()
        else:
            out[key] = value
    return out


class Stream(nn.Module):
    """``depth`` DiT blocks with one additive bias per block (hop table plus the stream's attention mask).

    Parameters only: :meth:`HollowTransformer._conditioner` runs the blocks through :func:`run_block`."""

    def __init__(self, config: HollowConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(config.hidden, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.hop_bias = nn.Parameter(torch.zeros(config.max_hops + 1, config.depth, config.heads))

    def bias(self, hops: Tensor, allowed: Tensor) -> Tensor:
        """[depth, H, N, N] additive attention bias: the hop table at ``hops`` [N, N], -inf where not ``allowed``."""
        block_mask = torch.zeros(allowed.shape, dtype=self.hop_bias.dtype, device=allowed.device)
        return self.hop_bias[hops].permute(2, 3, 0, 1) + block_mask.masked_fill(~allowed, float("-inf"))


def run_block(blk: Block, h: Tensor, c: Tensor, bias: Tensor) -> Tensor:
    """``blk(h, c, bias)`` (:class:`rexmol.models.dit.Block`) with fewer passes over memory: the attention scale
    folded into the query weights, q, k and v as strided views of one projection (no copy), fused multiply-adds
    for the adaLN modulation and the gated residuals. ``h`` [B, N, D], ``c`` [B, D], ``bias`` [1, H, N, N]; equal
    to the block up to round-off."""
    b, n, d = h.shape
    heads = blk.heads
    dh = d // heads
    shift1, scale1, gate1, shift2, scale2, gate2 = blk.ada(c)[:, None].chunk(6, dim=-1)  # [B, 1, D]
    q_scale = torch.cat([h.new_full((d,), 1.0 / math.sqrt(dh)), h.new_ones(2 * d)])
    x = torch.addcmul(shift1, blk.norm1(h), 1.0 + scale1)
    qkv = nn.functional.linear(x, blk.qkv.weight * q_scale[:, None], blk.qkv.bias * q_scale)
    q, k, v = qkv.reshape(b, n, 3, heads, dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, dh] views
    attn = (torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
    h = torch.addcmul(h, gate1, blk.proj(attn))
    return torch.addcmul(h, gate2, blk.mlp(torch.addcmul(shift2, blk.norm2(h), 1.0 + scale2)))


class HollowTransformer(nn.Module):
    """Velocity field over atom tokens with a conditioner blind to each token's own coordinates (module doc).

    ``features``: atom features (:data:`rexmol.models.dit.FEATURE_NAMES`, ints [N]); ``bonds``: (i, j) pairs;
    ``order`` [N]: placement order (a permutation of atom indices); ``mask`` [N, 3] bool: valid slots (all True
    for Cartesian); ``mean_free``: Cartesian centroid-free output (needs an all-True mask).
    """

    def __init__(self, config: HollowConfig, features: dict[str, np.ndarray], bonds: list[tuple[int, int]],
                 order, mask, mean_free: bool):
        super().__init__()
        missing = [k for k in FEATURE_NAMES if k not in features]
        if missing:
            raise ValueError(f"atom features {missing} are missing; got {sorted(features)}")
        n = len(features["element"])
        order = np.array(order, dtype=np.int64)  # copies: a ZMatrix's arrays are read-only, torch buffers are not
        mask = np.array(mask, dtype=bool)
        if order.shape != (n,) or sorted(order.tolist()) != list(range(n)):
            raise ValueError(f"order must be a permutation of the {n} atom indices, got shape {order.shape}")
        if mask.shape != (n, 3):
            raise ValueError(f"mask must be bool [{n}, 3], got shape {mask.shape}")
        if mean_free and not mask.all():
            raise ValueError("mean_free needs an all-True mask (Cartesian coordinates); use mean_free=False for a "
                             "masked (internal-coordinate) layout")
        if n < 3:
            raise ValueError(f"the hollow transformer needs at least 3 atoms, got {n}")
        self.config, self.n_atoms, self.mean_free = config, n, bool(mean_free)
        d = config.hidden
        for name in FEATURE_NAMES:
            values = np.asarray(features[name], dtype=np.int64)
            if values.shape != (n,) or values.min() < 0:
                raise ValueError(f"atom feature {name!r} must be non-negative ints of shape ({n},)")
            self.register_buffer(f"feat_{name}", torch.as_tensor(values[order]))  # by position
            self.add_module(f"emb_{name}", nn.Embedding(int(values.max()) + 1, d))
        hops = graph_distances(n, bonds, config.max_hops)
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.arange(n)
        self.register_buffer("order", torch.as_tensor(order))
        self.register_buffer("inverse", torch.as_tensor(inverse))
        self.register_buffer("mask", torch.as_tensor(mask))
        self.register_buffer("hops", torch.as_tensor(hops[np.ix_(order, order)]))
        self.register_buffer("reference", torch.as_tensor(inverse[reference_atoms(hops, order)[order]]))  # by position
        idx = np.arange(n)
        self.register_buffer("causal", torch.as_tensor(idx[None, :] <= idx[:, None]))  # [p, q]: q <= p
        self.time_mlp = nn.Sequential(nn.Linear(2 * config.time_frequencies, d), nn.SiLU(), nn.Linear(d, d))
        self.ltr_embed, self.rtl_embed, self.bridge_embed = nn.Linear(3, d), nn.Linear(3, d), nn.Linear(3, d)
        self.ltr, self.rtl = Stream(config), Stream(config)
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        w = config.tau_hidden
        self.tau_film = nn.Linear(d, 2 * w)
        self.tau_in = nn.Linear(3, w)
        self.tau_out = nn.Linear(w, 3)
        self.head = nn.Linear(d, 3)
        for layer in (self.final_ada[1], self.head, self.tau_out):  # adaLN-Zero / DiT: velocity 0 at init
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def for_system(cls, system, config: HollowConfig, order, mask, mean_free: bool) -> HollowTransformer:
        """Build for a :class:`rexmol.systems.System` (features and bonds from its topology)."""
        bonds = [(b[0].index, b[1].index) for b in system.topology.bonds()]
        return cls(config, system.atom_features(), bonds, order, mask, mean_free)

    @property
    def has_divergence(self) -> bool:
        """True when :meth:`velocity_and_divergence` is available (the hollow network, not its twin)."""
        return self.config.hollow

    # ---- pieces ---------------------------------------------------------------------------------------------
    def _inputs(self, x: Tensor, t) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        """(x by position [B, N, 3] with invalid slots zeroed, t [B], the caller's shape)."""
        n, shape = self.n_atoms, x.shape
        if x.shape[-1] == 3 and x.dim() >= 2 and x.shape[-2] == n:
            xb = x.reshape(-1, n, 3)
        elif x.shape[-1] == 3 * n:
            xb = x.reshape(-1, n, 3)
        else:
            raise ValueError(f"hollow model expects x [B, {n}, 3] or [B, {3 * n}], got {list(shape)}")
        if not isinstance(t, Tensor):
            t = torch.tensor(float(t), dtype=x.dtype, device=x.device)
        tb = t.to(x.dtype).reshape(-1).expand(xb.shape[0])
        xp = xb[:, self.order] * self.mask[self.order].to(x.dtype)
        return xp, tb, shape

    def _stream_inputs(self, xp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """LTR, RTL and bridge inputs [B, N, 3] by position (module doc); none of position p uses atom o[p]
        when hollow."""
        zero = xp.new_zeros(xp.shape[0], 1, 3)
        prev = torch.cat([zero, xp[:, :-1]], 1)  # atom o[p-1] (0 at p = 0)
        nxt = torch.cat([xp[:, 1:], zero], 1)  # atom o[p+1] (0 at p = N-1)
        if self.mean_free:
            prev2 = torch.cat([zero, zero, xp[:, :-2]], 1)
            nxt2 = torch.cat([xp[:, 2:], zero, zero], 1)
            idx = torch.arange(self.n_atoms, device=xp.device)[None, :, None]
            n = self.n_atoms
            ltr = torch.where(idx >= 2, prev - prev2, 0.0)
            rtl = torch.where(idx <= n - 3, nxt - nxt2, 0.0)
            bridge = torch.where((idx >= 1) & (idx <= n - 2), nxt - prev, 0.0)
            own = xp - xp.mean(dim=1, keepdim=True)
        else:
            ltr, rtl, bridge, own = prev, nxt, nxt - prev, xp
        if not self.config.hollow:
            ltr, rtl = own, own
        return ltr, rtl, bridge

    def _own(self, xp: Tensor) -> Tensor:
        """tau's input u [B, N, 3] by position: the atom's values, relative to r(i) when mean-free."""
        return xp - xp[:, self.reference] if self.mean_free else xp

    def _conditioner(self, xp: Tensor, tb: Tensor) -> tuple[Tensor, Tensor]:
        """(h [B, N, D] by position, tau's FiLM parameters [B, N, 2W]); hollow: h_p independent of x_{o[p]}."""
        c = self.time_mlp(timestep_embedding(tb, self.config.time_frequencies))
        topo = sum(getattr(self, f"emb_{name}")(getattr(self, f"feat_{name}")) for name in FEATURE_NAMES)[None]
        ltr_in, rtl_in, bridge = self._stream_inputs(xp)
        causal = self.causal if self.config.hollow else torch.ones_like(self.causal)
        streams = []
        for stream, embedded, allowed in ((self.ltr, self.ltr_embed(ltr_in), causal),
                                          (self.rtl, self.rtl_embed(rtl_in), causal.T)):
            h, bias = topo + embedded, stream.bias(self.hops, allowed)
            for k, blk in enumerate(stream.blocks):
                h = run_block(blk, h, c, bias[k][None])
            streams.append(h)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        h = modulate(self.final_norm(streams[0] + streams[1] + self.bridge_embed(bridge)), shift, scale)
        return h, self.tau_film(h)

    def _tau_preactivation(self, u: Tensor, film: Tensor) -> tuple[Tensor, Tensor]:
        """(a, g) [B, N, W]: tau's hidden pre-activation a = tau_in(u) * g + b and its FiLM gain g = 1 + s."""
        s, b = film.chunk(2, dim=-1)
        gain = 1.0 + s
        return torch.addcmul(b, self.tau_in(u), gain), gain

    def _tau(self, a: Tensor, h: Tensor) -> Tensor:
        """tau [B, N, 3] by position from its pre-activation ``a`` and the conditioner ``h``."""
        return self.head(h) + self.tau_out(nn.functional.silu(a))

    def _tau_diagonal(self, a: Tensor, gain: Tensor) -> Tensor:
        """d tau_{p,c} / d u_{p,c} [B, N, 3] in closed form: sum_w W_out[c, w] silu'(a_w) g_w W_in[w, c], with
        silu'(a) = sigma(a) (1 + a (1 - sigma(a)))."""
        sig = torch.sigmoid(a)
        slope = sig * torch.addcmul(torch.ones_like(a), a, 1.0 - sig)
        return (slope * gain) @ (self.tau_out.weight.T * self.tau_in.weight)

    def _to_atoms(self, outp: Tensor, shape: tuple[int, ...]) -> Tensor:
        out = outp * self.mask[self.order].to(outp.dtype)
        if self.mean_free:
            out = out - out.mean(dim=1, keepdim=True)
        return out[:, self.inverse].reshape(shape)

    # ---- public ---------------------------------------------------------------------------------------------
    def conditioner(self, x: Tensor, t) -> Tensor:
        """h [B, N, D] indexed by atom: when hollow, h_i does not depend on x_i (for tests and diagnostics)."""
        xp, tb, _ = self._inputs(x, t)
        return self._conditioner(xp, tb)[0][:, self.inverse]

    def forward(self, x: Tensor, t) -> Tensor:
        """``x`` [B, N, 3] | [B, N*3], ``t`` [B] | scalar -> velocity, same shape (0 at invalid slots; mean-free
        when ``mean_free``)."""
        xp, tb, shape = self._inputs(x, t)
        h, film = self._conditioner(xp, tb)
        a, _ = self._tau_preactivation(self._own(xp), film)
        return self._to_atoms(self._tau(a, h), shape)

    def velocity_and_divergence(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """(v like ``x``, div [B]): the exact divergence over the valid slots (mean-free: on the centred
        subspace), from one conditioner pass and the closed-form Jacobian diagonal of tau (the velocity is
        bitwise the one :meth:`forward` returns)."""
        if not self.config.hollow:
            raise TypeError("the non-hollow twin (HollowConfig.hollow=False) has no structured divergence")
        xp, tb, shape = self._inputs(x, t)
        h, film = self._conditioner(xp, tb)
        a, gain = self._tau_preactivation(self._own(xp), film)
        div = (self._tau_diagonal(a, gain) * self.mask[self.order].to(a.dtype)).sum(dim=(1, 2))
        return self._to_atoms(self._tau(a, h), shape), div
