#!/usr/bin/env bash
# Builds the moe-serve container image from the Dockerfile with no image registry, then checks it: `moe-serve
# generate` on the tiny model inside a container of it. The image it tags by default, moe-serve:<pyproject version>,
# is the Helm chart's default image (the cuda variant's is moe-serve:<version>-cuda). A check of its own, outside
# `make test`. Needs root on Debian 12 (its python3 is the image's), Debian's apt mirror and pip's configured index;
# no container registry, no Docker daemon. The image carries the committed HEAD, not uncommitted edits.
#
#   scripts/build_image.sh [--variant cpu|cuda] [--tag NAME:TAG] [--save FILE] [--no-cache] [--no-check]
#   scripts/build_image.sh [--variant ...] [--tag ...] --print-image    # the image reference it builds; nothing else
#
# Steps, each timed:
#   1. buildah, mmdebstrap and python3-venv from Debian's packages, when missing;
#   2. the base image: Debian bookworm made by mmdebstrap from Debian's mirror, imported into buildah (made once);
#   3. the wheels, staged in build/image/wheels with the host's pip configuration and resolved by Debian 12's Python
#      (environment markers must see the image's Python version): cpu, moe-serve[reference] and every dependency, so
#      the build installs them with no network; cuda, the moe-serve wheel and requirements/cuda.txt (the packages
#      the build installs from PyPI beside it, since moe-serve[gpu] cannot resolve);
#   4. the image (buildah bud, chroot isolation, layer cache);
#   5. the check, in a container of the image with a PID namespace of its own (so nothing it starts outlives it):
#      the commands a KubeRay pod needs on a login shell's PATH, then make-tiny-model, and generate in process and
#      on two expert shard actors on Ray, which must give the same greedy tokens;
#   6. with --save FILE: a docker-archive of the image (docker load -i, kind load image-archive, ctr images import).
# Environment: DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR (Debian's by default), STORAGE_DRIVER=vfs where overlay fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK="build/image"  # git-ignored; the Dockerfile bind-mounts $WORK/wheels from the build context
BASE_IMAGE="localhost/moe-serve-base:bookworm"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
PROMPT="The capital of France is"
VERSION="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"

variant=cpu
image=""
save=""
no_cache=""
check=1
print_image=""

usage() { sed -n '8,9p' "$0" | sed 's/^#   //' >&2; exit 2; }
die() { echo "build_image.sh: error: $*" >&2; exit 1; }
log() { echo "==> $*"; }

while (($#)); do
    case "$1" in
        --variant) variant="${2:?--variant needs cpu or cuda}"; shift 2 ;;
        --tag) image="${2:?--tag needs NAME:TAG}"; shift 2 ;;
        --save) save="${2:?--save needs a file}"; shift 2 ;;
        --no-cache) no_cache=1; shift ;;
        --no-check) check=""; shift ;;
        --print-image) print_image=1; shift ;;
        -h|--help) usage ;;
        *) echo "build_image.sh: unknown argument: $1" >&2; usage ;;
    esac
done
[[ "$variant" == cpu || "$variant" == cuda ]] || die "--variant must be cpu or cuda, not '$variant'"
if [[ -z "$image" ]]; then
    image="moe-serve:${VERSION}"
    [[ "$variant" == cpu ]] || image+="-cuda"
fi
[[ "$image" == *:* ]] || die "--tag must be NAME:TAG, not '$image'"
if [[ -n "$print_image" ]]; then echo "$image"; exit 0; fi
[[ "$(id -u)" == 0 ]] || die "run as root: buildah and mmdebstrap need it"
os="$(. /etc/os-release && echo "${VERSION_CODENAME:-} (${PRETTY_NAME:-unknown})")"
[[ "$os" == "bookworm "* ]] || die "run on Debian 12: its /usr/bin/python3 is the image's, which the wheels are \
resolved for; this is $os"

declare -a timings=()
timed() {  # timed NAME COMMAND...: run a step, print and record its duration
    local name="$1" start=$SECONDS
    shift
    log "$name"
    "$@"
    timings+=("$(printf '%-28s %4ds' "$name" $((SECONDS - start)))")
    echo "    done in $((SECONDS - start)) s"
}

run_logged() {  # run_logged LOG COMMAND...: output to LOG, its tail on failure
    local logfile="$1"
    shift
    if ! "$@" >"$logfile" 2>&1; then
        tail -n 40 "$logfile" >&2
        die "failed: $* (whole output: $logfile)"
    fi
}

ensure_tools() {
    local missing=()
    command -v buildah >/dev/null || missing+=(buildah)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    /usr/bin/python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
    if ((${#missing[@]} == 0)); then
        echo "    present: $(buildah --version), mmdebstrap $(mmdebstrap --version | cut -d' ' -f2)"
        return
    fi
    echo "    installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
}

make_base_image() {
    if [[ -z "$no_cache" ]] && buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "    present: $BASE_IMAGE (--no-cache makes it anew)"
        return
    fi
    local tarball="$WORK/base.tar" container
    # minbase with merged /usr (no usrmerge package, so no perl); docs, man pages and locales are left out of this
    # and of every later package, as in Docker's debian:bookworm-slim
    run_logged "$WORK/mmdebstrap.log" mmdebstrap --variant=minbase \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        bookworm "$tarball" "deb $DEBIAN_MIRROR bookworm main" "deb $DEBIAN_MIRROR bookworm-updates main" \
        "deb $DEBIAN_SECURITY_MIRROR bookworm-security main"
    container="$(buildah from scratch)"
    buildah add --quiet "$container" "$tarball" / >/dev/null
    buildah config --cmd /bin/bash "$container"
    buildah commit --quiet --rm "$container" "$BASE_IMAGE" >/dev/null
    rm -f "$tarball"
    echo "    made $BASE_IMAGE ($(buildah images --format '{{.Size}}' "$BASE_IMAGE"))"
}

stage_wheels() {
    local venv="$WORK/stage-venv"
    if [[ ! -x "$venv/bin/python" ]]; then
        /usr/bin/python3 -m venv "$venv"
        run_logged "$WORK/pip.log" "$venv/bin/python" -m pip install --upgrade pip
    fi
    # the project's wheel is built from the committed HEAD, not the working tree (uncommitted edits stay out, and
    # setuptools' stale build/lib cannot leak into it); a fixed SOURCE_DATE_EPOCH gives a wheel that changes only
    # with its contents, and so a digest that keeps the image's layer cache while nothing changed
    rm -rf "$WORK/wheels" "$WORK/src"
    mkdir -p "$WORK/src"
    git archive --format=tar HEAD | tar -xf - -C "$WORK/src"
    if [[ "$variant" == cpu ]]; then
        SOURCE_DATE_EPOCH=315532800 run_logged "$WORK/pip.log" "$venv/bin/python" -m pip wheel \
            --wheel-dir "$WORK/wheels" "./$WORK/src[reference]"
    else
        SOURCE_DATE_EPOCH=315532800 run_logged "$WORK/pip.log" "$venv/bin/python" -m pip wheel --no-deps \
            --wheel-dir "$WORK/wheels" "./$WORK/src"
        # beside the wheel, so it is in the build context and in the digest
        cp "$WORK/src/requirements/cuda.txt" "$WORK/wheels/requirements-cuda.txt"
    fi
    wheels_digest="$(cd "$WORK/wheels" && sha256sum -- * | sha256sum | cut -c1-16)"
    echo "    $(find "$WORK/wheels" -name '*.whl' | wc -l) wheels, $(du -sh "$WORK/wheels" | cut -f1)," \
         "digest $wheels_digest; torch: $(cd "$WORK/wheels" && ls torch-* 2>/dev/null || echo 'from PyPI')"
}

build_image() {
    local args=(--isolation chroot --layers --build-arg "BASE=$BASE_IMAGE" --build-arg "VARIANT=$variant"
                --build-arg "VERSION=$VERSION" --build-arg "WHEELS_DIGEST=$wheels_digest"
                --build-arg "REVISION=$(git rev-parse HEAD)" --tag "$image")
    [[ -n "$no_cache" ]] && args+=(--no-cache)
    # the steps as they go, the whole output in $WORK/build.log
    if ! buildah bud "${args[@]}" . 2>&1 | tee "$WORK/build.log" \
            | grep --line-buffered -E '^(STEP [0-9]+/|--> Using cache|Successfully|/opt/moe-serve/kernels)' \
            | cut -c1-116; then
        tail -n 40 "$WORK/build.log" >&2
        die "the image build failed (whole output: $WORK/build.log)"
    fi
}

# Runs inside the image as its user, in a login shell as KubeRay's `bash -lc` does.
CHECK='set -euo pipefail
echo "user $(id -un) ($(id -u)), $(python3 --version), moe-serve $(pip show moe-serve | sed -n "s/^Version: //p")"
for tool in moe-serve ray wget redis-server g++; do printf "  %-13s %s\n" "$tool" "$(command -v "$tool")"; done
moe-serve make-tiny-model /tmp/tiny-model 2>/tmp/tiny.log || { cat /tmp/tiny.log; exit 1; }
echo "$ moe-serve generate /tmp/tiny-model --prompt \"$PROMPT\" --max-tokens 16"
moe-serve generate /tmp/tiny-model --prompt "$PROMPT" --max-tokens 16 | tee /tmp/in-process.json
echo "$ moe-serve generate /tmp/tiny-model --prompt \"$PROMPT\" --max-tokens 16 --shards 2   # Ray, 2 shard actors"
moe-serve generate /tmp/tiny-model --prompt "$PROMPT" --max-tokens 16 --shards 2 2>/tmp/ray.log \
    | tee /tmp/shards.json || { tail -n 30 /tmp/ray.log; exit 1; }
python3 - <<EOF
import json
local, sharded = (json.load(open(f"/tmp/{name}.json")) for name in ("in-process", "shards"))
assert local["completion_tokens"] == 16 and local["token_ids"] == sharded["token_ids"], (local, sharded)
print("in-process and 2-shard greedy tokens agree:", local["token_ids"])
EOF'

check_image() {
    local container
    container="$(buildah from --quiet "$image")"
    # unshare: a PID namespace of the check's own, so no Ray process it starts outlives it on this host
    if ! unshare --pid --fork --mount-proc buildah run --isolation chroot --env "PROMPT=$PROMPT" "$container" -- \
            bash -lc "$CHECK"; then
        buildah rm "$container" >/dev/null
        die "the in-image check failed"
    fi
    buildah rm "$container" >/dev/null
}

save_archive() {
    rm -f "$save"
    buildah push --quiet "$image" "docker-archive:$save:$image"
    echo "    $save ($(du -h "$save" | cut -f1)): docker load -i $save"
}

mkdir -p "$WORK"
log "moe-serve $VERSION at $(git rev-parse --short HEAD), variant $variant, image $image"
timed "1. build tools" ensure_tools
timed "2. base image" make_base_image
timed "3. stage wheels" stage_wheels
timed "4. build image" build_image
log "image $image: id $(buildah images --format '{{.ID}}' "$image" | head -n 1)," \
    "size $(buildah images --format '{{.Size}}' "$image" | head -n 1)"
if [[ -n "$check" ]]; then timed "5. in-image check" check_image; fi
if [[ -n "$save" ]]; then timed "6. docker-archive" save_archive; fi
log "durations"
printf '    %s\n' "${timings[@]}"
