"""MDDataModule: centring, one scalar scale, splits (and the val fallback), rotations."""
import numpy as np
import pytest
import torch
from dit_support import jittered_frames, write_dataset

from rexmol.data import MDDataModule, centre, random_rotations


def test_random_rotations_are_proper_and_isotropic():
    rot = random_rotations(4000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(3, dtype=torch.float64).expand(4000, 3, 3)
    torch.testing.assert_close(rot @ rot.transpose(1, 2), eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(4000, dtype=torch.float64), rtol=0, atol=1e-12)
    # Haar measure: the rotated unit vector is uniform on the sphere (mean 0, second moment I/3)
    v = rot[:, :, 0]
    assert v.mean(0).abs().max() < 0.05
    torch.testing.assert_close(v.T @ v / 4000, eye[0] / 3, rtol=0, atol=0.03)


def test_datamodule_centres_scales_and_splits(tmp_path):
    frames = jittered_frames(30) + np.float32(5.0)  # far from the origin: centring must remove it
    dm = MDDataModule(str(write_dataset(tmp_path / "d", frames, n_val=6)), batch_size=8)
    dm.setup()
    train = dm.train_set.frames.numpy()
    assert train.shape == (24, 33, 3) and len(dm.val_set) == 6
    np.testing.assert_allclose(train.mean(axis=1), 0.0, atol=1e-5)
    expected = np.std(centre(frames[:24].astype(np.float64)))
    assert dm.scale == pytest.approx(expected, rel=1e-5)
    assert dm.info["n_train_frames"] == 24 and dm.info["val_source"] == "manifest"


def test_missing_val_split_holds_out_the_tail(tmp_path):
    frames = jittered_frames(40)
    dm = MDDataModule(str(write_dataset(tmp_path / "d", frames)), batch_size=8, val_fraction=0.1)
    with pytest.warns(UserWarning, match="no validation split"):
        dm.setup()
    assert len(dm.train_set) == 36 and len(dm.val_set) == 4
    np.testing.assert_allclose(dm.val_set.frames.numpy(), centre(frames[36:]), atol=2e-3)  # XTC precision


def test_system_mismatch_is_an_error(tmp_path):
    data = write_dataset(tmp_path / "d", jittered_frames(10, system="ala2"), system="ala2")
    with pytest.raises(ValueError, match="holds system 'ala2'"):
        MDDataModule(str(data), system="ala3")
