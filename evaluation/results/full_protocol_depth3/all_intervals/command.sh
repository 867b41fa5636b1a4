#!/bin/bash
# Full protocol with the depth-3 candidate, code frozen at 9d62556 in worktree /work/run_d3.
cd /work/run_d3
export PYTHONPATH=/work/run_d3 OMP_NUM_THREADS=1
/usr/bin/time -v /work/main/.venv/bin/rexmol demo --full --ckpt data/ala3/model_ic_sym_depth3/generator.pt --seed 0 --out /work/main/runs/full_protocol_depth3
