"""Run by tests/test_training_ddp.py: 2-process DDP (gloo, CPU) training; each rank saves its final weights.

Usage: python tests/ddp_worker.py DATA_DIR OUT_DIR  (Lightning re-launches this script for rank 1).
"""
import sys
from pathlib import Path

import lightning as L
import torch

from rexmol.data import MDDataModule
from rexmol.training import FlowMatching

if __name__ == "__main__":
    data_dir, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    L.seed_everything(0)
    dm = MDDataModule(data_dir, batch_size=4)
    module = FlowMatching(size="tiny", lr=3e-3, warmup_steps=2, schedule_steps=8)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out)
    trainer.fit(module, datamodule=dm)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    torch.save({"state": state, "world_size": trainer.world_size, "step": trainer.global_step},
               out / f"rank{trainer.global_rank}.pt")
