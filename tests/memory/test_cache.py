"""MemoryFIFO: the long-term memory of evaluation (spec §5.4, §12)."""

import torch

from trime.memory.cache import MemoryFIFO


def _eval_mask(n_mem: int, n_window: int) -> torch.Tensor:
    """Brute force of the evaluation rule: every FIFO entry visible, window entries iff j < i."""
    mask = torch.zeros(n_window, n_mem + n_window, dtype=torch.bool)
    for i in range(n_window):
        for j in range(n_mem):
            mask[i, j] = True
        for j in range(n_window):
            mask[i, n_mem + j] = j < i
    return mask


def test_row_sees_fifo_plus_earlier_window_entries():
    fifo = MemoryFIFO(size=10)
    d, window = 4, 6
    for step in range(3):  # windows of 4 scored tokens: FIFO holds 4, 8, then 10 (truncated)
        keys, vals = fifo.entries()
        m = len(fifo)
        assert m == min(4 * step, 10) and keys.shape == ((m, d) if m else (0, 0)) and vals.shape == (m,)
        mask = _eval_mask(m, window)
        for i in range(window):
            assert int(mask[i].sum()) == m + i
        fifo.append(torch.randn(4, d), torch.randint(0, 50, (4,)))
    assert len(fifo) == 10


def test_truncation_keeps_the_most_recent_in_order():
    fifo = MemoryFIFO(size=5)
    for start in (0, 3, 6):
        ids = torch.arange(start, start + 3)
        fifo.append(ids.float().unsqueeze(1).repeat(1, 2), ids)  # key row r = (r, r)
    keys, vals = fifo.entries()
    assert vals.tolist() == [4, 5, 6, 7, 8]
    assert keys[:, 0].tolist() == [4.0, 5.0, 6.0, 7.0, 8.0]
    fifo.append(torch.zeros(7, 2), torch.arange(100, 107))  # one append larger than the FIFO
    assert fifo.entries()[1].tolist() == [102, 103, 104, 105, 106]


def test_detached_dtype_follows_and_reset():
    fifo = MemoryFIFO(size=3)
    k = torch.randn(2, 3, requires_grad=True)
    fifo.append(k * 2, torch.tensor([1, 2], dtype=torch.int32))
    keys, vals = fifo.entries()
    assert not keys.requires_grad and vals.dtype == torch.long
    fifo.append(torch.randn(1, 3, dtype=torch.float64), torch.tensor([3]))
    assert fifo.entries()[0].dtype == torch.float64 and len(fifo) == 3
    fifo.reset()
    assert len(fifo) == 0 and fifo.entries()[0].numel() == 0


def test_size_zero_holds_nothing():
    fifo = MemoryFIFO(size=0)
    fifo.append(torch.randn(3, 2), torch.tensor([1, 2, 3]))
    assert len(fifo) == 0
