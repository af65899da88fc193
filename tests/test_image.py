"""The container image's recipe (Dockerfile, scripts/build_image.sh) agrees with the package and the Helm chart.

Static checks only: building the image is scripts/build_image.sh's own check, run outside this suite. A real `helm`
renders the chart to read the image its pods run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "build_image.sh"
DOCKERFILE = REPO / "Dockerfile"
CUDA_REQUIREMENTS = REPO / "requirements" / "cuda.txt"
CHART = REPO / "helm" / "moe-serve"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def dockerfile_arg(name: str) -> str:
    [value] = re.findall(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    return value


def script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)


def pinned(package: str) -> str:
    [version] = [dep.split("==")[1] for dep in PROJECT["dependencies"] if re.match(rf"{package}(\[.*\])?==", dep)]
    return version


@pytest.fixture(scope="module")
def rendered_images(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every container image of the chart's RayService rendered with default values (head, workers, init)."""
    path = Path(sys.prefix) / "bin" / "helm"
    helm = str(path) if path.is_file() else shutil.which("helm")
    assert helm, "no helm binary: run `make install` (scripts/ensure_helm.sh installs it into the venv)"
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    out = subprocess.run([helm, "template", "moe", str(CHART), "--kube-version", "1.30.0"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    [service] = [doc for doc in yaml.safe_load_all(out.stdout) if doc and doc["kind"] == "RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    return {c["image"] for pod in pods for c in pod["containers"] + pod.get("initContainers", [])}


def test_one_version_everywhere() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert dockerfile_arg("VERSION") == PROJECT["version"] == chart["appVersion"]
    # the Ray the image installs (pyproject's pin) is the Ray the RayService declares
    assert yaml.safe_load((CHART / "values.yaml").read_text())["rayVersion"] == pinned("ray")


def test_chart_runs_the_image_the_script_builds(rendered_images: set[str]) -> None:
    built = script("--print-image")
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip() == f"moe-serve:{PROJECT['version']}"
    assert rendered_images == {built.stdout.strip()}
    cuda = script("--variant", "cuda", "--print-image")
    assert cuda.stdout.strip() == f"moe-serve:{PROJECT['version']}-cuda", cuda.stderr


def test_script_is_executable_valid_bash_and_refuses_bad_options() -> None:
    assert os.access(SCRIPT, os.X_OK)
    syntax = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    for args, message in [(["--variant", "tpu"], "--variant must be cpu or cuda"),
                          (["--tag", "no-tag"], "--tag must be NAME:TAG"), (["--bogus"], "unknown argument")]:
        refused = script(*args, "--print-image")
        assert refused.returncode != 0 and message in refused.stderr, (args, refused.stderr)


def test_build_context_holds_the_wheels_the_dockerfile_mounts() -> None:
    [source] = re.findall(r"--mount=type=bind,source=(\S+?),target=/wheels", DOCKERFILE.read_text())
    assert f'WORK="{source.removesuffix("/wheels")}"' in SCRIPT.read_text()
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines == ["*", f"!{source}/"], "the build context must be the staged wheels alone"


def cuda_requirements() -> dict[str, tuple[Requirement, str]]:
    """requirements/cuda.txt's requirements by name, each with its line's comment ('' when none)."""
    found: dict[str, tuple[Requirement, str]] = {}
    for line in CUDA_REQUIREMENTS.read_text().splitlines():
        spec, _, comment = line.partition("#")
        if spec.strip():
            requirement = Requirement(spec.strip())
            assert requirement.name not in found, f"{requirement.name} twice in {CUDA_REQUIREMENTS.name}"
            found[requirement.name] = (requirement, comment.strip())
    return found


def test_cuda_requirements_follow_pyproject() -> None:
    """Each moe-serve requirement (base and `reference`) is in the CUDA image's file with the same pin, or with
    another and a comment `overrides <pyproject's pin>: <why>`; the vLLM pin is the `gpu` extra's."""
    cuda = cuda_requirements()
    for requirements in (PROJECT["dependencies"], PROJECT["optional-dependencies"]["reference"]):
        for wanted in map(Requirement, requirements):
            assert wanted.name in cuda, f"{wanted} (pyproject.toml) is missing from {CUDA_REQUIREMENTS.name}"
            got, comment = cuda[wanted.name]
            assert got.extras == wanted.extras, (got, wanted)
            [pin] = [spec.version for spec in wanted.specifier]
            if got.specifier == wanted.specifier:
                assert not comment.startswith("overrides"), f"{got}: marked as an override of its own pin"
            else:
                assert re.fullmatch(rf"overrides {re.escape(pin)}: \S.*", comment), (
                    f"{got} differs from pyproject's {wanted} without '# overrides {pin}: <why>'")
    assert str(cuda["ray"][0].specifier) == f"=={pinned('ray')}"  # the chart's rayVersion, too
    [vllm] = map(Requirement, PROJECT["optional-dependencies"]["gpu"])
    assert cuda["vllm"][0] == vllm
    # the moe-serve release the file was written for (the Dockerfile installs that version beside it)
    assert f"for moe-serve=={PROJECT['version']}," in CUDA_REQUIREMENTS.read_text()


def test_cuda_image_installs_the_staged_requirements_and_moe_serve_without_dependencies() -> None:
    [cuda_install] = re.findall(r"\bcuda\) (.*?);;", DOCKERFILE.read_text().replace("\\\n", ""))
    [staged] = re.findall(r"-r /wheels/(\S+)", cuda_install)
    assert f'cp "$WORK/src/{CUDA_REQUIREMENTS.relative_to(REPO)}" "$WORK/wheels/{staged}"' in SCRIPT.read_text()
    assert re.search(r'--no-deps .*"moe-serve==\$\{VERSION\}"', cuda_install), cuda_install
