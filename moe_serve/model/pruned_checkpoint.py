"""Writing a pruned copy of a Hugging Face checkpoint: the kept experts of every MoE layer, renumbered densely.

Tensors are read one at a time from the source's safetensors files (memory-mapped) and written in the source's dtype
and expert layout (per-expert `...experts.{e}.<proj>` tensors renamed to their new ids; stacked `...experts.<name>`
[E, ...] tensors sliced along their first axis), shards of at most `max_shard_bytes` with a
`model.safetensors.index.json` when there is more than one, as `save_pretrained` writes them. The gate rows are
sliced to the kept experts in the same order; everything else (Qwen2-MoE's shared expert and its gate included) is
copied unchanged. config.json gets the new expert count; tokenizer files and generation_config.json are copied.
Knows nothing of usage or quality: the caller says which experts each layer keeps.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_serve.model.checkpoint import INDEX_FILE, CheckpointError

# config.json keys holding the routed expert count: Mixtral and Qwen3-MoE as transformers 5 saves them use the
# first, Qwen2-MoE, OLMoE and published Qwen3-MoE configs the second; every one present is updated.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")
# Files copied as they are: tokenizers (HF fast and slow, sentencepiece), chat templates, generation defaults.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
MAX_SHARD_BYTES = 5 * 2**30
_MOE = r"model\.layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp)"
_PER_EXPERT = re.compile(_MOE + r"\.experts\.(?P<expert>\d+)\.(?P<rest>.+)")
_STACKED = re.compile(_MOE + r"\.experts\.(?P<rest>[^.]+)")
_GATE = re.compile(_MOE + r"\.gate\.(?P<rest>[^.]+)")


@dataclass(frozen=True)
class WrittenBytes:
    checkpoint_before: int  # safetensors files
    checkpoint_after: int
    experts_before: int  # routed expert tensors (gates not included)
    experts_after: int


def write_pruned_checkpoint(model_dir: Path, out_dir: Path, kept: Mapping[int, Sequence[int]],
                            max_shard_bytes: int = MAX_SHARD_BYTES) -> WrittenBytes:
    """Write into the empty or new directory `out_dir` the checkpoint of `model_dir` where MoE layer L keeps the
    experts `kept[L]` (original ids, ascending; every layer the same count) as experts 0..K-1."""
    counts = {len(ids) for ids in kept.values()}
    if len(counts) != 1:
        raise ValueError(f"every MoE layer must keep the same number of experts, got {sorted(counts)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map = _weight_map(model_dir)
    experts_after = 0
    shards: list[dict[str, int]] = []  # per shard: name -> bytes
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    for name, tensor, is_expert in _pruned_tensors(model_dir, weight_map, kept):
        if is_expert:
            experts_after += tensor.nbytes
        if pending and pending_bytes + tensor.nbytes > max_shard_bytes:
            shards.append(_write_shard(out_dir, len(shards), pending))
            pending, pending_bytes = {}, 0
        pending[name] = tensor
        pending_bytes += tensor.nbytes
    if pending:
        shards.append(_write_shard(out_dir, len(shards), pending))
    out_files = _name_shards(out_dir, shards)
    _write_config(model_dir, out_dir, counts.pop())
    for file_name in COPIED_FILES:
        if (model_dir / file_name).is_file():
            shutil.copyfile(model_dir / file_name, out_dir / file_name)
    source_files = sorted(set(weight_map.values()))
    experts_before = sum(size for file_name in source_files
                         for name, size in _tensor_sizes(model_dir / file_name).items()
                         if _PER_EXPERT.fullmatch(name) or _STACKED.fullmatch(name))
    return WrittenBytes(_file_bytes(model_dir, source_files), _file_bytes(out_dir, out_files),
                        experts_before, experts_after)


def _pruned_tensors(model_dir: Path, weight_map: dict[str, str], kept: Mapping[int, Sequence[int]]
                    ) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(new name, tensor, is a routed expert tensor) of every tensor the pruned checkpoint holds, one file open at
    a time."""
    for file_name in sorted(set(weight_map.values())):
        with safe_open(str(model_dir / file_name), framework="pt", device="cpu") as handle:
            for name in sorted(n for n, f in weight_map.items() if f == file_name):
                if match := _PER_EXPERT.fullmatch(name):
                    ids = _kept_of(kept, match, name)
                    expert = int(match["expert"])
                    if expert in ids:
                        new_name = f"{name[: match.start('expert')]}{ids.index(expert)}.{match['rest']}"
                        yield new_name, handle.get_tensor(name), True
                elif match := _STACKED.fullmatch(name):
                    yield name, _rows(handle.get_tensor(name), _kept_of(kept, match, name), name), True
                elif match := _GATE.fullmatch(name):
                    yield name, _rows(handle.get_tensor(name), _kept_of(kept, match, name), name), False
                else:
                    yield name, handle.get_tensor(name), False


def _kept_of(kept: Mapping[int, Sequence[int]], match: re.Match[str], name: str) -> list[int]:
    layer = int(match["layer"])
    if layer not in kept:
        raise CheckpointError(f"tensor {name!r} belongs to layer {layer}, which the config has no MoE block in")
    return list(kept[layer])


def _rows(tensor: torch.Tensor, ids: list[int], name: str) -> torch.Tensor:
    if not tensor.ndim or tensor.shape[0] <= max(ids):
        raise CheckpointError(f"tensor {name!r} of shape {tuple(tensor.shape)} has no row per expert")
    return tensor[ids].contiguous()


def _weight_map(model_dir: Path) -> dict[str, str]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: unreadable index ({exc})") from exc
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files")
    weight_map: dict[str, str] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            weight_map.update({name: path.name for name in handle.keys()})
    return weight_map


def _tensor_sizes(path: Path) -> dict[str, int]:
    """Bytes of every tensor of a safetensors file, from its header alone (8-byte length, then JSON with each
    tensor's data offsets), so counting never reads tensor data."""
    with path.open("rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return {name: info["data_offsets"][1] - info["data_offsets"][0]
            for name, info in header.items() if name != "__metadata__"}


def _write_shard(out_dir: Path, number: int, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    save_file(tensors, str(out_dir / f"shard-{number}.tmp"), metadata={"format": "pt"})
    return {name: tensor.nbytes for name, tensor in tensors.items()}


def _name_shards(out_dir: Path, shards: list[dict[str, int]]) -> list[str]:
    """Single file: model.safetensors; several: model-0000i-of-0000n.safetensors and the index, as HF names them.
    Returns the file names."""
    if len(shards) == 1:
        (out_dir / "shard-0.tmp").rename(out_dir / "model.safetensors")
        return ["model.safetensors"]
    weight_map: dict[str, str] = {}
    for number, sizes in enumerate(shards):
        file_name = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        (out_dir / f"shard-{number}.tmp").rename(out_dir / file_name)
        weight_map.update({name: file_name for name in sizes})
    total = sum(sum(sizes.values()) for sizes in shards)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return sorted(set(weight_map.values()))


def _write_config(model_dir: Path, out_dir: Path, num_experts: int) -> None:
    raw = json.loads((model_dir / "config.json").read_text())
    keys = [key for key in EXPERT_COUNT_KEYS if key in raw]
    if not keys:
        raise CheckpointError(f"{model_dir / 'config.json'}: no expert count ({' or '.join(EXPERT_COUNT_KEYS)})")
    for key in keys:
        raw[key] = num_experts
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")


def _file_bytes(directory: Path, file_names: Sequence[str]) -> int:
    return sum((directory / name).stat().st_size for name in file_names)
