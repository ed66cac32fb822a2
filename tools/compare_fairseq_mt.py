"""Helpers of tools/compare_fairseq_mt.sh (end-to-end speed against fairseq-train / fairseq-generate).

python tools/compare_fairseq_mt.py text DATA OUT            (trime's environment)
    a trime pairs directory -> OUT/{train,valid,test}.{src,tgt}: its BPE text, one sentence a line,
    for fairseq-preprocess with trime's own dictionaries, so that both tools see the same ids
python tools/compare_fairseq_mt.py weights CHECKPOINT OUT   (trime's environment)
    a trime checkpoint's model.safetensors -> OUT, a plain tensor dict torch.load reads weights-only
python tools/compare_fairseq_mt.py checkpoint TEMPLATE WEIGHTS OUT   (the fairseq environment)
    a checkpoint fairseq-train wrote for the same architecture (TEMPLATE) with its weights replaced
    by WEIGHTS (trime's names are fairseq's; the tied output projection is fairseq's copy of the
    decoder embedding) -> OUT, for fairseq-generate
python tools/compare_fairseq_mt.py agree FAIRSEQ_OUT TRIME_OUT   (either environment)
    how many hypotheses (H- lines) of the two generate outputs are identical, and their scores' gap
"""

from __future__ import annotations

import sys
from pathlib import Path


def text(data: str, out: str) -> None:
    from trime.data.pairs import load_pair_dictionaries, load_pair_split, read_pairs_meta

    langs = read_pairs_meta(data)["langs"]
    dicts = dict(zip(("source", "target"), load_pair_dictionaries(data)))
    Path(out).mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        pairs = load_pair_split(data, split)
        for side in ("source", "target"):
            d, get = dicts[side], getattr(pairs, side)
            lines = [" ".join(d.symbols[t] for t in get(i).tolist() if t != d.eos) for i in range(len(pairs))]
            (Path(out) / f"{split}.{langs[side]}").write_text("\n".join(lines) + "\n")
    print(f"{out}: {langs['source']}-{langs['target']} text of {data}")


def weights(checkpoint: str, out: str) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(Path(checkpoint) / "model.safetensors")), out)


def checkpoint(template: str, weights_file: str, out: str) -> None:
    import torch

    state = torch.load(template, map_location="cpu", weights_only=False)  # written by fairseq-train just now
    ours = torch.load(weights_file, map_location="cpu", weights_only=True)
    model = state["model"]
    for name, w in ours.items():
        if name not in model or model[name].shape != w.shape:
            sys.exit(f"{name}: not in the fairseq model, or of another shape: is the architecture the same?")
        model[name] = w
    if "decoder.output_projection.weight" in model and "decoder.output_projection.weight" not in ours:
        model["decoder.output_projection.weight"] = ours["decoder.embed_tokens.weight"]
    state["last_optimizer_state"] = None
    torch.save(state, out)


def _hypotheses(path: str) -> dict[int, tuple[float, str]]:
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("H-"):
            key, score, hyp = line.split("\t")
            out[int(key[2:])] = (float(score), hyp)
    return out


def agree(fairseq_out: str, trime_out: str) -> None:
    theirs, ours = _hypotheses(fairseq_out), _hypotheses(trime_out)
    both = sorted(theirs.keys() & ours.keys())
    same = [i for i in both if theirs[i][1] == ours[i][1]]
    gap = max((abs(theirs[i][0] - ours[i][0]) for i in same), default=0.0)
    print(
        f"hypotheses: fairseq {len(theirs)}, trime {len(ours)}; {len(same)} of the {len(both)} in both identical "
        f"(base-2 scores within {gap:.1e}); differing: {[i for i in both if i not in same][:10]}; "
        f"only trime's: {sorted(ours.keys() - theirs.keys())[:10]}"
    )


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"text": text, "weights": weights, "checkpoint": checkpoint, "agree": agree}[cmd](*args)
