"""Bringing the cluster up: connect to Ray, reserve one bundle per expert shard, start the shard actors.

Each shard gets a placement-group bundle with one GPU when the cluster has GPUs (PACK, SPREAD or STRICT_SPREAD
across nodes), so shards land on separate GPUs and, when asked, separate nodes. Plans the cluster cannot hold
fail at once with `PlacementError` instead of waiting forever for resources.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moe_serve.cluster.placement import STRATEGIES, ExpertPlacement, PlacementError
from moe_serve.cluster.shard import ExpertShard, ShardInfo
from moe_serve.model.quant import QuantMode

LOCAL_RAY_CPUS = 8  # logical CPUs of a local Ray: actors are mostly idle between layer calls
SHARD_CPUS = 0.5


def connect_ray(address: str | None = None, num_cpus: int | None = None, timeout_s: float = 30.0) -> None:
    """Join `address` (an existing cluster) or start a local Ray whose GCS never takes Redis's port 6379."""
    if ray.is_initialized():
        return
    if address is None:
        # "local" always starts a new instance; a bare ray.init() would join any cluster already on this machine
        ray.init(address="local", num_cpus=num_cpus or LOCAL_RAY_CPUS, include_dashboard=False, log_to_driver=False)
        return
    # A dead GCS address makes ray.init retry for minutes: bound it.
    os.environ.setdefault("RAY_gcs_rpc_server_connect_timeout_s", str(int(timeout_s)))
    ray.init(address=address, log_to_driver=False)


@dataclass
class ShardGroup:
    placement: ExpertPlacement
    actors: list[Any]
    placement_group: PlacementGroup
    infos: list[ShardInfo]
    uses_gpus: bool

    def refresh_infos(self, timeout_s: float = 30.0) -> list[ShardInfo]:
        """Ask every shard again: a restarted shard may be on another node now (its bundle was placed again)."""
        self.infos = ray.get([actor.info.remote() for actor in self.actors], timeout=timeout_s)
        return self.infos

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement_group)


def start_shards(
    model_dir: str,
    placement: ExpertPlacement,
    strategy: str = "PACK",
    use_gpus: bool | None = None,
    quantize: QuantMode = "none",
    ready_timeout_s: float = 120.0,
    expert_memory_bytes: int | None = None,
) -> ShardGroup:
    """`expert_memory_bytes`: each shard's own budget of resident experts (None: every expert placed on it)."""
    strategy = strategy.upper()
    if strategy not in STRATEGIES:
        raise PlacementError(f"unknown placement strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    uses_gpus = cluster_gpus > 0 if use_gpus is None else use_gpus
    _check_capacity(placement.num_shards, strategy, uses_gpus, cluster_gpus)
    bundle = {"CPU": SHARD_CPUS, **({"GPU": 1} if uses_gpus else {})}
    group = placement_group([dict(bundle) for _ in range(placement.num_shards)], strategy=strategy)
    if not group.wait(timeout_seconds=ready_timeout_s):
        remove_placement_group(group)
        raise PlacementError(
            f"placement group of {placement.num_shards} x {bundle} ({strategy}) was not ready after "
            f"{ready_timeout_s:.0f} s: the cluster lacks the resources"
        )
    remote_shard = ray.remote(ExpertShard)
    actors = [
        remote_shard.options(
            num_cpus=SHARD_CPUS,
            num_gpus=1 if uses_gpus else 0,
            max_restarts=-1,  # a dead shard comes back and reloads its experts; the router retries its call
            max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
        ).remote(model_dir, index, experts, quantize, expert_memory_bytes)
        for index, experts in enumerate(placement.shards)
    ]
    try:
        infos = ray.get([actor.info.remote() for actor in actors], timeout=ready_timeout_s)
    except Exception:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(group)
        raise
    return ShardGroup(placement, actors, group, infos, uses_gpus)


def _check_capacity(num_shards: int, strategy: str, uses_gpus: bool, cluster_gpus: int) -> None:
    if uses_gpus and num_shards > cluster_gpus:
        raise PlacementError(f"{num_shards} shards need {num_shards} GPUs, the cluster has {cluster_gpus}")
    if strategy == "STRICT_SPREAD":
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        if num_shards > nodes:
            raise PlacementError(f"STRICT_SPREAD puts each of {num_shards} shards on its own node; "
                                 f"the cluster has {nodes} nodes")
