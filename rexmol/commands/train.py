"""``rexmol train``: not built yet; see the project's open issues."""
import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``rexmol train`` (LightningCLI parses them itself)."""


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("see the open issues")


def main(argv: list[str]) -> int:
    print("rexmol train: not implemented yet (see the open issues)", file=sys.stderr)
    return 3
