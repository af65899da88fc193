"""Deployment configs are valid for the tools that consume them, not just plausible YAML.

- ray_configs/serve.yaml: Ray's ServeDeploySchema (what `serve deploy` validates), its import path imports, and its
  args build the Serve application (as Serve's controller builds it) with the autoscaling bounds written there.
- ray_configs/cluster.yaml: the Ray cluster launcher's JSON schema (ray/autoscaler/ray-schema.json) and the checks
  `ray up` makes on the config after filling in the provider's defaults.
- helm/moe-serve: a real `helm` (installed by scripts/ensure_helm.sh) lints and renders the chart with default and
  non-default values; every rendered object validates against the Kubernetes JSON schemas (kubernetes-validate,
  strict: unknown fields are errors) or, for the RayService, against tests/schemas/rayservice-ray-v1.json (derived
  from KubeRay's ray.io/v1 types, embedding the Kubernetes schemas); its serveConfigV2 is ServeDeploySchema-valid
  and, with default values, the very config of ray_configs/serve.yaml; bad values are refused with a message.
  Monitoring objects: the Grafana dashboard ConfigMap carries the committed dashboard, and the PodMonitor and
  PrometheusRule (when enabled) validate against tests/schemas/*-monitoring-v1.json (derived from prometheus-operator's
  CRDs, see derive_monitoring_schemas.py there); the PrometheusRule carries prometheus/alerts.yaml.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[1]
SERVE_YAML = REPO / "ray_configs" / "serve.yaml"
CLUSTER_YAML = REPO / "ray_configs" / "cluster.yaml"
CHART = REPO / "helm" / "moe-serve"
SCHEMAS = Path(__file__).parent / "schemas"
RAYSERVICE_SCHEMA = SCHEMAS / "rayservice-ray-v1.json"
MONITORING_SCHEMAS = {"PodMonitor": SCHEMAS / "podmonitor-monitoring-v1.json",
                      "PrometheusRule": SCHEMAS / "prometheusrule-monitoring-v1.json"}
KUBE_VERSIONS = ("1.27", "1.37")  # the chart's kubeVersion floor and the newest schemas kubernetes-validate has


# --- helpers ------------------------------------------------------------------------------------------------------

def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def unknown_keys(model: type[BaseModel], data: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys of `data` that `model` (recursively) has no field for: pydantic ignores them, so they would do nothing."""
    unknown = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(prefix + key)
        elif isinstance(value, dict) and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            unknown += unknown_keys(field.annotation, value, f"{prefix}{key}.")
    return unknown


def check_serve_config(config: dict[str, Any]) -> Any:
    """What `serve deploy` and Serve's controller do with a config, short of running it: the BuiltApplication."""
    from ray._common.utils import import_attr
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    from moe_serve.replicas.settings import AppSettings

    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.name == "moe-serve" and app.route_prefix == "/"
    unknown = unknown_keys(AppSettings, app.args)
    assert not unknown, f"args AppSettings does not know (they would be ignored): {sorted(unknown)}"
    builder = import_attr(app.import_path)
    built = build_app(builder(app.args), name=app.name, route_prefix=app.route_prefix)
    engine = next(d for d in built.deployments if d.name == "EngineReplica")
    autoscaling = engine._deployment_config.autoscaling_config
    # Import paths Serve resolves later, on the cluster: fail here instead.
    if autoscaling.policy is not None:
        import_attr(autoscaling.policy.policy_function)
    router = engine._deployment_config.request_router_config
    if router is not None and isinstance(router.request_router_class, str):
        import_attr(router.request_router_class)
    return built


def engine_autoscaling(built: Any) -> Any:
    return next(d for d in built.deployments if d.name == "EngineReplica")._deployment_config.autoscaling_config


@pytest.fixture(scope="session")
def helm() -> str:
    path = Path(sys.prefix) / "bin" / "helm"
    found = str(path) if path.is_file() else shutil.which("helm")
    assert found, "no helm binary: run `make install` (scripts/ensure_helm.sh installs it into the venv)"
    return found


def run_helm(helm: str, *args: str, tmp_path: Path, values: dict[str, Any] | None = None
             ) -> subprocess.CompletedProcess[str]:
    cmd = [helm, *args]
    if values is not None:
        values_file = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        cmd += ["-f", str(values_file)]
    home = tmp_path / "helm-home"  # keep helm's cache, config and data out of the user's home
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def render(helm: str, tmp_path: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    lint = run_helm(helm, "lint", "--strict", str(CHART), tmp_path=tmp_path, values=values)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    out = run_helm(helm, "template", "moe", str(CHART), "--namespace", "serving", "--kube-version", "1.30.0",
                   tmp_path=tmp_path, values=values)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@cache
def crd_validator(schema_path: Path, version: str) -> jsonschema.Draft202012Validator:
    """A derived CRD schema, its Kubernetes $refs resolved to `version`'s strict definitions in kubernetes-validate."""
    schema = json.loads(schema_path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    defs_path = (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
                 / f"v{version}.0-local-strict" / "_definitions.json")
    defs = Resource.from_contents(json.loads(defs_path.read_text()))
    registry = Registry().with_resources([(defs.id(), defs), (schema["$id"], Resource.from_contents(schema))])
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.fixture(scope="session")
def rayservice_validators() -> dict[str, jsonschema.Draft202012Validator]:
    """The derived RayService schema per Kubernetes version."""
    return {version: crd_validator(RAYSERVICE_SCHEMA, version) for version in KUBE_VERSIONS}


def crd_errors(obj: dict[str, Any], validator: jsonschema.Draft202012Validator) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def validate_object(obj: dict[str, Any], rayservice_validators: dict[str, jsonschema.Draft202012Validator]) -> None:
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    for version in KUBE_VERSIONS:
        if obj["apiVersion"] == "ray.io/v1":
            assert obj["kind"] == "RayService", name
            errors = crd_errors(obj, rayservice_validators[version])
            assert not errors, f"{name} fails the RayService schema (Kubernetes {version}): {errors[:5]}"
            continue
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            errors = crd_errors(obj, crd_validator(MONITORING_SCHEMAS[obj["kind"]], version))
            assert not errors, f"{name} fails the {obj['kind']} schema (Kubernetes {version}): {errors[:5]}"
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} fails Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}")
    if obj["apiVersion"] == "ray.io/v1":
        check_kuberay_rules(obj["spec"])


def check_kuberay_rules(spec: dict[str, Any]) -> None:
    """Relations no schema states that KubeRay's operator relies on, and serveConfigV2 as Serve will read it."""
    cluster = spec["rayClusterConfig"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"], "the head pod needs a (Ray) container"
    names = [g["groupName"] for g in cluster.get("workerGroupSpecs", [])]
    assert len(names) == len(set(names)), f"worker group names repeat: {names}"
    for group in cluster.get("workerGroupSpecs", []):
        assert group["template"]["spec"]["containers"], group["groupName"]
        assert 0 <= group["minReplicas"] <= group["maxReplicas"], group
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group
    check_serve_config(yaml.safe_load(spec["serveConfigV2"]))


def by_kind(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        kinds.setdefault(obj["kind"], []).append(obj)
    return kinds


def ray_containers(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [t["spec"]["containers"][0] for t in templates]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def serve_args(rayservice: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]


# --- ray_configs/serve.yaml ---------------------------------------------------------------------------------------

def test_serve_yaml_is_a_valid_serve_deploy_config() -> None:
    config = load_yaml(SERVE_YAML)
    built = check_serve_config(config)
    assert {d.name for d in built.deployments} == {"Ingress", "EngineReplica", "ExpertShards"}
    assert built.ingress_deployment_name == "Ingress"
    autoscaling = engine_autoscaling(built)
    written = config["applications"][0]["args"]["autoscaling"]
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (written["min_replicas"], written["max_replicas"])
    assert autoscaling.policy.policy_function == "moe_serve.replicas.autoscaling:llm_load_policy"


def test_colocated_app_is_one_autoscaled_ingress_holding_the_engine() -> None:
    config = load_yaml(SERVE_YAML)
    args = config["applications"][0]["args"]
    args.update(colocated=True, shards=0)
    from ray._common.utils import import_attr
    from ray.serve._private.build_app import build_app

    from moe_serve.replicas.settings import AppSettings

    built = build_app(import_attr(config["applications"][0]["import_path"])(args), name="moe-serve")
    [ingress] = built.deployments
    assert ingress.name == "Ingress" and built.ingress_deployment_name == "Ingress"
    settings = AppSettings.model_validate(args)
    deployment_config = ingress._deployment_config
    assert deployment_config.autoscaling_config.max_replicas == settings.autoscaling.max_replicas
    assert deployment_config.max_ongoing_requests == settings.max_num_seqs + settings.limits.max_queued_requests
    assert ingress.ray_actor_options["num_cpus"] == settings.replica_num_cpus
    # prefix affinity reads token ids from the engine call: HTTP requests routed to the ingress carry none
    assert "PrefixAffinity" not in str(deployment_config.request_router_config.request_router_class)


def test_serve_deploy_schema_rejects_a_broken_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = load_yaml(SERVE_YAML)
    config["applications"].append(copy.deepcopy(config["applications"][0]))  # two apps, one name and route
    with pytest.raises(ValueError):
        ServeDeploySchema.model_validate(config)
    bad_args = copy.deepcopy(load_yaml(SERVE_YAML)["applications"][0]["args"])
    bad_args["autoscaling"]["max_replicas"] = 0
    from moe_serve.replicas.app import app_builder

    with pytest.raises(ValueError):
        app_builder(bad_args)


# --- ray_configs/cluster.yaml -------------------------------------------------------------------------------------

def ray_cluster_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_is_a_valid_ray_cluster_launcher_config() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(CLUSTER_YAML)
    jsonschema.validate(config, ray_cluster_schema())
    # What `ray up` does before launching anything: fill in the provider's defaults, then validate.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU")]
    assert gpu_types and all(0 <= t["min_workers"] <= t["max_workers"] for t in gpu_types)
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "pip install" in commands and "moe-serve" in commands
    assert "--port=6379" not in commands  # Ray's GCS never takes Redis's port
    assert "moe-serve.env" in commands  # the Redis URL and API key reach `ray start` through the env file
    example = (REPO / "ray_configs" / "moe-serve.env.example").read_text()
    assert "MOE_SERVE_REDIS_URL=" in example and "MOE_SERVE_API_KEY=" in example


def test_cluster_schema_rejects_a_broken_config() -> None:
    config = load_yaml(CLUSTER_YAML)
    config["available_node_types"]["worker.gpu"]["resources"]["GPU"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_cluster_schema())


# --- helm/moe-serve -----------------------------------------------------------------------------------------------

def test_chart_values_schema_is_valid_and_strict() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(load_yaml(CHART / "values.yaml"))
    assert schema["additionalProperties"] is False


def test_validators_catch_broken_objects(helm: str, tmp_path: Path, rayservice_validators: Any) -> None:
    """The schemas are not vacuous: a typo or a wrong type anywhere in a rendered object is an error."""
    kinds = by_kind(render(helm, tmp_path))
    (rayservice,) = kinds["RayService"]

    def rayservice_errors(mutate: Any) -> list[str]:
        broken = copy.deepcopy(rayservice)
        mutate(broken["spec"])
        return [e.message for e in rayservice_validators[KUBE_VERSIONS[-1]].iter_errors(broken)]

    def workers(spec: dict[str, Any]) -> dict[str, Any]:
        return spec["rayClusterConfig"]["workerGroupSpecs"][0]

    def container(spec: dict[str, Any]) -> dict[str, Any]:
        return workers(spec)["template"]["spec"]["containers"][0]

    mutations = {
        "typo in a container": lambda s: container(s).update(imagePullPolice="x"),
        "GPU limit not a quantity": lambda s: container(s)["resources"]["limits"].update({"nvidia.com/gpu": [1]}),
        "rayStartParams number": lambda s: workers(s)["rayStartParams"].update({"num-gpus": 1}),
        "no groupName": lambda s: workers(s).pop("groupName"),
        "autoscaling flag not a bool": lambda s: s["rayClusterConfig"].update(enableInTreeAutoscaling="yes"),
        "unknown spec field": lambda s: s.update(serveConfig="{}"),
        "bad upscaling mode": lambda s: s["rayClusterConfig"]["autoscalerOptions"].update(upscalingMode="Fast"),
        "service port not a number": lambda s: s["serveService"]["spec"]["ports"][0].update(port="http"),
        "maxReplicas beyond int32": lambda s: workers(s).update(maxReplicas=2**31),
    }
    for what, mutate in mutations.items():
        assert rayservice_errors(mutate), f"the RayService schema missed: {what}"
    (statefulset,) = kinds["StatefulSet"]
    broken = copy.deepcopy(statefulset)
    broken["spec"]["template"]["spec"]["containers"][0]["argz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)


def test_chart_default_render(helm: str, tmp_path: Path, rayservice_validators: Any) -> None:
    objects = render(helm, tmp_path)
    for obj in objects:
        validate_object(obj, rayservice_validators)
    kinds = by_kind(objects)
    # no Secret: no API key configured; no PodMonitor or PrometheusRule: they need prometheus-operator's CRDs
    assert sorted(kinds) == ["ConfigMap", "RayService", "Service", "StatefulSet"]
    (dashboards,) = kinds["ConfigMap"]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboards["metadata"]["namespace"] == "serving"
    assert dashboards["data"] == {"moe-serve.json": (CHART / "dashboards" / "moe-serve.json").read_text().rstrip("\n")}
    (rayservice,) = kinds["RayService"]
    spec = rayservice["spec"]
    # The same Serve config as ray_configs/serve.yaml.
    assert yaml.safe_load(spec["serveConfigV2"]) == load_yaml(SERVE_YAML)
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (workers["minReplicas"], workers["maxReplicas"]) == (1, 4)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    # Redis with a memory cap and an eviction policy; every Ray container finds it through the env.
    (redis,) = kinds["StatefulSet"]
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory") + 1] == "2gb"
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    (redis_service,) = kinds["Service"]
    for container in ray_containers(rayservice):
        env = env_of(container)
        assert env["MOE_SERVE_REDIS_URL"] == f"redis://{redis_service['metadata']['name']}.serving.svc:6379/0"
        assert "MOE_SERVE_API_KEY" not in env
    # Prometheus scrape annotations on the Ray pods and on the HTTP Service.
    head_annotations = cluster["headGroupSpec"]["template"]["metadata"]["annotations"]
    assert head_annotations["prometheus.io/scrape"] == "true" and head_annotations["prometheus.io/port"] == "8080"
    assert spec["serveService"]["metadata"]["annotations"]["prometheus.io/port"] == "8000"


def test_chart_external_redis_existing_secret_and_bounds(helm: str, tmp_path: Path, rayservice_validators: Any
                                                         ) -> None:
    values = {
        "image": {"repository": "registry.example/moe-serve", "tag": "0.1.0-gpu"},
        "model": {"dir": "/models/mixtral-8x7b", "name": "mixtral", "makeTinyModel": False, "quantize": "int8",
                  "volume": {"type": "pvc", "mountPath": "/models", "pvc": {"claimName": "mixtral-weights"}}},
        "engine": {"autoscaling": {"minReplicas": 2, "maxReplicas": 12, "initialReplicas": None,
                                   "downscaleToZeroDelaySeconds": 300}},
        "shards": 16,
        "shardPlacement": "STRICT_SPREAD",
        "cache": {"warmTtlSeconds": 1800, "coldTtlSeconds": 86400, "hotBytes": 1 << 30},
        "workers": {"gpusPerWorker": 8, "replicas": 2, "minReplicas": 2, "maxReplicas": 6},
        "apiKey": {"existingSecret": "moe-api", "existingSecretKey": "token"},
        "redis": {"external": {"url": "rediss://cache.example:6380/0", "coldUrl": "rediss://cache.example:6380/1",
                               "auth": {"existingSecret": "redis-acl", "usernameKey": "user",
                                        "passwordKey": "pass"},
                               "tls": {"existingSecret": "redis-tls", "clientAuth": True}}},
        "service": {"type": "LoadBalancer", "port": 80},
    }
    objects = render(helm, tmp_path, values)
    for obj in objects:
        validate_object(obj, rayservice_validators)
    kinds = by_kind(objects)
    assert sorted(kinds) == ["ConfigMap", "RayService"]  # no Redis, no Secret of ours; the dashboards
    (rayservice,) = kinds["RayService"]
    args = serve_args(rayservice)
    assert args["autoscaling"]["min_replicas"] == 2 and args["autoscaling"]["max_replicas"] == 12
    assert "initial_replicas" not in args["autoscaling"]
    assert args["autoscaling"]["downscale_to_zero_delay_s"] == 300
    assert (args["model_dir"], args["model_name"], args["quantize"]) == ("/models/mixtral-8x7b", "mixtral", "int8")
    assert args["shards"] == 16 and args["placement"] == "STRICT_SPREAD"
    assert args["cache"] == {"warm_ttl_s": 1800, "cold_ttl_s": 86400, "hot_bytes": 1 << 30}
    built = check_serve_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    assert (engine_autoscaling(built).min_replicas, engine_autoscaling(built).max_replicas) == (2, 12)
    cluster = rayservice["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    assert (workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (2, 2, 6)
    assert workers["rayStartParams"]["num-gpus"] == "8"
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "mixtral-weights", "readOnly": True}
    assert "initContainers" not in workers["template"]["spec"]
    for container in ray_containers(rayservice):
        env = env_of(container)
        assert container["image"] == "registry.example/moe-serve:0.1.0-gpu"
        assert env["MOE_SERVE_REDIS_URL"] == "rediss://cache.example:6380/0"
        assert env["MOE_SERVE_COLD_CACHE_URL"] == "rediss://cache.example:6380/1"
        assert env["MOE_SERVE_API_KEY"] == {"secretKeyRef": {"name": "moe-api", "key": "token"}}
        # Redis's secrets come from Secrets (never in the URL or values) and its CA from a mounted one
        assert env["MOE_SERVE_REDIS_USERNAME"] == {"secretKeyRef": {"name": "redis-acl", "key": "user",
                                                                    "optional": True}}
        assert env["MOE_SERVE_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "redis-acl", "key": "pass",
                                                                    "optional": True}}
        assert env["MOE_SERVE_REDIS_CA_CERT"] == "/etc/moe-serve/redis-tls/ca.crt"
        assert env["MOE_SERVE_REDIS_CLIENT_KEY"] == "/etc/moe-serve/redis-tls/tls.key"
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["redis-tls"] == {"name": "redis-tls", "mountPath": "/etc/moe-serve/redis-tls", "readOnly": True}
    assert volumes["redis-tls"]["secret"] == {"secretName": "redis-tls", "defaultMode": 0o440}
    assert rayservice["spec"]["serveService"]["spec"]["type"] == "LoadBalancer"


def test_chart_created_secret_hostpath_and_persistent_redis(helm: str, tmp_path: Path, rayservice_validators: Any
                                                            ) -> None:
    values = {
        "apiKey": {"value": "s3cret-token"},
        "model": {"dir": "/mnt/models/qwen", "makeTinyModel": False,
                  "volume": {"type": "hostPath", "hostPath": {"path": "/data/models"}}},
        "engine": {"autoscaling": {"minReplicas": 0, "maxReplicas": 3, "initialReplicas": 0}},
        "redis": {"maxmemory": "6gb", "maxmemoryPolicy": "volatile-lfu",
                  "persistence": {"enabled": True, "size": "20Gi", "storageClassName": "fast"},
                  "resources": {"requests": {"memory": "7Gi"}, "limits": {"memory": "7Gi"}}},
        "metrics": {"prometheusAnnotations": False},
        "workers": {"rayStartParams": {"object-store-memory": "4000000000"}},
        "shards": None, "shardPlacement": None,  # null: left to the app's defaults
        "cache": {"hotBytes": None, "warmTtlSeconds": None, "coldTtlSeconds": None},
    }
    objects = render(helm, tmp_path, values)
    for obj in objects:
        validate_object(obj, rayservice_validators)
    kinds = by_kind(objects)
    (secret,) = kinds["Secret"]
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "s3cret-token"
    (rayservice,) = kinds["RayService"]
    for container in ray_containers(rayservice):
        assert env_of(container)["MOE_SERVE_API_KEY"] == {
            "secretKeyRef": {"name": secret["metadata"]["name"], "key": "api-key"}}
    args = serve_args(rayservice)
    assert (args["autoscaling"]["min_replicas"], args["autoscaling"]["initial_replicas"]) == (0, 0)
    assert "shards" not in args and "placement" not in args and "cache" not in args
    cluster = rayservice["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["rayStartParams"]["object-store-memory"] == "4000000000"
    assert {"name": "model", "hostPath": {"path": "/data/models", "type": "Directory"}} in \
        workers["template"]["spec"]["volumes"]
    assert "annotations" not in cluster["headGroupSpec"]["template"]["metadata"]
    (redis,) = kinds["StatefulSet"]
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory") + 1] == "6gb" and "volatile-lfu" in args and "--appendonly" in args
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast"


def test_chart_monitoring_objects(helm: str, tmp_path: Path, rayservice_validators: Any) -> None:
    values = {"metrics": {
        "podMonitor": {"enabled": True, "interval": "30s", "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "grafanaDashboard": {"namespace": "monitoring", "labels": {"grafana_dashboard": "moe"},
                             "annotations": {"grafana_folder": "LLM serving"}}}}
    objects = render(helm, tmp_path, values)
    for obj in objects:
        validate_object(obj, rayservice_validators)
    kinds = by_kind(objects)
    (dashboards,) = kinds["ConfigMap"]
    assert dashboards["metadata"]["namespace"] == "monitoring"
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "moe"
    assert dashboards["metadata"]["annotations"] == {"grafana_folder": "LLM serving"}
    json.loads(dashboards["data"]["moe-serve.json"])
    (rule,) = kinds["PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == load_yaml(CHART / "prometheus" / "alerts.yaml")
    (monitor,) = kinds["PodMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    ray_endpoint, app_endpoint = monitor["spec"]["podMetricsEndpoints"]
    assert ray_endpoint["interval"] == app_endpoint["interval"] == "30s"
    # the endpoints name ports the Ray containers have; the app's /metrics is kept on the head only
    (rayservice,) = kinds["RayService"]
    head, *workers = ray_containers(rayservice)
    for container in (head, *workers):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == 8080 and ports["serve"] == 8000
    assert app_endpoint["port"] == "serve" and app_endpoint["relabelings"] == [{
        "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"], "regex": "ray-head",
        "action": "keep"}]
    cluster = rayservice["spec"]["rayClusterConfig"]
    pod_labels = [cluster["headGroupSpec"]["template"]["metadata"]["labels"],
                  *(g["template"]["metadata"]["labels"] for g in cluster["workerGroupSpecs"])]
    selector = monitor["spec"]["selector"]
    (components,) = selector["matchExpressions"]
    for labels in pod_labels:
        assert selector["matchLabels"].items() <= labels.items() and labels[components["key"]] in components["values"]

    # The derived schemas are not vacuous.
    def errors(obj: dict[str, Any], mutate: Any) -> list[str]:
        broken = copy.deepcopy(obj)
        mutate(broken["spec"])
        return crd_errors(broken, crd_validator(MONITORING_SCHEMAS[obj["kind"]], KUBE_VERSIONS[-1]))

    mutations = {
        "endpoint typo": (monitor, lambda s: s["podMetricsEndpoints"][0].update(intervall="30s")),
        "interval not a duration": (monitor, lambda s: s["podMetricsEndpoints"][0].update(interval="30 seconds")),
        "bad relabel action": (monitor, lambda s: s["podMetricsEndpoints"][1]["relabelings"][0].update(action="kept")),
        "no selector": (monitor, lambda s: s.pop("selector")),
        "rule without expr": (rule, lambda s: s["groups"][0]["rules"][0].pop("expr")),
        "rule typo": (rule, lambda s: s["groups"][0]["rules"][0].update(fore="5m")),
        "group without name": (rule, lambda s: s["groups"][0].pop("name")),
    }
    for what, (obj, mutate) in mutations.items():
        assert errors(obj, mutate), f"the {obj['kind']} schema missed: {what}"


def test_chart_notes_render(helm: str, tmp_path: Path) -> None:
    """NOTES.txt renders (a client-side dry-run install needs no cluster) and warns when the API is open."""
    def notes(values: dict[str, Any]) -> str:
        result = run_helm(helm, "install", "moe", str(CHART), "--dry-run=client", "-n", "serving",
                          tmp_path=tmp_path, values=values)
        assert result.returncode == 0, result.stderr
        return result.stdout.split("NOTES:", 1)[1]

    open_api = notes({})
    assert "kubectl get rayservice moe-moe-serve -n serving" in open_api and "WARNING: no API key" in open_api
    assert "WARNING" not in notes({"apiKey": {"existingSecret": "moe-api"}})


# Refused by values.schema.json: `helm lint` and `helm template` (so `helm install`) both fail.
BAD_VALUES = [
    pytest.param({"engine": {"autoscaling": {"maxReplicas": 0}}}, "maxReplicas", id="max-replicas-zero"),
    pytest.param({"model": {"quantize": "fp8"}}, "quantize", id="quantize-enum"),
    pytest.param({"engine": {"maxNumSeqs": "64"}}, "maxNumSeqs", id="wrong-type"),
    pytest.param({"engine": {"kvCacheBytes": 0}}, "kvCacheBytes", id="below-minimum"),
    pytest.param({"engine": {"batchSize": 8}}, "batchSize", id="unknown-key"),
    pytest.param({"shards": 0}, "shards", id="zero-shards"),
    pytest.param({"shardPlacement": "RANDOM"}, "shardPlacement", id="placement-enum"),
    pytest.param({"redis": {"maxmemoryPolicy": "noeviction"}}, "maxmemoryPolicy", id="no-eviction"),
    pytest.param({"redis": {"maxmemory": "lots"}}, "maxmemory", id="maxmemory-format"),
    pytest.param({"redis": {"external": {"url": "http://cache:6379"}}}, "url", id="redis-url-scheme"),
    pytest.param({"apiKey": {"existingSecret": "moe-api", "value": "inline"}}, "value", id="secret-and-value"),
    pytest.param({"model": {"volume": {"type": "pvc"}, "makeTinyModel": False}}, "claimName", id="pvc-without-claim"),
    pytest.param({"workers": {"gpusPerWorker": 0}}, "gpusPerWorker", id="zero-gpus"),
    pytest.param({"service": {"type": "Ingress"}}, "type", id="service-type-enum"),
    pytest.param({"metrics": {"podMonitor": {"interval": "15 seconds"}}}, "interval", id="monitor-interval-format"),
    pytest.param({"metrics": {"grafanaDashboard": {"folder": "LLM"}}}, "folder", id="dashboard-unknown-key"),
    # KubeRay's rayStartParams are strings; a number would also lose digits in Helm's rendering (4e+09).
    pytest.param({"workers": {"rayStartParams": {"object-store-memory": 4000000000}}}, "object-store-memory",
                 id="ray-start-param-number"),
]

# Relations JSON schema cannot state, checked by the templates (`fail`): `helm template` and `helm install` fail;
# `helm lint` only reports them (Helm's lint mode does not stop at `fail`).
BAD_RELATIONS = [
    pytest.param({"engine": {"autoscaling": {"minReplicas": 6, "maxReplicas": 5, "initialReplicas": None}}},
                 "maxReplicas (5) must be >= minReplicas (6)", id="min-above-max"),
    pytest.param({"engine": {"autoscaling": {"initialReplicas": 9}}}, "initialReplicas (9) must lie",
                 id="initial-outside-bounds"),
    pytest.param({"workers": {"minReplicas": 3, "maxReplicas": 2, "replicas": 2}},
                 "workers.maxReplicas (2) must be >= workers.minReplicas (3)", id="worker-min-above-max"),
    pytest.param({"shards": 9}, "shards (9) need one GPU each", id="shards-exceed-gpus"),
    pytest.param({"model": {"dir": "/elsewhere/model"}}, "must lie under model.volume.mountPath", id="dir-outside"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_chart_schema_rejects_bad_values(helm: str, tmp_path: Path, values: dict[str, Any], message: str) -> None:
    for command in (["lint", "--strict", str(CHART)], ["template", "moe", str(CHART)]):
        result = run_helm(helm, *command, values=values, tmp_path=tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode != 0, f"helm {command[0]} accepted {values}"
        assert "values don't meet the specifications of the schema" in output, output
        assert message in output, f"helm {command[0]}: {output}"


@pytest.mark.parametrize(("values", "message"), BAD_RELATIONS)
def test_chart_templates_reject_bad_relations(helm: str, tmp_path: Path, values: dict[str, Any], message: str
                                              ) -> None:
    result = run_helm(helm, "template", "moe", str(CHART), values=values, tmp_path=tmp_path)
    assert result.returncode != 0, f"helm template accepted {values}"
    assert message in result.stderr, result.stderr
    lint = run_helm(helm, "lint", str(CHART), values=values, tmp_path=tmp_path)
    assert message in lint.stdout + lint.stderr
