"""Cancellation tokens: plain threading, no asyncio, so any caller can stop a computation."""

from __future__ import annotations

import threading
import time


class CancellationToken:
    """Set once from any thread; the generation loop checks it between prefill chunks and
    between decode steps, so at most one more step runs after `cancel()`."""

    __slots__ = ("_event", "cancelled_at")

    def __init__(self) -> None:
        self._event = threading.Event()
        # `time.monotonic()` of the first `cancel()`: how long the computation ran on after it
        # is a measure callers report.
        self.cancelled_at: float | None = None

    def cancel(self) -> None:
        if self.cancelled_at is None:
            self.cancelled_at = time.monotonic()
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()
