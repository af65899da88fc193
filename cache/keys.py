"""Block keys: chained, deterministic hashes naming a prompt's full KV blocks in every process, replica and node.

Owns: the KV block layout descriptor (`KVLayout`), the model fingerprint keys are rooted in, the chained block
keys of a prompt, the key of a text in the prompt cache, and the Redis key prefixes.
Does not own: the bytes stored under a key (codec.py) or where they live (tiers.py).

Key i = blake2b(key i-1 || token ids of block i), key -1 = blake2b(version, model fingerprint, layout tag), as
vLLM chains block hashes to their parent. Equal prefixes share keys everywhere; a different model, weight
quantization, KV dtype or block layout gives disjoint keys. Python's `hash()` is salted per process: never used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

KEY_VERSION = 1
KEY_DIGEST_BYTES = 16  # 128-bit keys: collisions are out of reach for any realistic number of blocks
# blake2b personalisation strings (<= 16 bytes): one per kind of hash, so no two kinds can ever collide
_PERSON_ROOT = b"moe-kv-root"
_PERSON_BLOCK = b"moe-kv-block"
_PERSON_TEXT = b"moe-text"
_PERSON_MODEL = b"moe-model"

# Redis key prefixes; one namespace per kind of value, so warm and cold may share a database.
WARM_PREFIX = "moe:kv:"
COLD_PREFIX = "moe:kvc:"
PROMPT_PREFIX = "moe:tok:"

# Axis names of a block tensor and their sizes; `KVLayout.order` is a permutation of these.
AXES = ("layer", "token", "kv", "head", "dim")
# Model files read for the fingerprint; files up to FULL_HASH_BYTES are hashed whole, larger ones are sampled.
FINGERPRINT_FILES = ("config.json", "generation_config.json")
FULL_HASH_BYTES = 256 * 2**20
SAMPLE_CHUNKS, SAMPLE_BYTES = 64, 64 * 2**10


@dataclass(frozen=True)
class KVLayout:
    """The tensor of one KV block (block_size positions of one sequence, all layers, K and V) as the engine
    gives and takes it. Every field is part of every key, so engines with different layouts never share."""

    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    order: tuple[str, ...] = ("layer", "token", "kv", "head", "dim")  # axis order of the block tensor

    def __post_init__(self) -> None:
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")
        if sorted(self.order) != sorted(AXES):
            raise ValueError(f"KVLayout.order must be a permutation of {AXES}, got {self.order}")

    @cached_property
    def block_shape(self) -> tuple[int, ...]:
        sizes = {"layer": self.num_layers, "token": self.block_size, "kv": 2, "head": self.num_kv_heads,
                 "dim": self.head_dim}
        return tuple(sizes[axis] for axis in self.order)

    @cached_property
    def block_bytes(self) -> int:
        return int(np.prod(self.block_shape)) * self.dtype.itemsize

    @cached_property
    def tag(self) -> str:
        """Canonical text of the layout, e.g. 'float32;layer=2,token=16,kv=2,head=2,dim=16'."""
        dims = ",".join(f"{axis}={size}" for axis, size in zip(self.order, self.block_shape))
        return f"{str(self.dtype).removeprefix('torch.')};{dims}"


def model_fingerprint(model_dir: str | Path, extra: str = "") -> str:
    """sha256 hex naming the weights and config of `model_dir`, plus `extra` (whatever else changes the KV, e.g.
    the engine's weight quantization). Deterministic across processes and machines: names, sizes and contents
    only, never paths or mtimes. Weight files over FULL_HASH_BYTES are sampled (header + SAMPLE_CHUNKS chunks)."""
    root = Path(model_dir)
    digest = hashlib.sha256(f"moe-serve-model-v{KEY_VERSION}\0{extra}\0".encode())
    names = [n for n in FINGERPRINT_FILES if (root / n).is_file()]
    names += sorted(p.name for p in root.glob("*.safetensors"))
    if not names:
        raise FileNotFoundError(f"{root}: no config.json or *.safetensors to fingerprint")
    for name in names:
        path = root / name
        size = path.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= FULL_HASH_BYTES:
                digest.update(f.read())
                continue
            for i in range(SAMPLE_CHUNKS):
                f.seek(i * (size - SAMPLE_BYTES) // (SAMPLE_CHUNKS - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def root_key(model_fp: str, layout: KVLayout) -> bytes:
    """The parent of a sequence's first block: covers the key version, the model and the layout."""
    text = f"v{KEY_VERSION}\0{model_fp}\0{layout.tag}".encode()
    return hashlib.blake2b(text, digest_size=KEY_DIGEST_BYTES, person=_PERSON_ROOT).digest()


def prefix_block_keys(model_fp: str, layout: KVLayout, token_ids: Sequence[int]) -> list[str]:
    """Keys (32 hex chars) of every full block of `token_ids`, in order; a trailing partial block has none.

    Block i's key hashes block i-1's key and block i's ids (little-endian uint32), so key i names the whole prefix
    up to the end of block i."""
    bs = layout.block_size
    full = len(token_ids) // bs * bs
    if full == 0:
        return []
    ids = np.asarray(token_ids[:full], dtype=np.int64)
    if ids.min() < 0 or ids.max() >= 2**32:
        raise ValueError("token ids must be in [0, 2**32)")
    packed = ids.astype("<u4").tobytes()
    step = bs * 4
    parent = root_key(model_fp, layout)
    keys = []
    for start in range(0, len(packed), step):
        parent = hashlib.blake2b(parent + packed[start:start + step], digest_size=KEY_DIGEST_BYTES,
                                 person=_PERSON_BLOCK).digest()
        keys.append(parent.hex())
    return keys


def prompt_key(tokenizer_fp: str, text: str, variant: str = "") -> str:
    """Key (32 hex chars) of `text` tokenized by the tokenizer with fingerprint `tokenizer_fp`; `variant` names
    the encode options (e.g. 'special=1') so differently encoded ids of one text never share a key."""
    digest = hashlib.blake2b(digest_size=KEY_DIGEST_BYTES, person=_PERSON_TEXT)
    digest.update(f"v{KEY_VERSION}\0{tokenizer_fp}\0{variant}\0".encode())
    digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def short_digest(text: str, size: int = KEY_DIGEST_BYTES) -> bytes:
    """A fixed-size digest of a fingerprint or tag, as stored in value headers."""
    return hashlib.blake2b(text.encode(), digest_size=size, person=_PERSON_MODEL).digest()
