"""Read MD datasets written by ``rexmol md`` (see :mod:`rexmol.md` for the layout)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")

# XTC stores each coordinate as round(x / quantum) with quantum 1e-3 nm (mdtraj's fixed precision of 1000). The
# rounding is invisible in torsions but not in energies: stiff bonds and angles turn a uniform +-0.5 pm error into a
# mean energy rise of ~0.48 kT on tri-alanine (0.5 sigma^2 tr H; docs/design.md §5), so samples are compared with
# MD frames after the same rounding (:func:`as_stored`).
XTC_QUANTUM_NM = 1e-3


def as_stored(x: np.ndarray, quantum_nm: float = XTC_QUANTUM_NM) -> np.ndarray:
    """Coordinates [..., 3] nm exactly as an XTC file returns them, float32: the encoder's float32 x / quantum
    rounded half away from zero, decoded as that integer times float32(quantum) (idempotent; NaN stays NaN)."""
    scaled = np.asarray(x, dtype=np.float32) * np.float32(1.0 / quantum_nm)
    ints = np.trunc(scaled + np.where(scaled >= 0, np.float32(0.5), np.float32(-0.5)).astype(np.float32))
    return ints.astype(np.float32) * np.float32(quantum_nm)


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The dataset's ``manifest.json``; clear errors for a missing or foreign folder."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} is not an MD dataset: {path} is missing (make one with `rexmol md`)")
    manifest = json.loads(path.read_text())
    for key in ("system", "replicas", "splits", "topology"):
        if key not in manifest:
            raise ValueError(f"{path} is not a rexmol MD manifest: key {key!r} is missing")
    return manifest


def load_frames(data_dir: str | Path, split: str, max_frames: int | None = None, stride: int = 1) -> np.ndarray:
    """Frames of one split as float32 [F, N, 3] in nm (blocks in manifest order; ``stride`` within each block).

    ``max_frames`` keeps an evenly spaced subset of at most that many frames (for a capped test set).
    """
    import mdtraj

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    top = str(data_dir / manifest["topology"])
    blocks = manifest["splits"][split]
    if not blocks:
        raise ValueError(f"{data_dir}: split {split!r} holds no frames yet")
    by_replica: dict[int, list[tuple[int, int]]] = {}
    for r, lo, hi in blocks:
        by_replica.setdefault(int(r), []).append((int(lo), int(hi)))
    parts = []
    for r, spans in by_replica.items():
        traj_file = data_dir / manifest["replicas"][r]["trajectory"]
        if not traj_file.is_file():
            raise FileNotFoundError(f"{data_dir}: trajectory {traj_file.name} named by the manifest is missing")
        n_needed = max(hi for _, hi in spans)
        xyz = mdtraj.load(str(traj_file), top=top).xyz
        if len(xyz) < n_needed:
            raise ValueError(f"{traj_file} holds {len(xyz)} frames but the manifest names frames up to {n_needed}")
        parts += [xyz[lo:hi:stride] for lo, hi in spans]
    frames = np.concatenate(parts).astype(np.float32)
    if max_frames is not None and len(frames) > max_frames:
        frames = frames[np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
    return frames


def dataset_topology(data_dir: str | Path):
    """mdtraj topology of a dataset."""
    import mdtraj

    manifest = load_manifest(data_dir)
    return mdtraj.load_topology(str(Path(data_dir) / manifest["topology"]))
