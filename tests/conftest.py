"""Shared pytest fixtures. Keep this small: helpers live in tests/reference.py and tests/fixtures.py."""

import os

# One intra-op thread for the tests and every process they start (CLI subprocesses, torchrun, gloo
# workers, faiss): the models are tiny, and on a 2-core machine with anything else running, two
# OpenMP threads per process spin against each other: the micro job took 23 s instead of 6 s, and
# the suite 515 s instead of ~90 s (issue #21). Set before torch is imported, so that it holds.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True, scope="session")
def _gguf_cache(tmp_path_factory):
    """GGUF cache entries (trime.hf_cache) go to a temporary directory, never the user's ~/.cache."""
    if "TRIME_CACHE" not in os.environ:
        os.environ["TRIME_CACHE"] = str(tmp_path_factory.mktemp("trime-cache"))


@pytest.fixture(autouse=True)
def _clean_torch_state():
    """Each test starts from the default dtype and no process group (STYLE §7.6)."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
