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
