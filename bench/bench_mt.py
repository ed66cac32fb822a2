"""Translation throughput: beam-5 decoding and training forward+backward, each against a bare loop, same run.

    python bench/bench_mt.py [--preset mt_cpu] [--sentences 32] [--json] [--fairseq-venv /tmp/fsq-venv]

Decoding. The baseline is a bare beam loop over the *same* model with the *same* incremental cache:
per step decode_step + log_softmax + top-K over (B, K·V) + cache reorder, nothing else. trime's
beam_search adds fairseq's bookkeeping (masks, 2K candidates, finalisation, sentence pruning). Both
run exactly L + 1 steps (min length = max length, so no sentence ends early): the ratio is what the
bookkeeping costs. Random weights; sentences of 20 source tokens; L = 30.

Training. trime's TransformerMT forward + label-smoothed CE + backward + Adam step against the same
with torch.nn.Transformer of the same shape (embeddings, sinusoids and output matrix added by hand):
PyTorch's own encoder-decoder as the bare reference.

With ``--fairseq-venv``, fairseq 0.12's SequenceGenerator (in that venv, tools/make_fairseq_mt_fixtures.py
time_generate) and trime's beam_search decode the fixture model post_tied's 40 test sentences (beam 5,
batches of 8, same process-internal timing, start-up excluded): sentences/s of each; and fairseq's
TransformerModel and TransformerMT take training steps of the mt_cpu shape (time_train): fairseq in
float32 (its only CPU precision), trime in float32 and in the preset's precision (amp auto).

Like every trime job, the benchmark first tunes glibc's allocator (trime.device.tune_cpu_allocator).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, row

ROOT = Path(__file__).resolve().parents[1]


def _best_of(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _paired(fa, fb, repeats: int) -> tuple[float, float]:
    """Best seconds of ``fa`` and of ``fb``, run alternately so that load drifts hit both alike."""
    a = b = math.inf
    for _ in range(repeats):
        a, b = min(a, _best_of(fa, 1)), min(b, _best_of(fb, 1))
    return a, b


@torch.no_grad()
def bare_beam(model, src: torch.Tensor, K: int, L: int) -> torch.Tensor:
    """Fixed-length beam loop, no finalisation: the floor any beam search over this model pays."""
    B = src.shape[0]
    V = model.cfg.tgt_vocab_size
    cache = model.start_cache(model.encode(src), group=K, capacity=L + 1)
    last = torch.full((B * K,), 2, dtype=torch.long)
    scores = torch.zeros(B, K)
    offsets = (torch.arange(B) * K).unsqueeze(1)
    for step in range(L + 1):
        logp = model.head.log_probs(model.decode_step(last, cache)).view(B, K, V)
        cand = (logp[:, :1] if step == 0 else logp + scores.unsqueeze(-1)).reshape(B, -1)
        scores, idx = cand.topk(K, dim=1)
        rows = (idx // V + offsets).view(-1)
        last = (idx % V).view(-1)
        cache.reorder(rows)
    return scores


def decoding(preset: str, n_sent: int, repeats: int) -> list[dict]:
    from trime.generate import BeamConfig, beam_search
    from trime.model.encoder_decoder import TransformerMT, mt_preset

    torch.manual_seed(0)
    V = 8000
    model = TransformerMT(mt_preset(preset, src_vocab_size=V, tgt_vocab_size=V)).eval()
    src = torch.randint(4, V, (n_sent, 20))
    src[:, -1] = 2
    L = 30
    cfg = BeamConfig(beam=5, max_len_a=0, max_len_b=L, min_len=L)
    ours, bare = _paired(lambda: beam_search(model, src, cfg), lambda: bare_beam(model, src, 5, L), repeats)
    shape = f"{preset}, V {V}, {n_sent} sentences, L {L}"
    return [
        row("mt", f"beam-5 sentences/s ({shape})", n_sent / ours, n_sent / bare, "≥ 0.9 of the bare loop", "sent/s")
    ]


def _sinusoids(T: int, d: int) -> torch.Tensor:
    from trime.model.transformer import sinusoidal_embedding

    return sinusoidal_embedding(torch.arange(2, T + 2).unsqueeze(0), d, 1)[0]  # (T, d)


class BareMT(torch.nn.Module):
    """torch.nn.Transformer with embeddings, sinusoidal positions and a tied output matrix."""

    def __init__(self, cfg) -> None:
        super().__init__()
        d = cfg.decoder_embed_dim
        self.src_embed = torch.nn.Embedding(cfg.src_vocab_size, d, padding_idx=1)
        self.tgt_embed = torch.nn.Embedding(cfg.tgt_vocab_size, d, padding_idx=1)
        self.core = torch.nn.Transformer(
            d,
            cfg.encoder_attention_heads,
            cfg.encoder_layers,
            cfg.decoder_layers,
            cfg.encoder_ffn_embed_dim,
            cfg.dropout,
            batch_first=True,
        )
        self.d, self.scale = d, math.sqrt(d)

    def forward(self, src, prev):
        S, T = src.shape[1], prev.shape[1]
        x = self.src_embed(src) * self.scale + _sinusoids(S, self.d)
        y = self.tgt_embed(prev) * self.scale + _sinusoids(T, self.d)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(T)
        h = self.core(
            x, y, tgt_mask=causal, src_key_padding_mask=src.eq(1), memory_key_padding_mask=src.eq(1), tgt_is_causal=True
        )
        return F.linear(h, self.tgt_embed.weight)


def _ls_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        target.reshape(-1),
        ignore_index=1,
        label_smoothing=eps,
        reduction="sum",
    )


def training(preset: str, steps: int) -> list[dict]:
    from trime.model.encoder_decoder import TransformerMT, mt_preset

    torch.manual_seed(0)
    V, B, S, T = 8000, 64, 24, 24
    cfg = mt_preset(preset, src_vocab_size=V, tgt_vocab_size=V, dropout=0.1, decoder_normalize_before=False)
    src, tgt = torch.randint(4, V, (B, S)), torch.randint(4, V, (B, T))
    prev = torch.cat([torch.full((B, 1), 2), tgt[:, :-1]], 1)

    def stepper(model, logits_fn):
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            loss = _ls_loss(logits_fn(model), tgt)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up
        return step

    a = stepper(TransformerMT(cfg).train(), lambda m: F.linear(m(src, prev).h, m.head.output_weight()))
    b = stepper(BareMT(cfg).train(), lambda m: m(src, prev))
    ours, bare = (B * T / t for t in _paired(a, b, steps))
    shape = f"{preset}, V {V}, {B}x{T} target tokens/batch, post-norm"
    return [row("mt", f"train tokens/s ({shape})", ours, bare, "≥ 0.95 of nn.Transformer", "tok/s")]


def against_fairseq(venv: Path, repeats: int) -> list[dict]:
    """Sentences/s of fairseq's SequenceGenerator and of trime's beam_search on the fixture model."""
    from trime.generate import BeamConfig, beam_search
    from trime.model.fairseq_mt_import import load_fairseq_mt

    assets = ROOT / "tests" / "assets" / "fairseq_mt"
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            str(ROOT / "tools" / "make_fairseq_mt_fixtures.py"),
            "time_generate",
            str(assets),
            str(repeats),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    fs = json.loads(out.stdout.strip().splitlines()[-1])
    model, _ = load_fairseq_mt(assets / "post_tied.pt")
    batches = [[torch.tensor(s) for s in b] for b in fs["batches"]]

    def pad_left(seqs):
        w = max(len(s) for s in seqs)
        return torch.stack([F.pad(s, (w - len(s), 0), value=1) for s in seqs])

    srcs = [pad_left(b) for b in batches]
    cfg = BeamConfig(beam=5)
    ours = _best_of(lambda: [beam_search(model, s, cfg) for s in srcs], repeats)
    n = sum(len(b) for b in batches)
    name = "beam-5 sentences/s vs fairseq SequenceGenerator (fixture post_tied, d 32)"
    rows = [row("mt", name, n / ours, n / fs["seconds"], "≥ 1.3× fairseq", "sent/s")]
    return rows + _train_against_fairseq(venv, repeats)


def _train_against_fairseq(venv: Path, repeats: int) -> list[dict]:
    """Training step tokens/s of fairseq's TransformerModel and of TransformerMT, same shape and loss.

    fairseq-train on a CPU trains in float32 only (its --bf16 implies --tpu, its --amp is CUDA's), so
    its figure is float32, with glibc's default allocator as fairseq runs, and again with trime's
    allocator setting (device.tune_cpu_allocator, through the environment) to show what that part is
    worth. trime is timed in float32 and with the mt_cpu preset's ``amp = "auto"`` (bf16 autocast where
    the CPU has bf16 instructions)."""
    from trime.device import ALLOCATOR_THRESHOLD, autocast, autocast_dtype
    from trime.model.encoder_decoder import TransformerMT, mt_preset

    L, d, f, V, B, T = 3, 256, 512, 8000, 64, 24  # the mt_cpu preset, post-norm, tied
    cmd = [str(venv / "bin" / "python"), str(ROOT / "tools" / "make_fairseq_mt_fixtures.py"), "time_train"]
    cmd += [str(x) for x in (L, d, f, V, B, T, repeats)]

    def fairseq_tokens_per_s(env: dict) -> float:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **env})
        return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]

    plain = fairseq_tokens_per_s({})
    allocator = {f"MALLOC_{k}_THRESHOLD_": str(ALLOCATOR_THRESHOLD) for k in ("MMAP", "TRIM")}
    tuned = fairseq_tokens_per_s(allocator)
    cfg = mt_preset("mt_cpu", src_vocab_size=V, tgt_vocab_size=V, dropout=0.1, decoder_normalize_before=False)
    src, tgt = torch.randint(4, V, (B, T)), torch.randint(4, V, (B, T))
    prev = torch.cat([torch.full((B, 1), 2), tgt[:, :-1]], 1)

    def ours(amp: torch.dtype | None) -> float:
        torch.manual_seed(0)
        model = TransformerMT(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with autocast(torch.device("cpu"), amp):
                logits = F.linear(model(src, prev).h, model.head.output_weight())
            _ls_loss(logits, tgt).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        return B * T / _best_of(step, repeats)

    fp32, auto = ours(None), ours(autocast_dtype("auto", torch.device("cpu")))
    name = f"train tokens/s vs fairseq TransformerModel fp32 (mt_cpu shape, V {V}, {B}x{T})"
    return [
        row("mt", f"{name}, trime fp32", fp32, plain, "≥ 1.3× fairseq", "tok/s"),
        row("mt", f"{name}, trime amp auto (mt_cpu)", auto, plain, "≥ 1.3× fairseq", "tok/s"),
        row("mt", f"{name} + trime's allocator setting, trime fp32", fp32, tuned, "(for reference)", "tok/s"),
    ]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mt_cpu")
    ap.add_argument("--sentences", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fairseq-venv", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from trime.device import pick_device

    pick_device("cpu")  # as every trime job does: tunes the CPU allocator
    rows = decoding(a.preset, a.sentences, a.repeats) + training(a.preset, a.repeats)
    if a.fairseq_venv is not None:
        rows += against_fairseq(a.fairseq_venv, a.repeats)
    emit(rows, a.json)
    return rows


if __name__ == "__main__":
    main()
