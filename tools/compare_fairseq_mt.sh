#!/usr/bin/env bash
# End-to-end speed of trime against fairseq on one translation corpus and one model shape (mt_cpu):
# training throughput (fairseq-train's wps against trime mt train's tok/s, both target tokens per
# second over the same batches: trime's batching equals fairseq's) and decoding (fairseq-generate
# against trime mt generate, the same weights, beam 5, --max-tokens 4096). fairseq is never a
# dependency of trime: it runs from its own virtual environment (tools/make_fairseq_fixtures.sh
# builds one), fed trime's BPE text and dictionaries so that both tools see the same ids.
#
# Usage: tools/compare_fairseq_mt.sh DATA CHECKPOINT [UPDATES]   (from the repository root)
#   DATA        a prepared trime pairs directory (trime data prepare), e.g. runs/mt-reproduce/data-bin
#   CHECKPOINT  a trained mt_cpu checkpoint directory of it, e.g. runs/mt-reproduce/models/vanilla/checkpoint_best
#   UPDATES     training updates timed on each side (default 60)
# Environment: FSQ_VENV (default /tmp/fsq-venv), FSQ_WORK (default /tmp/fsq-mt-compare).
# Prints the fairseq-train and trime mt train log lines, then both decoders' timing lines; the
# hypotheses land in $FSQ_WORK/{fairseq,trime}.out; the last line says how many are identical.
set -euo pipefail
DATA=$(cd "$1" && pwd) CKPT=$(cd "$2" && pwd) UPDATES=${3:-60}
VENV=${FSQ_VENV:-/tmp/fsq-venv} WORK=${FSQ_WORK:-/tmp/fsq-mt-compare}
SRC=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['langs']['source'])" "$DATA/meta.json")
TGT=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['langs']['target'])" "$DATA/meta.json")
TOOLS=$(cd "$(dirname "$0")" && pwd)
rm -rf "$WORK" && mkdir -p "$WORK"
python "$TOOLS/compare_fairseq_mt.py" text "$DATA" "$WORK/text"
python "$TOOLS/compare_fairseq_mt.py" weights "$CKPT" "$WORK/weights.pt"

# the mt_cpu preset as fairseq flags (src/trime/configs/mt_cpu.toml)
ARCH=(--arch transformer --encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 --decoder-embed-dim 256
  --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 --encoder-attention-heads 4 --decoder-attention-heads 4
  --decoder-normalize-before --share-decoder-input-output-embed --dropout 0.1)
TRAIN=(--optimizer adam --adam-betas '(0.9,0.98)' --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 400
  --warmup-init-lr 1e-7 --weight-decay 1e-4 --criterion label_smoothed_cross_entropy --label-smoothing 0.1
  --max-tokens 4096 --seed 1 --num-workers 0 --log-format simple --log-interval 20)
(
  source "$VENV/bin/activate"
  cd "$WORK"
  fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --trainpref text/train --validpref text/valid \
    --testpref text/test --srcdict "$DATA/dict.$SRC.txt" --tgtdict "$DATA/dict.$TGT.txt" \
    --destdir bin --workers 2 > preprocess.log 2>&1
  echo "== fairseq-train, $UPDATES updates (float32: fairseq's only CPU precision)"
  fairseq-train bin --cpu "${ARCH[@]}" "${TRAIN[@]}" --max-update "$UPDATES" --save-dir template \
    --no-epoch-checkpoints 2>&1 | grep -E "train_inner" | sed -E 's/.*wps=([0-9.]+).*num_updates=([0-9]+).*/updates \2: wps \1/'
  python "$TOOLS/compare_fairseq_mt.py" checkpoint template/checkpoint_last.pt weights.pt model.pt
  echo "== fairseq-generate test, beam 5"
  TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 fairseq-generate bin --cpu --path model.pt --gen-subset test --beam 5 \
    --lenpen 1 --max-len-a 1.2 --max-len-b 10 --max-tokens 4096 --remove-bpe > fairseq.out 2> generate.log
  grep -h "Translated" fairseq.out generate.log
)
for AMP in none auto; do
  echo "== trime mt train --amp $AMP, $UPDATES updates"
  trime mt train "$DATA" --preset mt_cpu --amp "$AMP" --max-update "$UPDATES" --log-interval 20 \
    --save-dir "$WORK/trime-$AMP" | grep "tok/s"
done
echo "== trime mt generate test, beam 5"
trime mt generate "$DATA" --path "$CKPT" --beam 5 --lenpen 1 --max-len-a 1.2 --max-len-b 10 --max-tokens 4096 \
  --results-path "$WORK/trime.out" | tail -1
python "$TOOLS/compare_fairseq_mt.py" agree "$WORK/fairseq.out" "$WORK/trime.out"
