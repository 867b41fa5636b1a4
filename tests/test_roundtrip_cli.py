"""``rexmol roundtrip`` end to end on the closed-form Gaussian model and on a tiny DiT checkpoint."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from test_dit import random_model  # the DiT engineer's tiny random-weight DiT

from rexmol.cli import main
from rexmol.commands.roundtrip import checkpoint_problem
from rexmol.models.checkpoint import save_generator
from rexmol.systems import load_system


def test_roundtrip_json_rows_and_plot(tmp_path, capsys):
    plot = tmp_path / "rt.png"
    argv = ["roundtrip", "--json", "--solvers", "rk4", "rex-rk4", "rex-dopri5", "dopri5", "--steps", "8", "16",
            "--t1", "0.9", "--batch", "8", "--rtol", "1e-6", "--plot", str(plot)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["solver"], r["adaptive"]) for r in rows] == [
        ("rk4", False), ("rk4", False), ("rex-rk4", False), ("rex-rk4", False), ("rex-dopri5", True), ("dopri5", True)]
    for r in rows:
        assert {"solver", "steps", "nfe", "dtype", "max_abs_error", "error_vs_exact"} <= set(r)
        assert r["dtype"] == "float64" and r["error_vs_exact"] < 1e-2
    fixed = {(r["solver"], r["steps"]): r for r in rows if not r["adaptive"]}
    assert fixed[("rk4", 8)]["nfe"] == 32 and fixed[("rex-rk4", 16)]["nfe"] == 128
    assert fixed[("rex-rk4", 8)]["max_abs_error"] <= 1e-12 and fixed[("rex-rk4", 16)]["max_abs_error"] <= 1e-12
    assert fixed[("rk4", 8)]["max_abs_error"] > 1e-9  # the baseline does not invert exactly
    assert [r for r in rows if r["solver"] == "rex-dopri5"][0]["max_abs_error"] <= 1e-12
    assert plot.stat().st_size > 0


def test_roundtrip_float32_and_errors(tmp_path, capsys):
    argv = ["roundtrip", "--json", "--solvers", "rex-midpoint", "--steps", "10", "--dtype", "float32",
            "--lawson", "velocity", "--batch", "8"]
    assert main(argv) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["dtype"] == "float32" and row["max_abs_error"] <= 1e-5 and row["lawson"] == "velocity"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")
    assert main(["roundtrip", "--model", str(ckpt)]) == 2
    assert "not a readable rexmol checkpoint" in capsys.readouterr().err
    assert main(["roundtrip", "--model", str(tmp_path / "missing.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["roundtrip", "--solvers", "rex-rk9"]) == 2
    assert "unknown tableau" in capsys.readouterr().err
    assert main(["roundtrip", "--t1", "1.0", "--solvers", "rex-rk4"]) == 2
    assert "singular" in capsys.readouterr().err


def test_roundtrip_sde_rows(capsys):
    """rex-euler-maruyama / rex-shark (rexmol.solvers.sde) run from the CLI on a log-rho grid inside (0, 1)."""
    argv = ["roundtrip", "--json", "--solvers", "rex-euler-maruyama", "rex-shark", "--steps", "8", "--t0", "0.2",
            "--t1", "0.8", "--grid", "log-varsigma", "--batch", "8"]
    assert main(argv) == 0
    em, shark = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (em["solver"], shark["solver"]) == ("rex-euler-maruyama", "rex-shark")
    assert em["nfe"] == 8 * 2 * 1 and shark["nfe"] == 8 * 2 * 2  # Rex: Psi_h and Psi_-h per step
    for r in (em, shark):
        assert r["error_vs_exact"] is None and r["lawson"] == "sde-data" and not r["adaptive"]
        assert r["max_abs_error"] <= 1e-12
    assert main(["roundtrip", "--solvers", "rex-shark", "--steps", "4"]) == 2  # default --t0 0: weight singular
    assert "singular at t=0.0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A generator file holding the tiny random-weight DiT for ala3 (33 atoms)."""
    path = tmp_path_factory.mktemp("dit") / "generator.pt"
    return save_generator(path, random_model(load_system("ala3")), system_name="ala3", scale=0.2)


def test_checkpoint_start_is_the_flattened_mean_free_prior(tiny_checkpoint):
    problem = checkpoint_problem(tiny_checkpoint, argparse.Namespace(batch=512, seed=0), torch.float64)
    x0 = problem.x0
    assert x0.shape == (512, 99) and x0.dtype == torch.float64
    assert x0.reshape(512, 33, 3).mean(1).abs().max().item() <= 1e-14  # centred frames
    assert x0.var().item() * 99 / 96 == pytest.approx(1.0, abs=0.02)  # unit variance on the 96-dim subspace
    assert problem.exact is None and problem.output == "velocity"
    assert problem.model(x0[:2], torch.full((2,), 0.5, dtype=torch.float64)).shape == (2, 99)


def test_roundtrip_on_a_dit_checkpoint(tiny_checkpoint, capsys):
    """Rex-RK4 inverts a (rough, random-weight) DiT to round-off in float64; plain RK4 does not (measured:
    rex-rk4 1.5e-13, rk4 0.59)."""
    argv = ["roundtrip", "--json", "--model", str(tiny_checkpoint), "--solvers", "rk4", "rex-rk4", "--steps", "4",
            "--t1", "0.5", "--batch", "4"]
    assert main(argv) == 0
    rk4, rex = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (rk4["solver"], rex["solver"]) == ("rk4", "rex-rk4")
    assert rk4["error_vs_exact"] is None and rex["error_vs_exact"] is None
    assert rex["dtype"] == "float64" and rex["steps"] == 4 and rex["nfe"] == rex["nfe_backward"] == 32
    assert rex["max_abs_error"] <= 1e-10
    assert rk4["max_abs_error"] > 1e-6
