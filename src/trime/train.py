"""The training loop: one process or many under torchrun, CE or a TRIME objective.

    run_dir/
      config.json          the resolved model + train config (a resumed run must not change shapes)
      log.jsonl            one line per logged update and per validation
      checkpoint_last/     written every --save-interval-updates and at each epoch end
      checkpoint_best/     the lowest validation loss so far (validation uses the run's criterion)

A killed run restarts from checkpoint_last: the epoch's batch list is a pure function of
(seed, epoch, rank), so the run skips the batches it already consumed and restores the RNG state;
at most one checkpoint interval of work is repeated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from trime import distributed as dist
from trime import io
from trime.checkpoint import DICT, load_trainer_state, load_weights, save_checkpoint
from trime.config import ModelConfig, TrainConfig, to_dict
from trime.data.batching import epoch_batches, load_batch_order, make_batch, valid_batches
from trime.data.blocks import num_segments, segment_windows
from trime.data.fairseq_bin import databin_meta
from trime.data.pairs import chosen_langs
from trime.data.prepare import (
    check_vocabulary,
    data_fingerprint,
    describe_difference,
    load_dictionary,
    load_split,
    read_data_meta,
    special_ids,
    warn_data,
)
from trime.device import autocast, autocast_dtype, pick_device
from trime.errors import CheckpointError, ConfigError, DataError
from trime.losses import LossSettings, add_diagnostics, compute_loss, diagnostics_record
from trime.model.hf import HFBackbone, load_hf, load_hf_weights
from trime.model.transformer import build_model
from trime.optim import build_optimizer, schedule, set_lr

LN2 = math.log(2)


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint's trainer state."""

    epoch: int = 1
    batches_done: int = 0  # batches of this rank consumed in the current epoch
    updates: int = 0
    best_valid: float = float("inf")  # lowest validation loss (or −metric, e.g. −BLEU) so far
    train_seconds: float = 0.0


class TrainData(Protocol):
    """What the update loop needs from a kind of training data (segments of a token stream here,
    sentence pairs in trime.data.pair_batching.PairData): this process's batches and their tensors."""

    device: torch.device
    dictionaries: dict[str, Path]  # file name in a checkpoint -> the data's dictionary file

    def epoch_batches(self, epoch: int) -> list: ...  # this rank's batches of an epoch (pure in seed, epoch, rank)

    def valid_batches(self) -> list: ...

    def tensors(self, split: str, batch) -> dict[str, torch.Tensor]: ...  # keyword arguments of the objective


class Objective(torch.nn.Module):
    """Model + criterion in one forward, so data parallelism sees the output layer's use."""

    def __init__(self, model: torch.nn.Module, settings: LossSettings, seed: int, gather: Callable | None):
        super().__init__()
        self.model, self.settings, self.gather = model, settings, gather
        self.generator = torch.Generator().manual_seed(seed + 7919 * dist.rank())

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        seg_ids: torch.Tensor | None = None,
        use_ce: bool = False,
        diagnose: bool = False,
    ):
        res = compute_loss(
            self.settings,
            self.model(inputs),
            targets,
            self.model.head,
            use_ce=use_ce,
            gather=self.gather,
            training=self.training,
            generator=self.generator,
            seg_ids=seg_ids,
            diagnose=diagnose,
        )
        return res.loss, res.n_targets.to(res.loss.dtype), res.ce_sum, res.diag


@dataclass
class SegmentData:
    """The token streams of a language-model run: segments of L tokens, batched in the run's order."""

    train: np.ndarray
    valid: np.ndarray
    L: int
    B: int  # segments per batch
    pad: int
    eos: int
    seed: int
    mode: str = "shuffled"  # shuffled | consecutive | predefined (data.batching)
    order: np.ndarray | None = None  # the predefined order
    group: int = 1  # ranks whose memories are gathered together
    with_seg_ids: bool = False  # trime_ext checks its batches for repeated segments
    dictionaries: dict[str, Path] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        n_seg = num_segments(len(self.train), self.L)
        batches = epoch_batches(
            n_seg, self.B, epoch, mode=self.mode, seed=self.seed, rank=dist.rank(), world_size=dist.world_size(),
            num_comb_shards=self.group if self.mode.startswith("consecutive") else 1, order=self.order,
        )  # fmt: skip
        if not batches:
            raise DataError(
                f"the training split has fewer than {self.B * dist.world_size()} segments of {self.L} tokens"
            )
        return batches

    def valid_batches(self) -> list[np.ndarray]:
        return valid_batches(num_segments(len(self.valid), self.L), self.B, dist.rank(), dist.world_size())

    def tensors(self, split: str, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """inputs (B, L), targets (B, L) int64 of segments ``ids`` on the run's device (and their ids)."""
        tokens = self.train if split == "train" else self.valid
        b = make_batch(
            tokens, segment_windows(ids, len(tokens), self.L), pad=self.pad, eos=self.eos, width=self.L,
            device=self.device,
        )  # fmt: skip
        out = {"inputs": b.inputs, "targets": b.targets}
        if self.with_seg_ids and split == "train":
            out["seg_ids"] = torch.as_tensor(ids)  # on the CPU: checked without a device sync
        return out


def resolve_model_config(model_cfg: ModelConfig, cfg: TrainConfig) -> ModelConfig:
    """The model a run trains: the vocabulary from the data's dict.txt, room for a segment."""
    if model_cfg.vocab_size == 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=len(load_dictionary(cfg.data)))
    if model_cfg.max_positions < cfg.tokens_per_sample:
        model_cfg = dataclasses.replace(model_cfg, max_positions=cfg.tokens_per_sample)
    return model_cfg


def _load_data(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> tuple[ModelConfig, SegmentData]:
    model_cfg = resolve_model_config(model_cfg, cfg)
    check_vocabulary(cfg.data, model_cfg.vocab_size)
    if dist.is_main():
        warn_data(read_data_meta(cfg.data), cfg.data)
    train, valid = load_split(cfg.data, "train"), load_split(cfg.data, cfg.valid_subset)
    if cfg.max_valid_tokens:
        valid = valid[: cfg.max_valid_tokens]
    pad, eos = special_ids(cfg.data)
    mode, order = _batch_order(cfg, num_segments(len(train), cfg.tokens_per_sample))
    dict_file = Path(cfg.data) / DICT
    data = SegmentData(
        train, valid, cfg.tokens_per_sample, cfg.max_tokens // cfg.tokens_per_sample, pad, eos, cfg.seed, mode, order,
        _group_size(cfg), cfg.criterion == "trime_ext", {DICT: dict_file} if dict_file.exists() else {}, device,
    )  # fmt: skip
    return model_cfg, data


def _batch_order(cfg: TrainConfig, n_segments: int):
    if cfg.predefined_batches:
        return "predefined", load_batch_order(cfg.predefined_batches, n_segments)
    if cfg.keep_order:
        return ("consecutive_shuffled" if cfg.shuffle_groups else "consecutive"), None
    if cfg.criterion == "trime_ext" and dist.is_main():
        print(
            "| note: trime_ext on random batches (no --predefined-batches): a step's other segments are not BM25 neighbours"
        )
    return "shuffled", None


def _group_size(cfg: TrainConfig) -> int:
    """Ranks whose memories are gathered together (num_comb_shards, spec §3.1)."""
    world = dist.world_size()
    if cfg.criterion == "trime_ext":
        return world
    if cfg.criterion != "trime_long" or world == 1:
        return 1
    c = cfg.train_mem_size // cfg.max_tokens if cfg.train_mem_size else 1
    if cfg.train_mem_size % cfg.max_tokens or world % c:
        raise ConfigError(
            f"--train-mem-size {cfg.train_mem_size} must be a multiple of --max-tokens that divides the ranks"
        )
    return c


# train fields a resumed run must keep (they change shapes, the objective or the batch sequence);
# the data and the batch order are compared by content (run_inputs), never by path
FIXED_ON_RESUME = (
    "tokens_per_sample", "max_tokens", "criterion", "seed", "keep_order", "shuffle_groups", "optimizer", "update_freq",
    "simulate_ranks", "lora_rank", "lora_alpha", "lora_targets",
)  # fmt: skip
PATH_FIELDS = ("data", "save_dir", "predefined_batches")


def data_identity(data_dir, splits, **langs) -> dict:
    """The content fingerprints of a prepared data directory (or fairseq data-bin), from its meta.json (nothing
    re-hashed): per dictionary and split for language-model data, else one hash of the meta.json's content."""
    meta = databin_meta(data_dir, **langs) or io.read_meta(data_dir)
    if meta.get("kind") == "data":
        return data_fingerprint(data_dir, splits)
    stable = {k: v for k, v in meta.items() if k not in ("created", "trime_version", "files")}
    return {"meta": hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]}


def run_inputs(cfg: TrainConfig) -> dict:
    """Content fingerprints of what a run reads: the data (from its meta.json) and the batch order."""
    order = getattr(cfg, "predefined_batches", "")
    return {
        "data": data_identity(cfg.data, ["train", cfg.valid_subset], **chosen_langs(cfg)),
        "batch_order": io.sha256_file(order)[:16] if order else None,
    }


def read_run_config(run_dir: Path) -> dict | None:
    """A run directory's config.json (None when there is none; ConfigError when it is someone else's)."""
    path = run_dir / "config.json"
    if not path.exists():
        return None
    try:
        old = io.read_json(path)
    except DataError:
        old = None
    if not (isinstance(old, dict) and isinstance(old.get("model"), dict) and isinstance(old.get("train"), dict)):
        raise ConfigError(f"{path}: not the config of a trime run; use another --save-dir")
    return old


def run_differences(run_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig, fields=FIXED_ON_RESUME) -> list[str]:
    """What differs between the run in ``run_dir`` and this one: 'model', 'data: ...', 'batch_order'
    or the flags among ``fields`` (None: every train field but paths). Empty for a new run."""
    old = read_run_config(run_dir)
    if old is None:
        return []
    diff = ["model"] if old["model"] != to_dict(model_cfg) else []
    new = to_dict(cfg)
    names = [k for k in new if k not in PATH_FIELDS] if fields is None else [k for k in fields if k in new]
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # a field newer than the run: its default
    diff += ["--" + k.replace("_", "-") for k in names if old["train"].get(k, default.get(k)) != new.get(k)]
    before, now = old.get("inputs"), json.loads(json.dumps(run_inputs(cfg)))
    if before is None:  # a run from before inputs were recorded: its data path is all there is
        if Path(old["train"].get("data", "")).resolve() != Path(cfg.data).resolve():
            diff.append("--data")
    else:
        changed = describe_difference(before.get("data", {}), now["data"])
        if changed:
            diff.append(f"data ({changed})")
        if before.get("batch_order") != now["batch_order"]:
            diff.append("--predefined-batches (content)")
    return diff


def _prepare_run_dir(run_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Write config.json for a new run; refuse to resume with another model, data or objective."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: is a file, not a run directory; use another --save-dir")
    old = read_run_config(run_dir)
    if old is None and run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir}: holds files but no trime run (no config.json); use another --save-dir")
    diff = run_differences(run_dir, model_cfg, cfg)
    if "model" in diff:
        raise ConfigError(f"{run_dir}: holds a run of another model; use another --save-dir")
    if diff:
        raise ConfigError(
            f"{run_dir}: resuming with a different {', '.join(diff)} than the run there; use another --save-dir"
        )
    dist.barrier()  # every rank has looked before the main one writes
    if old is None and dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        io.write_json(
            run_dir / "config.json", {"model": to_dict(model_cfg), "train": to_dict(cfg), "inputs": run_inputs(cfg)}
        )


def changed_on_resume(run_dir: Path, cfg: TrainConfig) -> dict:
    """{flag: [old, new]} of the train settings changed since the run was started (e.g. --lr)."""
    old = read_run_config(run_dir)
    if old is None:
        return {}
    new = to_dict(cfg)
    return {k: [old["train"].get(k), v] for k, v in new.items() if k not in PATH_FIELDS and old["train"].get(k) != v}


def validate(objective: torch.nn.Module, data: TrainData, amp) -> float:
    """Base-2 loss per target token of the run's criterion on the validation batches."""
    objective.eval()
    total = torch.zeros(2, dtype=torch.float64, device=data.device)
    with torch.no_grad():
        for batch in data.valid_batches():
            with autocast(data.device, amp):
                loss, n, *_ = objective(**data.tensors("valid", batch))
            total += torch.stack([loss.double(), n.double()])
    objective.train()
    loss_sum, n = dist.all_reduce_sum(total).tolist()
    return loss_sum / max(n, 1) / LN2


@dataclass
class _Parts:
    """What the update loop drives: the model, its objective (and DDP wrapper), optimisation state."""

    model: torch.nn.Module
    objective: torch.nn.Module  # forward(**tensors, use_ce) -> (loss sum, targets, ce sum); .generator
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr_at: Callable[[int], float]
    amp: torch.dtype | None


def fit(model_cfg: ModelConfig, cfg: TrainConfig, *, on_step: Callable[[Progress], None] | None = None) -> Path:
    """Train (or resume) a language model in ``cfg.save_dir``; returns the run directory."""
    dist.init()
    device = pick_device(cfg.device)
    hf = _hf_backbone(cfg, device) if cfg.hf_model else None
    model_cfg, data = _load_data(cfg, hf.cfg if hf is not None else model_cfg, device)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).to(device) if hf is None else hf.train()
    objective = Objective(
        model, LossSettings.of(cfg, data.pad), cfg.seed, dist.make_group_gather(data.group) if data.group > 1 else None
    )
    # adaptive bands and tail clusters without a token in a batch get no gradient that step
    unused = hf is None and bool(model_cfg.adaptive_input or model_cfg.adaptive_softmax_cutoff)
    return run_training(cfg, model_cfg, model, objective, data, find_unused_parameters=unused, on_step=on_step)


def run_training(
    cfg: TrainConfig,
    model_cfg,
    model: torch.nn.Module,
    objective: torch.nn.Module,
    data: TrainData,
    *,
    find_unused_parameters: bool = False,
    on_step: Callable[[Progress], None] | None = None,
) -> Path:
    """The shared part of every training run: run directory, optimiser, resume, the update loop.

    ``model_cfg`` is the model's config dataclass (saved in config.json and every checkpoint);
    ``objective`` wraps the model and its criterion (see :class:`Objective`)."""
    device = data.device
    amp = autocast_dtype(cfg.amp, device)
    run_dir = Path(cfg.save_dir)
    _prepare_run_dir(run_dir, model_cfg, cfg)
    dist.barrier()
    optimizer = build_optimizer(model.parameters(), cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    progress = _resume(run_dir, model, optimizer, objective, scaler, device, data.dictionaries)
    wrapped = dist.wrap_ddp(objective, find_unused_parameters=find_unused_parameters)
    parts = _Parts(model, objective, wrapped, optimizer, scaler, schedule(cfg), amp)
    _Loop(cfg, model_cfg, run_dir, parts, data).run(progress, on_step)
    dist.barrier()
    return run_dir


def _hf_backbone(cfg: TrainConfig, device: torch.device) -> HFBackbone:
    """The transformers causal LM of ``--hf-model`` to fine-tune (trime.model.hf), checked against L; with
    ``--lora-rank``, its LoRA adapters (initialised from the run's seed) are what trains."""
    key = "final" if cfg.knn_keytype == "final" else "last_ffn_input"
    if not dist.is_main():  # the main process converts a GGUF file into its cache entry first (trime.hf_cache)
        dist.barrier()
    model = load_hf(cfg.hf_model, gguf_file=cfg.gguf_file or None, device=device, key=key)
    if dist.is_main():
        dist.barrier()
    if 0 < model.cfg.max_positions < cfg.tokens_per_sample:
        raise ConfigError(
            f"--tokens-per-sample {cfg.tokens_per_sample} exceeds {cfg.hf_model}'s context of "
            f"{model.cfg.max_positions} positions"
        )
    if cfg.lora_rank:
        torch.manual_seed(cfg.seed)
        model.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    return model


def _resume(run_dir: Path, model, optimizer, objective, scaler, device, dictionaries: dict) -> Progress:
    last = run_dir / "checkpoint_last"
    if dist.is_main():
        io.recover_dir(last)
        io.recover_dir(run_dir / "checkpoint_best")
    dist.barrier()
    if not io.is_complete(last):
        return Progress()
    for name, src in dictionaries.items():
        if (last / name).is_file() and Path(src).read_bytes() != (last / name).read_bytes():
            raise DataError(f"{src} differs from the {name} of {last}: the data was prepared again")
    try:
        if isinstance(model, HFBackbone):
            load_hf_weights(model, last)
        else:
            model.load_state_dict(load_weights(last, device), strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{last}: weights do not fit the run's model ({str(e).splitlines()[0]})") from None
    state = load_trainer_state(last)
    if state is None:
        raise CheckpointError(f"{last}: no trainer state to resume from")
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{last}: its optimizer state does not fit this optimizer ({e})") from None
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"][min(dist.rank(), len(state["rng"]) - 1)]
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    objective.generator.set_state(rng["criterion"])
    p = Progress(**state["progress"])
    if dist.is_main():
        print(f"| resuming {run_dir} at epoch {p.epoch}, update {p.updates}")
    return p


class _Loop:
    """The update loop; split from fit() to keep each step readable."""

    def __init__(self, cfg: TrainConfig, model_cfg, run_dir: Path, parts: _Parts, data: TrainData):
        self.cfg, self.model_cfg, self.run_dir, self.parts, self.data = cfg, model_cfg, run_dir, parts, data
        self.log = io.JsonlLogger(run_dir / "log.jsonl", enabled=dist.is_main())
        self.inputs = run_inputs(cfg)  # recorded in every checkpoint's meta.json

    def done(self, p: Progress) -> bool:
        cfg = self.cfg
        return bool(
            (cfg.max_update and p.updates >= cfg.max_update)
            or (cfg.max_epoch and p.epoch > cfg.max_epoch)
            or (cfg.max_time and p.train_seconds >= cfg.max_time * 60)
        )

    def run(self, p: Progress, on_step) -> None:
        cfg = self.cfg
        changed = changed_on_resume(self.run_dir, cfg) if p.updates or p.batches_done else {}
        if changed and dist.is_main():
            self.log.log(kind="resume", epoch=p.epoch, update=p.updates, changed=changed)
            print(f"| resumed with changed settings: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed.items())}")
        while not self.done(p):
            try:
                batches = self.data.epoch_batches(p.epoch)
            except DataError as e:
                raise DataError(f"{cfg.data}: {e}") from None
            total = len(batches) // cfg.update_freq
            bar = tqdm(
                total=total,
                initial=p.batches_done // cfg.update_freq,
                desc=f"epoch {p.epoch}",
                disable=not (dist.is_main() and sys.stderr.isatty()),
                dynamic_ncols=True,
                leave=False,
            )
            while p.batches_done + cfg.update_freq <= len(batches) and not self.done(p):
                group_ids = batches[p.batches_done : p.batches_done + cfg.update_freq]
                use_ce = p.epoch <= cfg.ce_warmup_epoch or p.updates < cfg.ce_warmup_updates
                logged = (p.updates + 1) % cfg.log_interval == 0
                stats = self.update(group_ids, use_ce=use_ce, p=p, diagnose=logged and not use_ce)
                p.batches_done += cfg.update_freq
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}")
                if p.updates % cfg.log_interval == 0:
                    self.log.log(kind="train", epoch=p.epoch, update=p.updates, **stats)
                    if bar.disable and dist.is_main():
                        print(
                            f"| epoch {p.epoch:03d} | update {p.updates} | loss {stats['loss']:.3f} | "
                            f"lr {stats['lr']:.3g} | {stats['tokens_per_s']:.0f} tok/s",
                            flush=True,
                        )
                if cfg.save_interval_updates and p.updates % cfg.save_interval_updates == 0:
                    self.save(p, best=False)
                if on_step is not None:
                    on_step(p)
            bar.close()
            if p.batches_done + cfg.update_freq > len(batches):  # the epoch is complete
                self.end_epoch(p)
        if self.done(p) and p.batches_done:
            # A run whose checkpoint_best is chosen by a metric (translation's validation BLEU) that stops within
            # an epoch is validated there, as fairseq does when --max-update is reached: its last updates count.
            # Its random state is kept, so that a larger budget continues it as a run of that budget would go.
            best = False
            if getattr(self.data, "selection_metric", None) is not None:
                rng = torch.get_rng_state(), self.parts.objective.generator.get_state()
                best = self.validation(p)
                torch.set_rng_state(rng[0])
                self.parts.objective.generator.set_state(rng[1])
            self.save(p, best=best)

    def end_epoch(self, p: Progress) -> None:
        improved = self.validation(p)
        p.epoch += 1
        p.batches_done = 0
        self.save(p, best=improved)

    def validation(self, p: Progress) -> bool:
        """Validate, log and print; True when checkpoint_best improved."""
        valid = validate(self.parts.objective, self.data, self.parts.amp)
        record = {"loss": valid, "ppl": 2**valid}
        key = valid  # checkpoint_best keeps the lowest key: the validation loss, or −metric when the data has one
        metric = getattr(self.data, "selection_metric", None)  # (name, value; higher is better) e.g. BLEU
        if metric is not None:
            name, value = metric(self.parts.model)
            record[name], key = value, -value
        improved = key < p.best_valid
        p.best_valid = min(p.best_valid, key)
        if dist.is_main():
            extra = "".join(f" | valid {k} {v:.2f}" for k, v in record.items() if k not in ("loss", "ppl"))
            print(
                f"| epoch {p.epoch:03d} | valid loss {valid:.4f} | valid ppl {2**valid:.2f}{extra} | updates {p.updates}"
            )
        self.log.log(kind="valid", epoch=p.epoch, update=p.updates, **record)
        return improved

    def update(self, group_ids, use_ce: bool, p: Progress, diagnose: bool = False) -> dict:
        cfg, run, data = self.cfg, self.parts, self.data
        t0 = time.time()
        lr = run.lr_at(p.updates)
        set_lr(run.optimizer, lr)
        totals = torch.zeros(3, dtype=torch.float64, device=data.device)  # loss, targets, ce
        diag = None  # memory diagnostics (losses.DIAG_SUMS): sums, the last one a maximum
        for k, batch in enumerate(group_ids):
            tensors = data.tensors("train", batch)
            sync = k == len(group_ids) - 1
            with nullcontext() if sync else dist.no_sync(run.wrapped):
                with autocast(data.device, run.amp):
                    loss, n, ce, *more = run.wrapped(**tensors, use_ce=use_ce, diagnose=diagnose)
                run.scaler.scale(loss).backward()
            totals += torch.stack([loss.detach().double(), n.double(), ce.double()])
            if more:
                diag = add_diagnostics(diag, more[0])
        totals = dist.all_reduce_sum(totals)
        # every rank takes the same branch: the criterion and use_ce are the same on every rank
        memory = (
            {}
            if diag is None
            else diagnostics_record(torch.cat([dist.all_reduce_sum(diag[:-1]), dist.all_reduce_max(diag[-1:])]))
        )
        n_total = max(totals[1].item(), 1.0)
        run.scaler.unscale_(run.optimizer)
        scale = dist.world_size() / n_total  # data parallel averages over ranks; fairseq divides by the global count
        torch._foreach_mul_([prm.grad for prm in run.model.parameters() if prm.grad is not None], scale)
        gnorm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_norm or float("inf"))
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        p.updates += 1
        dt = time.time() - t0
        p.train_seconds += dt
        return {
            "loss": totals[0].item() / n_total / LN2,
            "ce_loss": totals[2].item() / n_total / LN2,
            "lr": lr,
            "gnorm": float(gnorm),
            "tokens_per_s": n_total / max(dt, 1e-9),
            "use_ce": use_ce,
            **memory,
        }

    def save(self, p: Progress, best: bool) -> None:
        run, device = self.parts, self.data.device
        rng = {
            "torch": torch.get_rng_state(),
            "criterion": run.objective.generator.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        rngs = dist.all_gather_object(rng)
        if not dist.is_main():
            return
        state = {
            "progress": dataclasses.asdict(p),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            "rng": rngs,
        }
        dicts = self.data.dictionaries
        meta = {"epoch": p.epoch, "updates": p.updates, "best_valid": p.best_valid, "inputs": self.inputs}
        save_checkpoint(
            self.run_dir / "checkpoint_last",
            run.model,
            self.model_cfg,
            dicts,
            train_cfg=self.cfg,
            trainer_state=state,
            **meta,
        )
        if best:
            save_checkpoint(
                self.run_dir / "checkpoint_best", run.model, self.model_cfg, dicts, train_cfg=self.cfg, **meta
            )
