"""Decoder-only transformer of the LLaMA/Mixtral family, dense or MoE per layer; parameter and FLOP counts.

Shape legend: B batch, T sequence, D model dim, V vocabulary, L MoE layers, E experts.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.config import ModelConfig
from moe_train.model.documents import Documents
from moe_train.model.layers import FeedForward, Mask, attention, rotary_tables
from moe_train.model.moe import MoE, MoEStats, is_expert_param


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn: FeedForward | MoE
        if config.is_moe_layer(layer_id):
            self.ffn = MoE(config.moe, config.dim, config.expert_hidden_dim)
        else:
            self.ffn = FeedForward(config.dim, config.ffn_hidden_dim)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Mask = None
    ) -> tuple[torch.Tensor, MoEStats | None]:
        """x (B, T, D); cos, sin (T, Dh) or (B, 1, T, Dh); mask: None (causal) or the documents'."""
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        if self.is_moe:
            out, stats = self.ffn(self.ffn_norm(x))
            return x + out, stats
        return x + self.ffn(self.ffn_norm(x)), None


class MTPDepth(nn.Module):
    """One multi-token prediction depth (DeepSeek-V3, Liu et al. 2024, sec. 2.2): from the previous
    depth's normalised hidden state at position i and the embedding of the token k positions
    ahead, one transformer block predicts the token after that through the shared output head.
    Names and the [embedding; hidden] order are DeepSeek-V3's checkpoint's (and Megatron-Core's)."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.enorm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.hnorm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.eh_proj = nn.Linear(2 * config.dim, config.dim, bias=False)
        self.block = Block(config, layer_id)
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        embedded: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Mask = None,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        """hidden, embedded (B, n, D) -> this depth's normalised hidden state (B, n, D), stats."""
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1))
        x, stats = self.block(x, cos, sin, mask)
        return self.norm(x), stats


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    aux_loss: torch.Tensor  # scalar, mean over MoE layers (0 for a dense model)
    device_aux_loss: torch.Tensor  # scalar, mean over MoE layers: the loss over groups of experts
    z_loss: torch.Tensor  # scalar, mean over MoE layers
    tokens_per_expert: torch.Tensor | None  # (L, E) routed assignments per MoE layer, detached
    dropped: torch.Tensor | None  # (L,) assignments dropped by capacity limits per MoE layer
    mtp_loss: torch.Tensor  # scalar, mean cross-entropy over the MTP depths (0 without targets)


def block_prefixes(config: ModelConfig) -> list[str]:
    """State-dict prefixes of every transformer block: the layers', then each MTP depth's (whose
    layer id continues the layers': depth k's is num_layers + k - 1)."""
    return [f"layers.{i}." for i in range(config.num_layers)] + [
        f"mtp.{k}.block." for k in range(config.mtp.num_layers)
    ]


def moe_block_ids(config: ModelConfig) -> list[int]:
    """Layer ids of every MoE block of the whole model, in the order of the router statistics
    (MTP depth k's block is layer num_layers + k - 1)."""
    return [i for i in range(config.num_layers + config.mtp.num_layers) if config.is_moe_layer(i)]


class Transformer(nn.Module):
    """Built on a real device, it is initialised at once (seed 0, `init_weights`); built on the meta
    device it is not, and whoever materialises it initialises each shard (`initial_values`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("model.vocab_size is unset: it follows the tokenizer once the data is built")
        self.config = config
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(config.vocab_size, config.dim)
        # keyed by layer id, so that a pipeline stage that keeps some of them keeps their names
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(config.num_layers)})
        self.norm: nn.RMSNorm | None = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output: nn.Linear | None = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # after the layers: modules() and the router statistics list MTP's MoE layers last
        self.mtp = nn.ModuleList(
            MTPDepth(config, config.num_layers + k) for k in range(config.mtp.num_layers)
        )
        cos, sin = rotary_tables(config.rope_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not self.output.weight.is_meta:
            self.init_weights()

    @property
    def blocks(self) -> list[Block]:
        """Every transformer block: the layers', then each MTP depth's."""
        return [*self.layers.values(), *(depth.block for depth in self.mtp)]

    @property
    def moe_layer_ids(self) -> list[int]:
        """Layer ids of the MoE blocks this model holds (all but on a pipeline stage), in the
        order of the router statistics (MTP depth k's block is layer num_layers + k - 1)."""
        return [block.layer_id for block in self.blocks if block.is_moe]

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Every parameter whole from `initial_values` (one device, every expert here)."""
        for name, p in self.named_parameters():
            p.copy_(self.initial_values(name, p.shape, range(p.shape[0]), seed))
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The rotary tables, and routing biases at zero (after to_empty(), say)."""
        self.init_rope()
        for layer in self.modules():
            if isinstance(layer, MoE) and layer.router.expert_bias is not None:
                layer.router.expert_bias.zero_()

    def initial_values(self, name: str, shape: torch.Size, rows: range, seed: int) -> torch.Tensor:
        """Rows `rows` of dim 0 of parameter `name` (whole shape `shape`) at initialisation: norm
        weights 1, the rest normal(0, init_std), residual output projections scaled by
        1/sqrt(2 * layers). Drawn on the CPU from generators seeded by (seed, name) and, for a stacked
        expert tensor, by expert, so any cut of the model (expert parallelism, FSDP shards)
        initialises its own rows alike, holding at most one whole tensor (one expert of a stack)."""
        if len(shape) == 1:
            return torch.ones(len(rows))
        std = self.config.init_std
        if name.endswith(("wo.weight", "w2.weight", "experts.w2")):
            std = std / math.sqrt(2 * self.config.num_layers)
        if is_expert_param(name):  # (E, ...): expert by expert
            return torch.stack([_normal(shape[1:], std, seed, f"{name}#{e}") for e in rows])
        return _normal(shape, std, seed, name)[rows.start : rows.stop]

    @torch.no_grad()
    def init_rope(self) -> None:
        """Fill the rotary tables (after to_empty(), say, since they are not in the state dict)."""
        cos, sin = rotary_tables(
            self.config.rope_dim, self.config.max_seq_len, self.config.rope_theta, self.config.rope_scaling
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, documents: Documents | None = None
    ) -> ModelOutput:
        """tokens (B, T) int64 -> ModelOutput. `targets` (B, T), the next tokens, are needed only
        by multi-token prediction: without them (evaluation, generation) it is skipped. With
        `documents` (model/documents.py) the packed documents are kept apart: attention, rotary
        positions and the multi-token prediction loss as it says."""
        context = self.context(tokens.shape[1], documents)
        x, all_stats = self.run_layers(self.tok_embeddings(tokens), self.layers.values(), context)
        logits, mtp_loss, mtp_stats = self.head(x, targets, context)
        return model_output(logits, all_stats + mtp_stats, mtp_loss)

    def context(self, T: int, documents: Documents | None) -> Context:
        """What every block of a batch sees besides x: rotary tables and the attention mask, made
        once per batch."""
        if T > self.config.max_seq_len:  # the rotary tables end there
            raise ValueError(f"{T} tokens are more than model.max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, Dh)
        mask = None
        if documents is not None:
            mask = documents.attention_mask(T)  # once per batch, for every block
            if documents.positions is not None:
                cos = self.rope_cos[documents.positions].unsqueeze(1)  # (B, 1, T, Dh)
                sin = self.rope_sin[documents.positions].unsqueeze(1)
        return Context(cos, sin, mask, documents)

    @staticmethod
    def run_layers(x: torch.Tensor, blocks, context: Context) -> tuple[torch.Tensor, list[MoEStats]]:
        """x (B, T, D) through `blocks` in order; their MoE layers' statistics."""
        all_stats: list[MoEStats] = []
        for block in blocks:
            x, stats = block(x, context.cos, context.sin, context.mask)
            if stats is not None:
                all_stats.append(stats)
        return x, all_stats

    def head(
        self, x: torch.Tensor, targets: torch.Tensor | None, context: Context
    ) -> tuple[torch.Tensor, torch.Tensor, list[MoEStats]]:
        """The last layer's output (B, T, D) -> logits (B, T, V), the multi-token prediction loss
        (0 without targets) and its MoE layers' statistics."""
        hidden = self.norm(x)
        logits = self.output(hidden)  # (B, T, V)
        documents, T = context.documents, x.shape[1]
        mtp_losses, all_stats = [], []
        if targets is not None:
            # depth k at position i sees token i + k (targets[i + k - 1]) and predicts token
            # i + k + 1 (targets[i + k]): the last k positions have nothing to predict
            for k, depth in enumerate(self.mtp, start=1):
                n = T - k
                embedded = self.tok_embeddings(targets[:, k - 1 : k - 1 + n])
                depth_mask = documents.attention_mask(n) if documents is not None else None
                counted = documents.loss_mask(k) if documents is not None else None
                cos, sin = context.cos[..., :n, :], context.sin[..., :n, :]
                hidden, stats = depth(hidden[:, :n], embedded, cos, sin, depth_mask)
                if stats is not None:
                    all_stats.append(stats)
                mtp_losses.append(lm_loss(self.output(hidden), targets[:, k:], counted))
        zero = logits.new_zeros((), dtype=torch.float32)
        return logits, torch.stack(mtp_losses).mean() if mtp_losses else zero, all_stats


@dataclass
class Context:
    cos: torch.Tensor  # (T, Dh) or (B, 1, T, Dh)
    sin: torch.Tensor
    mask: Mask  # None: causal
    documents: Documents | None


def model_output(logits: torch.Tensor, all_stats: list[MoEStats], mtp_loss: torch.Tensor) -> ModelOutput:
    """The router statistics averaged over the MoE layers (zero for a dense model)."""
    zero = logits.new_zeros((), dtype=torch.float32)
    if not all_stats:
        return ModelOutput(logits, zero, zero, zero, None, None, mtp_loss)
    return ModelOutput(
        logits,
        aux_loss=torch.stack([s.aux_loss for s in all_stats]).mean(),
        device_aux_loss=torch.stack([s.device_aux_loss for s in all_stats]).mean(),
        z_loss=torch.stack([s.z_loss for s in all_stats]).mean(),
        tokens_per_expert=torch.stack([s.tokens_per_expert for s in all_stats]),
        dropped=torch.stack([s.dropped for s in all_stats]).float(),
        mtp_loss=mtp_loss,
    )


def _normal(shape, std: float, seed: int, key: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed % 2**31) << 32 | zlib.crc32(key.encode()))
    return torch.empty(shape).normal_(std=std, generator=generator)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy in nats, computed in fp32; over the positions where `counted`
    (B, T) bool is True, if given (Documents.loss_mask)."""
    if counted is not None:
        targets = targets.masked_fill(~counted, -100)  # cross_entropy's ignore_index
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@dataclass
class ModelSize:
    total_params: int  # the MTP modules' included
    active_params: int  # parameters one token passes through (embeddings and MTP included)
    active_matmul_params: int  # active parameters used in matrix products (no embedding lookup, norms)
    flops_per_token: int  # training FLOPs per token: 6 * active_matmul_params + attention
    mtp_params: int  # the multi-token prediction modules' own (the embedding and head are shared)
    mtp_active_params: int  # of those, the ones a token passes through


def model_size(model: Transformer, seq_len: int) -> ModelSize:
    """Counts on any device, the meta device included.

    FLOPs follow the PaLM convention (Chowdhery et al. 2022, app. B): 6 per matmul parameter per
    token for forward and backward, plus 12 * layers * dim_attention * seq_len for attention scores
    and values (no discount for the causal mask); with MLA's unequal head sizes that term is
    6 * layers * heads * (query/key head size + value head size) * seq_len. Multi-token prediction
    counts its modules' parameters, the output head once more per depth, and each depth's block as
    one more layer at the full seq_len (it runs on seq_len - k positions).
    """
    config = model.config
    total = active = mtp = mtp_active = 0
    for name, p in model.named_parameters():  # tied weights are yielded once
        n = p.numel()
        total += n
        mtp += n if name.startswith("mtp.") else 0
        if is_expert_param(name):
            n = n * config.moe.top_k // config.moe.num_experts
        active += n
        mtp_active += n if name.startswith("mtp.") else 0
    matmul = active - sum(
        p.numel() for name, p in model.named_parameters() if p.ndim == 1 or "tok_embeddings" in name
    )
    if config.tie_embeddings:  # the shared matrix is the output projection's matmul
        matmul += model.output.weight.numel()
    depths = config.mtp.num_layers
    matmul += depths * model.output.weight.numel()  # the shared head, once per depth
    qk_dim, v_dim = config.attention_head_dims
    attention = 6 * (config.num_layers + depths) * config.num_heads * (qk_dim + v_dim) * seq_len
    return ModelSize(total, active, matmul, 6 * matmul + attention, mtp, mtp_active)
