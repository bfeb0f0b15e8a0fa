"""Pipeline parallelism on torch.distributed.pipelining: each rank keeps the blocks of its stages
(names unchanged, so DCP checkpoints reshard across pp), each stage is a `Stage` module that
torch's `PipelineStage` wraps, and one of torch's schedules runs a step's micro-batches.

The MoE terms cross stages without a second pass: each stage attaches its layers' weighted
load-balancing, device-level and z losses to its output with `_AttachLoss`, an identity whose
backward also starts the attached loss's backward (Megatron-Core's MoEAuxLossAutoScaler); the last
stage returns its own, with the multi-token prediction loss, beside the logits, and the
schedule's loss function adds them to the LM loss. Their values and the expert counts are
recorded per micro-batch for the metrics and the routing-bias update.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from moe_train.config import Config, ConfigError, ParallelConfig
from moe_train.config.training import V_SCHEDULES
from moe_train.model import DocumentPacking, Documents, Transformer, lm_loss, moe_block_ids
from moe_train.parallel.fsdp import local_tensor
from moe_train.parallel.topology import Topology, named_collective, stage_ids


def split_layers(num_layers: int, stages: int, pp_layers: list[int] | None = None) -> list[range]:
    """The consecutive layer ids of each stage: `pp_layers` if given, else as even as possible with
    the remainder going to the middle stages first (the first stage also embeds, the last also
    carries the norm, the head and the multi-token prediction depths), then the first, the last."""
    if pp_layers is None:
        sizes = [num_layers // stages] * stages
        preference = [*range(1, stages - 1), 0, stages - 1][: num_layers % stages]
        for s in preference:
            sizes[s] += 1
    else:
        sizes = list(pp_layers)
    starts = [sum(sizes[:s]) for s in range(stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def check_micro_batches(config: ParallelConfig, micro_batches: int) -> None:
    """What each schedule needs of the number of micro-batches per step and rank (torch's own
    constructors' conditions, checked before any work)."""
    if config.pp == 1:
        return
    name, stages = config.pp_schedule, config.pp * config.pp_stages_per_rank
    at_least = {"GPipe": 1, "DualPipeV": stages}.get(name, config.pp)
    fix = (
        "lower trainer.micro_batch_size (unset, it is each rank's whole share: one micro-batch) or "
        "raise trainer.global_batch_size (micro-batches per step = global_batch_size / "
        "(micro_batch_size x data-parallel ranks))"
    )
    if micro_batches < at_least:
        raise ConfigError(
            f"parallel.pp_schedule={name} at parallel.pp={config.pp} needs at least {at_least} "
            f"micro-batches per step, and this layout gives {micro_batches}: {fix}"
        )
    rounds = max(1, micro_batches // config.pp)
    if name in ("Interleaved1F1B", "InterleavedZeroBubble") and micro_batches % rounds:
        raise ConfigError(
            f"parallel.pp_schedule={name} at parallel.pp={config.pp} needs the micro-batches per step "
            f"({micro_batches}) to be a multiple of {rounds} (micro-batches // pp; any multiple of "
            f"parallel.pp is): {fix}"
        )


def prune_to_stages(model: Transformer, stages: list[int], num_stages: int, layers: list[range]) -> None:
    """Keep only what `stages` need of a model (built on the meta device): their layers, the
    embedding on the first stage, the norm, head and multi-token prediction on the last, which
    also keeps the embedding when its depths embed tokens or its head is tied to it."""
    keep = {i for s in stages for i in layers[s]}
    for key in list(model.layers.keys()):
        if int(key) not in keep:
            del model.layers[key]
    first, last = 0 in stages, num_stages - 1 in stages
    config = model.config
    if not first and not (last and (config.mtp.num_layers or config.tie_embeddings)):
        model.tok_embeddings = None
    if not last:
        model.norm = model.output = None
        model.mtp = nn.ModuleList()


class _AttachLoss(torch.autograd.Function):
    """x's values; backward passes x's gradient through and starts `loss`'s backward as if it had
    been added to what is differentiated (Megatron-Core's MoEAuxLossAutoScaler). A copy, not a
    view: the zero-bubble schedules detach a stage's output in place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss)


class Stage(nn.Module):
    """One pipeline stage of the rank's model: its blocks (registered here too, so FSDP's root and
    the schedule's gradient scaling see them), the embedding on the first stage, the head on the
    last. forward(x, tokens, targets): x is the tokens on the first stage, the previous stage's
    hidden state otherwise; `tokens` and `targets` reach every stage (for the packed documents'
    masks and multi-token prediction). Returns the hidden state (in `hidden_dtype`), or on the
    last stage the logits and its weighted MoE and multi-token prediction losses."""

    def __init__(
        self,
        model: Transformer,
        index: int,
        num_stages: int,
        layer_ids: range,
        config: Config,
        documents: DocumentPacking | None,
        embeds_for_last: bool = False,
    ):
        super().__init__()
        self.index, self.is_first, self.is_last = index, index == 0, index == num_stages - 1
        self.layers = nn.ModuleList(model.layers[str(i)] for i in layer_ids)
        # the last stage's embedding (MTP, a tied head) is its own unless the first stage runs on
        # this rank too: a parameter of two stages would have its gradient scaled twice
        self.tok_embeddings = model.tok_embeddings if self.is_first or embeds_for_last else None
        if self.is_last:
            self.norm, self.output, self.mtp = model.norm, model.output, model.mtp
        self._model = [model]  # for its rotary tables and head (not a submodule: no second name)
        self.hidden_dtype = torch.float32  # what it sends on: the Pipeline sets it
        self.documents = documents
        moe, mtp = config.model.moe, config.model.mtp
        self.num_moe = len(moe_block_ids(config.model))  # the one-process losses are means over these
        self.coefs = (moe.aux_loss_coef, moe.device_aux_loss_coef, moe.z_loss_coef, mtp.loss_coef)
        # per micro-batch: (aux, device aux, z, mtp), the MoE blocks' counts (l, E) and drops (l,)
        self.records: list[tuple] = []

    def forward(self, x, tokens, targets=None, documents: Documents | None = None):
        model = self._model[0]
        if documents is None and self.documents is not None:
            documents = self.documents(tokens, targets)
        context = model.context(tokens.shape[1], documents)
        if self.is_first:
            x = model.tok_embeddings(x)
        x, stats = model.run_layers(x, self.layers, context)
        mtp = x.new_zeros((), dtype=torch.float32)
        if self.is_last:
            x, mtp, mtp_stats = model.head(x, targets, context)
            stats += mtp_stats
        losses = [
            sum((getattr(s, k) for s in stats), mtp.new_zeros(())) / max(self.num_moe, 1)
            for k in ("aux_loss", "device_aux_loss", "z_loss")
        ]
        losses.append(mtp)
        counts = torch.stack([s.tokens_per_expert for s in stats]) if stats else None
        dropped = torch.stack([s.dropped for s in stats]).float() if stats else None
        self.records.append((torch.stack(losses).detach(), counts, dropped))
        weighted = sum(c * loss for c, loss in zip(self.coefs, losses))
        if self.is_last:  # the schedule's loss function adds them to the LM loss
            return x, weighted
        x = x.to(self.hidden_dtype)  # what the next stage expects to receive
        if torch.is_grad_enabled() and stats:
            x = _AttachLoss.apply(x, weighted)
        return x


def build_stages(
    model: Transformer, config: Config, topology: Topology, documents: DocumentPacking | None
) -> list[Stage]:
    """Prune the model to this rank's stages and make their modules (before FSDP: each is a root)."""
    p = config.parallel
    num_stages = p.pp * p.pp_stages_per_rank
    layers = split_layers(config.model.num_layers, num_stages, p.pp_layers)
    prune_to_stages(model, list(topology.stages), num_stages, layers)
    embeds_for_last = model.tok_embeddings is not None and 0 not in topology.stages
    return [
        Stage(model, s, num_stages, layers[s], config, documents, embeds_for_last and s == num_stages - 1)
        for s in sorted(topology.stages)
    ]


class Pipeline:
    """The schedule over this rank's stages: a training step's forward and backward, evaluation's
    forward, and generation's whole-sequence forward."""

    def __init__(
        self,
        stages: list[Stage],
        config: Config,
        topology: Topology,
        micro_batches: int,
        hidden_dtype: torch.dtype = torch.float32,
    ):
        """`hidden_dtype`: the hidden state's between stages: bf16 where FSDP computes in bf16,
        else fp32 (autocast keeps the residual stream in its weights' fp32)."""
        self.stages, self.topology, self.config = stages, topology, config
        self.hidden_dtype = hidden_dtype
        for stage in stages:
            stage.hidden_dtype = hidden_dtype
        self.num_stages = config.parallel.pp * config.parallel.pp_stages_per_rank
        # static shapes: no inference pass, which would run a stage's forward once more
        mbs, seq, model = config.trainer.micro_batch_size, config.data.seq_len, config.model
        tokens = torch.empty(mbs, seq, dtype=torch.long, device="meta")
        hidden = torch.empty(mbs, seq, model.dim, dtype=hidden_dtype, device="meta", requires_grad=True)
        logits = torch.empty(mbs, seq, model.vocab_size, device="meta", requires_grad=True)
        last = (logits, torch.empty((), device="meta", requires_grad=True))  # with its weighted losses
        wrapped = [
            PipelineStage(
                stage,
                stage.index,
                self.num_stages,
                topology.device,
                input_args=tokens if stage.is_first else hidden,
                output_args=last if stage.is_last else hidden,
                group=topology.pp_group,
            )
            for stage in stages
        ]
        schedule = get_schedule_class(config.parallel.pp_schedule)
        stage_arg = wrapped[0] if issubclass(schedule, PipelineScheduleSingle) else wrapped
        self.lm_losses: list[torch.Tensor] = []  # of each micro-batch, on the last stage
        self.schedule = schedule(stage_arg, n_microbatches=micro_batches, loss_fn=self._loss)
        self.holds_last = any(stage.is_last for stage in stages)
        self._stage_of_rank = {
            s: r
            for r in range(config.parallel.pp)
            for s in stage_ids(
                r, config.parallel.pp, config.parallel.pp_stages_per_rank, config.parallel.pp_schedule
            )
        }

    def _run(self, what: str, fn: Callable, *args, **kwargs):
        with named_collective(f"pipeline {what} (send/recv between stages, pp rank {self.topology.pp_rank})"):
            return fn(*args, **kwargs)

    def _records(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's (aux, device aux, z, mtp) summed over its stages and micro-batches, and its
        MoE blocks' expert counts (l, E) and drops (l,) summed over micro-batches (None without)."""
        total = torch.zeros(4, device=self.topology.device)
        counts, dropped = [], []
        for stage in self.stages:
            for record in stage.records:
                total += record[0]
            if stage.records and stage.records[0][1] is not None:
                counts.append(sum(record[1] for record in stage.records))
                dropped.append(sum(record[2] for record in stage.records))
            stage.records.clear()
        if not counts:
            return total, None, None
        return total, torch.cat(counts), torch.cat(dropped)

    def train_step(self, inputs, targets, counted, autocast):
        """One step's micro-batches forward and backward; (lm, aux, device aux, z, mtp) summed over
        them on this rank (lm on the last stage, each other term over this rank's layers), and
        this rank's MoE blocks' expert counts and drops (or None, None)."""
        masked = targets if counted is None else targets.masked_fill(~counted, -100)
        with autocast():
            self._run(
                "step",
                self.schedule.step,
                inputs,
                tokens=inputs,
                targets=targets,
                target=masked,
                return_outputs=False,
            )
        other, counts, dropped = self._records()
        return torch.cat([self._lm_sum().view(1), other]), counts, dropped

    def _lm_sum(self) -> torch.Tensor:
        """The LM losses of the micro-batches since the last call, summed (0 off the last stage)."""
        lm = torch.stack(self.lm_losses).sum().float() if self.lm_losses else torch.zeros(())
        self.lm_losses.clear()
        return lm.to(self.topology.device)

    @torch.no_grad()
    def eval_losses(self, inputs, targets, autocast) -> torch.Tensor:
        """The LM loss summed over the micro-batches (0 off the last stage). torch's V schedules
        cannot run forward only: there the micro-batches go through the stages one at a time."""
        with autocast():
            if self.config.parallel.pp_schedule not in V_SCHEDULES:
                self._run(
                    "evaluation",
                    self.schedule.eval,
                    inputs,
                    tokens=inputs,
                    target=targets,
                    return_outputs=False,
                )
            else:
                for micro, micro_targets in zip(
                    inputs.split(self.config.trainer.micro_batch_size),
                    targets.split(self.config.trainer.micro_batch_size),
                ):
                    logits = self._forward(micro, None)
                    if logits is not None:
                        self.lm_losses.append(lm_loss(logits, micro_targets))
        self._records()
        return self._lm_sum()

    def _forward(self, tokens: torch.Tensor, documents: Documents | None) -> torch.Tensor | None:
        """A whole batch's forward, stage after stage (no micro-batches, any length); the logits
        on the rank of the last stage, None on the others."""
        group, device = self.topology.pp_group, self.topology.device
        mine = {stage.index: stage for stage in self.stages}
        B, T = tokens.shape
        x = tokens
        for s in range(self.num_stages):
            owner = self._stage_of_rank[s]
            if s > 0 and owner != self._stage_of_rank[s - 1] and owner == self.topology.pp_rank:
                x = torch.empty(B, T, self.config.model.dim, dtype=self.hidden_dtype, device=device)
                source = self._stage_of_rank[s - 1]
                self._run(f"receive for stage {s}", dist.recv, x, group=group, group_src=source)
            if s in mine:
                x = mine[s](x, tokens, documents=documents)
                following = self._stage_of_rank.get(s + 1, owner)
                if following != owner:
                    self._run(f"send from stage {s}", dist.send, x, group=group, group_dst=following)
        return x[0] if self.holds_last else None  # the last stage's (logits, weighted losses)

    @torch.no_grad()
    def last_logits(self, tokens: torch.Tensor, documents: Documents | None) -> torch.Tensor:
        """The last position's logits (B, 1, V), on every rank of the pipeline: what generation
        needs."""
        logits = self._forward(tokens, documents)
        last = torch.empty(tokens.shape[0], 1, self.config.model.vocab_size, device=self.topology.device)
        if logits is not None:
            last.copy_(logits[:, -1:].float())
        source = self._stage_of_rank[self.num_stages - 1]
        self._run(
            "broadcast of the logits", dist.broadcast, last, group=self.topology.pp_group, group_src=source
        )
        self._records()
        return last

    def _loss(self, output: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """What the last stage differentiates: the LM loss and its own weighted MoE and multi-token
        prediction losses (the other stages' join through their outputs)."""
        logits, other = output
        lm = lm_loss(logits, targets)
        self.lm_losses.append(lm.detach())
        return lm + other

    def generation_view(self) -> GenerationView:
        return GenerationView(self)


class GenerationView:
    """What `generate` needs of a model: its config, and a forward whose logits end with the last
    position's (`Pipeline.last_logits`, the same on every rank of the pipeline)."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline, self.config = pipeline, pipeline.config.model

    def __call__(self, tokens: torch.Tensor, documents: Documents | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.pipeline.last_logits(tokens, documents))


def embedding_copy(model: Transformer, topology: Topology) -> nn.Parameter | None:
    """The embedding the last stage holds as a copy of the first stage's (for multi-token
    prediction or a tied head) on a rank without the first stage: its gradient is summed with the
    first stage's before the step, and the norm counts it once."""
    if topology.pp == 1 or model.tok_embeddings is None or 0 in topology.stages:
        return None
    return model.tok_embeddings.weight


def sync_embedding_grads(model: Transformer, config: Config, topology: Topology) -> None:
    """Sum the embedding's gradient over the first and last stage where both hold it (multi-token
    prediction or a tied head, stages in a loop: in a V the first and last are on one rank): the
    two copies then take the same step."""
    model_config = model.config
    shared = model_config.mtp.num_layers or model_config.tie_embeddings
    if not shared or topology.embedding_group is None or config.parallel.pp_schedule in V_SCHEDULES:
        return
    weight = model.tok_embeddings.weight
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    topology.all_reduce(local_tensor(weight.grad), group=topology.embedding_group, what="embedding gradient")
