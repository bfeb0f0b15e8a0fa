"""Where a training step's time goes: torch.profiler's events sorted into matmuls, attention,
dispatch and combine, communication, optimizer, other ops and idle (bench.train_e2e --profile).

Each op's self time (its own kernels' time on a GPU, its own CPU time on a CPU) is counted once,
in the category of the outermost name on its chain of enclosing ops that a rule recognises: the
`aten::mul_` inside `Optimizer.step` is optimizer time, the `aten::index_select` inside
`aten::embedding` is the token embedding's (other), a bare `aten::index_select` is dispatch.
Inductor names its kernels after the ops it fused (`triton_poi_fused_index_select_0`), so compiled
steps sort the same way on a GPU; on a CPU inductor's C++ kernels are not recorded, so their time
is their graph's call (`## Call CompiledFxGraph ... ##`, other). Idle is the step's wall time that
no op's self time covers (on a GPU: the device waiting for the host).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

CATEGORIES = ("matmul", "attention", "dispatch_combine", "communication", "optimizer", "other", "idle")

# (category, name words, name parts), tried in this order on each name. A word list matches a run
# of the name's words ("index_select" matches "aten::index_select" and
# "triton_poi_fused_index_select_0", not "aten::reindex_select"); a part matches anywhere in the
# lowercased name (kernel names glue words together: "ampere_bf16_s16816gemm"). "other" rules stop
# the search: what they enclose is not dispatch.
RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = tuple(
    (category, tuple(words.split()), tuple(parts.split()))
    for category, words, parts in (
        (
            "communication",
            "c10d gloo record_param_comms all_to_all all_to_all_single alltoall all_reduce allreduce"
            " all_gather allgather reduce_scatter",
            "nccl",
        ),
        (
            "optimizer",
            "optimizer_step optimizer_zero_grad foreach adam adamw fused_adam fused_adamw clip_grad_norm",
            "multi_tensor_apply",
        ),
        ("attention", "attention scaled_dot_product sdpa flex_attention", "flash fmha"),
        (
            "matmul",
            "mm bmm addmm baddbmm grouped_mm scaled_mm linear matmul addmv cutlass cublas nvjet xmma",
            "gemm gemv wgmma",
        ),
        (
            "dispatch_combine",
            "index_select embedding_bag argsort sort scatter scatter_add gather bincount repeat_interleave"
            " cumsum histc index index_put index_add permutebackward unpermutebackward",
            "indexselect embeddingbag radixsort",
        ),
        ("other", "embedding embedding_backward embedding_dense_backward cross_entropy nll_loss", ""),
    )
)


@dataclass(frozen=True)
class OpTime:
    """One op's self time and the names of the ops that enclose it, outermost first."""

    name: str
    self_us: float
    enclosing: tuple[str, ...] = ()


def _words(name: str) -> str:
    return "_" + "_".join(re.findall(r"[a-z0-9]+", name.lower())) + "_"


def category_of(name: str) -> str | None:
    """The first rule's category whose word list or part occurs in the name; None if none does."""
    words, lowered = _words(name), name.lower()
    for category, keys, parts in RULES:
        if any(f"_{key}_" in words for key in keys) or any(part in lowered for part in parts):
            return category
    return None


def categorise(op: OpTime) -> str:
    """The category of the outermost name on the op's chain that a rule recognises, else other."""
    for name in (*op.enclosing, op.name):
        category = category_of(name)
        if category is not None:
            return category
    return "other"


def step_shares(ops: Iterable[OpTime], wall_us: float) -> dict[str, float]:
    """Each category's share of the step, idle included; the shares sum to 1. Where the ops' self
    times add up to more than the wall time (kernels on several streams at once), they are the
    whole and idle is 0."""
    times = dict.fromkeys(CATEGORIES, 0.0)
    for op in ops:
        times[categorise(op)] += op.self_us
    busy = sum(times.values())
    times["idle"] = max(0.0, wall_us - busy)
    total = max(wall_us, busy)
    return {c: (t / total if total > 0 else 0.0) for c, t in times.items()}


def op_times(events, on_gpu: bool) -> list[OpTime]:
    """torch.profiler's FunctionEvents -> OpTime: the CPU ops with their self CPU time, or on a GPU
    the device time of the kernels each op launched itself; kernels that no op claims (launched
    outside any recorded op) are added under their own names."""
    ops = []
    claimed: dict[str, float] = {}  # kernel name -> device us claimed by an op
    launched: dict[str, float] = {}  # kernel name -> device us of all its launches
    for event in events:
        if event.is_async or getattr(event, "is_user_annotation", False):
            continue  # a record_function's range on the GPU's timeline is no kernel
        if event.device_type != torch.autograd.DeviceType.CPU:
            launched[event.name] = launched.get(event.name, 0.0) + event.time_range.elapsed_us()
            continue
        enclosing = []
        parent = event.cpu_parent
        while parent is not None:
            enclosing.append(parent.name)
            parent = parent.cpu_parent
        if on_gpu:
            self_us = 0.0
            for kernel in event.kernels:
                self_us += kernel.duration
                claimed[kernel.name] = claimed.get(kernel.name, 0.0) + kernel.duration
        else:
            self_us = event.self_cpu_time_total
        if self_us > 0:
            ops.append(OpTime(event.name, self_us, tuple(reversed(enclosing))))
    for name, us in launched.items():
        if us - claimed.get(name, 0.0) > 1.0:
            ops.append(OpTime(name, us - claimed.get(name, 0.0)))
    return ops


def profile_step(step: Callable[[], object], device: torch.device, steps: int = 3, top: int = 15) -> dict:
    """Runs step() 1 + `steps` times under torch.profiler (the first warms the profiler up) and
    returns, over the last `steps`, the mean step time, each category's share and the `top` ops by
    self time with their category."""
    on_gpu = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1)
    wall_us = 0.0
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        step()
        prof.step()
        for _ in range(steps):
            start = time.perf_counter()
            step()  # train_step ends in a host sync (the losses' .tolist()): the wall time is the step's
            wall_us += (time.perf_counter() - start) * 1e6
            prof.step()  # the last one collects the trace: outside the timed step
    ops = op_times(prof.events(), on_gpu)
    by_name: dict[str, float] = {}
    for op in ops:
        key = f"{op.name} [{categorise(op)}]"
        by_name[key] = by_name.get(key, 0.0) + op.self_us
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {
        "step_ms": wall_us / steps / 1e3,
        "steps": steps,
        "time": "self device time" if on_gpu else "self CPU time",
        "shares": step_shares(ops, wall_us),
        "top_ops": [
            {"op": key, "ms_per_step": us / steps / 1e3, "share": us / wall_us} for key, us in ranked
        ],
    }
