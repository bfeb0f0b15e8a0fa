"""Sample text from a checkpoint, with the tokenizer of its training data: a quick look at what a run
has learned, from either engine's checkpoints at any layout."""

from __future__ import annotations

import contextlib
import sys

import torch

from moe_train.config import ConfigError
from moe_train.data.loader import load_tokenizer
from moe_train.model.documents import document_packing
from moe_train.model.generate import generate
from moe_train.model.moe import dropless
from moe_train.tools.cli import one_line_errors, tool_parser
from moe_train.train.checkpoint import load_model


def sample(
    checkpoint: str, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int, seed: int
) -> list[str]:
    """One sample per prompt (the prompt included), reproducible for a seed on a device."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    if not 0 <= temperature < float("inf"):  # NaN included
        raise ConfigError(f"--temperature={temperature} must be >= 0 (0: the most likely token)")
    if top_k < 0:
        raise ConfigError(f"--top-k={top_k} must be >= 0 (0: no cut)")
    config, model = load_model(checkpoint)
    tokenizer = load_tokenizer(config.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(seed)
    documents = document_packing(config.data, tokenizer.eos_id)  # as the run's data kept them
    samples = []
    for prompt in prompts:
        # a prompt follows an end-of-document token, as a document does in training
        ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(prompt)]], device=device)
        with autocast, dropless(model):  # every token routed, as in an export to Hugging Face
            tokens = generate(model, ids, max_new_tokens, temperature, top_k or None, generator, documents)
        samples.append(tokenizer.decode(tokens[0, 1:].tolist()))
    return samples


EPILOG = """\
example:
    python -m moe_train.tools.generate CHECKPOINT_OR_RUN_DIR [--prompt TEXT ...] [--max-new-tokens N]
        [--temperature T] [--top-k K] [--seed S]

Loads the model of a checkpoint (either engine's, whatever layout it was trained at) and the
tokenizer of its training data, and prints one sample per prompt; with no prompt, one sample from
the start of a document. Each prompt follows an end-of-document token, as a document does in
training. MoE layers route dropless (a training capacity factor is not applied), as in an export to
Hugging Face. On a GPU the model runs in bf16, else in fp32 on the CPU.
"""


def main(argv: list[str]) -> None:
    parser = tool_parser("moe_train.tools.generate", __doc__, EPILOG)
    parser.add_argument("checkpoint", help="a checkpoint or run directory (its newest checkpoint)")
    parser.add_argument(
        "--prompt", action="append", help="repeat for several samples (default: one, unprompted)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: the most likely token each time")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with one_line_errors():
        samples = sample(
            args.checkpoint, args.prompt or [""], args.max_new_tokens, args.temperature, args.top_k, args.seed
        )
    for i, text in enumerate(samples, 1):
        print(f"----- sample {i} -----\n{text}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
