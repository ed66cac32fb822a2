"""External memory at evaluation time: a datastore and its faiss index, searched once per scored token.

Fixes against the original (spec §6, §11 items 8–10), each named:
- only the scored positions of a window are searched (the original searched the context too);
- one search serves both the joint softmax and the kNN-LM interpolation (the original ran two);
- one GPU is enough for faiss (the original needed two).

Where the index is searched (one process, shards in one process, Ray actors) is the backend's
business (memory/backends.py); every consumer holds an ExternalMemory and sees the same answers.
"""

from __future__ import annotations

import torch

from trime.memory.backends import open_backend


class ExternalMemory:
    """A datastore and its index, checked against the model that will query them. ``meta`` is the
    datastore's meta.json; ``backend`` answers ``search(queries, k) -> (scores, values, rows)``."""

    def __init__(self, backend, k: int, meta: dict):
        self.backend, self.k, self.meta = backend, k, meta

    @classmethod
    def open(
        cls,
        dstore: str,
        indexfile: str,
        *,
        k: int,
        probe: int,
        dim: int,
        vocab_size: int,
        keytype: str,
        fingerprint: str | None = None,
        backend: str = "local",
        **options,
    ) -> ExternalMemory:
        """``options``: ``mmap``, ``ray_address``, ``ray_cpus`` (:func:`backend_options`)."""
        found, meta = open_backend(backend, dstore, indexfile, probe=probe, dim=dim, vocab_size=vocab_size,
                                   keytype=keytype, fingerprint=fingerprint, **options)  # fmt: skip
        return cls(found, k, meta)

    @classmethod
    def of(cls, cfg, model_cfg, fingerprint: str | None = None) -> ExternalMemory:
        """The external memory an evaluation-style config names (``dstore``, ``indexfile``, ``k``,
        ``probe``, ``knn_keytype`` and :func:`backend_options`), checked against a model config
        (``d_model``, ``vocab_size``)."""
        return cls.open(cfg.dstore, cfg.indexfile, k=cfg.k, probe=cfg.probe, dim=model_cfg.d_model,
                        vocab_size=model_cfg.vocab_size, keytype=cfg.knn_keytype, fingerprint=fingerprint,
                        **backend_options(cfg))  # fmt: skip

    def search_rows(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores (n, k) raw similarities best first, −inf for index holes; values (n, k) their tokens;
        rows (n, k) their datastore rows, −1 for holes)."""
        return self.backend.search(queries, self.k)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (n, k) raw similarities best first, −inf for index holes; values (n, k) their tokens)."""
        scores, values, _ = self.backend.search(queries, self.k)
        return scores, values


def backend_options(cfg) -> dict:
    """The backend keywords of :meth:`ExternalMemory.open` from a config's ``memory_backend``,
    ``ray_address``, ``memory_mmap`` and ``ray_shard_cpus`` fields."""
    return {"backend": cfg.memory_backend, "ray_address": cfg.ray_address, "mmap": cfg.memory_mmap,
            "ray_cpus": cfg.ray_shard_cpus}  # fmt: skip
