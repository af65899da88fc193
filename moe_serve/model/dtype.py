"""The serving dtype and device: the names users pass, what `auto` means on this machine, and the checks at the edge.

`auto` serves a checkpoint in its own dtype where the hardware computes that dtype natively (bf16 on a CPU with
AVX512-BF16 or AMX, bf16/fp16 on CUDA), else in float32. Weights, activations and the KV cache take the serving
dtype; norms, softmax, router logits and matmul accumulation stay float32 (as transformers does).
This module knows nothing of weights or the engine; it only names and resolves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

import torch

from moe_serve.kernels import cpu_flags

DTypeName = Literal["auto", "bfloat16", "float16", "float32"]
DTYPE_NAMES: tuple[DTypeName, ...] = get_args(DTypeName)
DeviceName = Literal["cpu", "cuda"]
DEVICE_NAMES: tuple[DeviceName, ...] = get_args(DeviceName)
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# CPU flags (as /proc/cpuinfo spells them) that make a dtype native: dot products and tiles in that dtype
_NATIVE_CPU_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def native(dtype: torch.dtype, device: DeviceName = "cpu") -> bool:
    """Whether `device` computes `dtype` natively (float32 always does)."""
    if dtype == torch.float32:
        return True
    if device == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    return any(flag in cpu_flags() for flag in _NATIVE_CPU_FLAGS.get(dtype, ()))


def checkpoint_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype a checkpoint's config.json declares (`dtype`, or `torch_dtype` before transformers 5); float32
    when it declares none or one this project does not serve."""
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return _TORCH_DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def check_dtype_name(name: str) -> DTypeName:
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return name  # type: ignore[return-value]


def check_device(name: str) -> DeviceName:
    """The device name, checked against this machine: `cuda` needs a CUDA device torch can see."""
    if name not in DEVICE_NAMES:
        raise ValueError(f"unknown device {name!r}: expected one of {', '.join(DEVICE_NAMES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested, but torch sees no CUDA device on this machine")
    return name  # type: ignore[return-value]


def resolve_dtype(name: str, model_dir: str | Path, device: DeviceName = "cpu") -> torch.dtype:
    """The torch dtype to serve `model_dir` in for the dtype name `name` (see the module docstring for `auto`)."""
    if check_dtype_name(name) != "auto":
        return _TORCH_DTYPES[name]
    stored = checkpoint_dtype(model_dir)
    return stored if native(stored, device) else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
