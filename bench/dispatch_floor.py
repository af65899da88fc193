"""The floor under every expert-parallel transport, for bench/dispatch.py: a bare Ray compiled graph through the same
topology as ours (driver -> router -> N shards -> router -> driver) moving the same payload, with no compute.

Per layer call the router receives the hidden states [T, D] float32, sends each shard its share of the T * top_k
expert rows in the message type ours sends (`ShardMessage`), and joins the shards' rows back into [T, D]: the copies
a real layer makes, none of the gating or expert math. What any transport costs above this on the same machine is our
own overhead.
"""

from __future__ import annotations

import time

import numpy as np
import ray

from moe_serve.cluster.shard import ShardMessage


@ray.remote(num_cpus=0)
class FloorRouter:
    def __init__(self, num_shards: int, top_k: int) -> None:
        self.num_shards, self.top_k = num_shards, top_k

    def split(self, x: np.ndarray) -> tuple[ShardMessage, ...] | ShardMessage:
        """[T, D] -> one message per shard: its share of the T * top_k rows, as dispatch sends them."""
        no_ids = np.zeros(0, dtype=np.int64)
        parts = tuple(ShardMessage(0, rows, no_ids, no_ids)
                      for rows in np.array_split(np.repeat(x, self.top_k, axis=0), self.num_shards))
        return parts if self.num_shards > 1 else parts[0]  # one return value is the object itself

    def join(self, *rows: np.ndarray) -> np.ndarray:
        """Every shard's rows -> [T, D], one row per token, as combine returns it."""
        return np.concatenate(rows)[:: self.top_k]


@ray.remote(num_cpus=0)
class FloorShard:
    def echo(self, message: ShardMessage) -> np.ndarray:
        return message.rows


def floor_call_ms(num_shards: int, top_k: int, hidden: int, batches: tuple[int, ...], calls: int,
                  warmup: int = 20) -> dict[int, list[float]]:
    """Wall time of each of `calls` graph executions per batch size (after `warmup` ones), on a running Ray."""
    from ray.dag import InputNode

    router = FloorRouter.remote(num_shards, top_k)
    shards = [FloorShard.remote() for _ in range(num_shards)]
    ray.get([actor.__ray_ready__.remote() for actor in (router, *shards)])  # compiling before they run hangs
    with InputNode() as inp:
        messages = router.split.options(num_returns=num_shards).bind(inp)
        dag = router.join.bind(*(shard.echo.bind(messages[i]) for i, shard in enumerate(shards)))
    graph = dag.experimental_compile(_max_inflight_executions=1)
    try:
        times: dict[int, list[float]] = {}
        for batch in batches:
            x = np.random.default_rng(batch).standard_normal((batch, hidden), dtype=np.float32)
            for _ in range(warmup):
                ray.get(graph.execute(x))
            samples = []
            for _ in range(calls):
                start = time.perf_counter()
                out = np.array(ray.get(graph.execute(x)))  # own the memory, as CompiledTransport does
                samples.append((time.perf_counter() - start) * 1e3)
            if out.shape != x.shape:
                raise RuntimeError(f"floor graph returned {out.shape} for {x.shape}")
            times[batch] = samples
        return times
    finally:
        graph.teardown()
        for actor in (router, *shards):
            ray.kill(actor)
