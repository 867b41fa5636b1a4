"""``rexmol roundtrip`` end to end on the closed-form Gaussian model."""
from __future__ import annotations

import json

from rexmol.cli import main


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
    assert "not available" in capsys.readouterr().err
    assert main(["roundtrip", "--solvers", "rex-rk9"]) == 2
    assert "unknown tableau" in capsys.readouterr().err
    assert main(["roundtrip", "--t1", "1.0", "--solvers", "rex-rk4"]) == 2
    assert "singular" in capsys.readouterr().err
