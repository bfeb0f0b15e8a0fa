"""Corpora, tokenizers and loaders with a resumable position."""

from moe_train.data.loader import PackedSequences, TrainBatches, build_datasets
from moe_train.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "PackedSequences", "TrainBatches", "build_datasets"]
