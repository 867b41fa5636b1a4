"""Fixtures shared by several test files."""
import re
import shutil
from pathlib import Path

import pytest

from rexmol.systems import load_system


@pytest.fixture(scope="module")
def quick_ala3(tmp_path_factory) -> Path:
    """ala3 with ``equilibration_ps = 1``: a system folder usable wherever a system name is."""
    system = load_system("ala3")
    folder = tmp_path_factory.mktemp("systems") / "ala3"
    folder.mkdir()
    shutil.copyfile(system.pdb_path, folder / "topology.pdb")
    text = (system.folder / "spec.toml").read_text()
    text, n = re.subn(r"(?m)^equilibration_ps\s*=.*$", "equilibration_ps = 1.0", text)
    assert n == 1
    (folder / "spec.toml").write_text(text)
    return folder
