"""Quality of expert pruning (`moe-serve prune`) on the mid-size models: KL(full || pruned) of the next-token
distribution and greedy agreement on held-out prompts, and bytes saved, at K = 75% and 50% of the experts.

Owns: the sweep, bench/results/prune_quality.json and bench/results/prune_quality.png. Runs the steps of
`moe_serve.model.prune.prune` itself so the full model is measured once per calibration set and pruned eight ways:
K in (75%, 50% of E) x selection in (global: the same experts in every layer; per-layer; and, as a yardstick, a
seeded random pick of K experts, the same in every layer).
Two calibration sets, each with held-out prompts drawn the same way:
- random: uniform token ids over the whole vocabulary (what `--prompts N` does);
- topics: every prompt draws from one of a few small disjoint ranges of token ids, so routing is skewed the way a
  narrow domain skews it, and the held-out prompts share the calibration's topics.
The weights are random (the mid models have no training), so routing is close to uniform and any pruning moves the
logits a lot: read the numbers side by side, not as what a trained model would lose.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_serve.model.config import ModelConfig
from moe_serve.model.dtype import dtype_name, resolve_dtype
from moe_serve.model.prune import Measurement, PromptSet, compare, measure, plan_pruning, random_prompt_set
from moe_serve.model.pruned_checkpoint import write_pruned_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mid_models import ensure_mid_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("mixtral-mid", "qwen3-mid")
SELECTIONS = ("global", "per-layer", "random-pick")
TOPICS = 4
IDS_PER_TOPIC = 16


def topic_prompt_set(count: int, eval_prompts: int, length: int, vocab_size: int, seed: int) -> PromptSet:
    """Prompt i draws `length` ids from topic i % TOPICS, a range of IDS_PER_TOPIC ids (ranges spread over the
    vocabulary, disjoint); held-out prompts are later draws of the same generator."""
    generator = torch.Generator().manual_seed(seed)
    starts = [(t + 1) * vocab_size // (TOPICS + 1) for t in range(TOPICS)]
    prompts = [(starts[i % TOPICS] + torch.randint(0, IDS_PER_TOPIC, (length,), generator=generator)).tolist()
               for i in range(count + eval_prompts)]
    return PromptSet("topics", prompts[:count], prompts[count:])


def kept_experts(measured: Measurement, keep: int, selection: str, seed: int) -> dict[int, list[int]]:
    if selection == "random-pick":
        pick = sorted(random.Random(seed).sample(range(measured.usage.tokens.shape[1]), keep))
        return {layer: pick for layer in measured.usage.layers}
    return plan_pruning(measured.usage, keep, per_layer=selection == "per-layer")


def kept_token_share(measured: Measurement, kept: dict[int, list[int]]) -> float:
    """Share of the calibration's top-k hits that land on kept experts, mean over MoE layers."""
    tokens = measured.usage.tokens
    return float(np.mean([tokens[row, kept[layer]].sum() / tokens[row].sum()
                          for row, layer in enumerate(measured.usage.layers)]))


def full_entropy(measured: Measurement) -> float:
    """Mean entropy (nats) of the full model's next-token distribution on the held-out prompts: near log(V), the
    distribution is flat and its argmax close to a tie."""
    logp = torch.cat(measured.reference)
    return float(-(logp.exp() * logp).sum(-1).mean())


def run_model(name: str, args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    model_dir = ensure_mid_model(name)
    config = ModelConfig.from_dir(model_dir)
    dtype = resolve_dtype("auto", model_dir)
    rows = []
    for make_prompts in (random_prompt_set, topic_prompt_set):
        prompts = make_prompts(args.calibration_prompts, args.eval_prompts, args.prompt_tokens, config.vocab_size,
                               args.seed)
        start = time.perf_counter()
        measured = measure(model_dir, prompts, dtype)
        measure_s = time.perf_counter() - start
        entropy = full_entropy(measured)
        for keep in (config.num_experts * 3 // 4, config.num_experts // 2):
            for selection in SELECTIONS:
                kept = kept_experts(measured, keep, selection, args.seed)
                out = scratch / f"{name}-{prompts.source}-{keep}-{selection}"
                start = time.perf_counter()
                written = write_pruned_checkpoint(model_dir, out, kept)
                write_s = time.perf_counter() - start
                quality = compare(out, prompts.evaluation, measured.reference, dtype)
                shutil.rmtree(out)
                rows.append({
                    "model": name, "dtype": dtype_name(dtype), "experts": config.num_experts, "top_k": config.top_k,
                    "calibration": prompts.source, "keep": keep, "selection": selection,
                    "kl_mean": round(quality["kl_mean"], 4), "greedy_agreement": round(quality["greedy_agreement"], 4),
                    "eval_positions": quality["eval_positions"], "full_entropy": round(entropy, 3),
                    "kept_token_share": round(kept_token_share(measured, kept), 4),
                    "checkpoint_bytes_before": written.checkpoint_before,
                    "checkpoint_bytes_after": written.checkpoint_after,
                    "bytes_saved": written.checkpoint_before - written.checkpoint_after,
                    "expert_bytes_before": written.experts_before, "expert_bytes_after": written.experts_after,
                    "measure_s": round(measure_s, 1), "write_s": round(write_s, 1),
                })
                print_row(rows[-1])
    return rows


HEADER = f"{'model':<12} {'calib':<7} {'K/E':>6} {'selection':<11} {'KL':>8} {'agree':>6} {'kept hits':>9} " \
         f"{'ckpt MB':>15} {'saved':>6}"


def print_row(row: dict[str, Any]) -> None:
    before, after = row["checkpoint_bytes_before"] / 2**20, row["checkpoint_bytes_after"] / 2**20
    print(f"{row['model']:<12} {row['calibration']:<7} {row['keep']:>3}/{row['experts']:<2} {row['selection']:<11} "
          f"{row['kl_mean']:>8.4f} {row['greedy_agreement']:>6.3f} {row['kept_token_share']:>9.3f} "
          f"{before:>7.0f}->{after:<7.0f} {row['bytes_saved'] / row['checkpoint_bytes_before']:>6.1%}", flush=True)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 7), squeeze=False)
    for col, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        groups = list(dict.fromkeys((r["calibration"], r["keep"]) for r in mine))
        x = np.arange(len(groups))
        for metric, ax in zip(("kl_mean", "greedy_agreement"), axes[:, col]):
            for offset, selection in enumerate(SELECTIONS):
                values = [next(r[metric] for r in mine if (r["calibration"], r["keep"]) == g
                               and r["selection"] == selection) for g in groups]
                ax.bar(x + (offset - 1) * 0.27, values, 0.27, label=selection)
            ax.set_xticks(x, [f"{calib}\nK={keep}/{mine[0]['experts']}" for calib, keep in groups])
            ax.set_ylabel({"kl_mean": "mean KL(full || pruned), nats", "greedy_agreement": "greedy agreement"}[metric])
            ax.set_title(f"{model} ({mine[0]['dtype']}, top-{mine[0]['top_k']}, random weights)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--calibration-prompts", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(HEADER)
    with tempfile.TemporaryDirectory(prefix="prune-bench-") as scratch:
        rows = [row for name in args.models for row in run_model(name, args, Path(scratch))]
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "settings": {**vars(args), "topics": TOPICS, "ids_per_topic": IDS_PER_TOPIC,
                     "full_entropy": "mean entropy of the full model's next-token distribution (log V = uniform)",
                     "kl": "mean over every position of the held-out prompts of KL(full || pruned), nats",
                     "greedy_agreement": "fraction of positions where both models' argmax next token is the same"},
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, RESULTS / "prune_quality.png")


if __name__ == "__main__":
    main()
