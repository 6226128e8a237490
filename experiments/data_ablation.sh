#!/usr/bin/env bash
# LLaVA's ablation on the instruction data (paper Sec. 5.1, Table 4) on the synthetic world: the
# experiment config mmkit/conf/experiment/data_ablation.yaml, swept with Hydra multirun, then one
# table by python -m mmkit.report. Stage 2 on the full data, on detail + complex reasoning, on
# conversation + 5% detail + 10% complex reasoning, on conversation alone, and no stage 2 at all,
# each scored on the synthetic LLaVA-Bench by the offline rules judge.
#   bash experiments/data_ablation.sh                   # the default size, seeds 0,1,2
#   SEEDS=0 bash experiments/data_ablation.sh data.instruct_scenes=150 ...   # overrides go to every run
# A sweep whose runs all finished is not run again (remove $OUT to start over).
# Outputs: $OUT/{tuned,none}/<run>/ and $OUT/report.{md,csv,png}; the recorded table and its
# reading are in experiments/data_ablation.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-experiments/runs/data_ablation}
SEEDS=${SEEDS:-0,1,2}
MIXES=full,detail_complex,conv_5detail_10complex,conversation
EXTRA=("$@")

sweep() {  # folder, the runs it holds when finished, overrides...
  local folder=$1 runs=$2; shift 2
  if [ "$(find "$OUT/$folder" -name summary.json 2>/dev/null | wc -l)" -lt "$runs" ]; then
    "$PYTHON" -m mmkit.train -m experiment=data_ablation "$@" "seed=$SEEDS" ${EXTRA[@]+"${EXTRA[@]}"} \
      "hydra.sweep.dir=$OUT/$folder" trainer.enable_progress_bar=false
  fi
}

seeds=$(($(tr -cd , <<<"$SEEDS" | wc -c) + 1))
sweep tuned $((4 * seeds)) "data.mix=$MIXES"
sweep none "$seeds" data.mix=none recipe=stage1_only
"$PYTHON" -m mmkit.report "$OUT" --title "LLaVA data ablation (synthetic LLaVA-Bench, rules judge)" \
  --metrics relative_conv relative_detail relative_complex relative
