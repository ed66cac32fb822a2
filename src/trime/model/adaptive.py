"""Adaptive input embeddings and the output heads: adaptive softmax and plain softmax (spec §1, §2 steps 1 and 10, §5.2).

Legend: N rows (flattened positions), d model width, V vocabulary, C0 = cutoff[0] shortlist size,
K tail clusters, n_c rows whose target lies in cluster c, w_b width of band b = floor(d / factor^b).

Both heads give the token side of the TRIME joint softmax (shared/DESIGN.md):
``target_logp(h, y) -> (log p_tok(y), log Z_head)``. For the adaptive softmax Z_head sums exp over the
head logits only (C0 shortlist words and one logit per tail cluster), and Z_head·p_tok(y) summed over
every y equals Z_head (spec §2 step 1). No (N, V) tensor is built on that path.

State-dict names (relative to the module; fairseq stores the same ones under ``decoder.``):

- AdaptiveInput: ``embeddings.{b}.0.weight`` (V_b, w_b) band embedding, ``embeddings.{b}.1.weight``
  (d, w_b) bias-free projection to d.
- AdaptiveSoftmax, tied (``--tie-adaptive-weights``): ``head.class_proj.weight`` (K, d); the shortlist
  uses ``embed_tokens.embeddings.0.0.weight`` (fairseq also stores that tensor as
  ``head.word_proj.weight``: drop it on import). Untied: ``head.weight`` (C0 + K, d).
- Tail cluster c: ``tail.{c}.0.weight`` (w, d) when its projection is not tied (with
  ``--tie-adaptive-proj`` fairseq's ``tail.{c}.0.weight`` is ``embeddings.{c+1}.1.weight``: drop it);
  ``tail.{c}.2.weight`` (V_{c+1}, w) when the words are not tied (tied: fairseq's copy is
  ``embeddings.{c+1}.0.weight``: drop it). Index 1 is the dropout.
- PlainSoftmax: ``weight`` (V, d) only when untied (the model registers it as ``output_projection``).
- fairseq's buffers ``_float_tensor`` and ``version`` have no counterpart here.

Tied weights are borrowed through :class:`TiedLinear`, which does not register them, so each tied
tensor appears once in ``parameters()`` and ``state_dict()``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trime.errors import ConfigError
from trime.model.ops import Dropout, dropout, target_log_softmax


def full_cutoffs(cutoff: list[int], vocab_size: int, what: str = "cutoff") -> list[int]:
    """Band/cluster upper bounds with V appended when V > last cutoff (fairseq convention, spec §1)."""
    cut = [int(c) for c in cutoff]
    if any(b <= a for a, b in zip([0] + cut, cut)):
        raise ConfigError(f"{what} {cut} must be positive and strictly increasing")
    if not cut or vocab_size > cut[-1]:
        return cut + [vocab_size]
    if vocab_size < cut[-1]:
        raise ConfigError(f"{what} {cut} exceeds the vocabulary size {vocab_size}")
    return cut


def band_width(d: int, factor: float, band: int) -> int:
    """Width of band ``band``: fairseq's ``int(d // factor**band)`` (spec §1)."""
    w = int(d // (factor**band))
    if w < 1:
        raise ConfigError(f"adaptive factor {factor} leaves band {band} of d={d} with no width")
    return w


class TiedLinear(nn.Module):
    """``x Wᵀ`` (or ``x W`` when ``transpose``) with W = ``owner.weight`` borrowed, not registered."""

    def __init__(self, owner: nn.Module, transpose: bool) -> None:
        super().__init__()
        self._owner = (owner,)  # a tuple is not registered as a submodule: W stays owned by `owner` alone
        self.transpose = transpose

    @property
    def weight(self) -> Tensor:
        return self._owner[0].weight

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        return F.linear(x, w.t() if self.transpose else w)

    def extra_repr(self) -> str:
        return f"tied to {tuple(self.weight.shape)}, transpose={self.transpose}"


class AdaptiveInput(nn.Module):
    """Adaptive input embeddings (spec §1): band b embeds its words with width w_b, then maps them to d."""

    def __init__(self, vocab_size: int, d: int, cutoff: list[int], factor: float, padding_idx: int = 1) -> None:
        super().__init__()
        self.cutoff = full_cutoffs(cutoff, vocab_size, "adaptive input cutoff")
        self.d = d
        self.padding_idx = padding_idx
        self.embeddings = nn.ModuleList()
        for b, hi in enumerate(self.cutoff):
            lo = self.cutoff[b - 1] if b else 0
            w = band_width(d, factor, b)
            emb = nn.Embedding(hi - lo, w, padding_idx=padding_idx if b == 0 else None)
            self.embeddings.append(nn.Sequential(emb, nn.Linear(w, d, bias=False)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, w^-0.5) embeddings, Xavier-uniform projections. Like fairseq, row ``padding_idx`` of
        *every* band is zeroed at init (only band 0 keeps it zero during training)."""
        for emb, proj in self.embeddings:
            nn.init.normal_(emb.weight, mean=0.0, std=emb.weight.shape[1] ** -0.5)
            if emb.weight.shape[0] > self.padding_idx:
                with torch.no_grad():
                    emb.weight[self.padding_idx].zero_()
            nn.init.xavier_uniform_(proj.weight)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (...,) -> (..., d). Every band runs (possibly on zero rows) so all weights stay in the graph."""
        flat = tokens.reshape(-1)  # (n,)
        out = None
        for b, hi in enumerate(self.cutoff):
            lo = self.cutoff[b - 1] if b else 0
            idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)  # (n_b,)
            e = self.embeddings[b](flat[idx] - lo)  # (n_b, d)
            if out is None:
                out = e.new_zeros(flat.numel(), self.d)  # (n, d)
            out.index_copy_(0, idx, e.to(out.dtype))
        return out.view(*tokens.shape, self.d)


class OutputHead(nn.Module):
    """The output layer seen by losses and evaluation: token log-probs and the head partition function."""

    vocab_size: int
    padding_idx: int

    def target_logp(self, h: Tensor, targets: Tensor, tail_quirk: bool = False) -> tuple[Tensor, Tensor]:
        """h (N, d) any dtype, targets (N,) -> (log p_tok(y) (N,), log Z_head (N,)), both float32.

        Pad targets get some finite value (callers mask them). ``tail_quirk`` reproduces spec §5.2.
        """
        raise NotImplementedError

    def log_probs(self, h: Tensor) -> Tensor:
        """h (N, d) -> (N, V) full log-distribution in float32 (small vocabularies, tests, kNN-LM)."""
        raise NotImplementedError

    def _rows(self, h: Tensor, weight: Tensor) -> Tensor:
        """Flatten h to (N, d) in the weights' dtype (autocast, if on, still picks the matmul dtype)."""
        return h.reshape(-1, h.shape[-1]).to(weight.dtype)


class AdaptiveSoftmax(OutputHead):
    """Adaptive softmax (spec §1): a head over C0 shortlist words + K cluster logits, one tail per cluster.

    ``adaptive_input`` given: the shortlist is h·E0ᵀ with E0 the band-0 embedding, the cluster logits a
    bias-free untied linear, tail c's word matrix the band-(c+1) embedding, and with ``tie_proj`` tail
    c's projection the transpose of band (c+1)'s input projection (without tied weights fairseq ignores
    ``tie_proj``, and so do we). In training mode h passes through dropout(p) and so does each tail
    projection's output.
    """

    def __init__(
        self,
        vocab_size: int,
        d: int,
        cutoff: list[int],
        factor: float = 4.0,
        dropout: float = 0.0,
        padding_idx: int = 1,
        adaptive_input: AdaptiveInput | None = None,
        tie_proj: bool = False,
    ) -> None:
        super().__init__()
        self.vocab_size, self.padding_idx, self.dropout = vocab_size, padding_idx, dropout
        self.cutoff = full_cutoffs(cutoff, vocab_size, "adaptive softmax cutoff")
        self.n_clusters = len(self.cutoff) - 1
        c0 = self.cutoff[0]
        if adaptive_input is not None:
            if adaptive_input.cutoff != self.cutoff:
                raise ConfigError("tied adaptive softmax needs the adaptive input's cutoffs")
            self.head = _TiedHead(adaptive_input.embeddings[0][0], d, self.n_clusters)
        else:
            self.head = nn.Linear(d, c0 + self.n_clusters, bias=False)
        self.tail = nn.ModuleList()
        for c in range(self.n_clusters):
            w, size = band_width(d, factor, c + 1), self.cutoff[c + 1] - self.cutoff[c]
            if adaptive_input is not None:
                emb, in_proj = adaptive_input.embeddings[c + 1]
                if emb.weight.shape[1] != w:
                    raise ConfigError("tied adaptive softmax needs the adaptive input's factor")
                proj = TiedLinear(in_proj, transpose=True) if tie_proj else nn.Linear(d, w, bias=False)
                out = TiedLinear(emb, transpose=False)
            else:
                proj, out = nn.Linear(d, w, bias=False), nn.Linear(w, size, bias=False)
            self.tail.append(nn.Sequential(proj, Dropout(dropout), out))
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.numel():
                nn.init.xavier_uniform_(m.weight)

    def _head_weight(self) -> Tensor:
        return self.head.word_proj.weight if isinstance(self.head, _TiedHead) else self.head.weight

    def _input(self, h: Tensor) -> Tensor:
        x = self._rows(h, self._head_weight())  # (N, d)
        return dropout(x, self.dropout, self.training)

    def target_logp(self, h: Tensor, targets: Tensor, tail_quirk: bool = False) -> tuple[Tensor, Tensor]:
        """Spec §1 and §2 step 1: log p_tok(y) = log softmax_head(y) for a shortlist word, else
        log softmax_head(cluster c) + log softmax_tail_c(y); log Z_head = logsumexp(head logits)."""
        x = self._input(h)  # (N, d)
        y = targets.reshape(-1)  # (N,)
        head_idx = y
        in_cluster = []
        for c in range(self.n_clusters):
            m = (y >= self.cutoff[c]) & (y < self.cutoff[c + 1])  # (N,)
            head_idx = torch.where(m, self.cutoff[0] + c, head_idx)
            in_cluster.append(m)
        logp, log_z = target_log_softmax(self.head(x), head_idx)  # (N,), (N,) over the C0 + K head logits
        for c, m in enumerate(in_cluster):
            rows = m.nonzero().squeeze(1)  # (n_c,)
            within = y[rows] - self.cutoff[c]  # (n_c,)
            tail = self.tail[c](x[rows]).float().log_softmax(dim=-1)  # (n_c, V_c)
            lp = tail.gather(1, within.unsqueeze(1)).squeeze(1)  # (n_c,)
            if tail_quirk:  # spec §5.2: ignore_index=pad hit the within-cluster index
                lp = lp.masked_fill(within == self.padding_idx, 0.0)
            logp = logp.index_add(0, rows, lp)
        return logp, log_z

    def log_probs(self, h: Tensor) -> Tensor:
        x = self._input(h)  # (N, d)
        head = self.head(x).float().log_softmax(dim=-1)  # (N, C0 + K)
        c0 = self.cutoff[0]
        parts = [head[:, :c0]]
        for c in range(self.n_clusters):
            tail = self.tail[c](x).float().log_softmax(dim=-1)  # (N, V_c)
            parts.append(tail + head[:, c0 + c : c0 + c + 1])
        return torch.cat(parts, dim=-1)  # (N, V)


class _TiedHead(nn.Module):
    """Tied head: shortlist logits h·E0ᵀ (E0 borrowed) then K cluster logits from ``class_proj``."""

    def __init__(self, embedding: nn.Embedding, d: int, n_clusters: int) -> None:
        super().__init__()
        if embedding.weight.shape[1] != d:
            raise ConfigError("tied adaptive softmax needs band 0 of width d")
        self.word_proj = TiedLinear(embedding, transpose=False)
        with warnings.catch_warnings():  # K = 0 (e.g. enwik8): a (0, d) weight, kept for fairseq's names
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.class_proj = nn.Linear(d, n_clusters, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.word_proj(x), self.class_proj(x)], dim=-1)  # (N, C0 + K)


class PlainSoftmax(OutputHead):
    """Softmax over all V words with a bias-free output matrix: the input embedding when ``tied`` is given,
    else its own ``weight`` (V, d) initialised N(0, d^-0.5) like fairseq's ``embed_out``."""

    def __init__(self, vocab_size: int, d: int, padding_idx: int = 1, tied: nn.Embedding | None = None) -> None:
        super().__init__()
        self.vocab_size, self.padding_idx = vocab_size, padding_idx
        if tied is not None:
            self._tied = (tied,)  # not registered: the weight belongs to the embedding
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, d))
            nn.init.normal_(self.weight, mean=0.0, std=d**-0.5)

    def output_weight(self) -> Tensor:
        return self._tied[0].weight if hasattr(self, "_tied") else self.weight

    def logits(self, h: Tensor) -> Tensor:
        w = self.output_weight()
        return F.linear(self._rows(h, w), w).float()  # (N, V)

    def log_probs(self, h: Tensor) -> Tensor:
        return self.logits(h).log_softmax(dim=-1)

    def log_probs_and_log_z(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(log_probs(h) (N, V), log Z_head (N,) as target_logp gives it) from one output projection."""
        logits = self.logits(h)
        return logits.log_softmax(dim=-1), torch.logsumexp(logits, dim=-1)

    def target_logp(self, h: Tensor, targets: Tensor, tail_quirk: bool = False) -> tuple[Tensor, Tensor]:
        """Z_head is the full partition function over V; ``tail_quirk`` has nothing to act on."""
        w = self.output_weight()
        return target_log_softmax(F.linear(self._rows(h, w), w), targets.reshape(-1))  # (N,), (N,)
