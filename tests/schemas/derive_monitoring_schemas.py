"""Writes podmonitor-monitoring-v1.json and prometheusrule-monitoring-v1.json (monitoring.coreos.com/v1) beside it.

Source: the PyPI package `cloudcoil.models.prometheus_operator==0.80.1.0` (Apache-2.0), pydantic models generated from
prometheus-operator v0.80.1's CRDs (their openAPIV3Schema): field names, types, enums, patterns, bounds and required
fields come from there, through pydantic's JSON schema. No package registry reachable here ships the CRD YAML itself.
Made strict as tests/schemas/rayservice-ray-v1.json is: unknown fields are errors (kubectl's strict field validation),
null is not a value, metadata and spec are required, and metadata is Kubernetes' own ObjectMeta by $ref to
kubernetes-validate's strict definitions. Not a test dependency: run it once in a throwaway venv,
    python -m venv /tmp/cc && /tmp/cc/bin/pip install cloudcoil.models.prometheus_operator==0.80.1.0
    /tmp/cc/bin/python tests/schemas/derive_monitoring_schemas.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cloudcoil.models.prometheus_operator import v1

SOURCE = "cloudcoil.models.prometheus_operator==0.80.1.0 (PyPI; generated from prometheus-operator v0.80.1's CRDs)"
OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
NOISE = ("title", "default", "description")


def strict(node: Any) -> Any:
    """Drop titles, defaults and descriptions, null alternatives and one-element anyOfs; close every object; move a
    case-insensitivity flag to the start of its pattern."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict(value) for key, value in node.items()
           if not (key in NOISE and not isinstance(value, dict)) and key != "properties"}
    if "properties" in node:  # property names are data, never noise
        out["properties"] = {name: strict(value) for name, value in node["properties"].items()}
        out.setdefault("additionalProperties", False)
    if out.get("pattern", "").startswith("^(?i)"):  # Python's re takes inline flags only at the very start
        out["pattern"] = "(?i)^" + out["pattern"].removeprefix("^(?i)")
    if "anyOf" in out:
        options = [option for option in out.pop("anyOf") if option != {"type": "null"}]
        if len(options) == 1:
            out.update(options[0])
        else:
            out["anyOf"] = options
    return out


def derive(kind: str) -> dict[str, Any]:
    schema = strict(getattr(v1, kind).model_json_schema(by_alias=True))
    schema["$defs"].pop("ObjectMeta")
    while unused := [name for name in schema["$defs"] if f'"#/$defs/{name}"' not in json.dumps(schema)]:
        for name in unused:  # ObjectMeta's own parts, and theirs
            schema["$defs"].pop(name)
    schema["properties"].update(apiVersion={"const": "monitoring.coreos.com/v1"}, kind={"const": kind},
                                metadata={"$ref": OBJECT_META})
    name = f"{kind.lower()}-monitoring-v1.json"
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://moe-serve.local/schemas/{name}",
        "title": f"prometheus-operator {kind}, apiVersion monitoring.coreos.com/v1",
        "description": f"Derived by tests/schemas/derive_monitoring_schemas.py from {SOURCE}; strict (see there).",
        **{key: value for key, value in schema.items() if key not in ("$defs", "required")},
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "$defs": schema["$defs"],
    }


def main() -> None:
    for kind in ("PodMonitor", "PrometheusRule"):
        path = Path(__file__).parent / f"{kind.lower()}-monitoring-v1.json"
        path.write_text(json.dumps(derive(kind), indent=2, sort_keys=False) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
