"""Documents from the files corpora come in: .txt (a file is a document), .jsonl / .jsonl.gz (one JSON
object per line, text in a configurable field) and .parquet (one row per document)."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moe_train.config import ConfigError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
# JSON may escape half of a surrogate pair ("\ud800"): such text has no UTF-8 form, and no tokenizer
# takes it. Each lone half becomes U+FFFD, as undecodable bytes do in .txt files.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _supported(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def find_files(inputs: list[str | Path]) -> list[Path]:
    """Files given directly, or found (sorted) under folders; each must exist and be supported."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ConfigError(f"input {path} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _supported(p))
            if not found:
                raise ConfigError(f"input folder {path} has no {', '.join(SUFFIXES)} files")
            files += found
        elif _supported(path):
            files.append(path)
        else:
            raise ConfigError(f"input {path} is not one of {', '.join(SUFFIXES)}")
    return files


@dataclass
class ReadStats:
    documents: int = 0
    skipped: int = 0  # records without a usable text field (or not JSON), when skipping is allowed
    bytes: int = 0  # UTF-8 bytes of text read


class DocumentReader:
    """Iterates over the documents of `files`. A record without the text field is counted and
    skipped (on_missing="skip") or stops everything with a line naming file and line ("fail")."""

    def __init__(self, files: list[Path], text_field: str = "text", on_missing: str = "skip"):
        if on_missing not in ("skip", "fail"):
            raise ConfigError(f"on_missing={on_missing!r} is not allowed; choose skip or fail")
        self.files = files
        self.text_field = text_field
        self.on_missing = on_missing
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            try:
                for text in self._read(path):
                    self.stats.documents += 1
                    self.stats.bytes += len(text.encode("utf-8"))
                    yield text
            except ConfigError:
                raise
            except (OSError, EOFError, ValueError) as e:  # not gzip, cut short, not parquet...
                raise ConfigError(f"{path} cannot be read: {type(e).__name__}: {e}") from e

    def _missing(self, where: str, what: str) -> None:
        if self.on_missing == "fail":
            raise ConfigError(f"{where}: {what} (use --on-missing skip to count and skip such records)")
        self.stats.skipped += 1

    def _read(self, path: Path) -> Iterator[str]:
        name = path.name
        if name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        self._missing(f"{path}:{number}", "not a JSON object")
                        continue
                    text = record.get(self.text_field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        self._missing(f"{path}:{number}", f"no text field {self.text_field!r}")
                        continue
                    yield _LONE_SURROGATE.sub("\ufffd", text)
        elif name.endswith(".parquet"):
            yield from self._read_parquet(path)
        else:  # plain text: the whole file is one document
            yield path.read_text(encoding="utf-8", errors="replace")

    def _read_parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if self.text_field not in parquet.schema_arrow.names:
            raise ConfigError(
                f"{path} has no column {self.text_field!r} (columns: {', '.join(parquet.schema_arrow.names)})"
            )
        for batch in parquet.iter_batches(columns=[self.text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str):
                    yield text
                else:
                    self._missing(str(path), f"a row with no text in {self.text_field!r}")
