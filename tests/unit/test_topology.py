"""Process setup on one CPU process: the allocator setting CPU training runs with."""

import subprocess
import sys
from pathlib import Path

import pytest

RSS_AFTER_FREE = """
import sys, torch
from moe_train.tools.cli import retain_freed_memory

if sys.argv[1] == "setup":
    retain_freed_memory()

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

x = torch.ones(64 * 2**20 // 4)  # 64 MB: above every glibc mmap threshold
before = rss()
del x
print((before - rss()) / 2**20)
"""


def released_mb(mode: str) -> float:
    """MB of resident memory a fresh process gives back when it frees a 64 MB tensor."""
    out = subprocess.run(
        [sys.executable, "-c", RSS_AFTER_FREE, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_cpu_setup_keeps_freed_blocks_for_reuse():
    """glibc unmaps a freed 64 MB block (and page-faults the next one in again); after
    retain_freed_memory (what train.py does on a CPU) the block stays in the heap for reuse."""
    assert released_mb("plain") > 60
    assert released_mb("setup") < 4
