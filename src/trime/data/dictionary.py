"""A fairseq-compatible vocabulary (spec §0, §8): the ``dict.txt`` every TRIME checkpoint refers to.

Semantics follow fairseq's ``Dictionary`` as ``fairseq-preprocess --only-source`` uses it:

- ids 0..3 are ``<s> <pad> </s> <unk>`` (``bos``, ``pad``, ``eos``, ``unk``);
- then every type of the training text by descending count, ties broken by the symbols' code-point
  order (``finalize`` with threshold 0 and nwords -1, i.e. every type is kept);
- then ``madeupword0000``, ``madeupword0001``, ... (count 0) until the size is a multiple of the
  padding factor (8).

A symbol equal to a special (a literal ``<unk>`` or ``</s>`` in the text) is not a new type: its
count merges into the special and it encodes to the special's id, exactly as in fairseq.

``dict.txt`` holds one ``symbol count`` line per non-special entry, in id order; fairseq's optional
trailing ``#fairseq:overwrite`` flag is understood on load.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from trime.errors import DataError
from trime.io import atomic_file

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
OVERWRITE_FLAG = "#fairseq:overwrite"


def tokenize_line(line: str) -> list[str]:
    """fairseq's ``tokenize_line``: collapse whitespace runs, strip, split on spaces.

    Python's ``\\s`` and ``str.isspace`` agree on every code point, so this is ``line.split()``.
    """
    return line.split()


class Dictionary:
    """Symbols <-> ids, fairseq style. Build with :meth:`build` or :meth:`load`."""

    bos, pad, eos, unk = 0, 1, 2, 3
    nspecial = len(SPECIALS)

    def __init__(self) -> None:
        self.symbols: list[str] = []
        self.counts: list[int] = []
        self.indices: dict[str, int] = {}
        for sym in SPECIALS:  # fairseq adds each special with count 1
            self.add_symbol(sym)

    # -- construction --------------------------------------------------------------------------

    def add_symbol(self, word: str, n: int = 1, overwrite: bool = False) -> int:
        """Add ``n`` to ``word``'s count (a new entry if unseen, or if ``overwrite``); return its id."""
        if word in self.indices and not overwrite:
            idx = self.indices[word]
            self.counts[idx] += n
            return idx
        idx = len(self.symbols)
        self.indices[word] = idx
        self.symbols.append(word)
        self.counts.append(n)
        return idx

    @classmethod
    def build(cls, counts: Counter, padding_factor: int = 8) -> Dictionary:
        """The dictionary fairseq-preprocess makes from these token counts (threshold 0, nwords -1).

        ``counts`` may include the specials (e.g. one ``</s>`` per line, as fairseq counts them):
        they merge into the special entries and never change the order of the other types.
        """
        d = cls()
        for word, n in sorted(counts.items()):
            d.add_symbol(word, n)
        d._finalize(padding_factor)
        return d

    def _finalize(self, padding_factor: int) -> None:
        """Sort the non-special types by descending count, ties by symbol; pad to the factor."""
        rest = sorted(zip(self.symbols[self.nspecial :], self.counts[self.nspecial :]))
        rest.sort(key=lambda sc: sc[1], reverse=True)  # stable: equal counts stay alphabetical
        self.symbols = list(SPECIALS) + [s for s, _ in rest]
        self.counts = self.counts[: self.nspecial] + [c for _, c in rest]
        self.indices = {s: i for i, s in enumerate(self.symbols)}
        self._pad_to_multiple(padding_factor)

    def _pad_to_multiple(self, padding_factor: int) -> None:
        i = 0
        while padding_factor > 1 and len(self) % padding_factor != 0:
            self.add_symbol(f"madeupword{i:04d}", n=0)  # a name already present adds nothing
            i += 1

    # -- files ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> Dictionary:
        """Read a fairseq ``dict.txt``; a malformed line or a duplicate symbol is a DataError."""
        path = Path(path)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            raise DataError(f"{path}: no such dictionary file") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
        d = cls()
        for lineno, line in enumerate(lines, 1):
            word, count, overwrite = _parse_dict_line(line)
            if word is None:
                raise DataError(f"{path}:{lineno}: expected '<symbol> <count>', got {line.rstrip()!r}")
            if word in d.indices and not overwrite:
                raise DataError(f"{path}:{lineno}: duplicate symbol {word!r}")
            d.add_symbol(word, n=count, overwrite=overwrite)
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Write ``dict.txt`` (specials omitted), atomically."""
        seen = set(SPECIALS)
        out = []
        for sym, n in zip(self.symbols[self.nspecial :], self.counts[self.nspecial :]):
            flag = f" {OVERWRITE_FLAG}" if sym in seen else ""
            seen.add(sym)
            out.append(f"{sym} {n}{flag}\n")
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(out)

    # -- lookups -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, sym: str) -> bool:
        return sym in self.indices

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self.symbols):
            raise IndexError(f"id {i} is outside the dictionary (size {len(self.symbols)})")
        return self.symbols[i]

    def index(self, sym: str) -> int:
        """The id of ``sym``; ``unk`` when unknown."""
        return self.indices.get(sym, self.unk)

    def encode_line(self, line: str) -> np.ndarray:
        """(n + 1,) int32: the ids of the line's whitespace tokens, then eos (an empty line: [eos])."""
        ids = [self.indices.get(w, self.unk) for w in tokenize_line(line)]
        ids.append(self.eos)
        return np.asarray(ids, dtype=np.int32)

    def string(self, ids: Iterable[int], skip_specials: bool = True) -> str:
        """Space-joined symbols; with ``skip_specials`` drop bos/pad/eos (unk stays ``<unk>``)."""
        skip = {self.bos, self.pad, self.eos} if skip_specials else set()
        return " ".join(self.symbols[i] for i in map(int, np.asarray(ids).reshape(-1)) if i not in skip)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Dictionary):
            return NotImplemented
        return self.symbols == other.symbols and self.counts == other.counts

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"Dictionary({len(self)} symbols)"


def _parse_dict_line(line: str) -> tuple[str | None, int, bool]:
    """fairseq's parse of ``symbol count [#fairseq:overwrite]``; (None, 0, False) when malformed."""
    parts = line.rstrip().rsplit(" ", 1)
    if len(parts) != 2:
        return None, 0, False
    word, field = parts
    overwrite = field == OVERWRITE_FLAG
    if overwrite:
        parts = word.rsplit(" ", 1)
        if len(parts) != 2:
            return None, 0, False
        word, field = parts
    try:
        return word, int(field), overwrite
    except ValueError:
        return None, 0, False
