"""The byte-level stream's tokenizer (data=stdlib_bytes: token id = byte value, 0 = end of document)
as a Hugging Face tokenizer, so that a byte-level model exports with the tokenizer it was trained on."""

from __future__ import annotations

from pathlib import Path

EOS = "\x00"  # byte 0 (NUL), the end-of-document token


def write_byte_tokenizer(path: Path) -> None:
    """A tokenizer.json whose ids are the UTF-8 bytes of the text, as ByteTokenizer's.

    ASCII characters are tokens of their own (id = the character's byte); every other character is
    not in the vocabulary and falls back to its UTF-8 bytes, the tokens <0x80>..<0xFF> (ids 128-255).
    NUL is the special end-of-document token, so skip_special_tokens drops it as ByteTokenizer's
    decode does, and a NUL in the text is id 0 either way."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {chr(b): b for b in range(128)} | {f"<0x{b:02X}>": b for b in range(128, 256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    tokenizer.save(str(path))
