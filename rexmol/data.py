"""LightningDataModule over an MD dataset written by ``rexmol md``.

Frames are centred per frame (centroid subtracted) and kept in nm; the training set's one scalar std
(:attr:`MDDataModule.scale`, nm) is what the LightningModule divides by, so the normalisation lives in one
place (the model's checkpoint). Training batches get an independent uniformly random 3D rotation per frame.

Splits come from the manifest as it is when the module is built (a dataset still being generated keeps
growing; :attr:`MDDataModule.info` records what was read). When the manifest has no validation frames yet
(an early snapshot), the last ``val_fraction`` of the training frames, a contiguous tail, is held out instead.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from rexmol.mddata import dataset_topology, load_frames, load_manifest
from rexmol.systems import load_system


def centre(frames: np.ndarray) -> np.ndarray:
    """Subtract each frame's centroid: [F, N, 3] -> [F, N, 3]."""
    return frames - frames.mean(axis=1, keepdims=True)


def random_rotations(n: int, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None) -> Tensor:
    """``n`` rotation matrices [n, 3, 3], uniform (Haar) on SO(3), from normalised Gaussian quaternions."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=1,
    ).reshape(n, 3, 3)
    return rot.to(dtype)


class FrameDataset(Dataset):
    """In-memory frames [F, N, 3] (float32 tensor); item i is frame i [N, 3]."""

    def __init__(self, frames: np.ndarray):
        self.frames = torch.as_tensor(np.ascontiguousarray(frames, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> Tensor:
        return self.frames[i]


class MDDataModule(L.LightningDataModule):
    """Centred MD frames (nm) of one system; see the module docstring.

    Args:
        data_dir: dataset folder (``manifest.json``, ``topology.pdb``, trajectories).
        system: system name (or folder) the frames must belong to.
        batch_size: frames per training batch (per device).
        num_workers: DataLoader worker processes (0: load in the main process; the data is in memory).
        rotate: random-rotation augmentation of training batches.
        max_train_frames: keep an evenly spaced subset of at most this many training frames (None: all).
        max_val_frames: same for validation.
        val_fraction: tail of the training frames held out when the manifest has no validation split yet.
    """

    def __init__(
        self,
        data_dir: str = "data/ala3",
        system: str = "ala3",
        batch_size: int = 128,
        num_workers: int = 0,
        rotate: bool = True,
        max_train_frames: int | None = None,
        max_val_frames: int | None = 2000,
        val_fraction: float = 0.05,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.data_dir = Path(data_dir)
        self.system = load_system(system)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.rotate = rotate
        self.max_train_frames = max_train_frames
        self.max_val_frames = max_val_frames
        self.val_fraction = val_fraction
        manifest = load_manifest(self.data_dir)
        if manifest["system"] != self.system.name:
            raise ValueError(
                f"dataset {self.data_dir} holds system {manifest['system']!r}, "
                f"but the config asks for {self.system.name!r}"
            )
        n_top = dataset_topology(self.data_dir).n_atoms
        if n_top != self.system.n_atoms:
            raise ValueError(
                f"atom-count mismatch: dataset {self.data_dir} has {n_top} atoms, system {self.system.name!r} has "
                f"{self.system.n_atoms}"
            )
        self._manifest = manifest
        self.train_set: FrameDataset | None = None
        self.val_set: FrameDataset | None = None
        self.scale: float = float("nan")
        self.info: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        """Read the frames (once), centre them, compute :attr:`scale` and :attr:`info`."""
        if self.train_set is not None:
            return
        manifest, n = self._manifest, self.system.n_atoms
        train = load_frames(self.data_dir, "train")
        if train.shape[1:] != (n, 3):
            raise ValueError(
                f"atom-count mismatch: frames in {self.data_dir} are {train.shape[1:]}, system {self.system.name!r} "
                f"needs ({n}, 3)"
            )
        val_source = "manifest"
        if manifest["splits"].get("val"):
            val = load_frames(self.data_dir, "val")
        else:
            n_val = max(1, int(round(self.val_fraction * len(train))))
            if len(train) - n_val < 1:
                raise ValueError(f"{self.data_dir}: too few training frames ({len(train)}) to hold out validation")
            train, val = train[:-n_val], train[-n_val:]
            val_source = f"tail {self.val_fraction:g} of train (manifest has no val split yet)"
            warnings.warn(f"{self.data_dir}: no validation split yet; holding out the last {n_val} training frames")
        train, val = centre(train), centre(val)
        self.scale = float(np.std(train.astype(np.float64)))
        if self.max_train_frames is not None and len(train) > self.max_train_frames:
            train = train[np.linspace(0, len(train) - 1, self.max_train_frames).round().astype(int)]
        if self.max_val_frames is not None and len(val) > self.max_val_frames:
            val = val[np.linspace(0, len(val) - 1, self.max_val_frames).round().astype(int)]
        self.train_set, self.val_set = FrameDataset(train), FrameDataset(val)
        self.info = {
            "data_dir": str(self.data_dir),
            "system": self.system.name,
            "n_atoms": n,
            "n_train_frames": len(train),
            "n_val_frames": len(val),
            "val_source": val_source,
            "scale_nm": self.scale,
            "manifest_total_ns": manifest.get("total_ns"),
            "manifest_splits": manifest["splits"],
            "manifest_replica_frames": [r.get("n_frames") for r in manifest["replicas"]],
        }

    def train_dataloader(self) -> DataLoader:
        if len(self.train_set) < self.batch_size:
            raise ValueError(f"batch_size {self.batch_size} exceeds the {len(self.train_set)} training frames")
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256), shuffle=False, num_workers=0)

    def on_after_batch_transfer(self, batch: Tensor, dataloader_idx: int) -> Tensor:
        """Rotate each training frame by its own random rotation (validation frames are left as they are)."""
        if self.rotate and self.trainer is not None and self.trainer.training:
            rot = random_rotations(len(batch), dtype=batch.dtype).to(batch.device)
            batch = batch @ rot.transpose(1, 2)
        return batch
