"""External memory at evaluation time: a datastore and its faiss index, searched once per scored token.

Fixes against the original (spec §6, §11 items 8–10), each named:
- only the scored positions of a window are searched (the original searched the context too);
- one search serves both the joint softmax and the kNN-LM interpolation (the original ran two);
- one GPU is enough for faiss (the original needed two).
"""

from __future__ import annotations

import torch

from trime.memory.datastore import Datastore
from trime.memory.index import Index


class ExternalMemory:
    """A datastore and its index, checked against the model that will query them."""

    def __init__(self, datastore: Datastore, index: Index, k: int):
        self.datastore, self.index, self.k = datastore, index, k

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
    ) -> ExternalMemory:
        ds = Datastore.open(dstore)
        ds.check_compatible(dim, vocab_size, keytype, fingerprint)
        index = Index.open(indexfile, probe=probe)
        index.check_datastore(ds)
        return cls(ds, index, k)

    @classmethod
    def of(cls, cfg, model_cfg, fingerprint: str | None = None) -> ExternalMemory:
        """The external memory an evaluation-style config names (``dstore``, ``indexfile``, ``k``,
        ``probe``, ``knn_keytype``), checked against a model config (``d_model``, ``vocab_size``)."""
        return cls.open(cfg.dstore, cfg.indexfile, k=cfg.k, probe=cfg.probe, dim=model_cfg.d_model,
                        vocab_size=model_cfg.vocab_size, keytype=cfg.knn_keytype, fingerprint=fingerprint)  # fmt: skip

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (n, k) raw similarities best first, −inf for index holes; values (n, k) their tokens)."""
        scores, ids, valid = self.index.search(queries, self.k)
        return scores.float().masked_fill(~valid, float("-inf")), self.datastore.lookup(ids)
