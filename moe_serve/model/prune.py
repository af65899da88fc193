"""Expert pruning from measured load: keep the K most used experts of every MoE layer and write an ordinary Hugging Face
checkpoint with K experts, with a quality report against the full model.

Steps (`prune` runs them all; a benchmark may run `measure` once and the rest per setting):
1. `measure`: the full model (this project's loader and model code) runs the calibration prompts, counting tokens
   routed to each expert (top-k hits) and the gate probability mass each gets, per MoE layer; then it keeps the
   next-token log-probabilities of every position of the held-out prompts;
2. `plan_pruning`: without `per_layer` the same experts in every layer, ranked by usage summed over the layers;
   with it each layer's own top K. Ranked by tokens routed, ties by gate mass, then by id; kept ids stay in their
   original order and become 0..K-1;
3. `write_pruned_checkpoint` (pruned_checkpoint.py);
4. `compare`: the pruned checkpoint, loaded as any other, on the held-out prompts: mean KL(full || pruned) of the
   next-token distribution over every position, and greedy agreement, the fraction of positions where both models'
   most likely next token is the same (teacher-forced on the prompt, so every position counts once).
Calibration prompts: lines of a text file, or random token ids for models without a tokenizer. Random prompts are a
poor calibration set: real text routes unevenly, random ids exercise the router close to uniformly.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moe_serve.model.config import ModelConfig
from moe_serve.model.dtype import dtype_name
from moe_serve.model.expert_usage import ExpertUsage, PromptRunner
from moe_serve.model.pruned_checkpoint import MAX_SHARD_BYTES, WrittenBytes, write_pruned_checkpoint
from moe_serve.model.tokenizer import Tokenizer

HELD_OUT_EVERY = 5  # --calibration: every 5th non-blank line is held out for the quality report
REPORT_FILE = "pruning.json"  # written beside the pruned checkpoint


@dataclass(frozen=True)
class PromptSet:
    source: str  # "file" or "random"
    calibration: list[list[int]]
    evaluation: list[list[int]]  # held out: never counted


@dataclass(frozen=True)
class Measurement:
    usage: ExpertUsage
    reference: list[torch.Tensor]  # per evaluation prompt: the full model's log-probabilities [T, V]


def check_keep(config: ModelConfig, keep: int) -> None:
    """ValueError naming the problem unless 1 <= top_k <= keep <= num_experts."""
    if keep < 1:
        raise ValueError(f"--keep-experts must be at least 1, got {keep}")
    if keep > config.num_experts:
        raise ValueError(f"--keep-experts {keep} is more than the model's {config.num_experts} experts per layer")
    if keep < config.top_k:
        raise ValueError(f"--keep-experts {keep} is fewer than the {config.top_k} experts each token is routed to "
                         f"(num_experts_per_tok)")


def check_dirs(model_dir: Path, out_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: no such model directory")
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"OUT_DIR {out_dir} is the model directory: write the pruned model elsewhere")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"OUT_DIR {out_dir} exists and is not an empty directory")


def prompts_from_file(path: Path, tokenizer: Tokenizer | None, max_tokens: int, eval_prompts: int) -> PromptSet:
    """One prompt per non-blank line, cut to `max_tokens`; every HELD_OUT_EVERY-th line is held out, the first
    `eval_prompts` of those evaluated."""
    if tokenizer is None:
        raise ValueError("--calibration needs a tokenizer, and this model has no tokenizer.json: use --prompts N")
    if not path.is_file():
        raise ValueError(f"calibration file {path}: not found")
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"calibration file {path} is empty: it needs one prompt per line")
    held_out = [line for i, line in enumerate(lines) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    if eval_prompts and not held_out:
        raise ValueError(f"calibration file {path} has {len(lines)} prompt(s); every {HELD_OUT_EVERY}th line is "
                         f"held out for the quality report, so give at least {HELD_OUT_EVERY} (or --eval-prompts 0)")
    calibration = [line for i, line in enumerate(lines) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]

    def encode(texts: list[str]) -> list[list[int]]:
        return [ids[:max_tokens] for ids in map(tokenizer.encode, texts) if ids]

    return PromptSet("file", encode(calibration), encode(held_out[:eval_prompts]))


def random_prompt_set(count: int, eval_prompts: int, length: int, vocab_size: int, seed: int) -> PromptSet:
    """`count` calibration and `eval_prompts` held-out prompts of `length` uniform token ids, drawn one after the
    other from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab_size, (count + eval_prompts, length), generator=generator).tolist()
    return PromptSet("random", prompts[:count], prompts[count:])


def measure(model_dir: Path, prompts: PromptSet, dtype: torch.dtype) -> Measurement:
    """Usage over the calibration prompts and the reference log-probabilities of the held-out ones, with the
    full model loaded once (and released before returning)."""
    runner = PromptRunner(model_dir, dtype)
    usage = runner.measure(prompts.calibration)
    reference = [torch.log_softmax(runner.logits(prompt), dim=-1) for prompt in prompts.evaluation]
    return Measurement(usage, reference)


def plan_pruning(usage: ExpertUsage, keep: int, per_layer: bool) -> dict[int, list[int]]:
    """MoE layer -> the `keep` experts it keeps (original ids, ascending)."""
    if not per_layer:
        shared = _top(usage.tokens.sum(0), usage.mass.sum(0), keep)
        return {layer: shared for layer in usage.layers}
    return {layer: _top(usage.tokens[row], usage.mass[row], keep) for row, layer in enumerate(usage.layers)}


def _top(tokens: np.ndarray, mass: np.ndarray, keep: int) -> list[int]:
    ranked = sorted(range(len(tokens)), key=lambda e: (-int(tokens[e]), -float(mass[e]), e))
    return sorted(ranked[:keep])


def compare(pruned_dir: Path, evaluation: Sequence[Sequence[int]], reference: Sequence[torch.Tensor],
            dtype: torch.dtype) -> dict[str, Any]:
    """Mean KL(full || pruned) per position and greedy agreement of the pruned checkpoint on the held-out prompts."""
    runner = PromptRunner(pruned_dir, dtype)
    kl_sum = agree = positions = 0.0
    for prompt, full in zip(evaluation, reference, strict=True):
        pruned = torch.log_softmax(runner.logits(prompt), dim=-1)
        kl_sum += float(F.kl_div(pruned, full, reduction="sum", log_target=True))
        agree += int((pruned.argmax(-1) == full.argmax(-1)).sum())
        positions += len(prompt)
    return {"eval_prompts": len(evaluation), "eval_positions": int(positions),
            "kl_mean": kl_sum / positions, "greedy_agreement": agree / positions}


def usage_report(usage: ExpertUsage, kept: dict[int, list[int]]) -> list[dict[str, Any]]:
    """Per MoE layer: tokens and gate mass of each kept and each dropped expert, and the kept shares."""
    layers = []
    for row, layer in enumerate(usage.layers):
        tokens, mass = usage.tokens[row], usage.mass[row]

        def experts(ids: list[int]) -> list[dict[str, Any]]:
            return [{"expert": e, "tokens": int(tokens[e]), "mass": round(float(mass[e]), 4)} for e in ids]

        dropped = [e for e in range(len(tokens)) if e not in kept[layer]]
        layers.append({
            "layer": layer,
            "kept_token_share": round(float(tokens[kept[layer]].sum() / max(tokens.sum(), 1)), 4),
            "kept_mass_share": round(float(mass[kept[layer]].sum() / max(mass.sum(), 1e-30)), 4),
            "kept": experts(kept[layer]),
            "dropped": experts(dropped),
        })
    return layers


def prune(model_dir: Path, out_dir: Path, keep: int, per_layer: bool, prompts: PromptSet, dtype: torch.dtype,
          max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, Any]:
    """The whole command: measure, plan, write into `out_dir` (all or nothing), compare; the report is returned and
    written to OUT_DIR/pruning.json. Arguments are checked first (check_dirs, check_keep)."""
    config = ModelConfig.from_dir(model_dir)
    check_dirs(model_dir, out_dir)
    check_keep(config, keep)
    measured = measure(model_dir, prompts, dtype)
    kept = plan_pruning(measured.usage, keep, per_layer)
    staging = out_dir.parent / f".{out_dir.name}.pruning-{os.getpid()}"
    try:
        written = write_pruned_checkpoint(model_dir, staging, kept, max_shard_bytes)
        os.replace(staging, out_dir)  # onto an empty directory too
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    quality = compare(out_dir, prompts.evaluation, measured.reference, dtype) if prompts.evaluation else None
    report = {
        "model_dir": str(model_dir), "out_dir": str(out_dir), "family": config.family,
        "num_experts": config.num_experts, "keep_experts": keep, "top_k": config.top_k, "per_layer": per_layer,
        "dtype": dtype_name(dtype),
        "calibration": {"source": prompts.source, "prompts": len(prompts.calibration),
                        "tokens": sum(map(len, prompts.calibration))},
        "quality": quality,
        "bytes": _bytes_report(written),
        "layers": usage_report(measured.usage, kept),
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _bytes_report(written: WrittenBytes) -> dict[str, int]:
    return {"checkpoint_before": written.checkpoint_before, "checkpoint_after": written.checkpoint_after,
            "saved": written.checkpoint_before - written.checkpoint_after,
            "experts_before": written.experts_before, "experts_after": written.experts_after}
