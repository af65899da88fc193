"""Redis connections for the cache tiers: one server or a Redis Cluster, plain or TLS, with or without an ACL user.

A URL names the server: `redis://[user:password@]HOST:PORT[/DB]`, `rediss://` for TLS, `unix:///PATH?db=N` for a
socket, or several seed nodes of a cluster, `redis://HOST:PORT,HOST:PORT`. Whether a single address is a cluster is
asked of the server (`INFO cluster`), so a plain URL of any cluster node works. Secrets may stay out of the URL (and
so out of Serve's config and every status page): the user, password and TLS files come from the environment when the
URL has none (REDIS_ENV). URLs are only ever shown redacted (`redact`).

A wrong password or certificate is a configuration error: `check` raises `RedisConfigError` naming the problem, and
the CLI and the cache call it at start-up. Later, the same failures are store errors like any other: misses.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError, ResponseError

# Environment variables read when the URL does not carry the setting (the chart fills them from a Secret)
REDIS_ENV = {
    "username": "MOE_SERVE_REDIS_USERNAME",
    "password": "MOE_SERVE_REDIS_PASSWORD",
    "ssl_ca_certs": "MOE_SERVE_REDIS_CA_CERT",  # CA bundle that signed the server's certificate
    "ssl_certfile": "MOE_SERVE_REDIS_CLIENT_CERT",  # client certificate, when the server asks for one
    "ssl_keyfile": "MOE_SERVE_REDIS_CLIENT_KEY",
}
AUTH_FAILURES = ("WRONGPASS", "NOAUTH", "NOPERM", "invalid username-password")
CHECK_TIMEOUT_S = 5.0
# What talking to Redis may raise (a cluster's own errors are not RedisErrors); a store counts them as misses
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)

RedisClient = aioredis.Redis | RedisCluster


class RedisConfigError(ValueError):
    """The Redis a tier names cannot be used as configured: wrong password or user, bad certificate, bad URL."""


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL with the environment's secrets filled in."""

    url: str
    seeds: list[tuple[str, int]]  # empty for a unix socket
    db: int = 0
    tls: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # username, password, ssl_* and URL query options

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise RedisConfigError(f"a Redis URL starts with redis://, rediss:// or unix://, got {redact(url)!r}")
        options = dict(item.partition("=")[::2] for item in filter(None, parts.query.split("&")))
        options = {name: unquote(value) for name, value in options.items()}
        if parts.scheme == "unix":
            db = options.pop("db", "0")
            if not db.isdigit():
                raise RedisConfigError(f"the database in {redact(url)!r} must be a number, got {db!r}")
            return cls(url, [], int(db), False, {**options, "path": unquote(parts.path)})
        hosts = parts.netloc.rpartition("@")[2]
        seeds = []
        for host in hosts.split(","):
            name, _, port = host.rpartition(":") if ":" in host else (host, "", "6379")
            if not name or not port.isdigit():
                raise RedisConfigError(f"bad HOST:PORT {host!r} in {redact(url)!r}")
            seeds.append((name.strip("[]"), int(port)))
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise RedisConfigError(f"the database in {redact(url)!r} must be a number, got {path!r}")
        if parts.username:
            options["username"] = unquote(parts.username)
        if parts.password:
            options["password"] = unquote(parts.password)
        for name, env in REDIS_ENV.items():
            if name not in options and os.environ.get(env):
                options[name] = os.environ[env]
        tls = parts.scheme == "rediss"
        if not tls and any(name.startswith("ssl_") for name in options):
            options = {k: v for k, v in options.items() if not k.startswith("ssl_")}  # TLS files only for rediss://
        return cls(url, seeds, int(path or 0), tls, options)

    def _kwargs(self, socket_timeout_s: float) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
                                      **self.options)
        if self.tls:
            kwargs["ssl"] = True
            kwargs.setdefault("ssl_cert_reqs", "required")
        return kwargs

    async def connect(self, max_connections: int, socket_timeout_s: float) -> RedisClient:
        """A client for this target, asking the server whether it is a cluster member (one round trip).
        No retries: the caller's circuit breaker decides."""
        kwargs = self._kwargs(socket_timeout_s)
        no_retry = Retry(NoBackoff(), 0)

        def single(db: int) -> aioredis.Redis:
            if self.seeds:
                host, port = self.seeds[0]
                where = dict(host=host, port=port, connection_class=aioredis.SSLConnection if self.tls
                             else aioredis.Connection)
            else:
                where = dict(connection_class=aioredis.UnixDomainSocketConnection)
            pool = aioredis.BlockingConnectionPool(
                db=db, max_connections=max_connections, timeout=socket_timeout_s, retry=no_retry, **where,
                **{k: v for k, v in kwargs.items() if k != "ssl"})
            return aioredis.Redis(connection_pool=pool, retry=no_retry)

        if not self.seeds:
            return single(self.db)
        if len(self.seeds) == 1:
            client = single(0)  # a cluster node refuses SELECT: ask first
            try:
                is_cluster = await _cluster_enabled(client)
            except BaseException:
                await close_client(client)
                raise
            if not is_cluster and not self.db:
                return client
            await close_client(client)
            if not is_cluster:
                return single(self.db)
        if self.db:
            raise RedisConfigError(f"{redact(self.url)} is a Redis Cluster, which has only database 0")
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.seeds], max_connections=max_connections,
                            retry=no_retry, **kwargs)

    async def probe(self, timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
        """"cluster" or "single" when the server answers PING as configured; None when it cannot be reached now (a
        tier serves misses until it can). Raises RedisConfigError for a wrong password, user or certificate."""

        async def ping() -> str:
            client = await self.connect(max_connections=2, socket_timeout_s=timeout_s)
            try:
                await client.ping()
                return "cluster" if isinstance(client, RedisCluster) else "single"
            finally:
                await close_client(client)

        try:
            return await asyncio.wait_for(ping(), timeout_s * 2)
        except RedisConfigError:
            raise
        except REDIS_ERRORS as exc:
            error = config_error(self.url, exc)
            if error is not None:
                raise error from exc
            return None


async def _cluster_enabled(client: aioredis.Redis) -> bool:
    try:
        return bool((await client.info("cluster")).get("cluster_enabled"))
    except ResponseError as exc:  # INFO refused to this ACL user: assume a single server
        if "NOPERM" in str(exc):
            return False
        raise


async def close_client(client: RedisClient) -> None:
    await client.aclose()
    if isinstance(client, aioredis.Redis):
        await client.connection_pool.disconnect()


def redact(url: str) -> str:
    """The URL without its password (and with any query secrets dropped), safe for logs, status and metrics."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("redis"):
        return url
    hosts = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.password else (f"{parts.username}@" if parts.username else "")
    return f"{parts.scheme}://{user}{hosts}{parts.path}"


def config_error(url: str, exc: BaseException) -> RedisConfigError | None:
    """The configuration error `exc` is, if it is one (a refused password or user, a certificate that fails);
    None for the failures that come and go (refused or lost connections, timeouts)."""
    text = str(exc)
    if isinstance(exc, AuthenticationError) or any(marker in text for marker in AUTH_FAILURES):
        return RedisConfigError(f"{redact(url)}: authentication failed ({text.splitlines()[0][:200]}); check the "
                                f"user and password in the URL or ${REDIS_ENV['username']} / ${REDIS_ENV['password']}")
    if isinstance(exc, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in text.upper():
        return RedisConfigError(f"{redact(url)}: TLS failed ({text[:200]}); check ${REDIS_ENV['ssl_ca_certs']} "
                                f"and the server's certificate")
    if isinstance(exc, FileNotFoundError):
        return RedisConfigError(f"{redact(url)}: a TLS file is missing ({exc})")
    return None


def check(url: str, timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
    """`RedisTarget.probe` of a URL, for callers outside an event loop (the CLI)."""
    return asyncio.run(RedisTarget.parse(url).probe(timeout_s))
