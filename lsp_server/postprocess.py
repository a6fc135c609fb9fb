"""Raw fill-in-the-middle output -> the completion an editor should show.

A FIM model rarely stops where a user expects: it runs past the end of the line, writes the
next function, copies the code that already follows the cursor, or closes a bracket the line
already closes. The rules below cut and tidy its output much as Copilot, Tabby and llama.vscode
do. Everything is string work (no I/O, no LSP, no torch).

Two entry points give the same result, which the tests check on every golden case:

- `CompletionFilter(ctx)`: `feed(delta)` while tokens stream in returns True once a stop rule
  has fired; nothing generated afterwards can change the result, so decoding can stop.
  `finalize()` returns the text to show.
- `postprocess(raw, ctx)`: the same on a finished completion.

Stop rules (1, 2, 7) look at complete lines only, so where the text is cut never depends on how
it was chunked; the price is one line of latency. They are applied in `CompletionFilter`
(`feed` and `_check_line`, rule 7 being `Scope.verdict`). Finishing rules (3, 2, 4, 5, 6) are
functions `(text, ctx) -> text` applied once, in the order of `FINISHING_RULES`.

Known gaps: brackets inside comments count, strings do not span lines, and only the style of
indentation is fixed (tabs vs spaces), not its width.
"""

from __future__ import annotations

import enum
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass


class Mode(enum.Enum):
    SINGLE_LINE = "single_line"
    MULTI_LINE = "multi_line"


class StopRule(enum.Enum):
    """Why a `CompletionFilter` asked the decoder to stop."""

    END_OF_LINE = "end_of_line"  # rule 1: single-line mode reached a newline
    REPEATS_SUFFIX = "repeats_suffix"  # rule 2: the completion copies the lines after the cursor
    LEFT_BLOCK = "left_block"  # rule 7: dedent below the cursor's block, or the block closed


@dataclass(frozen=True)
class Indentation:
    use_tabs: bool = False
    width: int = 4  # columns per level; with tabs, the tab width used to compare with spaces

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"indentation width must be at least 1, got {self.width}")

    def columns(self, whitespace: str) -> int:
        return len(whitespace.expandtabs(self.width))


DEFAULT_INDENTATION = Indentation()


@dataclass(frozen=True)
class CompletionContext:
    """What the rules know about the cursor; `from_prefix_suffix` derives it from the document."""

    line_prefix: str  # the cursor line before the cursor
    line_suffix: str  # the cursor line after the cursor
    next_lines: str  # the text after the cursor line's newline (the whole rest, or a window)
    mode: Mode
    indentation: Indentation = DEFAULT_INDENTATION

    def __post_init__(self) -> None:
        if "\n" in self.line_prefix or "\n" in self.line_suffix:
            raise ValueError("line_prefix and line_suffix must not contain a newline")

    @classmethod
    def from_prefix_suffix(cls, prefix: str, suffix: str, mode: Mode | None = None,
                           indentation: Indentation | None = None) -> CompletionContext:
        line_prefix = prefix.rpartition("\n")[2]
        line_suffix, _, next_lines = suffix.partition("\n")
        line_suffix = line_suffix.removesuffix("\r")
        return cls(line_prefix, line_suffix, next_lines,
                   mode or choose_mode(line_prefix, line_suffix),
                   indentation or detect_indentation(prefix + suffix))


def detect_indentation(text: str, default: Indentation = DEFAULT_INDENTATION) -> Indentation:
    """Tabs if more lines are indented with a tab than with a space; else the commonest step.

    The step is the most frequent increase of indentation between consecutive non-blank lines
    (ties go to the smaller step; steps over 8 columns are alignment, not indentation). Lines
    starting with `*` (inside a C block comment) are ignored. A tab's width cannot be read from
    the text, so tabs keep `default.width`.
    """
    lines = text.splitlines()
    tabs = sum(1 for line in lines if line.startswith("\t") and line.strip())
    spaces = sum(1 for line in lines if line.startswith(" ") and line.strip())
    if tabs > spaces:
        return Indentation(use_tabs=True, width=default.width)
    steps = _indent_steps(lines)
    if not steps:
        return default
    return Indentation(use_tabs=False, width=min(steps, key=lambda s: (-steps[s], s)))


def _indent_steps(lines: Iterable[str]) -> Counter[int]:
    steps: Counter[int] = Counter()
    previous: int | None = None
    for line in lines:
        body = line.lstrip(" \t")
        whitespace = line[: len(line) - len(body)]
        if not body or body.startswith("*") or "\t" in whitespace:
            continue
        if previous is not None and 0 < len(whitespace) - previous <= 8:
            steps[len(whitespace) - previous] += 1
        previous = len(whitespace)
    return steps


# -- Rule 1: mode ------------------------------------------------------------------------------

_BLOCK_OPENER = re.compile(
    r"(?:(?<!:):|[{(\[]|=>|->|\b(?:then|do|else|begin)|\bdo\s*\|[^|]*\||:\s*[|>][+-]?)\s*$"
)


def opens_block(line: str) -> bool:
    """`:` (Python, YAML; not `::`), `{ ( [`, `=>`, `->`, then/do/else/begin, `do |x|`, `key: |`."""
    return bool(_BLOCK_OPENER.search(line))


def choose_mode(line_prefix: str, line_suffix: str) -> Mode:
    """Multi-line on a blank line or at the end of a block opener, as Copilot does.

    Text after the cursor means single-line. At the end of any other line we also choose
    single-line: the statement is usually complete, and a model that wants a new line gets an
    empty result here and a multi-line one once the user has pressed Enter.
    """
    if line_suffix.strip():
        return Mode.SINGLE_LINE
    if not line_prefix.strip() or opens_block(line_prefix):
        return Mode.MULTI_LINE
    return Mode.SINGLE_LINE


# -- Lines and brackets --------------------------------------------------------------------------


def _leading(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _first_nonblank_lines(text: str, count: int) -> list[str]:
    found: list[str] = []
    start = 0
    while len(found) < count and start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        if text[start:end].strip():
            found.append(text[start:end])
        start = end + 1
    return found


def same_line(a: str, b: str, indentation: Indentation) -> bool:
    """Equal modulo surrounding whitespace; punctuation-only lines (`}`) need equal indentation.

    Without the second condition the `}` closing an inner block would match the `}` after the
    cursor that closes the outer one.
    """
    text = a.strip()
    if not text or text != b.strip():
        return False
    return any(ch.isalnum() for ch in text) or (
        indentation.columns(_leading(a)) == indentation.columns(_leading(b)))


_CLOSER_OF = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = frozenset(")]}")


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


@dataclass(frozen=True)
class _Brackets:
    opened: list[tuple[int, str]]  # own openers still open at the end: (offset, char)
    unopened: list[tuple[int, str]]  # closers with no own opener before them: (offset, char)
    quote: str | None  # the string delimiter still open at the end


def _opens_quote(text: str, i: int) -> bool:
    """A `'` is no quote after a letter (don't) or when it starts a Rust lifetime ('a)."""
    if i > 0 and _is_word(text[i - 1]):
        return False
    name_end = i + 1
    while name_end < len(text) and _is_word(text[name_end]):
        name_end += 1
    return name_end == i + 1 or text[name_end : name_end + 1] == "'"


def _scan(text: str, quote: str | None = None) -> _Brackets:
    """Brackets outside string literals; a string does not continue past a newline."""
    opened: list[tuple[int, str]] = []
    unopened: list[tuple[int, str]] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\n":
            quote = None
        elif quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"`" or (ch == "'" and _opens_quote(text, i)):
            quote = ch
        elif ch in _CLOSER_OF:
            opened.append((i, ch))
        elif ch in _CLOSERS:
            if opened:
                opened.pop()
            else:
                unopened.append((i, ch))
        i += 1
    return _Brackets(opened, unopened, quote)


def _around_cursor(ctx: CompletionContext) -> tuple[_Brackets, _Brackets]:
    before = _scan(ctx.line_prefix)
    return before, _scan(ctx.line_suffix, before.quote)


# -- Rule 7: the cursor's block ------------------------------------------------------------------

_CLOSING_WORD = re.compile(r"(?:end|fi|done|esac|endif|endfor|endwhile|endfunction)\b")
_CONTINUATION = re.compile(  # not YAML keys such as `when:` or `default: x`
    r"(?:else|elif|elsif|elseif|except|finally|catch|rescue|ensure)\b|(?:case|when)\s"
    r"|default\s*:\s*$|- ")


class Verdict(enum.Enum):
    KEEP = "keep"
    STOP_BEFORE = "stop_before"  # the line is outside the block: drop it and what follows
    STOP_AFTER = "stop_after"  # the line closes the block: keep it, drop what follows


@dataclass(frozen=True)
class Scope:
    """The block the cursor is in, measured in columns.

    `base` is the cursor line's indentation; on a blank cursor line it is that of the
    completion's first line, as the model placed it. After a block opener (`opener`) the body
    must be deeper than `base`; elsewhere siblings at `base` are fine. `after` is the
    indentation of the first non-blank line after the cursor line (None at the end of file).
    """

    base: int
    opener: bool
    after: int | None

    @classmethod
    def of(cls, ctx: CompletionContext, first_line: str) -> Scope:
        columns = ctx.indentation.columns
        after = _first_nonblank_lines(ctx.next_lines, 1)
        after_columns = columns(_leading(after[0])) if after else None
        if ctx.line_prefix.strip():
            return cls(columns(_leading(ctx.line_prefix)), opens_block(ctx.line_prefix),
                       after_columns)
        line = ctx.line_prefix + first_line if first_line.strip() else ctx.line_prefix
        return cls(columns(_leading(line)), False, after_columns)

    def verdict(self, line: str, indentation: Indentation) -> Verdict:
        """Rule 7: stop when a line leaves the block (the model moved on to the next function).

        At the opener's own level, `else:`/`} else {`/`except`/`case`/`- item` continue the
        statement. A closing line (`}`, `)`, `end`) at or below the block's level is kept and
        ends the completion, unless the code after the cursor continues deeper (then the block
        is not finished and the closer would be wrong). A closer that duplicates the next line
        is then dropped by rule 3. Everything else that dedents is cut.
        """
        text = line.strip()
        column = indentation.columns(_leading(line))
        if column > self.base or (column == self.base and not self.opener):
            return Verdict.KEEP
        closes = text[0] in _CLOSERS or bool(_CLOSING_WORD.match(text))
        if column == self.base and (
                _CONTINUATION.match(text) or (closes and opens_block(text))):
            return Verdict.KEEP
        if closes and not opens_block(text) and (self.after is None or column >= self.after):
            return Verdict.STOP_AFTER
        return Verdict.STOP_BEFORE


# -- Finishing rules -----------------------------------------------------------------------------


def drop_copy_of_next_line(text: str, ctx: CompletionContext) -> str:
    """Rule 3: the last line equals the first non-blank line after the cursor: drop it.

    FIM models like to end by writing the line that follows the gap. Only whole lines count
    (the first line counts when the cursor line is blank), compared by `same_line`.
    """
    after = _first_nonblank_lines(ctx.next_lines, 1)
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=None)
    if not after or last is None or (last == 0 and ctx.line_prefix.strip()):
        return text
    line = ctx.line_prefix + lines[0] if last == 0 else lines[last]
    if same_line(line, after[0], ctx.indentation):
        return "\n".join(lines[:last])
    return text


def trim_repeated_line_suffix(text: str, ctx: CompletionContext) -> str:
    """Rule 2, current line: the completion ends with the start of the text after the cursor.

    `print("|")` + `hello")` gives `hello`; `foo(|x)` + `a, x` gives `a, `. The overlap must
    hold a character other than a bracket or whitespace (pure brackets are counted by rule 4),
    must not split a word on either side, and must not leave a bracket of the completion's own
    open (in `g(x)` the `)` is the completion's).
    """
    rest = ctx.line_suffix.strip()
    body = text.rstrip()
    quote = _scan(ctx.line_prefix).quote
    for k in range(min(len(rest), len(body)), 0, -1):
        overlap, kept = rest[:k], body[: len(body) - k]
        if not body.endswith(overlap) or all(ch.isspace() or ch in "()[]{}" for ch in overlap):
            continue
        if (_is_word(kept[-1:]) and _is_word(overlap[0])) or (
                _is_word(overlap[-1]) and _is_word(rest[k : k + 1])):
            continue  # the overlap would split a word
        if not _scan(kept, quote).opened:
            return kept
    return text


def drop_closers_after_cursor(text: str, ctx: CompletionContext) -> str:
    """Rule 4: cut at a closer that the text after the cursor on this line already provides.

    In `foo(|)`, `a, b)` gives `a, b` and `bar()) + 1` gives `bar()`. The completion may close
    as many of the cursor line's open brackets as the line suffix leaves open; the first closer
    beyond that, if its kind appears among the suffix's closers, marks where the completion
    started to duplicate the suffix. A closer the suffix lacks is kept: it may close a bracket
    opened on an earlier line.
    """
    before, after = _around_cursor(ctx)
    suffix_closers = {ch for _, ch in after.unopened}
    spare = max(0, len(before.opened) - len(after.unopened))
    for offset, ch in _scan(text, before.quote).unopened[spare:]:
        if ch in suffix_closers:
            return text[:offset]
    return text


def drop_unclosed_openers(text: str, ctx: CompletionContext) -> str:
    """Rule 4, single-line: a bracket left open must be closed by the text after the cursor.

    Otherwise the completion is cut before the outermost bracket that nothing closes: `x = |`
    + `foo(` gives `foo`, and the user gets the arguments with the next request. Being
    conservative, we do not check that the line's own open brackets still get their closers.
    """
    if ctx.mode is not Mode.SINGLE_LINE:
        return text
    before, after = _around_cursor(ctx)
    opened = _scan(text, before.quote).opened
    available = [ch for _, ch in after.unopened]
    keep = len(opened)
    while keep and available[:keep] != [_CLOSER_OF[ch] for _, ch in reversed(opened[:keep])]:
        keep -= 1
    return text if keep == len(opened) else text[: opened[keep][0]]


def match_file_indentation(text: str, ctx: CompletionContext) -> str:
    """Rule 5: re-indent lines that use the other style (tabs vs spaces) to the file's style.

    Relative depth is kept: tabs become `width` spaces; in a tab file, a line starting with
    spaces gets one tab per model level, the level being the model's own commonest step (or the
    file's tab width) and the remainder staying spaces. Lines starting with a tab are left alone
    there (gofmt aligns with spaces after tabs). What the user typed is never changed: the first
    line is touched only on a blank cursor line, and only after the typed whitespace.
    """
    indentation = ctx.indentation
    lines = text.split("\n")
    blank_cursor_line = not ctx.line_prefix.strip()
    whole = [ctx.line_prefix + lines[0] if blank_cursor_line else "", *lines[1:]]
    steps = _indent_steps(whole)
    unit = min(steps, key=lambda s: (-steps[s], s)) if steps else indentation.width

    def restyle(line: str) -> str:
        whitespace = _leading(line)
        if indentation.use_tabs and whitespace.startswith(" "):
            columns = len(whitespace.expandtabs(unit))
            return "\t" * (columns // unit) + " " * (columns % unit) + line[len(whitespace):]
        if not indentation.use_tabs and "\t" in whitespace:
            return " " * indentation.columns(whitespace) + line[len(whitespace):]
        return line

    first = lines[0]
    if blank_cursor_line:
        fixed = restyle(ctx.line_prefix + first)
        first = fixed[len(ctx.line_prefix):] if fixed.startswith(ctx.line_prefix) else first
    return "\n".join([first, *(restyle(line) for line in lines[1:])])


def trim_trailing_whitespace(text: str, ctx: CompletionContext) -> str:
    """Rule 6: drop trailing blank lines and spaces; a blank completion becomes "".

    Exception: in the middle of a line whose rest starts with a non-blank character, spaces
    ending the last line are the joint the model chose: `return |x` + `a + ` must not give
    `a +x`. They go when the rest starts with a space, which would double it.
    """
    body = text.rstrip()
    tail = text[len(body):]
    if body and tail and "\n" not in tail and ctx.line_suffix[:1].strip():
        return text
    return body


Rule = Callable[[str, CompletionContext], str]

FINISHING_RULES: tuple[Rule, ...] = (
    drop_copy_of_next_line,
    trim_repeated_line_suffix,
    drop_closers_after_cursor,
    drop_unclosed_openers,
    match_file_indentation,
    trim_trailing_whitespace,
)


# -- Streaming -----------------------------------------------------------------------------------


class CompletionFilter:
    """Feed streamed text; `feed` returns True once the completion is known to be finished.

    Each complete line goes through the stop rules in order: single-line mode ends at the
    first newline (rule 1); a run of whole lines equal to the first non-blank lines after the
    cursor (two of them, or all if fewer remain) is cut where it starts (rule 2); a line that
    leaves the cursor's block ends the completion (rule 7). `finalize` checks the last,
    unterminated line the same way and then applies `FINISHING_RULES`.
    """

    def __init__(self, ctx: CompletionContext) -> None:
        self._ctx = ctx
        self._raw = ""
        self._line_start = 0  # offset of the first line not yet checked
        self._line_index = 0
        self._scope: Scope | None = None  # known once the first line is complete
        self._matches: list[tuple[int, int]] = []  # (offset of first matched line, lines matched)
        self._suffix_lines = _first_nonblank_lines(ctx.next_lines, 2)
        self._stop_rule: StopRule | None = None
        self._result: str | None = None

    @property
    def stop_rule(self) -> StopRule | None:
        return self._stop_rule

    def feed(self, delta: str) -> bool:
        if self._result is not None:
            raise RuntimeError("feed() after finalize()")
        if self._stop_rule is not None:
            return True
        self._raw += delta
        while (end := self._raw.find("\n", self._line_start)) >= 0:
            if self._ctx.mode is Mode.SINGLE_LINE:
                return self._stop(StopRule.END_OF_LINE, end)
            if self._check_line(end):
                return True
        return False

    def finalize(self) -> str:
        if self._result is None:
            if self._stop_rule is None and self._ctx.mode is Mode.MULTI_LINE:
                self._check_line(len(self._raw))
            text = self._raw
            for rule in FINISHING_RULES:
                text = rule(text, self._ctx)
            self._result = text
        return self._result

    def _stop(self, rule: StopRule, cut: int) -> bool:
        self._stop_rule, self._raw = rule, self._raw[:cut]
        return True

    def _check_line(self, end: int) -> bool:
        ctx, start, index = self._ctx, self._line_start, self._line_index
        line = self._raw[start:end]
        self._line_start, self._line_index = end + 1, index + 1
        if index == 0:
            self._scope = Scope.of(ctx, line)
        if not line.strip() or (index == 0 and ctx.line_prefix.strip()):
            return False  # blank lines, and the rest of a non-blank cursor line, decide nothing
        whole = ctx.line_prefix + line if index == 0 else line
        suffix = self._suffix_lines
        self._matches = [(first, n + 1) for first, n in (*self._matches, (start, 0))
                         if n < len(suffix) and same_line(whole, suffix[n], ctx.indentation)]
        repeated = [first for first, n in self._matches if n == len(suffix)]
        if repeated:
            return self._stop(StopRule.REPEATS_SUFFIX, min(repeated))
        if index == 0:
            return False
        assert self._scope is not None
        verdict = self._scope.verdict(line, ctx.indentation)
        if verdict is Verdict.KEEP:
            return False
        return self._stop(StopRule.LEFT_BLOCK, start if verdict is Verdict.STOP_BEFORE else end)


def postprocess(raw: str, ctx: CompletionContext) -> str:
    """The completion to show for a finished raw completion ("" when nothing is useful)."""
    completion = CompletionFilter(ctx)
    completion.feed(raw)
    return completion.finalize()
