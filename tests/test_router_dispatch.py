"""The router's pure parts, without Ray: the one routing rule (Gate), capacity mode, and the split by shard."""

import pytest
import torch

from moe_serve.cluster.placement import ExpertPlacement
from moe_serve.router.gate import Gate, dispatch
from moe_serve.router.dispatch import apply_capacity, split_by_shard

E, D, T, TOP_K = 8, 16, 64, 2


def make_gate(norm_topk_prob: bool) -> tuple[Gate, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    gate = Gate(torch.randn(E, D, generator=g), TOP_K, norm_topk_prob)
    return gate, gate.logits(torch.randn(T, D, generator=g))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_routing_rule_is_transformers_and_dense_weights_scatter_it(norm_topk_prob: bool) -> None:
    gate, logits = make_gate(norm_topk_prob)
    routing = gate.route(logits)
    weights, expert_ids = torch.topk(torch.softmax(logits, dim=-1), TOP_K, dim=-1)  # transformers' Mixtral / Qwen
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    assert torch.equal(routing.expert_ids, expert_ids)
    torch.testing.assert_close(routing.weights, weights)
    dense = gate.dense_weights(logits)
    assert torch.equal(dense.gather(1, expert_ids), routing.weights)
    assert torch.equal((dense > 0).sum(dim=1), torch.full((T,), TOP_K))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_capacity_mode_follows_the_same_rule(norm_topk_prob: bool) -> None:
    gate, logits = make_gate(norm_topk_prob)
    routing = gate.route(logits)
    roomy, moved = apply_capacity(routing, logits, capacity_factor=float(E), gate=gate)
    assert moved == 0 and torch.equal(roomy.expert_ids, routing.expert_ids)
    assert torch.equal(roomy.weights, routing.weights)

    # 20 rows per expert: at most 6 experts fill up (6 x 20 < T x A = 128), so every token finds room for its two
    capped, moved = apply_capacity(routing, logits, capacity_factor=1.25, gate=gate)
    capacity = 20
    assert max(dispatch(routing, E).counts) > capacity  # uncapped, an expert has more rows than that
    assert moved > 0 and max(dispatch(capped, E).counts) <= capacity
    assert all(len(set(ids)) == TOP_K for ids in capped.expert_ids.tolist())  # each token keeps distinct experts
    assert torch.equal(capped.weights, gate.combine_weights(logits, capped.expert_ids))


def test_split_by_shard_sends_each_row_once_to_a_holder() -> None:
    gate, logits = make_gate(True)
    plan = dispatch(gate.route(logits), E)
    busiest = max(range(E), key=lambda e: plan.counts[e])
    placement = ExpertPlacement.balanced(E, 3)
    placement.add_copy(0, busiest, (placement.home_shard(busiest) + 1) % 3)  # its rows split between two shards
    batches = split_by_shard(plan, placement, layer=0)
    rows = sorted(r for b in batches for lo, hi in b.ranges for r in range(lo, hi))
    assert rows == list(range(T * TOP_K))  # every expert-sorted row goes out once
    for batch in batches:
        assert all(batch.shard in placement.holders(0, e) for e in batch.expert_ids)
        assert batch.num_rows == sum(hi - lo for lo, hi in batch.ranges)
    assert sum(busiest in b.expert_ids for b in batches) == 2
