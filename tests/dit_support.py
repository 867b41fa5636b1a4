"""Shared helpers for the DiT/training tests: tiny MD-format datasets written to a temporary folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from rexmol.systems import load_system


def write_dataset(out: Path, frames: np.ndarray, system: str = "ala3", topology_from: str | None = None,
                  n_val: int = 0) -> Path:
    """An MD dataset in ``out``: one replica holding ``frames`` [F, N, 3] nm; the last ``n_val`` are the val split.

    ``topology_from`` copies another system's PDB (to make an inconsistent dataset).
    """
    from mdtraj.formats import XTCTrajectoryFile

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(load_system(topology_from or system).pdb_path, out / "topology.pdb")
    with XTCTrajectoryFile(str(out / "replica_000.xtc"), "w") as fh:
        fh.write(np.asarray(frames, dtype=np.float32))
    n = len(frames)
    splits = {"train": [[0, 0, n - n_val]], "val": [[0, n - n_val, n]] if n_val else [], "test": []}
    manifest = {"system": system, "topology": "topology.pdb", "frame_interval_ps": 1.0, "total_ns": n / 1000.0,
                "replicas": [{"index": 0, "seed": 0, "trajectory": "replica_000.xtc", "n_frames": n}],
                "splits": splits}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def jittered_frames(n_frames: int, sigma_nm: float = 0.01, seed: int = 0, system: str = "ala3") -> np.ndarray:
    """``n_frames`` copies of the system's reference positions with Gaussian jitter (nm), float32 [F, N, 3]."""
    rng = np.random.default_rng(seed)
    ref = load_system(system).positions
    return (ref[None] + sigma_nm * rng.standard_normal((n_frames, *ref.shape))).astype(np.float32)
