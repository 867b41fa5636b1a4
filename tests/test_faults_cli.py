"""Fault and bad-input behaviour of the command line as a whole: one-line errors with exit status 2 (the traceback
only with --debug), Ctrl-C as "interrupted; rerun the same command to resume" with status 130, `rexmol train`
never replacing another run's outputs or printing third-party adverts, `evaluate` finding the shipped reference
from any directory, and the README's log-density snippet running as written (and flagging an unresolved solve).
"""
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from rexmol.cli import main

INTERRUPTED = "interrupted; rerun the same command to resume"
REPO = Path(__file__).resolve().parents[1]


def test_ctrl_c_is_one_line_with_the_resume_hint(monkeypatch, capsys):
    from rexmol.commands import roundtrip

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(roundtrip, "run", interrupted)
    assert main(["roundtrip"]) == 130
    assert capsys.readouterr().err == f"rexmol roundtrip: {INTERRUPTED}\n"
    with pytest.raises(KeyboardInterrupt):
        main(["roundtrip", "--debug"])


def test_os_error_is_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["roundtrip", "--solvers", "rex-euler", "--steps", "2", "--batch", "2", "--plot",
                 str(tmp_path / "file" / "plot.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "file/plot.png" in err and "Traceback" not in err, err


def test_evaluate_finds_the_shipped_reference_from_another_directory(tmp_path, monkeypatch):
    from rexmol.commands.evaluate import shipped

    monkeypatch.chdir(tmp_path)
    assert shipped(Path("data/ala3")) == REPO / "data/ala3" and (REPO / "data/ala3/manifest.json").is_file()
    (tmp_path / "data" / "ala3").mkdir(parents=True)
    assert shipped(Path("data/ala3")) == Path("data/ala3")  # a dataset where the user is wins


def test_sde_advice_in_readme_and_roundtrip_help_agree(capsys):
    from rexmol.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["roundtrip", "--help"])
    help_text = " ".join(re.sub(r"-\n\s+", "-", capsys.readouterr().out).split())  # argparse wraps at hyphens
    readme = " ".join((REPO / "README.md").read_text().split())
    for advice in ("--t0 0.2 --t1 0.8 --grid log-varsigma", "~1e-13", "--t0 1e-3 --t1 0.99", "~5e-6"):
        assert advice in help_text and advice in readme, advice


def _readme_block(section: str) -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(section):], re.S)[1]


def test_readme_log_density_snippet_runs_as_written(capsys):
    code = _readme_block("## Python API: log-densities")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an accurate solve raises no typical-set warning
        exec(compile(code, "README.md (log-densities)", "exec"), {})
    logq_error, roundtrip = map(float, re.findall(r"[-+0-9.e]+", capsys.readouterr().out.split("log q error")[1]))
    assert logq_error < 0.05 and roundtrip < 1e-8


def test_unresolved_backward_solve_is_flagged():
    """rex-rk4 on 4 uniform-t steps to t = 0.999 (data-kind): log q off by ~6e8 against the closed form."""
    from rexmol.likelihood.check import gaussian_problem
    from rexmol.likelihood.flow import log_density
    from rexmol.solvers import FixedGrid, LawsonCoordinates

    prior, flow = gaussian_problem("mean-free", n_particles=33)
    x0 = prior.sample(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = flow.flow(x0, 0.0, 0.999)
    with pytest.warns(RuntimeWarning, match="outside the prior's typical set"):
        logq, _, _ = log_density(flow.model("velocity"), prior, x, "rex-rk4", FixedGrid.uniform_t(0.0, 0.999, 4),
                                 coords=LawsonCoordinates(kind="data", output="velocity"))
    assert float((logq - flow.log_density(x, 0.999, prior.dim)).abs().max()) > 1e6  # it was garbage indeed


# ---------------------------------------------------------------------------------------------- rexmol train


@pytest.fixture(scope="module")
def train_config(tmp_path_factory) -> tuple[Path, Path]:
    """training/tiny.yaml with every output under a temporary run folder, on a 60-frame dataset."""
    from tiny_fixtures import make_tiny_dataset

    root = tmp_path_factory.mktemp("train")
    data = make_tiny_dataset(root)
    text = (REPO / "training" / "tiny.yaml").read_text().replace("runs/tiny", str(root / "run"))
    text = text.replace("data_dir: /tmp/mdtest", f"data_dir: {data}")
    config = root / "tiny.yaml"
    config.write_text(text)
    return config, root / "run"


def _train(capfd, config: Path, *extra: str) -> tuple[int, str]:
    status = main(["train", "--config", str(config), "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
                   "--trainer.limit_val_batches", "1", *extra])
    out = capfd.readouterr()
    return status, out.out + out.err


def test_train_refuses_to_replace_another_runs_outputs(train_config, capfd):
    config, run = train_config
    status, text = _train(capfd, config, "--quiet", "--seed", "3")
    assert status == 0, text
    assert (run / "model" / "generator.pt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "Tip:" not in text and "litlogger" not in text and "deprecated" not in text, text
    assert "GPU available" not in text and "Epoch 0" not in text, text  # --quiet
    before = (run / "model" / "generator.pt").read_bytes()
    status, text = _train(capfd, config)
    assert status == 2, text
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(r"rexmol train: error: .*(generator.pt|last.ckpt) already exists .*--overwrite.*", last), text
    assert "Traceback" not in text and (run / "model" / "generator.pt").read_bytes() == before
    status, text = _train(capfd, config, "--overwrite", "--quiet")
    assert status == 0, text
    status, text = _train(capfd, config, "--quiet", "--ckpt_path", str(run / "nope.ckpt"))
    assert status == 2 and text.strip().splitlines()[-1].startswith("rexmol train: error: --ckpt_path "), text
    assert "nope.ckpt does not exist" in text and "Traceback" not in text, text


def test_shipped_training_config_exports_into_its_run_folder():
    import yaml

    config = yaml.safe_load((REPO / "training" / "ala3_dit.yaml").read_text())
    root = config["trainer"]["default_root_dir"]
    for cb in config["trainer"]["callbacks"]:
        for value in (cb.get("init_args") or {}).values():
            assert not str(value).startswith("data/"), cb  # nothing is written into the shipped data/
    from rexmol.training import ExportGenerator

    class Trainer:
        default_root_dir = root

    assert ExportGenerator().resolve_dir(Trainer()) == Path(root) / "model"


# ------------------------------------------------------------------------------------- interrupt, for real


@pytest.mark.slow
def test_sigint_during_sample_ends_cleanly_and_resumes(tmp_path):
    from tiny_fixtures import make_tiny_ckpt

    ckpt = make_tiny_ckpt(tmp_path / "tiny.pt")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "rexmol.cli", "sample", "--ckpt", ckpt, "--solver", "rex-euler", "--steps", "2",
               "--n", "40", "--batch-size", "2", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "batches" / "b00000.npz").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip() == f"rexmol sample: {INTERRUPTED}", (proc.returncode, err)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (out / "samples.npz").is_file()
