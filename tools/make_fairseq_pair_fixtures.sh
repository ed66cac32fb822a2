#!/usr/bin/env bash
# Make tests/assets/fairseq_pairs/: what subword-nmt and fairseq-preprocess make of a tiny parallel text,
# which trime's pair preparation and batching are tested against (tests/data/test_pairs.py). fairseq is never a
# dependency of trime: it lives in its own virtual environment outside the repository.
#
# What it makes (all committed):
#   raw/{train,valid,test}.{es,en}   240/40/40 verse pairs of `trime data fetch bible-es-en` (untokenised), with
#                                    edge cases in valid (tabs, a literal <unk>, an unseen word, a non-breaking
#                                    space, an empty pair, an empty target) and test (leading/trailing blanks)
#   bpe.codes                        `subword-nmt learn-bpe -s 500` on train.es followed by train.en (the
#                                    original's tool and flags, as prepare-iwslt14.sh runs it)
#   {sep,joined}/dict.{es,en}.txt    fairseq-preprocess --source-lang es --target-lang en on the BPE'd text
#                                    (`subword-nmt apply-bpe -c bpe.codes`), without / with --joined-dictionary
#   ids.npz                          the ids fairseq binarised: {sep,joined}.{split}.{lang}.{tokens,sizes}
#   batches.json                     fairseq's TranslationTask.get_batch_iterator on the separate-dictionary
#                                    train split (max tokens 600, max positions 60/70, seed 1, multiple of 8):
#                                    the frozen batches, epochs 1-2 for 1 and 2 shards, one collated batch
#
# Time: ≈ 3 min to build the venv once, then < 1 min. Needs the PyPI registry (venv, subword-nmt) and the
# Debian archive (the Bible packages). Deterministic.
#
# Usage: tools/make_fairseq_pair_fixtures.sh   (from the repository root; FSQ_VENV, FSQ_WORK to relocate,
#        BIBLE_DEBS=DIR to use local .deb files)
set -euo pipefail

main() {  # the whole script is read before it runs, so editing this file mid-run is harmless
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${FSQ_VENV:-/tmp/fsq-venv}
WORK=${FSQ_WORK:-/tmp/fsq-pair-work}
OUT="$ROOT/tests/assets/fairseq_pairs"
HELPER="$ROOT/tools/make_fairseq_pair_fixtures.py"
MERGES=500
SYS_PY=$(command -v python3)  # trime's Python (sacremoses, subword-nmt, pysword), not the venv's

if [ ! -x "$VENV/bin/fairseq-preprocess" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0 numpy cython setuptools wheel
  "$VENV/bin/pip" install -q --no-build-isolation fairseq-fixed==0.12.3.1
fi
[ -x "$VENV/bin/subword-nmt" ] || "$VENV/bin/pip" install -q subword-nmt==0.3.8
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH" PYTHONWARNINGS=ignore OMP_NUM_THREADS=2

rm -rf "$WORK" "$OUT" && mkdir -p "$WORK/bpe" "$OUT/raw"
# BIBLE_DEBS: a folder holding sword-text-{sparv,kjv}_*.deb (apt-get download ...) instead of downloading them
PYTHONPATH="$ROOT/src" "$SYS_PY" -c "import os, sys; from trime.data.bible import fetch_bible
fetch_bible(sys.argv[1], debs=[os.environ['BIBLE_DEBS']] if os.environ.get('BIBLE_DEBS') else None)" "$WORK/bible"
"$SYS_PY" "$HELPER" corpus "$WORK/bible" "$OUT/raw"

cat "$OUT/raw/train.es" "$OUT/raw/train.en" | subword-nmt learn-bpe -s $MERGES > "$OUT/bpe.codes"
for split in train valid test; do
  for lang in es en; do
    subword-nmt apply-bpe -c "$OUT/bpe.codes" < "$OUT/raw/$split.$lang" > "$WORK/bpe/$split.$lang"
  done
done

for kind in sep joined; do
  flag=(); [ $kind = joined ] && flag=(--joined-dictionary)
  fairseq-preprocess --source-lang es --target-lang en --workers 1 "${flag[@]}" --destdir "$WORK/bin/$kind" \
    --trainpref "$WORK/bpe/train" --validpref "$WORK/bpe/valid" --testpref "$WORK/bpe/test" \
    > "$WORK/preprocess.$kind.log" 2>&1
  mkdir -p "$OUT/$kind" && cp "$WORK/bin/$kind/dict."{es,en}.txt "$OUT/$kind/"
  "$PY" "$HELPER" dump "$WORK/bin/$kind" $kind "$OUT/ids.npz"
done
"$PY" "$HELPER" batches "$WORK/bin/sep" "$OUT/batches.json"
du -ab "$OUT" | sort -k2
}

main "$@"
