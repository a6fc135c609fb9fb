"""The engine thread's scheduler: calls first, completions before chat work, a chat yields to a
keystroke between two of its decode steps and continues with its cache intact."""

from __future__ import annotations

import threading
import time

import engine
from lsp_server.backends.base import End, TextDelta
from lsp_server.backends.jobs import StreamJob
from lsp_server.scheduler import Priority, Scheduler
from tests.conftest import CheckpointFactory


class Counter:
    """A job of `steps` units that records each one in a shared log."""

    def __init__(self, name: str, steps: int, log: list[str], lock: threading.Lock) -> None:
        self.name, self.left, self.log, self.lock = name, steps, log, lock
        self.closed: list[BaseException | None] = []

    def step(self) -> bool:
        with self.lock:
            self.log.append(self.name)
        self.left -= 1
        return self.left == 0

    def close(self, error: BaseException | None = None) -> None:
        self.closed.append(error)


def wait_until(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_calls_then_interactive_jobs_then_background_jobs() -> None:
    log: list[str] = []
    lock = threading.Lock()
    gate = threading.Event()
    scheduler = Scheduler()
    try:
        scheduler.call(gate.wait)  # holds the thread while the queue fills
        chat = Counter("chat", 3, log, lock)
        first, second = Counter("a", 2, log, lock), Counter("b", 2, log, lock)
        scheduler.submit(chat, Priority.BACKGROUND)
        scheduler.submit(first, Priority.INTERACTIVE, key="a.py")
        scheduler.submit(second, Priority.INTERACTIVE, key="b.py")
        result = scheduler.call(lambda: log.append("call"))
        gate.set()
        result.result(10)
        wait_until(lambda: len(log) == 8)
        assert log == ["call", "a", "a", "b", "b", "chat", "chat", "chat"]
        assert chat.closed == first.closed == second.closed == []
    finally:
        scheduler.stop()


def test_a_newer_completion_drops_the_queued_one_of_the_same_document() -> None:
    log: list[str] = []
    lock = threading.Lock()
    gate = threading.Event()
    scheduler = Scheduler()
    try:
        scheduler.call(gate.wait)
        old, other, new = (Counter(n, 1, log, lock) for n in ("old", "other", "new"))
        scheduler.submit(old, Priority.INTERACTIVE, key="a.py")
        scheduler.submit(other, Priority.INTERACTIVE, key="b.py")
        scheduler.submit(new, Priority.INTERACTIVE, key="a.py")
        gate.set()
        wait_until(lambda: len(log) == 2 and old.closed)
        assert log == ["other", "new"]
        assert old.closed == [None]  # closed, never stepped
    finally:
        scheduler.stop()


def test_a_failing_step_closes_its_job_with_the_error_and_the_thread_goes_on() -> None:
    log: list[str] = []
    lock = threading.Lock()

    class Broken(Counter):
        def step(self) -> bool:
            raise ValueError("broken step")

    scheduler = Scheduler()
    try:
        broken, fine = Broken("broken", 1, log, lock), Counter("fine", 1, log, lock)
        scheduler.submit(broken, Priority.INTERACTIVE)
        scheduler.submit(fine, Priority.INTERACTIVE)
        wait_until(lambda: log == ["fine"])
        assert [str(e) for e in broken.closed] == ["broken step"]
    finally:
        scheduler.stop()


def test_stop_closes_the_jobs_still_queued() -> None:
    log: list[str] = []
    lock = threading.Lock()
    gate = threading.Event()
    scheduler = Scheduler()
    job = Counter("late", 5, log, lock)
    scheduler.call(gate.wait)
    scheduler.submit(job, Priority.BACKGROUND)
    scheduler.stop()
    gate.set()
    scheduler.thread.join(10)
    assert not scheduler.thread.is_alive()
    assert job.closed == [None] and log == []


class Recorded:
    """A job whose steps are logged under its name."""

    def __init__(self, name: str, job: StreamJob, log: list[str], lock: threading.Lock) -> None:
        self.name, self.job, self.log, self.lock = name, job, log, lock

    def step(self) -> bool:
        with self.lock:
            self.log.append(self.name)
        return self.job.step()

    def close(self, error: BaseException | None = None) -> None:
        self.job.close(error)


def streamed_text(model: engine.Model, prompt: list[int], max_tokens: int) -> str:
    events = list(engine.stream(prompt, model, engine.SamplingParams(max_tokens=max_tokens),
                                eos_id=-1))
    return "".join(e.text for e in events)


def test_a_completion_waits_at_most_one_step_of_a_streaming_generation(
        make_checkpoint: CheckpointFactory) -> None:
    """A long generation streams (a chat answer); a completion submitted meanwhile starts after at
    most one more of its steps, runs to its end, and the long one then continues from its
    cache, with the text it would have produced alone."""
    model = engine.load(make_checkpoint("native", seed=7, dim=64, n_layers=2, n_heads=4,
                                        n_kv_heads=2, hidden_dim=128))
    long_prompt, short_prompt = [1, *range(100, 140)], [1, *range(200, 230)]
    want_long = streamed_text(model, long_prompt, 60)
    want_short = streamed_text(model, short_prompt, 8)

    order: list[str] = []
    lock = threading.Lock()
    received: dict[str, list[object]] = {"long": [], "short": []}
    started = threading.Event()

    def job(name: str, prompt: list[int], max_tokens: int) -> Recorded:
        cancel = engine.CancellationToken()
        params = engine.SamplingParams(max_tokens=max_tokens)

        def deliver(item: object) -> None:
            received[name].append(item)
            if name == "long" and len(received["long"]) >= 10:
                started.set()

        stream_job = StreamJob(lambda: engine.stream(prompt, model, params, cancel=cancel,
                                                     eos_id=-1), deliver, cancel)
        return Recorded(name, stream_job, order, lock)

    scheduler = Scheduler()
    try:
        scheduler.submit(job("long", long_prompt, 60), Priority.BACKGROUND)
        assert started.wait(60)
        with lock:
            order.append("submit")
        scheduler.submit(job("short", short_prompt, 8), Priority.INTERACTIVE, key="a.py")
        wait_until(lambda: received["long"] and isinstance(received["long"][-1], End), 120)
    finally:
        scheduler.stop()

    after = order[order.index("submit") + 1:]
    first_short = after.index("short")
    assert first_short <= 1  # at most one more step of the long generation
    shorts = [i for i, name in enumerate(after) if name == "short"]
    assert shorts == list(range(first_short, first_short + 8))  # 8 steps, uninterrupted
    assert "long" in after[first_short + 8:]  # the long one went on afterwards

    def text(name: str) -> str:
        return "".join(e.text for e in received[name] if isinstance(e, TextDelta))

    assert text("long") == want_long and text("short") == want_short
    end = received["long"][-1]
    assert isinstance(end, End) and end.generated_tokens == 60 and end.reason == "length"
