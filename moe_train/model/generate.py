"""Autoregressive sampling (no KV cache: the models sampled here are small)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moe_train.model.documents import DocumentPacking


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    generator: torch.Generator | None = None,
    documents: DocumentPacking | None = None,
) -> torch.Tensor:
    """prompt (B, T0) int64 -> (B, T0 + max_new_tokens). Sampling runs on the CPU generator.
    `documents`: the run's packing (data.document_mask, data.reset_positions), so that a token
    sees what it saw in training: its own document only."""
    tokens = prompt
    max_len = model.config.max_seq_len
    if documents is not None:  # SDPA's boolean mask: FlexAttention would compile for every length
        documents = dataclasses.replace(documents, kernel="sdpa")
    for _ in range(max_new_tokens):
        window = tokens[:, -max_len:]
        out = model(window, documents=documents(window) if documents is not None else None)
        logits = out.logits[:, -1, :].float().cpu()  # (B, V)
        logits = logits / max(temperature, 1e-5)
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        next_token = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)  # (B, 1)
        tokens = torch.cat([tokens, next_token.to(tokens.device)], dim=1)
    return tokens
