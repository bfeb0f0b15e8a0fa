"""The routed experts: E SwiGLU FFNs with stacked weights, run on rows already grouped by expert as
one grouped product per weight where torch has it, else a loop over experts (the reference).

Shape legend: S rows, D model dim, F expert hidden dim, E experts (El on this rank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grouped_mm_dtype(x: torch.Tensor, *dims: int) -> torch.dtype | None:
    """The dtype torch._grouped_mm runs the experts in for input x, or None where it cannot (the
    loop over experts runs instead): on a CPU, x's own dtype or the CPU autocast dtype (fp32 or
    bf16); on a Hopper-class GPU, bf16 (bf16 inputs or bf16 autocast). Rows of its operands must
    be multiples of 16 bytes, so every one of `dims` (model and expert widths) is checked."""
    if not hasattr(torch, "_grouped_mm"):
        return None
    if x.device.type == "cpu":
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        dtype = dtype if dtype in (torch.float32, torch.bfloat16) else None
    elif x.is_cuda and _is_hopper_or_newer(x.device):
        autocast_bf16 = (
            torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
        )
        dtype = torch.bfloat16 if x.dtype == torch.bfloat16 or autocast_bf16 else None
    else:
        dtype = None
    if dtype is None or any(d * dtype.itemsize % 16 for d in dims):
        return None
    return dtype


@torch.compiler.assume_constant_result  # read once while tracing, not a graph break
def _is_hopper_or_newer(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


class _SwiGLU(torch.autograd.Function):
    """(S, 2F) gate | up -> (S, F) silu(gate) * up. Its backward writes both gradients straight
    into the halves of one (S, 2F) tensor, where autograd would make them apart and copy them
    together (chunk's backward); bench/moe_layer.py measures the difference."""

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        s = F.silu(gate)  # (S, F)
        ctx.save_for_backward(gate_up, s)
        return s * up

    @staticmethod
    def backward(ctx, grad_out):
        gate_up, s = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        if torch.compiler.is_compiling():  # the compiler fuses the two halves itself (no out=)
            grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
            return torch.cat([grad_gate, grad_out * s], dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad_out, s, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_out * up, gate, grad_input=grad_gate)
        return grad_gate_up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """(n, 2F) gate | up -> (n, F) silu(gate) * up."""
    return _SwiGLU.apply(gate_up)


class GroupedExperts(nn.Module):
    """E SwiGLU experts with weights stacked on dim 0, so that expert parallelism shards them by
    rows. Gate and up are one weight, w13 = [w1 | w3] on its last dim (Megatron-Core's linear_fc1,
    transformers' gate_up_proj): one product per expert instead of two. The router weights are
    applied by the combine, not here."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.num_experts = num_experts
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))  # gate | up
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # down
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default per expert: uniform in +-1/sqrt(fan_in). (Transformer re-inits.)"""
        for w in (self.w13, self.w2):
            bound = w.shape[1] ** -0.5
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x (S, D) grouped by expert, tokens_per_expert (El,) -> (S, D)."""
        dtype = grouped_mm_dtype(x, *self.w2.shape[1:])
        if dtype is None:
            return self._forward_loop(x, tokens_per_expert)
        return self._forward_grouped(x.to(dtype), tokens_per_expert)

    def _forward_loop(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        # unbind, not w[e]: the backward of one unbind stacks all expert gradients at once, while
        # E separate w[e] selects would each materialise and add a full (E, ...) gradient.
        chunks = torch.split(x, tokens_per_expert.tolist())
        weights = zip(self.w13.unbind(0), self.w2.unbind(0))
        return torch.cat([swiglu(x_e @ w13) @ w2 for x_e, (w13, w2) in zip(chunks, weights)])

    def _forward_grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)  # (El,) end row of each expert
        w13, w2 = (w.to(x.dtype) for w in (self.w13, self.w2))
        grouped_mm = cpu_grouped_mm if x.device.type == "cpu" else torch._grouped_mm
        h = swiglu(grouped_mm(x, w13, offs=offsets))  # (S, F)
        return grouped_mm(h, w2, offs=offsets)


# torch's shape function for _grouped_mm (what torch.compile traces with) accepts only bf16, while
# the CPU kernel also runs fp32: on the CPU the product is an operator of our own around the same
# kernel, with its shape function and its backward (aten's formulas), opaque to the compiler.
@torch.library.custom_op("moe_train::grouped_mm", mutates_args=())
def cpu_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(a, b, offs=offs) on the CPU, compilable in fp32: (S, K) x (G, K, M) ->
    (S, M), rows grouped by `offs`; or (K, S) x (S, M) -> (G, K, M) (the weights' gradient)."""
    return torch._grouped_mm(a, b, offs=offs).contiguous()


@cpu_grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.ndim == 3:
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])


def _grouped_mm_backward(ctx, grad: torch.Tensor):
    a, b, offs = ctx.saved_tensors
    grad_a = cpu_grouped_mm(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_b = cpu_grouped_mm(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


def _grouped_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


cpu_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)
