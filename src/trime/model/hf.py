"""Any ``transformers`` causal LM as a TRIME backbone: ``forward(tokens) -> LMOutput(h, q)`` and a head.

Legend: B batch, T positions, d hidden width, V vocabulary (rows of the LM head), N rows, c rows per chunk.

``h`` is the base model's ``last_hidden_state``: what feeds the LM head, after the final norm.
``q`` (the memory key, TRIME's ``last_ffn_input``) is the input of the last decoder block's feed-forward
sublayer, captured by a forward pre-hook. Both are found from the module structure, with no table of
layer names, by one probe forward on 2 × 3 tokens when the backbone is built:

1. **Blocks.** The ``nn.ModuleList`` whose length is ``config.num_hidden_layers`` (the one holding the
   most parameters if there are several); the last block is its last element.
2. **FFN.** Among the last block's direct children, the last one *called* in the probe that (a) owns a
   weight of two or more dimensions (norms have 1-D weights; dropouts and activations none) and (b) is
   called with a single (B, T, d) tensor and nothing else. Attention is excluded by (b) (it always
   receives masks, positions or a cache) and also runs earlier. This holds for pre-norm blocks
   (GPT-2 ``ln_2 → mlp``, Llama/Qwen2 ``post_attention_layernorm → mlp``, Gemma 2/3
   ``pre_feedforward_layernorm → mlp``), parallel blocks (GPT-J, Phi: the shared input norm) and
   mixture-of-experts blocks (the router module is the FFN). q is that child's input: the block's
   normalised FFN input in pre-norm models.
3. **Checks.** ``h`` must equal the LM head's input in the model's own forward, and :class:`HFHead`'s
   logits must equal the model's logits (weight, bias and ``final_logit_softcapping`` are reproduced; a
   head that does more is a ConfigError, never a silent mismatch).

A model where rule 1 or 2 finds nothing raises a one-line ConfigError; ``key="final"`` then still works
(q = h). Generation decodes position by position with the model's own KV cache (:class:`HFCache`).
``transformers`` is an optional extra (``pip install trime[hf]``), imported inside functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from trime import hf_cache, io
from trime.errors import CheckpointError, ConfigError
from trime.model import hf_lora
from trime.model.adaptive import OutputHead
from trime.model.base import LMOutput

KEYS = ("last_ffn_input", "final")
CHUNK_ELEMENTS = 1 << 24  # logits per chunk of the token part (64 MiB of float32)
_INSTALL = "pip install trime[hf]"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"Hugging Face models need the transformers package: {_INSTALL}") from None
    return transformers


# ---------------------------------------------------------------------------------------------
# The token part: the model's own LM head, in row chunks


@dataclass
class HFModelConfig:
    """What the rest of trime reads from ``model.cfg`` (the fairseq-style ModelConfig's names)."""

    d_model: int  # memory key width
    vocab_size: int  # rows of the LM head
    max_positions: int  # the model's context length (0 when the config does not say)
    name: str = ""  # where it was loaded from


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float) -> Tensor:
    """(c, V) float32 logits of a chunk of rows h (c, d), soft-capped when ``softcap``."""
    logits = F.linear(h.to(weight.dtype), weight, bias).float()  # (c, V)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _chunk_logp(h: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, softcap: float) -> tuple[Tensor, Tensor]:
    """(log p(y), log Z), each (c,) float32, for one chunk of rows h (c, d)."""
    logits = _chunk_logits(h, weight, bias, softcap)  # (c, V)
    log_z = torch.logsumexp(logits, dim=-1)  # (c,)
    return logits.gather(1, y.unsqueeze(1)).squeeze(1) - log_z, log_z


class _ChunkedTokenPart(torch.autograd.Function):
    """(log p(y), log Z) over row chunks, saving only h, y, the head and log Z; backward recomputes each
    chunk's logits: d/dlogits = g_tlp·onehot(y) + (g_z − g_tlp)·softmax (times 1 − tanh² under soft-capping)."""

    @staticmethod
    def forward(ctx, h, y, weight, bias, softcap, chunk):
        tlp, log_z = zip(
            *(
                _chunk_logp(h[i : i + chunk], y[i : i + chunk], weight, bias, softcap)
                for i in range(0, h.shape[0], chunk)
            )
        )
        log_z = torch.cat(log_z)  # (N,)
        dev = h.device.type
        ctx.amp = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.softcap, ctx.chunk = softcap, chunk
        ctx.save_for_backward(h, y, weight, bias, log_z)
        return torch.cat(tlp), log_z

    @staticmethod
    def backward(ctx, g_tlp, g_z):
        h, y, weight, bias, log_z = ctx.saved_tensors
        cap, c = ctx.softcap, ctx.chunk
        g_tlp = torch.zeros_like(log_z) if g_tlp is None else g_tlp.float()
        g_z = torch.zeros_like(log_z) if g_z is None else g_z.float()
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dh = torch.empty_like(h) if need_h else None  # (N, d)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # (V, d)
        db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None  # (V,)
        dev, enabled, amp_dtype = ctx.amp
        with torch.no_grad(), torch.autocast(dev, dtype=amp_dtype, enabled=enabled):
            for i in range(0, h.shape[0], c):
                rows = slice(i, i + c)
                logits = _chunk_logits(h[rows], weight, bias, cap)  # (c, V)
                tanh = logits / cap if cap else None  # the cap's tanh, for its derivative
                grad = logits.sub_(log_z[rows, None]).exp_().mul_((g_z[rows] - g_tlp[rows])[:, None])
                grad.scatter_add_(1, y[rows, None], g_tlp[rows, None])  # (c, V) d/d logits
                if cap:
                    grad.mul_(1 - tanh.square_())
                x = h[rows].to(weight.dtype)  # (c, d)
                g = grad.to(weight.dtype)
                if need_h:
                    dh[rows] = (g @ weight).to(h.dtype)
                if need_w:
                    dw.addmm_(g.T.float(), x.float()) if weight.dtype != torch.float32 else dw.addmm_(g.T, x)
                if need_b:
                    db += grad.sum(0)
        return (
            dh,
            None,
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            None,
            None,
        )


class HFHead(OutputHead):
    """A full softmax over the rows of an LM head module (``weight`` (V, d), optional ``bias``).

    ``target_logp`` follows :meth:`OutputHead.target_logp`: log Z is the logsumexp of the logits.
    With more than ``chunk_rows`` rows it works chunk by chunk and its backward recomputes each chunk's
    logits (one extra head matmul), so neither forward nor backward holds more than a few
    chunk_rows × V float32 blocks; up to ``chunk_rows`` rows it is plain autograd.
    The LM head is borrowed, not registered: its parameters belong to the model.
    """

    def __init__(self, lm_head: nn.Module, softcap: float | None = None, chunk_rows: int | None = None) -> None:
        super().__init__()
        w = getattr(lm_head, "weight", None)
        if not isinstance(w, Tensor) or w.dim() != 2:
            raise ConfigError(f"the LM head {type(lm_head).__name__} has no (V, d) weight matrix")
        self._lm_head = (lm_head,)  # a tuple: not a submodule
        self.softcap = float(softcap or 0.0)
        self.vocab_size = int(w.shape[0])
        self.padding_idx = -1  # HF data has no fixed pad id; callers mask pad targets themselves
        self.chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // self.vocab_size)

    @property
    def weight(self) -> Tensor:
        return self._lm_head[0].weight  # (V, d)

    @property
    def bias(self) -> Tensor | None:
        b = getattr(self._lm_head[0], "bias", None)
        return b if isinstance(b, Tensor) else None

    def logits(self, h: Tensor) -> Tensor:
        """h (N, d) -> (N, V) float32 logits (soft-capped when the model caps them)."""
        return _chunk_logits(self._rows(h, self.weight), self.weight, self.bias, self.softcap)

    def log_probs(self, h: Tensor) -> Tensor:
        return self.logits(h).log_softmax(dim=-1)  # (N, V)

    def log_probs_and_log_z(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(log_probs(h) (N, V), log Z (N,) as target_logp gives it) from one head matmul, not two (decoding)."""
        logits = self.logits(h)  # (N, V)
        return logits.log_softmax(dim=-1), torch.logsumexp(logits, dim=-1)

    def target_logp(self, h: Tensor, targets: Tensor, tail_quirk: bool = False) -> tuple[Tensor, Tensor]:
        """h (N, d), targets (N,) -> (log p_tok(y) (N,), log Z (N,)) float32; ``tail_quirk`` has nothing to act on.

        Targets outside [0, V) (a pad id beyond the head) get a finite value; callers mask them."""
        x = self._rows(h, self.weight)  # (N, d)
        y = targets.reshape(-1).clamp(0, self.vocab_size - 1)  # (N,)
        w, b, cap, c = self.weight, self.bias, self.softcap, self.chunk_rows
        if x.shape[0] <= c:
            return _chunk_logp(x, y, w, b, cap)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
            return _ChunkedTokenPart.apply(x, y, w, b, cap, c)
        parts = [_chunk_logp(x[i : i + c], y[i : i + c], w, b, cap) for i in range(0, x.shape[0], c)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# Finding the blocks and the FFN


def _find_blocks(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    """(name, list) of the ModuleList of ``n_layers`` modules with the most parameters."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    found = [(n, m) for n, m in found if any(True for _ in m.parameters())]
    if not found:
        raise ConfigError(
            f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
            f"config.num_hidden_layers = {n_layers} modules (use key 'final')"
        )
    return max(found, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _first_tensor(args: tuple, kwargs: dict) -> tuple[Tensor | None, int]:
    """(the first tensor argument, number of tensor-or-other arguments that are not None)."""
    given = [a for a in args if a is not None] + [v for v in kwargs.values() if v is not None]
    first = next((a for a in given if isinstance(a, Tensor)), None)
    return first, len(given)


class _Probe:
    """Records, for each direct child of a block, the order of its first call and its arguments."""

    def __init__(self, block: nn.Module) -> None:
        self.calls: list[tuple[str, Tensor | None, int]] = []
        self.hooks = [
            child.register_forward_pre_hook(self._record(name), with_kwargs=True)
            for name, child in block.named_children()
        ]

    def _record(self, name: str):
        def hook(module, args, kwargs):
            if all(n != name for n, _, _ in self.calls):
                self.calls.append((name, *_first_tensor(args, kwargs)))

        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _pick_ffn(block: nn.Module, calls, shape: tuple[int, int]) -> str | None:
    """Rule 2 of the module docstring: the last called weighted child with one (B, T, d) argument."""
    children = dict(block.named_children())
    for name, x, n_args in reversed(calls):
        weighted = any(p.dim() >= 2 for p in children[name].parameters())
        if weighted and n_args == 1 and x is not None and x.dim() == 3 and tuple(x.shape[:2]) == shape:
            return name
    return None


# ---------------------------------------------------------------------------------------------
# The backbone


class HFBackbone(nn.Module):
    """A ``transformers`` causal LM returning LMOutput(h (B, T, d), q (B, T, d)); see the module docstring.

    Attributes: ``model`` (the causal LM), ``head`` (HFHead), ``cfg`` (HFModelConfig), ``dim`` (key
    width), ``vocab_size``, ``ffn_name`` (qualified name of the hooked FFN, None with key 'final'),
    ``source`` ((name or directory, GGUF file name or None) it was loaded from, when :func:`load_hf` loaded it),
    ``lora`` (the PeftModel around ``model`` after :meth:`add_lora`, else None).
    """

    def __init__(self, model: nn.Module, key: str = "last_ffn_input", name: str = "", chunk_rows: int | None = None):
        super().__init__()
        if key not in KEYS:
            raise ConfigError(f"unknown key {key!r}; choose one of {', '.join(KEYS)}")
        config = getattr(model, "config", None)
        if config is None or getattr(model, "get_output_embeddings", None) is None:
            raise ConfigError(f"{type(model).__name__} is not a transformers causal LM")
        if getattr(config, "is_encoder_decoder", False):
            raise ConfigError(f"{type(model).__name__} is an encoder-decoder model; trime takes decoder-only LMs")
        self.model, self.key = model, key
        base = getattr(model, "base_model", model)
        self._base = (base,) if base is not model else None  # not a second registration of the same modules
        lm_head = model.get_output_embeddings()
        if self._base is None or lm_head is None:
            raise ConfigError(f"{type(model).__name__}: no separate base model and LM head")
        self._head = (HFHead(lm_head, getattr(config, "final_logit_softcapping", None), chunk_rows),)
        self._captured: Tensor | None = None
        self._hook = None
        self._lora: tuple = ()
        self.source: tuple[str, str | None] = (name, None)
        self.ffn_name: str | None = None
        self.dim = self._probe(key)
        self.vocab_size = self.head.vocab_size
        max_pos = next(
            (getattr(config, a) for a in ("max_position_embeddings", "n_positions") if hasattr(config, a)), 0
        )
        self.cfg = HFModelConfig(
            d_model=self.dim, vocab_size=self.vocab_size, max_positions=int(max_pos or 0), name=name
        )

    @property
    def head(self) -> HFHead:
        return self._head[0]

    @property
    def lora(self) -> nn.Module | None:
        return self._lora[0] if self._lora else None

    def add_lora(self, rank: int, alpha: float, targets=()) -> None:
        """Train LoRA adapters (trime.model.hf_lora) instead of the model's weights, which are frozen."""
        self._lora = (hf_lora.add_lora(self.model, rank, alpha, targets),)  # not a submodule: the same parameters

    def _probe(self, key: str) -> int:
        """Find the FFN (rule 1-2), hook it, and check h and the head (rule 3); return the key width."""
        model, config = self.model, self.model.config
        device = next(model.parameters()).device
        V = self.head.vocab_size
        ids = torch.arange(6, device=device).view(2, 3) % V  # (B, T) = (2, 3)
        blocks_name = ffn = None
        if key == "last_ffn_input":
            n_layers = getattr(config, "num_hidden_layers", None)
            if not n_layers:
                raise ConfigError(f"{type(model).__name__}: config has no num_hidden_layers (use key 'final')")
            blocks_name, blocks = _find_blocks(model, int(n_layers))
            probe = _Probe(blocks[-1])
        lm_in: list[Tensor] = []
        grab = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: lm_in.append(a[0]))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits  # (2, 3, V)
                h = self._base[0](input_ids=ids, use_cache=False).last_hidden_state  # (2, 3, d)
        finally:
            grab.remove()
            if key == "last_ffn_input":
                probe.remove()
            model.train(was_training)
        tol = 1e-4 if h.dtype == torch.float32 else 3e-2
        if not lm_in or lm_in[0].shape != h.shape or not torch.allclose(lm_in[0], h, rtol=tol, atol=tol):
            raise ConfigError(f"{type(model).__name__}: the base model's output is not what its LM head receives")
        with torch.no_grad():
            mine = self.head.logits(h.reshape(-1, h.shape[-1])).view_as(logits)  # (2, 3, V)
        err = float((mine - logits.float()).abs().max())
        if err > tol * (1.0 + float(logits.float().abs().max())):
            raise ConfigError(
                f"{type(model).__name__}: its LM head transforms the logits in a way trime does not "
                f"reproduce (max difference {err:.3g})"
            )
        if key == "final":
            return int(h.shape[-1])
        name = _pick_ffn(blocks[-1], probe.calls, (2, 3))
        if name is None:
            raise ConfigError(
                f"cannot find the feed-forward sublayer of the last block of {type(model).__name__} "
                f"({blocks_name}.{len(blocks) - 1}); use key 'final'"
            )
        self.ffn_name = f"{blocks_name}.{len(blocks) - 1}.{name}"
        ffn = getattr(blocks[-1], name)
        self._hook = ffn.register_forward_pre_hook(self._capture, with_kwargs=True)
        return int({n: x for n, x, _ in probe.calls}[name].shape[-1])

    def _capture(self, module, args, kwargs) -> None:
        self._captured = _first_tensor(args, kwargs)[0]

    def new_cache(self) -> HFCache:
        """An empty incremental-decoding state for ``forward(inputs, cache)``."""
        return HFCache(inspect.signature(self._base[0].forward).parameters)

    def forward(self, inputs: Tensor, cache: HFCache | None = None) -> LMOutput:
        """inputs (B, T) int64 -> LMOutput(h (B, T, d) after the final norm, q (B, T, d) memory key).

        With a ``cache`` (``new_cache()``), ``inputs`` continue the t cached positions: they get positions
        t, t+1, ... and their keys/values join the model's own cache (:class:`HFCache`).
        """
        self._captured = None
        if cache is None:
            h = self._base[0](input_ids=inputs, use_cache=False).last_hidden_state  # (B, T, d)
        else:
            h = cache.run(self._base[0], inputs)
        if self.key == "final":
            return LMOutput(h=h, q=h)
        q, self._captured = self._captured, None
        if q is None:
            raise RuntimeError(f"the hook on {self.ffn_name} did not fire")
        return LMOutput(h=h, q=q)


class HFCache:
    """Incremental decoding state of an :class:`HFBackbone`: the transformers model's own KV cache (the one
    its first forward with ``use_cache=True`` makes: a ``DynamicCache`` with the model's sliding-window
    layers, if any) and the number t of positions run. The new positions are given as position ids t, t+1,
    ... (to models whose forward takes them; ALiBi models count keys) with an all-ones attention mask over
    the t + T positions, so their positions and mask are those of one uncached forward of the whole prefix.

    ``parameters``: the names the base model's forward takes; its cache argument (and output) is ``cache``
    in recent transformers, ``past_key_values`` before.
    """

    def __init__(self, parameters=("cache", "position_ids")) -> None:
        self.kv = None  # the model's Cache, made by the first run
        self._len = 0
        self._arg = "cache" if "cache" in parameters else "past_key_values"
        self._positions = "position_ids" in parameters

    def length(self, layer: int = 0) -> int:
        """Positions cached (the same in every layer)."""
        return self._len

    def run(self, base: nn.Module, inputs: Tensor) -> Tensor:
        """Run ``inputs`` (B, T) after the cached positions; returns the base model's last_hidden_state (B, T, d)."""
        B, T = inputs.shape
        t = self._len
        kwargs = {self._arg: self.kv}
        if self._positions:
            kwargs["position_ids"] = torch.arange(t, t + T, device=inputs.device).expand(B, T)  # (B, T)
        mask = torch.ones(B, t + T, dtype=torch.long, device=inputs.device)  # (B, t + T)
        out = base(input_ids=inputs, attention_mask=mask, use_cache=True, **kwargs)
        self.kv, self._len = getattr(out, self._arg), t + T
        return out.last_hidden_state

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (N',) of the N rows, in that order (beam search); N' may differ from N."""
        if self.kv is not None:
            self.kv.reorder_cache(index)


# ---------------------------------------------------------------------------------------------
# Loading and saving


def _resolve_source(name_or_dir: str | os.PathLike, gguf_file: str | None) -> tuple[str, str | None]:
    """(directory or hub name, gguf file name or None); a path to a .gguf file is split into both."""
    path = Path(name_or_dir)
    if path.is_file() and path.suffix == ".gguf":
        if gguf_file is not None and gguf_file != path.name:
            raise ConfigError(f"{path} is a GGUF file already; drop --gguf-file {gguf_file}")
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a model directory or .gguf file")
        if gguf_file is None and not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json (a save_pretrained directory) and no --gguf-file")
        if gguf_file is not None and not (path / Path(gguf_file).name).is_file():
            raise CheckpointError(f"{path / gguf_file}: no such GGUF file")
        return str(path), None if gguf_file is None else Path(gguf_file).name
    text = str(name_or_dir)
    local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep + os.sep in text
    if local or not text:
        raise CheckpointError(f"{text}: no such model directory")
    return text, gguf_file  # a hub name: transformers downloads it (online users)


def _dtype(dtype) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(names)}")
    return names[dtype]


def load_hf_model(name_or_dir, *, gguf_file: str | None = None, dtype=None, device="cpu", safetensors_only=False):
    """The ``transformers`` causal LM (eval mode) of a save_pretrained directory, a hub name or a GGUF file.

    dtype None loads float32 (trime's training and evaluation lower precision through autocast);
    "auto" keeps the checkpoint's dtype (a GGUF's: float32, what its cache entry holds). ``safetensors_only``
    refuses pickled weights. A local GGUF file is read from its cache entry (trime.hf_cache), converted
    there on its first load. The loaders print nothing unless TRIME_VERBOSE is set (trime --verbose).
    """
    tf = _transformers()
    source, gguf = _resolve_source(name_or_dir, gguf_file)
    if gguf is not None and (Path(source) / gguf).is_file():
        entry = hf_cache.ensure(Path(source) / gguf, lambda out: _convert_gguf(tf, source, gguf, out))
        if entry is not None:
            source, gguf, safetensors_only = str(entry), None, True
    kwargs: dict = {"dtype": _dtype(dtype)}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    if safetensors_only:
        kwargs["use_safetensors"] = True
    return _from_pretrained(tf, source, **kwargs).to(device).eval()


def _from_pretrained(tf, source: str, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained``, quiet, its errors as one line."""
    try:
        with hf_cache.quiet():
            return tf.AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ImportError as e:  # e.g. gguf or accelerate missing
        raise ConfigError(f"loading {source} needs a missing package ({_one_line(e)}): {_INSTALL}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot load a causal LM from {source}: {_one_line(e)}") from None


def _convert_gguf(tf, directory: str, gguf: str, out: Path) -> None:
    """Write the de-quantised model of a GGUF file, and its tokenizer when it has one, into ``out``."""
    model = _from_pretrained(tf, directory, gguf_file=gguf, dtype=torch.float32)
    with _as_plain_model(model), hf_cache.quiet():
        model.save_pretrained(out, safe_serialization=True)
    del model
    try:
        with hf_cache.quiet():
            tf.AutoTokenizer.from_pretrained(directory, gguf_file=gguf).save_pretrained(out)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError):
        pass  # no tokenizer in the file: the entry holds the model


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def load_hf(
    name_or_dir: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    dtype=None,
    device: str | torch.device = "cpu",
    key: str = "last_ffn_input",
    chunk_rows: int | None = None,
) -> HFBackbone:
    """An :class:`HFBackbone` (eval mode) around ``load_hf_model(name_or_dir, ...)``."""
    model = load_hf_model(name_or_dir, gguf_file=gguf_file, dtype=dtype, device=device)
    name = str(name_or_dir) if gguf_file is None else f"{name_or_dir}:{gguf_file}"
    backbone = HFBackbone(model, key=key, name=name, chunk_rows=chunk_rows)
    backbone.source = (str(name_or_dir), gguf_file)
    return backbone.eval()


HF_META = {"backbone": "hf"}
TRAINER = "trainer.pt"  # the trainer state file trime.checkpoint.load_trainer_state reads


@contextlib.contextmanager
def _as_plain_model(model: nn.Module):
    """A model loaded from GGUF holds plain dequantised tensors, but transformers keeps its GGUF
    "quantizer", which refuses save_pretrained: save it as the plain model it is, then restore it."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or getattr(method, "value", method) != "gguf":
        yield
        return
    config, flag = model.config.quantization_config, model.is_quantized
    model.hf_quantizer, model.is_quantized = None, False
    del model.config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer, model.is_quantized, model.config.quantization_config = quantizer, flag, config


def save_hf_checkpoint(
    path: str | os.PathLike,
    backbone: HFBackbone,
    tokenizer=None,
    *,
    train_cfg: Any = None,
    trainer_state: dict | None = None,
    **meta: Any,
) -> Path:
    """Write a backbone as a trime checkpoint directory: save_pretrained layout (config.json, safetensors
    weights, the tokenizer when given), ``trainer.pt`` for resuming when given (tensors and plain
    containers only), then meta.json (with the train config), written last; replaces an older one.
    A backbone with LoRA adapters writes only the adapter and names its base model (trime.model.hf_lora)."""
    path = Path(path)
    with io.atomic_dir(path, overwrite=True) as tmp:
        if backbone.lora is not None:
            meta.update(_lora_meta(backbone, hf_lora.save_adapter(backbone.lora, tmp)))
        else:
            with _as_plain_model(backbone.model), hf_cache.quiet():
                backbone.model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER)
        train = dataclasses.asdict(train_cfg) if dataclasses.is_dataclass(train_cfg) else train_cfg
        io.write_meta(
            tmp,
            "checkpoint",
            **HF_META,
            key=backbone.key,
            source=backbone.cfg.name,
            vocab_size=backbone.vocab_size,
            d_model=backbone.dim,
            train=train,
            **meta,
        )
    return path


def _lora_meta(backbone: HFBackbone, weights: Path) -> dict:
    """What a LoRA checkpoint's meta.json records to reload it: the base model, its fingerprint, and a
    weights fingerprint of base and adapter together (what datastores made with it are labelled with)."""
    base = getattr(backbone, "_lora_base", None)
    if base is None:  # hashed once per run, not at every checkpoint
        name, gguf = backbone.source
        local = Path(name).exists()
        base = {
            "source": str(Path(name).resolve()) if local else name,
            "gguf_file": gguf,
            "fingerprint": hf_fingerprint(name, gguf),
        }
        backbone._lora_base = base
    adapter = io.sha256_file(weights)
    both = hashlib.sha256(f"{base['fingerprint']} {adapter}".encode()).hexdigest()
    return {"lora": {"adapter_sha256": adapter}, "base": base, "weights_sha256": both}


def load_hf_weights(backbone: HFBackbone, directory: str | os.PathLike) -> None:
    """Load the safetensors weights of a save_pretrained directory into ``backbone.model`` (resuming a run);
    of a LoRA checkpoint, into the backbone's adapters."""
    if backbone.lora is not None:
        hf_lora.load_adapter_weights(backbone.lora, directory)
        return
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no safetensors weights")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device=str(next(backbone.parameters()).device)))
    model = backbone.model
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """True for a complete trime checkpoint directory written by :func:`save_hf_checkpoint`."""
    meta = Path(path) / io.META
    return meta.is_file() and io.read_json(meta).get("backbone") == "hf"


def load_hf_checkpoint(path: str | os.PathLike, *, dtype=None, device="cpu", chunk_rows: int | None = None):
    """(HFBackbone in eval mode, meta) of a :func:`save_hf_checkpoint` directory; safetensors only."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not io.is_complete(path):
        raise CheckpointError(f"{path}: incomplete checkpoint (no meta.json); it was not finished writing")
    meta = io.read_json(path / io.META)
    if meta.get("backbone") != "hf":
        raise CheckpointError(f"{path}: not a Hugging Face trime checkpoint")
    if "lora" in meta:
        model = _load_lora_base(path, meta, dtype, device)
    else:
        model = load_hf_model(path, dtype=dtype, device=device, safetensors_only=True)
    backbone = HFBackbone(model, key=meta.get("key", "last_ffn_input"), name=str(path), chunk_rows=chunk_rows)
    return backbone.eval(), meta


def hub_revision(repo_id: str, filename: str | None = None) -> str | None:
    """The commit of the hub cache's snapshot of ``repo_id`` (its ``main``) holding ``filename`` (default
    config.json), or None when it is not cached. Reads the local cache only."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, filename or "config.json")
    if not isinstance(found, str):
        return None
    parts = Path(found).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _load_lora_base(path: Path, meta: dict, dtype, device) -> nn.Module:
    """The base model of a LoRA checkpoint with its adapter merged in, after checking both are the ones trained."""
    base = meta.get("base") or {}
    name, gguf = base.get("source", ""), base.get("gguf_file")
    adapter = path / hf_lora.ADAPTER_WEIGHTS
    if not adapter.is_file() or io.sha256_file(adapter) != meta["lora"].get("adapter_sha256"):
        raise CheckpointError(
            f"{adapter}: missing, damaged or replaced (its sha256 is not the one the checkpoint recorded)"
        )
    try:
        found = hf_fingerprint(name, gguf)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: its base model is not available ({e})") from None
    if found != base.get("fingerprint"):
        raise CheckpointError(f"{path}: its base model {name} has changed since the adapter was trained")
    model = load_hf_model(name, gguf_file=gguf, dtype=dtype, device=device)
    with hf_cache.quiet():
        return hf_lora.merged(model, path).eval()


def hf_fingerprint(name_or_dir: str | os.PathLike, gguf_file: str | None = None) -> str:
    """A short hash of a local model's weight files (the GGUF file, or every *.safetensors / *.bin in the
    directory, by name and content); for a hub name, a hash of the name and the revision in the hub cache
    (:func:`hub_revision`; the name alone when it is not cached)."""
    source, gguf = _resolve_source(name_or_dir, gguf_file)
    path = Path(source)
    h = hashlib.sha256()
    if not path.is_dir():
        revision = hub_revision(source, gguf)
        h.update(source.encode() if revision is None else f"{source}@{revision}:{gguf or ''}".encode())
        return h.hexdigest()[:16]
    files = [path / gguf] if gguf else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]
