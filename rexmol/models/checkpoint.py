"""Save and load a trained generator: one call gives a ready-to-sample :class:`Generator` (network + space).

Three file kinds load the same way with :func:`load_generator`:
- a *generator file*, format ``rexmol-generator-2`` (``save_generator``; small: EMA weights, the network kind
  (``dit`` | ``hollow``) with its config, the space (:mod:`rexmol.models.space`: kind, and for internal
  coordinates the Z-matrix and the standardisation) and metadata);
- an older format-1 generator file (``rexmol-generator-1``: a Cartesian DiT and its data scale);
- a Lightning checkpoint (``.ckpt`` from ``rexmol train``; the EMA copy inside it is used).

The network is always rebuilt from what the file records: an internal-coordinate network's token order and
valid slots come from the stored Z-matrix, never from a Z-matrix rebuilt from today's code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rexmol.models.dit import AtomDiT, DiTConfig
from rexmol.models.hollow import HollowConfig, HollowTransformer
from rexmol.models.space import CartesianSpace, InternalSpace, space_from_dict

FORMAT = "rexmol-generator-2"
FORMAT_1 = "rexmol-generator-1"
OUTPUT_KINDS = ("velocity", "data", "noise")
NETWORKS = ("dit", "hollow")
Space = CartesianSpace | InternalSpace


@dataclass
class Generator:
    """A trained network with its space: everything a sampler needs.

    ``model(x, t)``: ``x`` [B, N, 3] model coordinates, ``t`` [B] or scalar (0 noise, 1 data) -> [B, N, 3]: the
    ``output_kind`` prediction (velocity dx/dt, data D, or noise eps) on the prior's support.
    ``space.decode(x) -> (x_nm, log|det dx_nm/dx| [B], flags [B])``; ``prior`` = ``space.prior``.
    """

    model: nn.Module
    space: Space
    system_name: str
    network: str = "dit"
    output_kind: str = "velocity"
    sigma_min: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prior(self):
        """The flow's base distribution in model coordinates (mean-free or masked Gaussian)."""
        return self.space.prior

    @property
    def coordinates(self) -> str:
        return self.space.kind

    @property
    def n_atoms(self) -> int:
        return self.space.n_atoms

    @property
    def dim(self) -> int:
        return 3 * self.space.n_atoms

    @property
    def scale(self) -> float:
        """nm per model unit of a Cartesian generator (ValueError for other spaces)."""
        if not isinstance(self.space, CartesianSpace):
            raise ValueError(f"a {self.space.kind}-coordinate generator has no Cartesian scale; use gen.space.decode")
        return self.space.scale

    @property
    def system(self):
        """The :class:`rexmol.systems.System` the model was trained on."""
        from rexmol.systems import load_system

        return load_system(self.system_name)

    def to(self, *args: Any, **kwargs: Any) -> Generator:
        """Move/convert the network (``gen.to(torch.float64)``); returns ``self``. The space follows the dtype
        and device of whatever it decodes."""
        self.model.to(*args, **kwargs)
        return self

    def to_nm(self, x: Tensor, branches: Tensor | None = None) -> Tensor:
        """Model coordinates -> nm (Cartesian: same shape; internal: [B, N, 3] in the canonical frame, with the
        symmetric rotors' ``branches`` if it has any, see ``space.draw_branches``)."""
        if isinstance(self.space, CartesianSpace):
            return x * self.space.scale
        return self.space.decode(x, branches)[0]

    def from_nm(self, x: Tensor) -> Tensor:
        """Frames in nm [B, N, 3] -> model coordinates [B, N, 3]."""
        return self.space.encode(x)


def network_entry(model: nn.Module) -> dict[str, Any]:
    """What rebuilds ``model``: ``{"kind": "dit"|"hollow", "config": {...}}`` (+ ``"order"`` for hollow)."""
    if isinstance(model, AtomDiT):
        return {"kind": "dit", "config": model.config.to_dict()}
    if isinstance(model, HollowTransformer):
        return {"kind": "hollow", "config": model.config.to_dict(),
                "order": [int(i) for i in np.asarray(torch.as_tensor(model.order).cpu())]}
    raise ValueError(f"cannot save a {type(model).__name__}: expected an AtomDiT or a HollowTransformer")


def build_network(system, network: dict[str, Any], *, mean_free: bool, order=None, mask=None) -> nn.Module:
    """A fresh network for ``system`` from its :func:`network_entry`.

    Hollow: tokens in placement ``order`` [N] (default: the entry's ``"order"``) with valid slots ``mask``
    [N, 3] bool (default all); ``mean_free``: Cartesian (centred output). The DiT is Cartesian only.
    """
    kind = network.get("kind")
    if kind == "dit":
        if not mean_free:
            raise ValueError("the DiT network works in Cartesian coordinates only; use network 'hollow' for "
                             "internal coordinates")
        return AtomDiT.for_system(system, DiTConfig(**network["config"]))
    if kind == "hollow":
        order = np.asarray(network["order"] if order is None else order)
        mask = np.ones((system.n_atoms, 3), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        return HollowTransformer.for_system(system, HollowConfig(**network["config"]), order, mask, mean_free)
    raise ValueError(f"unknown network kind {kind!r}; expected one of {NETWORKS}")


def _network_for(system, network: dict[str, Any], space: Space) -> nn.Module:
    """The network of a stored generator: an internal-coordinate network's tokens come from the stored Z-matrix."""
    if isinstance(space, InternalSpace):
        return build_network(system, network, mean_free=False, order=np.asarray(space.zmatrix.order),
                             mask=np.asarray(space.zmatrix.mask))
    return build_network(system, network, mean_free=True)


def generator_info(model: nn.Module, space: Space, *, system_name: str, output_kind: str = "velocity",
                   sigma_min: float = 0.0, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything of a generator file except the format tag and the weights (also stored in Lightning
    checkpoints as ``checkpoint["rexmol"]``)."""
    if output_kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {output_kind!r}; expected one of {OUTPUT_KINDS}")
    return {"system": system_name, "n_atoms": space.n_atoms, "network": network_entry(model),
            "space": space.to_dict(), "output_kind": output_kind, "sigma_min": float(sigma_min),
            "meta": dict(meta or {})}


def save_generator(
    path: str | Path,
    model: nn.Module,
    *,
    system_name: str,
    space: Space | None = None,
    scale: float | None = None,
    output_kind: str = "velocity",
    sigma_min: float = 0.0,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a format-2 generator file (weights exactly as given, float32 stays float32); returns the path.

    Give the ``space``, or ``scale`` (nm) as a shorthand for a :class:`CartesianSpace`.
    """
    if (space is None) == (scale is None):
        raise ValueError("save_generator needs exactly one of space= or scale=")
    if space is None:
        from rexmol.systems import load_system

        space = CartesianSpace(load_system(system_name).n_atoms, scale)
    payload = {"format": FORMAT, **generator_info(model, space, system_name=system_name, output_kind=output_kind,
                                                  sigma_min=sigma_min, meta=meta),
               "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def _upgrade(info: dict[str, Any]) -> dict[str, Any]:
    """A format-1 record (Cartesian DiT: ``model_config`` + ``scale``) in the format-2 layout."""
    if "network" in info:
        return info
    return {**info, "network": {"kind": "dit", "config": info["model_config"]},
            "space": {"kind": "cartesian", "n_atoms": info["n_atoms"], "scale": info["scale"]}}


def _generator(info: dict[str, Any], state: dict[str, Tensor], meta: dict[str, Any]) -> Generator:
    from rexmol.systems import load_system

    system = load_system(info["system"])
    if info.get("n_atoms") is not None and info["n_atoms"] != system.n_atoms:
        raise ValueError(f"checkpoint is for {info['n_atoms']} atoms but system {info['system']!r} has "
                         f"{system.n_atoms}")
    space = space_from_dict(info["space"])
    model = _network_for(system, info["network"], space)
    model.load_state_dict(state)
    return Generator(model.eval().requires_grad_(False), space, info["system"], info["network"]["kind"],
                     info["output_kind"], info["sigma_min"], meta)


def load_generator(path: str | Path, map_location: str | torch.device = "cpu") -> Generator:
    """Load a generator file (format 1 or 2) or a ``rexmol train`` Lightning checkpoint into a :class:`Generator`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if isinstance(payload, dict) and payload.get("format") in (FORMAT, FORMAT_1):
        return _generator(_upgrade(payload), payload["state_dict"], payload["meta"])
    if isinstance(payload, dict) and "state_dict" in payload and "rexmol" in payload:
        info = _upgrade(payload["rexmol"])
        ema = {k[len("ema."):]: v for k, v in payload["state_dict"].items() if k.startswith("ema.")}
        return _generator(info, ema, {**info.get("meta", {}), "global_step": payload.get("global_step"),
                                      "source": str(path)})
    raise ValueError(f"{path} is neither a rexmol generator file nor a `rexmol train` Lightning checkpoint")
