"""What every command-line entry point shares: a configuration or input mistake is one line on
stderr and exit code 2, never a traceback; and the process-wide allocator setting of CPU training."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator

from moe_train.config import ConfigError


def tool_parser(module: str, doc: str | None, epilog: str) -> argparse.ArgumentParser:
    """A tool's argument parser: `--help` shows its docstring, then its examples as written."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def exit_on_config_error(error: ConfigError) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    try:
        yield
    except ConfigError as e:
        exit_on_config_error(e)
    except OSError as e:  # a path that does not exist, is not writable, is a file where a folder goes...
        where = f": {e.filename}" if e.filename else ""
        exit_on_config_error(ConfigError(f"{e.strerror or e}{where}"))


def retain_freed_memory() -> None:
    """CPU training: serve every allocation from glibc's heap and keep what is freed there.

    glibc hands each allocation above its mmap threshold (at most 32 MB) to mmap and unmaps it on
    free, so every step page-faults its large activations and gradients in again
    (docs/architecture.md has the cost). With mmap and trimming off, freed blocks are reused and
    resident memory stays at the step's peak. Process-wide, so only entry points call it. A no-op
    where the C library has no mallopt (not glibc)."""
    mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt", None)
    if mallopt is not None:
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
