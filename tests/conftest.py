"""Shared fixtures: small random checkpoints in Hugging Face layout, written by `transformers` itself."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Two cores: keep torch from oversubscribing when Ray workers or a second process share them.
torch.set_num_threads(2)

BASE = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    initializer_range=0.1,  # wider than the default so greedy tokens are not decided by near-ties
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(params=["compiled", "torch"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the compiled CPU kernels, then again on torch ops only (the path without a build)."""
    from moe_serve.kernels import cpu_ops
    from moe_serve.model import attention, linear, moe, resident_experts

    if request.param == "torch":
        for module in (attention, linear, moe, resident_experts):
            monkeypatch.setattr(module, "_OPS", None)
    else:
        assert cpu_ops() is not None, "the compiled CPU kernels did not build: see the warning it logged"
    return request.param


def save_hf_model(out_dir: Path, family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                  **overrides: Any) -> Path:
    """A random `transformers` model of `family`, saved with `save_pretrained` (the layout users have) in `dtype`."""
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        OlmoeConfig,
        OlmoeForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    classes = {
        "mixtral": (MixtralConfig, MixtralForCausalLM, dict(intermediate_size=96, num_local_experts=8,
                                                            num_experts_per_tok=2)),
        "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(intermediate_size=128, moe_intermediate_size=48,
                                                                shared_expert_intermediate_size=80, num_experts=8,
                                                                num_experts_per_tok=2)),
        "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(intermediate_size=128, moe_intermediate_size=48,
                                                                num_local_experts=8, num_experts_per_tok=2,
                                                                head_dim=16, norm_topk_prob=True)),
        "olmoe": (OlmoeConfig, OlmoeForCausalLM, dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2)),
    }
    config_cls, model_cls, family_defaults = classes[family]
    torch.manual_seed(seed)
    config = config_cls(**{**BASE, **family_defaults, **overrides})
    model = model_cls(config).to(dtype).eval()
    model.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("mixtral"), "mixtral")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Exercises every Qwen2-MoE feature: shared expert, norm_topk_prob, a dense layer via mlp_only_layers.
    return save_hf_model(
        tmp_path_factory.mktemp("qwen2"), "qwen2_moe", num_hidden_layers=3, norm_topk_prob=True, mlp_only_layers=[1]
    )


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("qwen3"), "qwen3_moe")


@pytest.fixture(scope="session")
def olmoe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("olmoe"), "olmoe")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default made by `moe-serve make-tiny-model`: checkpoint plus tokenizer and chat template."""
    from moe_serve.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", family="mixtral", show_progress=False)


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


# --- a real redis-server for the cache tests ------------------------------------------------------------------

REDIS_SERVER_BIN = "/usr/bin/redis-server"


class RedisServer:
    """A private redis-server on a free loopback port, without persistence; the test owns it and may kill,
    pause (SIGSTOP: a stalled server) and restart it on the same port (empty, as after a crash)."""

    def __init__(self, workdir: Path, *extra_args: str, **client_kwargs: Any) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.extra_args = extra_args
        self.client_kwargs = client_kwargs  # how the test itself connects (an ACL user, say)
        self.proc: Any = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        import subprocess
        import time

        import redis

        self.proc = subprocess.Popen(
            [REDIS_SERVER_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--databases", "4", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with redis.Redis(port=self.port, socket_timeout=0.5, **self.client_kwargs) as client:
                    client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.01)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def client(self, db: int = 0) -> Any:
        import redis

        return redis.Redis(port=self.port, db=db, socket_timeout=5, **self.client_kwargs)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One redis-server for the session's cache tests (use `redis_db` to get it empty)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture
def redis_db(redis_server: RedisServer) -> RedisServer:
    """The session's redis-server, emptied, with its command statistics reset."""
    with redis_server.client() as client:
        client.flushall()
        client.config_set("maxmemory", 0)
        client.config_resetstat()
    return redis_server


@pytest.fixture
def make_redis(tmp_path: Path) -> Any:
    """Factory of private redis-servers (extra command-line args allowed), killed after the test."""
    servers: list[RedisServer] = []

    def make(*extra_args: str) -> RedisServer:
        server = RedisServer(tmp_path, *extra_args).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()  # SIGKILL ends a paused (SIGSTOP) server too


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(settings: Any) -> Iterator[str]:
    """The Serve application of `settings` on a local Ray and a free loopback port; yields its base URL."""
    import ray
    from moe_serve.cluster.bringup import connect_ray
    from moe_serve.replicas.app import APP_NAME, build_app
    from ray import serve

    connect_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
