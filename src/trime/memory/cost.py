"""What an index build will cost, said before it starts (``trime index build`` prints it first).

Letters: R rows, d key width, L IVF lists, m PQ bytes per key, S shards, n training rows.

Sizes are exact up to faiss's headers: IVF-PQ stores m code bytes and an 8-byte id per row, plus
L × d float32 centroids and the PQ tables (d × 256 float32); a flat index stores d float32 per row
(+ an 8-byte id in a shard). Memory: training holds the float32 sample twice (the sample and
faiss's copy); adding holds the index being filled (one shard at a time) and one chunk of keys;
searching holds the index (or, memory-mapped, its centroids and the pages it touches) and, with
``local``, the values as int64. Time: k-means does 2·n·L·d flops per iteration (25 iterations, plus
the PQ's m sub-quantizers of 256 centroids), adding 2·R·(L + 256)·d; divided by ``FLOPS_PER_CORE``
times the cores, a guess good to a factor of a few, as said in the line it prints.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from trime.errors import DatastoreError

GIB = 1 << 30
FLOPS_PER_CORE = 10e9  # sustained faiss k-means / assignment throughput of one core, order of magnitude
KMEANS_ITERATIONS = 25  # faiss's default


def build_cost(plan: dict, rows: int, *, key_bytes: int, train_size: int, chunk: int, shards: int = 1) -> dict:
    """Bytes, memory and a time estimate of building ``plan`` (memory/index.py) over ``rows`` keys."""
    d, n = plan["dim"], min(rows, train_size)
    if plan["kind"] == "flat":
        index = rows * (d * 4 + (8 if shards > 1 else 0))
        train_ram, flops = 0, 0.0
    else:
        lists, m = plan["n_lists"], plan["code_size"] * plan["n_bits"] // 8
        index = rows * (m + 8) + lists * d * 4 + d * 256 * 4
        train_ram = 2 * n * d * 4
        flops = 2.0 * n * (lists + 256) * d * KMEANS_ITERATIONS + 2.0 * rows * (lists + 256) * d
    return {
        "rows": rows,
        "key_bytes": rows * d * key_bytes,
        "index_bytes": index,
        "train_ram": train_ram,
        "add_ram": -(-index // shards) + chunk * d * 4,
        "search_ram": index + rows * 8,
        "seconds": flops / (FLOPS_PER_CORE * (os.cpu_count() or 1)),
        "shards": shards,
    }


def available_ram() -> int:
    """Bytes of memory this machine can give now (MemAvailable), or the physical total."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def describe(c: dict) -> str:
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    return (
        f"{c['rows']:,} rows, keys {g(c['key_bytes'])}, index {g(c['index_bytes'])}; RAM to train "
        f"{g(c['train_ram'])}, to add {g(c['add_ram'])}, to search in one process {g(c['search_ram'])}; "
        f"about {c['seconds'] / 60:.1f} min (a rough estimate, within a factor of a few)"
    )


def refuse_unless_fits(c: dict, out: Path, say=print, ram: int | None = None, disk: int | None = None) -> None:
    """Refuse (one line, naming the option that would fit) a build this machine cannot hold; say when
    the result, though buildable, cannot be searched in one process."""
    ram = available_ram() if ram is None else ram
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    if c["train_ram"] > ram:
        raise DatastoreError(f"training needs {g(c['train_ram'])} of RAM, {g(ram)} are available; lower --train-size")
    if c["add_ram"] > ram:
        room = ram - (c["add_ram"] - c["index_bytes"] // c["shards"])  # what is left beside one chunk of keys
        need = -(-c["index_bytes"] // max(room, 1))
        raise DatastoreError(
            f"adding the keys needs {g(c['add_ram'])} of RAM, {g(ram)} are available; use --shards {max(need, 2)} "
            "(one shard in RAM at a time)"
        )
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free if disk is None else disk
    if c["index_bytes"] > free:
        raise DatastoreError(f"{out}: the index needs {g(c['index_bytes'])} of disk, {g(free)} are free there")
    if c["search_ram"] > ram:
        say(f"| searching it in one process needs {g(c['search_ram'])} of RAM ({g(ram)} available): "
            "use --memory-mmap, or --memory-backend ray with shards on several machines")  # fmt: skip
