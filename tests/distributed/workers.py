"""Functions each test rank runs (importable, so spawned processes can find them)."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moe_train.config import MoEConfig, ParallelConfig
from moe_train.model.moe import MoE
from moe_train.parallel import expert_parallel
from moe_train.parallel.expert_parallel import apply_expert_parallel
from moe_train.parallel.topology import Topology, default_group_timeout


def build_moe(capacity_factor=None, num_experts=8, top_k=2):
    torch.manual_seed(0)
    config = MoEConfig(
        num_experts=num_experts, top_k=top_k, num_shared_experts=1, capacity_factor=capacity_factor
    )
    moe = MoE(config, dim=16, hidden_dim=24)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def moe_layer_matches_single_process(rank, ep, capacity_factor, result_dir):
    """Every rank holds the full layer as a reference; the EP copy must give the same outputs and
    gradients (expert gradients: the reference's summed over all ranks, this rank's slice)."""
    topo = Topology.setup(ParallelConfig(ep=ep), "cpu")
    reference = build_moe(capacity_factor)
    sharded = copy.deepcopy(reference)
    apply_expert_parallel(sharded, topo)
    El = 8 // ep
    assert sharded.experts.w13.shape[0] == sharded.experts.w2.shape[0] == El

    torch.manual_seed(100 + rank)
    num_tokens = [0, 1, 9, 30][rank % 4] if capacity_factor is None else 20 + 3 * rank  # uneven, even empty
    x = torch.randn(num_tokens, 16)
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, stats_ref = reference(x_ref)
    out_ep, stats_ep = sharded(x_ep)
    torch.testing.assert_close(out_ep, out_ref, rtol=1e-5, atol=1e-6)
    assert stats_ep.dropped == stats_ref.dropped
    assert torch.equal(stats_ep.tokens_per_expert, stats_ref.tokens_per_expert)

    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_ep.backward(grad)
    torch.testing.assert_close(x_ep.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for name, p in reference.named_parameters():
        p_ep = dict(sharded.named_parameters())[name]
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if name.startswith("experts."):
            dist.all_reduce(g)  # every rank's tokens reach the experts through the all-to-all
            g = g[topo.ep_rank * El : (topo.ep_rank + 1) * El]
        g_ep = p_ep.grad if p_ep.grad is not None else torch.zeros_like(p_ep)
        # sums over tokens: the grouped products of other row groupings (ranks, chunks) add them in
        # another order, about 1e-6 apart on gradients of about 0.1
        torch.testing.assert_close(g_ep, g, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    Path(result_dir, f"rank{rank}.ok").write_text("ok")


def round_trip(rank, ep, result_dir):
    """Identity experts and router weights that sum to 1: every token comes back to its place. Each
    rank's experts see exactly the assignments routed to them, and a token travels once to each
    rank holding any of its experts, however many of them. Routings: the router's, and adversarial
    ones where every token of every rank goes to the first two experts (both on rank 0, which gets
    all the rows, the others none) or to the last two (the last rank)."""
    topo = Topology.setup(ParallelConfig(ep=ep), "cpu")
    moe = build_moe()
    apply_expert_parallel(moe, topo)
    torch.manual_seed(rank)
    x = torch.randn(17, 16)
    routing = moe.router(x)
    routing.weights = torch.full_like(routing.weights, 1 / moe.router.top_k)
    El = 8 // ep
    received, all_to_all = [], expert_parallel._all_to_all

    def recording(rows, output_splits, input_splits, group, what):
        if what == "tokens":
            received.append(sum(output_splits))
        return all_to_all(rows, output_splits, input_splits, group, what)

    expert_parallel._all_to_all = recording
    seen = []
    for experts in (
        routing.experts,
        torch.tensor([[0, 1]]).expand(17, 2),
        torch.tensor([[7, 6]]).expand(17, 2),
    ):
        routing.experts = experts
        rows, counts, handle = moe.dispatcher.dispatch(x, routing)
        seen.append(counts)
        out = moe.dispatcher.combine(rows, handle)
        torch.testing.assert_close(out, x)
        counts = torch.bincount(experts.flatten(), minlength=8)
        dist.all_reduce(counts)
        assert seen[-1].tolist() == counts[topo.ep_rank * El : (topo.ep_rank + 1) * El].tolist()
        tokens_for = (
            torch.zeros(17, ep).scatter_(1, experts // El, 1.0).sum(0)
        )  # (ep,) tokens sent to each rank
        dist.all_reduce(tokens_for)
        assert received[-1] == tokens_for[topo.ep_rank]
    Path(result_dir, f"rank{rank}.ok").write_text("ok")


def train(rank, overrides, result_dir):
    """Train with the given overrides; save this rank's parameters for comparison."""
    from moe_train.tools.hydra_config import compose_config
    from moe_train.train.engine import tensor_bytes
    from moe_train.train.trainer import Trainer

    config = compose_config(overrides)
    topo = Topology.setup(config.parallel, "cpu")
    trainer = Trainer(config, topo)
    trainer.fit()
    state_bytes = {  # what this rank holds: its shards of the weights and of Adam's moments
        "weights": tensor_bytes(trainer.model.parameters()),
        "optimizer": tensor_bytes(t for s in trainer.engine.optimizer.state.values() for t in s.values()),
    }
    Path(result_dir, f"state_bytes_rank{rank}.json").write_text(json.dumps(state_bytes))
    # each rank's whole dense weights and whole block of experts (gathered from FSDP's shards)
    params = {
        k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in trainer.model.state_dict().items()
    }
    torch.save(params, Path(result_dir, f"params_rank{rank}.pt"))
    return trainer


def train_many(rank, runs, result_dir):
    """Several runs, one after the other, in one group of processes (spawning is the slow part):
    `runs` is a list of (name, overrides); each rank's parameters go to result_dir/name/. Compile
    uses the aot_eager backend, as tests/unit/test_compile.py does (inductor takes minutes here)."""
    import functools

    torch.compile = functools.partial(torch.compile, backend="aot_eager")
    for name, overrides in runs:
        Path(result_dir, name).mkdir(exist_ok=True)
        trainer = train(rank, overrides, Path(result_dir, name))
        if trainer.finished:  # and a sample from a fixed prompt, as the end-of-run samples make them
            from moe_train.model.generate import generate

            pipeline = trainer.pipeline
            model = trainer.model if pipeline is None else pipeline.generation_view()
            prompt = torch.tensor([[100, 101, 102, 103]])
            trainer.model.eval()
            tokens = generate(model, prompt, 6, generator=torch.Generator().manual_seed(0))
            torch.save(tokens, Path(result_dir, name, f"sample_rank{rank}.pt"))


def pipeline_stage_hangs(rank, overrides, result_dir):
    """pp=2: rank 1 hangs before the first step; rank 0 must fail naming the pipeline's send or
    receive within parallel.timeout_minutes."""
    from moe_train.tools.hydra_config import compose_config
    from moe_train.train.trainer import Trainer

    config = compose_config(overrides)
    trainer = Trainer(config, Topology.setup(config.parallel, "cpu"))
    if rank == 1:
        time.sleep(6)  # longer than the test's 3 s timeout; then it exits on its own
        os._exit(0)
    started = time.monotonic()
    try:
        trainer.train_step()
    finally:
        Path(result_dir, "elapsed").write_text(str(time.monotonic() - started))


def peer_fails_during_all_to_all(rank, how, result_dir):
    """Rank 1 dies (or hangs) before the exchange; rank 0 must fail naming the collective."""
    topo = Topology.setup(ParallelConfig(ep=2, timeout_minutes=0.1), "cpu")
    moe = build_moe()
    apply_expert_parallel(moe, topo)
    dist.barrier()
    if rank == 1:
        if how == "dies":
            os._exit(17)
        time.sleep(15)  # longer than the 6 s timeout; then it exits on its own
    started = time.monotonic()
    try:
        moe(torch.randn(8, 16))
    finally:
        Path(result_dir, "elapsed").write_text(str(time.monotonic() - started))


def train_until_signalled(rank, overrides, result_dir):
    """Rank 1 signals itself with SIGUSR1 after its 3rd step; every rank must stop at that step."""
    import signal

    from moe_train.tools.hydra_config import compose_config
    from moe_train.train.callbacks import Callback, default_callbacks
    from moe_train.train.trainer import Trainer

    class SignalAtStep3(Callback):
        def on_step_end(self, trainer, metrics):
            if rank == 1 and metrics["step"] == 3:
                os.kill(os.getpid(), signal.SIGUSR1)

    config = compose_config(overrides)
    trainer = Trainer(config, Topology.setup(config.parallel, "cpu"))
    trainer.fit([SignalAtStep3(), *default_callbacks(trainer)])
    Path(result_dir, f"rank{rank}.step").write_text(str(trainer.progress.step))


def peer_hangs_in_a_subgroup(rank, result_dir):
    """World 4 at ep=2. Rank 3 hangs; rank 2 waits on it in the mesh's ep subgroup {2, 3}, rank 0 in a
    group made later with dist.new_group {0, 3} without a timeout, as DeepSpeed makes its own while
    it is set up: both must time out as the world group does (parallel.timeout_minutes), not after
    torch's 30-minute default."""
    topo = Topology.setup(ParallelConfig(ep=2, timeout_minutes=0.1), "cpu")
    with default_group_timeout(topo.timeout):
        later = dist.new_group([0, 3])
    dist.barrier()
    if rank == 3:
        time.sleep(10)  # longer than the 6 s timeout; then it exits on its own
        return
    if rank == 1:
        return
    group = later if rank == 0 else topo.ep_group
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
    finally:
        Path(result_dir, f"elapsed{rank}").write_text(str(time.monotonic() - started))
