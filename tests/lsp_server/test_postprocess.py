"""Golden cases: raw FIM output + the document around the cursor -> the exact completion shown.

Every case also runs through the streaming `CompletionFilter`, fed in random chunks, which must
give the same text and report the same stop rule as the batch `postprocess`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lsp_server.postprocess import (
    CompletionContext,
    CompletionFilter,
    Indentation,
    Mode,
    StopRule,
    choose_mode,
    detect_indentation,
    postprocess,
)

CURSOR = "█"


def lines(*text: str) -> str:
    return "\n".join(text)


@dataclass(frozen=True)
class Case:
    name: str
    document: str  # the file, with CURSOR where the completion goes
    raw: str  # what the model generated
    expected: str  # what the editor shows
    stop: StopRule | None = None  # the stop rule that fires while streaming `raw`

    def context(self) -> CompletionContext:
        prefix, suffix = self.document.split(CURSOR)
        return CompletionContext.from_prefix_suffix(prefix, suffix)


PYTHON = [
    # Rule 1: single-line in the middle of a line and at the end of a plain statement.
    Case("args_drop_closer_after_cursor", "result = compute(█)\n", "a, b)", "a, b"),
    Case("args_keep_own_closer", "print(█)\n", "f(x)", "f(x)"),
    Case("args_cut_at_extra_closer_then_newline", "print(█)\n", "f(x))\nprint(y)", "f(x)",
         StopRule.END_OF_LINE),
    Case("args_cut_at_extra_closer_mid_line", "foo(█)\n", "bar()) + 1", "bar()"),
    Case("comprehension_drops_bracket", "squares = [x * x for x in █]\n", "range(10)]",
         "range(10)"),
    Case("string_drops_quote_and_paren", 'print("█")\n', 'hello, world")', "hello, world"),
    Case("single_quoted_key", "name = d['█']\n", "key']", "key"),
    Case("fstring_braces_are_string_text", 'msg = f"{█}"\n', 'name}"', "name"),
    Case("rest_of_line_repeated", "value = compute(█, flag)\n", "data, flag)", "data"),
    Case("colon_repeated", "if █:\n    pass\n", "x > 0:", "x > 0"),
    Case("word_after_cursor_keeps_space", "return █x * 2\n", "offset + ", "offset + "),
    Case("space_before_repeated_rest_kept", "items = [█for x in xs]\n", "x * 2 for x in xs]",
         "x * 2 "),
    Case("rest_starting_with_space_not_doubled", "foo(a█ + b)\n", ".x + b)", ".x"),
    Case("nested_condition_keeps_own_closer", "if (f(█)) {\n", "g(x)) {", "g(x)"),
    Case("closer_of_previous_line_kept", "total = sum(\n    x for x in █\n", "xs)", "xs)"),
    Case("overlap_inside_word_is_coincidence", "x = foo(█e)\n", "name", "name"),
    Case("word_overlap_on_token_boundary", "foo(█x)\n", "a, x", "a, "),
    Case("end_of_statement_is_single_line", "x = █\n", "compute(a)\ny = 2\n", "compute(a)",
         StopRule.END_OF_LINE),
    Case("end_of_statement_new_line_shows_nothing", "total = a + b█\n", "\nprint(total)", "",
         StopRule.END_OF_LINE),
    # Rule 4: a single-line completion may leave open only what the suffix closes.
    Case("unclosed_call_cut_before_opener", "x = █\n", "load(\n    path,\n)", "load",
         StopRule.END_OF_LINE),
    Case("unclosed_call_closed_by_suffix", "print(█)\n", "len(items", "len(items"),
    Case("unclosed_inner_bracket_cut", "print(█)\n", "xs[0", "xs"),
    # Rule 7: the cursor's block.
    Case("def_body_stops_at_next_def",
         lines("def add(a, b):█", "", "def sub(a, b):", "    return a - b", ""),
         lines("", "    return a + b", "", "def mul(a, b):", "    return a * b", ""),
         lines("", "    return a + b"), StopRule.LEFT_BLOCK),
    Case("blank_line_in_body_stops_at_dedent",
         lines("def area(r):", "    █"),
         lines("pi = 3.14159", "    return pi * r * r", "", "print(area(2))", ""),
         lines("pi = 3.14159", "    return pi * r * r"), StopRule.LEFT_BLOCK),
    Case("unindented_blank_line_uses_model_indent",
         lines("class Stack:", "    def __init__(self):", "        self.items = []", "█"),
         lines("    def push(self, item):", "        self.items.append(item)", "",
               "stack = Stack()", ""),
         lines("    def push(self, item):", "        self.items.append(item)"),
         StopRule.LEFT_BLOCK),
    Case("else_continues_if",
         lines("def sign(x):", "    if x < 0:█", ""),
         lines("", "        return -1", "    else:", "        return 1", '    print("done")',
               "print(sign(3))"),
         lines("", "        return -1", "    else:", "        return 1"), StopRule.LEFT_BLOCK),
    Case("except_continues_try",
         lines("def read():", "    try:█", ""),
         lines("", "        x = load()", "    except OSError:", "        x = None",
               "    return x", ""),
         lines("", "        x = load()", "    except OSError:", "        x = None"),
         StopRule.LEFT_BLOCK),
    # Rule 2 (whole lines) and rule 3.
    Case("copies_two_suffix_lines",
         lines("def f(items):", "    █", "    total = sum(items)", "    return total", ""),
         lines("items = [i for i in items if i]", "    total = sum(items)", "    return total",
               "", "", "def g():"),
         "items = [i for i in items if i]", StopRule.REPEATS_SUFFIX),
    Case("copies_the_only_suffix_line",
         lines("def main():", "    █", "    run()"),
         lines("setup()", "    run()", "    cleanup()"), "setup()", StopRule.REPEATS_SUFFIX),
    Case("last_line_is_next_line",
         lines("def f(x):", "    █", "    return y", "", "", "def other():", "    pass", ""),
         lines("y = x * 2", "    return y"), "y = x * 2"),
    Case("last_line_differs_from_next_line",
         lines("def f(x):", "    █", "    return y", "", "", "def other():", "    pass", ""),
         lines("y = x * 2", "    return y + 1"), lines("y = x * 2", "    return y + 1")),
    Case("whole_completion_is_next_line",
         lines("def f():", "    █", "    return 1", "", "x = 2", ""), "return 1", ""),
    Case("one_equal_line_mid_completion_is_kept",
         lines("def f(x):", "    █", "    return x", "", "def g():", "    pass", ""),
         lines("if x:", "        return x", "    x = 1", ""),
         lines("if x:", "        return x", "    x = 1")),
    Case("dict_closer_kept_then_dropped_as_next_line",
         lines("CONFIG = {█", "}", "", "print(CONFIG)", ""),
         lines("", '    "host": "localhost",', '    "port": 8080,', "}", "", "print(CONFIG)"),
         lines("", '    "host": "localhost",', '    "port": 8080,'), StopRule.LEFT_BLOCK),
    Case("call_closer_dropped_as_next_line",
         lines("response = client.post(█", ")", "response.raise_for_status()", ""),
         lines("", "    url,", "    json=payload,", ")", "response.raise_for_status()"),
         lines("", "    url,", "    json=payload,"), StopRule.LEFT_BLOCK),
    # Rules 5 and 6.
    Case("tabs_become_file_spaces",
         lines("def f(xs):", "    count = 0", "    for x in xs:█", ""),
         lines("", "\t\tprint(x)", "\t\tcount += 1"),
         lines("", "        print(x)", "        count += 1")),
    Case("tabs_become_two_spaces",
         lines("def f(xs):", "  for x in xs:█", ""), lines("", "\t\tprint(x)"),
         lines("", "    print(x)")),
    Case("trailing_blank_lines_and_spaces", "def f():█\n",
         lines("", "    return 1   ", "", "   ", ""), lines("", "    return 1")),
    Case("blank_completion_is_nothing", "def f():█\n", lines("", "   ", "", ""), ""),
]

BRACES = [
    Case("js_body_closer_is_next_line",
         lines("function greet(name) {", "  █", "}", ""),
         lines('const msg = "Hello, " + name;', "  return msg;", "}", "", "function bye() {"),
         lines('const msg = "Hello, " + name;', "  return msg;"), StopRule.REPEATS_SUFFIX),
    Case("js_inner_closer_is_not_next_line",
         lines("function f(items) {█", "}", "module.exports = f;", ""),
         lines("", "  for (const item of items) {", "    console.log(item);", "  }", "}", ""),
         lines("", "  for (const item of items) {", "    console.log(item);", "  }"),
         StopRule.LEFT_BLOCK),
    Case("js_arrow_stops_at_next_statement", "const double = (xs) =>█\n",
         lines(" xs.map((x) => x * 2);", "", "const triple = 3;", ""), " xs.map((x) => x * 2);",
         StopRule.LEFT_BLOCK),
    Case("js_else_continues_block", lines("if (ok) {█", "}", "next();", ""),
         lines("", "  run();", "} else {", "  fail();", "}", "next();"),
         lines("", "  run();", "} else {", "  fail();"), StopRule.LEFT_BLOCK),
    Case("js_closer_kept_at_end_of_file", lines("function f() {", "  █"),
         lines("return 1;", "}", "", "function g() {}"), lines("return 1;", "}"),
         StopRule.LEFT_BLOCK),
    Case("js_closer_dropped_when_body_continues",
         lines("function f() {", "  █", "  return x;", "}", ""), lines("const x = 1;", "}", ""),
         "const x = 1;", StopRule.LEFT_BLOCK),
    Case("ts_object_literal_rest_of_line", "const user: User = { name: █ };\n", '"Ada" };',
         '"Ada"'),
    Case("rust_lifetimes_are_not_strings", "fn longest<'a>(x: &'a str, █) -> &'a str {\n",
         "y: &'a str) -> &'a str {", "y: &'a str"),
    Case("rust_loop_body",
         lines("fn main() {", "    let v = vec![1, 2, 3];", "    for x in &v {█", "    }", "}", ""),
         lines("", '        println!("{}", x);', "    }", "}"),
         lines("", '        println!("{}", x);'), StopRule.LEFT_BLOCK),
    Case("go_spaces_become_tabs",
         lines("package main", "", "func main() {", "\tfmt.Println(sum(nil))", "}", "",
               "func sum(xs []int) int {█", "}", ""),
         lines("", "    total := 0", "    for _, x := range xs {", "        total += x", "    }",
               "    return total", "}", ""),
         lines("", "\ttotal := 0", "\tfor _, x := range xs {", "\t\ttotal += x", "\t}",
               "\treturn total"), StopRule.REPEATS_SUFFIX),
    Case("go_blank_line_in_tab_body",
         lines("func f() {", "\tif ok {", "\t\t█", "\t}", "}", ""),
         lines("x := 1", "        return x", "\t}", ""), lines("x := 1", "\t\treturn x"),
         StopRule.LEFT_BLOCK),
    Case("c_body_closer_is_next_line",
         lines("int max(int a, int b) {", "    █", "}", ""),
         lines("return a > b ? a : b;", "}", "", "int min(int a, int b) {"),
         "return a > b ? a : b;", StopRule.REPEATS_SUFFIX),
    Case("c_condition_drops_paren", "if (█) {\n", "a > b) {", "a > b"),
    Case("c_statement_drops_semicolon", "int total = █;\n", "a + b;", "a + b"),
]

OTHERS = [
    Case("yaml_mapping_stops_at_sibling_key",
         lines("services:", "  web:█", "  db:", "    image: postgres", ""),
         lines("", "    image: nginx", "    ports:", '      - "80:80"', "  cache:",
               "    image: redis"),
         lines("", "    image: nginx", "    ports:", '      - "80:80"'), StopRule.LEFT_BLOCK),
    Case("yaml_sequence_at_key_level", "steps:█\n",
         lines("", "- checkout", "- run: make test", "env:", "  CI: true"),
         lines("", "- checkout", "- run: make test"), StopRule.LEFT_BLOCK),
    Case("yaml_block_scalar", "build:\n  script: |█\n",
         lines("", "    make build", "    make test", "  when: always", ""),
         lines("", "    make build", "    make test"), StopRule.LEFT_BLOCK),
    Case("ruby_do_block_end_is_next_line", lines("items.each do |item|█", "end", ""),
         lines("", "  puts item", "end", 'puts "done"'), lines("", "  puts item"),
         StopRule.REPEATS_SUFFIX),
    Case("shell_then_fi_is_next_line", lines('if [ -f "$f" ]; then█', "fi", ""),
         lines("", '  cat "$f"', "fi", "echo done"), lines("", '  cat "$f"'),
         StopRule.REPEATS_SUFFIX),
]

CASES = PYTHON + BRACES + OTHERS


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_golden(case: Case) -> None:
    assert postprocess(case.raw, case.context()) == case.expected


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_stop_rule(case: Case) -> None:
    completion = CompletionFilter(case.context())
    assert completion.feed(case.raw) is (case.stop is not None)
    assert completion.stop_rule is case.stop


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_streaming_in_random_chunks_matches_batch(case: Case, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(0, len(case.raw)), max_size=12)))
    chunks = [case.raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(case.raw)], strict=True)]
    completion = CompletionFilter(case.context())
    stopped = [completion.feed(chunk) for chunk in chunks]
    assert completion.finalize() == case.expected
    assert completion.stop_rule is case.stop
    assert any(stopped) is (case.stop is not None)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_streaming_one_character_at_a_time_matches_batch(case: Case) -> None:
    completion = CompletionFilter(case.context())
    for ch in case.raw:
        completion.feed(ch)
    assert (completion.finalize(), completion.stop_rule) == (case.expected, case.stop)


def test_stop_fires_when_the_line_leaving_the_block_is_complete() -> None:
    completion = CompletionFilter(CompletionContext.from_prefix_suffix("def f():", "\n"))
    assert [completion.feed(delta) for delta in ["\n    ret", "urn 1\n", "\n", "def g", "():",
                                                 "\n", "    pass"]] == [
        False, False, False, False, False, True, True]
    assert completion.finalize() == "\n    return 1"


def test_text_after_a_stop_is_ignored() -> None:
    completion = CompletionFilter(CompletionContext.from_prefix_suffix("x = ", ""))
    assert completion.feed("1\n")
    assert completion.feed("2 + 2")
    assert completion.finalize() == "1"


def test_finalize_is_final() -> None:
    completion = CompletionFilter(CompletionContext.from_prefix_suffix("x = ", ""))
    completion.feed("1")
    assert (completion.finalize(), completion.finalize()) == ("1", "1")
    with pytest.raises(RuntimeError):
        completion.feed("2")


def test_explicit_mode_overrides_the_cursor_position() -> None:
    ctx = CompletionContext.from_prefix_suffix("x = ", "", mode=Mode.MULTI_LINE)
    assert postprocess("compute(\n    a,\n)", ctx) == "compute(\n    a,\n)"


def test_context_rejects_newlines_in_the_cursor_line() -> None:
    with pytest.raises(ValueError, match="newline"):
        CompletionContext("a\nb", "", "", Mode.SINGLE_LINE)


def test_context_from_document_splits_the_cursor_line() -> None:
    ctx = CompletionContext.from_prefix_suffix("def f():\n    x = fo", "o(1)\r\n    y = 2\r\n")
    assert ctx == CompletionContext("    x = fo", "o(1)", "    y = 2\r\n", Mode.SINGLE_LINE,
                                    Indentation(use_tabs=False, width=4))


@pytest.mark.parametrize(("line_prefix", "line_suffix", "mode"), [
    ("foo(", ")", Mode.SINGLE_LINE),
    ("x = foo(a)", "  ", Mode.SINGLE_LINE),
    ("x = std::", "", Mode.SINGLE_LINE),
    ("", "", Mode.MULTI_LINE),
    ("    ", "", Mode.MULTI_LINE),
    ("def f():", "", Mode.MULTI_LINE),
    ("x = [", "", Mode.MULTI_LINE),
    ("fn f() -> i32 {  ", "", Mode.MULTI_LINE),
    ("const f = () =>", "", Mode.MULTI_LINE),
    ("if x then", "", Mode.MULTI_LINE),
    ("while true; do", "", Mode.MULTI_LINE),
    ("items.each do |x|", "", Mode.MULTI_LINE),
    ("script: |", "", Mode.MULTI_LINE),
    ("  run: >-", "", Mode.MULTI_LINE),
])
def test_choose_mode(line_prefix: str, line_suffix: str, mode: Mode) -> None:
    assert choose_mode(line_prefix, line_suffix) is mode


@pytest.mark.parametrize(("text", "indentation"), [
    ("def f():\n    if x:\n        return 1\n    return 2\n", Indentation(False, 4)),
    ("function f() {\n  if (x) {\n    return 1;\n  }\n}\n", Indentation(False, 2)),
    ("func f() {\n\tif x {\n\t\treturn\n\t}\n}\n", Indentation(True, 4)),
    ("", Indentation(False, 4)),
    ("x = 1\ny = 2\n", Indentation(False, 4)),
    ("/*\n * doc\n * more\n */\nint f() {\n    return 1;\n}\n", Indentation(False, 4)),
    ("f(a,\n             b)\ng(c,\n  d)\nif x:\n  y\n", Indentation(False, 2)),
    ("a:\n  b:\n      c: 1\n  d:\n    e: 2\n", Indentation(False, 2)),
])
def test_detect_indentation(text: str, indentation: Indentation) -> None:
    assert detect_indentation(text) == indentation


def test_detect_indentation_keeps_the_default_tab_width() -> None:
    assert detect_indentation("\tx\n", Indentation(False, 8)) == Indentation(True, 8)


def test_indentation_width_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Indentation(width=0)

