"""The language server over stdio with `backend.kind = "openai"` against a real vLLM serving a
tiny random float32 checkpoint (conftest's `vllm_server`), beside the same server running the
same checkpoint in process: the same greedy completions, the time budget and `$/cancelRequest`
closing the stream (vLLM aborts the request), a chat with tools streamed through vLLM (skip
with -m "not vllm")."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import engine
from lsp_server.backends.base import ToolSpec
from lsp_server.chat.prompt import encode_chat

from .lsp import Server
from .vllm import VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# Cursors of lsp.TEXT: inside a function body, at a line start, after a `def`, mid-line, ...
CURSORS = [(4, 4), (1, 0), (7, 8), (8, 12), (10, 0), (2, 16)]
READ_FILE: dict[str, Any] = {"name": "read_file", "description": "Read a file of the workspace",
             "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                            "required": ["path"]}}
CHAT = {"maxTokens": 24, "temperature": 0.0}


def remote_options(vllm: VllmServer, **completion: Any) -> dict[str, Any]:
    return {"backend": {"kind": "openai", "url": vllm.url + "/v1", "model": vllm.model,
                        "tokenizer": str(vllm.model_dir)},
            "completion": {"maxTokens": 32, **completion}, "chat": CHAT}


@pytest.fixture(scope="module")
def remote(vllm_server: VllmServer) -> Iterator[Server]:
    server = Server()
    status = server.start(remote_options(vllm_server))
    assert status["state"] == "ready", status
    server.open()
    yield server
    server.close()


@pytest.fixture(scope="module")
def local(vllm_server: VllmServer) -> Iterator[Server]:
    """The in-process engine on the checkpoint vLLM serves, in float32 too."""
    server = Server()
    status = server.start({"model": str(vllm_server.model_dir), "dtype": "float32",
                           "compile": False, "completion": {"maxTokens": 32}, "chat": CHAT})
    assert status["state"] == "ready", status
    server.open()
    yield server
    server.close()


def last_metric(server: Server) -> dict[str, Any]:
    """The `tramontane/metrics` of the last request (sent once the backend is done with it)."""
    deadline = time.monotonic() + 10
    while True:
        metrics = [n["params"] for n in server.notifications
                   if n.get("method") == "tramontane/metrics"]
        if metrics:
            return metrics[-1]
        server.notifications.append(server.next_frame(max(0.01, deadline - time.monotonic())))


def test_the_ready_status_names_the_served_model(remote: Server, vllm_server: VllmServer) -> None:
    assert remote.first_status == {"state": "ready", "fastDecode": False, "message": (
        f"tiny at 127.0.0.1:{vllm_server.port} (openai backend, tokenizer tokenizer.model.v3 "
        "v3)")}


def test_inline_completions_through_vllm_equal_the_in_process_engines(
        remote: Server, local: Server) -> None:
    """Same document, same cursors: the prompt windows, the FIM prompt (token ids), vLLM's
    greedy tokens and post-processing give the very completions the local engine gives."""
    shown = 0
    for line, character in CURSORS:
        expected, local_status = local.complete(line, character)
        texts, status = remote.complete(line, character)
        assert texts == expected, (line, character)
        # vLLM counted the prompt we built: the same tokens the local engine ran.
        assert status["promptTokens"] == local_status["promptTokens"], (line, character)
        assert status.get("reason") == local_status.get("reason")
        shown += bool(texts)
    assert shown >= 4


def steal_seconds() -> list[float]:
    """Each CPU's steal time so far (/proc/stat): time the hypervisor gave that virtual CPU to
    someone else, during which whatever ran or slept on it (its timers) was held up."""
    with open("/proc/stat") as f:
        return [int(line.split()[8]) / os.sysconf("SC_CLK_TCK") for line in f
                if line.startswith("cpu") and line[3] != " "]


def run_queue_seconds(pid: int) -> dict[int, float]:
    """Each thread of process `pid`: the time it has spent runnable, waiting for a CPU
    (/proc/PID/task/TID/schedstat, second field, in ns)."""
    waits = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that has ended
            waits[int(task.name)] = int((task / "schedstat").read_text().split()[1]) / 1e9
    return waits


class WakeLateness:
    """How late a sleeping thread of this process wakes, at worst, while it runs, the most time
    the hypervisor stole from one CPU meanwhile, and the longest any thread of the server `pid`
    waited for a CPU: the machine's share of any time claim. These VMs, with both cores busy
    (vLLM generating, and more), were measured waking a process sleeping 0.1 s in epoll 18-25 s
    late, our server and a bare `select` loop alike; once this process woke on time while the
    server closed a cancelled stream 7.3 s after the cancel (its close waits at most 2 s). The
    tests' time bounds add what was measured in the same run."""

    def __init__(self, pid: int | None = None) -> None:
        self.worst = 0.0
        self._running = True
        self._thread = threading.Thread(target=self._probe, daemon=True)
        self._steal = self._steal_end = steal_seconds()
        self._pid = pid
        self._queued = self._queued_end = self._run_queue()

    def _run_queue(self) -> dict[int, float]:
        return run_queue_seconds(self._pid) if self._pid is not None else {}

    @property
    def queued(self) -> float:
        """The longest wait for a CPU of one of the server's threads."""
        end = self._run_queue() if self._running else self._queued_end
        return max((end[tid] - start for tid, start in self._queued.items() if tid in end),
                   default=0.0)

    def _probe(self) -> None:
        while self._running:
            before = time.monotonic()
            time.sleep(0.05)
            self.worst = max(self.worst, time.monotonic() - before - 0.05)

    @property
    def stolen(self) -> float:
        end = steal_seconds() if self._running else self._steal_end
        return max((b - a for a, b in zip(self._steal, end, strict=True)), default=0.0)

    @property
    def seconds(self) -> float:
        return max(self.worst, self.stolen, self.queued)

    def __enter__(self) -> WakeLateness:
        self._steal = steal_seconds()
        self._queued = self._run_queue()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()
        self._steal_end = steal_seconds()
        self._queued_end = self._run_queue()


@dataclass(frozen=True)
class BudgetRun:
    short: list[str]  # the 32-token completion at the cursor
    texts: list[str]  # the completion allowed 4000 tokens, cut by the 4 s time budget
    status: dict[str, Any]
    seconds: float  # from the request to the reply, as the editor saw it
    lateness: float  # the machine's worst wake-up lateness meanwhile (WakeLateness)
    stolen: float  # of which the most the hypervisor stole from one CPU
    budget_late: float  # how late the server's loop ran the budget's timer (its status says)
    metric: dict[str, Any]  # what the backend counted when it closed the stream
    stopped: bool  # vLLM stopped generating after the reply (VllmServer.idle)
    finished: float  # requests vLLM finished by itself meanwhile (not aborted)
    generated: float  # tokens vLLM generated meanwhile


@pytest.fixture(scope="module")
def budget_run(remote: Server, vllm_server: VllmServer) -> BudgetRun:
    short, _ = remote.complete(4, 4)
    remote.settings(remote_options(vllm_server, maxTokens=4000, timeBudgetMs=4000))
    assert vllm_server.idle(30)  # and the short completion counted as finished
    finished = vllm_server.finished()
    generated = vllm_server.metric("vllm:generation_tokens_total")
    with WakeLateness(remote.proc.pid) as lateness:
        started = time.monotonic()
        texts, status = remote.complete(4, 4)
        seconds = time.monotonic() - started
    metric = last_metric(remote)
    stopped = vllm_server.idle(10 + lateness.seconds)
    remote.settings(remote_options(vllm_server))
    return BudgetRun(short, texts, status, seconds, lateness.seconds, lateness.stolen,
                     status.get("budgetLateMs", 0.0) / 1000, metric, stopped,
                     vllm_server.finished() - finished,
                     vllm_server.metric("vllm:generation_tokens_total") - generated)


def test_at_the_time_budget_the_editor_gets_what_streamed_and_vllm_aborts(
        budget_run: BudgetRun) -> None:
    """Streaming: text arrives piece by piece, so when the time budget runs out the editor gets
    what came so far (post-processed: the start of the long completion), the stream is closed
    and vLLM aborts the request instead of generating the 4000 tokens it was allowed."""
    run = budget_run
    # At the budget (4 s; the HTTP deadline 1 s later), give or take the machine's lateness:
    # the server's loop running the budget's timer late is the machine's (CI once had the reply
    # 13.7 s past the budget, with 0.5 s of lateness seen by this process);
    # from then on, closing and answering is ours (the faulty-server tests time it strictly).
    assert run.status["budgetLateMs"] >= 0, run
    assert run.seconds - run.budget_late < 4 + 1.5 + run.lateness, run
    assert run.metric["cancelled"] is True and run.metric["generatedTokens"] < 4000
    # vLLM stopped at once and did not finish the request: it aborted it (or, on a machine so
    # starved that the budget ran out before vLLM took the request in, never ran it). Its log
    # line "Request ... aborted." is no measure: it is written only for a request that reached
    # the engine, and once was not there 30 s after the reply on a loaded CI machine.
    assert run.stopped and run.finished == 0 and run.generated < 4000, run
    if run.texts:  # a starved machine may not have read a token by then
        # The same greedy tokens, cut at another place: one text begins the other.
        assert len(run.texts) == 1 and len(run.short) == 1
        assert run.texts[0].startswith(run.short[0]) or run.short[0].startswith(run.texts[0])
        assert run.status["state"] == "ready" and run.status.get("reason") is None
    else:
        assert run.status.get("reason") == "budget exhausted"


def test_cancel_request_closes_the_stream_and_vllm_aborts(remote: Server,
                                                          vllm_server: VllmServer) -> None:
    remote.settings(remote_options(vllm_server, maxTokens=4000, timeBudgetMs=120_000))
    assert vllm_server.idle(30)
    finished = vllm_server.finished()
    msg = remote.inline(4, 4)  # ~4000 tokens of noise on one line: a minute on 2 cores
    deadline = time.monotonic() + 60
    while vllm_server.metric("vllm:num_requests_running") < 1:
        assert time.monotonic() < deadline, "vLLM never ran the request"
        time.sleep(0.05)
    time.sleep(0.3)
    with WakeLateness(remote.proc.pid) as lateness:
        remote.notify("$/cancelRequest", {"id": msg})
        assert remote.response(msg, timeout=60)["error"]["code"] == -32800
        assert vllm_server.idle(5 + lateness.seconds), "vLLM still runs the cancelled request"
    assert vllm_server.finished() == finished  # aborted, not finished
    metric = last_metric(remote)
    assert metric["cancelled"] is True
    assert metric["stoppedMs"] < 500 + 1000 * lateness.seconds, (
        metric, lateness.worst, lateness.stolen, lateness.queued, "".join(remote.stderr[-12:]))
    remote.settings(remote_options(vllm_server))
    texts, _ = remote.complete(1, 0)  # and it goes on serving
    assert texts


def test_a_chat_with_tools_streams_through_vllm_as_through_the_engine(
        remote: Server, local: Server, vllm_server: VllmServer) -> None:
    """The tool schema reaches vLLM and is rendered by the model's tokenizer: vLLM counts
    exactly the prompt mistral-common encodes for these messages and tools. The answer streams
    in deltas that add up to the message, and (greedy, float32) equals the local engine's."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What does main.py do?"}]
    params = {"chatId": "v1", "messages": messages, "tools": False, "clientTools": [READ_FILE]}
    reply = remote.chat(params)
    result = reply["result"]
    deltas = remote.deltas()
    texts = [d["text"] for d in deltas if d["kind"] == "text"]
    assert len(texts) > 1 and "".join(texts) == result["message"]["content"]
    tokenizer = engine.load_tokenizer(engine.find_tokenizer_file(vllm_server.model_dir))
    prompt = encode_chat(tokenizer, messages, [ToolSpec(
        READ_FILE["name"], READ_FILE["description"], READ_FILE["parameters"])], None)
    assert result["usage"]["promptTokens"] == len(prompt.tokens)
    if not any(d["kind"] == "toolCall" for d in deltas):  # a random model may call it
        assert result["finishReason"] == "length"
        assert result["usage"]["generatedTokens"] == CHAT["maxTokens"]
        expected = local.chat(params)["result"]
        assert result["message"] == expected["message"]
