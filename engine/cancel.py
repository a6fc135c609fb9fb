"""Cancellation tokens: plain threading, no asyncio, so any caller can stop a computation."""

from __future__ import annotations

import threading


class CancellationToken:
    """Set once from any thread; the generation loop checks it between prefill chunks and
    between decode steps, so at most one more step runs after `cancel()`."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()
