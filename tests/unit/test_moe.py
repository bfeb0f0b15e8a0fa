"""The MoE layer against a naive reference that loops over tokens; dispatch round trips; losses."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_train.config import MoEConfig
from moe_train.model.moe import GroupedExperts, LocalDispatcher, MoE, Routing, TopKRouter, dropless
from moe_train.model.moe.experts import grouped_mm_dtype, swiglu
from moe_train.model.moe.router import load_balancing_loss, router_z_loss, sequence_balancing_loss


def make_moe(
    num_experts=8,
    top_k=2,
    shared=0,
    renormalize=True,
    capacity_factor=None,
    dim=16,
    hidden=24,
    score="softmax",
    **kwargs,
):
    torch.manual_seed(0)
    config = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        num_shared_experts=shared,
        renormalize=renormalize,
        capacity_factor=capacity_factor,
        score_function=score,
        **kwargs,
    )
    moe = MoE(config, dim, hidden)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def make_router(dim, num_experts, top_k, renormalize=True, expert_bias=False, **kwargs) -> TopKRouter:
    """A router of model.moe's settings (`expert_bias`: any bias_update_rate > 0)."""
    config = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        renormalize=renormalize,
        bias_update_rate=0.001 if expert_bias else 0.0,
        **kwargs,
    )
    return TopKRouter(config, dim)


def route(dispatcher, x, routing, experts):
    """dispatch -> experts -> combine, as the MoE layer does: (output, dropped assignments)."""
    rows, counts, handle = dispatcher.dispatch(x, routing)
    return dispatcher.combine(experts(rows, counts), handle), handle.num_dropped


def naive_moe(moe: MoE, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """One token at a time: softmax (or sigmoid), top-k (from the best topk_groups groups, by the sum
    of their top k / topk_groups scores), (renormalise), scale, weighted sum of the chosen experts."""
    experts, router = moe.experts, moe.router
    out = []
    taken = [0] * moe.num_experts
    for t in range(x.shape[0]):
        xt = x[t]
        logits = moe.router.gate.weight @ xt
        probs = logits.sigmoid() if router.sigmoid else logits.softmax(-1)
        allowed = list(range(moe.num_experts))
        if router.topk_groups:
            size = moe.num_experts // router.num_groups
            groups = [
                sorted(probs[g * size : (g + 1) * size].tolist())[::-1] for g in range(router.num_groups)
            ]
            best = sorted(
                range(router.num_groups), key=lambda g: -sum(groups[g][: router.top_k // router.topk_groups])
            )
            allowed = [e for e in allowed if e // size in best[: router.topk_groups]]
        weights, picked = probs[allowed].topk(router.top_k)
        ids = torch.tensor(allowed)[picked]
        if router.renormalize:
            weights = weights / weights.sum()
        weights = weights * router.scaling_factor
        y = torch.zeros_like(xt)
        for w, e in zip(weights, ids.tolist()):
            taken[e] += 1
            if capacity is not None and taken[e] > capacity:
                continue  # dropped: over this expert's capacity, in token order
            w1, w3 = experts.w13[e].chunk(2, dim=-1)  # gate | up
            h = F.silu(xt @ w1) * (xt @ w3)
            y = y + w * (h @ experts.w2[e])
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(xt)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize(
    "num_experts,top_k,shared,renormalize,score,groups",
    [
        (8, 2, 0, True, "softmax", {}),
        (16, 4, 0, True, "softmax", {}),
        (16, 4, 2, False, "softmax", {}),
        (4, 1, 0, False, "softmax", {}),
        (4, 4, 1, True, "softmax", {}),
        (8, 2, 0, True, "sigmoid", {}),
        (16, 4, 2, False, "sigmoid", {}),
        (16, 4, 0, True, "softmax", dict(num_expert_groups=4, topk_groups=2, routed_scaling_factor=2.5)),
        (16, 6, 1, False, "sigmoid", dict(num_expert_groups=8, topk_groups=3)),
    ],
)
def test_moe_matches_naive_reference_outputs_and_gradients(
    num_experts, top_k, shared, renormalize, score, groups
):
    moe = make_moe(num_experts, top_k, shared, renormalize, score=score, **groups)
    x = torch.randn(2, 13, 16)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()

    out, stats = moe(x)
    ref = naive_moe(moe, x_ref.view(-1, 16)).view(2, 13, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *moe.parameters()], grad_out)
    grads_ref = torch.autograd.grad(ref, [x_ref, *moe.parameters()], grad_out)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    assert stats.tokens_per_expert.sum().item() == 26 * top_k
    assert stats.dropped == 0


@pytest.mark.parametrize(
    "num_experts,top_k,shared,score,groups",
    [
        (8, 2, 0, "softmax", {}),
        (16, 4, 2, "softmax", {}),
        (16, 4, 2, "sigmoid", {}),
        (16, 6, 1, "sigmoid", dict(num_expert_groups=8, topk_groups=3, routed_scaling_factor=2.5)),
    ],
)
def test_moe_matches_megatron_core_layer(num_experts, top_k, shared, score, groups):
    """megatron-core's MoELayer holding our weights (as bench.moe_layer builds it) is an independent
    implementation of the same layer: its output and every gradient agree with ours, the router's
    included, through the load-balancing and z losses at Megatron's normalisation (for sigmoid
    scores: normalised to sum to 1 per token), and with its group-limited routing and scaling
    factor (DeepSeek-V3's router; Megatron ranks the groups of a softmax router on its logits, so
    the comparison takes sigmoid scores, which both rank alike). With groups the aux loss is off:
    Megatron counts its f_e over a top-k without the group limit, ours over the actual choices."""
    from bench.moe_layer import megatron_moe, world_of_one

    # large, so a loss normalised otherwise shows in the router's gradient
    aux_coef, z_coef = (0.0 if groups else 0.5), 0.1
    moe = make_moe(num_experts, top_k, shared, score=score, **groups)
    x = torch.randn(26, 16, requires_grad=True)
    with world_of_one(wanted=("megatron",)):
        block = megatron_moe(
            moe, 16, 24, num_experts, top_k, shared, x.device, aux_coef, z_coef, score, **groups
        )  # fmt: skip
        x_ref = x.detach().clone().requires_grad_()
        ref = block(x_ref.view(26, 1, 16))[0].view(26, 16)  # sequence-first
        grad_out = torch.randn(26, 16)
        ref.backward(grad_out)  # Megatron adds its losses' gradients in its own backward

    out, stats = moe(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    lm_only = torch.autograd.grad(out, moe.router.gate.weight, grad_out, retain_graph=True)[0]
    ((out * grad_out).sum() + aux_coef * stats.aux_loss + z_coef * stats.z_loss).backward()
    mcore = block.block
    w13 = torch.stack([e.linear_fc1.weight.grad.T for e in mcore.experts.local_experts])
    w2 = torch.stack([e.linear_fc2.weight.grad.T for e in mcore.experts.local_experts])
    pairs = [(x.grad, x_ref.grad), (moe.router.gate.weight.grad, mcore.router.weight.grad)]
    pairs += [(moe.experts.w13.grad, w13), (moe.experts.w2.grad, w2)]
    if shared:
        ffn = moe.shared_experts
        fc1 = torch.cat([ffn.w1.weight.grad, ffn.w3.weight.grad])
        pairs += [
            (fc1, mcore.shared_experts.linear_fc1.weight.grad),
            (ffn.w2.weight.grad, mcore.shared_experts.linear_fc2.weight.grad),
        ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert (lm_only - moe.router.gate.weight.grad).abs().max() > 1e-2  # the losses' part is not negligible


def test_dropless_lifts_the_capacity_limit_inside_the_block_only():
    moe = make_moe(8, 2, capacity_factor=0.5)
    x = torch.randn(40, 16)
    with torch.no_grad(), dropless(nn.Sequential(moe)):
        out, stats = moe(x)
    assert stats.dropped == 0
    torch.testing.assert_close(out, naive_moe(moe, x), rtol=1e-5, atol=1e-5)
    assert moe(x)[1].dropped > 0 and moe.dispatcher.capacity_factor == 0.5


def test_expert_bias_picks_the_experts_but_the_weights_stay_the_probabilities():
    router = make_router(16, 8, 2, renormalize=False, expert_bias=True)
    x = torch.randn(50, 16)
    router.expert_bias[5] = 1.0  # larger than any probability gap: expert 5 is in every top-2
    routing = router(x)
    assert (routing.experts == 5).any(dim=-1).all()
    other = torch.where(routing.experts[:, 0] == 5, routing.experts[:, 1], routing.experts[:, 0])
    masked = routing.probs.clone()
    masked[:, 5] = -1
    assert torch.equal(other, masked.argmax(dim=-1))  # the other choice: the likeliest of the rest
    torch.testing.assert_close(routing.weights, routing.probs.gather(-1, routing.experts))


def test_sigmoid_scores_by_hand():
    router = make_router(2, 4, 2, renormalize=False, score_function="sigmoid")
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]]))
    routing = router(torch.tensor([[2.0, 1.0]]))  # logits 2, 1, -2, 0
    s = torch.sigmoid(torch.tensor([2.0, 1.0, -2.0, 0.0]))
    assert routing.experts.tolist() == [[0, 1]]
    torch.testing.assert_close(routing.weights, s[:2].unsqueeze(0))  # each expert's own score
    torch.testing.assert_close(routing.probs, (s / s.sum()).unsqueeze(0))  # what the balance losses see
    router.renormalize = True
    torch.testing.assert_close(router(torch.tensor([[2.0, 1.0]])).weights, (s[:2] / s[:2].sum()).unsqueeze(0))


def test_group_limited_routing_by_hand():
    """Groups {0, 1} and {2, 3}, top-2 from one group: the group whose top-2 scores sum highest
    wins, though expert 0 alone scores highest; then the weights are scaled."""
    router = make_router(
        4,
        4,
        2,
        False,
        score_function="sigmoid",
        num_expert_groups=2,
        topk_groups=1,
        routed_scaling_factor=2.5,
    )
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    routing = router(torch.tensor([[3.0, -3.0, 2.0, 2.0]]))  # group sums 1.0 and 1.76
    s = torch.sigmoid(torch.tensor(2.0))
    assert sorted(routing.experts.tolist()[0]) == [2, 3]
    torch.testing.assert_close(routing.weights, torch.full((1, 2), 2.5 * s.item()))
    router.topk_groups = 0
    assert sorted(router(torch.tensor([[3.0, -3.0, 2.0, 2.0]])).experts.tolist()[0])[0] == 0


def test_group_limited_routing_keeps_every_token_within_its_groups():
    router = make_router(16, 64, 6, True, expert_bias=True, num_expert_groups=8, topk_groups=3)
    router.expert_bias.normal_()  # the bias takes part in choosing the groups too
    x = torch.randn(500, 16)
    groups_of = lambda r: torch.zeros(500, 8).scatter_(1, r.experts // 8, 1.0).sum(1)  # noqa: E731
    assert groups_of(router(x)).max() == 3
    router.topk_groups = 0
    assert groups_of(router(x)).max() > 3  # a limit that binds


def test_expert_bias_update_by_hand():
    router = make_router(4, 4, 1, renormalize=True, expert_bias=True)
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]), rate=0.1)  # mean 5
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_expert_bias_balances_a_skewed_router(score):
    """A router whose first two experts have 8x larger gate weights, so they take most tokens; the
    bias alone, moved from each batch's counts, brings the load near balance (the gate is never
    trained here)."""
    torch.manual_seed(0)
    router = make_router(16, 8, 2, renormalize=True, expert_bias=True, score_function=score)
    with torch.no_grad():
        router.gate.weight[:2] *= 8
    x = torch.randn(1024, 16)

    def imbalance():
        counts = torch.bincount(router(x).experts.flatten(), minlength=8).float()
        return (counts.max() / counts.mean()).item(), counts

    start, _ = imbalance()
    for _ in range(100):
        router.update_bias(imbalance()[1], rate=0.005)
    assert start > 1.8
    assert imbalance()[0] < 1.25


def test_capacity_factor_drops_over_capacity_in_token_order():
    moe = make_moe(8, 2, capacity_factor=0.5)
    x = torch.randn(40, 16)
    capacity = math.ceil(0.5 * 40 * 2 / 8)
    out, stats = moe(x)
    torch.testing.assert_close(out, naive_moe(moe, x, capacity), rtol=1e-5, atol=1e-5)
    expected_drops = (stats.tokens_per_expert - capacity).clamp(min=0).sum().item()
    assert stats.dropped == expected_drops > 0


def test_large_capacity_matches_dropless():
    x = torch.randn(40, 16)
    out_dropless, _ = make_moe(8, 2)(x)
    out_capacity, stats = make_moe(8, 2, capacity_factor=8.0)(x)
    assert stats.dropped == 0
    torch.testing.assert_close(out_capacity, out_dropless)


def routing_of(experts: torch.Tensor, num_experts: int) -> Routing:
    n, k = experts.shape
    weights = torch.full((n, k), 1.0 / k)
    logits = torch.zeros(n, num_experts)
    return Routing(logits, logits.softmax(-1), experts, weights)


class Recorded(nn.Module):
    """Stands in for the experts and keeps what it was given: the identity, or with `distinct` row
    i (grouped by expert) times i + 1, so rows differ as experts' outputs do."""

    def __init__(self, distinct: bool):
        super().__init__()
        self.distinct = distinct

    def forward(self, rows, counts):
        self.rows, self.counts = rows, counts
        return rows * torch.arange(1, rows.shape[0] + 1).unsqueeze(-1) if self.distinct else rows


@pytest.mark.parametrize(
    "name,experts",
    [
        ("random", torch.randint(0, 8, (50, 2))),
        ("all tokens to one expert", torch.full((50, 2), 3)),
        ("most experts empty", torch.tensor([[0, 7]] * 50)),
        ("one token", torch.tensor([[5, 2]])),
    ],
)
def test_experts_see_their_rows_grouped_and_tokens_come_back(name, experts):
    dispatcher = LocalDispatcher(num_experts=8, top_k=2)
    x = torch.randn(experts.shape[0], 4)
    recorded = Recorded(distinct=False)
    out, dropped = route(dispatcher, x, routing_of(experts, 8), recorded)
    assert recorded.counts.tolist() == torch.bincount(experts.flatten(), minlength=8).tolist()
    # the experts get each token's row once per assignment, grouped by expert in expert order,
    # in token order within an expert
    assert torch.equal(recorded.rows, x[experts.flatten().argsort(stable=True) // 2])
    # identity experts + weights 1/k: every token back in its place
    torch.testing.assert_close(out, x)
    assert dropped == 0


@pytest.mark.parametrize(
    "name,experts",
    [
        ("random", torch.randint(0, 8, (50, 2))),
        ("all tokens to one expert", torch.full((50, 2), 3)),
        ("most experts empty", torch.tensor([[0, 7]] * 50)),
    ],
)
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_routing_gradients_match_indexing_reference(name, experts, capacity_factor):
    """The gathers and weighted sums of the dispatch (each other's adjoint, no scatter) against
    plain indexing and index_put: the rows the experts see (every assignment, grouped by expert:
    a static shape), the combined output, and gradients of x and the router weights, with and
    without capacity drops (a dropped assignment weighs 0; a token whose rows all drop: zeros)."""
    dispatcher = LocalDispatcher(num_experts=8, top_k=2, capacity_factor=capacity_factor)
    routing = routing_of(experts, 8)
    routing.weights = torch.rand(experts.shape).requires_grad_()
    x = torch.randn(experts.shape[0], 4, requires_grad=True)
    recorded = Recorded(distinct=True)
    out, dropped = route(dispatcher, x, routing, recorded)

    order = experts.flatten().argsort(stable=True)
    kept = torch.ones(order.numel(), dtype=torch.bool)
    if capacity_factor is not None:
        capacity = dispatcher.capacity(experts.shape[0])
        starts = torch.cumsum(torch.bincount(experts.flatten(), minlength=8), 0)
        starts = starts - torch.bincount(experts.flatten(), minlength=8)
        kept = torch.arange(order.numel()) - starts[experts.flatten()[order]] < capacity
    ref_sorted = x[order // 2]
    ref_y = ref_sorted * torch.arange(1, order.numel() + 1).unsqueeze(-1)
    ref_weights = routing.weights.flatten()[order] * kept
    ref = torch.zeros_like(x).index_put((order // 2,), ref_y * ref_weights[:, None], accumulate=True)
    assert torch.equal(recorded.rows, ref_sorted)
    assert dropped == (~kept).sum() and (capacity_factor is None or dropped > 0)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, routing.weights], grad_out)
    grads_ref = torch.autograd.grad(ref, [x, routing.weights], grad_out)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


ADVERSARIAL_COUNTS = {
    "random": [5, 0, 9, 3, 0, 7, 1, 5],
    "all rows to one expert": [0, 0, 0, 30, 0, 0, 0, 0],
    "most experts empty": [12, 0, 0, 0, 0, 0, 0, 18],
    "one row": [0, 0, 0, 0, 0, 1, 0, 0],
}


@pytest.mark.parametrize("rows", [7, 0])
def test_swiglu_backward_against_numerical_gradients(rows):
    """The hand-written backward of the experts' activation (both halves of the gradient written
    into one buffer) against finite differences, in float64; the output against the formula."""
    torch.manual_seed(0)
    gate_up = torch.randn(rows, 10, dtype=torch.float64, requires_grad=True)
    gate, up = gate_up[:, :5], gate_up[:, 5:]
    torch.testing.assert_close(swiglu(gate_up), gate * torch.sigmoid(gate) * up)
    assert torch.autograd.gradcheck(swiglu, (gate_up,))


@pytest.mark.parametrize("name", list(ADVERSARIAL_COUNTS))
def test_grouped_experts_match_loop_reference(name):
    """The grouped products (torch._grouped_mm, fp32 on the CPU) against the autograd loop: outputs
    and the gradients of x and every expert weight (zero for experts with no rows)."""
    torch.manual_seed(0)
    experts = GroupedExperts(8, 16, 24)
    assert grouped_mm_dtype(torch.zeros(1), 16, 24) == torch.float32  # the grouped path runs
    counts = torch.tensor(ADVERSARIAL_COUNTS[name])
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    inputs = [x, *experts.parameters()]
    out = experts(x, counts)
    ref = experts._forward_loop(x, counts)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    grads_ref = torch.autograd.grad(ref, inputs, grad_out)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    weight_grads = grads[1 : 1 + len(list(experts.parameters()))]
    for e in (counts == 0).nonzero().flatten().tolist():
        assert not any(g[e].any() for g in weight_grads)


def test_load_balancing_loss_hand_computed():
    # 4 tokens, 2 experts, top-1: expert 0 gets 3 tokens, expert 1 gets 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    counts = torch.tensor([3, 1])
    # E * sum_e f_e P_e = 2 * (3/4 * 0.65 + 1/4 * 0.35) = 1.15
    assert load_balancing_loss(probs, counts, top_k=1).item() == pytest.approx(1.15)
    # perfectly balanced routing gives exactly 1
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing_loss(uniform, torch.tensor([4, 4, 4, 4]), top_k=2).item() == pytest.approx(1.0)


def test_device_level_loss_hand_computed():
    # 2 tokens, 4 experts in 2 groups {0, 1} {2, 3}, top-2: token 0 -> experts 0, 1; token 1 -> 0, 2
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]], requires_grad=True)
    counts = torch.tensor([2, 1, 1, 0])
    # f_e = E * count / (N * k) = [2, 1, 1, 0], P = [0.45, 0.2, 0.25, 0.1]
    # groups: f' = [1.5, 0.5] (means), P' = [0.65, 0.35] (sums): 1.5 * 0.65 + 0.5 * 0.35 = 1.15
    loss = load_balancing_loss(probs, counts, top_k=2, num_groups=2)
    assert loss.item() == pytest.approx(1.15)
    # the gradient of each probability is its group's f' / N: the same for all experts of a group
    (grad,) = torch.autograd.grad(loss, probs)
    torch.testing.assert_close(grad, torch.tensor([[0.75, 0.75, 0.25, 0.25]] * 2))
    # one expert per group is the expert-level loss: 2 * 0.45 + 0.2 + 0.25 = 1.35
    assert load_balancing_loss(probs, counts, 2, num_groups=4).item() == pytest.approx(1.35)
    assert load_balancing_loss(probs, counts, 2).item() == pytest.approx(1.35)
    # balanced groups of unbalanced experts: 1.0, where the expert-level loss gives 2.0
    skewed = torch.tensor([[0.5, 0.0, 0.0, 0.5]] * 2)
    assert load_balancing_loss(skewed, torch.tensor([2, 0, 0, 2]), 2, num_groups=2).item() == 1.0
    assert load_balancing_loss(skewed, torch.tensor([2, 0, 0, 2]), 2).item() == 2.0


def test_device_level_loss_balances_the_groups_not_the_experts_inside_them():
    """A router whose first two experts (both in the first of two groups) have 8x larger gate
    weights, trained on one balance loss alone: the device-level loss evens out the two groups'
    loads and leaves the experts inside them uneven; the expert-level loss evens out both."""

    def train(num_groups):
        torch.manual_seed(0)
        router = make_router(16, 8, 2, renormalize=True)
        with torch.no_grad():
            router.gate.weight[:2] *= 8
        x = torch.randn(1024, 16)
        optimizer = torch.optim.Adam(router.parameters(), lr=0.05)
        for _ in range(100):
            routing = router(x)
            counts = torch.bincount(routing.experts.flatten(), minlength=8)
            optimizer.zero_grad()
            load_balancing_loss(routing.probs, counts, 2, num_groups).backward()
            optimizer.step()
        counts = torch.bincount(router(x).experts.flatten(), minlength=8).float()
        groups = counts.view(2, 4).sum(dim=1)
        return (groups.max() / groups.mean()).item(), (counts.max() / counts.mean()).item()

    groups_imbalance, experts_imbalance = train(num_groups=2)  # the groups start at 1.29
    assert groups_imbalance < 1.05 and experts_imbalance > 1.4
    assert max(train(num_groups=None)) < 1.05


def test_sequence_balancing_loss_hand_computed():
    # 2 sequences of 2 tokens, 2 experts, top-1: sequence 0 sends both tokens to expert 0,
    # sequence 1 one to each; the whole batch is balanced (2 and 2), the sequences are not
    probs = torch.tensor([[[0.9, 0.1], [0.7, 0.3]], [[0.6, 0.4], [0.2, 0.8]]])
    experts = torch.tensor([[0, 0], [0, 1]])
    # sequence 0: f = [2, 0], P = [0.8, 0.2] -> 1.6; sequence 1: f = [1, 1], P = [0.4, 0.6] -> 1.0
    assert sequence_balancing_loss(probs, experts, top_k=1).item() == pytest.approx(1.3)
    # the batch as a whole: f = [1.5, 0.5], P = [0.6, 0.4] -> 1.1
    assert load_balancing_loss(probs.view(4, 2), torch.tensor([3, 1]), top_k=1).item() == pytest.approx(1.1)
    # one sequence is the batch loss
    one = sequence_balancing_loss(probs[:1], experts[:1], top_k=1)
    assert one.item() == pytest.approx(load_balancing_loss(probs[0], torch.tensor([2, 0]), 1).item())


def test_sequence_scope_matches_megatron_core_seq_aux_loss():
    """The MoE layer with aux_loss_scope=sequence against megatron-core's seq_aux_loss on 3
    sequences (Megatron's input is sequence-first): outputs, and the router's gradient through the
    loss."""
    from bench.moe_layer import megatron_moe, world_of_one

    moe = make_moe(8, 2, aux_loss_scope="sequence")
    x = torch.randn(3, 9, 16, requires_grad=True)  # (B, T, D)
    with world_of_one(wanted=("megatron",)):
        block = megatron_moe(moe, 16, 24, 8, 2, 0, x.device, 0.5, 0.0, load_balancing="seq_aux_loss")
        x_ref = x.detach().transpose(0, 1).contiguous().requires_grad_()  # (T, B, D)
        ref = block(x_ref)[0]
        grad_out = torch.randn_like(ref)
        ref.backward(grad_out)
    out, stats = moe(x)
    torch.testing.assert_close(out, ref.transpose(0, 1), rtol=1e-5, atol=1e-5)
    ((out * grad_out.transpose(0, 1)).sum() + 0.5 * stats.aux_loss).backward()
    torch.testing.assert_close(
        moe.router.gate.weight.grad, block.block.router.weight.grad, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(x.grad, x_ref.grad.transpose(0, 1), rtol=1e-4, atol=1e-5)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_widths_the_grouped_products_cannot_take_run_the_loop():
    """torch._grouped_mm needs rows of 16-byte multiples: a width of 33 falls back to the loop."""
    assert grouped_mm_dtype(torch.zeros(1), 33, 24) is None
    assert grouped_mm_dtype(torch.zeros(1, dtype=torch.bfloat16), 16, 20) is None  # 40 bytes
    assert grouped_mm_dtype(torch.zeros(1, dtype=torch.float64), 16, 24) is None
    torch.manual_seed(0)
    experts = GroupedExperts(4, 33, 17)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 33)
    torch.testing.assert_close(experts(x, counts), experts._forward_loop(x, counts))
