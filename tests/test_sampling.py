"""Sampling pipeline on a tiny DiT (rexmol.sampling, rexmol.proposal, `rexmol sample`): outputs, resume, ranks,
bad inputs; SNIS with the exact Gaussian flow; the torchdiffeq baseline's log q against the closed form."""
import json
import math

import mdtraj
import numpy as np
import pytest
import torch
from scipy.stats import norm

from rexmol.cli import main
from rexmol.proposal import ProposalSpec, torchdiffeq_logq
from rexmol.sampling import SampleRun, load_samples, run_config, run_rank, sample, standard_normal_draws
from tiny_fixtures import make_tiny_ckpt

N, BATCH = 6, 3
PER_SAMPLE = ("index", "x", "log_q", "energy", "log_w", "nfe", "roundtrip_x", "roundtrip_logq", "energy_failed",
              "nonfinite", "wrong_chirality", "batch")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_ckpt(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _spec(ckpt) -> ProposalSpec:
    # Rex-Euler, 2 steps: 4 evaluations forward + 4 back; cheap but a real Rex solve with the exact trace.
    return ProposalSpec(ckpt=ckpt, solver="rex-euler", steps=2, trace_method="vjp-loop")


@pytest.fixture(scope="module")
def full_run(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    summary = sample(_spec(ckpt).build, out, N, BATCH, seed=11, quiet=True)
    return out, summary


def _arrays(path):
    return load_samples(path)[1]


def test_draws_depend_only_on_seed_and_index():
    a = standard_normal_draws(3, [0, 1, 2, 3], (2, 3))
    np.testing.assert_array_equal(standard_normal_draws(3, [2, 3], (2, 3)), a[2:])
    assert not np.allclose(standard_normal_draws(4, [0], (2, 3)), a[:1])
    with pytest.raises(ValueError, match="seed"):
        standard_normal_draws(-1, [0], (1,))


def test_sample_writes_every_output_with_consistent_records(full_run):
    out, summary = full_run
    assert {"run.json", "samples.npz", "records.jsonl", "samples.dcd", "topology.pdb", "summary.json"} <= {
        p.name for p in out.iterdir()}
    config, data = load_samples(out)
    assert config["n"] == N and config["proposal"]["solver"] == "rex-euler"
    np.testing.assert_array_equal(data["index"], np.arange(N))
    np.testing.assert_allclose(data["log_w"], -data["energy"] - data["log_q"], rtol=0, atol=0)
    np.testing.assert_array_equal(data["nonfinite"], ~np.isfinite(data["log_w"]))
    assert np.all(data["nfe"] == 4)
    assert np.all(data["roundtrip_x"] < 1e-8) and np.all(data["roundtrip_logq"] < 1e-8)  # Rex, float64
    # the samples are centred and in nm; the DCD holds them
    np.testing.assert_allclose(data["x"].mean(axis=1), 0.0, atol=1e-12)
    traj = mdtraj.load(str(out / "samples.dcd"), top=str(out / "topology.pdb"))
    assert traj.n_frames == N and traj.n_atoms == 33
    np.testing.assert_allclose(traj.xyz, data["x"], atol=1e-6)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == N and records[4]["index"] == 4
    assert records[4]["log_w"] == pytest.approx(float(data["log_w"][4]))
    assert summary["n"] == N and 0 < summary["ess"] <= 1
    assert summary["n_wrong_chirality"] == int(data["wrong_chirality"].sum())


def test_energies_match_the_energy_bridge(full_run):
    from rexmol.energy import evaluate

    data = _arrays(full_run[0])
    ok = np.isfinite(data["energy"])
    np.testing.assert_allclose(data["energy"][ok], evaluate(data["x"][ok], "ala3").energy[ok], rtol=1e-12)


def test_resume_after_interruption_equals_uninterrupted_run(ckpt, full_run, tmp_path):
    out = tmp_path / "resumed"
    proposal = _spec(ckpt).build()
    run_rank(proposal, out, N, BATCH, seed=11, quiet=True, stop_after=1)  # "killed" after one batch
    run = SampleRun(out, run_config(proposal, N, BATCH, 11))
    assert run.missing() == [1] and not (out / "samples.npz").exists()
    with pytest.raises(ValueError, match="unfinished"):
        load_samples(out)
    (out / "batches" / ".b00001.npz.123.tmp").write_bytes(b"partial write of a killed run")
    sample(_spec(ckpt).build, out, N, BATCH, seed=11, quiet=True)
    resumed, full = _arrays(out), _arrays(full_run[0])
    for key in PER_SAMPLE:
        np.testing.assert_array_equal(resumed[key], full[key], err_msg=key)


def test_two_processes_give_the_same_samples_as_one(ckpt, full_run, tmp_path):
    out = tmp_path / "two"
    sample(_spec(ckpt).build, out, N, BATCH, seed=11, processes=2, quiet=True)
    two, one = _arrays(out), _arrays(full_run[0])
    for key in PER_SAMPLE:
        np.testing.assert_array_equal(two[key], one[key], err_msg=key)


def test_rerun_with_other_settings_is_refused(ckpt, full_run):
    with pytest.raises(ValueError, match="different sampling run"):
        sample(_spec(ckpt).build, full_run[0], N, BATCH, seed=12, quiet=True)


def test_bad_inputs_give_clear_errors(ckpt, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a rexmol sample folder"):
        load_samples(empty)
    with pytest.raises(FileNotFoundError):
        load_samples(tmp_path / "missing")
    assert main(["sample", "--out", str(tmp_path / "x")]) == 2
    assert "--ckpt" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", str(empty), "--reference", str(tmp_path)]) == 2
    assert "not a rexmol sample folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="singular at t=1"):  # data-kind Lawson coordinates are singular at t = 1
        ProposalSpec(ckpt=ckpt, solver="rex-euler", steps=2, t1=1.0).build()
    with pytest.raises(ValueError, match="unknown solver|tableau"):
        ProposalSpec(ckpt=ckpt, solver="rex-nonsense", steps=2).build()
    other = tmp_path / "other_system.pt"
    payload = torch.load(ckpt, weights_only=False)
    torch.save({**payload, "n_atoms": 22}, other)
    with pytest.raises(ValueError, match="22 atoms"):
        ProposalSpec(ckpt=str(other)).build()


def _gaussian_target(d=6, s=0.6, seed=0):
    from rexmol.likelihood.priors import StandardGaussian
    from rexmol.models.gaussian import GaussianFlow

    mean = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return GaussianFlow(mean, s), StandardGaussian((d,))


def _closed_form_logq(flow, x, t):
    mu = (t * flow.mean).numpy()
    return norm.logpdf(x.numpy(), mu, float(flow.marginal_std(t))).sum(-1)


def test_snis_with_the_exact_gaussian_flow_gives_ess_one_and_unbiased_means():
    """Rex-Dopri5 + exact trace on Gaussian data: the proposal is the target, so log w is constant."""
    from rexmol.likelihood.flow import sample_with_logq
    from rexmol.solvers import AdaptiveSteps
    from rexmol.weights import estimate, kish_ess

    flow, prior = _gaussian_target()
    t1 = 0.999
    x0 = prior.sample(2000, generator=torch.Generator().manual_seed(1))
    out = sample_with_logq(flow.model("velocity"), prior, x0, "rex-dopri5", AdaptiveSteps(0.0, t1, rtol=1e-8, atol=1e-8))
    log_target = _closed_form_logq(flow, out.x, t1) + 17.0  # unnormalised target: -E/kT up to a constant
    log_w = log_target - out.logq.numpy()
    assert np.ptp(log_w) < 1e-5
    assert kish_ess(log_w) == pytest.approx(1.0, abs=1e-9)
    est = estimate(log_w, out.x.numpy())
    assert np.all(np.abs(est.mean - t1 * flow.mean.numpy()) < 4 * est.stderr)


def test_torchdiffeq_baseline_log_q_matches_closed_form():
    flow, prior = _gaussian_target(d=4, s=0.5, seed=3)
    x0 = prior.sample(64, generator=torch.Generator().manual_seed(2))
    x1, logq, nfe, rt_x, rt_logq = torchdiffeq_logq(flow.model("velocity"), prior, x0, 0.0, 1.0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(logq.numpy(), _closed_form_logq(flow, x1, 1.0), atol=1e-6)
    np.testing.assert_allclose(x1.numpy(), flow.flow(x0, 0.0, 1.0).numpy(), atol=1e-6)
    assert nfe > 10 and float(rt_x.max()) < 1e-6 and float(rt_logq.max()) < 1e-6
    assert math.isfinite(float(logq.sum()))


def test_a_nonfinite_sample_is_flagged_without_losing_its_batch(ckpt):
    from rexmol.sampling import _propose

    proposal = _spec(ckpt).build()
    z = standard_normal_draws(11, [0, 1, 2], (33, 3))
    z[1, 5, 0] = np.nan  # one sample's solve goes non-finite: the batch is re-solved sample by sample
    out = _propose(proposal, z)
    assert np.isnan(out.log_q[1]) and np.isnan(out.x[1]).all() and out.nfe[1] == 0
    alone = proposal(z[[0, 2]])
    np.testing.assert_allclose(out.log_q[[0, 2]], alone.log_q, rtol=1e-12)
    np.testing.assert_allclose(out.x[[0, 2]], alone.x, rtol=0, atol=1e-12)


def test_float32_model_with_float64_state_keeps_the_float64_round_trip(ckpt):
    """Data-kind Rex to t = 0.999 amplifies round-off by ~(sigma_0/sigma_N)^2 = 1e6: a float32 state loses the
    round trip (measured 0.1-0.5 on the DiT); a float64 state around a float32 network keeps it at ~1e-7 (the
    network only has to be deterministic: the error left comes from reconstructed states whose float32 cast
    lands on the other side of a rounding boundary); a float64 network gives ~1e-10."""
    z = standard_normal_draws(7, range(4), (33, 3))
    errors = {}
    for dtype, model_dtype in (("float32", None), ("float64", "float32"), ("float64", None)):
        spec = ProposalSpec(ckpt=ckpt, solver="rex-rk4", steps=6, lawson="data", t1=0.999, dtype=dtype,
                            model_dtype=model_dtype, trace_method="vjp-loop")
        batch = spec.build()(z)
        errors[dtype, model_dtype] = (batch.roundtrip_x.max(), batch.roundtrip_logq.max(), batch.log_q)
    mixed, full = errors["float64", "float32"], errors["float64", None]
    assert mixed[0] < 1e-6 and mixed[1] < 1e-6, mixed[:2]  # measured 8.7e-8, 7.1e-8
    assert full[0] < 1e-8 and errors["float32", None][0] > 1e3 * mixed[0], (full[0], errors["float32", None][0])
    np.testing.assert_allclose(mixed[2], full[2], rtol=1e-4)  # same density up to float32 network round-off
    with pytest.raises(ValueError, match="model_dtype"):
        ProposalSpec(ckpt=ckpt, model_dtype="float16")
