"""Secured Redis for the cache tiers, against real servers: TLS with a certificate the test makes, an ACL user with a
password (in the URL or the environment), a wrong password or certificate refused at start-up with a clear error
that never shows the secret, and credentials going bad at run time costing misses, not failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import RedisServer, free_port
from redis_servers import make_tls_files
from test_cache_redis import LAYOUT, MODEL, make_blocks, make_prompt, same

from moe_serve.cache import CacheConfig, TieredKVCache
from moe_serve.cache.redis_client import REDIS_ENV, RedisConfigError, RedisTarget, check, redact

PASSWORD = "pw-7c1e9a"  # distinctive, so a test can look for it in output


@pytest.fixture
def tls_redis(tmp_path: Path) -> Any:
    """A server answering TLS on `tls_port` (and plain on its port, for the test's own checks)."""
    ca, cert, key = make_tls_files(tmp_path)
    tls_port = free_port()
    server = RedisServer(tmp_path, "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file",
                         str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no").start()
    server.tls_url, server.ca = f"rediss://127.0.0.1:{tls_port}/0", ca
    yield server
    server.kill()


@pytest.fixture
def acl_redis(tmp_path: Path) -> Any:
    """A server whose only user is `alice`, with PASSWORD."""
    server = RedisServer(tmp_path, "--user", "alice", "on", f">{PASSWORD}", "~*", "&*", "+@all",
                         "--user", "default", "off", username="alice", password=PASSWORD).start()
    yield server
    server.kill()


def round_trip(url: str) -> None:
    """Blocks written through one cache are read back through another."""
    with TieredKVCache(CacheConfig(warm_url=url, lookup_timeout_s=2.0), MODEL, LAYOUT) as writer:
        keys = writer.block_keys(make_prompt(4, seed=5))
        writer.store(keys, make_blocks(4, seed=5))
        assert writer.flush()
    with TieredKVCache(CacheConfig(warm_url=url, lookup_timeout_s=2.0), MODEL, LAYOUT) as reader:
        found = reader.lookup(keys)
        assert found.tiers == ["warm"] * 4 and same(found.blocks, make_blocks(4, seed=5))


def test_tls_with_the_ca_from_the_environment(tls_redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_ENV["ssl_ca_certs"], str(tls_redis.ca))
    assert check(tls_redis.tls_url) == "single"
    round_trip(tls_redis.tls_url)


def test_tls_with_the_ca_in_the_url(tls_redis: Any) -> None:
    round_trip(f"{tls_redis.tls_url}?ssl_ca_certs={tls_redis.ca}")


def test_an_untrusted_certificate_is_refused_at_start_up(tls_redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REDIS_ENV["ssl_ca_certs"], raising=False)
    with pytest.raises(RedisConfigError, match="TLS failed"):
        check(tls_redis.tls_url)
    with pytest.raises(RedisConfigError, match="TLS failed"):
        TieredKVCache(CacheConfig(warm_url=tls_redis.tls_url), MODEL, LAYOUT)


def test_an_acl_user_in_the_url_or_the_environment(acl_redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"redis://alice:{PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    assert PASSWORD not in redact(url) and redact(url) == f"redis://alice:***@127.0.0.1:{acl_redis.port}/0"
    round_trip(url)
    monkeypatch.setenv(REDIS_ENV["username"], "alice")
    monkeypatch.setenv(REDIS_ENV["password"], PASSWORD)
    round_trip(acl_redis.url(0))


def test_a_wrong_password_is_a_clear_error_at_start_up(acl_redis: Any, tiny_model_dir: Path) -> None:
    url = f"redis://alice:not-{PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    with pytest.raises(RedisConfigError, match="authentication failed") as refused:
        TieredKVCache(CacheConfig(warm_url=url), MODEL, LAYOUT)
    assert PASSWORD not in str(refused.value)
    cli = subprocess.run([sys.executable, "-m", "moe_serve.cli", "generate", str(tiny_model_dir), "--prompt", "x",
                          "--cache", url], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "authentication failed" in cli.stderr, cli.stderr
    assert PASSWORD not in cli.stderr + cli.stdout


def test_credentials_gone_bad_at_run_time_are_misses(acl_redis: Any) -> None:
    url = f"redis://alice:{PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    with TieredKVCache(CacheConfig(warm_url=url, lookup_timeout_s=2.0), MODEL, LAYOUT) as cache:
        keys = cache.block_keys(make_prompt(4, seed=6))
        cache.store(keys, make_blocks(4, seed=6))
        assert cache.flush() and len(cache.lookup(keys).blocks) == 4
        with acl_redis.client() as admin:
            admin.execute_command("ACL", "SETUSER", "alice", "resetpass", ">rotated")
            admin.execute_command("CLIENT", "KILL", "USER", "alice")  # every connection logs in again
        assert cache.lookup(keys).blocks == []
        cache.store(cache.block_keys(make_prompt(2, seed=7)), make_blocks(2, seed=7))
        cache.flush()
        assert cache.stats_dict()["redis_errors"] >= 1


def test_a_unix_socket_url(tmp_path: Path) -> None:
    socket = tmp_path / "redis.sock"
    server = RedisServer(tmp_path, "--unixsocket", str(socket)).start()
    try:
        assert check(f"unix://{socket}?db=2") == "single"
        round_trip(f"unix://{socket}?db=2")
        with server.client(2) as client:
            assert client.dbsize() == 4
    finally:
        server.kill()


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1:6379", "neither a Redis URL"),
    ("redis://127.0.0.1:port", "bad HOST:PORT '127.0.0.1:port'"),
    ("redis://127.0.0.1:6379/first", "must be a number, got 'first'"),
    (f"redis://alice:{PASSWORD}@127.0.0.1:x", "bad HOST:PORT"),
])
def test_bad_urls_are_refused_without_their_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:  # RedisConfigError is a ValueError
        TieredKVCache(CacheConfig(warm_url=url), MODEL, LAYOUT)
    assert PASSWORD not in str(refused.value)


def test_seed_lists_and_secrets_are_parsed_and_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_ENV["password"], "from-env")
    url = f"rediss://bob:{PASSWORD}@10.0.0.1:7000,10.0.0.2:7001?ssl_ca_certs=/ca.pem"
    target = RedisTarget.parse(url)
    assert target.seeds == [("10.0.0.1", 7000), ("10.0.0.2", 7001)] and target.tls and target.db == 0
    assert target.options == {"ssl_ca_certs": "/ca.pem", "username": "bob", "password": PASSWORD}  # the URL's wins
    assert redact(url) == "rediss://bob:***@10.0.0.1:7000,10.0.0.2:7001"
    assert RedisTarget.parse("redis://10.0.0.1:7000").options == {"password": "from-env"}
