"""One module per ``rexmol`` subcommand, each with ``configure(parser)`` and ``run(args) -> int``."""
