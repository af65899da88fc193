"""Build the Serve application: ingress (OpenAI API) bound to autoscaled engine replicas, or with `colocated` set,
autoscaled ingress replicas each holding its engine; and with `shards` set, the `ExpertShards` deployment whose
router and shard actors every engine shares.

`build_app(settings)` is a small pure builder; `app_builder(args)` is the import path `serve deploy` and
`serve run` use with a dict of settings.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from moe_serve.replicas.api import Ingress
from moe_serve.replicas.engine_replica import EngineReplica, engine_deployment_options
from moe_serve.replicas.experts import ExpertShards
from moe_serve.replicas.settings import AppSettings

APP_NAME = "moe-serve"


def build_app(settings: AppSettings) -> Application:
    experts = None
    if settings.shards:
        experts = serve.deployment(ExpertShards, name="ExpertShards", num_replicas=1,
                                   ray_actor_options={"num_cpus": 0}).bind(settings)
    if settings.colocated:  # the ingress deployment takes the engine's resources, scaling and health checks
        return serve.deployment(Ingress, **engine_deployment_options(settings, "Ingress")).bind(None, settings, experts)
    engine = serve.deployment(EngineReplica, **engine_deployment_options(settings, "EngineReplica"))
    ingress = serve.deployment(Ingress, name="Ingress", ray_actor_options={"num_cpus": 0.25},
                               max_ongoing_requests=1000)
    return ingress.bind(engine.bind(settings, experts), settings, experts)


def app_builder(args: dict[str, Any]) -> Application:
    return build_app(AppSettings.model_validate(args))
