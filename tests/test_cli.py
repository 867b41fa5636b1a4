"""The command-line skeleton: every planned subcommand is listed and takes the global conventions."""
import subprocess
import sys

import pytest

from rexmol.cli import SUBCOMMANDS, build_parser, main


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "rexmol.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("md", "train", "sample", "evaluate", "roundtrip", "demo"):
        assert name in SUBCOMMANDS
        assert name in out.stdout


REQUIRED = {"md": ["ala3", "--ns", "1", "--out", "somewhere"]}


@pytest.mark.parametrize("name", [n for n in SUBCOMMANDS if n != "train"])
def test_subcommands_take_seed_and_quiet(name):
    parser = build_parser()
    args, _ = parser.parse_known_args([name, *REQUIRED.get(name, []), "--seed", "7", "--quiet"])
    assert args.seed == 7 and args.quiet


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_top_level_help_imports_no_subcommand_module_and_no_torch():
    code = ("import sys\nfrom rexmol.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('rexmol.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
