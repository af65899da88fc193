"""Redis deployments the cache tests start and own, on free loopback ports: a Redis Cluster (masters, optionally one
replica each, made with `redis-cli --cluster create`) and the files of a TLS server (a CA and a certificate made by
the test)."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from conftest import RedisServer, free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REDIS_CLI_BIN = "/usr/bin/redis-cli"
NODE_TIMEOUT_MS = 1000  # a master unreachable this long is failed over to its replica


class RedisClusterNodes:
    """`masters` masters with `replicas` replicas each; slots spread evenly by redis-cli."""

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 0) -> None:
        self.nodes = []
        for _ in range(masters * (1 + replicas)):
            node = RedisServer(workdir)
            node.extra_args = ("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{node.port}.conf",
                               "--cluster-port", str(free_port()), "--cluster-node-timeout", str(NODE_TIMEOUT_MS))
            self.nodes.append(node)
        self.replicas = replicas

    def start(self) -> RedisClusterNodes:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run([REDIS_CLI_BIN, "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas),
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ok()
        return self

    def url(self, node: int = 0) -> str:
        return f"redis://127.0.0.1:{self.nodes[node].port}"

    def seeds_url(self) -> str:
        return "redis://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def live(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.proc.poll() is None]

    def masters(self) -> list[RedisServer]:
        return [node for node in self.live() if _info(node, "replication")["role"] == "master"]

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every live node sees the cluster as ok, with every slot served and every replica in sync."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = [_info(node, "cluster") for node in self.live()]
            clusters = [_cluster_info(node) for node in self.live()]
            synced = all(_info(n, "replication").get("master_link_status", "up") == "up" for n in self.live())
            if synced and all(c["cluster_state"] == "ok" and c["cluster_slots_ok"] == "16384" for c in clusters) \
                    and all(s["cluster_enabled"] == 1 for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster is not ok after {timeout_s} s: {clusters}")
            time.sleep(0.1)

    def keys_per_master(self) -> list[int]:
        return [_client(node).dbsize() for node in self.masters()]

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


def _client(node: RedisServer) -> redis.Redis:
    return redis.Redis(port=node.port, socket_timeout=5, **node.client_kwargs)


def _info(node: RedisServer, section: str) -> dict[str, Any]:
    with _client(node) as client:
        return client.info(section)


def _cluster_info(node: RedisServer) -> dict[str, str]:
    with _client(node) as client:
        text = client.execute_command("CLUSTER", "INFO")
    text = text.decode() if isinstance(text, bytes) else text
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA certificate, and a certificate and key for 127.0.0.1 signed by it: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "moe-serve test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid[0]).not_valid_after(valid[1])
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "redis.pem", directory / "redis.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths
