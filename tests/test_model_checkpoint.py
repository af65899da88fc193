"""Checkpoint reading: layouts (single, sharded, stacked experts), partial reads, and errors that name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import random_prompts, save_hf_model
from safetensors.torch import load_file, save_file

from moe_serve.model.checkpoint import Checkpoint, CheckpointError
from moe_serve.model.config import ModelConfig, ModelConfigError
from moe_serve.replicas.engine import LLMEngine
from moe_serve.replicas.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def greedy_tokens(model_dir: Path) -> list[int]:
    engine = LLMEngine.from_pretrained(model_dir)
    [prompt] = random_prompts([12], engine.model_config.vocab_size)
    return engine.generate([prompt], GREEDY)[0].token_ids


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    single = save_hf_model(tmp_path_factory.mktemp("single"), "mixtral")
    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(out, max_shard_size="100KB")
    return out


def test_sharded_checkpoint_equals_single_file(mixtral_dir: Path, sharded_dir: Path) -> None:
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("*.safetensors"))) > 2
    assert greedy_tokens(sharded_dir) == greedy_tokens(mixtral_dir)


def test_stacked_expert_layout_equals_per_expert(mixtral_dir: Path, tmp_path: Path) -> None:
    """transformers 5 holds experts stacked ([E, 2I, D] gate_up_proj); such files load the same."""
    tensors = load_file(mixtral_dir / "model.safetensors")
    config = ModelConfig.from_dir(mixtral_dir)
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        experts = range(config.num_experts)
        gate_up = [torch.cat([tensors.pop(f"{prefix}.experts.{e}.w1.weight"),
                              tensors.pop(f"{prefix}.experts.{e}.w3.weight")]) for e in experts]
        down = [tensors.pop(f"{prefix}.experts.{e}.w2.weight") for e in experts]
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = tensors.pop(f"{prefix}.gate.weight")
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(down)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(mixtral_dir / "config.json", tmp_path / "config.json")
    assert greedy_tokens(tmp_path) == greedy_tokens(mixtral_dir)
    assert_expert_views_equal_loads(tmp_path)


def assert_expert_views_equal_loads(model_dir: Path) -> None:
    """`expert_views` (mapped, no copy) give the tensors `load_expert_*` read, before and after their pages are
    given back; in another serving dtype there are no views (loads convert)."""
    config = ModelConfig.from_dir(model_dir)
    checkpoint = Checkpoint(model_dir, config)
    for layer in config.moe_layer_ids:
        for expert in (0, config.num_experts - 1):
            views = checkpoint.expert_views(layer, expert)
            assert views is not None
            loaded = (*checkpoint.load_expert_w13(layer, expert), checkpoint.load_expert_w2(layer, expert))
            assert all(torch.equal(v, w) for v, w in zip(views, loaded, strict=True))
            checkpoint.release(*views)
            assert all(torch.equal(v, w) for v, w in zip(views, loaded, strict=True))  # read again from the cache
    assert Checkpoint(model_dir, config, torch.bfloat16).expert_views(config.moe_layer_ids[0], 0) is None


@pytest.mark.parametrize("family_dir", ["mixtral_dir", "qwen2_dir", "qwen3_dir", "olmoe_dir"])
def test_expert_views_of_every_family(family_dir: str, request: pytest.FixtureRequest) -> None:
    assert_expert_views_equal_loads(request.getfixturevalue(family_dir))


def test_experts_of_one_shard_load_without_the_rest(sharded_dir: Path) -> None:
    """Files holding only other experts are corrupted; loading the requested experts never touches them."""
    config = ModelConfig.from_dir(sharded_dir)
    weight_map = json.loads((sharded_dir / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    needed = {weight_map[f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"] for e in (0,) for w in ("w1", "w2", "w3")}
    needed.add(weight_map["model.layers.0.block_sparse_moe.gate.weight"])
    for name in set(weight_map.values()) - needed:
        (sharded_dir / name).write_bytes(b"not a safetensors file")
    ckpt = Checkpoint(sharded_dir, config)
    w13, w2 = ckpt.load_experts(0, [0])
    assert w13.shape == (1, 2 * config.expert_intermediate_size, config.hidden_size)
    assert ckpt.load(wanted).shape == (config.expert_intermediate_size, config.hidden_size)
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load_experts(1, [5])


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_config_json(mixtral_dir: Path, tmp_path: Path) -> None:
    model = copy_model(mixtral_dir, tmp_path / "m")
    (model / "config.json").unlink()
    with pytest.raises(ModelConfigError, match="config.json: missing"):
        LLMEngine.from_pretrained(model)


def test_missing_safetensors(mixtral_dir: Path, tmp_path: Path) -> None:
    model = copy_model(mixtral_dir, tmp_path / "m")
    (model / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        LLMEngine.from_pretrained(model)


def test_missing_shard_listed_in_index(sharded_dir: Path, tmp_path: Path) -> None:
    model = copy_model(sharded_dir, tmp_path / "m")
    victim = sorted(model.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: missing"):
        LLMEngine.from_pretrained(model)


def test_unknown_model_type(mixtral_dir: Path, tmp_path: Path) -> None:
    model = copy_model(mixtral_dir, tmp_path / "m")
    raw = json.loads((model / "config.json").read_text())
    raw["model_type"] = "llama"
    (model / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match="unknown model_type 'llama'"):
        LLMEngine.from_pretrained(model)


def test_tensor_shape_disagreeing_with_config(mixtral_dir: Path, tmp_path: Path) -> None:
    model = copy_model(mixtral_dir, tmp_path / "m")
    raw = json.loads((model / "config.json").read_text())
    raw["intermediate_size"] = 100
    (model / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"experts\.0\.w1\.weight' has shape \(96, 64\), config expects \(100, 64\)"):
        LLMEngine.from_pretrained(model)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_safetensors_file(mixtral_dir: Path, tmp_path: Path, damage: str) -> None:
    model = copy_model(mixtral_dir, tmp_path / "m")
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\x00" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or unreadable"):
        LLMEngine.from_pretrained(model)
