"""Shared pytest fixtures. Keep this small: helpers live in tests/reference.py and tests/fixtures.py."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _clean_torch_state():
    """Each test starts from the default dtype and no process group (STYLE §7.6)."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
