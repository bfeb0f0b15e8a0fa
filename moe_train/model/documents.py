"""Packed documents kept apart: which document each token of a packed sequence belongs to, read
from its end-of-document tokens, and the attention masks, positions and loss masks made from that.

Shape legend: B batch, T sequence, n positions a block runs on (T, or T - k at MTP depth k).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from moe_train.config import DataConfig


def default_kernel(device: torch.device) -> str:
    """FlexAttention with a document block mask where it trains (CUDA; torch has no CPU backward
    for it), else SDPA with a boolean mask: on the CPU the exact kernel that measured best and
    compiles (docs/architecture.md, "Packed documents")."""
    return "flex" if device.type == "cuda" else "sdpa"


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process: eager, it materialises every score."""
    return torch.compile(flex_attention)


@dataclass
class Documents:
    """One batch's documents, built once per batch outside the blocks. A token's document is the
    number of end-of-document tokens before it in the sequence: the marker ends its document."""

    ids: torch.Tensor  # (B, T) int32 document of each input token
    target_ids: torch.Tensor | None  # (B, T) document of each target (None without targets)
    positions: torch.Tensor | None  # (B, T) position within its document (data.reset_positions)
    attention: bool  # attention kept inside documents (data.document_mask)
    mask_loss: bool  # predictions across a document end left out of the loss (data.eod_mask_loss)
    kernel: str  # "sdpa" (boolean mask) or "flex" (block mask)

    def attention_mask(self, n: int) -> torch.Tensor | BlockMask | None:
        """The mask for blocks running on the first n positions: None (plain causal attention), a
        boolean (B, 1, n, n) for SDPA (True: attend), or a BlockMask for FlexAttention."""
        if not self.attention:
            return None
        ids = self.ids[:, :n]  # (B, n)
        if self.kernel == "flex":

            def same_document(b, h, q, kv):
                return (q >= kv) & (ids[b, q] == ids[b, kv])

            return create_block_mask(same_document, ids.shape[0], None, n, n, device=ids.device)
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()  # (n, n)
        return ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]  # (B, 1, n, n)

    def loss_mask(self, k: int = 0) -> torch.Tensor | None:
        """(B, T - k) bool, True where the prediction of MTP depth k (0: the model's own) counts:
        position i predicts target i + k, which must lie in i's document. None: all count."""
        if not self.mask_loss or self.target_ids is None:
            return None
        n = self.ids.shape[1] - k
        return self.target_ids[:, k : k + n] == self.ids[:, :n]


@dataclass(frozen=True)
class DocumentPacking:
    """Builds each batch's `Documents` from its tokens. With every option off they change nothing:
    the model runs exactly as without them."""

    eos_id: int
    attention: bool = True
    reset_positions: bool = False
    mask_loss: bool = False
    kernel: str | None = None  # None: default_kernel of the tokens' device

    def __call__(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> Documents:
        """tokens (B, T), targets (B, T) or None -> Documents."""
        ends = tokens == self.eos_id  # (B, T)
        ends_before = ends.cumsum(1, dtype=torch.int32)  # markers up to and including each token
        ids = ends_before - ends.int()
        target_ids = None if targets is None else ends_before  # target i is token i + 1
        positions = None
        if self.reset_positions:
            index = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # (B, T)
            starts = torch.where(ends.roll(1, 1), index, 0)  # a token after a marker starts one
            positions = index - starts.cummax(1).values
        kernel = self.kernel or default_kernel(tokens.device)
        return Documents(ids, target_ids, positions, self.attention, self.mask_loss, kernel)


def document_packing(data: DataConfig, eos_id: int) -> DocumentPacking:
    """The packing the data section asks for, with the tokenizer's end-of-document id."""
    return DocumentPacking(eos_id, data.document_mask, data.reset_positions, data.eod_mask_loss)
