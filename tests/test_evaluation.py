"""Evaluation against held-out MD (rexmol.evaluation) on a tiny real MD dataset made by `rexmol md`."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_report import _table_lines_are_valid_markdown
from tiny_fixtures import make_tiny_ckpt, make_tiny_dataset

from rexmol.cli import main
from rexmol.systems import load_system


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_md"))


@pytest.fixture(scope="module")
def reference(dataset):
    from rexmol.evaluation import load_reference

    return load_reference(dataset, load_system("ala3"))


def _records_from_frames(frames: np.ndarray, system) -> tuple[dict, dict]:
    """A sample record whose samples are the given frames, log q = 0 (so log w = -E)."""
    from rexmol.energy import OpenMMEnergy

    with OpenMMEnergy(system) as bridge:
        e = bridge.evaluate(frames).energy
    n = len(frames)
    config = {"format": "rexmol-samples/1", "system": system.name, "n_atoms": system.n_atoms, "n": n,
              "batch_size": n, "seed": 0, "proposal": {"model": "MD frames", "solver": "none"}}
    data = {"x": frames.astype(np.float64), "energy": e, "log_q": np.zeros(n), "log_w": -e, "nfe": np.zeros(n),
            "roundtrip_x": np.full(n, np.nan), "roundtrip_logq": np.full(n, np.nan),
            "energy_failed": ~np.isfinite(e), "index": np.arange(n), "wall_seconds": np.zeros(n),
            "cpu_seconds": np.zeros(n)}
    return config, data


def test_reference_frames_have_energies_and_four_dihedrals(reference):
    assert reference.n_frames == 9
    assert reference.angles.shape == (9, 4)
    assert np.all(np.isfinite(reference.energy)) and np.all(np.abs(reference.angles) <= np.pi)


def test_reference_samples_evaluate_to_zero_distance_and_mirrors_are_fixed(dataset, reference):
    from rexmol.evaluation import evaluate_run
    from rexmol.mddata import load_frames

    system = reference.system
    frames = load_frames(dataset, "test").astype(np.float64)
    frames[::2] *= -1.0  # wrong handedness: the evaluation must mirror them back
    config, data = _records_from_frames(frames, system)
    row, arrays = evaluate_run(config, data, reference)
    assert row["n_mirrored"] == 5 and row["n_mixed_chirality"] == 0
    assert row["e_w2_proposal"] == pytest.approx(0.0, abs=1e-6)
    assert row["t_w2_proposal"] == pytest.approx(0.0, abs=1e-5)
    assert 0 < row["ess"] <= 1 and row["n_nonfinite"] == 0
    assert row["e_w2"] >= 0 and row["t_w2"] >= 0
    assert set(row["basins"]) == {"phi2/psi2"}
    pops = row["basins"]["phi2/psi2"]
    assert {k: v["mean"] for k, v in pops["proposal"].items()} == {k: v["mean"] for k, v in pops["md"].items()}
    np.testing.assert_allclose(arrays["angles"], reference.angles, atol=1e-5)


def test_nonfinite_samples_are_counted_not_dropped(dataset, reference):
    from rexmol.evaluation import evaluate_run
    from rexmol.mddata import load_frames

    frames = load_frames(dataset, "test").astype(np.float64)
    config, data = _records_from_frames(frames, reference.system)
    data["x"][3] = np.nan
    data["energy"][3] = np.inf
    data["energy_failed"][3] = True
    data["log_w"][3] = -np.inf
    data["log_w"][4] = np.nan  # e.g. a non-finite log q
    row, _ = evaluate_run(config, data, reference)
    assert row["n"] == 9 and row["n_nonfinite"] == 2 and row["n_energy_failed"] == 1
    assert row["n_excluded_e_w2_proposal"] == 1


def test_samples_of_another_system_or_topology_are_rejected(dataset, reference, tmp_path):
    from rexmol.evaluation import evaluate_run, load_reference
    from rexmol.mddata import load_frames

    frames = load_frames(dataset, "test").astype(np.float64)
    config, data = _records_from_frames(frames, reference.system)
    with pytest.raises(ValueError, match="not of 'ala3'"):
        evaluate_run({**config, "system": "ala2", "n_atoms": 22}, data, reference)
    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "system": "ala2"}))
    with pytest.raises(ValueError, match="different topology"):
        load_reference(other, reference.system)


def test_report_files_are_written(dataset, reference, tmp_path):
    from rexmol.evaluation import evaluate_floor, evaluate_run, write_report
    from rexmol.mddata import load_frames
    from rexmol.report import load_published

    frames = load_frames(dataset, "test").astype(np.float64)
    config, data = _records_from_frames(frames, reference.system)
    row, arrays = evaluate_run(config, data, reference)
    row, arrays = evaluate_run(config, data, reference, bootstrap=5)
    floor = evaluate_floor(reference, "train", 9, bootstrap=5)
    text = write_report(tmp_path, [row], [arrays], reference, load_published(), floor=floor)
    assert "**published**" in text and "MD frames" in text and "| MD floor |" in text
    assert "Warning: few samples" in text  # N = 9
    names = {p.name for p in tmp_path.iterdir()}
    assert {"report.json", "report.md", "energy.png", "log_weights.png", "roundtrip.png", "cost.png",
            "ramachandran_phi2_psi2.png"} <= names
    assert _table_lines_are_valid_markdown((tmp_path / "report.md").read_text()) == 1 + 1 + 6 + 3 + 3
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["runs"][0]["n"] == 9 and report["reference"]["n_frames"] == 9
    assert report["floor"]["split"] == "train" and report["runs"][0]["few_samples"] is True


def test_evaluate_ckpt_compares_solvers_from_the_same_draws(dataset, tmp_path, capsys):
    ckpt = make_tiny_ckpt(tmp_path / "tiny.pt")
    out = tmp_path / "compare"
    argv = ["evaluate", "--ckpt", ckpt, "--solvers", "rex-euler,princeps-euler,euler", "--steps", "2", "--n", "3",
            "--batch-size", "3", "--trace-method", "vjp-loop", "--reference", str(dataset), "--out", str(out),
            "--seed", "4", "--model-dtype", "float64"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    rest = "; float64 state, float64 network; log q: integrated exact trace"
    lawson, in_t = "; data-kind Lawson, t in [0, 0.999]", "; in t, t in [0, 0.999]"
    assert f"| DiT | rex-euler (2 steps){lawson}{rest} | unclipped SNIS |" in text
    assert f"| DiT | euler (2 steps){in_t}{rest} | unclipped SNIS |" in text
    report = json.loads((out / "report" / "report.json").read_text())
    assert [r["solver"] for r in report["runs"]] == [f"rex-euler (2 steps){lawson}{rest}",
                                                     f"princeps-euler (2 steps){lawson}{rest}",
                                                     f"euler (2 steps){in_t}{rest}"]
    assert report["floor"]["n"] == 3 and report["runs"][0]["bootstrap"]["replicates"] == 100
    rex, princeps, euler = (np.load(out / name / "samples.npz") for name in ("rex-euler", "princeps-euler", "euler"))
    assert rex["roundtrip_x"].max() < 1e-8 < euler["roundtrip_x"].max()  # exact inverse vs truncation error
    # Lawson-Euler in data coordinates is velocity Euler on this path: equal samples iff the prior draws are equal
    np.testing.assert_allclose(princeps["x"], euler["x"], rtol=0, atol=1e-10)


def test_roundtrip_policy_certifies_the_rex_samples_only_and_a_pool_evaluates_alike(dataset, tmp_path, capsys):
    from rexmol.commands.evaluate import evaluate_folders

    ckpt = make_tiny_ckpt(tmp_path / "tiny.pt")
    out = tmp_path / "policy"
    argv = ["evaluate", "--ckpt", ckpt, "--solvers", "rex-euler,euler", "--steps", "2", "--n", "3",
            "--batch-size", "3", "--trace-method", "vjp-loop", "--reference", str(dataset), "--out", str(out),
            "--seed", "4", "--model-dtype", "float64", "--roundtrip", "reversible", "--bootstrap", "3"]
    assert main(argv) == 0
    rex, euler = (np.load(out / name / "samples.npz") for name in ("rex-euler", "euler"))
    assert np.isfinite(rex["roundtrip_x"]).all() and np.isnan(euler["roundtrip_x"]).all()
    dirs = [out / "rex-euler", out / "euler"]
    rows = {}
    capsys.readouterr()
    for processes in (1, 2):
        evaluate_folders(dirs, dataset, tmp_path / f"report{processes}", seed=4, bootstrap=3, floor_split="train",
                         processes=processes, quiet=processes == 2)
        if processes == 1:  # progress moves per replicate, for every row
            err = capsys.readouterr().err
            for label in ("rex-euler", "euler", "MD floor (train)"):
                assert [f"evaluate {label}: bootstrap replicate {k}/3" in err for k in (1, 2, 3)] == [True] * 3
        report = json.loads((tmp_path / f"report{processes}" / "report.json").read_text())
        rows[processes] = json.dumps([report["runs"], report["floor"]], sort_keys=True)
    assert rows[1] == rows[2]  # each row seeded by --seed alone: the pool changes nothing


def test_solver_entries_set_steps_and_logq_per_row_from_the_same_draws(dataset, tmp_path, capsys):
    ckpt = make_tiny_ckpt(tmp_path / "tiny.pt")
    out = tmp_path / "entries"
    argv = ["evaluate", "--ckpt", ckpt, "--solvers", "rex-euler@2:discrete,rex-euler@2,rex-euler@3/varsigma:exact",
            "--steps", "5", "--n", "3", "--batch-size", "3", "--trace-method", "vjp-loop", "--no-roundtrip",
            "--model-dtype", "float64",
            "--reference", str(dataset), "--out", str(out), "--seed", "4", "--bootstrap", "0", "--floor-split", "none"]
    assert main(argv) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    rest = "; data-kind Lawson, t in [0, 0.999]; float64 state, float64 network; log q: "
    assert [r["solver"] for r in report["runs"]] == [
        f"rex-euler (2 steps){rest}discrete-map exact", f"rex-euler (2 steps){rest}integrated exact trace",
        f"rex-euler (3 steps, grid varsigma){rest}integrated exact trace"]
    disc, integ = (np.load(out / name / "samples.npz") for name in ("rex-euler_2_discrete", "rex-euler_2"))
    np.testing.assert_array_equal(disc["x"], integ["x"])  # same draws, same grid: same samples, other log q
    assert not np.allclose(disc["log_q"], integ["log_q"], rtol=0, atol=1e-6)  # 2 Euler steps: they differ
    for bad in ("rex-euler@:exact", "rex-euler:trace", "rex-euler@2@3", "rex-euler@2/cubic"):
        assert main([*argv[:4], bad, *argv[5:]]) == 2
        assert "SOLVER[@STEPS][/GRID][:LOGQ]" in capsys.readouterr().err
    assert main([*argv[:4], "euler,euler", *argv[5:]]) == 2
    assert "repeats" in capsys.readouterr().err
    bad_out = tmp_path / "bad_skip"
    assert main([*argv[:-8], "--out", str(bad_out), "--bootstrap-skip", "t_w2,T_W2"]) == 2
    err = capsys.readouterr().err
    assert "--bootstrap-skip: unknown metric(s) T_W2; choose from e_w2" in err and err.count("\n") == 1
    assert not bad_out.exists()  # checked before anything is sampled


def test_demo_runs_end_to_end_on_small_inputs(dataset, tmp_path, capsys):
    ckpt = make_tiny_ckpt(tmp_path / "tiny.pt")
    argv = ["demo", "--ckpt", ckpt, "--reference", str(dataset), "--out", str(tmp_path / "demo"), "--n", "2",
            "--solvers", "rex-euler", "--steps", "2", "--processes", "1", "--trace-method", "vjp-loop"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 samples per solver (rex-euler), 2 steps" in out and "demo finished in" in out
    assert (tmp_path / "demo" / "report" / "report.md").is_file()
    assert main(["demo", "--ckpt", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_reference_energies_are_computed_once_and_cached_by_content(tmp_path):
    from rexmol.evaluation import reference_energies

    system = load_system("ala3")
    calls = []

    def compute(frames, system):
        calls.append(len(frames))
        return frames[:, 0, 0].astype(np.float64) * 10

    frames = np.random.default_rng(0).normal(size=(5, system.n_atoms, 3)).astype(np.float32)
    first = reference_energies(tmp_path, frames, system, compute=compute)
    second = reference_energies(tmp_path, frames, system, compute=compute)
    assert calls == [5] and np.array_equal(first, second)  # the second call did not compute
    assert len(list((tmp_path / "cache").glob("energy-*.npy"))) == 1
    other = frames.copy()
    other[0, 0, 0] += 1e-3
    reference_energies(tmp_path, other, system, compute=compute)
    assert calls == [5, 5]  # other frames, another key


def test_floor_row_uses_frames_disjoint_from_the_reference(dataset, reference):
    from rexmol.evaluation import evaluate_floor
    from rexmol.mddata import load_frames

    floor = evaluate_floor(reference, "train", 9, bootstrap=10)
    train = load_frames(dataset, "train", max_frames=9)
    test = {f.tobytes() for f in load_frames(dataset, "test")}
    assert floor["n"] == 9 and floor["disjoint_from_reference"] and not any(f.tobytes() in test for f in train)
    assert floor["ess"] == pytest.approx(1.0) and floor["e_w2_proposal"] > 0 and floor["ci95"]["e_w2"] is not None
    with pytest.raises(ValueError, match="also reference frames"):
        evaluate_floor(reference, "test", 9)


def test_clipping_is_off_by_default_and_never_clips_nonfinite(dataset, reference):
    from rexmol.evaluation import evaluate_run
    from rexmol.mddata import load_frames

    frames = load_frames(dataset, "test").astype(np.float64)
    config, data = _records_from_frames(frames, reference.system)
    data["log_w"][2] = np.inf  # non-finite: weight 0, counted, never "clipped"
    row, arrays = evaluate_run(config, data, reference)
    assert row["n_clipped"] == 0 and row["protocol"] == "unclipped SNIS" and not arrays["clipped"].any()
    row, arrays = evaluate_run(config, data, reference, clip_logw=0.002)  # ceil(0.002 * 9) = 1
    largest_finite = int(np.argmax(np.where(np.isfinite(data["log_w"]), data["log_w"], -np.inf)))
    assert row["n_clipped"] == 1 and np.flatnonzero(arrays["clipped"]).tolist() == [largest_finite]
    assert row["n_nonfinite"] == 1 and arrays["weights"][largest_finite] == 0 and arrays["weights"][2] == 0
    assert row["protocol"] == "top 0.2 % of log w dropped (1 of 9)"


def test_bootstrap_intervals_of_every_metric_and_basin(dataset, reference):
    from rexmol.evaluation import evaluate_run
    from rexmol.mddata import load_frames

    config, data = _records_from_frames(load_frames(dataset, "test").astype(np.float64), reference.system)
    row, _ = evaluate_run(config, data, reference, seed=3, bootstrap=20)
    for key in ("ess", "e_w2", "t_w2", "e_w2_proposal", "t_w2_proposal"):
        lo, hi = row["ci95"][key]
        assert lo <= hi
    assert row["ci95"]["e_w2_proposal"][1] > 0  # resampled frames are no longer the reference itself
    pop = row["basins"]["phi2/psi2"]["reweighted"]["beta"]
    assert pop["ci95"][0] <= pop["ci95"][1]
    again, _ = evaluate_run(config, data, reference, seed=3, bootstrap=20)
    assert again["ci95"] == row["ci95"]  # seeded
    assert row["n_distinct_resampled"] >= 1 and row["bootstrap"]["replicates"] == 20


def test_bootstrap_skip_leaves_out_only_the_named_intervals(dataset, reference):
    from rexmol.evaluation import evaluate_floor, evaluate_run
    from rexmol.mddata import load_frames
    from rexmol.report import markdown_table

    config, data = _records_from_frames(load_frames(dataset, "test").astype(np.float64), reference.system)
    full, _ = evaluate_run(config, data, reference, seed=3, bootstrap=6)
    skip, _ = evaluate_run(config, data, reference, seed=3, bootstrap=6, bootstrap_skip=["t_w2_proposal"])
    assert full["ci95"]["t_w2_proposal"] is not None and skip["ci95"]["t_w2_proposal"] is None
    assert skip["t_w2_proposal"] == full["t_w2_proposal"]  # the point estimate stays
    rest = {k: v for k, v in full["ci95"].items() if k != "t_w2_proposal"}
    assert {k: v for k, v in skip["ci95"].items() if k != "t_w2_proposal"} == rest  # same draws for the others
    assert skip["bootstrap"]["skipped"] == ["t_w2_proposal"] and full["bootstrap"]["skipped"] == []
    assert "No interval for t_w2_proposal" in markdown_table([skip])
    assert "No interval for" not in markdown_table([full])
    floor = evaluate_floor(reference, "train", 9, bootstrap=3, bootstrap_skip=("t_w2", "e_w2"))
    assert floor["ci95"]["t_w2"] is None and floor["ci95"]["e_w2"] is None and floor["ci95"]["ess"] is not None
    with pytest.raises(ValueError, match="bootstrap_skip: unknown metric.*ess.*choose from e_w2, t_w2"):
        evaluate_run(config, data, reference, bootstrap=2, bootstrap_skip=["ess"])


def test_as_stored_is_exactly_what_an_xtc_file_returns(tmp_path):
    from mdtraj.formats import XTCTrajectoryFile

    from rexmol.mddata import as_stored

    x = np.random.default_rng(0).normal(scale=2.0, size=(200, 42, 3))
    with XTCTrajectoryFile(str(tmp_path / "x.xtc"), "w") as fh:
        fh.write(x.astype(np.float32))
    with XTCTrajectoryFile(str(tmp_path / "x.xtc")) as fh:
        read = fh.read()[0]
    np.testing.assert_array_equal(as_stored(x), read)  # bitwise, float32
    np.testing.assert_array_equal(as_stored(read), read)  # frames read from XTC are unchanged
    assert np.isnan(as_stored(np.array([np.nan, 0.0]))[0])


def test_sample_energies_are_compared_after_the_references_storage_rounding(dataset, reference, tmp_path):
    """Full-precision samples: E-W2 and the energy means use the energies of the XTC-rounded samples (computed
    here through a real XTC file), the weights the exact ones."""
    from mdtraj.formats import XTCTrajectoryFile

    from rexmol.energy import OpenMMEnergy
    from rexmol.evaluation import evaluate_run
    from rexmol.mddata import load_frames
    from rexmol.metrics import energy_w2

    frames = load_frames(dataset, "test").astype(np.float64)
    frames += np.random.default_rng(1).uniform(-5e-4, 5e-4, frames.shape)  # off the 1e-3 nm grid
    config, data = _records_from_frames(frames, reference.system)
    with XTCTrajectoryFile(str(tmp_path / "s.xtc"), "w") as fh:
        fh.write(frames.astype(np.float32))
    with XTCTrajectoryFile(str(tmp_path / "s.xtc")) as fh:
        stored = fh.read()[0].astype(np.float64)
    with OpenMMEnergy(reference.system) as bridge:
        e_stored = bridge.evaluate(stored).energy
    row, arrays = evaluate_run(config, data, reference)
    assert reference.quantum_nm == 1e-3 and row["energy_quantum_nm"] == 1e-3
    np.testing.assert_allclose(arrays["energy"], e_stored, rtol=0, atol=1e-9)
    w = np.exp(-data["energy"] - np.max(-data["energy"]))  # log q = 0: the weights use the exact energies
    w /= w.sum()
    assert row["energy_mean_reweighted"] == pytest.approx(float(np.sum(w * e_stored)), abs=1e-9)
    assert row["energy_mean_reweighted_exact"] == pytest.approx(float(np.sum(w * data["energy"])), abs=1e-9)
    assert row["e_w2_weighted"] == pytest.approx(energy_w2(reference.energy, e_stored, gen_weights=w), abs=1e-9)
    assert row["e_w2_weighted_exact"] == pytest.approx(energy_w2(reference.energy, data["energy"], gen_weights=w),
                                                       abs=1e-9)
    assert np.abs(e_stored - data["energy"]).min() > 1e-3  # a sub-pm rounding moves energies measurably
