"""sentencepiece in ``trime data prepare``: apply a given model, or train one on the training text.

Text is encoded as fairseq's sentencepiece recipes do before fairseq-preprocess: each line becomes its pieces
joined by single spaces (``spm_encode --output_format=piece``), so the dictionary is built from, and the ids
are looked up for, those pieces. A model trained here uses sentencepiece's defaults (unigram, NFKC
normalisation, character coverage 0.9995) and is saved in the data directory as ``sentencepiece.model``,
next to the dictionary it made, so that new text can be encoded the same way (``--sentencepiece-model``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from trime.errors import DataError
from trime.io import sha256_file

MODEL = "sentencepiece.model"


def _processor(proto: bytes, origin: str):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError):
        raise DataError(f"{origin}: not a sentencepiece model") from None
    return sp


class Pieces:
    """A sentencepiece model and what made it: ``encode`` turns lines into space-separated pieces."""

    def __init__(self, proto: bytes, origin: str):
        self.proto, self.origin = proto, origin
        self._sp = _processor(proto, origin)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Pieces:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such sentencepiece model")
        return cls(path.read_bytes(), str(path.resolve()))

    @classmethod
    def train(cls, lines: Iterable[str], vocab_size: int) -> Pieces:
        """A model of ``vocab_size`` pieces learned on ``lines`` (sentencepiece's defaults)."""
        import io

        import sentencepiece as spm

        if vocab_size < 1:
            raise DataError(f"--sentencepiece-vocab must be positive, got {vocab_size}")
        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(ln for ln in lines if ln.strip()), model_writer=out, vocab_size=vocab_size,
                minloglevel=2,
            )  # fmt: skip
        except RuntimeError as e:  # "... Vocabulary size too high (N). Please set it to a value <= M."
            raise DataError(f"--sentencepiece-vocab {vocab_size}: {str(e).rsplit('] ', 1)[-1].strip()}") from None
        return cls(out.getvalue(), "trained")

    def __len__(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, lines: list[str]) -> list[str]:
        """Each line as its pieces joined by spaces (an empty line stays empty)."""
        return [" ".join(p) for p in self._sp.encode(lines, out_type=str)]

    def save(self, directory: Path) -> dict:
        """Write ``MODEL`` into ``directory``; return its meta.json entry."""
        (directory / MODEL).write_bytes(self.proto)
        return {"model": MODEL, "source": self.origin, "pieces": len(self), "sha256": sha256_file(directory / MODEL)}
