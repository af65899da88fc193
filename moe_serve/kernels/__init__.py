"""Compiled CPU kernels for the decode hot path (cpu_ops.cpp), with torch ops as the fallback everywhere.

On the small MoE models this project is tested and benchmarked on, a decode step is bound by eager PyTorch's
per-op overhead (see moe_serve/model/moe.py), not by arithmetic. The kernels replace op chains there: RMSNorm,
decode attention over the paged KV pool, dense projections, and the MoE block (gate, top-k, experts in fp32,
bf16, fp16, int8 or int4, combine; or just the experts, for a shard), whose weights they hold in column panels
(layout.py, moe_serve/model/kernel_moe.py). Each has a torch implementation in moe_serve/model that tests compare it
against and that runs when the kernels are off or cannot be built.

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
FLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
# Instruction sets the source has paths for. `native` (this CPU's) is what serves; the others are built by
# `python -m moe_serve.kernels --variants` (make install) so every path compiles on every machine, and tested
# where the CPU can run them (tests/test_kernels.py). Each needs these CPU flags to run.
VARIANTS: dict[str, tuple[list[str], frozenset[str]]] = {
    "native": (["-march=native"], frozenset()),
    "avx512": (["-march=x86-64-v4"], frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "fma", "f16c"})),
    # AVX-512 with the bf16 and int8 dot products (vdpbf16ps, vpdpbusd) and VBMI's byte shuffles
    "avx512dot": (["-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni", "-mavx512vbmi"],
                  frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "fma", "f16c", "avx512_bf16",
                             "avx512_vnni", "avx512vbmi"})),
    "avx2": (["-march=x86-64-v3"], frozenset({"avx2", "fma", "f16c"})),
    "portable": (["-march=x86-64"], frozenset()),  # no vector intrinsics: the portable C++ paths
}


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


def variant_names() -> list[str]:
    """The variants this platform's compiler targets (x86-64 has them all; elsewhere only native)."""
    return list(VARIANTS) if platform.machine() in ("x86_64", "AMD64") else ["native"]


def runnable(variant: str) -> bool:
    return VARIANTS[variant][1] <= cpu_flags()


def build_variant(variant: str) -> Path:
    """Build one variant (if not built yet) and return its directory; loads nothing, so any CPU can build any."""
    directory = build_dir(variant)
    if next(directory.glob(f"{module_name(variant)}.*so"), None) is None:
        _compile(directory, variant)
    return directory


@functools.cache
def variant_ops(variant: str) -> ModuleType:
    """A variant's kernels, built if needed; only for a variant this CPU can run (see `runnable`)."""
    if not runnable(variant):
        raise RuntimeError(f"this CPU lacks {sorted(VARIANTS[variant][1] - cpu_flags())} for the {variant} kernels")
    return _load(build_dir(variant), variant)


def module_name(variant: str) -> str:
    """Each variant's extension module has a name of its own: loading a second module under a name already loaded
    in the process hands back the first one, so every variant would run the first variant's code."""
    return NAME if variant == "native" else f"{NAME}_{variant}"


def build_dir(variant: str = "native") -> Path:
    root = Path(os.environ.get("MOE_SERVE_KERNEL_DIR", Path.home() / ".cache" / "moe_serve" / "kernels"))
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), " ".join(_flags(variant)).encode(),
                 platform.machine().encode(), " ".join(sorted(cpu_flags())).encode()):
        key.update(part)
    return root / (key.hexdigest()[:16] if variant == "native" else f"{variant}-{key.hexdigest()[:16]}")


def _flags(variant: str) -> list[str]:
    return FLAGS + VARIANTS[variant][0]


def _load(directory: Path, variant: str = "native") -> ModuleType:
    name = module_name(variant)
    built = next(directory.glob(f"{name}.*so"), None)
    if built is None:
        _compile(directory, variant)
        built = next(directory.glob(f"{name}.*so"))
    spec = importlib.util.spec_from_file_location(name, built)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(directory: Path, variant: str) -> None:
    """Compile and link the extension into `directory` without loading it (a variant this CPU cannot run must
    never be loaded: its static initialisers may use the instructions it was built for). Processes starting at once
    (Ray workers on a new node) build it once: the others wait on a file lock, and the library is linked in a
    subdirectory and renamed into place, so nobody loads half a file."""
    import ninja  # the build tool cpp_extension runs; the venv's copy may not be on PATH
    from filelock import FileLock
    from torch.utils import cpp_extension

    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    name = module_name(variant)
    staging = directory / "build"
    staging.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / ".build.lock")):
        if next(directory.glob(f"{name}.*so"), None) is not None:
            return  # built by another process while this one waited
        log.info("building compiled CPU kernels (%s) in %s (about a minute, once)", variant, directory)
        # the build half of cpp_extension.load (whose other half would import the module)
        cpp_extension._write_ninja_file_and_build_library(
            name, [str(SOURCE)], extra_cflags=_flags(variant), extra_cuda_cflags=None, extra_sycl_cflags=None,
            extra_ldflags=LDFLAGS, extra_include_paths=None, build_directory=str(staging), verbose=False,
            with_cuda=False, with_sycl=False)
        for built in staging.glob(f"{name}.*so"):
            os.replace(built, directory / built.name)


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
