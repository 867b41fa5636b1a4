"""Command-line entry point: ``rexmol md | train | sample | evaluate | roundtrip | demo``.

Each subcommand lives in its own module ``rexmol.commands.<name>`` exposing ``configure(parser)`` and
``run(args) -> int``; this file only wires them together and owns the global conventions
(``--seed`` for reproducibility, ``--quiet`` to silence progress bars).
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, str] = {
    "md": "generate molecular-dynamics data with OpenMM (resumable)",
    "train": "train a DiT flow-matching model with PyTorch Lightning",
    "sample": "Boltzmann-sample a model with a Rex (or baseline) solver: x, log q, energies, log w",
    "evaluate": "ESS, E-W2, T-W2 against held-out MD; solver comparison table and plots",
    "roundtrip": "forward-then-backward solve: round-trip error of each solver and step count",
    "demo": "the main job: a small end-to-end run on the shipped tri-alanine data",
}


def _module(name: str):
    return importlib.import_module(f"rexmol.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every subcommand's options."""
    parser = argparse.ArgumentParser(
        prog="rexmol",
        description="Boltzmann sampling of molecules with exactly reversible (Rex) ODE/SDE solvers.",
    )
    from rexmol import __version__

    parser.add_argument("--version", action="version", version=f"rexmol {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--seed", type=int, default=0, help="random seed (every command is reproducible)")
        p.add_argument("--quiet", action="store_true", help="no progress bars or chatter")
        _module(name).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":  # LightningCLI owns its own parser
        return _module("train").main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(_module(args.command).run(args) or 0)
    except NotImplementedError as err:
        print(f"rexmol {args.command}: not implemented yet ({err})", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as err:
        print(f"rexmol {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
