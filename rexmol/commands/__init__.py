"""One module per ``rexmol`` subcommand, each with ``configure(parser)`` and ``run(args) -> int``; ``train`` has
``train(argv) -> int`` instead (LightningCLI parses its own command line)."""
