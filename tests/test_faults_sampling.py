"""Fault injection for `rexmol sample` (rexmol.sampling, rexmol.proposal): invalid options and damaged or
misplaced files are refused before anything is written, naming the file and the fix; damaged batch, sample and
run files are detected, never silently merged; errors in worker processes arrive as the same one line; a long
run keeps its counts incrementally; a finished run is not rewritten.

Most tests use :class:`IsotropicGaussianProposal` (the reference frame plus isotropic Gaussian noise, whose
density is closed form), which costs one OpenMM energy per sample, so the sampler's bookkeeping is tested in
seconds; the checkpoint and option tests use the untrained tiny DiT.
"""
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from rexmol.cli import main
from rexmol.proposal import ProposalSpec
from rexmol.sampling import ProposalBatch, SampleRun, load_samples, run_config, run_rank, sample
from rexmol.systems import load_system
from tiny_fixtures import make_tiny_ckpt

N, BATCH = 6, 2


class IsotropicGaussianProposal:
    """x = reference frame + sigma z (nm), log q = sum of normal log-densities: a proposal with an exact density."""

    def __init__(self, sigma: float = 0.002, n_atoms_out: int | None = None):
        self.system = load_system("ala3")
        self.sigma, self.n_atoms_out = sigma, n_atoms_out
        self.description = {"model": "isotropic-gaussian", "sigma": sigma}

    def __call__(self, z: np.ndarray) -> ProposalBatch:
        x = self.system.positions[None] + self.sigma * z
        if self.n_atoms_out is not None:  # a broken proposal: wrong output shape -> ValueError in sample_batch
            x = x[:, : self.n_atoms_out]
        log_q = norm.logpdf(z).reshape(len(z), -1).sum(-1) - z[0].size * np.log(self.sigma)
        nan = np.full(len(z), np.nan)
        return ProposalBatch(x=x, log_q=log_q, nfe=np.zeros(len(z), np.int64), roundtrip_x=nan, roundtrip_logq=nan)


def make_gaussian() -> IsotropicGaussianProposal:
    return IsotropicGaussianProposal()


def make_broken() -> IsotropicGaussianProposal:
    return IsotropicGaussianProposal(n_atoms_out=30)


def _sample(out, **kw):
    return sample(make_gaussian, out, N, BATCH, seed=3, quiet=True, **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gauss") / "run"
    _sample(out)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_tiny_ckpt(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _interrupted(tmp_path: Path, batches: int = 2) -> Path:
    out = tmp_path / "run"
    run_rank(make_gaussian(), out, N, BATCH, seed=3, quiet=True, stop_after=batches)
    return out


def _same_samples(a: Path, b: Path) -> None:
    da, db = load_samples(a)[1], load_samples(b)[1]
    for key in ("index", "x", "log_q", "energy", "log_w"):
        np.testing.assert_array_equal(da[key], db[key], err_msg=key)


def test_the_gaussian_proposal_runs_and_resumes(finished, tmp_path):
    out = _interrupted(tmp_path)
    _sample(out)
    _same_samples(out, finished)
    data = load_samples(finished)[1]
    assert np.isfinite(data["log_w"]).all() and len(data["index"]) == N


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_damaged_batch_file_is_named_and_recomputed_once_deleted(finished, tmp_path, damage):
    out = _interrupted(tmp_path)
    path = out / "batches" / "b00001.npz"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "random": np.random.default_rng(1).bytes(len(data)),
                      "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"batches/b00001.npz is damaged .*delete it and rerun"):
        _sample(out)
    assert not (out / "samples.npz").exists()
    path.unlink()
    _sample(out)
    _same_samples(out, finished)


def test_batch_file_of_other_samples_is_refused(finished, tmp_path):
    out = _interrupted(tmp_path)
    (out / "batches" / "b00001.npz").write_bytes((out / "batches" / "b00000.npz").read_bytes())
    with pytest.raises(ValueError, match=r"b00001.npz does not hold samples 2..3 of this run"):
        _sample(out)


def test_damaged_samples_npz_is_named_and_rebuilt_once_deleted(finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    data = (out / "samples.npz").read_bytes()
    (out / "samples.npz").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"samples.npz is damaged .*delete it and rerun"):
        load_samples(out)
    (out / "samples.npz").unlink()
    _sample(out)
    _same_samples(out, finished)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_garbled_run_json_is_named(finished, tmp_path, text):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "run.json").write_text(text, encoding="latin-1")
    with pytest.raises(ValueError, match=r"run.json is not"):
        _sample(out)
    with pytest.raises(ValueError, match=r"run.json is not"):
        load_samples(out)


def test_out_below_a_file_is_refused_before_writing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*file/sub: .*file is a file, not a folder"):
        _sample(tmp_path / "file" / "sub")
    with pytest.raises(ValueError, match=r"is a file, not a folder"):
        _sample(tmp_path / "file")


def test_finished_run_is_not_rewritten(finished):
    stamps = {p.name: p.stat().st_mtime_ns for p in finished.iterdir() if p.is_file()}
    _sample(finished)
    assert {p.name: p.stat().st_mtime_ns for p in finished.iterdir() if p.is_file()} == stamps


def test_counts_are_kept_incrementally(tmp_path, monkeypatch):
    """`sample --n 1000000 --batch-size 1` scanned every expected batch file after every batch (quadratic)."""
    n_batches = 60
    calls = {"n": 0}
    real_is_file = Path.is_file

    def counting_is_file(self):
        calls["n"] += 1
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", counting_is_file)
    run_rank(make_gaussian(), tmp_path / "run", n_batches, 1, seed=3, quiet=True)
    assert calls["n"] < 5 * n_batches, calls["n"]  # before: ~2 n_batches^2 = 7200


def test_value_error_in_a_worker_process_arrives_as_one_line(tmp_path):
    with pytest.raises(ValueError) as info:
        sample(make_broken, tmp_path / "run", 4, 1, seed=0, processes=2, quiet=True)
    assert re.fullmatch(r"proposal returned x of shape \(1, 30, 3\), expected \(1, 33, 3\)", str(info.value))


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("option, message", [
    (["--rtol", "0"], "--rtol must be a finite number > 0"),
    (["--rtol", "nan"], "--rtol must be a finite number > 0"),
    (["--atol", "-1"], "--atol must be a finite number > 0"),
    (["--zeta", "0"], r"--zeta must be in \(0, 1\]"),
    (["--zeta", "1.5"], r"--zeta must be in \(0, 1\]"),
    (["--t1", "1.5"], "need 0 <= t0 < t1 <= 1"),
    (["--processes", "0"], "processes must be >= 1"),
])
def test_invalid_option_writes_nothing(ckpt, tmp_path, capsys, option, message):
    out = tmp_path / "run"
    err = _cli_error(capsys, ["sample", "--ckpt", ckpt, "--n", "2", "--out", str(out), *option])
    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize("damage", ["random", "truncated", "empty", "directory", "text"])
def test_damaged_checkpoint_is_one_line_naming_the_file(ckpt, tmp_path, capsys, damage):
    bad = tmp_path / "bad.pt"
    data = Path(ckpt).read_bytes()
    if damage == "directory":
        bad.mkdir()
    else:
        bad.write_bytes({"random": np.random.default_rng(2).bytes(4096), "truncated": data[: len(data) // 2],
                         "empty": b"", "text": b"hello\n"}[damage])
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        ProposalSpec(ckpt=str(bad)).build()
    out = tmp_path / "run"
    err = _cli_error(capsys, ["sample", "--ckpt", str(bad), "--n", "2", "--out", str(out)])
    assert str(bad) in err and ("folder" in err if damage == "directory" else "unreadable" in err), err
    assert not out.exists()


def test_debug_shows_the_traceback(ckpt, tmp_path):
    with pytest.raises(ValueError, match="--rtol"):
        main(["sample", "--ckpt", ckpt, "--rtol", "0", "--out", str(tmp_path / "run"), "--debug"])


def test_model_dtype_defaults_to_float32_and_help_shows_defaults(capsys):
    from rexmol.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["sample", "--ckpt", "x"])
    assert args.model_dtype == "float32" and args.dtype == "float64"
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("number of samples (default: 256)", "(default: rex-dopri5)", "(default: 0.0001)",
                    "(the unit of resumption) (default: 64)"):
        assert default in text, default
