"""``rexmol demo``: not built yet; see the project's open issues."""
import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``rexmol demo``."""


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("see the open issues")
