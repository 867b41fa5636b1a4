"""Lightning DDP on CPU (gloo, 2 processes): both ranks end with identical weights (and did train); with the
shipped run's callbacks (validation ESS, generator export, loss curve) the run finishes instead of hanging in a
collective that only rank 0 entered."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dit_support import jittered_frames, write_dataset
from test_ic_generator import md_frames

from rexmol.models.checkpoint import load_generator
from rexmol.training import FlowMatching


def run_worker(data: Path, out: Path, mode: str) -> list[dict]:
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(data), str(out), mode], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["step"] == 8 for r in ranks)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    return ranks


@pytest.mark.slow
def test_two_process_ddp_gives_identical_weights(tmp_path):
    data = write_dataset(tmp_path / "d", jittered_frames(40), n_val=4)
    ranks = run_worker(data, tmp_path, "plain")
    torch.manual_seed(0)
    fresh = FlowMatching(size="tiny").state_dict()
    assert not torch.equal(fresh["model.head.weight"], ranks[0]["state"]["model.head.weight"])  # it trained


@pytest.mark.slow
def test_ddp_with_validation_and_export_callbacks_finishes(tmp_path):
    data = write_dataset(tmp_path / "d", md_frames(48), n_val=8)
    run_worker(data, tmp_path, "ic")
    last = load_generator(tmp_path / "model" / "generator_last.pt")
    assert last.meta["global_step"] == 8 and "val/ess" in last.meta["metrics"]
    assert (tmp_path / "model" / "metrics.csv").is_file() and (tmp_path / "loss.png").is_file()
