"""Small real inputs shared by the sampling/evaluation tests: a short ala3 MD dataset and an untrained tiny DiT."""
import shutil
from pathlib import Path

import torch

from rexmol.systems import load_system, systems_root


def make_tiny_dataset(root: Path) -> Path:
    """60 ps of ala3 MD by `rexmol md` (2 ps equilibration instead of 100 ps), 20-frame split windows -> 9 test
    frames."""
    from rexmol.md import MDConfig, run_md

    system_dir = root / "ala3_short_equilibration"
    shutil.copytree(systems_root() / "ala3", system_dir)
    spec = (system_dir / "spec.toml").read_text()
    (system_dir / "spec.toml").write_text(spec.replace("equilibration_ps = 100.0", "equilibration_ps = 2.0"))
    out = root / "md"
    run_md(MDConfig(str(system_dir), ns=0.06, replicas=1, seed=5, chunk_ps=30.0, split_window_ns=0.02), out,
           workers=1, quiet=True)
    return out


def make_tiny_ckpt(path: Path) -> str:
    """An untrained tiny DiT for ala3 with randomised weights (its zero-initialised head would give v = 0)."""
    from rexmol.models.checkpoint import save_generator
    from rexmol.models.dit import AtomDiT, DiTConfig

    torch.manual_seed(0)
    model = AtomDiT.for_system(load_system("ala3"), DiTConfig.from_size("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return str(save_generator(path, model, system_name="ala3", scale=0.15))
