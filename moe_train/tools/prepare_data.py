"""Tokenize corpora into megatron-core indexed datasets (PREFIX.bin + PREFIX.idx) for data=indexed:
the command line of moe_train.data.prepare, which checks its arguments before any work starts."""

from __future__ import annotations

import sys
from pathlib import Path

from moe_train.config import ConfigError
from moe_train.data.prepare import prepare
from moe_train.data.sources import find_files
from moe_train.tools.cli import one_line_errors, tool_parser

EPILOG = """\
examples:
    # train a byte-level BPE of 32k entries on the corpus itself, saved as data/web/tokenizer.json
    python -m moe_train.tools.prepare_data corpus/*.jsonl.gz --output data/web/web --vocab-size 32000
    # or use a tokenizer.json you have on disk
    python -m moe_train.tools.prepare_data books/ --output data/books/books --tokenizer tok/tokenizer.json

Inputs: .txt (a file is a document), .jsonl / .jsonl.gz (a record per line, text in --text-field),
.parquet (a row per document), or folders of them. Each document gets an end-of-document token.
A BPE trained here is encoded with tiktoken (the ids `tokenizers` gives, faster); a tokenizer.json
that tiktoken cannot provably reproduce is encoded with `tokenizers`.
"""


def main(argv: list[str]) -> None:
    parser = tool_parser("moe_train.tools.prepare_data", __doc__, EPILOG)
    parser.add_argument("inputs", nargs="+", help="files or folders of .txt, .jsonl, .jsonl.gz, .parquet")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin and PREFIX.idx")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--tokenizer", help="a Hugging Face tokenizer.json on disk")
    how.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this size on the corpus")
    parser.add_argument("--bpe-sample-mb", type=float, default=100, help="text the BPE learns from (MB)")
    parser.add_argument("--text-field", default="text", help="the JSON / parquet field holding the text")
    parser.add_argument(
        "--on-missing",
        choices=("skip", "fail"),
        default="skip",
        help="a record without the text field: count and skip it, or stop",
    )
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    args = parser.parse_args(argv)
    with one_line_errors():
        if args.output.endswith(("/", "\\")) or Path(args.output).is_dir():
            raise ConfigError(
                f"--output={args.output} is a folder; give a prefix inside it, "
                f"e.g. {Path(args.output) / 'corpus'}"
            )
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers={args.workers} must be >= 1")
        if not args.bpe_sample_mb > 0:
            raise ConfigError(f"--bpe-sample-mb={args.bpe_sample_mb} must be > 0")
        result = prepare(
            find_files(args.inputs),
            args.output,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            text_field=args.text_field,
            on_missing=args.on_missing,
            workers=args.workers,
            bpe_sample_bytes=int(args.bpe_sample_mb * 1e6),
        )
    print(result.summary())


if __name__ == "__main__":
    main(sys.argv[1:])
