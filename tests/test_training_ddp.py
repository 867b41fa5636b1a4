"""Lightning DDP on CPU (gloo, 2 processes): both ranks end with identical weights (and did train)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dit_support import jittered_frames, write_dataset

from rexmol.training import FlowMatching


@pytest.mark.slow
def test_two_process_ddp_gives_identical_weights(tmp_path):
    data = write_dataset(tmp_path / "d", jittered_frames(40), n_val=4)
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(data), str(tmp_path)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["step"] == 8 for r in ranks)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    torch.manual_seed(0)
    fresh = FlowMatching(size="tiny").state_dict()
    assert not torch.equal(fresh["model.head.weight"], ranks[0]["state"]["model.head.weight"])  # it trained
