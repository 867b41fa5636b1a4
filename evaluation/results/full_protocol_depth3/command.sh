#!/bin/bash
# Full protocol as shipped at 6622a23 (default generator data/ala3/model_ic_sym_depth3), frozen worktree /work/run_final.
cd /work/run_final
export PYTHONPATH=/work/run_final OMP_NUM_THREADS=1
echo "start $(date -u +%FT%TZ)"
/usr/bin/time -v /work/main/.venv/bin/rexmol demo --full --seed 0 --out /work/main/runs/full_protocol_final
echo "end $(date -u +%FT%TZ)"
