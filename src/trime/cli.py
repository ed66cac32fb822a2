"""The ``trime`` command. Each subcommand parses flags into config dataclasses and calls one
library function; a user's mistake (TrimeError) prints one line and exits 2.

    trime data fetch NAME            download a known corpus (shakespeare, wikitext-103, enwik8)
    trime data prepare SRC --out D   dictionary + int32 token arrays (or --hf-tokenizer T: a model's own ids)
    trime train DATA [--preset P]    train with CE or a TRIME objective (torchrun for many GPUs; --hf-model M)
    trime eval DATA --path CKPT      sliding-window evaluation with local / long / external memory (or --hf-model M)
    trime generate --path CKPT       continue a prompt with the memories of evaluation (or --hf-model M)
    trime explain DATA --path CKPT   an HTML report of which memory entries moved each token's probability (or --hf-model M)
    trime mt train|bm25|datastore|generate|reproduce
                                     translation: encoder-decoder, TrimeMT, kNN-MT, beam search, sacreBLEU
    trime reproduce                  the main job: the whole pipeline on the offline default corpus
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

from trime import config as C
from trime import distributed as dist
from trime import hf_cache, io
from trime.checkpoint import convert
from trime.data import bm25
from trime.data.fetch import fetch
from trime.data.hf_text import prepare_hf, prepare_hf_corpus
from trime.data.pair_corpora import PAIR_CORPORA, fetch_pairs
from trime.data.pairs import CORPUS_KIND as PAIR_CORPUS_KIND
from trime.data.pairs import prepare_pairs, read_pairs_meta
from trime.data.prepare import load_dictionary, load_split, prepare, prepare_corpus
from trime.datastore_build import build_datastore, build_mt_datastore
from trime.errors import TrimeError
from trime.evaluate import evaluate
from trime.explain.report import explain
from trime.generate.beam import BeamConfig
from trime.generate.lm import generate
from trime.memory.index import IndexSettings, build_index_ranks, grow_index
from trime.memory.neighbors import NeighborCache, sweep
from trime.model.encoder_decoder import MTModelConfig
from trime.mt_generate import translate
from trime.pipelines.mt_reproduce import mt_reproduce
from trime.pipelines.reproduce import VARIANTS, reproduce
from trime.train import fit
from trime.translation import bm25_pair_order, fit_translation


def _preset_layers(ns: argparse.Namespace, section: str) -> dict:
    """A language-model preset's table ``section`` (empty without --preset)."""
    if not getattr(ns, "preset", None):
        return {}
    preset = C.load_preset(ns.preset)
    if preset["_source"]["task"] == "translation":
        raise TrimeError(f"preset {ns.preset!r} is a translation recipe: use it with trime mt train")
    return preset.get(section, {})


def _config(ns: argparse.Namespace, cls: type, *layers: dict):
    """The config ``cls`` of a command: its defaults < ``layers`` (a preset's table) < the flags given."""
    return C.build(cls, *layers, C.overrides_from_args(ns, cls))


def cmd_fetch(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.FetchConfig)
    out_dir = cfg.out or f"data/{cfg.name}"
    mirror = cfg.mirror or None
    if cfg.name in PAIR_CORPORA:
        out = fetch_pairs(cfg.name, out_dir, mirror=mirror, local=cfg.local or None, overwrite=cfg.overwrite)
    else:
        out = fetch(cfg.name, out_dir, overwrite=cfg.overwrite, mirror=mirror, sdist=cfg.sdist or None)
    print(f"| corpus {cfg.name} in {out}")


def _is_pair_corpus(cfg: C.PrepareConfig, pairs: C.PairPrepareConfig) -> bool:
    """A corpus of translation pairs: so says its meta.json, or a flag only pairs have is given."""
    meta = Path(cfg.src) / "meta.json"
    kind = io.read_json(meta).get("kind") if cfg.src and meta.is_file() else None
    default = C.to_dict(C.PairPrepareConfig())
    flags = [f"--{k.replace('_', '-')}" for k, v in C.to_dict(pairs).items() if v != default[k]]
    lm_files = [f"{s}.txt" for s in ("train", "valid", "test") if (Path(cfg.src) / f"{s}.txt").is_file()]
    if flags and lm_files and not (pairs.source_lang or pairs.target_lang):
        verb = "is" if len(flags) == 1 else "are"
        raise TrimeError(
            f"{cfg.src} is a language-model corpus ({', '.join(lm_files)}), but {', '.join(flags)} {verb} for "
            "translation pairs: give --source-lang/--target-lang for a pair corpus, or --dict for a language model"
        )
    return bool(flags or kind == PAIR_CORPUS_KIND)


def cmd_prepare(ns: argparse.Namespace) -> None:
    cfg, pairs = _config(ns, C.PrepareConfig), _config(ns, C.PairPrepareConfig)
    splits, src, out = cfg.splits(), cfg.src, cfg.out
    spm = {
        "sentencepiece_model": cfg.sentencepiece_model or None,
        "sentencepiece_vocab": cfg.sentencepiece_vocab or None,
    }
    if src and _is_pair_corpus(cfg, pairs):
        given = {k: v if isinstance(v, bool) else v or None for k, v in C.to_dict(pairs).items()}
        out = prepare_pairs(src, out, **given, **spm, overwrite=cfg.overwrite)
    elif cfg.hf_tokenizer and (splits or src):  # the tokenizer's ids instead of a dictionary
        hf = {"gguf_file": cfg.gguf_file or None, "overwrite": cfg.overwrite}
        out = (
            prepare_hf(splits, out, cfg.hf_tokenizer, **hf)
            if splits
            else prepare_hf_corpus(src, out, cfg.hf_tokenizer, **hf)
        )
    elif splits:
        out = prepare(
            splits, out, char_level=bool(cfg.char_level), dictionary=cfg.dict or None, **spm, overwrite=cfg.overwrite
        )
    elif src:
        out = prepare_corpus(
            src, out, char_level=cfg.char_level, dictionary=cfg.dict or None, **spm, overwrite=cfg.overwrite
        )
    else:
        raise TrimeError("give a corpus directory (train.txt, valid.txt, test.txt) or --train/--valid/--test files")
    print(f"| prepared data in {out}")


def cmd_train(ns: argparse.Namespace) -> None:
    model_cfg = _config(ns, C.ModelConfig, _preset_layers(ns, "model"))
    cfg = _config(ns, C.TrainConfig, _preset_layers(ns, "train"))
    if ns.print_config:
        print(json.dumps({"model": C.to_dict(model_cfg), "train": C.to_dict(cfg)}, indent=2))
        return
    run_dir = fit(model_cfg, cfg)
    print(f"| run directory {run_dir}")


def _need_model(cfg, command: str) -> None:
    """Every command that runs a language model takes a trime checkpoint or a Hugging Face model."""
    if not (cfg.path or cfg.hf_model):
        raise TrimeError(f"trime {command} needs --path CHECKPOINT or --hf-model NAME_OR_DIR")


def cmd_eval(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.EvalConfig, _preset_layers(ns, "eval"))
    _need_model(cfg, "eval")
    result = evaluate(cfg)
    print(f"| {cfg.gen_subset}: {result.n_tokens} tokens scored")
    print(result.line())


def cmd_generate(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.GenerateConfig)
    _need_model(cfg, "generate")
    generate(cfg, out=sys.stdout, echo=True)  # the prompt is echoed once the model has loaded: an error is its own line
    print()


def cmd_explain(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.ExplainConfig, _preset_layers(ns, "eval"))
    _need_model(cfg, "explain")
    if bool(cfg.data) == bool(cfg.text):
        raise TrimeError("trime explain needs a data directory or --text TEXT (one of them)")
    report = explain(cfg)
    print(f"| {report['summary']['n_tokens']} tokens explained in {cfg.out}" + (f" and {cfg.json}" if cfg.json else ""))
    print(report["summary"]["line"])


def cmd_datastore(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.DatastoreConfig)
    _need_model(cfg, "datastore build")
    if not cfg.out:
        raise TrimeError("trime datastore build needs --out DIR")
    print(f"| datastore in {build_datastore(cfg)}")


def cmd_datastore_add(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.DatastoreConfig)
    if not ((cfg.path or cfg.hf_model) and cfg.out):
        raise TrimeError("trime datastore add needs --path CHECKPOINT (or --hf-model NAME_OR_DIR) and --out DIR")
    out = build_datastore(cfg, add=True)
    print(f"| datastore in {out}: {io.read_meta(out)['rows']} rows (then: trime index add {out})")


def cmd_index_add(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.IndexAddConfig)
    found = [p for p in sorted(Path(cfg.dstore).glob("knn.index.*")) if p.suffix in (".ip", ".l2")]
    if not cfg.out and len(found) != 1:
        raise TrimeError(f"{cfg.dstore}: {'no' if not found else len(found)} indexes knn.index.ip|l2 there; "
                         "name the one to grow with --out")  # fmt: skip
    path, added = grow_index(cfg.dstore, cfg.out or found[0], chunk=cfg.chunk, use_gpu=cfg.use_gpu)
    print(f"| index in {path}: {added} rows added" if added else f"| index in {path}: up to date")


def cmd_index(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.IndexConfig)
    out = io.check_output_file(cfg.out or Path(cfg.dstore) / f"knn.index.{cfg.metric}", io.FAISS_INDEX)
    settings = IndexSettings(
        metric=cfg.metric,
        n_lists=cfg.n_lists or None,
        code_size=cfg.code_size or None,
        train_size=cfg.train_size,
        seed=cfg.seed,
        chunk=cfg.chunk,
        probe=cfg.probe,
        use_gpu={"auto": "auto", "yes": True, "no": False}[cfg.use_gpu],
        shards=cfg.shards,
        trained=cfg.trained,
        only=tuple(cfg.only_shards) or None,
    )
    dist.init(timeout=timedelta(days=7))  # torchrun: ranks share the shards (a rank waits while others add)
    try:
        path = build_index_ranks(cfg.dstore, out, settings, say=print if dist.is_main() else None)
    finally:
        dist.cleanup()
    if path is None:  # not rank 0
        return
    if settings.only is not None and not (path.with_name(path.name + ".json")).exists():
        print(f"| shards {','.join(map(str, settings.only))} of {cfg.shards} in {path.parent}; once every shard "
              "is there, the same command without --only-shards writes the manifest")  # fmt: skip
    else:
        print(f"| index in {path}")


def cmd_sweep(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.SweepConfig)
    grid = {"softmax_temp": cfg.softmax_temp, "lmbda": cfg.lmbda, "interp_temp": cfg.interp_temp}
    if cfg.k:
        grid["k"] = cfg.k
    rows = sweep(NeighborCache.load(cfg.cache), grid)
    print("| softmax_temp | lmbda | interp_temp |    k | loss (base 2) |    ppl |")
    for r in rows:
        print(
            f"| {r['softmax_temp']:12g} | {r['lmbda']:5g} | {r['interp_temp']:11g} | {r['k']:4d} | "
            f"{r['loss']:13.4f} | {r['ppl']:6.2f} |"
        )
    best = min(rows, key=lambda r: r["loss"])
    print(
        f"| best: --softmax-temp {best['softmax_temp']:g} --lmbda {best['lmbda']:g} "
        f"--interp-temp {best['interp_temp']:g} --k {best['k']} -> Perplexity: {best['ppl']:.2f}"
    )


def cmd_bm25_batches(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.Bm25BatchesConfig)
    work = {"work_dir": cfg.work_dir or None, "seed": cfg.seed}
    bm25.bm25_batches(cfg.data, cfg.tokens_per_sample, cfg.out, **work, **cfg.search_options())


def cmd_bm25_segments(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.Bm25SegmentsConfig)
    words = load_dictionary(cfg.data).symbols
    n = bm25.write_segments(load_split(cfg.data, "train"), words, cfg.tokens_per_sample, cfg.out)
    print(f"| {n} segments in {cfg.out}")


def cmd_bm25_index(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.Bm25IndexConfig)
    bm25.build_index(cfg.segments, cfg.out)


def cmd_bm25_search(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.Bm25QueryConfig)
    io.check_not_a_file(cfg.out, "bm25_results")  # a resumable work directory: its shards are kept
    bm25.search(cfg.index, cfg.segments, cfg.out, shard_id=cfg.shard_id, **cfg.search_options())


def cmd_bm25_chain(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.Bm25ChainConfig)
    n = io.read_meta(cfg.index, "bm25_index")["n_segments"]
    io.check_output_file(cfg.out, io.BATCH_ORDER)
    order = bm25.chain(cfg.results, n, seed=cfg.seed)
    with io.output_file(cfg.out, io.BATCH_ORDER) as tmp:
        tmp.write_text(json.dumps(order) + "\n")
    print(f"| order of {n} segments in {cfg.out}")


def cmd_convert(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.ConvertConfig)
    out = convert(cfg.checkpoint, cfg.out, dict_path=cfg.dict or None, trust=cfg.trust_checkpoint)
    print(f"| trime checkpoint in {out}")


def _mt_preset(ns: argparse.Namespace) -> dict:
    if not getattr(ns, "preset", None):
        return {}
    preset = C.load_preset(ns.preset)
    if preset["_source"]["task"] != "translation":
        raise TrimeError(
            f"preset {ns.preset!r} is a language-model recipe; translation presets: mt_cpu, transformer_iwslt_de_en"
        )
    return preset


def cmd_mt_train(ns: argparse.Namespace) -> None:
    preset = _mt_preset(ns)
    model_cfg = C.build(MTModelConfig, preset.get("model", {}), C.overrides_from_args(ns, MTModelConfig))
    cfg = C.build(C.MTTrainConfig, preset.get("train", {}), C.overrides_from_args(ns, C.MTTrainConfig))
    if ns.print_config:
        print(json.dumps({"model": C.to_dict(model_cfg), "train": C.to_dict(cfg)}, indent=2))
        return
    print(f"| run directory {fit_translation(model_cfg, cfg)}")


def cmd_mt_datastore(ns: argparse.Namespace) -> None:
    cfg = C.build(C.MTDatastoreConfig, C.overrides_from_args(ns, C.MTDatastoreConfig))
    if not (cfg.path and cfg.out):
        raise TrimeError("trime mt datastore needs --path CHECKPOINT and --out DIR")
    print(f"| datastore in {build_mt_datastore(cfg)}")


def cmd_mt_bm25(ns: argparse.Namespace) -> None:
    cfg = C.build(C.MTBm25Config, C.overrides_from_args(ns, C.MTBm25Config))
    read_pairs_meta(cfg.data)  # refused before its work directory is made
    bm25_pair_order(cfg.data, cfg.out, work_dir=cfg.work_dir or None, seed=cfg.seed, top_k=cfg.top_k,
                    num_shards=cfg.num_shards, n_threads=cfg.threads)  # fmt: skip


def cmd_mt_generate(ns: argparse.Namespace) -> None:
    cfg = C.build(C.TranslateConfig, C.overrides_from_args(ns, C.TranslateConfig))
    if not cfg.path:
        raise TrimeError("trime mt generate needs --path CHECKPOINT")
    result = translate(cfg, C.build(BeamConfig, C.overrides_from_args(ns, BeamConfig)))
    if not cfg.results_path:
        print("\n".join(result.lines))
    print(result.line())


def _backend_flags(ns: argparse.Namespace, cls: type) -> dict:
    """The BackendConfig flags given to a job's command: they override its preset's [reproduce] table."""
    return {k: v for k, v in C.overrides_from_args(ns, cls).items() if k in C.backend_fields(C.BackendConfig())}


def cmd_mt_reproduce(ns: argparse.Namespace) -> None:
    cfg = C.build(C.MTReproduceJobConfig, C.overrides_from_args(ns, C.MTReproduceJobConfig))
    langs = {"source_lang": cfg.source_lang or None, "target_lang": cfg.target_lang or None}
    mt_reproduce(cfg.preset, cfg.out, cfg.corpus, cfg.max_epoch, **langs, max_update=cfg.max_update,
                 backend=_backend_flags(ns, C.MTReproduceJobConfig))  # fmt: skip


def cmd_reproduce(ns: argparse.Namespace) -> None:
    cfg = _config(ns, C.ReproduceJobConfig)
    variants = list(VARIANTS) if cfg.variants == ["all"] else cfg.variants
    job = {k: getattr(cfg, k) for k in ("preset", "out", "corpus", "char_level", "max_update", "seed")}
    reproduce(**job, variants=variants, backend=_backend_flags(ns, C.ReproduceJobConfig))


def os_error_line(e: OSError) -> str:
    """One line naming the path and the cause of an I/O error."""
    cause = "disk full (no space left on device)" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    where = e.filename if e.filename is not None else "(unknown path)"
    return f"{where}: {cause}"


GROUPS = {  # commands with steps: trime GROUP STEP
    "data": "fetch and prepare corpora",
    "datastore": "external memory keys and values",
    "index": "faiss index over a datastore",
    "bm25": "BM25 batch order for trime_ext (--predefined-batches)",
    "mt": "translation: train an encoder-decoder, translate with beam search, BLEU",
}
COMMANDS = (  # (command, help, function, the configs whose fields are its arguments): the only list of them
    ("data fetch", "download a known corpus", cmd_fetch, C.FetchConfig),
    ("data prepare", "build dict.txt and int32 token arrays", cmd_prepare, C.PrepareConfig, C.PairPrepareConfig),
    ("train", "train a language model", cmd_train, C.ModelConfig, C.TrainConfig),
    ("eval", "evaluate a checkpoint with or without memories", cmd_eval, C.EvalConfig),
    ("generate", "continue a prompt with local / long / external memory (greedy, sampling, beam)", cmd_generate,
     C.GenerateConfig),
    ("explain", "HTML (and JSON) report of the memory entries behind each token's probability", cmd_explain,
     C.ExplainConfig),
    ("datastore build", "run a checkpoint over a split and store every scored position's key and next token",
     cmd_datastore, C.DatastoreConfig),
    ("datastore add", "grow a datastore by the rows of another split or text (its index: trime index add)",
     cmd_datastore_add, C.DatastoreConfig),
    ("index build", "build a faiss index (flat or IVF-PQ, sized from the datastore)", cmd_index, C.IndexConfig),
    ("index add", "add the rows a datastore gained to its index or shard set, with the same trained quantizers",
     cmd_index_add, C.IndexAddConfig),
    ("sweep", "re-score cached neighbours (trime eval --save-neighbors) over a grid of τ, λ, T, k", cmd_sweep,
     C.SweepConfig),
    ("bm25 batches", "the whole pipeline: segments, index, search, chain → a JSON list of segment ids",
     cmd_bm25_batches, C.Bm25BatchesConfig),
    ("bm25 segments", "the training segments as JSON lines {id, contents}", cmd_bm25_segments, C.Bm25SegmentsConfig),
    ("bm25 index", "a BM25 index of the segments (bm25s format)", cmd_bm25_index, C.Bm25IndexConfig),
    ("bm25 search", "each segment's text as a query: its top-k segments, by shard", cmd_bm25_search,
     C.Bm25QueryConfig),
    ("bm25 chain", "chain similar segments into one order (a permutation of all ids)", cmd_bm25_chain,
     C.Bm25ChainConfig),
    ("convert", "convert a fairseq / original TRIME checkpoint (.pt) to a trime checkpoint", cmd_convert,
     C.ConvertConfig),
    ("mt train", "train a translation model (label-smoothed CE; torchrun for many GPUs)", cmd_mt_train,
     MTModelConfig, C.MTTrainConfig),
    ("mt datastore", "teacher-forced decoder states over a split's targets (then trime index build)",
     cmd_mt_datastore, C.MTDatastoreConfig),
    ("mt bm25", "BM25 order of the training pairs for --criterion trime_mt --predefined-batches", cmd_mt_bm25,
     C.MTBm25Config),
    ("mt generate", "translate a split with beam search and print sacreBLEU (fairseq-generate)", cmd_mt_generate,
     C.TranslateConfig, BeamConfig),
    ("mt reproduce", "the MT table: vanilla, kNN-MT, TrimeMT and TrimeMT + memory on one pair corpus",
     cmd_mt_reproduce, C.MTReproduceJobConfig),
    ("reproduce", "the main job: prepare, train, evaluate and compare on one corpus", cmd_reproduce,
     C.ReproduceJobConfig),
)  # fmt: skip
FROM_DATA = ("vocab_size", "src_vocab_size", "tgt_vocab_size")  # fields set from dict.txt, never by a flag
PRESETS = {  # commands that read a preset: --preset's help, and whether --print-config prints the result
    "train": ("a preset name (shipped in trime/configs) or a .toml path (model and train tables)", True),
    "eval": ("a preset name (shipped in trime/configs) or a .toml path (its [eval] table)", False),
    "explain": ("a preset name or .toml path (its [eval] table)", False),
    "mt train": ('mt_cpu, transformer_iwslt_de_en, or a .toml path with task = "translation"', True),
}


VERBOSE_HELP = "show what the model loaders print: progress bars, warnings, transformers / accelerate / gguf logs"


class _Parser(argparse.ArgumentParser):
    """argparse's own refusals (an unknown flag, a value of the wrong type) as every other: one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"trime: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """``trime``'s commands from COMMANDS: every argument but --preset/--print-config is a config field."""
    p = _Parser(prog="trime", description="Train and evaluate memory-augmented LMs (TRIME).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {
        name: sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True, metavar="STEP")
        for name, help in GROUPS.items()
    }
    for command, help, func, *configs in COMMANDS:
        group, _, step = command.rpartition(" ")
        c = (groups[group] if group else sub).add_parser(step, help=help)
        for cls in configs:
            C.add_arguments(c, cls, skip=FROM_DATA)
        c.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
        if command in PRESETS:
            c.add_argument("--preset", help=PRESETS[command][0])
            if PRESETS[command][1]:
                c.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        if command == "reproduce":  # the names of the variants live with the job
            next(a for a in c._actions if "--variants" in a.option_strings).help += ": " + ", ".join(VARIANTS)
        c.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a flag argparse refused (2, one line: _Parser.error)
        return int(e.code or 0)
    if ns.verbose:  # read by trime.hf_cache.quiet, and inherited by the processes a command starts
        os.environ[hf_cache.VERBOSE_ENV] = "1"
    try:
        ns.func(ns)
    except TrimeError as e:
        print(f"trime: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, no permission, a directory where a file should be ...
        print(f"trime: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trime: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
