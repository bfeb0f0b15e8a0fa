"""Corpora, tokenizers, prepared datasets and the sample streams the trainer reads."""

from moe_train.data.loader import Datasets, PackedSequences, TrainBatches, build_datasets
from moe_train.data.tokenizer import ByteTokenizer, HFTokenizer

__all__ = ["ByteTokenizer", "Datasets", "HFTokenizer", "PackedSequences", "TrainBatches", "build_datasets"]
