"""DiT over atoms: the flow-matching network the samplers integrate.

One token per atom. A token is the sum of learned embeddings of the atom's topology features (element, atom
name, residue index, residue name, chain position) and a linear embedding of its coordinates. Time enters
through adaLN-Zero (DiT). Attention gets two additive, per-head, per-layer biases: a learned table over the
bonded-graph distance (hops along covalent bonds, clipped) and, optionally, a learned function of the
interatomic distance (Gaussian radial basis). The head returns a 3-vector per atom with the centre of mass
removed, so the flow stays in the mean-free subspace; the input is centred as well (translation invariance).

Call: ``model(x, t)`` with ``x`` [B, N, 3] or [B, N*3] (normalised units, see :mod:`rexmol.models.checkpoint`)
and ``t`` [B] or a scalar; returns the same shape as ``x``. Unbatched ``x`` [N, 3] / [N*3] with scalar ``t`` is
accepted too. The forward is pure (no in-place ops on inputs, no value-dependent Python branches), so it works
under ``torch.func`` (vmap, jvp, vjp, functional_call).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

FEATURE_NAMES = ("element", "atom_name", "residue_index", "residue_name", "chain_position")

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 32, "depth": 2, "heads": 2, "mlp_ratio": 2, "chirality": True, "local_frames": True},
    "small": {"hidden": 128, "depth": 4, "heads": 4, "mlp_ratio": 2, "chirality": True, "local_frames": True},
    "base": {"hidden": 256, "depth": 8, "heads": 8, "mlp_ratio": 4, "chirality": True, "local_frames": True},
}


@dataclass(frozen=True)
class DiTConfig:
    """Hyperparameters of :class:`AtomDiT` (``size`` presets: ``tiny``, ``small``, ``base``)."""

    hidden: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    max_hops: int = 6  # bonded-graph distances >= max_hops (and unbonded pairs) share one bias bucket
    graph_bias: bool = True
    distance_bias: bool = True
    n_rbf: int = 16
    rbf_max: float = 4.0  # largest radial-basis centre, normalised units
    time_frequencies: int = 64
    # signed-volume (handedness) feature of every atom with >= 3 bonded neighbours; the presets switch it on,
    # the False default keeps configs saved before it existed loadable
    chirality: bool = False
    # output also along local frames (two bond directions and their normal) at the atom's own and its
    # lowest-index bonded neighbour's >= 3-bond centre: rotation-equivariant directions, chirality-aware normal
    local_frames: bool = False

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        for name in ("hidden", "depth", "heads", "mlp_ratio", "max_hops", "n_rbf", "time_frequencies"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiT {name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> DiTConfig:
        """Preset ``size`` with any field overridden (``None`` values are ignored)."""
        if size not in SIZES:
            raise ValueError(f"unknown DiT size {size!r}; expected one of {', '.join(SIZES)}")
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown DiT option(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def graph_distances(n_atoms: int, bonds: list[tuple[int, int]], max_hops: int) -> np.ndarray:
    """Shortest-path hop counts [N, N] along bonds, clipped to ``max_hops`` (unconnected pairs get ``max_hops``)."""
    adjacency = [[] for _ in range(n_atoms)]
    for i, j in bonds:
        if not (0 <= i < n_atoms and 0 <= j < n_atoms):
            raise ValueError(f"bond ({i}, {j}) is out of range for {n_atoms} atoms")
        adjacency[i].append(j)
        adjacency[j].append(i)
    hops = np.full((n_atoms, n_atoms), max_hops, dtype=np.int64)
    for source in range(n_atoms):
        hops[source, source] = 0
        frontier, depth = [source], 0
        while frontier and depth < max_hops - 1:
            depth += 1
            nxt = []
            for a in frontier:
                for b in adjacency[a]:
                    if hops[source, b] == max_hops and b != source:
                        hops[source, b] = depth
                        nxt.append(b)
            frontier = nxt
    return hops


def chirality_quads(n_atoms: int, bonds: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Atoms with >= 3 bonded neighbours [K] and, for each, its three lowest-index neighbours [K, 3]."""
    neighbours: list[list[int]] = [[] for _ in range(n_atoms)]
    for i, j in bonds:
        neighbours[i].append(j)
        neighbours[j].append(i)
    centres = [i for i in range(n_atoms) if len(neighbours[i]) >= 3]
    quads = [sorted(neighbours[i])[:3] for i in centres]
    return np.array(centres, dtype=np.int64), np.array(quads, dtype=np.int64).reshape(len(centres), 3)


def frame_anchors(n_atoms: int, bonds: list[tuple[int, int]], centres: np.ndarray) -> np.ndarray:
    """[N, 2] indices into ``centres``: the atom's own centre and its lowest-index bonded centre (-1: none)."""
    position = {int(c): k for k, c in enumerate(centres)}
    neighbours: list[list[int]] = [[] for _ in range(n_atoms)]
    for i, j in bonds:
        neighbours[i].append(j)
        neighbours[j].append(i)
    anchors = np.full((n_atoms, 2), -1, dtype=np.int64)
    for i in range(n_atoms):
        anchors[i, 0] = position.get(i, -1)
        bonded = [position[j] for j in sorted(neighbours[i]) if j in position]
        if bonded:
            anchors[i, 1] = bonded[0]
    return anchors


def timestep_embedding(t: Tensor, n_frequencies: int) -> Tensor:
    """Sinusoidal features [B, 2 n] of ``t`` [B] in [0, 1] (periods from 2*pi/1000 to 2*pi)."""
    freqs = torch.exp(-math.log(1000.0) * torch.arange(n_frequencies, dtype=t.dtype, device=t.device) / n_frequencies)
    angles = 1000.0 * t[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation and an additive attention bias."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_ratio * hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * hidden, hidden)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, h: Tensor, c: Tensor, bias: Tensor) -> Tensor:
        """``h`` [B, N, D], ``c`` [B, D], ``bias`` [B or 1, H, N, N] -> [B, N, D]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        b, n, d = h.shape
        qkv = self.qkv(modulate(self.norm1(h), shift1, scale1))
        q, k, v = qkv.reshape(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, N, dh]
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias
        attn = torch.softmax(scores, dim=-1) @ v
        h = h + gate1[:, None, :] * self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return h + gate2[:, None, :] * self.mlp(modulate(self.norm2(h), shift2, scale2))


class AtomDiT(nn.Module):
    """Velocity (or data/noise prediction) field over the atoms of one molecular system; see the module doc."""

    def __init__(self, config: DiTConfig, features: dict[str, np.ndarray], bonds: list[tuple[int, int]]):
        super().__init__()
        missing = [k for k in FEATURE_NAMES if k not in features]
        if missing:
            raise ValueError(f"atom features {missing} are missing; got {sorted(features)}")
        self.config = config
        n_atoms = len(features["element"])
        self.n_atoms = n_atoms
        d = config.hidden
        for name in FEATURE_NAMES:
            values = np.asarray(features[name], dtype=np.int64)
            if values.shape != (n_atoms,) or values.min() < 0:
                raise ValueError(f"atom feature {name!r} must be non-negative ints of shape ({n_atoms},)")
            self.register_buffer(f"feat_{name}", torch.as_tensor(values))
            self.add_module(f"emb_{name}", nn.Embedding(int(values.max()) + 1, d))
        self.coord_embed = nn.Linear(3, d)
        if config.chirality:
            centres, neighbours = chirality_quads(n_atoms, bonds)
            self.register_buffer("chiral_centres", torch.as_tensor(centres))
            self.register_buffer("chiral_neighbours", torch.as_tensor(neighbours))
            select = torch.zeros(n_atoms, max(len(centres), 1))
            select[centres, torch.arange(len(centres))] = 1.0
            self.register_buffer("chiral_select", select[:, : len(centres)])  # [N, K] one-hot
            self.chiral_embed = nn.Linear(1, d)
            nn.init.zeros_(self.chiral_embed.weight)
            nn.init.zeros_(self.chiral_embed.bias)
        else:
            self.chiral_embed = None
        if config.local_frames:
            centres, neighbours = chirality_quads(n_atoms, bonds)
            anchors = frame_anchors(n_atoms, bonds, centres)
            self.register_buffer("frame_centres", torch.as_tensor(centres))
            self.register_buffer("frame_neighbours", torch.as_tensor(neighbours[:, :2]))
            self.register_buffer("frame_anchor", torch.as_tensor(np.maximum(anchors, 0)))
            self.register_buffer("frame_mask", torch.as_tensor((anchors >= 0).astype(np.float32)))
            self.frame_head = nn.Linear(d, 6)
            nn.init.zeros_(self.frame_head.weight)
            nn.init.zeros_(self.frame_head.bias)
        else:
            self.frame_head = None
        self.time_mlp = nn.Sequential(nn.Linear(2 * config.time_frequencies, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(d, config.heads, config.mlp_ratio) for _ in range(config.depth))
        n_bias = config.depth * config.heads
        self.register_buffer("hops", torch.as_tensor(graph_distances(n_atoms, bonds, config.max_hops)))
        self.hop_bias = nn.Parameter(torch.zeros(config.max_hops + 1, n_bias)) if config.graph_bias else None
        if config.distance_bias:
            width = config.rbf_max / (config.n_rbf - 1) if config.n_rbf > 1 else config.rbf_max
            self.rbf_inv_width = 1.0 / width
            self.register_buffer("rbf_centres", torch.linspace(0.0, config.rbf_max, config.n_rbf) / width)
            self.rbf_bias = nn.Linear(config.n_rbf, n_bias)
            nn.init.zeros_(self.rbf_bias.weight)
            nn.init.zeros_(self.rbf_bias.bias)
        else:
            self.rbf_bias = None
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.head = nn.Linear(d, 3)
        for layer in (self.final_ada[1], self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def for_system(cls, system, config: DiTConfig) -> AtomDiT:
        """Build for a :class:`rexmol.systems.System` (features and bonds from its topology)."""
        bonds = [(b[0].index, b[1].index) for b in system.topology.bonds()]
        return cls(config, system.atom_features(), bonds)

    def _handedness(self, x: Tensor) -> Tensor:
        """Normalised signed volume [B, N] at each atom with >= 3 bonded neighbours (0 elsewhere), in [-1, 1].

        Rotation invariant and odd under reflection: what tells the network a C-alpha's handedness.
        """
        centre = x[:, self.chiral_centres, None, :]  # [B, K, 1, 3]
        v = x[:, self.chiral_neighbours, :] - centre  # [B, K, 3, 3]
        volume = (v[:, :, 0] * torch.linalg.cross(v[:, :, 1], v[:, :, 2], dim=-1)).sum(-1)  # [B, K]
        norms = torch.sqrt(((v * v).sum(-1) + 1e-6).prod(-1))
        return (volume / norms) @ self.chiral_select.T

    def _frame_output(self, x: Tensor, h: Tensor) -> Tensor:
        """Sum over the atom's two anchor frames of learned coefficients times (u1, u2, n), unit-ish vectors."""
        centre = x[:, self.frame_centres, None, :]  # [B, K, 1, 3]
        u = x[:, self.frame_neighbours, :] - centre  # [B, K, 2, 3]
        n = torch.linalg.cross(u[:, :, 0], u[:, :, 1], dim=-1)[:, :, None, :]
        frames = torch.cat([u, n], dim=2)  # [B, K, 3, 3]
        frames = frames / torch.sqrt((frames * frames).sum(-1, keepdim=True) + 1e-3)
        per_atom = frames[:, self.frame_anchor] * self.frame_mask.to(x.dtype)[None, :, :, None, None]
        coeff = self.frame_head(h).reshape(h.shape[0], self.n_atoms, 2, 3, 1)
        return (coeff * per_atom).sum(dim=(2, 3))  # [B, N, 3]

    def _attention_bias(self, x: Tensor) -> Tensor:
        """Additive bias [B or 1, depth, H, N, N] from bonded hops and (optionally) interatomic distances."""
        cfg, n = self.config, self.n_atoms
        bias = x.new_zeros(1, n, n, cfg.depth * cfg.heads)
        if self.hop_bias is not None:
            bias = bias + self.hop_bias[self.hops][None]
        if self.rbf_bias is not None:
            diff = x[:, :, None, :] - x[:, None, :, :]
            dist = torch.sqrt((diff * diff).sum(-1) + 1e-6)  # [B, N, N]
            z = dist[..., None] * self.rbf_inv_width - self.rbf_centres  # centres in units of the width
            rbf = torch.exp(-(z * z))
            bias = bias + self.rbf_bias(rbf)
        return bias.reshape(bias.shape[0], n, n, cfg.depth, cfg.heads).permute(0, 3, 4, 1, 2)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``x`` [B, N, 3] | [B, N*3] | [N, 3] | [N*3], ``t`` [B] | scalar -> same shape as ``x`` (mean-free)."""
        n = self.n_atoms
        shape = x.shape
        if x.dim() == 1 or (x.dim() == 2 and shape == (n, 3)):
            xb = x.reshape(1, n, 3)
        else:
            xb = x.reshape(shape[0], n, 3)
        if not isinstance(t, Tensor):
            t = torch.tensor(float(t), dtype=x.dtype, device=x.device)
        tb = t.to(x.dtype).reshape(-1).expand(xb.shape[0])
        xb = xb - xb.mean(dim=1, keepdim=True)
        h = self.coord_embed(xb)
        if self.chiral_embed is not None:
            h = h + self.chiral_embed(self._handedness(xb)[..., None])
        for name in FEATURE_NAMES:
            h = h + getattr(self, f"emb_{name}")(getattr(self, f"feat_{name}"))[None]
        c = self.time_mlp(timestep_embedding(tb, self.config.time_frequencies))
        bias = self._attention_bias(xb)
        for i, block in enumerate(self.blocks):
            h = block(h, c, bias[:, i])
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        h = modulate(self.final_norm(h), shift, scale)
        out = self.head(h)
        if self.frame_head is not None:
            out = out + self._frame_output(xb, h)
        out = out - out.mean(dim=1, keepdim=True)
        return out.reshape(shape)
