"""The wheel ships the molecular systems (package ``rexmol_systems``) so an installed rexmol needs no checkout."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_systems_and_cli(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("rexmol-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for spec in ROOT.glob("systems/*/spec.toml"):
        assert f"rexmol_systems/{spec.parent.name}/spec.toml" in names
    for pdb in ROOT.glob("systems/*/*.pdb"):
        assert f"rexmol_systems/{pdb.parent.name}/{pdb.name}" in names
    assert "rexmol/cli.py" in names
    for init in ROOT.glob("rexmol/**/__init__.py"):  # every subpackage is listed in pyproject's `packages`
        assert init.relative_to(ROOT).as_posix() in names, f"{init.parent.name} missing from the wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rexmol = rexmol.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
