"""The engine's MoE backend when the experts live on shard actors: `RemoteMoE`, used by the CLI and by Serve replicas.

One layer call goes through a transport (router/transport.py). One recovery policy covers every failure below it:
the router already retries a shard that Ray is restarting, and a transport's graph falls back to plain calls while
it is down; when a layer call still fails (the router died and is restarting, a shard's node is gone and its bundle
is being placed again, or the router went with the Serve replica that owned it), `RemoteMoE` waits, asks
`current_router` for the router's handle and calls again, for up to `recovery_window_s`. Requests running through a
recovery stall instead of failing, and give the same tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from ray.exceptions import RayActorError

from moe_serve.router.router import ShardCallFailed
from moe_serve.router.transport import Transport

log = logging.getLogger(__name__)

# Errors after which the layer call is made again: the router or a shard died and is coming back.
RECOVERABLE = (RayActorError, ShardCallFailed)


class RemoteMoE:
    def __init__(self, transport: Transport, current_router: Callable[[], Any], recovery_window_s: float = 120.0,
                 retry_pause_s: float = 0.5) -> None:
        """`current_router()` returns the router's handle now (called from the engine's step thread only)."""
        self.transport = transport
        self.current_router = current_router
        self.recovery_window_s = recovery_window_s
        self.retry_pause_s = retry_pause_s
        self.recoveries = 0

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Routed-expert output [T, D] of MoE layer `layer` for hidden states [T, D], in hidden's dtype."""
        deadline = time.monotonic() + self.recovery_window_s
        x = hidden.float().numpy()  # float32 on the wire (numpy has no bf16); the shards compute in float32
        while True:
            try:
                return torch.from_numpy(self.transport(layer, x)).to(hidden.dtype)
            except RECOVERABLE as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning("MoE layer %d call failed (%s); retrying with the current router", layer, exc)
                self.recoveries += 1
                time.sleep(self.retry_pause_s)
                try:
                    self.transport.reconnect(self.current_router())
                except Exception as fetch_error:  # noqa: BLE001 - whatever holds the router may be restarting
                    log.warning("router not reachable yet: %s", fetch_error)

    def submit(self, layer: int, hidden: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start the layer call and return what waits for its output (micro-batch overlap: the caller computes
        meanwhile). A call that fails in flight is made again by `__call__`, under the same recovery policy."""
        try:
            pending = self.transport.submit(layer, hidden.float().numpy())
        except RECOVERABLE:
            pending = None

        def wait() -> torch.Tensor:
            if pending is not None:
                try:
                    return torch.from_numpy(pending()).to(hidden.dtype)
                except RECOVERABLE:
                    pass
            return self(layer, hidden)

        return wait

    def stats(self) -> dict[str, Any]:
        return {**self.transport.stats(), "recoveries": self.recoveries}
