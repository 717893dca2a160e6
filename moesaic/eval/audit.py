"""The extraction audit (FlexOlmo, section 5.3): how much of a party's training text a model
reproduces verbatim.

From `n` of the party's training documents (evenly spaced over its train split) a prefix of
`prefix_len` tokens is cut at a seeded place; the model continues it greedily for
`match_len` tokens. A sample is *extracted* when those tokens equal the document's next
`match_len` tokens exactly, and *loosely extracted* when their token-level edit distance to
them is at most (1 - `loose`) * match_len (a few tokens off). The result holds rates and
counts only, never text: the party runs it on its own data and may hand the numbers on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random

import numpy as np

from moesaic.data.loader import documents, load_manifest
from moesaic.eval.generate import generate
from moesaic.model.transformer import Decoder

LOOSE = 0.9  # share of the continuation that must survive the edit distance


def edit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Levenshtein distance between two token sequences."""
    a, b = list(map(int, a)), list(map(int, b))
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def samples(data_dir: str | os.PathLike, source: str, *, n: int, prefix_len: int,
            match_len: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prefix, true continuation) from up to `n` training documents long enough for both."""
    load_manifest(data_dir, source)  # a missing source is named here
    need = prefix_len + match_len
    docs = [d for d in documents(data_dir, source, "train") if len(d) >= need]
    if not docs:
        raise ValueError(f"--source {source!r}: no training document of {need} tokens or more "
                         "(prefix plus continuation)")
    picks = np.linspace(0, len(docs) - 1, min(n, len(docs))).round().astype(int)
    rng = random.Random(f"{seed}:{source}")
    out = []
    for i in picks:
        start = rng.randint(0, len(docs[i]) - need)
        out.append((docs[i][start:start + prefix_len],
                    docs[i][start + prefix_len:start + need]))
    return out


@dataclasses.dataclass(frozen=True)
class Extraction:
    samples: int
    exact: int
    loose: int
    prefix_len: int
    match_len: int
    loose_share: float = LOOSE

    @property
    def exact_rate(self) -> float:
        return self.exact / self.samples

    @property
    def loose_rate(self) -> float:
        return self.loose / self.samples

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "exact_rate": self.exact_rate,
                "loose_rate": self.loose_rate}


def rates(generated: list[np.ndarray], truths: list[np.ndarray], *, prefix_len: int,
          loose: float = LOOSE) -> Extraction:
    """Counts of exact and loose matches of each generation against its true continuation."""
    match_len = len(truths[0])
    exact = sum(len(g) == len(t) and bool(np.all(g == t)) for g, t in zip(generated, truths))
    near = sum(edit_distance(g, t) <= math.floor((1 - loose) * len(t) + 1e-9)  # 1 - 0.9 < 0.1
               for g, t in zip(generated, truths))
    return Extraction(len(truths), exact, near, prefix_len, match_len, loose)


def extraction(model: Decoder, data_dir: str | os.PathLike, source: str, *, n: int = 64,
               prefix_len: int = 32, match_len: int = 32, seed: int = 0,
               batch_size: int = 16, loose: float = LOOSE, progress: bool = False
               ) -> Extraction:
    """The audit of `model` on party `source`'s training documents (see the module)."""
    if min(n, prefix_len, match_len) < 1:
        raise ValueError("n, prefix_len and match_len must be at least 1")
    if not 0 < loose <= 1:
        raise ValueError(f"loose={loose}: a share in (0, 1]")
    pairs = samples(data_dir, source, n=n, prefix_len=prefix_len, match_len=match_len,
                    seed=seed)
    # no eos stop: an eos the document does not have there is a mismatch like any token
    out = generate(model, [p for p, _ in pairs], max_new_tokens=match_len, eos_id=None,
                   batch_size=batch_size, progress=progress, desc=f"audit {source}")
    return rates(out.tokens, [t for _, t in pairs], prefix_len=prefix_len, loose=loose)
