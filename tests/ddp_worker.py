"""Run by tests/test_training_ddp.py: 2-process DDP (gloo, CPU) training; each rank saves its final weights.

Usage: python tests/ddp_worker.py DATA_DIR OUT_DIR [plain|ic]  (Lightning re-launches this script for rank 1).
``plain``: the tiny Cartesian DiT, no validation, no logger. ``ic``: the tiny internal-coordinate hollow generator
with the shipped run's callbacks (CSV logger, ValidationESS, ExportGenerator monitoring val/ess, LossCurve) and a
validation every 4 steps, the rank-0-only hooks that must not call collectives.
"""
import sys
from pathlib import Path

import lightning as L
import torch
from test_ic_generator import TINY_HOLLOW

from rexmol.data import MDDataModule
from rexmol.training import ExportGenerator, FlowMatching, LossCurve, ValidationESS

if __name__ == "__main__":
    data_dir, out = sys.argv[1], Path(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "plain"
    torch.set_num_threads(1)
    L.seed_everything(0)
    if mode == "plain":
        dm = MDDataModule(data_dir, batch_size=4)
        module = FlowMatching(size="tiny", lr=3e-3, warmup_steps=2, schedule_steps=8)
        extra = dict(logger=False, enable_checkpointing=False, limit_val_batches=0)
    else:
        dm = MDDataModule(data_dir, batch_size=8, rotate=False)
        module = FlowMatching(coordinates="internal", network="hollow", hollow=TINY_HOLLOW, lr=3e-3,
                              warmup_steps=2, schedule_steps=8)
        callbacks = [ValidationESS(n_samples=8, steps=2, n_reference=8),
                     ExportGenerator(str(out / "model"), monitor="val/ess"), LossCurve(str(out / "loss.png")),
                     L.pytorch.callbacks.ModelCheckpoint(out / "ckpt", save_last=True, every_n_train_steps=4)]
        extra = dict(logger=L.pytorch.loggers.CSVLogger(out, name="logs"), callbacks=callbacks, limit_val_batches=1,
                     val_check_interval=4, check_val_every_n_epoch=None)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=out, **extra)
    trainer.fit(module, datamodule=dm)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    torch.save({"state": state, "world_size": trainer.world_size, "step": trainer.global_step},
               out / f"rank{trainer.global_rank}.pt")
