import pytest

# A model small enough that a few steps take a second on 2 CPU cores.
TINY = [
    "model=mixtral_tiny",
    "data=stdlib_bytes",
    "model.dim=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_hidden_dim=96",
    "data.seq_len=32",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.eval_batches=2",
    "trainer.sample_tokens=16",
    "trainer.num_samples=1",
    "logging.wandb.mode=disabled",
    "logging.progress_bar=false",
]


@pytest.fixture
def tiny_overrides(tmp_path):
    return [*TINY, f"trainer.out_dir={tmp_path / 'run'}"]
