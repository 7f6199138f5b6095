"""One bounded pool of daemon threads per runner, for sync phases and sync timeouts.

Why not ``concurrent.futures.ThreadPoolExecutor`` or the loop's default executor:
a sync ``execute`` that outlives its timeout cannot be killed. In the loop's default
executor such threads crowd out everybody else's ``to_thread`` calls; in a
``ThreadPoolExecutor`` they also hold up interpreter exit (its threads are joined at
exit). Here the runner owns its threads: daemon threads (a stuck one never blocks exit),
at most ``max_workers`` of them, context variables copied into each call (as
``asyncio.to_thread`` does), and :meth:`busy` tells how many calls are still running.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()


class DaemonPool(concurrent.futures.Executor):
    """A bounded executor of daemon threads, started on demand."""

    def __init__(self, max_workers: int, *, name: str = "jobrunner") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self._name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._busy = 0
        self._shutdown = False

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` in a pool thread, in a copy of this context."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        context = contextvars.copy_context()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("the runner's thread pool is shut down (the runner closed)")
            self._queue.put((future, context, fn, args, kwargs))
            if self._idle == 0 and len(self._threads) < self.max_workers:
                thread = threading.Thread(
                    target=self._work,
                    name=f"{self._name}-{len(self._threads) + 1}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._idle = max(0, self._idle - 1)
        return future

    def busy(self) -> int:
        """How many calls are running now (including ones past their timeout)."""
        return self._busy

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; with ``wait``, join the threads (a stuck one is left)."""
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    item[0].cancel()
        for _ in threads:
            self._queue.put(_STOP)
        if wait:
            for thread in threads:
                thread.join(timeout=5)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            future, context, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                with self._lock:
                    self._busy += 1
                try:
                    future.set_result(context.run(fn, *args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)
                finally:
                    with self._lock:
                        self._busy -= 1
            with self._lock:
                self._idle += 1
