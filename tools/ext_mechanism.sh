#!/usr/bin/env bash
# The experiments behind docs/reproduce.md "Why TrimeLM_ext's output layer did not learn": TrimeLM_ext alone at the
# tiny preset, 200 updates on the main job's data and BM25 order, one variable at a time against the
# old main job's setting (16 segments per forward pass, no CE warm-up). Each row prints its memory-free
# valid perplexity (first 20k valid tokens; the CE model's is ~284) and the memory diagnostics of its
# log.jsonl: share of the softmax, mean cosine query/key, token part's cross-entropy (first TRIME update
# and update 200). About 4 minutes a row on 2 CPU cores; a finished row is not trained again.
#   tools/ext_mechanism.sh [RUN (a main job's --out, default runs/reproduce)] [OUT (default runs/ext-mechanism)]
set -euo pipefail
RUN=${1:-runs/reproduce}
OUT=${2:-runs/ext-mechanism}
UPDATES=${UPDATES:-200}  # UPDATES=2 LOG_INTERVAL=1: a smoke run of the script
[ -f "$RUN/bm25/batches.json" ] || trime reproduce --out "$RUN"
mkdir -p "$OUT"
printf 'base = "tiny"\n[model]\nfinal_norm = false\n' >"$OUT/tiny_no_final_norm.toml"
old=(--criterion trime_ext --max-update "$UPDATES" --max-time 0 --max-tokens 4096 --update-freq 1 --log-interval "${LOG_INTERVAL:-10}")
bm25=(--predefined-batches "$RUN/bm25/batches.json")

row() {  # row NAME PRESET FLAGS...: train (unless done), evaluate memory-free, print one line
    local name=$1 preset=$2
    shift 2
    if [ ! -f "$OUT/$name/checkpoint_last/meta.json" ]; then
        trime train "$RUN/data-bin" --preset "$preset" "${old[@]}" --save-dir "$OUT/$name" "$@" >"$OUT/$name.log"
    fi
    trime eval "$RUN/data-bin" --preset tiny --path "$OUT/$name" --gen-subset valid --max-eval-tokens 20000 \
        >"$OUT/$name.eval"
    python3 - "$name" "$OUT/$name/log.jsonl" "$OUT/$name.eval" <<'PY'
import json, re, sys
name, log, ev = sys.argv[1:]
rows = [json.loads(x) for x in open(log) if '"train"' in x]
mem = [r for r in rows if "mem_share" in r]
ppl = re.search(r"Perplexity: ([0-9.]+)", open(ev).read()).group(1)
if not mem:  # all CE (a warm-up longer than the run)
    sys.exit(print(f"| {name} | - | - | - / {rows[-1]['ce_loss']:.2f} | {float(ppl):,.0f} |"))
print(f"| {name} | {mem[0]['mem_share']:.3f} / {mem[-1]['mem_share']:.3f} | {mem[0]['mem_cos']:.2f} / "
      f"{mem[-1]['mem_cos']:.2f} | {max(r['ce_loss'] for r in mem):.2f} / {rows[-1]['ce_loss']:.2f} | {float(ppl):,.0f} |")
PY
}

echo "| run | memory share (first / last) | mean cosine | token part, bits (worst / last) | memory-free valid ppl |"
echo "|---|---|---|---|---|"
row old_main_job tiny "${bm25[@]}"
row simulated_16_ranks tiny "${bm25[@]}" --simulate-ranks 16
row random_batches tiny
row fp32 tiny "${bm25[@]}" --amp none
row no_final_layernorm "$OUT/tiny_no_final_norm.toml" "${bm25[@]}"
row memory_of_4_segments tiny "${bm25[@]}" --max-tokens 1024 --update-freq 4
row memory_of_2_segments tiny "${bm25[@]}" --max-tokens 512 --update-freq 8
row ce_warmup_100 tiny "${bm25[@]}" --ce-warmup-updates 100
