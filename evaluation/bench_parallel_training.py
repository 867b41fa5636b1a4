"""Two cores for training: Lightning DDP with 2 processes (1 thread each) against 1 process with 2 threads.

Issue 13 asks which way a 2-core machine trains the shipped generators faster. Both modes run the same global
batch (the config's ``data.batch_size``; DDP gives each rank half of it), the same model, recipe and data as the
config, with validation, checkpoints and exports off; the figure is training steps per second of wall time from
step ``--skip`` to the last step, timed on rank 0, and process CPU seconds per step summed over the processes.
Each mode runs ``--repeats`` times, interleaved, in its own child process (so DDP's launcher re-runs this file);
the best run of each is compared. Run it on an otherwise idle machine (pause other jobs):

    .venv/bin/python evaluation/bench_parallel_training.py --config training/ala3_ic_hollow.yaml \
        --json evaluation/results/parallel_training_ala3_ic.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

MODES = {"threads2": {"devices": 1, "threads": 2}, "ddp2": {"devices": 2, "threads": 1}}


def child(args: argparse.Namespace) -> None:
    """One timed run in this process (and, for DDP, its launched peer); rank 0 writes ``args.result``."""
    import lightning as L
    import torch

    from rexmol.data import MDDataModule
    from rexmol.training import FlowMatching

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.start: tuple[float, float] | None = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if trainer.global_step == args.skip:
                if trainer.world_size > 1:
                    torch.distributed.barrier()
                self.start = (time.perf_counter(), time.process_time())

        def on_train_end(self, trainer, module) -> None:
            wall, cpu = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
            cpu_all = trainer.strategy.reduce(torch.tensor(cpu, dtype=torch.float64), reduce_op="sum").item()
            if trainer.is_global_zero:
                Path(args.result).write_text(json.dumps({"wall_s": wall, "cpu_s": cpu_all, "steps": args.steps}))

    mode = MODES[args.mode]
    torch.set_num_threads(mode["threads"])
    config = yaml.safe_load(Path(args.config).read_text())
    data = dict(config["data"], system=config["model"]["system"])
    data["batch_size"] = data["batch_size"] // mode["devices"]
    L.seed_everything(0, verbose=False)
    module = FlowMatching(**config["model"])
    trainer = L.Trainer(accelerator="cpu", devices=mode["devices"], strategy="ddp" if mode["devices"] > 1 else "auto",
                        max_steps=args.skip + args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=config["trainer"].get("gradient_clip_val"),
                        precision=config["trainer"].get("precision", "32-true"), callbacks=[StepTimer()],
                        default_root_dir=args.root)
    trainer.fit(module, datamodule=MDDataModule(**data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="training/ala3_ic_hollow.yaml")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--skip", type=int, default=5, help="untimed warm-up steps per run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    if args.json and Path(args.json).exists():
        raise SystemExit(f"--json {args.json} already exists; remove it or choose another path")
    runs: dict[str, list[dict]] = {name: [] for name in MODES}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in MODES:
                result = Path(tmp) / f"{name}_{repeat}.json"
                subprocess.run([sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                                "--skip", str(args.skip), "--mode", name, "--result", str(result),
                                "--root", str(Path(tmp) / f"{name}_{repeat}")], check=True, env=env)
                runs[name].append(json.loads(result.read_text()))
                print(f"{name} run {repeat}: {args.steps / runs[name][-1]['wall_s']:.3f} steps/s wall", flush=True)
    best = {name: min(r["wall_s"] for r in rs) / args.steps for name, rs in runs.items()}
    cpu = {name: min(r["cpu_s"] for r in rs) / args.steps for name, rs in runs.items()}
    summary = {"config": args.config, "global_batch": yaml.safe_load(Path(args.config).read_text())["data"]["batch_size"],
               "timed_steps": args.steps, "repeats": args.repeats, "wall_s_per_step": best, "cpu_s_per_step": cpu,
               "speedup_ddp2_over_threads2": best["threads2"] / best["ddp2"], "runs": runs}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.json:
        tmp_path = Path(args.json).with_suffix(".tmp")
        tmp_path.write_text(json.dumps(summary, indent=1) + "\n")
        tmp_path.replace(args.json)


if __name__ == "__main__":
    main()
