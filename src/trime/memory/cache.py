"""Long-term memory for evaluation: a FIFO of past scored positions (spec §5.4).

Letters: M entries held (M ≤ size), n new entries, d key width.

After each evaluation window is scored, the keys q_j and targets y_j of its *scored* positions
(non-pad targets of the new block only, never the context prefix) are appended; the FIFO keeps
the most recent ``size`` of them. While scoring the next window, every FIFO entry is visible to
every row, and the current window's own positions come on top (visible iff j < i), so a row i of
the window sees M + i entries. The context prefix of a window consists of the most recent scored
tokens, so those tokens appear twice (FIFO key and window key); the original does the same and
its numbers depend on it (spec §5.4, §11 item 2). Building the mask is the caller's job.
"""

from __future__ import annotations

import torch


class MemoryFIFO:
    """The most recent ``size`` (key, value) pairs of scored positions, oldest first.

    Keys are stored detached; device and dtype follow the tensors most recently appended.
    """

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"MemoryFIFO size must be >= 0, got {size}")
        self.size = int(size)
        self._keys: torch.Tensor | None = None  # (M, d)
        self._values: torch.Tensor | None = None  # (M,) int64

    def __len__(self) -> int:
        return 0 if self._values is None else int(self._values.numel())

    def reset(self) -> None:
        """Forget every entry."""
        self._keys = None
        self._values = None

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys (M, d), values (M,) int64), oldest first; M = 0 gives (0, 0) and (0,) tensors
        on the CPU when nothing was ever appended (check ``len(fifo)`` before concatenating)."""
        if self._keys is None:
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
        return self._keys, self._values

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append n entries (keys (n, d), values (n,)) and keep the last ``size``."""
        if keys.dim() != 2 or values.dim() != 1 or keys.shape[0] != values.shape[0]:
            raise ValueError(
                f"append needs keys (n, d) and values (n,), got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        keys = keys.detach()
        values = values.detach().to(device=keys.device, dtype=torch.long)
        if self.size == 0:
            return
        if self._keys is not None and len(self):
            if self._keys.shape[1] != keys.shape[1]:
                raise ValueError(f"key width changed from {self._keys.shape[1]} to {keys.shape[1]}")
            keys = torch.cat([self._keys.to(device=keys.device, dtype=keys.dtype), keys])  # (M + n, d)
            values = torch.cat([self._values.to(keys.device), values])  # (M + n,)
        # clone so the FIFO never keeps the caller's (possibly much larger) storage alive
        self._keys = keys[-self.size :].clone()
        self._values = values[-self.size :].clone()
