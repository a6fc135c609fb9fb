"""Keystroke latency while a chat answer streams, against the same keystrokes with no chat.

Completions and chat share the engine thread: between two decode steps of a chat answer the
scheduler runs any pending completion first. This replays the first `--paced-keys` keystrokes
of `edit_trace.py`'s typing trace through one server (cache and compiled step on), each waiting
for its reply, in rounds that alternate: quiet, then with a chat streaming (a `tramontane/chat`
request of `--chat-tokens` tokens kept in flight the whole time, a new one as soon as one
ends). It prints the p50/p95 keystroke latency of each and their ratio (target: with chat
within 1.5x of quiet), and the chat's own tokens/s.

    .venv/bin/python benchmarks/chat_while_typing.py --model-dir /tmp/bench-model [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from decode import ensure_checkpoints
from edit_trace import SOURCE, URI, Client, _p95, build_trace, replay, start_server

CHAT_PROMPT = ("Explain, step by step and in detail, how a text-wrapping module splits "
               "paragraphs into lines, and write an example.")


class ChatLoad:
    """Keeps one chat answer streaming until stopped; counts the chat's tokens."""

    def __init__(self, client: Client, tokens: int) -> None:
        self.client, self.tokens = client, tokens
        self.generated, self.seconds = 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ChatLoad:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(600)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.perf_counter()
            msg = self.client.request("tramontane/chat", {
                "chatId": f"load-{n}", "tools": False,
                "sampling": {"maxTokens": self.tokens, "temperature": 0.0},
                "messages": [{"role": "user", "content": CHAT_PROMPT}]})
            got = self.client.wait(msg, 600)
            if got is None or "result" not in got[1]:
                raise RuntimeError(f"the chat failed: {got}")
            self.generated += got[1]["result"]["usage"]["generatedTokens"]
            self.seconds += time.perf_counter() - started
            self.client.notify("tramontane/chatClose", {"chatId": f"load-{n}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="keep the random model here between runs")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--paced-keys", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--chat-tokens", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    source = SOURCE.read_text()
    keys = build_trace(source, 0)[: args.paced_keys]
    latencies: dict[str, list[float]] = {"quiet": [], "chat": []}
    load: ChatLoad | None = None
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        native, _ = ensure_checkpoints(Path(args.model_dir or tmp))
        options: dict[str, Any] = {
            "dtype": args.dtype, "completion": {"maxTokens": args.max_tokens,
                                                "timeBudgetMs": 120000}}
        client, _ = start_server(native, options)
        try:
            for round_ in range(args.rounds):
                for label in ("quiet", "chat") if round_ % 2 == 0 else ("chat", "quiet"):
                    client.notify("textDocument/didOpen", {"textDocument": {
                        "uri": URI, "languageId": "python", "version": 0, "text": source}})
                    if label == "chat":
                        with ChatLoad(client, args.chat_tokens) as load:
                            time.sleep(2.0)  # the chat is streaming by now
                            phase = replay(client, source, keys, True, version=0)
                    else:
                        phase = replay(client, source, keys, True, version=0)
                    client.notify("textDocument/didClose", {"textDocument": {"uri": URI}})
                    # The first request after opening prefills the whole file: not a keystroke.
                    latencies[label] += phase.latencies[1:]
                    print(f"round {round_ + 1}, {label}: p50 "
                          f"{1000 * statistics.median(phase.latencies[1:]):.0f} ms", flush=True)
        finally:
            client.close()
    quiet, busy = (statistics.median(latencies[k]) for k in ("quiet", "chat"))
    print(f"\nkeystroke latency p50: quiet {1000 * quiet:.0f} ms, while a {args.chat_tokens}-"
          f"token chat streams {1000 * busy:.0f} ms: ratio {busy / quiet:.2f} (target <= 1.5)")
    print(f"keystroke latency p95: quiet {1000 * _p95(latencies['quiet']):.0f} ms, with chat "
          f"{1000 * _p95(latencies['chat']):.0f} ms")
    if load is not None and load.seconds:
        print(f"chat meanwhile: {load.generated} tokens in {load.seconds:.1f} s "
              f"({load.generated / load.seconds:.1f} tok/s, last round)")


if __name__ == "__main__":
    main()
