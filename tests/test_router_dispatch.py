"""The router's pure parts, without Ray: the one routing rule (Gate), capacity mode, the split by shard, the expert
placement and the load statistics that drive rebalancing."""

import pytest
import torch

from moe_serve.cluster.placement import ExpertPlacement, PlacementError
from moe_serve.router.stats import LoadStats
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


def test_balanced_placement_and_copies() -> None:
    placement = ExpertPlacement.balanced(10, 4)
    assert placement.shards == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert placement.holder_table(0)[4] == [1]
    placement.add_copy(0, 4, 3)
    assert placement.holders(0, 4) == [1, 3] and placement.holder_table(0)[4] == [1, 3]  # the cached table follows
    assert placement.holders(1, 4) == [1]  # copies are per layer
    assert placement.experts_on(0, 3) == [8, 9, 4]
    assert placement.describe()["copies"] == {"0": {"4": [3]}}  # the extra holders only
    with pytest.raises(PlacementError, match="shard 3 already holds expert 4 of layer 0"):
        placement.add_copy(0, 4, 3)


@pytest.mark.parametrize("experts,shards,message", [(8, 0, "at least one shard"), (2, 3, "cannot place 2 experts")])
def test_impossible_placements_are_refused(experts: int, shards: int, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        ExpertPlacement.balanced(experts, shards)


def test_load_stats_find_the_hot_expert_and_the_coolest_shard() -> None:
    placement = ExpertPlacement.balanced(4, 2)  # shard 0: experts 0, 1; shard 1: experts 2, 3
    stats = LoadStats(num_layers=1, num_experts=4, num_shards=2)
    stats.count_tokens(0, [90, 10, 20, 0])
    assert stats.shard_load(placement, 0).tolist() == [100, 20]
    assert stats.imbalance(placement, 0) == pytest.approx(100 / 60)
    assert stats.hot_expert_moves(0, placement, copies=1) == [(0, 1)]
    placement.add_copy(0, 0, 1)
    assert stats.shard_load(placement, 0).tolist() == [55, 65]  # the copy takes half of expert 0's rows
    stats.reset_window()
    assert stats.imbalance(placement, 0) == 1.0 and stats.hot_expert_moves(0, placement, copies=1) == []
    assert stats.expert_tokens[0].tolist() == [90, 10, 20, 0]  # totals since start stay
    stats.count_shard_rows(1, 7)
    text = stats.prometheus_text().decode()
    assert 'moe_expert_tokens_total{expert="0",layer="0"} 90.0' in text
    assert 'moe_shard_rows_total{shard="1"} 7.0' in text
