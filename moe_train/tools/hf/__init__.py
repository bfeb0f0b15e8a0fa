"""Our models in Hugging Face `transformers` layouts, both ways: one adapter per architecture
family (llama, mixtral, qwen2_moe, deepseek) over the shared core that picks and drives them."""

from moe_train.tools.hf.core import (
    architecture,
    check_expressible,
    from_hf,
    from_hf_config,
    hf_config,
    read_hf_folder,
    to_hf,
)

__all__ = [
    "architecture",
    "check_expressible",
    "from_hf",
    "from_hf_config",
    "hf_config",
    "read_hf_folder",
    "to_hf",
]
