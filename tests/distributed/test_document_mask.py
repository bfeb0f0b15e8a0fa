"""Packed documents kept apart under expert parallelism: the same run as one process."""

from __future__ import annotations

import json

from moe_train.parallel.spawn import run_ranks
from tests.conftest import TINY
from tests.distributed import workers
from tests.distributed.test_expert_parallel import assert_same_run, full_params


def test_documents_apart_at_ep2_match_single_process(tmp_path):
    """A prepared corpus of short documents, several in each 32-token window."""
    from moe_train.data.prepare import prepare

    source = tmp_path / "docs.jsonl"
    source.write_text(
        "".join(json.dumps({"text": f"doc {i}: " + "word " * (i % 9 + 3)}) + "\n" for i in range(200))
    )
    prepare([source], tmp_path / "corpus" / "c", vocab_size=300, workers=1, progress=False)
    overrides = [o for o in TINY if not o.startswith("data=")] + [
        "data=indexed", f"data.prefixes=[{tmp_path / 'corpus' / 'c'}]", f"data.cache_dir={tmp_path / 'cache'}",
        "data.document_mask=true", "data.reset_positions=true", "data.eod_mask_loss=true",
        "trainer.max_steps=4", "trainer.eval_every=2", "trainer.ckpt_every=0", "trainer.num_samples=0",
    ]  # fmt: skip
    runs = []
    for world, ep in ((1, 1), (2, 2)):
        out_dir, result_dir = tmp_path / f"ep{ep}", tmp_path / f"ep{ep}-results"
        result_dir.mkdir()
        run_ranks(
            world, workers.train, [*overrides, f"trainer.out_dir={out_dir}", f"parallel.ep={ep}"], result_dir,
            result_dir=result_dir,
        )  # fmt: skip
        metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        runs.append((metrics, full_params(result_dir, world, ep)))
    assert_same_run(*runs[1], *runs[0])
