"""The bytes one GPU needs for a layout, counted from the model built on the meta device: model
states from each tensor's shard as FSDP2 (or DeepSpeed's ZeRO) cuts it, activations from the shapes
of one step. What tools.plan prints, searches over and checks with its dry run.

Shape legend: B micro-batch, T sequence, D model dim, V vocabulary, E experts, k top-k.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from moe_train.config import Config, ConfigError
from moe_train.model import Transformer
from moe_train.model.moe import is_expert_param
from moe_train.parallel.fsdp import expert_shard_dim

GIB = 2**30


@dataclass(frozen=True)
class Layout:
    gpus: int
    ep: int
    dp_shard: int  # ranks one copy of the dense weights is sharded over (native engine)

    def check(self, num_experts: int) -> None:
        """One line naming the value that cannot be, and what is allowed."""
        divisors = ", ".join(str(d) for d in range(1, self.gpus + 1) if self.gpus % d == 0)
        if self.gpus % self.ep or (num_experts and num_experts % self.ep):
            what = f"model.moe.num_experts={num_experts} and " if num_experts else ""
            raise ConfigError(f"parallel.ep={self.ep} must divide {what}the {self.gpus} GPUs ({divisors})")
        if not num_experts and self.ep != 1:
            raise ConfigError(f"parallel.ep={self.ep} needs an MoE model (ep=1)")
        if self.gpus % self.dp_shard:
            raise ConfigError(
                f"parallel.dp_shard={self.dp_shard} must divide the {self.gpus} GPUs ({divisors})"
            )


@dataclass
class Bytes:
    """One GPU's memory at the peak of a step, by kind."""

    weights: int  # the parameters this GPU keeps (FSDP: fp32 shards; ZeRO: the module's whole copy)
    master_weights: int  # ZeRO's fp32 copy of its partition in bf16 runs
    gradients: int
    optimizer: int  # Adam's two moments
    buffers: int  # gathered weights and gradients of the units in flight, communication buckets
    activations: int

    @property
    def model_states(self) -> int:
        return self.weights + self.master_weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.buffers + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "model_states": self.model_states, "total": self.total}


def _rows(n: int, parts: int) -> int:
    """Rows of dim 0 the first of `parts` ranks holds (FSDP cuts as torch.chunk: ceil-sized)."""
    return min(-(-n // parts), n)


class ModelShapes:
    """The parameters of a model on the meta device: each one's shape, whether it is a routed
    expert's, and the FSDP unit it belongs to (a layer, an MTP depth, the embedding, the head)."""

    def __init__(self, config: Config):
        if config.model.vocab_size is None:
            raise ConfigError("model.vocab_size is unset: set it (the plan builds no tokenizer)")
        with torch.device("meta"):
            self.model = Transformer(config.model)
        self.config = config
        self.params: list[tuple[str, torch.Size, bool, str]] = []  # name, shape, expert, unit
        for name, p in self.model.named_parameters():
            parts = name.split(".")
            unit = ".".join(parts[:2]) if parts[0] in ("layers", "mtp") else parts[0]
            if unit in ("norm", "output") or (config.model.tie_embeddings and unit == "tok_embeddings"):
                unit = "head"
            self.params.append((name, p.shape, is_expert_param(name), unit))

    def numel(self, expert: bool) -> int:
        return sum(math.prod(shape) for _, shape, e, _ in self.params if e == expert)

    def local_numel(self, layout: Layout, sharded: bool = True) -> int:
        """Elements of rank 0's shards: dense tensors cut over dp_shard, each expert tensor's block of
        E / ep experts cut over the world / ep as FSDP cuts it (without `sharded`: all whole)."""
        edp = layout.gpus // layout.ep
        total = 0
        for _, shape, expert, _ in self.params:
            rest = math.prod(shape[1:])
            if expert:
                block = shape[0] // layout.ep
                if not sharded:
                    total += block * rest
                elif expert_shard_dim(block, edp) == 0:
                    total += _rows(block, edp) * rest
                else:
                    total += block * _rows(shape[1], edp) * math.prod(shape[2:])
            else:
                total += (_rows(shape[0], layout.dp_shard) if sharded else shape[0]) * rest
        return total

    def largest_unit(self, layout: Layout) -> int:
        """Elements of the largest FSDP unit once gathered: a unit's dense tensors whole and its
        experts' block of E / ep."""
        units: dict[str, int] = {}
        for _, shape, expert, unit in self.params:
            n = math.prod(shape) // (layout.ep if expert else 1)
            units[unit] = units.get(unit, 0) + n
        return max(units.values())


def activation_bytes(config: Config, layout: Layout, itemsize: int) -> int:
    """The activations of one micro-batch at the peak of backward: with activation checkpointing,
    every block's input plus one block's working set; without, every block's working set; and the
    logits of the main model and each MTP depth (bf16 or fp32, their fp32 copy and its gradient).
    Per block: attention (norm, q, k, v, rotary, SDPA output and its log-sum-exp, output
    projection) and the FFN (dense SwiGLU, or the MoE: router scores, the B*T*k permuted rows, w13's
    and SwiGLU's outputs, the expert outputs, shared experts); with expert parallelism the rows a
    rank receives are counted as balanced (B*T*k on average)."""
    m, t = config.model, config.trainer
    tokens = (t.micro_batch_size or 1) * config.data.seq_len
    D, H = m.dim, m.num_heads
    qk_dim, v_dim = m.attention_head_dims
    kv_heads = H if m.mla.enabled else m.num_kv_heads
    attention = 3 * D + 2 * H * qk_dim + 2 * kv_heads * (qk_dim + v_dim) + H * v_dim
    if m.mla.enabled:
        attention += m.mla.kv_lora_rank + m.mla.qk_rope_head_dim + m.mla.q_lora_rank
    attention_bytes = tokens * attention * itemsize + tokens * H * 4  # + SDPA's fp32 log-sum-exp

    def ffn_bytes(moe_layer: bool) -> int:
        if not moe_layer:
            return tokens * (2 * D + 4 * m.ffn_hidden_dim) * itemsize
        moe, F = m.moe, m.expert_hidden_dim
        rows = tokens * moe.top_k
        routed = rows * (2 * D + 5 * F) * itemsize + tokens * moe.num_experts * 4 * 3  # router fp32
        shared = tokens * (2 * D + 4 * F * moe.num_shared_experts) * itemsize if moe.num_shared_experts else 0
        return routed + shared + tokens * D * itemsize

    blocks = [m.is_moe_layer(i) for i in range(m.num_layers + m.mtp.num_layers)]
    working = [attention_bytes + ffn_bytes(moe_layer) for moe_layer in blocks]
    if t.activation_checkpointing:
        saved = len(blocks) * tokens * D * itemsize + max(working)
    else:
        saved = sum(working)
    logits = (1 + m.mtp.num_layers) * tokens * m.vocab_size * (itemsize + 8)
    return saved + logits


def native_bytes(shapes: ModelShapes, layout: Layout, bf16: bool) -> Bytes:
    """engine=native (FSDP2): fp32 weights, gradients and moments sharded (dense over dp_shard,
    experts over their edp ranks); two gathered units in flight (one prefetched) in the compute
    dtype and one unit's unsharded gradient in fp32 before its reduce-scatter."""
    local = shapes.local_numel(layout) if layout.gpus > 1 else shapes.local_numel(layout, sharded=False)
    itemsize = 2 if bf16 else 4
    unit = shapes.largest_unit(layout) if layout.gpus > 1 else 0
    return Bytes(
        weights=4 * local,
        master_weights=0,
        gradients=4 * local,
        optimizer=8 * local,
        buffers=unit * (2 * itemsize + 4),
        activations=activation_bytes(shapes.config, layout, itemsize),
    )


def zero_bytes(shapes: ModelShapes, layout: Layout, bf16: bool) -> Bytes:
    """engine=deepspeed (ZeRO-1/2), as DeepSpeed's own estimator counts model states (the module's
    weights and gradients whole in the compute dtype, an fp32 master copy in bf16 runs, the
    moments and an fp32 gradient partition over the data-parallel ranks), with our expert groups:
    the module holds E / ep experts, and expert states are partitioned over their edp ranks.
    Buffers: its default reduce and all-gather buckets (5e8 elements each)."""
    itemsize = 2 if bf16 else 4
    held = shapes.numel(False) + shapes.numel(True) // layout.ep
    dense_partition = -(-shapes.numel(False) // layout.gpus)
    expert_partition = -(-shapes.numel(True) // layout.gpus)
    partition = dense_partition + expert_partition if layout.gpus > 1 else held
    bucket = 2 * 500_000_000 * itemsize if layout.gpus > 1 else 0
    return Bytes(
        weights=itemsize * held,
        master_weights=4 * partition if bf16 else 0,
        gradients=itemsize * held + 4 * partition,
        optimizer=8 * partition,
        buffers=bucket,
        activations=activation_bytes(shapes.config, layout, itemsize),
    )
