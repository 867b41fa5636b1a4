#!/usr/bin/env bash
# Issue 9 benchmark (not a timed test): exact density of the discrete sampler vs the integrated divergence on the
# tri-alanine DiT. One `rexmol evaluate --ckpt` run samples every entry from the same prior draws (--seed):
# Rex-RK4 on 8/16/32 fixed steps with `discrete` log q (the exact density of the solver map), Rex-RK4 on 8 steps
# with the integrated exact trace (same samples as its discrete row, other log q), and Rex-Dopri5 with the
# integrated exact trace at the published tolerance (rtol = atol = 1e-4); then one table (ESS, E-W2, T-W2, NFE,
# s/sample) in OUT/report/report.md.
#
#   N=10000 OUT=runs/discrete_ala3 bash evaluation/discrete_density_ala3.sh
#
# Cost per NFE of `discrete` is about that of `exact` (the full 96 x 96 Jacobian comes from the same products as
# the trace); fixed grids are uniform in t, independent of the samples as the discrete density needs. Data-kind
# Lawson coordinates on [0, 0.999] (the paper's Rex), float64 state around a float32 network (--model-dtype).
set -euo pipefail
CKPT=${CKPT:-data/ala3/model/generator.pt}
N=${N:-10000}
OUT=${OUT:-runs/discrete_ala3}
SEED=${SEED:-0}
DTYPE=${DTYPE:-float64}
MODEL_DTYPE=${MODEL_DTYPE:-float32}
PROCESSES=${PROCESSES:-2}
BATCH=${BATCH:-16}
SOLVERS=${SOLVERS:-rex-rk4@8:discrete,rex-rk4@16:discrete,rex-rk4@32:discrete,rex-rk4@8:exact,rex-dopri5:exact}
REXMOL=${REXMOL:-.venv/bin/rexmol}

"$REXMOL" evaluate --ckpt "$CKPT" --solvers "$SOLVERS" --rtol 1e-4 --lawson data --t1 0.999 \
    --n "$N" --batch-size "$BATCH" --processes "$PROCESSES" --dtype "$DTYPE" --model-dtype "$MODEL_DTYPE" --no-roundtrip \
    --reference data/ala3 --out "$OUT" --seed "$SEED" --quiet
cat "$OUT/report/report.md"
