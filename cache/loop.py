"""An asyncio event loop on a daemon thread, owned by a cache, for all of its Redis and file I/O.

The engine's step loop is a plain thread: it submits coroutines here and waits on them with a timeout (lookups),
or does not wait at all (writes behind). redis.asyncio connections are bound to this loop, and only this
thread touches them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundLoop:
    def __init__(self, name: str = "moe-cache-io") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.closed = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        """Run `coro` here and wait for it; on timeout it is cancelled and TimeoutError raised."""
        future = self.submit(coro)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def close(self, cleanup: Callable[[], Awaitable[None]] | None = None, timeout_s: float = 5.0) -> None:
        """Run `cleanup()` (close clients), cancel what is left, stop the loop and join its thread."""
        if self.closed:
            return
        self.closed = True
        if cleanup is not None:
            try:
                self.run(_await(cleanup), timeout_s)
            except Exception:  # noqa: BLE001 - closing must not fail the caller
                pass
        try:
            self.run(_cancel_others(), timeout_s)
        except Exception:  # noqa: BLE001
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()


async def _await(fn: Callable[[], Awaitable[None]]) -> None:
    await fn()


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
