#!/usr/bin/env bash
# Issue 9 benchmark (not a timed test): exact density of the discrete sampler vs the integrated divergence on the
# tri-alanine DiT. Rex-RK4 with 8/16/32 fixed steps under `--trace discrete` and `--trace exact`, and Rex-Dopri5
# under `--trace exact` at the published tolerance (rtol = atol = 1e-4), all from the same prior draws (--seed),
# then one table (ESS, E-W2, T-W2, NFE, s/sample) with `rexmol evaluate`.
#
#   N=10000 OUT=runs/discrete_ala3 bash evaluation/discrete_density_ala3.sh
#
# Cost per NFE of `discrete` is about that of `exact` (the full 96 x 96 Jacobian comes from the same products as
# the trace); the fixed grids are uniform in t (`--steps`), independent of the samples as the discrete density needs.
set -euo pipefail
CKPT=${CKPT:-data/ala3/model/generator.pt}
N=${N:-10000}
OUT=${OUT:-runs/discrete_ala3}
SEED=${SEED:-0}
STEPS=${STEPS:-"8 16 32"}
REXMOL=${REXMOL:-.venv/bin/rexmol}
COMMON=(--ckpt "$CKPT" --n "$N" --seed "$SEED" --no-roundtrip --dtype float64 --quiet)

dirs=()
for s in $STEPS; do
  for mode in discrete exact; do
    d="$OUT/rex-rk4-${s}-${mode}"
    "$REXMOL" sample "${COMMON[@]}" --solver rex-rk4 --steps "$s" --trace "$mode" --out "$d"
    dirs+=("$d")
  done
done
d="$OUT/rex-dopri5-exact"
"$REXMOL" sample "${COMMON[@]}" --solver rex-dopri5 --rtol 1e-4 --atol 1e-4 --trace exact --out "$d"
dirs+=("$d")

"$REXMOL" evaluate "${dirs[0]}" --against "${dirs[@]:1}" --reference data/ala3 --out "$OUT/report"
cat "$OUT/report/"*.md
