"""The cost said before an index build, and the one-line refusals of builds that do not fit."""

from pathlib import Path

import pytest

from trime.errors import DatastoreError
from trime.memory.cost import GIB, build_cost, refuse_unless_fits
from trime.memory.index import plan_index


def test_sizes_of_the_original_wikitext_index():
    """103M keys of width 1024: 4096 lists, 64-byte codes (spec §6.2): 64 + 8 bytes a row."""
    plan = plan_index(103_224_461, 1024)
    c = build_cost(plan, 103_224_461, key_bytes=2, train_size=1_000_000, chunk=500_000)
    assert (plan["n_lists"], plan["code_size"]) == (4096, 64)
    assert c["key_bytes"] == 103_224_461 * 1024 * 2
    assert c["index_bytes"] == 103_224_461 * 72 + 4096 * 1024 * 4 + 1024 * 256 * 4
    assert c["train_ram"] == 2 * 1_000_000 * 1024 * 4 and c["search_ram"] == c["index_bytes"] + 103_224_461 * 8
    assert build_cost(plan, 103_224_461, key_bytes=2, train_size=10**6, chunk=1, shards=4)["add_ram"] < c["add_ram"] / 3


def test_refusals_name_the_option_that_fits(tmp_path):
    plan = plan_index(10**9, 1024)
    c = build_cost(plan, 10**9, key_bytes=2, train_size=1_000_000, chunk=500_000)  # a 67 GiB index
    with pytest.raises(DatastoreError, match=r"adding the keys needs .* use --shards \d+ \(one shard in RAM"):
        refuse_unless_fits(c, tmp_path / "x.index", ram=16 * GIB)
    with pytest.raises(DatastoreError, match="lower --train-size"):
        refuse_unless_fits(c, tmp_path / "x.index", ram=4 * GIB)
    with pytest.raises(DatastoreError, match="of disk"):
        refuse_unless_fits(c, tmp_path / "x.index", ram=1 << 50, disk=GIB)
    said = []
    sharded = build_cost(plan, 10**9, key_bytes=2, train_size=1_000_000, chunk=500_000, shards=8)
    refuse_unless_fits(sharded, Path(tmp_path / "x.index"), say=said.append, ram=16 * GIB, disk=1 << 50)
    assert "use --memory-mmap, or --memory-backend ray" in said[0]
