#!/usr/bin/env bash
# Make tests/assets/fairseq_databin/: data-bins written by the real fairseq-preprocess, which trime reads in
# place (trime.data.fairseq_bin; tests/data/test_fairseq_bin.py). fairseq is never a dependency of trime: it
# lives in its own virtual environment outside the repository (the one tools/make_fairseq_mt_fixtures.sh builds).
#
# What it makes (all committed, ≈ 60 KB):
#   mt/    fairseq-preprocess --source-lang src --target-lang tgt --srcdict/--tgtdict (fairseq_mt's dictionaries)
#          --testpref fairseq_mt/test: a test split alone, what a user translating with a released model has
#   lm/    fairseq-preprocess --only-source --srcdict fairseq/word/dict.txt --testpref (fairseq/word/test.txt)
#   spm/   a pair whose target is in another script, tokenised with sentencepiece:
#          raw/{train,valid,test}.{en,el}   200/20/20 lines of tests/assets/fairseq/word/train.txt.gz (4-12 words,
#                                           no <unk>); the .el side is the same line transliterated letter by letter
#                                           into Greek script (a cipher of the English, not Greek)
#          sentencepiece.model              a unigram model of 300 pieces trained on train.en + train.el
#                                           (identity normalisation, so the model is a few KB)
#          bin/                             fairseq-preprocess --source-lang en --target-lang el of the text encoded
#                                           with it (spm.encode as pieces, space-separated): dictionaries from train
#          ids.json                         the valid and test ids as fairseq's own reader returns them
#                                           (data_utils.load_indexed_dataset, mmap)
#          model.pt, generate.*.txt         not made here: tools/make_fairseq_spm_mt_fixtures.sh (this script
#                                           removes them: run that one after it)
#
# Time: < 1 min once the venv exists (building it: ≈ 5 min). Needs the PyPI registry for the venv only.
# Deterministic.
#
# Usage: tools/make_fairseq_databin_fixtures.sh   (from the repository root; FSQ_VENV, FSQ_WORK to relocate)
set -euo pipefail

main() {  # the whole script is read before it runs, so editing this file mid-run is harmless
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${FSQ_VENV:-/tmp/fsq-venv}
WORK=${FSQ_WORK:-/tmp/fsq-databin-work}
OUT="$ROOT/tests/assets/fairseq_databin"
ASSETS="$ROOT/tests/assets"

if [ ! -x "$VENV/bin/fairseq-preprocess" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0 numpy cython setuptools wheel
  "$VENV/bin/pip" install -q --no-build-isolation fairseq-fixed==0.12.3.1
fi
"$VENV/bin/python" -c "import sentencepiece" 2>/dev/null || "$VENV/bin/pip" install -q sentencepiece==0.2.3
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH" PYTHONWARNINGS=ignore OMP_NUM_THREADS=2

rm -rf "$WORK" "$OUT" && mkdir -p "$WORK" "$OUT/spm/raw"

# 1. A test split alone with a model's dictionaries; an LM test split.
fairseq-preprocess --source-lang src --target-lang tgt --workers 1 --destdir "$OUT/mt" \
  --srcdict "$ASSETS/fairseq_mt/dict.src.txt" --tgtdict "$ASSETS/fairseq_mt/dict.tgt.txt" \
  --testpref "$ASSETS/fairseq_mt/test" > "$WORK/mt.log" 2>&1
cp "$ASSETS/fairseq/word/test.txt" "$WORK/lm-test"  # --testpref is the whole file name without --source-lang
fairseq-preprocess --only-source --workers 1 --destdir "$OUT/lm" \
  --srcdict "$ASSETS/fairseq/word/dict.txt" --testpref "$WORK/lm-test" > "$WORK/lm.log" 2>&1

# 2. Text in another script, sentencepiece, fairseq-preprocess.
"$PY" - "$ASSETS/fairseq/word/train.txt.gz" "$OUT/spm" "$WORK/spm" <<'EOF'
import gzip, json, sys
from pathlib import Path
import sentencepiece as spm

src, out, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
greek = dict(zip("abcdefghijklmnopqrstuvwxyz", "αβψδεφγηιξκλμνοπθρστυϝωχϋζ"))
lines = [ln.strip() for ln in gzip.open(src, "rt", encoding="utf-8")]
lines = [ln for ln in lines if "<unk>" not in ln and 4 <= len(ln.split()) <= 12][:240]
splits = {"train": lines[:200], "valid": lines[200:220], "test": lines[220:240]}
for split, text in splits.items():
    for lang, side in (("en", text), ("el", ["".join(greek.get(c, c) for c in ln) for ln in text])):
        (out / "raw" / f"{split}.{lang}").write_text("".join(ln + "\n" for ln in side), encoding="utf-8")
train = [ln for lang in ("en", "el") for ln in (out / "raw" / f"train.{lang}").read_text(encoding="utf-8").splitlines()]
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(train), model_prefix=str(out / "sentencepiece"), vocab_size=300,
    normalization_rule_name="identity", num_threads=1, minloglevel=2,
)
(out / "sentencepiece.vocab").unlink()
sp = spm.SentencePieceProcessor(model_file=str(out / "sentencepiece.model"))
work.mkdir(parents=True, exist_ok=True)
for split in splits:
    for lang in ("en", "el"):
        raw = (out / "raw" / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()
        (work / f"{split}.{lang}").write_text("".join(" ".join(p) + "\n" for p in sp.encode(raw, out_type=str)),
                                              encoding="utf-8")
EOF
fairseq-preprocess --source-lang en --target-lang el --workers 1 --destdir "$OUT/spm/bin" \
  --trainpref "$WORK/spm/train" --validpref "$WORK/spm/valid" --testpref "$WORK/spm/test" > "$WORK/spm.log" 2>&1
"$PY" - "$OUT/spm/bin" "$OUT/spm/ids.json" <<'EOF'
import json, sys
from pathlib import Path
from fairseq.data import Dictionary, data_utils

bin_dir, res = Path(sys.argv[1]), {}
for split in ("valid", "test"):  # train: tests compare it with trime's own prepare of raw/
    for lang in ("en", "el"):
        d = Dictionary.load(str(bin_dir / f"dict.{lang}.txt"))
        ds = data_utils.load_indexed_dataset(str(bin_dir / f"{split}.en-el.{lang}"), d, "mmap")
        res[f"{split}.{lang}"] = [ds[i].tolist() for i in range(len(ds))]
Path(sys.argv[2]).write_text(json.dumps(res) + "\n")
EOF
rm -f "$OUT"/*/preprocess.log "$OUT"/spm/bin/preprocess.log  # absolute paths of this machine
du -sh "$OUT"
}
main "$@"
