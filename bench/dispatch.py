"""Dispatch benchmark: what the expert-parallel hop costs per MoE layer, for each transport (plain, compiled).

Contract: the tiny Mixtral made by `make_tiny_model` (bench/.models/tiny-mixtral, shared with bench/engine.py) runs
decode steps at batch 1, 8 and 32 in-process (`LocalMoE`) and on router + 4 expert shards (a local Ray) through
each transport: plain actor calls, the compiled graph (also with sleeping channel reads), the routed graph, and
"serve": the routed transport with a second engine replica decoding the same batch size on the same router meanwhile
(two replicas sharing the shards, as in the Serve app); with and without micro-batch overlap.
Every run adds `batch` seeded prompts, prefills them in one step, warms up, then times `--steps` decode steps one
by one (every step decodes one token for each of the `batch` requests). `--repeats` rounds go over every system in
turn (fresh shards each round) and their samples are pooled, because this 2-core machine is shared and its speed
drifts; each round's p50s are kept in the JSON. It prints a table with the targets beside the numbers and writes
`bench/results/dispatch.json` with the machine's details (CPUs, load average before and after, versions).

With "+overlap" a decode step runs as two micro-batches, so a step makes two MoE calls per layer and a call's time
is what the engine spends blocked on it (in submit and in the wait); compare such systems by step time and tok/s.
Metrics, per (system, batch):
- step p50/p99: wall time of one `engine.step()`; decode tok/s = batch * steps / total step time;
- overhead per layer, from steps: (distributed step p50 - in-process step p50) / MoE layers, and the same with the
  distributed step p99;
- overhead per layer, direct: every MoE backend call is timed inside the engine; distributed call p50/p99 minus
  the in-process call p50 at the same batch;
- router CPU per layer: the router's own dispatch + combine work (gate, sort, messages, combine) timed in this
  process on the same hidden states, with no transport: the floor under any transport's overhead;
- tokens_match: the distributed run's greedy tokens equal the in-process run's;
- floor: a bare compiled graph through the same topology with the same payload and no compute
  (bench/dispatch_floor.py), timed in every round beside the systems; `x floor` = a system's direct overhead p50
  over the floor's call p50 at the same batch.
Targets: overhead p50 <= 0.3 ms per layer (below this machine's floor: kept to show the distance); the best system's
direct overhead p50 <= 1.2x the floor at batch 32 (systems without overlap), the serve system's <= 1.3x;
distributed >= 0.6x in-process decode tok/s at batch 32. Overlapped systems report tok/s against the same system
without overlap (`tok_s_vs_overlap_off`).
It stops by itself: a transport's round that would start after `--budget-s` is skipped (rounds already done are
kept; a transport with none is recorded as skipped).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dispatch_floor import floor_call_ms

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_FILE = BENCH_DIR / "results" / "dispatch.json"
DEFAULT_MODEL_DIR = BENCH_DIR / ".models" / "tiny-mixtral"
# "compiled-sleep": the compiled graph with sleeping channel reads (CompiledGraphConfig(poll="sleep"));
# "serve": the routed transport as the Serve app's replicas use it, with a second replica decoding on the same router;
# "+overlap": the engine's micro-batch overlap on (EngineConfig.micro_batch_overlap)
TRANSPORT_KINDS = ("plain", "compiled", "compiled-sleep", "routed", "serve", "compiled+overlap", "routed+overlap")
TARGET_OVERHEAD_P50_MS = 0.3
TARGET_RATIO_AT_32 = 0.6
TARGET_BEST_X_FLOOR_AT_32 = 1.2
TARGET_SERVE_X_FLOOR_AT_32 = 1.3


@dataclass(frozen=True)
class Workload:
    batches: tuple[int, ...] = (1, 8, 32)
    prompt_len: int = 8
    warmup_steps: int = 10
    steps: int = 100
    num_shards: int = 4
    seed: int = 0
    repeats: int = 3  # rounds over every system; samples are pooled


@dataclass
class RunResult:
    system: str  # "in-process", "plain", "compiled"
    batch: int
    status: str = "ok"  # "ok" or "skipped" / "failed" with a reason
    reason: str | None = None
    step_ms: list[float] = field(default_factory=list)
    call_ms: list[float] = field(default_factory=list)  # MoE backend calls during the timed steps
    tokens: list[list[int]] = field(default_factory=list)
    transport: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, float]] = field(default_factory=list)  # p50s of each round, before pooling
    tokens_stable: bool = True  # every round produced the same tokens

    def round_summary(self) -> dict[str, float]:
        return {"step_p50_ms": pct(self.step_ms, 50), "call_p50_ms": pct(self.call_ms, 50)}

    def absorb(self, other: RunResult) -> None:
        """Pool another round of the same (system, batch)."""
        self.rounds.append(other.round_summary())
        self.step_ms += other.step_ms
        self.call_ms += other.call_ms
        self.tokens_stable &= other.tokens == self.tokens
        self.transport = other.transport or self.transport

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"system": self.system, "batch": self.batch, "status": self.status}
        if self.reason:
            out["reason"] = self.reason
        if self.step_ms:
            out.update(
                step_p50_ms=pct(self.step_ms, 50), step_p99_ms=pct(self.step_ms, 99),
                decode_tok_s=round(self.batch * len(self.step_ms) / (sum(self.step_ms) / 1e3), 1),
                call_p50_ms=pct(self.call_ms, 50), call_p99_ms=pct(self.call_ms, 99),
                moe_calls=len(self.call_ms),
            )
        if self.transport:
            out["transport"] = self.transport
        if len(self.rounds) > 1:
            out["rounds"] = self.rounds
            out["tokens_stable"] = self.tokens_stable
        return out


def pct(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 4)


class TimedMoE:
    """Wraps an MoE backend and records the wall time of every call while `recording`."""

    def __init__(self, backend: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        self.backend = backend
        self.recording = False
        self.call_ms: list[float] = []

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.backend(layer, hidden)
        if self.recording:
            self.call_ms.append((time.perf_counter() - start) * 1e3)
        return out

    def submit(self, layer: int, hidden: torch.Tensor) -> Callable[[], torch.Tensor]:
        """With micro-batch overlap: records the time the engine spends blocked (in submit, then in the wait)."""
        start = time.perf_counter()
        wait = self.backend.submit(layer, hidden)  # type: ignore[attr-defined]
        submit_ms = (time.perf_counter() - start) * 1e3

        def timed_wait() -> torch.Tensor:
            waited = time.perf_counter()
            out = wait()
            if self.recording:
                self.call_ms.append(submit_ms + (time.perf_counter() - waited) * 1e3)
            return out

        return timed_wait


def ensure_model(model_dir: Path | None) -> Path:
    """The given checkpoint, or the default tiny Mixtral (the one bench/engine.py makes, made here if absent)."""
    if model_dir is not None:
        return model_dir
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        from moe_serve.model.tiny import make_tiny_model

        make_tiny_model(DEFAULT_MODEL_DIR, family="mixtral", heads=2, kv_heads=1, show_progress=False)
    return DEFAULT_MODEL_DIR


def prompts_for(batch: int, vocab: int, w: Workload) -> list[list[int]]:
    gen = torch.Generator().manual_seed(w.seed + batch)
    return [torch.randint(3, vocab, (w.prompt_len,), generator=gen).tolist() for _ in range(batch)]


def decode_run(engine: Any, timed: TimedMoE, system: str, batch: int, w: Workload) -> RunResult:
    from moe_serve.replicas.sampling import SamplingParams

    params = SamplingParams(max_tokens=1 + w.warmup_steps + w.steps, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts_for(batch, engine.model_config.vocab_size, w)]
    result = RunResult(system, batch)
    first = engine.step()  # prefill of every prompt (batch * prompt_len <= max_num_batched_tokens)
    if len(first) != batch:
        raise RuntimeError(f"prefill produced {len(first)} tokens for {batch} requests: raise max_num_batched_tokens")
    for _ in range(w.warmup_steps):
        engine.step()
    timed.call_ms.clear()
    timed.recording = True
    for _ in range(w.steps):
        start = time.perf_counter()
        outputs = engine.step()
        result.step_ms.append((time.perf_counter() - start) * 1e3)
        assert len(outputs) == batch
    timed.recording = False
    result.call_ms = list(timed.call_ms)
    result.tokens = [engine.pop_result(i).token_ids for i in ids]
    return result


def router_cpu_ms(model_dir: Path, batch: int, num_shards: int, repeats: int = 200) -> float:
    """p50 of the router's dispatch + combine work for one layer call at `batch` tokens, without any transport."""
    from moe_serve.cluster.placement import ExpertPlacement
    from moe_serve.model.config import ModelConfig
    from moe_serve.router.router import Router

    config = ModelConfig.from_dir(model_dir)
    router = Router(str(model_dir), ExpertPlacement.balanced(config.num_experts, num_shards), [None] * num_shards)
    layer = config.moe_layer_ids[0]
    x = torch.randn(batch, config.hidden_size, generator=torch.Generator().manual_seed(batch)).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step = router._dispatch(layer, x)
        router._finish(step, step.combine({b.shard: m.rows for b, m in zip(step.batches, step.messages)}))
        times.append((time.perf_counter() - start) * 1e3)
    return pct(times, 50)


class PeerReplica:
    """The second engine replica of the "serve" system: decodes `batch` requests at a time on the shared router,
    over the Serve app's transport, until stopped."""

    def __init__(self, model_dir: str, router: Any, overlap: bool) -> None:
        from moe_serve.replicas.engine import EngineConfig, LLMEngine
        from moe_serve.router.backend import RemoteMoE
        from moe_serve.router.transport import make_transport

        torch.set_num_threads(1)
        backend = RemoteMoE(make_transport("routed", router, []), lambda: router)
        self.engine = LLMEngine.from_pretrained(model_dir, EngineConfig(micro_batch_overlap=overlap), moe=backend)
        self.vocab = self.engine.model_config.vocab_size
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0

    def start(self, batch: int, prompt_len: int) -> None:
        self._stop.clear()
        self.steps = 0
        self._thread = threading.Thread(target=self._run, args=(batch, prompt_len), daemon=True)
        self._thread.start()

    def _run(self, batch: int, prompt_len: int) -> None:
        from moe_serve.replicas.sampling import SamplingParams

        params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        gen = torch.Generator().manual_seed(batch)
        while not self._stop.is_set():
            ids = [self.engine.add_request(torch.randint(3, self.vocab, (prompt_len,), generator=gen).tolist(),
                                           params) for _ in range(batch)]
            while self.engine.has_unfinished() and not self._stop.is_set():
                self.engine.step()
                self.steps += 1
            for request_id in ids:
                self.engine.abort_request(request_id)  # no-op once finished
                self.engine.pop_result(request_id)

    def stop(self) -> int:
        """Stop decoding; the number of steps taken since `start`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.steps


def machine_info() -> dict[str, Any]:
    import ray

    return {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def run_all(model_dir: Path, w: Workload, transports: Sequence[str], budget_s: float) -> dict[str, Any]:
    import ray

    from moe_serve.cluster.bringup import connect_ray
    from moe_serve.replicas.engine import EngineConfig, LLMEngine
    from moe_serve.router.deploy import start_expert_parallel
    from moe_serve.router.transport import CompiledGraphConfig

    started = time.monotonic()
    engine_config = EngineConfig(max_num_batched_tokens=max(512, max(w.batches) * w.prompt_len))
    info = machine_info()

    def out_of_time() -> bool:
        return time.monotonic() - started > budget_s

    local = LLMEngine.from_pretrained(model_dir, engine_config)
    timed_local = TimedMoE(local.moe)
    local.moe = timed_local
    num_moe_layers = len(local.model_config.moe_layer_ids)
    pooled: dict[tuple[str, int], RunResult] = {}
    floor: dict[int, list[float]] = {batch: [] for batch in w.batches}

    def record(run: RunResult) -> None:
        key = (run.system, run.batch)
        if key in pooled:
            pooled[key].absorb(run)
        else:
            run.rounds.append(run.round_summary())
            pooled[key] = run

    connect_ray()
    peer_replica = ray.remote(num_cpus=0, max_concurrency=2)(PeerReplica)
    # Rounds interleave the systems, so a slow spell of the machine (other work on its 2 cores) hits all of them.
    for round_index in range(w.repeats):
        for batch in w.batches:
            record(decode_run(local, timed_local, "in-process", batch, w))
        for kind in transports:
            if out_of_time():
                for batch in w.batches:
                    pooled.setdefault((kind, batch), RunResult(kind, batch, "skipped",
                                                               f"over the {budget_s:.0f} s budget"))
                continue
            base_kind = kind.removesuffix("+overlap").removesuffix("-sleep")
            graph_config = CompiledGraphConfig(poll="sleep" if kind.endswith("-sleep") else "spin")
            transport = "routed" if base_kind == "serve" else base_kind
            parallel = start_expert_parallel(str(model_dir), w.num_shards, transport=transport,
                                             graph_config=graph_config, router_concurrency=4)
            overlap = kind.endswith("+overlap")
            peer = peer_replica.remote(str(model_dir), parallel.router, overlap) if base_kind == "serve" else None
            try:
                timed = TimedMoE(parallel)
                engine = LLMEngine.from_pretrained(model_dir, replace(engine_config, micro_batch_overlap=overlap),
                                                   moe=timed)
                for batch in w.batches:
                    if peer is not None:
                        ray.get(peer.start.remote(batch, w.prompt_len))
                    run = decode_run(engine, timed, kind, batch, w)
                    if peer is not None:
                        run.transport["peer_steps"] = ray.get(peer.stop.remote())
                    run.transport.update(parallel.describe()["transport"])
                    record(run)
            finally:
                if peer is not None:
                    ray.kill(peer)
                parallel.shutdown()
        config = local.model_config
        for batch, samples in floor_call_ms(w.num_shards, config.top_k, config.hidden_size, w.batches,
                                            calls=w.steps * num_moe_layers).items():
            floor[batch] += samples
        info["rounds_done"] = round_index + 1
    runs = list(pooled.values())
    ray.shutdown()
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    router_cpu = {str(b): router_cpu_ms(model_dir, b, w.num_shards) for b in w.batches}
    return {
        "machine": info,
        "workload": asdict(w),
        "model_dir": str(model_dir),
        "num_moe_layers": num_moe_layers,
        "router_cpu_p50_ms": router_cpu,
        "runs": [r.summary() for r in runs],
        "comparisons": compare(runs, num_moe_layers, floor),
        "wall_s": round(time.monotonic() - started, 1),
    }


def compare(runs: list[RunResult], num_moe_layers: int, floor: dict[int, list[float]]) -> list[dict[str, Any]]:
    """Each distributed run against the in-process run at the same batch, and against the floor; a `floor` row per
    batch (its call p50 is its whole overhead)."""
    local = {r.batch: r for r in runs if r.system == "in-process"}
    floor_p50 = {batch: pct(samples, 50) for batch, samples in floor.items() if samples}
    rows: list[dict[str, Any]] = [
        {"system": "floor", "batch": batch, "direct_overhead_p50_ms": p50, "direct_overhead_p99_ms":
         pct(floor[batch], 99), "tok_s_ratio": None, "tokens_match": None}
        for batch, p50 in floor_p50.items()
    ]
    for run in runs:
        base = local.get(run.batch)
        if run.system == "in-process" or run.status != "ok" or base is None:
            continue
        base_step, base_call = statistics.median(base.step_ms), statistics.median(base.call_ms)
        ratio = (run.batch * len(run.step_ms) / sum(run.step_ms)) / (base.batch * len(base.step_ms) / sum(base.step_ms))
        rows.append({
            "system": run.system,
            "batch": run.batch,
            "overhead_per_layer_p50_ms": round((pct(run.step_ms, 50) - base_step) / num_moe_layers, 4),
            "overhead_per_layer_p99_ms": round((pct(run.step_ms, 99) - base_step) / num_moe_layers, 4),
            "direct_overhead_p50_ms": round(pct(run.call_ms, 50) - base_call, 4),
            "direct_overhead_p99_ms": round(pct(run.call_ms, 99) - base_call, 4),
            "tok_s_ratio": round(ratio, 3),
            "tokens_match": run.tokens == base.tokens and run.tokens_stable,
            # overlapped calls carry half a batch and hide behind compute: not comparable with the floor's
            "x_floor": round((pct(run.call_ms, 50) - base_call) / floor_p50[run.batch], 2)
            if run.batch in floor_p50 and not run.system.endswith("+overlap") else None,
            "tok_s_vs_overlap_off": overlap_gain(runs, run),
            "meets_overhead_target": pct(run.call_ms, 50) - base_call <= TARGET_OVERHEAD_P50_MS,
            "meets_ratio_target": None if run.batch != 32 else ratio >= TARGET_RATIO_AT_32,
        })
    return rows


def overlap_gain(runs: list[RunResult], run: RunResult) -> float | None:
    """Decode tok/s of an overlapped run over the same system's without overlap at the same batch."""
    if not run.system.endswith("+overlap"):
        return None
    off = next((r for r in runs if r.system == run.system.removesuffix("+overlap") and r.batch == run.batch
                and r.status == "ok"), None)
    return None if off is None else round(sum(off.step_ms) / sum(run.step_ms), 3)  # same steps and batch


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"dispatch bench: {m['cpu_count']} CPUs, load {m['loadavg_start']} -> {m['loadavg_end']}, "
          f"ray {m['ray']}, torch {m['torch']}, {result['num_moe_layers']} MoE layers, "
          f"router + {result['workload']['num_shards']} shards, {result['machine'].get('rounds_done', 0)} rounds x "
          f"{result['workload']['steps']} decode steps pooled")
    by_key = {(r["system"], r["batch"]): r for r in result["runs"]}
    comps = {(c["system"], c["batch"]): c for c in result["comparisons"]}
    header = (f"{'system':<15}{'batch':>6}{'step p50':>10}{'step p99':>10}{'tok/s':>9}{'call p50':>10}"
              f"{'call p99':>10}{'ovh/layer p50':>15}{'ovh/layer p99':>15}{'direct p50':>12}{'direct p99':>12}"
              f"{'x in-proc':>11}{'tokens':>8}{'x floor':>9}")
    print(header)
    print("-" * len(header))
    for (system, batch), r in by_key.items():
        if r["status"] != "ok":
            print(f"{system:<15}{batch:>6}  {r['status']}: {r.get('reason', '')}")
            continue
        c = comps.get((system, batch))
        line = (f"{system:<15}{batch:>6}{r['step_p50_ms']:>10.3f}{r['step_p99_ms']:>10.3f}{r['decode_tok_s']:>9.1f}"
                f"{r['call_p50_ms']:>10.3f}{r['call_p99_ms']:>10.3f}")
        if c:
            line += (f"{c['overhead_per_layer_p50_ms']:>15.3f}{c['overhead_per_layer_p99_ms']:>15.3f}"
                     f"{c['direct_overhead_p50_ms']:>12.3f}{c['direct_overhead_p99_ms']:>12.3f}"
                     f"{c['tok_s_ratio']:>10.2f}x{'ok' if c['tokens_match'] else 'DIFF':>8}"
                     f"{'-' if c['x_floor'] is None else format(c['x_floor'], '.2f'):>9}")
        print(line)
    for c in comps.values():
        if c["system"] == "floor":
            print(f"{'floor':<15}{c['batch']:>6}{'':>39}{c['direct_overhead_p50_ms']:>10.3f}"
                  f"{c['direct_overhead_p99_ms']:>10.3f}{'':>30}{c['direct_overhead_p50_ms']:>12.3f}"
                  f"{c['direct_overhead_p99_ms']:>12.3f}")
    print("times in ms; ovh/layer from step times, direct from timed MoE calls; "
          f"router CPU per layer (no transport) p50: {result['router_cpu_p50_ms']}")
    print(f"targets: overhead p50 <= {TARGET_OVERHEAD_P50_MS} ms per layer; best system <= "
          f"{TARGET_BEST_X_FLOOR_AT_32}x the floor at batch 32, serve <= {TARGET_SERVE_X_FLOOR_AT_32}x; distributed >= "
          f"{TARGET_RATIO_AT_32}x in-process at batch 32")
    at_32 = [c for c in result["comparisons"] if c["batch"] == 32 and c.get("x_floor") is not None]
    if at_32:
        best = min(at_32, key=lambda c: c["x_floor"])
        verdict = "meets" if best["x_floor"] <= TARGET_BEST_X_FLOOR_AT_32 else "misses"
        print(f"  best at batch 32: {best['system']} {best['x_floor']:.2f}x the floor: {verdict} the target")
    serve_32 = next((c for c in at_32 if c["system"] == "serve"), None)
    if serve_32:
        verdict = "meets" if serve_32["x_floor"] <= TARGET_SERVE_X_FLOOR_AT_32 else "misses"
        print(f"  serve at batch 32: {serve_32['x_floor']:.2f}x the floor: {verdict} the target")
    for c in result["comparisons"]:
        if c.get("tok_s_vs_overlap_off") is not None:
            print(f"  {c['system']:<17} batch {c['batch']:>2}: {c['tok_s_vs_overlap_off']:.2f}x the tok/s without "
                  "overlap")
    for c in result["comparisons"]:
        if c["system"] == "floor":
            continue
        verdict = "meets" if c["meets_overhead_target"] else "misses"
        line = (f"  {c['system']:<14} batch {c['batch']:>2}: {verdict} the overhead target "
                f"({c['direct_overhead_p50_ms']:.3f} ms)")
        if c["meets_ratio_target"] is not None:
            line += f"; {'meets' if c['meets_ratio_target'] else 'misses'} the batch-32 ratio ({c['tok_s_ratio']:.2f}x)"
        print(line)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help=f"HF-layout MoE checkpoint (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--transports", default=",".join(TRANSPORT_KINDS),
                   help=f"comma-separated: {','.join(TRANSPORT_KINDS)}")
    p.add_argument("--batches", default="1,8,32", help="comma-separated decode batch sizes")
    p.add_argument("--steps", type=int, default=Workload.steps, help="timed decode steps per run")
    p.add_argument("--shards", type=int, default=Workload.num_shards)
    p.add_argument("--repeats", type=int, default=Workload.repeats, help="rounds over every system (pooled)")
    p.add_argument("--budget-s", type=float, default=240.0, help="no run starts after this many seconds")
    p.add_argument("--out", type=Path, default=RESULTS_FILE)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the engine's choice for this model size; Ray actors set their own
    transports = [t for t in args.transports.split(",") if t]
    unknown = sorted(set(transports) - set(TRANSPORT_KINDS))
    if unknown:
        sys.exit(f"unknown transport(s) {unknown}; choose from {TRANSPORT_KINDS}")
    w = Workload(batches=tuple(int(b) for b in args.batches.split(",")), steps=args.steps, num_shards=args.shards,
                 repeats=args.repeats)
    result = run_all(ensure_model(args.model), w, transports, args.budget_s)
    result["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
