"""Who runs on the engine thread, and when.

The local model runs on one thread (torch's OpenMP team belongs to the thread that starts it, and
two requests computing at once would only halve each other's speed on a laptop's cores). Work
reaches that thread as jobs that advance one unit at a time (a prefill chunk or a decode step of
`engine.Stream`) and as plain calls (load a model, resize caches, swap in a compiled step):

- calls run first, between two units of whatever job is running;
- then interactive jobs (completions), oldest first, each run to its end unless cancelled; a
  newer completion for the same key (document) drops the older ones that have not started;
- then background jobs (chat answers, one unit at a time): a chat in progress yields to a
  keystroke between two of its decode steps and continues afterwards, its cache intact.

So a completion waits for at most one unit of chat work (one decode step; one prefill chunk of
`PREFILL_CHUNK` tokens while a chat prompt is being read). Jobs never block: a job that waits for
something is not a job (remote backends stream on the event loop instead).
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Job(Protocol):
    def step(self) -> bool:
        """Run one unit of work on the engine thread; True once the job is finished."""
        ...

    def close(self, error: BaseException | None = None) -> None:
        """The job ends without more steps: dropped before it started, cancelled, the scheduler
        stopping, or `error` raised by its last step. Called once, on the engine thread."""
        ...


class Priority(enum.IntEnum):
    INTERACTIVE = 0  # completions: a person is waiting, keystroke by keystroke
    BACKGROUND = 1  # chat: streams for seconds; yields between two steps


@dataclass(order=True)
class _Entry:
    priority: int
    order: int
    job: Job = field(compare=False)
    key: object = field(compare=False, default=None)
    started: bool = field(compare=False, default=False)


class Scheduler:
    """One engine thread running calls and jobs (see the module's docstring).

    `stop()` ends the thread after the unit of work in progress; jobs still queued are closed.
    The thread is a daemon: a process that exits does not wait for it.
    """

    def __init__(self, name: str = "tramontane-engine") -> None:
        self._cond = threading.Condition()
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._jobs: list[_Entry] = []
        self._order = itertools.count()
        self._stopping = False
        self.steps = 0  # units of work run so far (diagnostics, tests)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the engine thread before any further job step; its result or error
        arrives in the future (`asyncio.wrap_future` to await it)."""
        future: Future[T] = Future()
        with self._cond:
            if self._stopping:
                future.set_exception(RuntimeError("the engine thread has stopped"))
                return future
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def submit(self, job: Job, priority: Priority, key: object = None) -> None:
        """Queue `job`. An interactive job with a `key` drops the queued, not yet started
        interactive jobs of the same key (their `close()` is called)."""
        dropped: list[Job] = []
        with self._cond:
            if self._stopping:
                dropped.append(job)
            else:
                if priority is Priority.INTERACTIVE and key is not None:
                    keep = []
                    for entry in self._jobs:
                        if (entry.priority == Priority.INTERACTIVE and entry.key == key
                                and not entry.started):
                            dropped.append(entry.job)
                        else:
                            keep.append(entry)
                    self._jobs = keep
                self._jobs.append(_Entry(int(priority), next(self._order), job, key))
                self._cond.notify()
        for old in dropped:
            # Closed on the engine thread, like every other close: a job's cache lease is
            # touched by that thread only.
            self.call(old.close)

    def pending(self) -> int:
        with self._cond:
            return len(self._jobs)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._calls or self._jobs or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    calls, jobs = self._calls, self._jobs
                    self._calls, self._jobs = [], []
                    break
                if self._calls:
                    fn, future = self._calls.pop(0)
                    entry = None
                else:
                    entry = min(self._jobs)
                    entry.started = True
            if entry is None:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # delivered to the caller, which decides
                        future.set_exception(e)
                continue
            self._step(entry)
        for _, future in calls:
            future.cancel()
        for entry in jobs:
            self._close(entry.job, None)

    def _step(self, entry: _Entry) -> None:
        try:
            finished = entry.job.step()
        except Exception as e:  # the job's own error: it reports it to its caller
            log.debug("job failed: %s", e, exc_info=True)
            self._remove(entry)
            self._close(entry.job, e)
            return
        self.steps += 1
        if finished:
            self._remove(entry)

    def _remove(self, entry: _Entry) -> None:
        with self._cond:
            if entry in self._jobs:
                self._jobs.remove(entry)

    @staticmethod
    def _close(job: Job, error: BaseException | None) -> None:
        try:
            job.close(error)
        except Exception:  # a close must not take the engine thread down: log and go on
            log.exception("closing a job failed")
