"""Multi-node placement with `ray.cluster_utils.Cluster`: nodes declaring fake GPUs, shards on the planned nodes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from conftest import free_port, random_prompts
from ray.cluster_utils import Cluster

from moe_serve.replicas.engine import LLMEngine
from moe_serve.replicas.sampling import SamplingParams
from moe_serve.router.deploy import start_expert_parallel


@dataclass
class FakeGpuCluster:
    cluster: Cluster
    worker_node_ids: list[str]


@pytest.fixture(scope="module")
def cluster() -> Iterator[FakeGpuCluster]:
    """A CPU head and two worker nodes declaring one fake GPU each; the GCS port is a free one, never 6379."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "gcs_server_port": free_port()})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    assert not cluster.address.endswith(":6379")
    ray.init(address=cluster.address, log_to_driver=False)
    yield FakeGpuCluster(cluster, [w.node_id for w in workers])
    ray.shutdown()
    cluster.shutdown()


def test_shards_land_one_per_gpu_node(cluster: FakeGpuCluster, mixtral_dir: Path) -> None:
    parallel = start_expert_parallel(str(mixtral_dir), 2, strategy="strict_spread")
    try:
        assert parallel.shards.uses_gpus
        infos = parallel.shards.infos
        assert sorted(info.node_id for info in infos) == sorted(cluster.worker_node_ids)
        assert all(len(info.gpu_ids) == 1 for info in infos)
        prompts = random_prompts([7, 19], 256, seed=21)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        expected = [o.token_ids for o in LLMEngine.from_pretrained(mixtral_dir).generate(prompts, params)]
        engine = LLMEngine.from_pretrained(mixtral_dir, moe=parallel)
        assert [o.token_ids for o in engine.generate(prompts, params)] == expected
        described = parallel.describe()
        assert sorted(described["nodes"]) == sorted(cluster.worker_node_ids)
        # the default transport, a compiled graph, spans the nodes: no layer call fell back to plain actor calls
        assert described["transport"]["kind"] == "compiled" and described["transport"]["fallback_calls"] == 0
    finally:
        parallel.shutdown()
