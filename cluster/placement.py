"""Expert placement: which experts live on which shard, as plain data that prints as JSON.

Every shard holds the same base expert ids in every MoE layer (contiguous, balanced ranges). Rebalancing adds
copies of hot experts on other shards, per layer; the router then splits those experts' tokens between copies.
This module is pure data: no Ray, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Strategy = Literal["PACK", "SPREAD", "STRICT_SPREAD"]  # Ray placement-group strategies the shards may use
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)


class PlacementError(ValueError):
    """A placement that cannot be built: more shards than experts, resources the cluster lacks, ..."""


@dataclass
class ExpertPlacement:
    num_experts: int
    shards: list[list[int]]  # base experts of each shard, same for every MoE layer
    # layer -> expert -> extra shards holding a copy, added by rebalancing
    copies: dict[int, dict[int, list[int]]] = field(default_factory=dict)
    # layer -> holders of every expert, derived from the two above; dropped whenever a copy is added
    _holder_tables: dict[int, list[list[int]]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def balanced(cls, num_experts: int, num_shards: int) -> ExpertPlacement:
        if num_shards < 1:
            raise PlacementError(f"need at least one shard, got {num_shards}")
        if num_shards > num_experts:
            raise PlacementError(
                f"cannot place {num_experts} experts on {num_shards} shards: every shard needs at least one expert"
            )
        base, extra = divmod(num_experts, num_shards)
        shards, start = [], 0
        for shard in range(num_shards):
            size = base + (shard < extra)
            shards.append(list(range(start, start + size)))
            start += size
        return cls(num_experts, shards)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def home_shard(self, expert: int) -> int:
        for shard, experts in enumerate(self.shards):
            if expert in experts:
                return shard
        raise PlacementError(f"expert {expert} is on no shard")

    def holders(self, layer: int, expert: int) -> list[int]:
        """Every shard holding `expert` in `layer`: its home shard first, then copies."""
        return [self.home_shard(expert), *self.copies.get(layer, {}).get(expert, [])]

    def holder_table(self, layer: int) -> list[list[int]]:
        """`holders(layer, e)` for every expert e, computed once per layer and placement change."""
        table = self._holder_tables.get(layer)
        if table is None:
            table = self._holder_tables[layer] = [self.holders(layer, e) for e in range(self.num_experts)]
        return table

    def experts_on(self, layer: int, shard: int) -> list[int]:
        extra = [e for e, holders in sorted(self.copies.get(layer, {}).items()) if shard in holders]
        return self.shards[shard] + extra

    def add_copy(self, layer: int, expert: int, shard: int) -> None:
        if shard in self.holders(layer, expert):
            raise PlacementError(f"shard {shard} already holds expert {expert} of layer {layer}")
        self.copies.setdefault(layer, {}).setdefault(expert, []).append(shard)
        self._holder_tables.pop(layer, None)

    def describe(self, nodes: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready summary: experts per shard (and its node when known) plus replicated experts."""
        shards = [{"shard": i, "experts": experts} for i, experts in enumerate(self.shards)]
        for entry, node in zip(shards, nodes or []):
            entry["node"] = node
        copies = {
            str(layer): {str(expert): holders for expert, holders in sorted(per_layer.items())}
            for layer, per_layer in sorted(self.copies.items())
        }
        return {"num_experts": self.num_experts, "shards": shards, "copies": copies}
