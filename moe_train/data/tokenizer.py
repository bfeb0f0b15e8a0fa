"""Byte-level tokenizer: token id = byte value, so the loss in nats per token is nats per byte."""

from __future__ import annotations


class ByteTokenizer:
    vocab_size = 256
    eos_id = 0  # NUL never occurs in source text, so it can mark the end of a document

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")
