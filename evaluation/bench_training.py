"""Training throughput of ``rexmol train`` (Lightning) against a bare PyTorch loop, and DiT forward cost.

Both loops run the same work per step: a shuffled batch of centred frames, a random rotation per frame,
normalisation, the flow-matching loss, backward, gradient clipping at 1.0, AdamW, the warm-up/cosine
schedule and the EMA update. Each loop runs ``--repeats`` times, interleaved, and the best run of each is
compared (the machine is shared; CPU time is reported too). The forward time is per sample, no grad.

    nice -n 10 .venv/bin/python evaluation/bench_training.py --data-dir data/ala3 --size small --batch-size 64 \
        --like data/ala3/model/generator.pt
"""
from __future__ import annotations

import argparse
import math
import time

import lightning as L
import torch

from rexmol.data import MDDataModule, random_rotations
from rexmol.training import FlowMatching, flow_matching_loss, mean_free_noise


class StepTimer(L.Callback):
    """Wall and CPU time from the start of step ``skip`` to the end of the last step."""

    def __init__(self, skip: int):
        self.skip = skip
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.skip:
            self.start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.end = (time.perf_counter(), time.process_time())


def lightning_run(dm: MDDataModule, args, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    module = FlowMatching(size=args.size, warmup_steps=10, schedule_steps=10_000, **args.arch)
    timer = StepTimer(args.skip)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.skip + steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    return timer.end[0] - timer.start[0], timer.end[1] - timer.start[1]


def bare_run(dm: MDDataModule, args, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    module = FlowMatching(size=args.size, warmup_steps=10, schedule_steps=10_000, **args.arch)
    model, ema = module.model, module.ema
    scale = dm.scale
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / 10_000)))
    loader = torch.utils.data.DataLoader(dm.train_set, batch_size=dm.batch_size, shuffle=True, drop_last=True)
    step, start = 0, None
    while step < args.skip + steps:
        for batch in loader:
            if step == args.skip:
                start = (time.perf_counter(), time.process_time())
            rot = random_rotations(len(batch), dtype=batch.dtype)
            x1 = (batch @ rot.transpose(1, 2)) / scale
            x0 = mean_free_noise(tuple(x1.shape), dtype=x1.dtype)
            loss = flow_matching_loss(model, x1, x0, torch.rand(len(x1)), time_power=1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            decay = min(0.999, (1.0 + step) / (10.0 + step))
            torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
            step += 1
            if step == args.skip + steps:
                break
    return time.perf_counter() - start[0], time.process_time() - start[1]


def forward_cost(args) -> list[str]:
    module = FlowMatching(size=args.size, **args.arch)
    model = module.model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    lines = []
    for dtype in (torch.float32, torch.float64):
        model.to(dtype)
        for batch in (1, 64, 256):
            x, t = torch.randn(batch, model.n_atoms, 3, dtype=dtype), torch.rand(batch, dtype=dtype)
            reps = max(3, 512 // batch)
            with torch.no_grad():
                model(x, t)
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(reps):
                    model(x, t)
                w1, c1 = time.perf_counter(), time.process_time()
            lines.append(f"forward {str(dtype).replace('torch.', ''):8s} batch {batch:4d}: "
                         f"{(w1 - w0) / reps / batch * 1e3:7.3f} ms/sample wall, "
                         f"{(c1 - c0) / reps / batch * 1e3:7.3f} ms/sample CPU")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/ala3")
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--skip", type=int, default=5, help="untimed warm-up steps per run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--like", default=None, help="take the architecture from this generator file / checkpoint")
    args = parser.parse_args()
    args.arch = {}
    if args.like:
        from rexmol.models.checkpoint import load_generator

        config = load_generator(args.like).model.config.to_dict()
        args.arch = {k: config[k] for k in ("hidden", "depth", "heads", "mlp_ratio", "graph_bias", "distance_bias",
                                            "chirality", "local_frames")}
    torch.set_num_threads(args.threads)
    dm = MDDataModule(args.data_dir, batch_size=args.batch_size, max_train_frames=4096)
    dm.setup()
    results: dict[str, list[tuple[float, float]]] = {"lightning": [], "bare": []}
    for _ in range(args.repeats):
        results["lightning"].append(lightning_run(dm, args, args.steps))
        results["bare"].append(bare_run(dm, args, args.steps))
    print(f"DiT {args.size} {args.arch or ''}, batch {args.batch_size}, {args.steps} timed steps, "
          f"{args.threads} thread(s), best of {args.repeats}")
    best = {}
    for name, runs in results.items():
        wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
        best[name] = (wall, cpu)
        print(f"{name:9s}: {args.steps / wall:6.2f} it/s wall ({args.steps / cpu:6.2f} it/s CPU time)   "
              f"all runs wall s: {[round(r[0], 2) for r in runs]}")
    print(f"ratio lightning/bare it/s: wall {best['bare'][0] / best['lightning'][0]:.3f}, "
          f"CPU time {best['bare'][1] / best['lightning'][1]:.3f}")
    for line in forward_cost(args):
        print(line)


if __name__ == "__main__":
    main()
