"""``rexmol sample``: not built yet; see the project's open issues."""
import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``rexmol sample``."""


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("see the open issues")
