"""GPU paths: grouped GEMM against the loop, bf16 training, NCCL all-to-all. Skipped without a GPU."""

import os

import pytest
import torch

from moe_train.config import MoEConfig
from moe_train.model.moe import GroupedExperts, MoE
from moe_train.model.moe.experts import grouped_mm_dtype
from moe_train.parallel.spawn import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_grouped_mm_matches_loop_in_bf16():
    if grouped_mm_dtype(torch.zeros(1, device="cuda", dtype=torch.bfloat16)) is None:
        pytest.skip("no grouped GEMM on this GPU")
    torch.manual_seed(0)
    experts = GroupedExperts(8, 256, 512).cuda()
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    counts = torch.tensor([300, 0, 100, 251, 0, 149, 200, 0], device="cuda")  # empty and odd groups
    x = torch.randn(1000, 256, device="cuda")
    x_bf16 = x.bfloat16().requires_grad_()
    x_fp32 = x.clone().requires_grad_()
    out = experts._forward_grouped(x_bf16, counts)
    grads = torch.autograd.grad(out.float().square().sum(), [x_bf16, *experts.parameters()])
    ref = experts._forward_loop(x_fp32, counts)
    grads_ref = torch.autograd.grad(ref.square().sum(), [x_fp32, *experts.parameters()])
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    for g, g_ref in zip(grads, grads_ref):
        assert (g.float() - g_ref).norm() / g_ref.norm() < 2e-2


def test_moe_layer_under_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(num_experts=8, top_k=2, num_shared_experts=1), 256, 512).cuda()
    x = torch.randn(4, 64, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = layer(x)
    ref, _ = layer(x)
    assert (out.float() - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_layer_compiles_whole_on_gpu_with_no_host_sync(capacity_factor):
    """fullgraph=True in bf16 (grouped GEMM), and no device-to-host copy in the compiled pass:
    torch.cuda's sync debug mode raises on any synchronising call."""
    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, top_k=2, num_shared_experts=1, capacity_factor=capacity_factor)
    layer = MoE(config, 256, 512).cuda()
    x = torch.randn(4, 64, 256, device="cuda", requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref, _ = layer(x)
            for sync_mode in ("default", "error"):  # the first pass compiles (and may synchronise)
                torch.cuda.set_sync_debug_mode(sync_mode)
                out, stats = compiled(x)
                (out.float().square().mean() + stats.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 2e-2


@pytest.mark.parametrize("engine", ["native", "deepspeed"])
def test_train_steps_bf16_on_gpu(tmp_path, engine):
    """bf16 on one GPU: autocast (native) or DeepSpeed's bf16 with fp32 master weights (ZeRO-1)."""
    from moe_train.tools.hydra_config import compose_config
    from moe_train.train.metrics import read_metrics
    from moe_train.train.trainer import run
    from tests.conftest import TINY

    config = compose_config(
        [
            *TINY,
            f"trainer.out_dir={tmp_path}",
            "trainer.max_steps=8",
            "trainer.device=cuda",
            "model.dim=128",
            "model.ffn_hidden_dim=256",
            f"engine={engine}",
        ]
    )
    run(config)
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 8
    assert metrics[-1]["lm_loss"] < metrics[0]["lm_loss"]
    assert "mfu" in metrics[-1] or "H100" not in torch.cuda.get_device_name()


def test_nccl_all_to_all_dispatcher_on_one_rank_matches_local():
    import torch.distributed as dist

    from moe_train.parallel.expert_parallel import AllToAllDispatcher

    port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        torch.manual_seed(0)
        layer = MoE(MoEConfig(num_experts=8, top_k=2), 64, 96).cuda()
        x = torch.randn(50, 64, device="cuda", requires_grad=True)
        ref, _ = layer(x)
        (g_ref,) = torch.autograd.grad(ref.sum(), x)
        layer.dispatcher = AllToAllDispatcher(8, 2, None, dist.group.WORLD, ep=1)
        out, _ = layer(x)
        (g,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(g, g_ref)
    finally:
        dist.destroy_process_group()
