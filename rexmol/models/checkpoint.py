"""Save and load a trained generator: one call gives a ready-to-sample :class:`Generator`.

Two file kinds load the same way with :func:`load_generator`:
- a *generator file* (``save_generator``; small, EMA weights + metadata; the shipped ``data/<system>/model/``),
- a Lightning checkpoint (``.ckpt`` from ``rexmol train``; the EMA copy inside it is used).

The model works in normalised units: frames centred per frame and divided by :attr:`Generator.scale` (nm).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rexmol.models.dit import AtomDiT, DiTConfig

FORMAT = "rexmol-generator-1"
OUTPUT_KINDS = ("velocity", "data", "noise")


@dataclass
class Generator:
    """A trained DiT with everything a sampler needs.

    ``model(x, t)``: ``x`` [B, N, 3] or [B, N*3] normalised, ``t`` [B] or scalar (0 noise, 1 data) -> same shape
    as ``x``: the ``output_kind`` prediction (velocity dx/dt, data D, or noise eps), mean-free.
    """

    model: AtomDiT
    scale: float  # nm per normalised unit
    system_name: str
    output_kind: str = "velocity"
    sigma_min: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return self.model.n_atoms

    @property
    def dim(self) -> int:
        return 3 * self.model.n_atoms

    @property
    def system(self):
        """The :class:`rexmol.systems.System` the model was trained on."""
        from rexmol.systems import load_system

        return load_system(self.system_name)

    def to(self, *args: Any, **kwargs: Any) -> Generator:
        """Move/convert the model (``gen.to(torch.float64)``); returns ``self``."""
        self.model.to(*args, **kwargs)
        return self

    def to_nm(self, x: Tensor) -> Tensor:
        """Normalised coordinates -> nm (same shape)."""
        return x * self.scale

    def from_nm(self, x: Tensor) -> Tensor:
        """Frames in nm [B, N, 3] -> centred, normalised [B, N, 3]."""
        x = x.reshape(-1, self.n_atoms, 3)
        return (x - x.mean(dim=1, keepdim=True)) / self.scale


def save_generator(
    path: str | Path,
    model: AtomDiT,
    *,
    system_name: str,
    scale: float,
    output_kind: str = "velocity",
    sigma_min: float = 0.0,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a generator file (weights exactly as given, float32 stays float32); returns the path."""
    if output_kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {output_kind!r}; expected one of {OUTPUT_KINDS}")
    if not scale > 0:
        raise ValueError(f"scale must be a positive number of nm, got {scale}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "system": system_name,
        "n_atoms": model.n_atoms,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "scale": float(scale),
        "output_kind": output_kind,
        "sigma_min": float(sigma_min),
        "meta": dict(meta or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def _build(system_name: str, config: dict[str, Any], state: dict[str, Tensor], n_atoms: int | None) -> AtomDiT:
    from rexmol.systems import load_system

    system = load_system(system_name)
    if n_atoms is not None and n_atoms != system.n_atoms:
        raise ValueError(f"checkpoint is for {n_atoms} atoms but system {system_name!r} has {system.n_atoms}")
    model = AtomDiT.for_system(system, DiTConfig(**config))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def load_generator(path: str | Path, map_location: str | torch.device = "cpu") -> Generator:
    """Load a generator file or a ``rexmol train`` Lightning checkpoint into a ready-to-sample :class:`Generator`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        model = _build(payload["system"], payload["model_config"], payload["state_dict"], payload["n_atoms"])
        return Generator(model, payload["scale"], payload["system"], payload["output_kind"], payload["sigma_min"],
                         payload["meta"])
    if isinstance(payload, dict) and "state_dict" in payload and "rexmol" in payload:
        info = payload["rexmol"]
        ema = {k[len("ema."):]: v for k, v in payload["state_dict"].items() if k.startswith("ema.")}
        model = _build(info["system"], info["model_config"], ema, info.get("n_atoms"))
        return Generator(model, info["scale"], info["system"], info["output_kind"], info["sigma_min"],
                         {**info.get("meta", {}), "global_step": payload.get("global_step"), "source": str(path)})
    raise ValueError(f"{path} is neither a rexmol generator file nor a `rexmol train` Lightning checkpoint")
