"""Language-model generation with the memories of evaluation: greedy, sampling and beam search.

Each step's distribution over the vocabulary is the one ``trime eval`` scores the same text with
(trime.evaluate): the text so far is a token stream t[0..n) whose next position n is predicted in
the evaluation window that would score it, and the memory entries are the ones that window sees.

Windows (``--tokens-per-sample`` L, ``--context-window`` c (default L/2), trime.data.blocks.eval_windows): the
stream is cut into blocks of S = L − c positions, [s, s + S); block s is run after
min(c, s) positions of context. Generation runs the current window incrementally (cached
keys/values, one position per step); when the next position leaves the block, the window slides:
the new window [s' − c', s'] is run afresh (positions restart, as in evaluation).

Memories, for the query at position n of block [s, e) (the same entries as evaluation's rows):
- local (``--use-local``): every earlier position j of the window, key q_j, labelled t[j];
- long (``--use-long --mem-size M``): the FIFO of the last M positions of *earlier blocks*. A
  block's positions [s, e) join the FIFO at the moment generation moves to position e, i.e. when
  the block is complete (evaluation appends a window's scored positions after scoring it). The
  context of the new window is then in both memories, as in evaluation;
- external (``--use-external``): one index search per step for all hypotheses (one query row each),
  its k neighbours in the joint softmax; ``--use-interp`` mixes in kNN-LM's distribution of the
  same neighbours.

The distribution is memory.scoring.vocab_log_probs: memory.scoring.log_probs written for every token y
of the vocabulary at once (O(V + m) per row instead of O(V·m)); tests/generate/test_lm.py checks it
against memory.scoring.log_probs and against evaluation. ``<pad>`` is never generated. The search is
generate.search's (greedy, sampling, beam); :class:`LMDecoder` is its decoder.
"""

from __future__ import annotations

import codecs
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from trime.checkpoint import source_tokenizer
from trime.config import GenerateConfig
from trime.data.dictionary import SPECIALS, Dictionary
from trime.data.prepare import read_data_meta
from trime.device import autocast, autocast_dtype
from trime.errors import ConfigError, DataError
from trime.evaluate import setting_of
from trime.generate.search import Hypothesis, SearchSpec, search, search_steps
from trime.jobs import Job, open_model
from trime.memory.cache import MemoryFIFO
from trime.memory.external import ExternalMemory
from trime.memory.joint import memory_logits
from trime.memory.knn import NEG_INF
from trime.memory.scoring import StepRows, vocab_log_probs
from trime.model.base import select_keys
from trime.model.hf import HFModelConfig

# ------------------------------------------------------------------------------------------------
# Incremental decoding state


@dataclass
class _Window:
    """The evaluation window being run: stream positions [lo, hi) run so far, within block [s, e)."""

    lo: int
    s: int
    e: int
    keys: Tensor  # (B, hi − lo, d) memory keys of the positions run
    cache: object = None  # the backbone's KV cache (None without incremental decoding)


@dataclass
class DecodeState:
    """B hypotheses of equal length n: stream tokens (B, n), the window, the long-term FIFOs."""

    tokens: Tensor  # (B, n) int64
    window: _Window
    fifos: list[MemoryFIFO] = field(default_factory=list)
    rows: StepRows | None = None  # the memories of position n
    h: Tensor | None = None  # (B, d) the output feeding the head at position n

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])


class LMDecoder:
    """Per-step log-probabilities of a backbone with the memories of ``cfg`` (module docstring).

    A decoder of generate.search: ``start(prompt, group)`` returns ``group`` equal hypotheses whose next
    position is ``len(prompt)``; ``advance(state, tokens (B,))`` appends one token per hypothesis;
    ``log_probs(state)`` is the (B, V) distribution of the next position; ``reorder(state, index)``
    keeps hypotheses (beams).
    """

    def __init__(
        self,
        model,
        cfg: GenerateConfig,
        *,
        dim: int,
        pad: int | None,
        eos: int,
        window: int,
        external: ExternalMemory | None = None,
    ):
        c = window // 2 if cfg.context_window < 0 else cfg.context_window
        if not 0 <= c < window:
            raise ConfigError(f"--context-window {c} must be in [0, {window}) for a window of {window}")
        self.model, self.cfg, self.dim, self.pad, self.eos = model, cfg, dim, pad, eos
        self.L, self.c, self.S = window, c, window - c
        self.external = external
        self.setting = setting_of(cfg)
        self.cached = cfg.kv_cache and hasattr(model, "new_cache")
        self.vocab_size = int(model.head.vocab_size)

    # -- running the backbone --------------------------------------------------------------------

    def _inputs(self, tokens: Tensor, a: int, b: int) -> Tensor:
        """Inputs (B, b − a) of stream positions [a, b): t[i − 1], eos before position 0."""
        if a > 0:
            return tokens[:, a - 1 : b - 1]
        eos = torch.full_like(tokens[:, :1], self.eos)
        return torch.cat([eos, tokens[:, : b - 1]], 1)

    def _forward(self, inputs: Tensor, cache=None):
        out = self.model(inputs, cache) if cache is not None else self.model(inputs)
        return out.h, select_keys(out, self.cfg.knn_keytype)

    def _open_window(self, tokens: Tensor, s: int, upto: int) -> tuple[_Window, Tensor]:
        """Run block s's window from its context up to position ``upto`` inclusive."""
        lo = s - min(self.c, s)
        cache = self.model.new_cache() if self.cached else None
        h, keys = self._forward(self._inputs(tokens, lo, upto + 1), cache)
        return _Window(lo, s, s + self.S, keys, cache), h[:, -1]

    def _run_next(self, state: DecodeState) -> Tensor:
        """Run position n (= state.length) in the current window; returns h (B, d)."""
        n, w = state.length, state.window
        if self.cached:
            h, keys = self._forward(self._inputs(state.tokens, n, n + 1), w.cache)
            w.keys = torch.cat([w.keys, keys], 1)
            return h[:, -1]
        h, keys = self._forward(self._inputs(state.tokens, w.lo, n + 1))  # the whole window again
        w.keys = keys
        return h[:, -1]

    def _fill_fifo(self, tokens: Tensor, s: int) -> list[MemoryFIFO]:
        """The FIFO evaluation holds when it reaches block s: the last M positions of blocks < s."""
        fifo = MemoryFIFO(self.cfg.mem_size)
        first = max(0, s - self.cfg.mem_size) // self.S * self.S  # older blocks would be pushed out
        for b in range(first, s, self.S):
            lo = b - min(self.c, b)
            _, keys = self._forward(self._inputs(tokens, lo, b + self.S))
            fifo.append(keys[0, b - lo :], tokens[0, b : b + self.S])
        return [fifo]

    # -- the search loops' interface -------------------------------------------------------------

    @torch.no_grad()
    def start(self, prompt: list[int] | Tensor, group: int = 1) -> DecodeState:
        tokens = torch.as_tensor(prompt, dtype=torch.long, device=self._device()).reshape(1, -1)  # (1, n)
        n = tokens.shape[1]
        s = n // self.S * self.S
        fifos = self._fill_fifo(tokens, s) if self.cfg.use_long else []
        window, h = self._open_window(tokens, s, n)
        state = DecodeState(tokens, window, fifos)
        self._rows(state, h)
        return self.reorder(state, torch.zeros(group, dtype=torch.long)) if group > 1 else state

    @torch.no_grad()
    def advance(self, state: DecodeState, next_tokens: Tensor) -> DecodeState:
        state.tokens = torch.cat([state.tokens, next_tokens.reshape(-1, 1).to(state.tokens)], 1)
        n, w = state.length, state.window
        if n < w.e:
            h = self._run_next(state)
        else:  # the block is complete: its positions join the long-term memory, the window slides
            if self.cfg.use_long:
                keys, labels = w.keys[:, w.s - w.lo : w.e - w.lo], state.tokens[:, w.s : w.e]
                for f, kk, ll in zip(state.fifos, keys, labels):
                    f.append(kk, ll)
            state.window, h = self._open_window(state.tokens, n, n)
        self._rows(state, h)
        return state

    def reorder(self, state: DecodeState, index: Tensor) -> DecodeState:
        """Keep hypotheses ``index`` (B',) in that order (beam search reordering)."""
        index = index.to(state.tokens.device)
        w = state.window
        if w.cache is not None:
            w.cache.reorder(index)
        w.keys = w.keys.index_select(0, index)
        fifos = [copy.copy(state.fifos[i]) for i in index.tolist()] if state.fifos else []
        r = state.rows
        rows = StepRows(*(getattr(r, f).index_select(0, index) for f in _ROW_TENSORS), n_local=r.n_local)
        return DecodeState(state.tokens.index_select(0, index), w, fifos, rows, state.h.index_select(0, index))

    def log_probs(self, state: DecodeState) -> Tensor:
        """(B, V) log p of the next position under the memories; ``<pad>`` at −inf (never generated; a
        Hugging Face tokenizer's ids have no pad: ``pad`` None)."""
        lp = vocab_log_probs(state.rows, self.setting, self.dim)
        if self.pad is not None:
            lp[:, self.pad] = NEG_INF
        return lp

    # -- memories --------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _rows(self, state: DecodeState, h: Tensor) -> None:
        """The memories of position n for every hypothesis (evaluation's Scorer.window_rows, one row each)."""
        n, w = state.length, state.window
        head = self.model.head
        B = h.shape[0]
        zeros = torch.zeros(B, dtype=torch.long, device=h.device)
        if hasattr(head, "log_probs_and_log_z"):  # a full softmax: log Z from the same logits
            tok_logp, tok_log_z = head.log_probs_and_log_z(h)  # (B, V), (B,)
        else:  # an adaptive head: its log Z is the head cluster's, which target_logp gives
            tok_logp, tok_log_z = head.log_probs(h), head.target_logp(h, zeros)[1]
        query = w.keys[:, n - w.lo].float()  # (B, d)
        parts, values, n_local = [], [], 0
        if self.cfg.use_local:
            local = w.keys[:, : n - w.lo].float()  # (B, n − lo, d): positions j < n of the window
            parts.append(memory_logits(torch.einsum("bd,bjd->bj", query, local), self.dim))
            values.append(state.tokens[:, w.lo : n])
            n_local = n - w.lo
            if state.fifos and len(state.fifos[0]):
                mem_keys = torch.stack([f.entries()[0] for f in state.fifos]).float()  # (B, M, d)
                mem_vals = torch.stack([f.entries()[1] for f in state.fifos])  # (B, M)
                parts.append(memory_logits(torch.einsum("bd,bjd->bj", query, mem_keys), self.dim))
                values.append(mem_vals.to(h.device))
        mem_scores = torch.cat(parts, 1) if parts else query.new_zeros(B, 0)
        mem_values = torch.cat(values, 1) if values else zeros.new_zeros(B, 0)
        if self.external is not None:
            ext_scores, ext_values = self.external.search(query)  # one search for all hypotheses
            ext_scores, order = ext_scores.float().sort(dim=1, descending=True, stable=True)
            ext_values = ext_values.long().gather(1, order.to(ext_values.device))
        else:
            ext_scores, ext_values = query.new_zeros(B, 0), zeros.new_zeros(B, 0)
        state.h = h
        state.rows = StepRows(tok_logp, tok_log_z, mem_scores, mem_values.long(), ext_scores, ext_values, n_local)


_ROW_TENSORS = ("tok_logp", "tok_log_z", "mem_scores", "mem_values", "ext_scores", "ext_values")


# ------------------------------------------------------------------------------------------------
# Search: generate.search with the language model's rules


def search_spec(decoder: LMDecoder, beam: int) -> SearchSpec:
    """generate.search's rules for ``trime generate``: at most ``max_new_tokens`` tokens (the last one
    ends a hypothesis whatever it is), </s> ends one with ``stop_at_eos``, ``<pad>`` is never generated."""
    cfg = decoder.cfg
    return SearchSpec(last=cfg.max_new_tokens - 1, pad=decoder.pad, eos=decoder.eos, beam=beam, nbest=beam,
                      lenpen=cfg.lenpen, min_len=0, force_eos=False, stop_at_eos=cfg.stop_at_eos,
                      sampling=cfg.sampling, temperature=cfg.temperature, top_k=cfg.sampling_topk,
                      top_p=cfg.sampling_topp, seed=cfg.seed)  # fmt: skip


def stream(decoder: LMDecoder, prompt: list[int]) -> Iterator[tuple[int, float]]:
    """Greedy decoding or sampling (``cfg.sampling``), i.e. generate.search with beam 1: yields
    (token, log p) as they are chosen."""
    if decoder.cfg.max_new_tokens:
        for best in search_steps(decoder, prompt, search_spec(decoder, 1), []):
            yield int(best.tokens[0]), float(best.log_probs[0])


def beam_search(decoder: LMDecoder, prompt: list[int]) -> list[Hypothesis]:
    """generate.search's beam search (fairseq's rules) of width K = ``cfg.beam`` over the prompt's
    continuations: the K best hypotheses (generated tokens, prompt excluded), best first
    (score = Σ log p / len ** lenpen)."""
    if not decoder.cfg.max_new_tokens:
        return []
    return search(decoder, prompt, search_spec(decoder, decoder.cfg.beam))[0]


# ------------------------------------------------------------------------------------------------
# Text in, text out


class WordCodec:
    """Word-level text: whitespace tokens, a newline is </s>; output joins words with spaces."""

    def __init__(self, dictionary: Dictionary):
        self.d, self.pad, self.eos = dictionary, dictionary.pad, dictionary.eos
        self._at_line_start = True

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        lines = text.split("\n")
        for i, line in enumerate(lines):
            ids += [self.d.index(w) for w in line.split()]
            if i + 1 < len(lines):
                ids.append(self.d.eos)
        return ids

    def reset(self, text: str = "") -> None:
        self._at_line_start = not text or text.endswith("\n")

    def piece(self, token: int) -> str:
        """The text of one more token, spaced against the previous one (streaming)."""
        if token == self.d.eos:
            self._at_line_start = True
            return "\n"
        out = ("" if self._at_line_start else " ") + self.d[token]
        self._at_line_start = False
        return out

    def decode(self, tokens: list[int]) -> str:
        self.reset()
        return "".join(self.piece(t) for t in tokens)


class ByteCodec:
    """Character-level (byte) data: each byte b is the symbol ``str(b)``, byte 10 is </s>."""

    def __init__(self, dictionary: Dictionary):
        self.d, self.pad, self.eos = dictionary, dictionary.pad, dictionary.eos
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def encode(self, text: str) -> list[int]:
        return [self.d.eos if b == 10 else self.d.index(str(b)) for b in text.encode("utf-8")]

    def reset(self, text: str = "") -> None:
        self._dec.reset()

    def piece(self, token: int) -> str:
        if token == self.d.eos:
            return self._dec.decode(b"\n")
        sym = self.d[token]
        return self._dec.decode(bytes([int(sym)])) if sym.isdigit() and int(sym) < 256 else f"<{sym}>"

    def decode(self, tokens: list[int]) -> str:
        self.reset()
        return "".join(self.piece(t) for t in tokens) + self._dec.decode(b"", final=True)


class HFCodec:
    """A Hugging Face tokenizer's ids, as ``trime data prepare --hf-tokenizer`` writes them: each line's
    tokens (no special tokens), then eos. Streamed text is the decoded line so far, piece by piece (a token
    that ends inside a UTF-8 character waits for the next)."""

    pad = None  # the tokenizer's ids have no padding token to keep out of generation

    def __init__(self, tokenizer, eos: int):
        self.tok, self.eos = tokenizer, int(eos)
        self._line: list[int] = []  # the ids of the current line, and its text shown so far
        self._shown = ""

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        lines = text.split("\n")
        for i, line in enumerate(lines):
            ids += self.tok(line, add_special_tokens=False)["input_ids"] if line else []
            if i + 1 < len(lines):
                ids.append(self.eos)
        return ids

    def reset(self, text: str = "") -> None:
        """Start streaming after ``text`` (its last line spaces the first piece)."""
        self._line = self.encode(text.rpartition("\n")[2])
        self._shown = self.tok.decode(self._line)

    def piece(self, token: int) -> str:
        if token == self.eos:
            self._line, self._shown = [], ""
            return "\n"
        self._line.append(int(token))
        text = self.tok.decode(self._line)
        if text.endswith("\ufffd"):
            return ""
        out, self._shown = text[len(self._shown) :], text
        return out

    def decode(self, tokens: list[int]) -> str:
        self.reset()
        return "".join(self.piece(t) for t in tokens)

    def symbol(self, token: int) -> str:
        """How one token is shown on its own."""
        return "\n" if token == self.eos else self.tok.decode([int(token)])


def is_byte_dictionary(d: Dictionary) -> bool:
    """True for a character-level (byte) dictionary: every real symbol is a number 0..255."""
    syms = [s for s in d.symbols if s not in SPECIALS and not s.startswith("madeupword")]
    return bool(syms) and all(s.isdigit() and int(s) < 256 for s in syms)


def codec_for(dictionary: Dictionary, data: str = ""):
    """The codec of a model's data: the data directory's level when given, else guessed from the dictionary."""
    if data:
        char = read_data_meta(data).get("level") == "char"
    else:
        char = is_byte_dictionary(dictionary)
    return ByteCodec(dictionary) if char else WordCodec(dictionary)


def job_codec(job: Job, data: str = ""):
    """The codec of a job's model: its dictionary's (word or byte level, :func:`codec_for`), or for a Hugging
    Face model the tokenizer its source ships, else the one ``data`` was prepared with (:class:`HFCodec`)."""
    if job.dictionary is not None or not isinstance(job.model_cfg, HFModelConfig):
        return codec_for(job.need_dictionary(), data)
    hf = getattr(job.cfg, "hf_model", "")
    sources = [(hf, getattr(job.cfg, "gguf_file", ""))] if hf else [(str(job.ckpt_dir), "")]
    if data and read_data_meta(data).get("tokenizer"):
        sources.append((read_data_meta(data)["tokenizer"]["source"], ""))
    tokenizer = next((t for t in (source_tokenizer(*s) for s in sources) if t is not None), None)
    if tokenizer is None:
        raise DataError(
            f"{sources[0][0]}: no tokenizer to turn text into ids; give --data, prepared with --hf-tokenizer"
        )
    return HFCodec(tokenizer, job.pad_eos[1] if data else tokenizer.eos_token_id)


# ------------------------------------------------------------------------------------------------
# The command


@dataclass
class Generation:
    prompt: str
    text: str  # the generated text (detokenised)
    hypotheses: list[Hypothesis]


def open_decoder(cfg: GenerateConfig) -> tuple[LMDecoder, WordCodec | ByteCodec | HFCodec]:
    """Load the checkpoint, its vocabulary (:func:`job_codec`) and the external memory of ``cfg``."""
    job = open_model(cfg, data=cfg.data)
    codec = job_codec(job, cfg.data)
    decoder = LMDecoder(job.model, cfg, dim=job.model_cfg.d_model, pad=codec.pad, eos=codec.eos,
                        window=job.window, external=job.external())  # fmt: skip
    return decoder, codec


def read_prompt(cfg: GenerateConfig) -> str:
    """The prompt of ``cfg`` (GenerateConfig's check refuses --prompt with --prompt-file)."""
    if cfg.prompt_file:
        try:
            return Path(cfg.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{cfg.prompt_file}: cannot read the prompt ({e})") from None
    return cfg.prompt


def generate(cfg: GenerateConfig, out=None, echo: bool = False) -> Generation:
    """Continue the prompt of ``cfg``; greedy and sampled text is written to ``out`` as it comes (after the
    prompt itself with ``echo``, once the model and its memories have loaded)."""
    prompt = read_prompt(cfg)
    decoder, codec = open_decoder(cfg)
    if echo and out is not None:
        out.write(prompt)
        out.flush()
    ids = codec.encode(prompt)
    amp = autocast_dtype(cfg.amp, decoder._device())
    with autocast(decoder._device(), amp):
        if cfg.beam > 1:
            hyps = beam_search(decoder, ids)
            text = codec.decode(hyps[0].tokens.tolist()) if hyps else ""
            if out is not None:
                out.write(text)
                out.flush()
            return Generation(prompt, text, hyps)
        codec.reset(prompt)
        finished: list[list[Hypothesis]] = []
        pieces = []
        steps = search_steps(decoder, ids, search_spec(decoder, 1), finished) if cfg.max_new_tokens else ()
        for best in steps:  # greedy or sampled: written as the tokens come
            pieces.append(codec.piece(int(best.tokens[0])))
            if out is not None:
                out.write(pieces[-1])
                out.flush()
    return Generation(prompt, "".join(pieces), finished[0] if finished else [])
