"""Prefix-affinity request routing for the engine replicas (a Ray Serve `RequestRouter`).

Requests whose prompts start with the same tokens go to the same replica, the one most likely to hold those
KV blocks hot. The replica is picked by rendezvous hashing of the prompt's first tokens over the live replica
ids, so when replicas come and go only the prefixes of the replicas that changed move. The preferred replica is
ranked first; Serve falls through to the remaining replicas (least queue first) when it is full, and we rank it
last when its queue is already long, so a popular prefix cannot pile up on one replica.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

AFFINITY_TOKENS = 32  # two KV blocks of 16: shared system prompts and few-shot headers
BUSY_QUEUE_LEN = 16  # above this many requests queued on the preferred replica, prefer the others
ROUTER_PATH = "moe_serve.replicas.routing:PrefixAffinityRouter"


def prefix_digest(prompt_ids: Sequence[int]) -> bytes:
    data = ",".join(str(t) for t in prompt_ids[:AFFINITY_TOKENS]).encode()
    return hashlib.blake2b(data, digest_size=16).digest()


def rendezvous_order(digest: bytes, replica_ids: Sequence[str]) -> list[str]:
    """Replica ids from most to least preferred for this prefix (highest random weight hashing)."""
    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(digest + replica_id.encode(), digest_size=16).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        prompt_ids = _prompt_ids(pending_request)
        if prompt_ids is None:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = [by_id[i] for i in rendezvous_order(prefix_digest(prompt_ids), list(by_id))]
        preferred, others = order[0], order[1:]
        queue_len = self._replica_queue_len_cache.get(preferred.replica_id)
        if queue_len is not None and queue_len > BUSY_QUEUE_LEN and others:
            return [others, [preferred]]
        return [[preferred], others] if others else [[preferred]]


def _prompt_ids(request: PendingRequest | None) -> list[int] | None:
    if request is None or not request.args:
        return None
    first = request.args[0]
    return first if isinstance(first, list) and first and isinstance(first[0], int) else None
