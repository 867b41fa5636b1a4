"""``rexmol train --config training/<name>.yaml [--section.option value ...]``: LightningCLI over
:class:`rexmol.training.FlowMatching` and :class:`rexmol.data.MDDataModule`.

Every option of the config (``trainer.*``, ``model.*``, ``data.*``) can be overridden on the command line,
e.g. ``--trainer.max_time 00:01:00:00 --model.size tiny --data.batch_size 64``. ``--ckpt_path PATH`` resumes a
run from a Lightning checkpoint (weights, optimiser, schedule, EMA, step, elapsed time). ``--threads N`` sets
torch's intra-op thread count (``0``: leave torch's default). ``--seed N`` is ``--seed_everything N``;
``--quiet`` hides progress bars and Lightning's info lines. A new run (no ``--ckpt_path``) refuses to start in a
folder that already holds a run's checkpoints or exported generator unless ``--overwrite`` is given, so a shipped
generator or a finished run is never replaced by accident. ``rexmol train --help`` lists everything.
"""
from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import torch

# Lightning's advertisements (logged at info level) and a deprecation it triggers inside torch: noise to a user
ADVERT = "💡 Tip:"
DEPRECATIONS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


def configure(parser: argparse.ArgumentParser) -> None:
    """LightningCLI parses ``rexmol train`` itself (the top-level cli hands it the raw argv)."""


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class TrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume from this checkpoint")
            parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
            parser.link_arguments("model.system", "data.system")

    return TrainCLI


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERT)


def quieten(quiet: bool) -> None:
    """Drop Lightning's adverts and the deprecation warning it triggers; with ``quiet`` also its info lines."""
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(f"{name}.utilities.rank_zero").addFilter(_DropAdverts())  # where rank_zero_info logs
        if quiet:
            logging.getLogger(name).setLevel(logging.WARNING)
    for message in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message)
    # argv is handed over by the top-level cli, so Lightning's "args and sys.argv both given" warning is noise
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")


def _split_flags(argv: list[str]) -> tuple[list[str], bool, bool]:
    """``(argv for LightningCLI, quiet, overwrite)``: our flags ``--quiet`` and ``--overwrite`` taken out,
    ``--seed N`` turned into LightningCLI's ``--seed_everything N``."""
    quiet, overwrite = "--quiet" in argv, "--overwrite" in argv
    out, i = [], 0
    argv = [a for a in argv if a not in ("--quiet", "--overwrite")]
    while i < len(argv):
        if argv[i] == "--seed" and i + 1 < len(argv):
            out += ["--seed_everything", argv[i + 1]]
            i += 2
            continue
        out.append(argv[i].replace("--seed=", "--seed_everything=", 1) if argv[i].startswith("--seed=") else argv[i])
        i += 1
    return out, quiet, overwrite


def check_outputs(trainer, ckpt_path: str | None, overwrite: bool) -> None:
    """Refuse a missing ``--ckpt_path``, and a new run into folders holding another run's files (see module doc)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from rexmol.training import ExportGenerator

    if ckpt_path is not None:
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path} does not exist (the resume checkpoint is "
                                    "<run folder>/checkpoints/last.ckpt)")
        return
    if overwrite:
        return
    taken, resume = [], "<run folder>/checkpoints/last.ckpt"
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
            taken += sorted(Path(cb.dirpath).glob("*.ckpt"))
            if (Path(cb.dirpath) / "last.ckpt").is_file():
                resume = str(Path(cb.dirpath) / "last.ckpt")
        elif isinstance(cb, ExportGenerator):
            folder = cb.resolve_dir(trainer)
            taken += [folder / name for name in (cb.filename, cb.last_filename) if (folder / name).is_file()]
    if taken:
        raise ValueError(f"{taken[0]} already exists (another run's output); resume that run with --ckpt_path "
                         f"{resume}, write elsewhere (--trainer.default_root_dir and the callbacks' dirpath), or "
                         "pass --overwrite to replace it")


def main(argv: list[str]) -> int:
    """``rexmol train ARGV``: :func:`train` with the command line's one-line errors and exit statuses."""
    from rexmol.cli import main as cli_main

    return cli_main(["train", *argv])


def train(argv: list[str]) -> int:
    """Parse ``argv`` (everything after ``rexmol train``) and train; errors propagate (see :func:`main`)."""
    from lightning.pytorch.callbacks import ProgressBar

    from rexmol.data import MDDataModule
    from rexmol.training import FlowMatching

    argv, quiet, overwrite = _split_flags(argv)
    quieten(quiet)
    cli = _cli_class()(
        FlowMatching, MDDataModule, run=False, args=argv, auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "rexmol train", "description": __doc__},
    )
    check_outputs(cli.trainer, cli.config.ckpt_path, overwrite)
    if quiet:
        for cb in cli.trainer.callbacks:
            if isinstance(cb, ProgressBar):
                cb.disable()
    if cli.config.threads > 0:
        torch.set_num_threads(cli.config.threads)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    return 0
