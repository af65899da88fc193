# The moe-serve image: Debian bookworm, Python 3.11, moe-serve with Ray Serve, run as user `ray` (uid 1000).
# The Helm chart's default image (moe-serve:<appVersion>) and a Ray node image for KubeRay: `ray`, `moe-serve` and
# `wget` (KubeRay's probes) are on PATH, login shells included (KubeRay runs `bash -lc 'ray start ...'`).
#
# Build it with scripts/build_image.sh: it stages the Python wheels in build/image/wheels (so the CPU build needs no
# network for Python packages) and makes the base image with mmdebstrap (no image registry). With staged wheels and
# Docker Hub at hand, Docker (BuildKit, for RUN --mount) builds the same image from debian:bookworm-slim:
# `docker build -t moe-serve:0.1.0 .`.
#   VARIANT=cpu (default): torch's CPU build, installed from the staged wheels only (--no-index).
#   VARIANT=cuda: the staged moe-serve wheel with --no-deps, and from PyPI the staged requirements/cuda.txt: vLLM's
#     fused MoE kernels and torch's CUDA build (PyPI's Linux torch, with the CUDA libraries as wheels), with the pins
#     vLLM rules out overridden (moe-serve[gpu] itself cannot resolve: see that file). No CUDA base image is needed:
#     the nodes' NVIDIA container runtime provides the driver.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
ARG VARIANT=cpu
ARG VERSION=0.1.0

# g++ and python3-dev: torch's cpp_extension compiles moe_serve/kernels on a node whose CPU differs from the build
# machine's (and Triton compiles launchers at run time in the CUDA variant). wget: KubeRay's exec probes.
# redis-server: the warm cache tier `moe-serve up` starts by default in a single container.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates g++ python3 python3-dev python3-venv redis-server wget \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --gid users --shell /bin/bash ray \
 && python3 -m venv /opt/moe-serve/venv \
 && install -d -o ray -g users /opt/moe-serve/kernels \
 && echo 'export PATH="/opt/moe-serve/venv/bin:$PATH"' > /etc/profile.d/moe-serve.sh

ENV PATH=/opt/moe-serve/venv/bin:$PATH \
    MOE_SERVE_KERNEL_DIR=/opt/moe-serve/kernels \
    PYTHONUNBUFFERED=1

# Set by scripts/build_image.sh to the staged wheels' digest: bind-mounted files are not part of the layer cache's
# key, build arguments are, so changed wheels (a new moe-serve wheel of the same version) rebuild from here.
ARG WHEELS_DIGEST=none
# The `reference` extra (transformers) is what `moe-serve make-tiny-model` needs: the chart's init container and
# `moe-serve up`'s default model run it. The wheels are bind-mounted, not copied, so they never become a layer.
RUN --mount=type=bind,source=build/image/wheels,target=/wheels \
    case "$VARIANT" in \
      cpu) pip install --no-cache-dir --no-index --find-links /wheels "moe-serve[reference]==${VERSION}" ;; \
      cuda) pip install --no-cache-dir -r /wheels/requirements-cuda.txt \
              && pip install --no-cache-dir --no-deps --no-index --find-links /wheels "moe-serve==${VERSION}" ;; \
      *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac

USER ray
WORKDIR /home/ray
# Compile the CPU kernels now: nodes with this machine's CPU start without the minute-long build, and a toolchain
# that cannot build them fails the image build here rather than falling back to torch ops in production.
RUN python -c 'from moe_serve.kernels import build_dir, cpu_ops; assert cpu_ops(), "no kernels"; print(build_dir())'

# Last, so a new commit's labels leave the cached layers above alone.
ARG REVISION=unknown
LABEL org.opencontainers.image.title="moe-serve" \
      org.opencontainers.image.description="Serving cluster for Mixture-of-Experts language models on Ray" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.moe-serve.variant="${VARIANT}"
EXPOSE 8000
# One container, everything in it: local Ray, the embedded tiny model, a child redis-server, the API on port 8000.
# KubeRay replaces this command with `ray start`.
CMD ["moe-serve", "up", "--host", "0.0.0.0"]
