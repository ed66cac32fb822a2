"""Artifacts are written atomically and never replace what is not a trime artifact."""

import pytest

from trime import io
from trime.errors import DataError


def test_atomic_dir_appears_only_when_complete(tmp_path):
    out = tmp_path / "a"
    with pytest.raises(RuntimeError), io.atomic_dir(out) as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with io.atomic_dir(out) as tmp:
        (tmp / "x").write_text("whole")
        io.write_meta(tmp, "test")
    assert io.read_meta(out, "test")["kind"] == "test" and (out / "x").read_text() == "whole"


def test_atomic_dir_never_replaces_foreign_files(tmp_path):
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not a trime artifact"), io.atomic_dir(mine, overwrite=True) as tmp:
        io.write_meta(tmp, "test")
    assert (mine / "thesis.tex").read_text() == "precious"
    with pytest.raises(DataError, match="already exists"):
        with io.atomic_dir(tmp_path / "done") as tmp:
            io.write_meta(tmp, "test")
        with io.atomic_dir(tmp_path / "done") as tmp:
            io.write_meta(tmp, "test")


def test_output_file_is_all_or_nothing_and_never_a_users(tmp_path):
    """trime.io.output_file: a failed write leaves the earlier file whole; a file of another kind stays."""
    out = tmp_path / "order.json"
    with io.output_file(out, io.BATCH_ORDER) as tmp:
        tmp.write_text("[2, 0, 1]\n")
    with pytest.raises(RuntimeError), io.output_file(out, io.BATCH_ORDER) as tmp:
        tmp.write_text("[1, ")
        raise RuntimeError("killed")
    assert out.read_text() == "[2, 0, 1]\n" and [p.name for p in tmp_path.iterdir()] == ["order.json"]
    page = tmp_path / "page.html"
    page.write_text("<html><head><title>mine</title></head></html>")
    with pytest.raises(DataError, match="not a trime HTML report"), io.output_file(page, io.HTML_REPORT) as tmp:
        tmp.write_text("never")
    assert page.read_text() == "<html><head><title>mine</title></head></html>"
    page.write_text(f"<html><head>{io.HTML_MARKER}</head></html>")  # an earlier report of ours
    with io.output_file(page, io.HTML_REPORT) as tmp:
        tmp.write_text("new")
    assert page.read_text() == "new"


def test_a_faiss_index_is_ours_by_its_sidecar_or_claim(tmp_path):
    """`trime index build --out` goes through output_file's check: a file with neither is the user's."""
    index = tmp_path / "knn.index"
    index.write_bytes(b"my own faiss file")
    with pytest.raises(DataError, match="not a trime index"):
        io.check_output_file(index, io.FAISS_INDEX)
    index.with_name("knn.index.json").write_text('{"not": "ours"}')
    with pytest.raises(DataError, match="not a trime index"):
        io.check_output_file(index, io.FAISS_INDEX)
    index.with_name("knn.index.json").write_text('{"key": {"kind": "flat"}}')
    assert io.check_output_file(index, io.FAISS_INDEX) == index
    index.with_name("knn.index.json").unlink()
    index.with_name("knn.index.building").write_text("{}")  # a build of ours killed before its sidecar
    assert io.check_output_file(index, io.FAISS_INDEX) == index


def test_a_work_directory_is_never_a_users_file(tmp_path):
    mine = tmp_path / "results"
    mine.write_text("mine")
    with pytest.raises(DataError, match="a file is there, not a trime bm25_results directory"):
        io.check_not_a_file(mine, "bm25_results")
    assert mine.read_text() == "mine"
    io.check_not_a_file(tmp_path, "bm25_results")  # a directory (resumed) or nothing at all: fine
    io.check_not_a_file(tmp_path / "new", "bm25_results")
