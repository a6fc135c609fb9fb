"""Hostile model outputs against the tool-call parser (`lsp_server.chat.toolcalls`) and the
search tool: time and peak memory (tracemalloc, a separate run from the timed one).

Inputs, each fed one token at a time as the engine would:
- a million [TOOL_CALLS] control tokens;
- [TOOL_CALLS] then ~1 MB of unclosed JSON (`{"a": [` repeated);
- [TOOL_CALLS] then JSON nested 100000 deep (200000 characters, under the buffer cap);
- v13: one call whose [ARGS] JSON is nested 40000 deep, then `validate_arguments` on it.
For comparison, mistral-common's own parser (`_decode_tool_calls` after
`_split_content_and_tool_calls`) on n markers, and on the deep list.
Last, search_text with `(a+)+$` on a 50000-character line under a 2 s tool limit.

    .venv/bin/python benchmarks/toolcalls.py
"""

from __future__ import annotations

import asyncio
import itertools
import json
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mistral_common.experimental.tools import _decode_tool_calls, _split_content_and_tool_calls
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from engine.checkpoints.tiny import tokenizer_source
from lsp_server.chat.sandbox import Workspace
from lsp_server.chat.toolcalls import ToolCallDecoder
from lsp_server.chat.tools import BUILTIN_TOOLS, run_tool, validate_arguments


def v13_tokenizer(folder: Path) -> MistralTokenizer:
    """Tekken 240911's vocabulary declared v13, with [ARGS] and [CALL_ID] (none ships)."""
    data = json.loads(tokenizer_source("tekken").read_text())
    specials = [{"rank": t["rank"], "token_str": str(t["token_str"]), "is_control": True}
                for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    specials += [{"rank": i, "token_str": f"<SPECIAL_{i}>", "is_control": True}
                 for i in range(20, 32)]
    specials += [{"rank": 32, "token_str": "[ARGS]", "is_control": True},
                 {"rank": 33, "token_str": "[CALL_ID]", "is_control": True}]
    data["config"]["version"] = "v13"
    data["special_tokens"] = specials
    del data["image"]
    path = folder / "tekken_v13.json"
    path.write_text(json.dumps(data))
    return MistralTokenizer.from_file(str(path))


def repeat(tokens: list[int], times: int) -> Iterator[int]:
    for _ in range(times):
        yield from tokens


def feed_all(tokenizer: MistralTokenizer, tokens: Callable[[], Iterator[int]]) -> Any:
    decoder = ToolCallDecoder(tokenizer)
    for token in tokens():
        decoder.feed(token)
    return decoder.finish()


def measure(work: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak MiB): timed alone, then run again under tracemalloc."""
    began = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - began
    tracemalloc.start()
    work()
    peak = tracemalloc.get_traced_memory()[1] / (1 << 20)
    tracemalloc.stop()
    return result, seconds, peak


def report(name: str, work: Callable[[], Any]) -> None:
    result, seconds, peak = measure(work)
    shown = str(result)
    print(f"{name:58} {seconds:7.2f} s {peak:8.2f} MiB  {shown[:70]}")


def reference(tokenizer: MistralTokenizer, tokens: list[int]) -> str:
    raw = tokenizer.instruct_tokenizer.tokenizer
    try:
        _, segments = _split_content_and_tool_calls(tokens, raw.get_special_token("[TOOL_CALLS]"))
        return f"{len(_decode_tool_calls(segments, raw))} calls"
    except (RecursionError, ValueError) as e:
        return f"{type(e).__name__}: {str(e)[:50]}"


def main() -> None:
    tekken = MistralTokenizer.from_file(str(tokenizer_source("tekken")))
    with tempfile.TemporaryDirectory() as folder:
        v13 = v13_tokenizer(Path(folder))
        raw = tekken.instruct_tokenizer.tokenizer
        marker = raw.get_special_token("[TOOL_CALLS]")
        print(f"{'input':58} {'time':>9} {'peak':>12}  result")
        for name, tokenizer in (("tekken (v3)", tekken), ("v13", v13)):
            report(f"{name}: 1,000,000 [TOOL_CALLS]",
                   lambda t=tokenizer: feed_all(t, lambda: repeat([marker], 1_000_000)))
            chunk = raw.encode('{"a": [' * 1000, bos=False, eos=False)
            head = [marker]
            if tokenizer is v13:
                v13_raw = v13.instruct_tokenizer.tokenizer
                head = [marker, *v13_raw.encode("read_file", bos=False, eos=False),
                        v13_raw.get_special_token("[ARGS]")]
            report(f"{name}: [TOOL_CALLS] + 1.05 MB unclosed JSON",
                   lambda t=tokenizer, h=head, c=chunk: feed_all(
                       t, lambda: itertools.chain(h, repeat(c, 150))))
        opening, closing = (raw.encode(c * 1000, bos=False, eos=False) for c in "[]")
        report("tekken (v3): [TOOL_CALLS] + JSON nested 100000 deep",
               lambda: feed_all(tekken, lambda: itertools.chain(
                   [marker], repeat(opening, 100), repeat(closing, 100))))
        v13_raw = v13.instruct_tokenizer.tokenizer
        deep = [marker, *v13_raw.encode("read_file", bos=False, eos=False),
                v13_raw.get_special_token("[ARGS]"),
                *repeat(v13_raw.encode('{"a":' * 1000, bos=False, eos=False), 40),
                *v13_raw.encode("1", bos=False, eos=False),
                *repeat(v13_raw.encode("}" * 1000, bos=False, eos=False), 40)]
        calls = feed_all(v13, lambda: iter(deep))
        report("v13: validate_arguments on [ARGS] nested 40000 deep",
               lambda: validate_arguments(BUILTIN_TOOLS["read_file"], calls[0].arguments))
        print("\nmistral-common's parser, for comparison:")
        for count in (500, 2000, 20_000):
            report(f"tekken (v3): {count} [TOOL_CALLS]",
                   lambda n=count: reference(tekken, [marker] * n))
        report("tekken (v3): [TOOL_CALLS] + JSON nested 100000 deep",
               lambda: reference(tekken, [marker, *repeat(opening, 100), *repeat(closing, 100)]))

    print("\nsearch_text, (a+)+$ on a 50000-character line, 2 s tool limit:")
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "aaa.txt").write_text("a" * 50_000 + "!\n")
        report("search_text", lambda: asyncio.run(run_tool(
            "search_text", {"query": "(a+)+$", "regex": True}, Workspace([Path(folder)]),
            timeout_s=2.0, output_chars=20_000)).content.replace("\n", " "))


if __name__ == "__main__":
    main()
