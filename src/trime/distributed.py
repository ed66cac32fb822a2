"""The only module that touches torch.distributed (STYLE §7.3, §7.7 habit 4).

Every helper is the identity on one process (rank 0, world size 1), so single-process code reads as
if distribution did not exist. ``init`` reads the torchrun environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); backend nccl on CUDA, gloo otherwise.

``make_group_gather`` builds the ``gather`` the losses receive (spec §3.1–3.2): ranks form groups of
``group_size`` consecutive ranks (num_comb_shards); each rank sees the rows of its group in rank
order, its own slice being its own tensor (gradient flows into it) and the others constants.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from trime.errors import ConfigError


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(timeout: timedelta | None = None) -> torch.device:
    """Join the process group described by torchrun's environment; return this process's device.
    ``timeout``: how long a collective waits for the slowest rank (torch's default when None).

    A no-op (returning cuda:0 or cpu) when WORLD_SIZE is unset or 1, or when already initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not is_initialized():
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ConfigError(f"WORLD_SIZE={world} but {var} is not set; launch with torchrun")
        backend = "nccl" if use_cuda else "gloo"
        kw = ({"device_id": device} if use_cuda else {}) | ({"timeout": timeout} if timeout else {})
        dist.init_process_group(backend=backend, init_method="env://", **kw)
    return device


def cleanup() -> None:
    """Leave the process group (no-op on one process)."""
    if is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: Tensor | float | int) -> Tensor | float | int:
    """Sum over ranks. Tensors come back as a new tensor; Python numbers as a number of the same type."""
    if not is_initialized():
        return x.clone() if isinstance(x, Tensor) else x
    if isinstance(x, Tensor):
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out
    t = torch.tensor(x, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return type(x)(t.item())


def all_reduce_max(x: Tensor) -> Tensor:
    """Elementwise maximum over ranks, as a new tensor."""
    out = x.detach().clone()
    if is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_gather_varlen(x: Tensor, group=None) -> list[Tensor]:
    """Gather tensors whose first dimension differs across ranks: pad to the longest, gather, unpad.

    Returns one tensor per rank of ``group`` (default: the world), in rank order; no gradient flows
    through them. On one process: [x].
    """
    if not is_initialized():
        return [x]
    n = dist.get_world_size(group)
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = x.detach().new_zeros((longest, *x.shape[1:]))  # (max rows, ...)
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return [p[:c] for p, c in zip(parts, counts)]


def make_group_gather(group_size: int) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor, int, list[int]]]:
    """A ``gather(keys (N, d), values (N,)) -> (keys (R, d), values (R,), offset, [0, R])`` for the losses.

    Ranks [g·group_size, (g+1)·group_size) form memory group g (spec §3.1 num_comb_shards). Must be
    called on every rank (it creates the process groups collectively). On one process the gather
    returns its inputs unchanged.
    """
    world = world_size()
    if group_size < 1 or world % group_size:
        raise ConfigError(f"memory group size {group_size} does not divide the world size {world}")
    if world == 1:
        return lambda keys, values: (keys, values, 0, [0, keys.shape[0]])
    me = rank()
    handle = None
    for g in range(world // group_size):  # every rank creates every group, in the same order
        ranks = list(range(g * group_size, (g + 1) * group_size))
        pg = None if group_size == world else dist.new_group(ranks)
        if me in ranks:
            handle = pg
    index = me % group_size

    def gather(keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor, int, list[int]]:
        all_keys = all_gather_varlen(keys, handle)
        all_values = all_gather_varlen(values, handle)
        all_keys[index], all_values[index] = keys, values  # own slice keeps its gradient
        offset = sum(k.shape[0] for k in all_keys[:index])
        total = sum(k.shape[0] for k in all_keys)
        return torch.cat(all_keys), torch.cat(all_values), offset, [0, total]

    return gather


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; identity on one process)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (picklable objects; [obj] on one process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def no_sync(model: torch.nn.Module):
    """Context that skips DDP's gradient all-reduce (gradient accumulation); a null context otherwise."""
    if hasattr(model, "no_sync") and world_size() > 1:
        return model.no_sync()
    return contextlib.nullcontext()


def wrap_ddp(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """DistributedDataParallel when world size > 1 (device_ids on CUDA), else the model itself."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if next(model.parameters()).is_cuda:
        kwargs.setdefault("device_ids", [torch.cuda.current_device()])
    return DistributedDataParallel(model, **kwargs)
