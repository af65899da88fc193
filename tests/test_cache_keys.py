"""Block keys: deterministic across processes, disjoint across models, layouts and dtypes; model fingerprints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_serve.cache import KVLayout, model_fingerprint, prefix_block_keys, prompt_key

LAYOUT = KVLayout(block_size=16, num_layers=2, num_kv_heads=2, head_dim=16)
IDS = list(range(3, 3 + 100))


def test_keys_cover_full_blocks_and_chain() -> None:
    keys = prefix_block_keys("model-a", LAYOUT, IDS)
    assert len(keys) == 100 // 16
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in keys)
    assert len(set(keys)) == len(keys)
    # a key names its whole prefix: same block ids after a different first block give a different key
    other = prefix_block_keys("model-a", LAYOUT, [7] + IDS[1:])
    assert other[0] != keys[0] and all(a != b for a, b in zip(other, keys))
    # extending a prompt keeps the keys of its prefix
    assert prefix_block_keys("model-a", LAYOUT, IDS + [5] * 40)[: len(keys)] == keys
    assert prefix_block_keys("model-a", LAYOUT, IDS[:15]) == []


def test_different_models_layouts_and_dtypes_never_share_keys() -> None:
    variants = [
        ("model-a", LAYOUT),
        ("model-b", LAYOUT),
        ("model-a", KVLayout(16, 2, 2, 16, dtype=torch.bfloat16)),
        ("model-a", KVLayout(16, 2, 2, 16, order=("layer", "kv", "token", "head", "dim"))),
        ("model-a", KVLayout(16, 3, 2, 16)),
    ]
    key_sets = [set(prefix_block_keys(fp, layout, IDS)) for fp, layout in variants]
    for i, a in enumerate(key_sets):
        for b in key_sets[i + 1:]:
            assert not a & b


def test_bad_token_ids_are_refused() -> None:
    with pytest.raises(ValueError):
        prefix_block_keys("m", LAYOUT, [-1] * 16)


_CHILD = """
import json, sys
from moe_serve.cache import KVLayout, prefix_block_keys, prompt_key
layout = KVLayout(block_size=16, num_layers=2, num_kv_heads=2, head_dim=16)
print(json.dumps([prefix_block_keys("model-a", layout, list(range(3, 103))), prompt_key("tok", "hello", "s=1")]))
"""


def test_keys_are_identical_in_another_process() -> None:
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str hash salt: keys must not care
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    keys, text_key = json.loads(out.stdout)
    assert keys == prefix_block_keys("model-a", LAYOUT, IDS)
    assert text_key == prompt_key("tok", "hello", "s=1")


def test_prompt_keys_follow_tokenizer_variant_and_text() -> None:
    base = prompt_key("tok-a", "some text")
    assert base == prompt_key("tok-a", "some text")
    assert len({base, prompt_key("tok-b", "some text"), prompt_key("tok-a", "some text", "special=0"),
                prompt_key("tok-a", "some text!")}) == 4


def test_layout_validation_and_shape() -> None:
    assert LAYOUT.block_shape == (2, 16, 2, 2, 16)
    assert LAYOUT.block_bytes == 2 * 16 * 2 * 2 * 16 * 4
    with pytest.raises(ValueError):
        KVLayout(16, 2, 2, 16, order=("layer", "token", "head", "dim"))
    with pytest.raises(ValueError):
        KVLayout(0, 2, 2, 16)


def test_model_fingerprint_follows_weights_config_and_extra(tmp_path: Path) -> None:
    def write(name: str, weights: bytes) -> Path:
        root = tmp_path / name
        root.mkdir()
        (root / "config.json").write_text('{"model_type": "mixtral"}')
        (root / "model.safetensors").write_bytes(weights)
        return root

    a, same, other = write("a", b"\x01" * 64), write("same", b"\x01" * 64), write("other", b"\x02" * 64)
    assert model_fingerprint(a) == model_fingerprint(same)  # paths do not matter
    assert model_fingerprint(a) != model_fingerprint(other)  # same shapes, other weights
    assert model_fingerprint(a) != model_fingerprint(a, extra="quantize=int8")
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path / "missing")
