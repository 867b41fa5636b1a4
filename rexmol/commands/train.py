"""``rexmol train --config training/<name>.yaml [--section.option value ...]``: LightningCLI over
:class:`rexmol.training.FlowMatching` and :class:`rexmol.data.MDDataModule`.

Every option of the config (``trainer.*``, ``model.*``, ``data.*``) can be overridden on the command line,
e.g. ``--trainer.max_time 00:01:00:00 --model.size tiny --data.batch_size 64``. ``--ckpt_path PATH`` resumes a
run from a Lightning checkpoint (weights, optimiser, schedule, EMA, step, elapsed time). ``--threads N`` sets
torch's intra-op thread count (``0``: leave torch's default). ``rexmol train --help`` lists everything.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch


def configure(parser: argparse.ArgumentParser) -> None:
    """LightningCLI parses ``rexmol train`` itself (the top-level cli hands it the raw argv)."""


def run(args: argparse.Namespace) -> int:
    return main([])


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class TrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume from this checkpoint")
            parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
            parser.link_arguments("model.system", "data.system")

    return TrainCLI


def main(argv: list[str]) -> int:
    """Parse ``argv`` (everything after ``rexmol train``), train, return the exit status."""
    from rexmol.data import MDDataModule
    from rexmol.training import FlowMatching

    # argv is handed over by the top-level cli, so Lightning's "args and sys.argv both given" warning is noise
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    try:
        cli = _cli_class()(
            FlowMatching, MDDataModule, run=False, args=argv, auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "rexmol train", "description": __doc__},
        )
        if cli.config.threads > 0:
            torch.set_num_threads(cli.config.threads)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    except (ValueError, FileNotFoundError) as err:
        print(f"rexmol train: error: {err}", file=sys.stderr)
        return 2
    return 0
