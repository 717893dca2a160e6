"""moesaic's byte tokenizer written as a Hugging Face tokenizer.json, for exports.

A ByteLevel BPE with no merges whose vocabulary lists the 256 byte symbols in byte order, so
byte b is id b exactly as in `moesaic.data.tokenizer.BYTES`; then the special tokens
<|endoftext|> (eos), <pad> and reserved <|extra_i|> up to the vocabulary size.
"""

from __future__ import annotations

import pathlib


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte, indexed by byte value."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def check_byte_ids(vocab_size: int, eos_id: int, pad_id: int) -> None:
    """Raises if eos/pad are not the byte ids after 255 in order (256, 257) or the vocabulary
    is smaller than 258: the only byte models a tokenizer.json can describe."""
    if (eos_id, pad_id) != (256, 257) or vocab_size < 258:
        raise ValueError(f"byte tokenizer export expects eos_id=256, pad_id=257, vocab_size>=258;"
                         f" the model has {eos_id}, {pad_id}, {vocab_size}")


def write_byte_tokenizer(path: str | pathlib.Path, *, vocab_size: int, eos_id: int,
                         pad_id: int) -> None:
    """Writes tokenizer.json for ids 0..255 = bytes (`check_byte_ids` first)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    check_byte_ids(vocab_size, eos_id, pad_id)
    vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<pad>"] + [f"<|extra_{i}|>" for i in range(vocab_size - 258)]
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tokenizer.save(str(path))
