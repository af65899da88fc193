"""Model footprint benchmark: experts loaded on demand under a memory budget, at real model shapes.

For each model (bench/mid_models.py: mixtral-mid, 8 experts top-2; qwen3-mid, 64 experts top-8; and their 16-layer
versions mixtral-deep and qwen3-deep, whose experts are 93-94% of the weights as in published checkpoints; bf16) and
expert budget (none: the ordinary engine, every expert resident from start-up; then 100%, 50% and 25% of the expert
bytes through the on-demand path), under two workloads:
- skewed: prompts from a few "topics", each a handful of token ids repeated (prompts on one subject reuse words);
- uniform: token ids drawn over the whole vocabulary;
it measures start-up (load time, and time to the first token of a first request sent at start-up), decode tokens/s
at batch 1 (one stream: top-k experts a layer per token) and at batch 8, peak RSS of the process, and the experts'
loads, evictions, runs straight from the checkpoint and hit rate. The routing skew each workload really produced is
reported (the share of routed tokens the busiest half of each layer's experts took): on random weights a topic's
prompts need not route alike, so the numbers say what the workload was. Start-up is also measured from a cold page
cache (the checkpoint's pages dropped first), as on a node that has just pulled the model.
Each run is its own process (peak RSS is per process). Table printed; JSON and a plot in bench/results/.

    .venv/bin/python bench/footprint.py [--models mixtral-mid,qwen3-mid,mixtral-deep,qwen3-deep] [--batches 1,8]
        [--tokens 64] [--workloads skewed,uniform]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mid_models import ensure_mid_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (None, 1.0, 0.5, 0.25)  # fraction of the expert bytes; None: every expert resident, no on-demand path
TOPICS = 2
WORDS_PER_TOPIC = 12
WARM_UP_TOKENS = 16


def prompts(workload: str, count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """`count` prompts drawn with `seed`; skewed ones from the same TOPICS whatever the seed (the workload's)."""
    generator = torch.Generator().manual_seed(seed)
    if workload == "uniform":
        return [torch.randint(3, vocab, (length,), generator=generator).tolist() for _ in range(count)]
    topic_generator = torch.Generator().manual_seed(0)
    topics = [torch.randint(3, vocab, (WORDS_PER_TOPIC,), generator=topic_generator) for _ in range(TOPICS)]
    return [topics[i % TOPICS][torch.randint(0, WORDS_PER_TOPIC, (length,), generator=generator)].tolist()
            for i in range(count)]


def child(model_dir: str, budget_bytes: int | None, workload: str, batch: int, tokens: int) -> dict[str, Any]:
    """One run, in this process: start-up, first token, decode at `batch`; peak RSS at the end."""
    from moe_serve.model.resident_experts import OnDemandMoE
    from moe_serve.replicas.engine import EngineConfig, LLMEngine
    from moe_serve.replicas.sampling import SamplingParams

    start = time.perf_counter()
    engine = LLMEngine.from_pretrained(model_dir, EngineConfig(dtype="bfloat16", expert_memory_bytes=budget_bytes,
                                                               kv_cache_bytes=64 << 20, max_num_seqs=batch))
    load_s = time.perf_counter() - start
    vocab = engine.model_config.vocab_size
    first = prompts(workload, 1, 64, vocab, seed=1)
    engine.generate(first, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    first_token_s = time.perf_counter() - start
    greedy = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    # warm-up: the workload's steady state (on-demand experts settle on the workload's hot ones)
    engine.generate(prompts(workload, batch, 64, vocab, seed=2), SamplingParams(max_tokens=WARM_UP_TOKENS,
                                                                                temperature=0.0, ignore_eos=True))
    ids = [engine.add_request(p, greedy) for p in prompts(workload, batch, 64, vocab, seed=3)]
    started: set[str] = set()
    produced, decode_start = 0, None
    while engine.has_unfinished():
        outputs = engine.step()
        if decode_start is not None:
            produced += len(outputs)
        started.update(out.request_id for out in outputs)
        if decode_start is None and started >= set(ids):  # every request past its prefill: decode from here
            decode_start = time.perf_counter()
    decode_s = time.perf_counter() - decode_start
    result = {"load_s": load_s, "first_token_after_start_s": first_token_s, "decode_tok_s": produced / decode_s,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if isinstance(engine.moe, OnDemandMoE):
        stats = engine.moe.experts.stats
        config = engine.model_config
        result.update(loads=stats.loads, evictions=stats.evictions, read_ahead=stats.read_ahead,
                      streamed=stats.streamed,
                      hits=stats.hits, hit_rate=stats.hits / max(1, stats.hits + stats.streamed + stats.loads
                                                                 - 1),  # not the start-up probe
                      peak_expert_mib=stats.peak_bytes / 2**20,
                      all_experts_mib=engine.moe.experts.expert_nbytes * config.num_experts
                      * len(config.moe_layer_ids) / 2**20)
    return result


def startup(model_dir: str, budget_bytes: int | None) -> dict[str, Any]:
    """Start-up from a cold page cache (the checkpoint's pages dropped first, as on a node that has just pulled
    it): load time and time to the first token of a first request, in this process."""
    from moe_serve.replicas.engine import EngineConfig, LLMEngine
    from moe_serve.replicas.sampling import SamplingParams

    for path in Path(model_dir).glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    start = time.perf_counter()
    engine = LLMEngine.from_pretrained(model_dir, EngineConfig(dtype="bfloat16", expert_memory_bytes=budget_bytes,
                                                               kv_cache_bytes=64 << 20, max_num_seqs=1))
    load_s = time.perf_counter() - start
    engine.generate(prompts("skewed", 1, 64, engine.model_config.vocab_size, seed=1),
                    SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    return {"cold_load_s": load_s, "cold_first_token_s": time.perf_counter() - start}


def routing_skew(model_dir: str, workload: str, batch: int, tokens: int) -> float:
    """Share of routed tokens the busiest half of each layer's experts took, over the run's prompts and decode."""
    from moe_serve.model.resident_experts import OnDemandMoE
    from moe_serve.replicas.engine import EngineConfig, LLMEngine
    from moe_serve.replicas.sampling import SamplingParams

    engine = LLMEngine.from_pretrained(model_dir, EngineConfig(dtype="bfloat16", expert_memory_bytes=2**40,
                                                               kv_cache_bytes=64 << 20, max_num_seqs=batch))
    assert isinstance(engine.moe, OnDemandMoE)
    engine.generate(prompts(workload, batch, 64, engine.model_config.vocab_size, seed=3),
                    SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    usage: dict[int, list[float]] = {}
    for (layer, _), count in engine.moe.experts.usage().items():
        usage.setdefault(layer, []).append(count)
    shares = []
    for layer, counts in usage.items():
        counts = sorted(counts + [0.0] * (engine.model_config.num_experts - len(counts)), reverse=True)
        shares.append(sum(counts[: len(counts) // 2]) / max(sum(counts), 1e-9))
    return sum(shares) / len(shares)


def run_child(args: list[str], flag: str = "--child") -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, flag, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mixtral-mid,qwen3-mid,mixtral-deep,qwen3-deep")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--workloads", default="skewed,uniform")
    parser.add_argument("--child", nargs=5, metavar=("MODEL_DIR", "BUDGET", "WORKLOAD", "BATCH", "TOKENS"))
    parser.add_argument("--skew", nargs=4, metavar=("MODEL_DIR", "WORKLOAD", "BATCH", "TOKENS"))
    parser.add_argument("--startup", nargs=2, metavar=("MODEL_DIR", "BUDGET"))
    parser.add_argument("--out", default=str(RESULTS / "footprint.json"))
    args = parser.parse_args()
    if args.child:
        model_dir, budget, workload, batch, tokens = args.child
        print(json.dumps(child(model_dir, None if budget == "none" else int(budget), workload, int(batch),
                               int(tokens))))
        return
    if args.startup:
        model_dir, budget = args.startup
        print(json.dumps(startup(model_dir, None if budget == "none" else int(budget))))
        return
    if args.skew:
        model_dir, workload, batch, tokens = args.skew
        print(json.dumps({"skew": routing_skew(model_dir, workload, int(batch), int(tokens))}))
        return
    rows, starts = [], []
    for name in args.models.split(","):
        model_dir = str(ensure_mid_model(name))
        expert_bytes = run_child([model_dir, str(2**40), "uniform", "1", "2"])["all_experts_mib"] * 2**20
        for fraction in BUDGETS:
            budget = "none" if fraction is None else str(int(expert_bytes * fraction))
            starts.append({"model": name, "budget_fraction": fraction,
                           **run_child([model_dir, budget], flag="--startup")})
            print(_start_row(starts[-1]), flush=True)
        for workload in args.workloads.split(","):
            for batch in map(int, args.batches.split(",")):
                skew = run_child([model_dir, workload, str(batch), str(args.tokens)], "--skew")["skew"]
                for fraction in BUDGETS:
                    budget = "none" if fraction is None else str(int(expert_bytes * fraction))
                    result = run_child([model_dir, budget, workload, str(batch), str(args.tokens)])
                    rows.append({"model": name, "workload": workload, "batch": batch, "routing_skew": skew,
                                 "budget_fraction": fraction, "expert_mib": expert_bytes / 2**20, **result})
                    print(_row(rows[-1]), flush=True)
    summary = _summary(rows, starts)
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": torch.get_num_threads(), "batches": args.batches,
            "tokens": args.tokens, "dtype": "bfloat16"}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "startup": starts, "summary": summary},
                                         indent=1))
    print(json.dumps(summary, indent=1))
    _plot(rows, Path(args.out).with_suffix(".png"))


def _row(row: dict[str, Any]) -> str:
    budget = "all (no on-demand)" if row["budget_fraction"] is None else f"{row['budget_fraction']:.0%}"
    extra = (f" loads {row['loads']} evictions {row['evictions']} streamed {row['streamed']} hit {row['hit_rate']:.2f}"
             if "loads" in row else "")
    return (f"{row['model']:12} {row['workload']:8} batch {row['batch']} skew {row['routing_skew']:.2f} "
            f"budget {budget:19} "
            f"load {row['load_s']:5.2f} s first token {row['first_token_after_start_s']:5.2f} s "
            f"decode {row['decode_tok_s']:7.1f} tok/s peak RSS {row['peak_rss_mib']:7.0f} MiB{extra}")


def _start_row(row: dict[str, Any]) -> str:
    budget = "all (no on-demand)" if row["budget_fraction"] is None else f"{row['budget_fraction']:.0%}"
    return (f"{row['model']:12} cold start, budget {budget:19} load {row['cold_load_s']:5.2f} s "
            f"first token {row['cold_first_token_s']:5.2f} s")


def _summary(rows: list[dict[str, Any]], starts: list[dict[str, Any]]) -> dict[str, Any]:
    """Against the ordinary engine of the same model and workload: decode and peak RSS ratios, and first token after
    start-up (warm and cold page cache) over the ordinary engine's load time."""
    out: dict[str, Any] = {}
    for row in starts:
        base = next(r for r in starts if r["model"] == row["model"] and r["budget_fraction"] is None)
        if row["budget_fraction"] is not None:
            out[f"{row['model']} cold start {row['budget_fraction']:.0%}"] = {
                "first_token_after_start_vs_all_load": row["cold_first_token_s"] / base["cold_load_s"]}
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["workload"] == row["workload"]
                    and r["batch"] == row["batch"] and r["budget_fraction"] is None)
        if row["budget_fraction"] is None:
            continue
        key = f"{row['model']} {row['workload']} batch {row['batch']} {row['budget_fraction']:.0%}"
        out[key] = {"decode_vs_all": row["decode_tok_s"] / base["decode_tok_s"],
                    "peak_rss_vs_all": row["peak_rss_mib"] / base["peak_rss_mib"],
                    "first_token_after_start_vs_all_load": row["first_token_after_start_s"] / base["load_s"]}
    return out


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib missing (pip install matplotlib==3.11.2): no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.5 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for (workload, batch), marker in zip(sorted({(r["workload"], r["batch"]) for r in rows}), "osv^"):
            points = [r for r in rows if r["model"] == model and r["workload"] == workload and r["batch"] == batch]
            labels = ["all" if r["budget_fraction"] is None else f"{r['budget_fraction']:.0%}" for r in points]
            label = f"{workload}, batch {batch}"
            axes[i][0].plot(labels, [r["decode_tok_s"] for r in points], marker=marker, label=label)
            axes[i][1].plot(labels, [r["peak_rss_mib"] for r in points], marker=marker, label=label)
        axes[i][0].set(title=f"{model}: decode tok/s by expert budget", ylabel="tok/s")
        axes[i][1].set(title=f"{model}: peak RSS by expert budget", ylabel="MiB")
        for ax in axes[i]:
            ax.legend()
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
