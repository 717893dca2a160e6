"""Sources -> TFDS ArrayRecord datasets; tokenizers; a deterministic batch = f(seed, mixture, step).

    from moesaic.data import TokenBatches, heldout_sequences, documents, check_tokenizer
    from moesaic.data.corpora import build_embedded

Modules: tokenizer (ids, identity, check_tokenizer), sources (reading files with counted
skips), prepare (atomic TFDS writing + manifest), loader (TokenBatches, heldout_sequences,
documents), corpora (the embedded domains), cli (`moesaic data ...`).
"""

from moesaic.data.loader import (
                                 HeldoutSequences,
                                 TokenBatches,
                                 documents,
                                 heldout_sequences,
                                 load_manifest,
                                 parse_mixture,
)
from moesaic.data.tokenizer import BYTES, Tokenizer, check_tokenizer, load_tokenizer

__all__ = ["BYTES", "HeldoutSequences", "TokenBatches", "Tokenizer", "check_tokenizer",
           "documents", "heldout_sequences", "load_manifest", "load_tokenizer", "parse_mixture"]
