"""Reading Hugging Face layout checkpoints: `config.json` + `*.safetensors` (single file or sharded with an index).

Only the tensors a caller asks for are read (safetensors memory-maps the files), so an expert shard loads its own
experts without touching the rest. This module owns tensor names for every family and both expert layouts:
- per expert, as published checkpoints and `save_pretrained` write them
  (`...experts.{e}.w1/w2/w3` for Mixtral, `...experts.{e}.gate_proj/up_proj/down_proj` for Qwen and OLMoE);
- stacked, as transformers 5 holds them in memory (`...experts.gate_up_proj` [E, 2I, D], `...experts.down_proj`
  [E, D, I]).
It checks every tensor's shape against the config and raises `CheckpointError` naming the tensor and the file.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from moe_serve.model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
_HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) map huge pages of 2 MiB

# Per-expert projection names: (gate, up, down).
_EXPERT_PROJ = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "olmoe": ("gate_proj", "up_proj", "down_proj"),
}


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt or disagrees with the config."""


class Checkpoint:
    """Name -> tensor access over the safetensors files of one model directory."""

    def __init__(self, model_dir: str | Path, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        self.dir = Path(model_dir)
        self.config = config
        self.dtype = dtype  # every float tensor is returned in it
        self._file_of = self._weight_map()
        self._mapped: dict[str, _MappedFile] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: unreadable index ({exc})") from exc
            for name in sorted(set(weight_map.values())):
                if not (self.dir / name).is_file():
                    raise CheckpointError(f"{self.dir / name}: missing (listed in {INDEX_FILE})")
            return dict(weight_map)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no *.safetensors files")
        weight_map: dict[str, str] = {}
        for path in files:
            with self._open(path.name) as handle:
                weight_map.update({key: path.name for key in handle.keys()})
        return weight_map

    def _open(self, file_name: str):  # noqa: ANN202 - safetensors has no public handle type
        path = self.dir / file_name
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise _unreadable(path, exc) from exc

    def has(self, name: str) -> bool:
        return name in self._file_of

    def load(self, name: str, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, checked against `shape` when given, in `dtype` (default: the checkpoint's serving dtype)."""
        return self.load_rows(name, None, shape, dtype)

    def load_rows(
        self, name: str, rows: Sequence[int] | None, shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Tensor `name`, or only the given rows of its first dimension (read without loading the rest), converted
        on its own: loading never holds more than one tensor in the file's dtype beside what was already loaded."""
        file_name = self._file_of.get(name)
        if file_name is None:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found in the checkpoint")
        try:
            with self._open(file_name) as handle:
                if rows is None:
                    tensor = handle.get_tensor(name)
                else:
                    tensor_slice = handle.get_slice(name)
                    tensor = torch.cat([tensor_slice[r : r + 1] for r in rows])
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{self.dir / file_name}: cannot read tensor {name!r} ({exc})") from exc
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.dir / file_name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"config expects {tuple(shape)}"
            )
        return tensor.to(dtype or self.dtype)

    # --- names ---------------------------------------------------------------------------------------------

    def moe_prefix(self, layer: int) -> str:
        """Where a layer's MoE block lives: `block_sparse_moe` in published Mixtral files, `mlp` elsewhere."""
        for block in ("block_sparse_moe", "mlp"):
            prefix = f"model.layers.{layer}.{block}"
            if self.has(f"{prefix}.gate.weight"):
                return prefix
        raise CheckpointError(f"{self.dir}: no MoE gate weight found for layer {layer}")

    def load_gate(self, layer: int) -> torch.Tensor:
        cfg = self.config
        # router logits are computed in float32 whatever the serving dtype
        return self.load(f"{self.moe_prefix(layer)}.gate.weight", (cfg.num_experts, cfg.hidden_size), torch.float32)

    def load_experts(self, layer: int, expert_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights of the given experts of one layer: w13 [n, 2I, D] (gate rows, then up rows), w2 [n, D, I]."""
        cfg = self.config
        bad = [e for e in expert_ids if not 0 <= e < cfg.num_experts]
        if bad:
            raise CheckpointError(f"expert ids {bad} out of range for {cfg.num_experts} experts")
        prefix = f"{self.moe_prefix(layer)}.experts"
        d, i, n = cfg.hidden_size, cfg.expert_intermediate_size, len(expert_ids)
        if self.has(f"{prefix}.gate_up_proj"):
            w13 = self.load_rows(f"{prefix}.gate_up_proj", expert_ids, (n, 2 * i, d))
            w2 = self.load_rows(f"{prefix}.down_proj", expert_ids, (n, d, i))
            return w13, w2
        return (torch.stack([torch.cat(self.load_expert_w13(layer, e)) for e in expert_ids]),
                torch.stack([self.load_expert_w2(layer, e) for e in expert_ids]))

    def load_expert_w13(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's gate rows [I, D] and up rows [I, D], read on their own (a loader converting expert by
        expert never holds more than one expert's checkpoint tensors)."""
        cfg = self.config
        prefix = f"{self.moe_prefix(layer)}.experts"
        d, i = cfg.hidden_size, cfg.expert_intermediate_size
        if self.has(f"{prefix}.gate_up_proj"):
            w13 = self.load_rows(f"{prefix}.gate_up_proj", [expert], (1, 2 * i, d))[0]
            return w13[:i], w13[i:]
        gate, up, _ = _EXPERT_PROJ[cfg.family]
        return (self.load(f"{prefix}.{expert}.{gate}.weight", (i, d)),
                self.load(f"{prefix}.{expert}.{up}.weight", (i, d)))

    def expert_views(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """One expert's gate [I, D], up [I, D] and down [D, I] weights as views of the mapped files, no copy, when the
        file holds them in the serving dtype (None otherwise: `load_expert_w13` / `load_expert_w2` convert). Give
        their pages back with `release` once used."""
        cfg = self.config
        prefix = f"{self.moe_prefix(layer)}.experts"
        d, i = cfg.hidden_size, cfg.expert_intermediate_size
        if self.has(f"{prefix}.gate_up_proj"):
            w13, w2 = self._view(f"{prefix}.gate_up_proj"), self._view(f"{prefix}.down_proj")
            if w13 is None or w2 is None or tuple(w13.shape[1:]) != (2 * i, d) or tuple(w2.shape[1:]) != (d, i):
                return None
            return w13[expert, :i], w13[expert, i:], w2[expert]
        gate, up, down = (self._view(f"{prefix}.{expert}.{proj}.weight") for proj in _EXPERT_PROJ[cfg.family])
        if gate is None or up is None or down is None or tuple(down.shape) != (d, i) or \
                tuple(gate.shape) != (i, d) or tuple(up.shape) != (i, d):
            return None
        return gate, up, down

    @contextlib.contextmanager
    def expert_weights(self, layer: int, expert: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One expert's gate [I, D], up [I, D] and down [D, I] weights for the duration of the block: views of the
        mapped files (given back after it) where they are in the serving dtype, else loaded and converted."""
        views = self.expert_views(layer, expert)
        if views is None:
            yield (*self.load_expert_w13(layer, expert), self.load_expert_w2(layer, expert))
            return
        try:
            yield views
        finally:
            self.release(*views)

    def release(self, *views: torch.Tensor) -> None:
        """Give the pages of views of the mapped files (`expert_views`) back to the page cache: this process stops
        counting them as resident, and a later read maps them again from the cache."""
        self._advise(views, mmap.MADV_DONTNEED)

    def read_ahead(self, layer: int, expert: int) -> None:
        """Start reading one expert's weights into the page cache (madvise WILLNEED: the kernel reads from disk in
        the background; nothing is mapped or counted as this process's), where the files hold them in the serving
        dtype."""
        self._advise(self.expert_views(layer, expert) or (), mmap.MADV_WILLNEED)

    def _advise(self, views: Sequence[torch.Tensor], advice: int) -> None:
        for view in views:
            for mapped in self._mapped.values():
                mapped.advise(view, advice)

    def _view(self, name: str) -> torch.Tensor | None:
        file_name = self._file_of.get(name)
        if file_name is None:
            return None
        view = self._mapped_file(file_name).view(name)
        return view if view is not None and view.dtype == self.dtype else None

    def _mapped_file(self, file_name: str) -> _MappedFile:
        if file_name not in self._mapped:
            try:
                self._mapped[file_name] = _MappedFile(self.dir / file_name)
            except (OSError, ValueError, struct.error) as exc:  # a JSON error is a ValueError
                raise _unreadable(self.dir / file_name, exc) from exc
        return self._mapped[file_name]

    def load_expert_w2(self, layer: int, expert: int) -> torch.Tensor:
        """One expert's down projection [D, I]."""
        cfg = self.config
        prefix = f"{self.moe_prefix(layer)}.experts"
        d, i = cfg.hidden_size, cfg.expert_intermediate_size
        if self.has(f"{prefix}.gate_up_proj"):
            return self.load_rows(f"{prefix}.down_proj", [expert], (1, d, i))[0]
        down = _EXPERT_PROJ[cfg.family][2]
        return self.load(f"{prefix}.{expert}.{down}.weight", (d, i))


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt or unreadable safetensors file ({exc})")


class _MappedFile:
    """One safetensors file mapped once, read-only: tensors as views of its pages, and `advise` to give a tensor's
    pages back (madvise DONTNEED), so a process that reads a tensor now and then does not keep it resident, or to
    have them read ahead (WILLNEED). The header is read here, once (an 8-byte length, then JSON naming each tensor's
    dtype, shape and byte range), because safetensors' own handles neither expose the mapping nor let pages go."""

    DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as file:
            self._map = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)
        (header_len,) = struct.unpack("<Q", self._map[:8])
        self._entries = json.loads(self._map[8 : 8 + header_len])
        self._data_start = 8 + header_len
        with warnings.catch_warnings():  # the mapping is read-only; nothing writes through these views
            warnings.simplefilter("ignore", UserWarning)
            self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def view(self, name: str) -> torch.Tensor | None:
        """The tensor `name` as it lies in the file; None for a dtype it does not map or a misaligned range."""
        entry = self._entries.get(name)
        dtype = self.DTYPES.get(entry["dtype"]) if entry else None
        if dtype is None:
            return None
        start, end = (self._data_start + offset for offset in entry["data_offsets"])
        if start % dtype.itemsize:
            return None
        return self._bytes[start:end].view(dtype).view(entry["shape"])

    def advise(self, tensor: torch.Tensor, advice: int) -> None:
        """madvise `advice` over the pages under `tensor`, if it is a view of this file, rounded out to whole huge
        pages: where the page cache holds the file in huge pages (a file read from disk on recent kernels), unmapping
        part of one (DONTNEED) would split its mapping, and every later read of it would fault 4 KiB at a time.
        Rounding out may unmap a neighbour's pages too; nothing but a later fault notices."""
        offset = tensor.data_ptr() - self._bytes.data_ptr()
        if not 0 <= offset < len(self._map):
            return
        end = min(offset + tensor.numel() * tensor.element_size(), len(self._map))
        first = offset // _HUGE_PAGE * _HUGE_PAGE
        last = min(-(-end // _HUGE_PAGE) * _HUGE_PAGE, len(self._map))
        self._map.madvise(advice, first, last - first)
