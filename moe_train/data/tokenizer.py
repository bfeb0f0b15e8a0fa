"""Tokenizers: byte-level (token id = byte value) and Hugging Face `tokenizers` (a local tokenizer.json,
or a byte-level BPE trained on the corpus itself). Nothing is downloaded."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from moe_train.config import ConfigError
from moe_train.data.tiktoken_bpe import TiktokenBPE

log = logging.getLogger(__name__)

# The end-of-document token a trained BPE gets, and the names recognised in a user's tokenizer.json.
EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[EOS]")


class ByteTokenizer:
    """Token id = byte value, so the loss in nats per token is nats per byte."""

    vocab_size = 256
    eos_id = 0  # NUL never occurs in source text, so it can mark the end of a document

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a local tokenizer.json."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise ConfigError(f"tokenizer {path} {what} (expected a Hugging Face tokenizer.json)")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own exception types
            raise ConfigError(f"tokenizer {path} cannot be read: {e}") from None
        self.path = path
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
        if eos is None:
            raise ConfigError(
                f"tokenizer {path} has no end-of-document token; it needs one of {', '.join(EOS_CANDIDATES)}"
            )
        self.eos_id, self.eos_token = vocab[eos], eos

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @functools.cached_property
    def tiktoken(self) -> TiktokenBPE | None:
        """tiktoken with this vocabulary, where it provably gives `tokenizers`' ids (about 3x faster)."""
        return TiktokenBPE.load(self.path)

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of `texts`, each followed by the end-of-document token, in one int64 array; and the
        length of each document, that token included."""
        if self.tiktoken is not None:
            docs = [self.tiktoken.encode(text) for text in texts]
        else:
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
            docs = [np.array(e.ids, dtype=np.int64) for e in encodings]
        eos = np.array([self.eos_id], dtype=np.int64)
        ids = np.concatenate([part for doc in docs for part in (doc, eos)]) if docs else eos[:0]
        return ids, np.array([doc.size + 1 for doc in docs], dtype=np.int64)


WORD_LIMIT = 2048  # characters of one line the BPE trainer sees as one word


def _bounded_words(texts: Iterable[str]) -> Iterator[str]:
    """The texts for the BPE trainer, lines longer than WORD_LIMIT cut into pieces: its time grows
    much faster than a word's length (one 500 KB line took 257 s, the same text in 80-character
    lines 13 s), and text without newlines (minified code, a web page as one line) is common.
    Encoding still takes whole lines."""
    for text in texts:
        if len(text) <= WORD_LIMIT:
            yield text
            continue
        for line in text.splitlines(keepends=True):
            for start in range(0, len(line), WORD_LIMIT):
                yield line[start : start + WORD_LIMIT]


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> HFTokenizer:
    """Train a byte-level BPE (every byte is in the alphabet, so any text round-trips) with
    `vocab_size` entries including the end-of-document token; save it to `path`.

    Words are lines, not GPT-2's regex pieces: measured on this project's 2-core machine the regex
    pre-tokenizer alone caps encoding at about 1.4 MB/s per core, while line-level words encode about
    twice as fast and give longer tokens (4.3 vs 3.4 bytes per token on the stdlib corpus, 4.2 vs 3.1
    on English text), since merges may cross spaces (as SentencePiece's may). With this pre-tokenizer
    tiktoken gives exactly `tokenizers`' ids (see tiktoken_bpe) at 3-4 times the speed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ConfigError(
            f"vocab_size={vocab_size} must be at least {len(alphabet) + 1} for a byte-level BPE"
        )
    tokenizer = Tokenizer(models.BPE())
    # tiktoken_bpe.LINE_PRE_TOKENIZER is this, as JSON: what TiktokenBPE reproduces
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", "merged_with_previous"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(_bounded_words(texts), trainer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    trained = HFTokenizer(path)
    if trained.vocab_size < vocab_size:  # the text ran out of pairs to merge
        log.warning(
            "the BPE has %d tokens, not the %d asked for: the text sample has no more pairs to merge",
            trained.vocab_size,
            vocab_size,
        )
    return trained
