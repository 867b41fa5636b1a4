"""``rexmol.md`` runs: reproducible with a seed, and an interrupted run resumes into one continuous trajectory.

The system is a copy of ala3 with 1 ps of equilibration (everything else as shipped) so a run takes a second.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mdtraj
import numpy as np
import pytest

from rexmol.md import MDConfig, run_replica
from rexmol.systems import load_system


def trajectory(out: Path, index: int = 0) -> mdtraj.Trajectory:
    return mdtraj.load(str(out / f"replica_{index:03d}.xtc"), top=str(load_system("ala3").pdb_path))


class InterruptAfter:
    """Progress sink that raises KeyboardInterrupt (a Ctrl-C) after ``n`` committed chunks."""

    def __init__(self, n: int) -> None:
        self.n = n

    def put(self, item) -> None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt


def test_same_seed_same_trajectory(quick_ala3, tmp_path):
    runs = {}
    for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
        out = tmp_path / name
        out.mkdir()
        info = run_replica(MDConfig(system=str(quick_ala3), ns=0.002, replicas=1, seed=seed, chunk_ps=1.0), out, 0)
        assert info["n_frames"] == 2
        runs[name] = trajectory(out)
    assert runs["a"].n_frames == 2 and runs["a"].n_atoms == 33
    np.testing.assert_array_equal(runs["a"].xyz, runs["b"].xyz)
    np.testing.assert_array_equal(runs["a"].time, [1.0, 2.0])
    assert np.abs(runs["a"].xyz - runs["c"].xyz).max() > 1e-2  # another seed, another trajectory


def test_interrupted_run_resumes_continuously(quick_ala3, tmp_path):
    config = MDConfig(system=str(quick_ala3), ns=0.005, replicas=1, seed=3, chunk_ps=1.0)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    run_replica(config, whole, 0)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C right after the second chunk was committed ...
        run_replica(config, broken, 0, InterruptAfter(2))
    xtc = broken / "replica_000.xtc"
    committed = xtc.read_bytes()
    with open(xtc, "ab") as fh:  # ... while the third chunk was half appended to the XTC
        fh.write(committed[: len(committed) // 3])
    info = run_replica(config, broken, 0)
    assert info["n_frames"] == 5
    resumed, reference = trajectory(broken), trajectory(whole)
    np.testing.assert_array_equal(resumed.time, [1.0, 2.0, 3.0, 4.0, 5.0])  # no duplicated or missing frame
    np.testing.assert_array_equal(resumed.xyz, reference.xyz)  # the very trajectory of an uninterrupted run
    assert len(list(broken.glob("*.chk"))) == 1


@pytest.mark.slow
def test_killed_cli_run_resumes_continuously(quick_ala3, tmp_path):
    """`rexmol md` with two replica processes, SIGKILLed mid-run, then rerun with the same command."""
    command = [sys.executable, "-m", "rexmol.cli", "md", str(quick_ala3), "--ns", "0.04", "--replicas", "2",
               "--chunk-ps", "2", "--seed", "9", "--quiet"]
    subprocess.run(command + ["--out", str(tmp_path / "whole")], check=True)
    broken = tmp_path / "broken"
    proc = subprocess.Popen(command + ["--out", str(broken)], start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not all((broken / f"replica_{i:03d}.state.json").exists() for i in range(2)):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [json.loads((broken / f"replica_{i:03d}.state.json").read_text())["n_frames"] for i in range(2)]
    assert min(done) < 40, "the run finished before it was killed"
    subprocess.run(command + ["--out", str(broken)], check=True)
    for i in range(2):
        resumed, reference = trajectory(broken, i), trajectory(tmp_path / "whole", i)
        np.testing.assert_array_equal(resumed.time, np.arange(1.0, 41.0))
        np.testing.assert_array_equal(resumed.xyz, reference.xyz)
