#!/usr/bin/env bash
# Add to tests/assets/fairseq_databin/spm/ (made by tools/make_fairseq_databin_fixtures.sh, run that first) a
# fairseq translation model trained on its en->el data-bin and what fairseq-generate prints with it, so that
# trime's generation on a non-English target, sentencepiece pieces and all, is tested against the real fairseq
# (tests/data/test_fairseq_bin.py). fairseq is never a dependency of trime: it lives in its own virtual
# environment outside the repository (the one tools/make_fairseq_mt_fixtures.sh builds).
#
# What it adds (all committed, ≈ 170 KB):
#   model.pt                  fairseq-train on bin/ (train split), the post_tied model of
#                             tools/make_fairseq_mt_fixtures.sh (d=32, FFN 64, 4 heads, 2+2 layers, post-norm,
#                             tied decoder embeddings, label-smoothed CE 0.1), 300 Adam updates on CPU, fp32
#                             training; optimizer state dropped, weights saved float16
#   generate.beam5.txt        fairseq-generate bin/ --path model.pt --gen-subset test --beam 5 --nbest 2
#                             --post-process sentencepiece --tokenizer moses (target-language rules: el): its
#                             S-/T-/H-/D-/P- lines as printed (--batch-size 8 --required-batch-size-multiple 1,
#                             the printed order), nothing else
#   generate.score_reference.txt   the same with --score-reference
#
# Time: ≈ 2 min on a busy 2-core machine once the venv exists (1 min 45 s measured). Needs the PyPI registry for
# sacremoses (the Moses detokeniser of --tokenizer moses) if the venv lacks it. Rerunning on this machine gave the
# same hypotheses; on another the trained weights may differ in the last bits, so re-commit model.pt and both
# outputs together.
#
# Usage: tools/make_fairseq_spm_mt_fixtures.sh   (from the repository root; FSQ_VENV, FSQ_WORK to relocate)
set -euo pipefail

main() {
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${FSQ_VENV:-/tmp/fsq-venv}
WORK=${FSQ_WORK:-/tmp/fsq-spm-mt-work}
OUT="$ROOT/tests/assets/fairseq_databin/spm"
LM_HELPER="$ROOT/tools/make_fairseq_fixtures.py"

if [ ! -x "$VENV/bin/fairseq-train" ] || [ ! -d "$OUT/bin" ]; then
  echo "needs $VENV (tools/make_fairseq_mt_fixtures.sh) and $OUT/bin (tools/make_fairseq_databin_fixtures.sh)" >&2
  exit 1
fi
"$VENV/bin/python" -c "import sacremoses" 2>/dev/null || "$VENV/bin/pip" install -q sacremoses==0.2.0
PY="$VENV/bin/python"
# fairseq 0.12 unpickles its own checkpoints (an argparse.Namespace inside cfg) with torch.load's
# default, which torch >= 2.6 restricts: allow it for the file this script made itself.
export PATH="$VENV/bin:$PATH" PYTHONWARNINGS=ignore OMP_NUM_THREADS=2 TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1

rm -rf "$WORK" && mkdir -p "$WORK"
rm -f "$OUT/model.pt" "$OUT"/generate.*.txt

# 1. The tiny model (make_fairseq_mt_fixtures.sh's post_tied flags; fewer updates: 200 training pairs).
fairseq-train "$OUT/bin" --task translation --arch transformer --source-lang en --target-lang el \
  --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 32 --decoder-embed-dim 32 \
  --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 4 --decoder-attention-heads 4 \
  --dropout 0.1 --criterion label_smoothed_cross_entropy --label-smoothing 0.1 --max-tokens 1024 \
  --optimizer adam --adam-betas "(0.9,0.98)" --lr 0.005 --lr-scheduler inverse_sqrt --warmup-updates 20 \
  --warmup-init-lr 1e-7 --max-update 300 --cpu --seed 1 --num-workers 0 --ddp-backend legacy_ddp \
  --no-epoch-checkpoints --no-save-optimizer-state --log-format simple --log-interval 50 --disable-validation \
  --share-decoder-input-output-embed --save-dir "$WORK/ckpt" > "$WORK/train.log" 2>&1
"$PY" "$LM_HELPER" strip "$WORK/ckpt/checkpoint_last.pt" "$OUT/model.pt" fp16

# 2. fairseq-generate on the test split (the committed fp16 file): pieces joined, Moses with el rules (fairseq
# 0.12 has no --moses-target-lang: its Moses tokenizer takes the task's --target-lang). fairseq 0.12's batching
# drops a last batch whose size is not a multiple of --required-batch-size-multiple (default 8; fairseq issue
# #5036): 1 keeps all 20 sentences.
gen() {  # setting flags...
  local setting=$1; shift
  fairseq-generate "$OUT/bin" --path "$OUT/model.pt" --gen-subset test --source-lang en --target-lang el \
    --cpu --batch-size 8 --required-batch-size-multiple 1 --post-process sentencepiece --tokenizer moses "$@" \
    > "$WORK/gen.$setting.out" 2> "$WORK/gen.$setting.log"
  grep -P '^[STHDP]-\d+\t' "$WORK/gen.$setting.out" > "$OUT/generate.$setting.txt"
}
gen beam5 --beam 5 --nbest 2
gen score_reference --score-reference
tail -n 1 "$WORK/gen.beam5.out"
du -ab "$OUT/model.pt" "$OUT"/generate.*.txt
}

main "$@"
