"""The bytes one GPU needs for a layout, counted from the model built on the meta device: model
states from each tensor's shard as FSDP2 (or DeepSpeed's ZeRO) cuts it, activations from the shapes
of one step. What tools.plan prints, searches over and checks with its dry run. With pipeline
stages (layout.pp > 1) each pipeline rank holds its stages' part of the model, and a GPU's bytes
are those of the heaviest pipeline rank.

Shape legend: B micro-batch, T sequence, D model dim, V vocabulary, E experts, k top-k.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from moe_train.config import Config, ConfigError
from moe_train.model import Transformer
from moe_train.model.moe import is_expert_param
from moe_train.parallel.fsdp import expert_shard_dim
from moe_train.parallel.pipeline import split_layers
from moe_train.parallel.topology import stage_ids

GIB = 2**30
# torch's PipelineStage allocates a receive buffer per micro-batch for the hidden state (every
# stage but the first) and for its gradient (every stage but the last), kept across steps
# (pipelining/stage.py, _setup_forward_recv_info, _create_grad_recv_info), in the dtype the
# stages send (Trainer: bf16 where FSDP computes in bf16, else fp32)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True)
class Layout:
    gpus: int
    ep: int
    dp_shard: int  # ranks one copy of a stage's dense weights is sharded over (native engine)
    pp: int = 1  # pipeline ranks: the GPUs are pp stages' ranks of gpus / pp each

    @property
    def stage_gpus(self) -> int:
        """The data-parallel ranks of one pipeline stage (all the GPUs without pp), which ep and
        dp_shard divide."""
        return self.gpus // self.pp

    def check(self, num_experts: int, num_layers: int = 0, stages_per_rank: int = 1) -> None:
        """One line naming the value that cannot be, and what is allowed."""
        if self.gpus % self.pp:
            raise ConfigError(
                f"parallel.pp={self.pp} must divide the {self.gpus} GPUs ({_divisors(self.gpus)})"
            )
        if num_layers and self.pp * stages_per_rank > num_layers:
            raise ConfigError(
                f"parallel.pp={self.pp} x parallel.pp_stages_per_rank={stages_per_rank} stages is more "
                f"than model.num_layers={num_layers}: pp may be at most {num_layers // stages_per_rank}"
            )
        n = self.stage_gpus
        where = f"the {n} GPUs of a pipeline stage" if self.pp > 1 else f"the {n} GPUs"
        if n % self.ep or (num_experts and num_experts % self.ep):
            what = f"model.moe.num_experts={num_experts} and " if num_experts else ""
            raise ConfigError(f"parallel.ep={self.ep} must divide {what}{where} ({_divisors(n)})")
        if not num_experts and self.ep != 1:
            raise ConfigError(f"parallel.ep={self.ep} needs an MoE model (ep=1)")
        if n % self.dp_shard:
            raise ConfigError(f"parallel.dp_shard={self.dp_shard} must divide {where} ({_divisors(n)})")


@dataclass
class Bytes:
    """One GPU's memory at the peak of a step, by kind."""

    weights: int  # the parameters this GPU keeps (FSDP: fp32 shards; ZeRO: the module's whole copy)
    master_weights: int  # ZeRO's fp32 copy of its partition in bf16 runs
    gradients: int
    optimizer: int  # Adam's two moments
    buffers: int  # gathered weights and gradients in flight, communication buckets and buffers
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


@dataclass
class RankShapes:
    """What one pipeline rank holds (the whole model without pipeline stages)."""

    stages: list[tuple[list[int], bool, bool]]  # per stage: its block ids, first?, last?
    shapes: Counter = field(default_factory=Counter)  # (shape, expert) -> parameters of that shape
    units: Counter = field(default_factory=Counter)  # FSDP unit -> elements (experts: all E)
    expert_units: Counter = field(default_factory=Counter)  # FSDP unit -> its routed experts' elements
    cast: int = 0  # elements autocast caches bf16 copies of (without FSDP): dense matmul weights

    @property
    def first(self) -> bool:
        return any(first for _, first, _ in self.stages)

    @property
    def last(self) -> bool:
        return any(last for _, _, last in self.stages)


class ModelShapes:
    """The parameters of a model on the meta device: each one's shape, whether it is a routed
    expert's, the FSDP unit it belongs to (a layer, an MTP depth, the embedding, the head) and
    its layer, from which each pipeline rank's share follows."""

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
        self._pipelines: dict[int, list[RankShapes]] = {}
        self._activations: dict[int, tuple[list[int], list[int], int]] = {}

    def numel(self, expert: bool) -> int:
        return sum(math.prod(shape) for _, shape, e, _ in self.params if e == expert)

    def stage_layers(self, pp: int) -> list[range]:
        """The layer ids of each of the pp x parallel.pp_stages_per_rank stages (pipeline.py's
        split; parallel.pp_layers where it lists that many stages)."""
        p, layers = self.config.parallel, self.config.model.num_layers
        stages = pp * p.pp_stages_per_rank if pp > 1 else 1
        return split_layers(layers, stages, p.pp_layers if len(p.pp_layers or []) == stages else None)

    def pipeline(self, pp: int) -> list[RankShapes]:
        """Each pipeline rank's share (one rank without pp): its stages' layers, the embedding on
        the first stage, the final norm, head and MTP depths on the last, which also keeps a copy
        of the embedding for the MTP depths or a tied head (once on a rank holding both ends)."""
        if pp in self._pipelines:
            return self._pipelines[pp]
        m, p = self.config.model, self.config.parallel
        layers = self.stage_layers(pp)
        n = len(layers)
        mtp_ids = list(range(m.num_layers, m.num_layers + m.mtp.num_layers))
        shared_embedding = bool(m.mtp.num_layers or m.tie_embeddings)
        ranks = []
        for r in range(pp):
            ids = stage_ids(r, pp, p.pp_stages_per_rank, p.pp_schedule) if pp > 1 else [0]
            blocks = [[*layers[s], *(mtp_ids if s == n - 1 else [])] for s in ids]
            rank = RankShapes([(b, s == 0, s == n - 1) for b, s in zip(blocks, ids)])
            held = {i for s in ids for i in layers[s]}
            for name, shape, expert, unit in self.params:
                part = name.split(".")[0]
                if part == "layers":
                    keep = int(name.split(".")[1]) in held
                elif part == "tok_embeddings":
                    keep = rank.first or (rank.last and shared_embedding)
                else:  # norm, output, mtp
                    keep = rank.last
                if keep:
                    rank.shapes[(shape, expert)] += 1
                    (rank.expert_units if expert else rank.units)[unit] += math.prod(shape)
                    if len(shape) > 1 and not expert and (part != "tok_embeddings" or m.tie_embeddings):
                        rank.cast += math.prod(shape)
            ranks.append(rank)
        self._pipelines[pp] = ranks
        return ranks

    def activations(self, itemsize: int) -> tuple[list[int], list[int], int]:
        if itemsize not in self._activations:
            self._activations[itemsize] = block_activations(self.config, itemsize)
        return self._activations[itemsize]


def local_numel(rank: RankShapes, layout: Layout, sharded: bool = True) -> int:
    """Elements of a pipeline rank's shards: dense tensors cut over dp_shard, each expert
    tensor's block of E / ep experts cut over the stage's GPUs / ep as FSDP cuts it (without
    `sharded`: all whole, the experts' block of E / ep)."""
    edp = layout.stage_gpus // layout.ep
    total = 0
    for (shape, expert), count in rank.shapes.items():
        rest = math.prod(shape[1:])
        if expert:
            block = shape[0] // layout.ep
            if not sharded:
                n = block * rest
            elif expert_shard_dim(block, edp) == 0:
                n = _rows(block, edp) * rest
            else:
                n = block * _rows(shape[1], edp) * math.prod(shape[2:])
        else:
            n = (_rows(shape[0], layout.dp_shard) if sharded else shape[0]) * rest
        total += count * n
    return total


def largest_unit(rank: RankShapes, layout: Layout) -> int:
    """Elements of a rank's largest FSDP unit once gathered: its dense tensors whole and its
    experts' block of E / ep."""
    units = set(rank.units) | set(rank.expert_units)
    return max(rank.units[u] + rank.expert_units[u] // layout.ep for u in units)


def micro_batches(config: Config, layout: Layout) -> int:
    """Micro-batches per step on each data-parallel rank (of a stage): a pipeline's micro-batches."""
    t = config.trainer
    return max(1, t.global_batch_size // ((t.micro_batch_size or 1) * layout.stage_gpus))


def block_activations(config: Config, itemsize: int) -> tuple[list[int], list[int], int]:
    """One micro-batch's activations: per block (the layers, then the MTP depths), what backward
    keeps of it (with activation checkpointing its input; without, its working set) and its
    working set; and the logits of the main model and the MTP depths (bf16 or fp32, their fp32
    copy and its gradient). Per block: attention (norm, q, k, v, rotary, SDPA output and its
    log-sum-exp, output projection) and the FFN (dense SwiGLU, or the MoE: router scores, the
    B*T*k permuted rows, w13's and SwiGLU's outputs, the expert outputs, shared experts); with
    expert parallelism the rows a rank receives are counted as balanced (B*T*k on average)."""
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

    working = [attention_bytes + ffn_bytes(m.is_moe_layer(i)) for i in range(m.num_layers + m.mtp.num_layers)]
    saved = [tokens * D * itemsize] * len(working) if t.activation_checkpointing else working
    logits = (1 + m.mtp.num_layers) * tokens * m.vocab_size * (itemsize + 8)
    return saved, working, logits


def rank_activations(shapes: ModelShapes, layout: Layout, r: int, itemsize: int) -> int:
    """Pipeline rank r's activations at the peak: the micro-batches its schedule has in flight
    (forward done, backward not), each with what its blocks keep (and the logits on the last
    stage), plus one block's working set (the block recomputed, with activation checkpointing).
    In flight, after Megatron-LM's get_forward_backward_func and num_warmup_microbatches
    (Narayanan et al. 2021, sec. 2.2), m micro-batches and pp ranks: GPipe all m, 1F1B
    min(m, pp - r); the interleaved schedules (v stages per rank) (v - 1) pp + 2 (pp - r - 1) + 1
    of their m v stage micro-batches, each the mean of the rank's stages; InterleavedZeroBubble,
    ZBVZeroBubble and DualPipeV counted as interleaved 1F1B (their backward split into input and
    weight halves is not modelled); LoopedBFS, breadth-first, all m of every stage. Only the
    last stage's schedule keeps one micro-batch's logits, running its backward right after its
    forward (all m of them under GPipe and LoopedBFS). Without pp: one micro-batch."""
    saved, working, logits = shapes.activations(itemsize)
    rank = shapes.pipeline(layout.pp)[r]
    config = shapes.config
    per = [sum(saved[b] for b in blocks) for blocks, _, _ in rank.stages]
    ends = [logits if last else 0 for _, _, last in rank.stages]
    extra = max(working[b] for blocks, _, _ in rank.stages for b in blocks)
    extra = extra if config.trainer.activation_checkpointing else 0
    m, pp, v = micro_batches(config, layout), layout.pp, len(rank.stages)
    schedule = config.parallel.pp_schedule
    if pp == 1:
        return per[0] + ends[0] + extra
    if schedule in ("GPipe", "LoopedBFS"):
        return m * (sum(per) + sum(ends)) + extra
    if schedule == "1F1B":
        return min(m, pp - r) * (per[0] + ends[0]) + extra
    in_flight = min((v - 1) * pp + 2 * (pp - r - 1) + 1, m * v)
    return in_flight * sum(per) // v + sum(ends) + extra


def native_ranks(shapes: ModelShapes, layout: Layout, bf16: bool) -> list[Bytes]:
    """engine=native (FSDP2), each pipeline rank's bytes: fp32 weights, gradients and moments
    sharded over its stage's GPUs (dense over dp_shard, experts over their edp ranks). Buffers,
    one GPU per stage (no FSDP): in bf16, autocast's cached bf16 copies of the dense matmul
    weights (kept for the autocast region: a forward, or with pp the whole step; the experts cast
    their own, which activation checkpointing does not keep); without pp, two gathered
    units in flight (one prefetched) in the compute dtype and one unit's unsharded gradient in
    fp32 before its reduce-scatter; with pp, torch's PipelineStage runs each backward with
    set_reshard_after_backward(False) and set_requires_gradient_sync(False) and reduce-scatters once
    per step, so the rank's stages are held gathered (compute dtype) with their unsharded fp32
    gradient (plus one unit's compute-dtype gradient before it is accumulated), and the
    receive buffers."""
    config = shapes.config
    itemsize = 2 if bf16 else 4
    sharded = layout.stage_gpus > 1
    hidden = (config.trainer.micro_batch_size or 1) * config.data.seq_len * config.model.dim
    out = []
    for r, rank in enumerate(shapes.pipeline(layout.pp)):
        local = local_numel(rank, layout, sharded)
        if not sharded:
            buffers = 2 * rank.cast if bf16 else 0
        elif layout.pp == 1:
            buffers = largest_unit(rank, layout) * (2 * itemsize + 4)
        else:
            whole = local_numel(rank, layout, sharded=False)
            buffers = whole * (itemsize + 4) + (largest_unit(rank, layout) * itemsize if bf16 else 0)
        if layout.pp > 1:
            receives = sum((not first) + (not last) for _, first, last in rank.stages)
            sent = 2 if bf16 and sharded else 4  # the hidden state's dtype between stages
            buffers += receives * micro_batches(config, layout) * hidden * sent
        out.append(
            Bytes(
                weights=4 * local,
                master_weights=0,
                gradients=4 * local,
                optimizer=8 * local,
                buffers=buffers,
                activations=rank_activations(shapes, layout, r, itemsize),
            )
        )
    return out


def heaviest_rank(shapes: ModelShapes, layout: Layout, bf16: bool) -> int:
    """The pipeline rank with the largest total (0 without pp)."""
    ranks = native_ranks(shapes, layout, bf16)
    return max(range(len(ranks)), key=lambda r: ranks[r].total)


def native_bytes(shapes: ModelShapes, layout: Layout, bf16: bool) -> Bytes:
    """engine=native: the heaviest pipeline rank's bytes (native_ranks)."""
    return max(native_ranks(shapes, layout, bf16), key=lambda b: b.total)


def zero_bytes(shapes: ModelShapes, layout: Layout, bf16: bool) -> Bytes:
    """engine=deepspeed (ZeRO-1/2), as DeepSpeed's own estimator counts model states (the module's
    weights and gradients whole in the compute dtype, an fp32 master copy in bf16 runs, the
    moments and an fp32 gradient partition over the data-parallel ranks), with our expert groups:
    the module holds E / ep experts, and expert states are partitioned over their edp ranks.
    Buffers: its default reduce and all-gather buckets (5e8 elements each). No pipeline stages."""
    if layout.pp != 1:
        raise ConfigError(f"parallel.pp={layout.pp} needs engine=native; engine=deepspeed runs pp=1")
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
        activations=rank_activations(shapes, layout, 0, itemsize),
    )
