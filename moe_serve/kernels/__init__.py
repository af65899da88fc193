"""Compiled CPU kernels for the decode hot path (cpu_ops.cpp), with torch ops as the fallback everywhere.

On the small MoE models this project is tested and benchmarked on, a decode step is bound by eager PyTorch's
per-op overhead (see moe_serve/model/moe.py), not by arithmetic. The kernels replace op chains there: RMSNorm,
decode attention over the decode workspace, and the MoE block (gate, top-k, experts in fp32, int8 or int4,
combine; or just the experts, for a shard), whose weights they hold in column panels (layout.py,
moe_serve/model/kernel_moe.py). Each has a torch implementation in moe_serve/model that tests compare it against
and that runs when the kernels are off or cannot be built.

Built with torch's cpp_extension (-O3 -march=native) the first time `cpu_ops()` is asked, about a minute on
2 cores; `make install` does it ahead (`python -m moe_serve.kernels`). The build lands in a directory keyed by the
source, torch version, compiler flags and CPU features, so a changed source or a different CPU never loads a stale
build. `MOE_SERVE_KERNELS=0` turns them off (torch ops only); `MOE_SERVE_KERNEL_DIR` moves the build cache.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

NAME = "moe_serve_cpu_ops"
SOURCE = Path(__file__).with_name("cpu_ops.cpp")
# -fopenmp: at::parallel_for is inline OpenMP in torch's headers, so without it every kernel runs on one thread.
# The runtime is torch's own: its wheel loads libgomp.so.1 first, and the extension's libgomp.so.1 resolves to it.
FLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def enabled() -> bool:
    return os.environ.get("MOE_SERVE_KERNELS", "1") != "0"


@functools.cache
def cpu_ops() -> ModuleType | None:
    """The compiled kernels, building them on first use; None when turned off or the build fails (logged)."""
    if not enabled():
        return None
    try:
        return _load(build_dir())
    except Exception as exc:  # no compiler, unsupported platform...: the torch paths still serve
        log.warning("compiled CPU kernels unavailable, using torch ops: %s", exc)
        return None


def build_dir() -> Path:
    root = Path(os.environ.get("MOE_SERVE_KERNEL_DIR", Path.home() / ".cache" / "moe_serve" / "kernels"))
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), " ".join(FLAGS).encode(),
                 platform.machine().encode(), " ".join(sorted(cpu_flags())).encode()):
        key.update(part)
    return root / key.hexdigest()[:16]


def _load(directory: Path) -> ModuleType:
    built = next(directory.glob(f"{NAME}*.so"), None)
    if built is None:
        return _build(directory)
    spec = importlib.util.spec_from_file_location(NAME, built)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(directory: Path) -> ModuleType:
    import ninja  # the build tool cpp_extension runs; the venv's copy may not be on PATH
    from torch.utils.cpp_extension import load

    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    directory.mkdir(parents=True, exist_ok=True)
    log.info("building compiled CPU kernels in %s (about a minute, once)", directory)
    return load(NAME, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=LDFLAGS, build_directory=str(directory))


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo spells them (avx2, avx512_bf16, amx_bf16, ...); the processor name
    alone where that file is unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset([platform.processor()])
