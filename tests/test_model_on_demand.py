"""Experts loaded on demand under a memory budget (moe_serve/model/resident_experts.py), in-process and on shards:
the same greedy tokens as with every expert resident, on every family and with both kernel paths; resident bytes
within the budget at every step; loads and evictions counted; a budget too small for one layer refused."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import random_prompts

from moe_serve.cli import parse_bytes
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.config import ModelConfig
from moe_serve.model import resident_experts
from moe_serve.model.resident_experts import OnDemandMoE, ResidentExperts
from moe_serve.replicas.engine import EngineConfig, LLMEngine
from moe_serve.replicas.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
_LIBC = ctypes.CDLL(None, use_errno=True)
FAMILIES = ["mixtral_dir", "qwen2_dir", "qwen3_dir", "olmoe_dir"]


def expert_bytes(model_dir: Path) -> tuple[int, int]:
    """(bytes of one expert as held, experts of the whole model)."""
    probe = LLMEngine.from_pretrained(model_dir, EngineConfig(expert_memory_bytes=2**40))
    assert isinstance(probe.moe, OnDemandMoE)
    resident = probe.moe.experts
    config = probe.model_config
    return resident.resident_bytes, config.num_experts * len(config.moe_layer_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_quarter_budget_gives_the_same_tokens_and_never_passes_it(family: str, kernels: str,
                                                                   request: pytest.FixtureRequest,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = request.getfixturevalue(family)
    # an expert used more than a resident one takes its place at once: loads, evictions and streaming all run
    monkeypatch.setattr(resident_experts, "SWAP_LEAD", 0.0)
    prompts = random_prompts([21, 34, 9, 17], 256, seed=3)
    expected = [o.token_ids for o in LLMEngine.from_pretrained(model_dir).generate(prompts, GREEDY)]
    per_expert, experts = expert_bytes(model_dir)
    budget = per_expert * experts // 4
    engine = LLMEngine.from_pretrained(model_dir, EngineConfig(expert_memory_bytes=budget))
    assert isinstance(engine.moe, OnDemandMoE)
    resident = engine.moe.experts
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    while engine.has_unfinished():
        engine.step()
        assert resident.resident_bytes <= budget
    assert [engine.pop_result(i).token_ids for i in ids] == expected
    stats = resident.stats
    assert stats.peak_bytes <= budget and stats.evictions > 0 and stats.streamed > 0
    assert stats.loads == stats.evictions + resident.resident_bytes // per_expert


def budgeted(model_dir: Path, experts: int) -> tuple[ResidentExperts, Callable[..., torch.Tensor]]:
    """ResidentExperts of `model_dir` with room for `experts` experts, and a call running it on random rows."""
    config = ModelConfig.from_dir(model_dir)
    per_expert, _ = expert_bytes(model_dir)
    resident = ResidentExperts(Checkpoint(model_dir, config), budget_bytes=experts * per_expert)

    def run(layer: int, ids: list[int], counts: list[int], on: ResidentExperts = resident) -> torch.Tensor:
        rows = torch.randn(sum(counts), config.hidden_size, generator=torch.Generator().manual_seed(sum(ids)))
        return on.run(layer, rows, ids, counts)

    return resident, run


def test_experts_not_worth_a_swap_run_from_the_checkpoint(mixtral_dir: Path) -> None:
    experts, run = budgeted(mixtral_dir, 4)  # 2 layers: a share of 2 experts each; the probe holds (0, 0)
    run(1, [4, 5], [10, 10])  # layer 1 below its share: both loaded
    out = run(1, [6], [3])  # not 16 tokens more than 4 or 5 (10): streamed, nothing evicted
    assert experts.resident(1) == [4, 5] and experts.stats.streamed == 1 and experts.stats.evictions == 0
    unlimited = ResidentExperts(Checkpoint(mixtral_dir, ModelConfig.from_dir(mixtral_dir)))
    torch.testing.assert_close(out, run(1, [6], [3], on=unlimited), rtol=1e-5, atol=1e-5)
    run(1, [6], [24])  # 27: loaded in place of the least used (4 and 5 tie: the lower key)
    assert experts.resident(1) == [5, 6] and experts.stats.evictions == 1


def test_an_expert_given_a_prefill_chunk_runs_from_the_checkpoint_and_loads_later(mixtral_dir: Path) -> None:
    experts, run = budgeted(mixtral_dir, 4)
    run(1, [4], [resident_experts.ADMIT_MAX_ROWS + 1])  # room for it, but as many rows as a prefill chunk
    assert experts.resident(1) == [] and experts.stats.streamed == 1
    run(1, [4], [1])  # a decode step: loaded
    assert experts.resident(1) == [4]


def test_a_layer_at_its_share_leaves_the_room_other_layers_need(mixtral_dir: Path) -> None:
    experts, run = budgeted(mixtral_dir, 4)
    run(0, [0, 1, 2], [5, 4, 3])  # 0 and 1 fill layer 0's share; the room left is layer 1's
    assert experts.resident(0) == [0, 1] and experts.stats.streamed == 1
    run(1, [4, 5, 6], [3, 3, 3])
    assert experts.resident(1) == [4, 5] and experts.resident(0) == [0, 1]


def test_a_layer_above_its_share_gives_way_to_a_much_more_used_expert(
        mixtral_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resident_experts, "DECAY_CALLS", 1)  # every call of a layer halves its usage first
    experts, run = budgeted(mixtral_dir, 5)  # shares of 2, and one expert of room neither layer's share needs
    run(0, [0, 1, 2], [30, 30, 30])  # layer 0 takes its share and the spare room
    run(1, [4, 5, 6], [30, 20, 24])  # 4 and 6 fill layer 1's share; 5 (20) is not worth one of layer 0's (30)
    assert experts.resident(0) == [0, 1, 2] and experts.resident(1) == [4, 6]
    for _ in range(3):
        run(0, [0], [1])  # layer 0 halves three times: 0 -> 5.5, 1 and 2 -> 3.75
    run(1, [5], [12])  # halved to 10, then 22: more than 3.75 + 16, so it takes the place of layer 0's 1
    assert experts.resident(0) == [0, 2] and experts.resident(1) == [4, 5, 6]


def test_the_next_layers_likely_experts_are_read_ahead_into_the_page_cache(mixtral_dir: Path) -> None:
    experts, run = budgeted(mixtral_dir, 2)  # a share of 1 expert a layer
    run(1, [3], [5])  # 3 loaded
    path = next(mixtral_dir.glob("*.safetensors"))
    names = [f"model.layers.1.block_sparse_moe.experts.4.{w}.weight" for w in ("w1", "w2", "w3")]
    drop_page_cache(path)
    if all(in_page_cache(path, name) for name in names):
        pytest.skip("the page cache keeps this file (tmpfs?): read-ahead cannot be seen")
    assert experts.read_ahead(1, [3, 4]) == 1 and experts.stats.read_ahead == 1  # 3 is resident: only 4 is read
    deadline = time.monotonic() + 60  # the kernel reads in the background: wait for it, however slow the disk
    while not all(in_page_cache(path, name) for name in names):
        assert time.monotonic() < deadline, "expert 4's pages never reached the page cache"
        time.sleep(0.05)
    assert experts.read_ahead(1, [3, 4]) == 0  # read lately: most likely still cached


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # a file just written has dirty pages, which stay cached until written back
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def in_page_cache(path: Path, name: str) -> bool:
    """Whether every page of tensor `name` of the safetensors file `path` is in the page cache (mincore)."""
    with open(path, "rb") as file:
        (header_len,) = struct.unpack("<Q", file.read(8))
        start, end = (8 + header_len + offset for offset in json.loads(file.read(header_len))[name]["data_offsets"])
        first = start // mmap.PAGESIZE * mmap.PAGESIZE
        pages = (ctypes.c_ubyte * -(-(end - first) // mmap.PAGESIZE))()
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as mapping:
            anchor = ctypes.c_char.from_buffer(mapping)
            status = _LIBC.mincore(ctypes.c_void_p(ctypes.addressof(anchor) + first), ctypes.c_size_t(end - first),
                                   pages)
            del anchor  # the mapping closes only once nothing points into it
    assert status == 0, f"mincore failed: errno {ctypes.get_errno()}"
    return all(page & 1 for page in pages)


def test_an_unlimited_budget_loads_each_expert_once(mixtral_dir: Path) -> None:
    per_expert, experts = expert_bytes(mixtral_dir)
    engine = LLMEngine.from_pretrained(mixtral_dir, EngineConfig(expert_memory_bytes=per_expert * experts))
    engine.generate(random_prompts([40, 40, 40, 40], 256, seed=4), GREEDY)
    engine.generate(random_prompts([40, 40, 40, 40], 256, seed=5), GREEDY)
    stats = engine.moe.experts.stats
    assert stats.evictions == 0 and stats.loads <= experts and stats.hits > 0


def test_a_budget_under_one_layers_top_k_experts_is_refused(mixtral_dir: Path) -> None:
    per_expert, _ = expert_bytes(mixtral_dir)
    with pytest.raises(ValueError, match=r"smaller than one layer's top-2 experts"):
        LLMEngine.from_pretrained(mixtral_dir, EngineConfig(expert_memory_bytes=2 * per_expert - 1))
    with pytest.raises(ValueError, match="expert_memory_bytes must be positive"):
        EngineConfig(expert_memory_bytes=0)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_experts_on_demand(mixtral_dir: Path, quantize: str) -> None:
    prompts = random_prompts([20, 30], 256, seed=6)
    config = EngineConfig(quantize=quantize)
    expected = [o.token_ids for o in LLMEngine.from_pretrained(mixtral_dir, config).generate(prompts, GREEDY)]
    full = LLMEngine.from_pretrained(mixtral_dir, EngineConfig(quantize=quantize, expert_memory_bytes=2**40))
    per_expert = full.moe.experts.resident_bytes
    engine = LLMEngine.from_pretrained(mixtral_dir, EngineConfig(quantize=quantize, expert_memory_bytes=4 * per_expert))
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
    assert engine.moe.experts.stats.peak_bytes <= 4 * per_expert


def test_the_cli_generates_the_same_under_expert_memory(tiny_model_dir: Path) -> None:
    def generate(*extra: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "moe_serve.cli", "generate", str(tiny_model_dir), "--prompt",
                              "The router sends", "--max-tokens", "6", *extra], capture_output=True, text=True,
                             timeout=300, check=False)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert generate("--expert-memory", "256K")["token_ids"] == generate()["token_ids"]  # 2 of its 16 experts
    refused = subprocess.run([sys.executable, "-m", "moe_serve.cli", "generate", str(tiny_model_dir), "--prompt", "x",
                              "--expert-memory", "lots"], capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 2 and "not a byte count: 'lots'" in refused.stderr


@pytest.mark.parametrize(("text", "expected"), [("1048576", 2**20), ("512K", 512 * 2**10), ("1.5G", 3 * 2**29),
                                                ("2GiB", 2**31), ("64mb", 64 * 2**20)])
def test_byte_counts(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "-1M", "0", "G", "12Q"])
def test_bad_byte_counts(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)
