"""bench.step_profile: hand-made profiler events sorted into the step's categories."""

import pytest

from bench.step_profile import CATEGORIES, OpTime, categorise, category_of, step_shares


@pytest.mark.parametrize(
    "name, category",
    [
        ("aten::mm", "matmul"),
        ("aten::addmm", "matmul"),
        ("aten::_grouped_mm", "matmul"),
        ("moe_train::grouped_mm", "matmul"),
        ("triton_tem_fused_mm_3", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"),
        ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x3_tn", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "attention"),
        ("void cub::DeviceRadixSortOnesweepKernel<int>", "dispatch_combine"),
        ("aten::_scaled_dot_product_flash_attention", "attention"),
        ("aten::_efficient_attention_backward", "attention"),
        ("aten::index_select", "dispatch_combine"),
        ("aten::embedding_bag", "dispatch_combine"),
        ("aten::_embedding_bag_backward", "dispatch_combine"),
        ("aten::argsort", "dispatch_combine"),
        ("aten::sort", "dispatch_combine"),
        ("triton_poi_fused_index_select_mul_0", "dispatch_combine"),
        ("autograd::engine::evaluate_function: _UnpermuteBackward", "dispatch_combine"),
        ("c10d::alltoall_base_", "communication"),
        ("nccl:all_to_all", "communication"),
        ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "communication"),
        ("c10d::allreduce_", "communication"),
        ("Optimizer.step#AdamW.step", "optimizer"),
        ("aten::_foreach_mul_", "optimizer"),
        ("aten::_fused_adamw_", "optimizer"),
        ("aten::embedding", "other"),
    ],
)
def test_category_of_names(name, category):
    assert category_of(name) == category


@pytest.mark.parametrize(
    "name",
    [
        "aten::add",
        "aten::reindex_select",
        "aten::broadcast_tensors",
        "aten::mmx",
        "ProfilerStep#3",
        "CompiledFunction",
        "aten::sum",
    ],
)
def test_names_no_rule_knows(name):
    assert category_of(name) is None
    assert categorise(OpTime(name, 1.0)) == "other"


def test_the_outermost_recognised_name_decides():
    # an elementwise op inside the optimizer's step is optimizer time
    assert (
        categorise(OpTime("aten::mul_", 1.0, ("ProfilerStep#1", "Optimizer.step#AdamW.step"))) == "optimizer"
    )
    # the token embedding's index_select is not the MoE dispatch
    assert categorise(OpTime("aten::index_select", 1.0, ("aten::embedding",))) == "other"
    # a matmul inside our combine's backward is combine time
    backward = "autograd::engine::evaluate_function: _UnpermuteBackward"
    assert categorise(OpTime("aten::mul_", 1.0, (backward,))) == "dispatch_combine"
    # unrecognised enclosing ranges pass the decision down
    assert categorise(OpTime("aten::addmm", 1.0, ("ProfilerStep#1", "aten::linear"))) == "matmul"
    assert (
        categorise(OpTime("aten::addmm", 1.0, ("Torch-Compiled Region: 0/1", "CompiledFunction"))) == "matmul"
    )


def test_step_shares_sum_to_one_with_idle_the_rest():
    ops = [
        OpTime("aten::mm", 40.0),
        OpTime("aten::bmm", 10.0, ("aten::matmul",)),
        OpTime("aten::_scaled_dot_product_flash_attention", 10.0),
        OpTime("aten::index_select", 5.0),
        OpTime("aten::embedding_bag", 5.0),
        OpTime("nccl:all_to_all", 5.0),
        OpTime("aten::_foreach_add_", 5.0, ("Optimizer.step#AdamW.step",)),
        OpTime("aten::add", 10.0),
    ]
    shares = step_shares(ops, wall_us=100.0)
    assert list(shares) == list(CATEGORIES)
    expected = {
        "matmul": 0.5,
        "attention": 0.1,
        "dispatch_combine": 0.1,
        "communication": 0.05,
        "optimizer": 0.05,
        "other": 0.1,
        "idle": 0.1,
    }
    assert shares == pytest.approx(expected)


def test_overlapping_kernels_leave_no_idle():
    """Kernels on two streams at once add up to more than the wall time: they are the whole."""
    shares = step_shares([OpTime("aten::mm", 80.0), OpTime("nccl:all_to_all", 40.0)], wall_us=100.0)
    assert shares["idle"] == 0.0
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["matmul"] == pytest.approx(2 / 3)
    assert step_shares([], wall_us=0.0) == dict.fromkeys(CATEGORIES, 0.0)


def test_profile_step_on_real_profiler_events():
    import torch

    from bench.step_profile import profile_step

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    index = torch.randint(0, 256, (1024,))

    def step():
        rows = a.index_select(0, index)  # (1024, 256)
        return (rows @ b).sum().item()

    result = profile_step(step, torch.device("cpu"), steps=2, top=3)
    assert result["steps"] == 2 and result["step_ms"] > 0
    assert sum(result["shares"].values()) == pytest.approx(1.0)
    assert result["shares"]["matmul"] > 0 and result["shares"]["dispatch_combine"] > 0
    assert len(result["top_ops"]) == 3 and result["top_ops"][0]["ms_per_step"] > 0


def test_op_times_on_gpu_events_count_each_kernel_once():
    """The GPU branch on hand-made FunctionEvent look-alikes: an op's own kernels are its time, a
    range on the GPU's timeline is no kernel, and a kernel no op claims is counted by its name."""
    from types import SimpleNamespace

    import torch

    from bench.step_profile import op_times

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, device_type=cpu, parent=None, kernels=(), us=0.0, annotation=False):
        return SimpleNamespace(
            name=name,
            device_type=device_type,
            cpu_parent=parent,
            kernels=[SimpleNamespace(name=k, duration=d) for k, d in kernels],
            time_range=SimpleNamespace(elapsed_us=lambda: us),
            is_async=False,
            is_user_annotation=annotation,
            self_cpu_time_total=1000.0,  # host time: not what a GPU profile counts
        )

    step = event("Optimizer.step#AdamW.step")
    ops = op_times(
        [
            step,
            event("aten::_foreach_mul_", parent=step, kernels=[("multi_tensor_apply_kernel", 30.0)]),
            event("aten::mm", kernels=[("nvjet_tst_128x256", 50.0)]),
            event("cudaLaunchKernel"),  # the runtime call: no kernels of its own
            event("ProfilerStep#1", cuda, us=500.0, annotation=True),
            event("multi_tensor_apply_kernel", cuda, us=30.0),
            event("nvjet_tst_128x256", cuda, us=50.0),
            event("ncclDevKernel_SendRecv", cuda, us=20.0),  # launched outside any recorded op
        ],
        on_gpu=True,
    )
    assert sorted((op.name, op.self_us, op.enclosing) for op in ops) == [
        ("aten::_foreach_mul_", 30.0, ("Optimizer.step#AdamW.step",)),
        ("aten::mm", 50.0, ()),
        ("ncclDevKernel_SendRecv", 20.0, ()),
    ]
    shares = step_shares(ops, wall_us=200.0)
    assert shares["optimizer"] == pytest.approx(0.15)
    assert shares["matmul"] == pytest.approx(0.25)
    assert shares["communication"] == pytest.approx(0.1)
    assert shares["idle"] == pytest.approx(0.5)
