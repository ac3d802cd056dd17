"""Event delivery off the scheduler thread: the engine posts each job's events here and one courier thread calls the
jobs' emit callables (an asyncio loop's call_soon_threadsafe, a queue's put), in the order they were posted.

The scheduler's step never waits on a consumer's event loop; a job's events keep their order (one thread, one FIFO),
and backpressure still counts an event when it is posted (Job.send), not when it is delivered.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

log = logging.getLogger("qwen_tts_megakernel.engine")

_STOP = object()


class Courier:
    """A thread that delivers posted events; stop() delivers everything posted before it, then ends the thread."""

    def __init__(self, name: str = "tts-events"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def post(self, emit: Callable[[tuple], None], event: tuple) -> None:
        self._queue.put((emit, event))

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            emit, event = item
            try:
                emit(event)
            except Exception:  # noqa: BLE001 - a consumer's broken callback must not stop everyone's delivery
                log.exception("delivering a stream event failed")
