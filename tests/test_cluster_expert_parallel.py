"""Expert parallelism on a real local Ray: shards + router give the in-process engine's tokens over every transport
(plain actor calls; the CLI's caller-driven compiled graph; the Serve replicas' routed one, where the router drives a
graph to its shards), survive shard and router deaths and rebalancing, and refuse plans the cluster cannot hold."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from conftest import random_prompts

from moe_serve.cluster.bringup import connect_ray, start_shards
from moe_serve.cluster.placement import ExpertPlacement, PlacementError
from moe_serve.replicas.engine import EngineConfig, LLMEngine
from moe_serve.replicas.sampling import SamplingParams
from moe_serve.router.deploy import ExpertParallel, start_expert_parallel
from moe_serve.router.router import RouterConfig
from moe_serve.router.transport import CompiledGraphConfig, TransportKind

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    connect_ray()  # local Ray: its GCS takes a random port, never Redis's 6379
    yield
    ray.shutdown()


def in_process_tokens(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in LLMEngine.from_pretrained(model_dir).generate(prompts, GREEDY)]


def graph_calls(parallel: ExpertParallel) -> tuple[int, int]:
    """(graph calls, fallback calls) of the transport's graph: the caller's, or for "routed" the router's."""
    transport = parallel.describe()["transport"]
    counts = transport.get("shard_graph", transport)
    return counts["graph_calls"], counts["fallback_calls"]


@pytest.mark.parametrize("transport", ["compiled", "routed"])  # the CLI's and the Serve replicas'
@pytest.mark.parametrize("num_shards", [2, 4])
@pytest.mark.parametrize("family_dir", ["mixtral_dir", "qwen2_dir", "qwen3_dir", "olmoe_dir"])
def test_distributed_greedy_equals_in_process(family_dir: str, num_shards: int, transport: TransportKind,
                                              request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(family_dir)
    prompts = random_prompts([6, 31, 18], 256, seed=num_shards)
    expected = in_process_tokens(model_dir, prompts)
    parallel = start_expert_parallel(str(model_dir), num_shards, transport=transport)
    try:
        engine = LLMEngine.from_pretrained(model_dir, moe=parallel)
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
        plan = parallel.describe()
        assert plan["transport"]["kind"] == transport
        assert [len(s["experts"]) for s in plan["shards"]] == [8 // num_shards] * num_shards
        calls, fallbacks = graph_calls(parallel)
        assert calls > 0 and fallbacks == 0
        stats = ray.get(parallel.router.load_stats.remote())
        assert sum(stats["shard_rows"]) == sum(map(sum, stats["expert_tokens"])) > 0 and stats["shard_retries"] == 0
    finally:
        parallel.shutdown()


@pytest.mark.parametrize("transport", ["compiled", "routed"])
def test_micro_batch_overlap_greedy_equals_in_process(mixtral_dir: Path, transport: TransportKind) -> None:
    """Both halves of each decode step in flight at once (two graph executions, or two calls to the router)."""
    prompts = random_prompts([6, 31, 18, 9], 256, seed=37)
    expected = in_process_tokens(mixtral_dir, prompts)
    parallel = start_expert_parallel(str(mixtral_dir), 2, transport=transport)
    try:
        engine = LLMEngine.from_pretrained(mixtral_dir, EngineConfig(micro_batch_overlap=True), moe=parallel)
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
        calls, fallbacks = graph_calls(parallel)
        assert calls == 2 * (1 + 2 * (GREEDY.max_tokens - 1)) and fallbacks == 0  # 2 MoE layers, halves per decode
    finally:
        parallel.shutdown()


def test_shards_under_an_expert_memory_budget_give_the_same_tokens(mixtral_dir: Path) -> None:
    """Each shard keeps at most its own budget of its experts (3 of the 8 it serves over 2 layers), loading the rest
    on demand from the checkpoint."""
    prompts = random_prompts([6, 31, 18], 256, seed=38)
    expected = in_process_tokens(mixtral_dir, prompts)
    probe = LLMEngine.from_pretrained(mixtral_dir, EngineConfig(expert_memory_bytes=2**40))
    per_expert = probe.moe.experts.expert_nbytes
    parallel = start_expert_parallel(str(mixtral_dir), 2, transport="plain", expert_memory_bytes=3 * per_expert)
    try:
        engine = LLMEngine.from_pretrained(mixtral_dir, moe=parallel)
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
        infos = ray.get([shard.info.remote() for shard in parallel.shards.actors])
        assert all(0 < info.expert_bytes <= 3 * per_expert for info in infos)
        assert all(sum(map(len, info.experts.values())) <= 3 for info in infos)
    finally:
        parallel.shutdown()


def test_plain_transport_greedy_equals_in_process(mixtral_dir: Path, parallel: ExpertParallel) -> None:
    prompts = random_prompts([6, 31, 18], 256, seed=3)
    engine = LLMEngine.from_pretrained(mixtral_dir, moe=parallel)
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == in_process_tokens(mixtral_dir, prompts)
    assert parallel.describe()["transport"] == {"kind": "plain", "calls": 2 * 10, "recoveries": 0}


@pytest.fixture(scope="module")
def parallel(mixtral_dir: Path) -> Iterator[ExpertParallel]:
    group = start_expert_parallel(str(mixtral_dir), 4, transport="plain")
    yield group
    group.shutdown()


def generate_with_hook(engine: LLMEngine, prompts: list[list[int]], hook_at_step: int, hook) -> list[list[int]]:  # noqa: ANN001
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    step = 0
    while engine.has_unfinished():
        if step == hook_at_step:
            hook()
        engine.step()
        step += 1
    return [engine.pop_result(i).token_ids for i in ids]


def test_rebalance_during_generation_changes_no_output(mixtral_dir: Path, parallel: ExpertParallel) -> None:
    prompts = random_prompts([12, 25, 9, 40], 256, seed=11)
    expected = in_process_tokens(mixtral_dir, prompts)
    engine = LLMEngine.from_pretrained(mixtral_dir, moe=parallel)
    added: list = []
    tokens = generate_with_hook(engine, prompts, 4, lambda: added.extend(ray.get(parallel.router.rebalance.remote(2))))
    assert tokens == expected
    assert added, "rebalance placed no copies"
    plan = parallel.describe()
    copy = added[0]
    assert copy["shard"] in plan["copies"][str(copy["layer"])][str(copy["expert"])]
    info = ray.get(parallel.shards.actors[copy["shard"]].info.remote())
    assert copy["expert"] in info.experts[copy["layer"]]


def test_killed_shard_fails_no_request(mixtral_dir: Path, parallel: ExpertParallel) -> None:
    prompts = random_prompts([14, 5, 33], 256, seed=12)
    expected = in_process_tokens(mixtral_dir, prompts)
    engine = LLMEngine.from_pretrained(mixtral_dir, moe=parallel)
    victim = parallel.shards.actors[1]
    pid_before = ray.get(victim.info.remote()).pid
    tokens = generate_with_hook(engine, prompts, 3, lambda: ray.kill(victim, no_restart=False))
    assert tokens == expected
    assert ray.get(victim.info.remote()).pid != pid_before  # restarted, experts reloaded
    assert ray.get(parallel.router.load_stats.remote())["shard_retries"] >= 1


def test_capacity_factor_mode_counts_fallbacks(mixtral_dir: Path) -> None:
    parallel = start_expert_parallel(str(mixtral_dir), 2, router_config=RouterConfig(capacity_factor=0.5),
                                     transport="plain")
    try:
        engine = LLMEngine.from_pretrained(mixtral_dir, moe=parallel)
        outputs = engine.generate(random_prompts([40, 20], 256, seed=13), GREEDY)
        assert all(len(o.token_ids) == 10 for o in outputs)
        assert ray.get(parallel.router.load_stats.remote())["capacity_fallbacks"] > 0
    finally:
        parallel.shutdown()


def test_more_shards_than_experts_is_refused(mixtral_dir: Path) -> None:
    with pytest.raises(PlacementError, match="cannot place 8 experts on 9 shards"):
        start_expert_parallel(str(mixtral_dir), 9)


def test_gpus_the_cluster_lacks_are_refused(mixtral_dir: Path) -> None:
    with pytest.raises(PlacementError, match="2 shards need 2 GPUs, the cluster has 0"):
        start_shards(str(mixtral_dir), ExpertPlacement.balanced(8, 2), use_gpus=True)


def test_strict_spread_over_more_nodes_than_exist_is_refused(mixtral_dir: Path) -> None:
    with pytest.raises(PlacementError, match="the cluster has 1 nodes"):
        start_shards(str(mixtral_dir), ExpertPlacement.balanced(8, 2), strategy="strict_spread")


def test_load_stats_and_prometheus_counters(mixtral_dir: Path, parallel: ExpertParallel) -> None:
    engine = LLMEngine.from_pretrained(mixtral_dir, moe=parallel)
    engine.generate(random_prompts([10], 256, seed=14), GREEDY)
    stats = ray.get(parallel.router.load_stats.remote())
    assert len(stats["expert_tokens"]) == 2 and all(sum(layer) > 0 for layer in stats["expert_tokens"])
    assert len(stats["shard_busy_s"]) == 4 and all(b > 0 for b in stats["shard_busy_s"])
    text = ray.get(parallel.router.metrics_text.remote()).decode()
    assert 'moe_expert_tokens_total{expert="0",layer="0"}' in text
    assert "moe_shard_retries_total" in text


def test_auto_rebalance_copies_hot_experts(mixtral_dir: Path) -> None:
    config = RouterConfig(auto_rebalance_every=2, imbalance_threshold=1.0)
    parallel = start_expert_parallel(str(mixtral_dir), 2, router_config=config, transport="plain")
    try:
        prompts = random_prompts([20, 8], 256, seed=15)
        expected = in_process_tokens(mixtral_dir, prompts)
        engine = LLMEngine.from_pretrained(mixtral_dir, moe=parallel)
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
        assert ray.get(parallel.router.load_stats.remote())["auto_rebalances"] >= 1
        assert parallel.describe()["copies"]
    finally:
        parallel.shutdown()


# --- the compiled-graph transport ------------------------------------------------------------------------------

FAST_RECOVERY = CompiledGraphConfig(recompile_after_s=0.2, idle_teardown_s=None)


def test_compiled_transport_two_shards_sleeping_reads_idle_teardown(mixtral_dir: Path) -> None:
    """Two shards, readers that sleep instead of spinning, and a graph torn down when idle, then compiled again."""
    prompts = random_prompts([6, 31, 18], 256, seed=32)
    expected = in_process_tokens(mixtral_dir, prompts)
    config = CompiledGraphConfig(poll="sleep", idle_teardown_s=0.5)
    parallel = start_expert_parallel(str(mixtral_dir), 2, transport="compiled", graph_config=config)
    try:
        engine = LLMEngine.from_pretrained(mixtral_dir, moe=parallel)
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
        first = parallel.describe()["transport"]
        assert first["graph_calls"] > 0 and first["fallback_calls"] == 0
        deadline = time.monotonic() + 10
        while parallel.transport.live and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not parallel.transport.live
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
        again = parallel.transport.stats()
        assert again["live"] and again["idle_teardowns"] >= 1 and again["compiles"] == again["idle_teardowns"] + 1
        stats = ray.get(parallel.router.load_stats.remote())  # the graph's layer calls are counted too
        assert sum(stats["shard_rows"]) == sum(map(sum, stats["expert_tokens"])) > 0
    finally:
        parallel.shutdown()
    assert not parallel.transport.live


@pytest.fixture(scope="module")
def compiled(mixtral_dir: Path) -> Iterator[ExpertParallel]:
    group = start_expert_parallel(str(mixtral_dir), 4, transport="compiled", graph_config=FAST_RECOVERY)
    yield group
    group.shutdown()


def test_compiled_transport_four_shards_greedy_equals_in_process(
    mixtral_dir: Path, compiled: ExpertParallel
) -> None:
    prompts = random_prompts([6, 31, 18], 256, seed=34)
    expected = in_process_tokens(mixtral_dir, prompts)
    engine = LLMEngine.from_pretrained(mixtral_dir, moe=compiled)
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
    transport = compiled.describe()["transport"]
    assert transport["live"] and transport["compiles"] == 1
    assert transport["graph_calls"] > 0 and transport["fallback_calls"] == 0
    stats = ray.get(compiled.router.load_stats.remote())
    assert sum(stats["shard_rows"]) == sum(map(sum, stats["expert_tokens"])) > 0


def test_compiled_transport_rebalance_between_steps(mixtral_dir: Path, compiled: ExpertParallel) -> None:
    prompts = random_prompts([12, 25, 9, 40], 256, seed=31)
    expected = in_process_tokens(mixtral_dir, prompts)
    engine = LLMEngine.from_pretrained(mixtral_dir, moe=compiled)
    added: list = []
    tokens = generate_with_hook(engine, prompts, 4, lambda: added.extend(ray.get(compiled.router.rebalance.remote(2))))
    assert tokens == expected
    assert added, "rebalance placed no copies"
    transport = compiled.transport.stats()
    assert transport["live"] and transport["fallback_calls"] == 0  # copies need no new graph
    copy = added[0]
    assert copy["shard"] in compiled.describe()["copies"][str(copy["layer"])][str(copy["expert"])]


def test_compiled_transport_killed_shard_falls_back_then_recompiles(
    mixtral_dir: Path, compiled: ExpertParallel
) -> None:
    prompts = random_prompts([14, 5, 33], 256, seed=32)
    expected = in_process_tokens(mixtral_dir, prompts)
    engine = LLMEngine.from_pretrained(mixtral_dir, moe=compiled)
    victim = compiled.shards.actors[2]
    pid_before = ray.get(victim.info.remote()).pid
    before = compiled.transport.stats()
    tokens = generate_with_hook(engine, prompts, 3, lambda: ray.kill(victim, no_restart=False))
    assert tokens == expected
    assert ray.get(victim.info.remote()).pid != pid_before  # restarted, experts reloaded
    after = compiled.transport.stats()
    assert after["graph_failures"] == before["graph_failures"] + 1
    assert after["fallback_calls"] > before["fallback_calls"]
    # Later calls run on a graph compiled again over the restarted shard, with the same tokens.
    time.sleep(FAST_RECOVERY.recompile_after_s)
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
    final = compiled.transport.stats()
    assert final["live"] and final["compiles"] >= max(before["compiles"], 1) + 1
    assert final["graph_calls"] > after["graph_calls"]


@pytest.mark.parametrize("transport", ["compiled", "routed"])
def test_killed_router_fails_no_request(mixtral_dir: Path, transport: TransportKind) -> None:
    """The router dies mid-generation: Ray restarts it, the layer call is made again, the tokens are the same; the
    routed router restarts the shards its predecessor's graph held, then drives a new graph."""
    prompts = random_prompts([14, 5, 33], 256, seed=35)
    expected = in_process_tokens(mixtral_dir, prompts)
    parallel = start_expert_parallel(str(mixtral_dir), 2, transport=transport, graph_config=FAST_RECOVERY)
    try:
        engine = LLMEngine.from_pretrained(mixtral_dir, moe=parallel)
        def router_pid() -> int:
            return ray.get(parallel.router.__ray_call__.remote(lambda router: os.getpid()))

        pid_before = router_pid()
        tokens = generate_with_hook(engine, prompts, 3, lambda: os.kill(pid_before, signal.SIGKILL))
        assert tokens == expected
        assert router_pid() != pid_before
        deadline = time.monotonic() + 60  # the graph comes back once the (restarted) actors answer
        while time.monotonic() < deadline:
            before, _ = graph_calls(parallel)
            assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
            if graph_calls(parallel)[0] > before:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no graph call after the router restarted: {parallel.describe()['transport']}")
    finally:
        parallel.shutdown()


def test_routed_transport_killed_shard_falls_back_then_recompiles(mixtral_dir: Path) -> None:
    prompts = random_prompts([14, 5, 33], 256, seed=36)
    expected = in_process_tokens(mixtral_dir, prompts)
    parallel = start_expert_parallel(str(mixtral_dir), 4, transport="routed", graph_config=FAST_RECOVERY)
    try:
        engine = LLMEngine.from_pretrained(mixtral_dir, moe=parallel)
        victim = parallel.shards.actors[2]
        tokens = generate_with_hook(engine, prompts, 3, lambda: ray.kill(victim, no_restart=False))
        assert tokens == expected
        after = parallel.describe()["transport"]["shard_graph"]
        assert after["graph_failures"] == 1 and after["fallback_calls"] > 0
        time.sleep(FAST_RECOVERY.recompile_after_s)
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
        final = parallel.describe()["transport"]["shard_graph"]
        assert final["live"] and final["compiles"] == 2 and final["graph_calls"] > after["graph_calls"]
    finally:
        parallel.shutdown()


def test_unknown_transport_is_refused(mixtral_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown transport 'grpc'"):
        start_expert_parallel(str(mixtral_dir), 2, transport="grpc")  # type: ignore[arg-type]
