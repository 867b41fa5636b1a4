"""Fault injection for `rexmol md`: damaged, missing or inconsistent files are refused with the file and the fix
named (never repaired by guessing, nothing written first); an interrupted write resumes into the uninterrupted
trajectory; bad options and bad system specs give one line and exit status 2.

The system is a copy of ala3 with 1 ps of equilibration, and runs are a few ps, so each test takes seconds.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mdtraj
import numpy as np
import pytest

from rexmol.cli import main
from rexmol.md import MDConfig, Replica, run_md, run_replica


def _config(system: Path, replicas: int = 1, ns: float = 0.003) -> MDConfig:
    return MDConfig(system=str(system), ns=ns, replicas=replicas, seed=4, chunk_ps=1.0)


@pytest.fixture(scope="module")
def finished(quick_ala3, tmp_path_factory) -> Path:
    """A finished 2-replica, 3-frame run (copied by each test before it is damaged)."""
    out = tmp_path_factory.mktemp("md") / "run"
    run_md(_config(quick_ala3, replicas=2), out, workers=1, quiet=True)
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _refused(config: MDConfig, out: Path, *patterns: str) -> None:
    """run_md refuses with a message matching every pattern and leaves every file as it was."""
    before = _snapshot(out)
    with pytest.raises(ValueError) as info:
        run_md(config, out, workers=1, quiet=True)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))
    assert _snapshot(out) == before


def test_short_xtc_is_refused_not_zero_padded(quick_ala3, finished, tmp_path):
    out = _copy(finished, tmp_path)
    xtc = out / "replica_000.xtc"
    xtc.write_bytes(xtc.read_bytes()[:500])
    _refused(_config(quick_ala3, 2, ns=0.005), out, "replica_000.xtc holds 500 bytes", "delete")


def test_missing_xtc_is_refused(quick_ala3, finished, tmp_path):
    out = _copy(finished, tmp_path)
    (out / "replica_001.xtc").unlink()
    _refused(_config(quick_ala3, 2, ns=0.005), out, "replica_001.xtc holds 0 bytes")


def test_deleted_state_file_does_not_restart_the_replica(quick_ala3, finished, tmp_path):
    out = _copy(finished, tmp_path)
    (out / "replica_000.state.json").unlink()
    _refused(_config(quick_ala3, 2, ns=0.005), out, r"replica_000.state.json is missing", "delete")


@pytest.mark.parametrize("text", ["{not json", '{"n_frames": "3"}', "[]", ""])
def test_garbled_state_file_is_named(quick_ala3, finished, tmp_path, text):
    out = _copy(finished, tmp_path)
    (out / "replica_001.state.json").write_text(text)
    _refused(_config(quick_ala3, 2, ns=0.005), out, "replica_001.state.json is not a valid replica state file")


def test_missing_checkpoint_is_refused(quick_ala3, finished, tmp_path):
    out = _copy(finished, tmp_path)
    next(out.glob("replica_000.f*.chk")).unlink()
    _refused(_config(quick_ala3, 2, ns=0.005), out, r"replica_000.f0000003.chk named by .* is missing")


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_damaged_checkpoint_is_named(quick_ala3, finished, tmp_path, damage):
    out = _copy(finished, tmp_path)
    chk = next(out.glob("replica_000.f*.chk"))
    data = chk.read_bytes()
    chk.write_bytes(np.random.default_rng(0).bytes(len(data)) if damage == "random" else data[: len(data) // 2])
    xtc_before = (out / "replica_000.xtc").read_bytes()
    with pytest.raises(ValueError, match=r"replica_000.f0000003.chk is damaged .*SHA-256.*delete"):
        run_replica(_config(quick_ala3, 2, ns=0.005), out, 0)
    assert (out / "replica_000.xtc").read_bytes() == xtc_before


def test_unreadable_checkpoint_without_a_recorded_hash_is_named(quick_ala3, finished, tmp_path):
    """State files written before the hash was recorded: OpenMM's own error, with the file named."""
    out = _copy(finished, tmp_path)
    state_file = out / "replica_000.state.json"
    state = json.loads(state_file.read_text())
    del state["checkpoint_sha256"]
    state_file.write_text(json.dumps(state))
    (out / state["checkpoint"]).write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(ValueError, match=r"replica_000.f0000003.chk is not a readable OpenMM checkpoint.*delete"):
        run_replica(_config(quick_ala3, 2, ns=0.005), out, 0)


def test_fewer_replicas_than_the_folder_holds_is_refused(quick_ala3, finished, tmp_path):
    out = _copy(finished, tmp_path)
    _refused(_config(quick_ala3, 1), out, r"replica\(s\) 1 beyond --replicas 1", "--replicas 2")


def test_garbled_manifest_is_named(quick_ala3, finished, tmp_path):
    out = _copy(finished, tmp_path)
    (out / "manifest.json").write_text('{"config": ')
    _refused(_config(quick_ala3, 2), out, "manifest.json is not a readable rexmol MD manifest")


def test_out_that_is_a_file_is_refused(quick_ala3, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run_md(_config(quick_ala3), tmp_path / "file", workers=1, quiet=True)


def test_write_interrupted_in_the_first_chunk_resumes_exactly(quick_ala3, tmp_path):
    """A kill while the first chunk is appended leaves a partial XTC beside a 0-frame state file: dropped."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    config = _config(quick_ala3)
    run_replica(config, whole, 0)
    replica = Replica(broken, 0)
    replica.begin()
    assert json.loads(replica.state_file.read_text())["n_frames"] == 0
    replica.xtc.write_bytes((whole / "replica_000.xtc").read_bytes()[:300])  # half-written first chunk
    assert run_replica(config, broken, 0)["n_frames"] == 3
    top = str(quick_ala3 / "topology.pdb")
    np.testing.assert_array_equal(mdtraj.load(str(broken / "replica_000.xtc"), top=top).xyz,
                                  mdtraj.load(str(whole / "replica_000.xtc"), top=top).xyz)


def test_equilibration_reports_progress(quick_ala3, tmp_path):
    calls = []
    run_replica(_config(quick_ala3, ns=0.001), tmp_path, 0, on_equilibration=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (1000, 1000) and len(calls) == 50  # 1 ps at 1 fs, in 50 parts
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def _spec_variant(quick_ala3: Path, tmp_path: Path, pattern: str, repl: str) -> Path:
    folder = tmp_path / "variant"
    shutil.copytree(quick_ala3, folder)
    text, n = re.subn(pattern, repl, (folder / "spec.toml").read_text(), flags=re.M)
    assert n == 1
    (folder / "spec.toml").write_text(text)
    return folder


@pytest.mark.parametrize("pattern, repl, message", [
    (r"^timestep_fs\s*=.*$", 'timestep_fs = "1.0"', r"spec.toml: \[md\] timestep_fs = '1.0' must be a number"),
    (r"^friction_per_ps\s*=.*$", "friction_per_ps = = 1", "spec.toml is not valid TOML"),
    (r"^phi = \[\[6,", "phi = [[66,", r"spec.toml: \[dihedrals\] phi entry \[66, 12, 14, 16\] is not 4 atom"),
])
def test_bad_system_spec_is_one_line_naming_the_file(quick_ala3, tmp_path, capsys, pattern, repl, message):
    folder = _spec_variant(quick_ala3, tmp_path, pattern, repl)
    out = tmp_path / "out"
    assert main(["md", str(folder), "--ns", "0.001", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("option", [["--ns", "nan"], ["--ns", "inf"], ["--ns", "0"], ["--ns", "1", "--replicas", "0"],
                                    ["--ns", "1", "--chunk-ps", "nan"], ["--ns", "1", "--workers", "0"]])
def test_bad_md_options_are_one_line(tmp_path, capsys, option):
    out = tmp_path / "out"
    assert main(["md", "ala3", *option, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rexmol md: error: --") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_ends_cleanly_and_the_rerun_resumes(quick_ala3, tmp_path):
    """SIGINT to `rexmol md` (the whole process group, as a terminal sends it) mid-run."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "rexmol.cli", "md", str(quick_ala3), "--ns", "0.03", "--replicas", "2",
               "--chunk-ps", "1", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "replica_000.f0000001.chk").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == "rexmol md: interrupted; rerun the same command to resume", err
    subprocess.run(command, check=True)
    assert json.loads((out / "manifest.json").read_text())["total_ns"] == pytest.approx(0.06)
