"""Command-line entry point: ``rexmol md | train | sample | evaluate | roundtrip | demo``.

Each subcommand lives in its own module ``rexmol.commands.<name>`` exposing ``configure(parser)`` and
``run(args) -> int``; this file only wires them together and owns the global conventions: ``--seed`` for
reproducibility, ``--quiet`` to silence progress bars, and how a run ends. A bad input (``ValueError``,
``OSError``: a missing, damaged or misplaced file) ends in one line naming the file or option and exit status 2;
Ctrl-C ends in "interrupted; rerun the same command to resume" and status 130 (every command is resumable);
``--debug`` (anywhere on the line) shows the traceback instead. Every command runs with rexmol's allocator policy
(:mod:`rexmol.allocator`: freed activations stay in the process; no result depends on it).

A subcommand's module is imported only when that subcommand is named, so ``rexmol --help`` does not import torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable

from rexmol.allocator import tune_allocator

SUBCOMMANDS: dict[str, str] = {
    "md": "generate molecular-dynamics data with OpenMM (resumable)",
    "train": "train a DiT flow-matching model with PyTorch Lightning",
    "sample": "Boltzmann-sample a model with a Rex (or baseline) solver: x, log q, energies, log w",
    "evaluate": "ESS, E-W2, T-W2 against held-out MD; solver comparison table and plots",
    "roundtrip": "forward-then-backward solve: round-trip error of each solver and step count",
    "demo": "the main job: a small end-to-end run on the shipped tri-alanine data",
}
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
INTERRUPTED = "interrupted; rerun the same command to resume"
DEBUG_FLAG = "--debug"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says its default, or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or "default" in text:
            return text
        return super()._get_help_string(action)


def _module(name: str):
    return importlib.import_module(f"rexmol.commands.{name}")


def build_parser(configure: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser (``--help`` shows each option's default); every subcommand is listed, but only those in
    ``configure`` (default: all) get their options, which imports their modules."""
    configure = set(SUBCOMMANDS if configure is None else configure)
    parser = argparse.ArgumentParser(
        prog="rexmol",
        description="Boltzmann sampling of molecules with exactly reversible (Rex) ODE/SDE solvers.",
    )
    from rexmol import __version__

    parser.add_argument("--version", action="version", version=f"rexmol {__version__}")
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an error (any position)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        p.add_argument("--seed", type=int, default=0, help="random seed (every command is reproducible)")
        p.add_argument("--quiet", action="store_true", help="no progress bars or chatter")
        if name in configure:
            _module(name).configure(p)
    return parser


def one_line(err: BaseException) -> str:
    """An exception's message on one line (OSError: ``strerror: filename``)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    prefix = f"rexmol {command}" if command else "rexmol"
    tune_allocator()
    try:
        if command == "train":  # LightningCLI owns its own parser
            return int(_module("train").train(argv[1:]) or 0)
        parser = build_parser([command] if command else [])
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return int(_module(args.command).run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}: {INTERRUPTED}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as err:
        if debug:
            raise
        print(f"{prefix}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
