"""How much each expert of a model is used on a set of prompts, measured with this project's own model code.

`PromptRunner` loads a checkpoint with the in-process loader and runs one prompt at a time as a single prefill
(every position's logits, no engine, no sampling). While it counts, its MoE backend is wrapped in `UsageRecorder`,
which computes each MoE layer's routing with the family's `Gate` (the rule every MoE path follows) and records it
before handing the hidden states to the real experts, so the counts are those of the model as served.
Owns counting and the prompt runner; deciding what to prune and writing checkpoints are prune.py's.
Shape legend: T = prompt tokens, D = hidden, E = experts, A = top-k, V = vocab, L = MoE layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_serve.model.attention import AttentionBatch, PrefillChunk
from moe_serve.model.config import ModelConfig
from moe_serve.model.loader import load_local_model
from moe_serve.model.transformer import DenseModel, MoEBackend
from moe_serve.router.gate import Gate


@dataclass
class ExpertUsage:
    """Per MoE layer and expert: tokens routed (top-k hits) and gate probability mass (the softmax over all
    experts, summed over tokens)."""

    layers: list[int]  # MoE layer ids, the rows of the arrays
    tokens: np.ndarray  # [L, E] int64
    mass: np.ndarray  # [L, E] float64

    @classmethod
    def empty(cls, layers: Sequence[int], num_experts: int) -> ExpertUsage:
        return cls(list(layers), np.zeros((len(layers), num_experts), np.int64),
                   np.zeros((len(layers), num_experts), np.float64))

    def record(self, layer: int, expert_ids: torch.Tensor, probs: torch.Tensor) -> None:
        """expert_ids [T, A], probs [T, E] of one call of MoE layer `layer`."""
        row = self.layers.index(layer)
        self.tokens[row] += np.bincount(expert_ids.flatten().numpy(), minlength=self.tokens.shape[1])
        self.mass[row] += probs.double().sum(0).numpy()


class UsageRecorder:
    """An MoE backend that records each call's routing into `usage` while `recording`, then delegates."""

    def __init__(self, inner: MoEBackend, gates: dict[int, Gate], usage: ExpertUsage) -> None:
        self.inner = inner
        self.gates = gates
        self.usage = usage
        self.recording = False

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.recording:
            gate = self.gates[layer]
            logits = gate.logits(hidden)  # [T, E] float32
            self.usage.record(layer, gate.route(logits).expert_ids, torch.softmax(logits, dim=-1))
        return self.inner(layer, hidden)


class PromptRunner:
    """One checkpoint loaded in-process in `dtype`; prompts run one at a time as one prefill chunk."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype) -> None:
        loaded = load_local_model(model_dir, dtype=dtype)
        self.config: ModelConfig = loaded.config
        self.dense: DenseModel = loaded.dense
        self.usage = ExpertUsage.empty(self.config.moe_layer_ids, self.config.num_experts)
        self.moe = UsageRecorder(loaded.moe, loaded.moe.gates, self.usage)

    def logits(self, prompt: Sequence[int]) -> torch.Tensor:
        """Next-token logits [T, V] float32 at every position of `prompt`."""
        cfg, t = self.config, len(prompt)
        positions = torch.arange(t)
        batch = AttentionBatch(positions, positions, 0, None, None, [PrefillChunk(0, t, positions, positions)],
                               dtype=self.dense.dtype)
        kv_cache = [torch.zeros(t, 2, cfg.num_kv_heads, cfg.head_dim, dtype=self.dense.dtype)
                    for _ in range(cfg.num_layers)]
        return self.dense.forward(torch.tensor(list(prompt)), batch, kv_cache, self.moe, None)

    def measure(self, prompts: Iterable[Sequence[int]]) -> ExpertUsage:
        """Usage over every token of `prompts`, added to what was measured before (`self.usage`)."""
        self.moe.recording = True
        try:
            for prompt in prompts:
                self.logits(prompt)
        finally:
            self.moe.recording = False
        return self.usage
