"""Tokenize a corpus into megatron-core's IndexedDataset (PREFIX.bin + PREFIX.idx), the format that
data=indexed trains on: in parallel, and never leaving a half-written pair that looks complete."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_train.config import ConfigError
from moe_train.data.sources import DocumentReader
from moe_train.data.tokenizer import HFTokenizer, train_bpe

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # text per task handed to a worker


@dataclass
class PrepareResult:
    prefix: Path
    tokenizer: Path
    documents: int
    skipped: int
    tokens: int
    bytes: int
    seconds: float  # reading + tokenizing + writing (BPE training not included)
    bpe_seconds: float
    workers: int
    dtype: str
    engine: str  # what encoded: "tiktoken" (where it provably equals tokenizers) or "tokenizers"

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (
            f"{self.documents:,} documents ({self.skipped:,} skipped), {self.tokens:,} tokens, "
            f"{self.bytes / 1e6:.1f} MB of text in {self.seconds:.1f} s = {self.mb_per_s:.1f} MB/s "
            f"with {self.workers} worker(s) ({self.engine}); wrote {self.prefix}.bin/.idx ({self.dtype}), "
            f"tokenizer {self.tokenizer}"
        )


def smallest_dtype(vocab_size: int) -> type[np.integer]:
    for dtype in (np.uint8, np.uint16, np.int32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def _first_bytes(texts: Iterable[str], limit: int) -> Iterator[str]:
    size = 0
    for text in texts:
        yield text
        size += len(text)
        if size >= limit:
            return


def _chunks(texts: Iterable[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


_worker_tokenizer: HFTokenizer | None = None
_worker_dtype: type[np.integer] | None = None


def _init_worker(tokenizer: HFTokenizer, dtype) -> None:
    global _worker_tokenizer, _worker_dtype
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _worker_tokenizer, _worker_dtype = tokenizer, dtype


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids of the chunk's documents, each ending with the end-of-document token; their lengths)"""
    ids, lengths = _worker_tokenizer.encode_documents(texts)
    return ids.astype(_worker_dtype), lengths


def _encoded(
    texts: Iterable[str], tokenizer: HFTokenizer, dtype, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if workers == 1:
        _init_worker(tokenizer, dtype)
        yield from map(_encode_chunk, _chunks(texts))
        return
    with multiprocessing.get_context().Pool(workers, _init_worker, (tokenizer, dtype)) as pool:
        yield from pool.imap(_encode_chunk, _chunks(texts))


def _add_documents(builder, ids: np.ndarray, lengths: np.ndarray) -> None:
    """builder.add_document for each document of a chunk (one sequence each), in one write."""
    builder.data_file.write(ids.tobytes(order="C"))
    first = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(lengths.tolist())
    builder.document_indices.extend(range(first + 1, first + 1 + lengths.size))


def _remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def prepare(
    files: list[Path],
    output_prefix: str | Path,
    tokenizer: str | Path | None = None,
    vocab_size: int | None = None,
    text_field: str = "text",
    on_missing: str = "skip",
    workers: int | None = None,
    progress: bool = True,
    bpe_sample_bytes: int = 100_000_000,
) -> PrepareResult:
    """Tokenize `files` with `tokenizer` (a tokenizer.json) or with a byte-level BPE of `vocab_size`
    trained on their first `bpe_sample_bytes` of text and saved as tokenizer.json beside the output.

    Documents are read here and tokenized in chunks by a pool of workers (order kept), each followed
    by the end-of-document token, in the smallest dtype that holds the vocabulary; with tiktoken where
    it provably gives `tokenizers`' ids (tiktoken_bpe). Output, a trained tokenizer included, is written
    under temporary names and renamed at the end (.idx last): an interrupted run never leaves a pair
    that looks complete, nor replaces the tokenizer of the data already there."""
    from tqdm import tqdm

    from moe_train.data.indexed import megatron_datasets

    if (tokenizer is None) == (vocab_size is None):
        raise ConfigError(
            "give either a tokenizer (--tokenizer tokenizer.json) or a vocabulary size to train a BPE"
        )
    prefix = Path(output_prefix)
    trained_tokenizer = prefix.parent / "tokenizer.json"
    others = [p.name for p in prefix.parent.glob("*.idx") if p.name != f"{prefix.name}.idx"]
    if tokenizer is None and trained_tokenizer.exists() and others:
        raise ConfigError(
            f"{trained_tokenizer} is the tokenizer of {', '.join(sorted(others))}: a BPE trained now would "
            f"replace it; encode with it (--tokenizer {trained_tokenizer}) or prepare into another folder"
        )
    prefix.parent.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    tmp = prefix.with_name(f"{prefix.name}.tmp{os.getpid()}")
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    tmp_bin, tmp_idx, tmp_tok = Path(f"{tmp}.bin"), Path(f"{tmp}.idx"), Path(f"{tmp}.tokenizer.json")
    try:
        bpe_seconds = 0.0
        if tokenizer is None:
            start = time.perf_counter()
            texts = iter(DocumentReader(files, text_field, on_missing))
            first = next(texts, None)
            if first is None:
                raise ConfigError(f"empty corpus: no documents in {len(files)} file(s)")
            train_bpe(_first_bytes(itertools.chain([first], texts), bpe_sample_bytes), vocab_size, tmp_tok)
            tokenizer = tmp_tok  # put in place with the data, at the end
            bpe_seconds = time.perf_counter() - start
        tokenizer = HFTokenizer(tokenizer)
        dtype = smallest_dtype(tokenizer.vocab_size)
        engine = "tokenizers" if tokenizer.tiktoken is None else "tiktoken"  # decided once, here
        # imported before the clock starts, which times reading, tokenizing and writing only
        builder_class = megatron_datasets().indexed_dataset.IndexedDatasetBuilder

        start = time.perf_counter()
        reader = DocumentReader(files, text_field, on_missing)
        builder = builder_class(str(tmp_bin), dtype=dtype)
        tokens = 0
        with tqdm(desc="tokenize", unit="B", unit_scale=True, disable=not progress) as bar:
            for ids, lengths in _encoded(reader, tokenizer, dtype, workers):
                _add_documents(builder, ids, lengths)
                tokens += ids.size
                bar.update(reader.stats.bytes - bar.n)
        if reader.stats.documents == 0:
            raise ConfigError(
                f"empty corpus: no documents in {len(files)} file(s) ({reader.stats.skipped} skipped)"
            )
        builder.finalize(str(tmp_idx))
        _remove(idx_path)  # from here until the last rename the old pair is visibly incomplete
        if tokenizer.path == tmp_tok:
            os.replace(tmp_tok, trained_tokenizer)
            tokenizer.path = trained_tokenizer
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    except BaseException:
        _remove(tmp_bin, tmp_idx, tmp_tok)
        raise
    return PrepareResult(
        prefix,
        tokenizer.path,
        reader.stats.documents,
        reader.stats.skipped,
        tokens,
        reader.stats.bytes,
        time.perf_counter() - start,
        bpe_seconds,
        workers,
        np.dtype(dtype).name,
        engine,
    )
