"""Where and in which precision tensors live: device choice and autocast, for every job."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from trime import distributed as dist


def pick_device(name: str) -> torch.device:
    """``auto``: this process's GPU (its local rank under torchrun) when CUDA is there, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cpu")
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None (fp32), torch.bfloat16 or torch.float16; 'auto' picks bf16 where the hardware has it."""
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and torch.cpu._is_avx512_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
